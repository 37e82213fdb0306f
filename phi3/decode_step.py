"""A decode step through the whole stack of quantized (or bf16) Phi-3 layers in one native call.

Decoding one token through phi-3-mini runs ~15 small tensor operations per layer between the
quantized matmuls (norms, splits, SwiGLU, residual adds, casts) and as many module calls: about
0.7 ms a layer of Python and dispatch, 20 ms a token over 32 layers. `phi3_decode_layers` (in
`csrc/qgemm_avx2.c`) does the whole per-layer chain in C: RMSNorm, [Q|K|V] projection, RoPE,
fp16 cache write and attention, output projection, residual, RMSNorm, [gate|up] projection,
up·silu(gate), down projection, residual. The embedding lookup, the final norm and the head stay
in Python (once per token).

It runs for dense Phi-3 models (`models/phi3.py`) whose four linears per layer are int4 / int8 on
the native kernels (fp32 activations, fp16 KV cache) or bf16 (`Bf16Linear`: a bf16 model, bf16 KV
cache; its residual stream stays fp32 inside the call, where the module path rounds it to bf16 after
every operation), one new token per row, written at the same slot for all rows (the generator's
decode steps) or at each row's own slot with a mask (the server's slots). Anything else (fp32
weights, whose module path equals the reference exactly) takes the module path, which computes the
same function (the norms and SwiGLU differ in float rounding only: see `tests/test_decode_step.py`).
`PHI3_DECODE_STEP=0` turns the native step off.
"""

from __future__ import annotations

import ctypes
import os

import torch

from . import cpu_kernels
from .layers import Attention, Bf16Linear, GatedMLP, RMSNorm, first_visible_key

_p, _i = ctypes.c_void_p, ctypes.c_int


class _Linear(ctypes.Structure):  # phi3_linear in the C file
    _fields_ = [("packed", _p), ("row_scale", _p), ("bias", _p), ("bits", _i), ("N", _i), ("K", _i), ("G", _i),
                ("symmetric", _i), ("levels", _i)]


class _Layer(ctypes.Structure):  # phi3_layer in the C file
    _fields_ = [("ln1", _p), ("ln2", _p), ("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear),
                ("down", _Linear), ("k", _p), ("v", _p), ("kv_bf16", _i)]


def _linear(m) -> _Linear | None:
    """The C description of a linear on the native kernels (int4, int8, or bf16 without a bias), None
    for anything else."""
    from .quant import Int4Linear, Int8Linear

    if type(m) is Bf16Linear:
        w = m.weight
        if m.bias is not None or w.dtype != torch.bfloat16 or not w.is_contiguous() or w.device.type != "cpu":
            return None
        return _Linear(w.data_ptr(), None, None, 16, m.out_features, m.in_features, 0, 0, 1)
    if type(m) not in (Int4Linear, Int8Linear) or m._lib is None or m.out_features % cpu_kernels.ROWS:
        return None
    if m.bias is not None and not (m.bias.dtype == torch.float32 and m.bias.is_contiguous()):
        return None
    bias = None if m.bias is None else m.bias.data_ptr()
    levels = cpu_kernels.activation_levels(m.in_features)
    if type(m) is Int4Linear:
        sym = int(cpu_kernels.int4_is_symmetric(m.packed, m.group_size))
        return _Linear(m.packed.data_ptr(), None, bias, 4, m.out_features, m.in_features, m.group_size, sym, levels)
    row_scale = None if m._row_scales is None else m._row_scales.data_ptr()
    return _Linear(m.packed.data_ptr(), row_scale, bias, 8, m.out_features, m.in_features, m._block, 0, levels)


def _norm_weight(m, eps: float) -> torch.Tensor | None:
    """An RMSNorm's weight in fp32 (a bf16 model's: an fp32 copy, which the step keeps)."""
    if type(m) is not RMSNorm or m.eps != eps or m.weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    return m.weight.detach().float().contiguous()


class DecodeStep:
    """The native step for one model and one KV cache (their pointers, gathered once)."""

    def __init__(self, model, cache, layers: list[_Layer], norms: list[torch.Tensor]):
        self.model = model  # its weights stay alive while the step is in use (the cache holds the step)
        self.norms = norms  # the fp32 norm weights the layers point to
        self.parts, self.kv = _parts(model), _kv_buffers(cache)  # what the pointers were taken from
        self.layers = (_Layer * len(layers))(*layers)
        cfg = model.config
        self.n_layers = len(layers)
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.hidden, self.intermediate, self.eps = cfg.hidden_size, cfg.intermediate_size, cfg.rms_norm_eps
        self.max_len = cache.layers[0].k.shape[2]

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                 start: int | torch.Tensor) -> torch.Tensor:
        """x [B, 1, D] (the embedded new tokens; fp32, or bf16 for a bf16 model) -> the last layer's
        output [B, 1, D] in x's dtype; cos, sin [B, 1, 1, rot]; `start` the slot of the new tokens: an
        int, or LongTensor [B] (a slot per row, then `mask` is required); mask bool [B, 1, 1, max(start) + 1]
        or None; the slots before the first one some row may see (behind a sliding window) are not read."""
        b, rot, dtype = x.shape[0], cos.shape[-1], x.dtype
        starts = torch.full((b,), start, dtype=torch.int32) if isinstance(start, int) else start.to(torch.int32)
        s = int(starts.max()) + 1
        if not isinstance(start, int) and mask is None:
            raise ValueError("a slot per row needs the attention mask (what each row may see)")
        x = x.float().contiguous().clone()  # the residual stream, fp32, updated in place
        cos, sin = cos.reshape(b, rot).float().contiguous(), sin.reshape(b, rot).float().contiguous()
        valid = None if mask is None else mask.reshape(b, s).contiguous()
        cpu_kernels.library().phi3_decode_layers(
            x.data_ptr(), b, self.hidden, self.layers, self.n_layers, self.eps, self.heads, self.kv_heads,
            self.head_dim, self.intermediate, cos.data_ptr(), sin.data_ptr(), rot, self.max_len, starts.data_ptr(),
            first_visible_key(valid), s, None if valid is None else valid.data_ptr(), self.head_dim ** -0.5,
            torch.get_num_threads())
        return x.to(dtype)


def build(model, cache) -> DecodeStep | None:
    """The native decode step for `model` (a `Phi3ForCausalLM`) writing into `cache`, or None when
    some part of them is not what the C code computes (see the module doc)."""
    from .models.phi3 import DecoderLayer

    lib = cpu_kernels.library()
    cfg = model.config
    if lib is None or model.dtype not in (torch.float32, torch.bfloat16) or cfg.head_dim % 8 \
            or cfg.head_dim > cpu_kernels.MAX_HEAD_DIM:
        return None
    if cfg.rotary_dim % 2 or cfg.intermediate_size % 8 or cfg.num_attention_heads % cfg.num_key_value_heads:
        return None
    layers, norms = [], []
    for layer, kv in zip(model.model.layers, cache.layers):
        if type(layer) is not DecoderLayer or type(layer.self_attn) is not Attention or type(layer.mlp) is not GatedMLP:
            return None
        # a KVCache, or the server's view of some rows of its slots (same k, v buffers [B, KV, L, d])
        k, v = getattr(kv, "k", None), getattr(kv, "v", None)
        if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)) or k.dtype not in (torch.float16, torch.bfloat16) \
                or v.dtype != k.dtype or k.shape != v.shape or not (k.is_contiguous() and v.is_contiguous()):
            return None
        ln1, ln2 = _norm_weight(layer.input_layernorm, cfg.rms_norm_eps), _norm_weight(layer.post_attention_layernorm,
                                                                                       cfg.rms_norm_eps)
        attn, mlp = layer.self_attn, layer.mlp
        linears = [_linear(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        if ln1 is None or ln2 is None or any(li is None for li in linears):
            return None
        norms += [ln1, ln2]
        layers.append(_Layer(ln1.data_ptr(), ln2.data_ptr(), *linears, k.data_ptr(), v.data_ptr(),
                             int(k.dtype == torch.bfloat16)))
    return DecodeStep(model, cache, layers, norms) if layers else None


def _parts(model) -> tuple:
    """The modules whose tensors a step reads, in order, and where and at which version their weights
    are (a bf16 model's norms are copied to fp32 when the step is built: a weight changed since, by
    training, needs a new step)."""
    out = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        modules = [layer.input_layernorm, layer.post_attention_layernorm, attn.qkv_proj, attn.o_proj,
                   mlp.gate_up_proj, mlp.down_proj]
        out += [layer, *modules]
        out += [(w.data_ptr(), w._version) for w in (getattr(m, "weight", None) for m in modules)
                if isinstance(w, torch.Tensor)]
    return tuple(out)


def _kv_buffers(cache) -> tuple:
    """Where and how each layer's k, v buffers lie (the step writes through these pointers)."""
    out = []
    for kv in cache.layers:
        k, v = getattr(kv, "k", None), getattr(kv, "v", None)
        if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
            return ()
        out.append((k.data_ptr(), v.data_ptr(), k.dtype, v.dtype, k.shape, v.shape, k.stride(), v.stride()))
    return tuple(out)


def for_cache(model, cache) -> DecodeStep | None:
    """`build(model, cache)`, remembered on the cache (a generation's decode steps all use it) and
    on the model: the server makes a new view of its slot rows every step, over the same buffers, so
    the model's last step is reused when its modules and the k, v buffers are the same ones."""
    if os.environ.get("PHI3_DECODE_STEP", "1") in ("0", "false", "no"):
        return None
    step = getattr(cache, "_decode_step", False)
    if step is False or (step is not None and step.model is not model):
        last = model.__dict__.get("_last_decode_step")
        if last is not None and last.model is model and last.parts == _parts(model) and last.kv == _kv_buffers(cache):
            step = last
        else:
            step = build(model, cache)
            if step is not None:
                model.__dict__["_last_decode_step"] = step
        cache._decode_step = step
    return step
