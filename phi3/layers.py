"""Building blocks shared by the model families: RMSNorm, RoPE / LongRoPE, attention, gated MLP, KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_kernels
from torch import nn

from .config import ModelConfig, longrope_attention_factor


class Bf16Linear(nn.Linear):
    """An `nn.Linear` with bf16 weights whose few-token calls without autograd (decode steps) run
    on the native bf16 kernel: the weights stream at memory speed, fp32 sums, the result rounded to
    the input's dtype like `F.linear`'s. Anything else (prefill, training) is `nn.Linear` itself.
    Same parameters and state dict: `use_native_bf16` swaps the class of existing modules."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        lib = cpu_kernels.library()
        if (rows > cpu_kernels.BF16_MAX_ROWS or lib is None or x.device.type != "cpu"
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                or self.weight.dtype != torch.bfloat16 or not self.weight.is_contiguous()):
            return super().forward(x)
        y = cpu_kernels.bf16_matmul(lib, x.reshape(rows, self.in_features), self.weight)
        if self.bias is not None:
            y += self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


def use_native_bf16(model: nn.Module) -> int:
    """Give every bf16 `nn.Linear` of `model` the native decode path (`Bf16Linear`), in place;
    returns how many. A no-op without the native kernels."""
    if cpu_kernels.library() is None:
        return 0
    swapped = 0
    for m in model.modules():
        if type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu":
            m.__class__ = Bf16Linear
            swapped += 1
    return swapped


def embedding(num_embeddings: int, embedding_dim: int) -> nn.Embedding:
    """nn.Embedding with its N(0, 1) init, skipped on the meta device (where the loaders build models
    whose values come next): there `normal_` and `randn` run Python decompositions that import
    torch._dynamo and sympy (~1.4 s of start-up, ~80 MB resident)."""
    shape = (num_embeddings, embedding_dim)
    weight = torch.empty(shape) if torch.get_default_device().type == "meta" else torch.randn(shape)
    return nn.Embedding(num_embeddings, embedding_dim, _weight=weight)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x²) + eps) computed in fp32, cast back, then scaled (HF semantics)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            if torch.compiler.is_compiling() or not torch.is_grad_enabled():
                return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # same numbers as below
            return _RMSNorm.apply(x, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    """fp32 RMSNorm with a hand-written backward: about half the passes over the activations of
    autograd's pow / mean / rsqrt / mul graph, and only x and the per-row scale saved."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, r)
        return torch.mul(x, r).mul_(weight)

    @staticmethod
    def backward(ctx, g):
        x, weight, r = ctx.saved_tensors
        xhat = x * r
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (g * xhat).flatten(0, -2).sum(0)
        gw = g * weight
        m = (gw * xhat).mean(-1, keepdim=True)
        dx = gw.addcmul_(xhat, m, value=-1).mul_(r)  # r (g w - xhat mean(g w xhat))
        return dx, dw, None


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE on the first `rotary_dim` channels, with optional LongRoPE.

    LongRoPE rule (HF semantics, spec §1.4): a forward call whose longest sequence `seq_len =
    max(position)+1` exceeds `original_max_position_embeddings` (L0) uses the long factors for
    *all* its positions, otherwise the short ones; cos/sin are multiplied by the attention factor
    (mscale) in both cases. Keys cached under short factors are stale once a sequence passes L0:
    the generator recomputes the whole cache at that point (see `generate.py`).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.rotary_dim = cfg.rotary_dim
        self.original_max = cfg.original_max_position_embeddings
        # on the CPU even when the model is built on the meta device, where these ops would import
        # torch._dynamo (~1.4 s, ~80 MB resident) for nothing
        cpu = torch.device("cpu")
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64, device=cpu).float() / self.rotary_dim
        base = cfg.rope_theta**exponents  # [rotary_dim/2]
        if cfg.is_longrope:
            short = torch.tensor(cfg.rope_scaling["short_factor"], dtype=torch.float32, device=cpu)
            long = torch.tensor(cfg.rope_scaling["long_factor"], dtype=torch.float32, device=cpu)
            self.register_buffer("inv_freq_short", 1.0 / (short * base), persistent=False)
            self.register_buffer("inv_freq_long", 1.0 / (long * base), persistent=False)
            self.mscale = longrope_attention_factor(cfg)
        else:
            self.register_buffer("inv_freq_short", 1.0 / base, persistent=False)
            self.inv_freq_long = None
            self.mscale = 1.0

    def uses_long_factors(self, seq_len: int) -> bool:
        return self.inv_freq_long is not None and seq_len > self.original_max

    def forward(self, positions: torch.Tensor, seq_len, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, 1, T, rotary_dim] in `dtype` (computed in fp32).

        `seq_len`: an int for the whole call, or a LongTensor [B] choosing the factors per row
        (the server's continuous batching, where each row is its own sequence).
        """
        if torch.is_tensor(seq_len) and self.inv_freq_long is not None:
            long_rows = (seq_len > self.original_max)[:, None, None]  # [B, 1, 1]
            inv_freq = torch.where(long_rows, self.inv_freq_long, self.inv_freq_short)  # [B, 1, rotary_dim/2]
        elif torch.is_tensor(seq_len):
            inv_freq = self.inv_freq_short
        else:
            inv_freq = self.inv_freq_long if self.uses_long_factors(seq_len) else self.inv_freq_short
        angles = positions.float()[..., None] * inv_freq  # [B, T, rotary_dim/2]
        emb = torch.cat((angles, angles), dim=-1)  # [B, T, rotary_dim]
        cos = (emb.cos() * self.mscale).to(dtype)[:, None]
        sin = (emb.sin() * self.mscale).to(dtype)[:, None]
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, head_dim]; rotate the first cos.shape[-1] channels, pass the rest through.

    cos / sin must broadcast against x (e.g. [B, 1, T, rot], or [B, T, 1, rot] for x laid out
    [B, T, heads, d]) and, as RotaryEmbedding builds them, repeat their first half in the second.
    """
    # the custom rotation pays for itself in training (no saved activations, no zero-filled slice
    # gradients) and, without autograd, on anything bigger than a few tokens (four multiply-adds into
    # one buffer: 1.3 vs 3.6 ms for [1, 32, 512, 96], 0.14 vs 0.40 s for [1, 8, 32768, 128], 1 thread);
    # a decode step's few thousand elements are quicker in the plain form (13 vs 30 µs)
    small = x.numel() < 32768
    if (cos.requires_grad or sin.requires_grad or torch.compiler.is_compiling()
            or (small and not torch.is_grad_enabled())):
        rot = cos.shape[-1]
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        half = rot // 2
        rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
        out = x_rot * cos + rotated * sin
        return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out
    return _Rotary.apply(x, cos, sin)


def _broadcast_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """The shape `a` and `b` broadcast to (aligned on the right). `torch.broadcast_shapes` imports
    sympy on its first call: 0.5 s and tens of MB that inference has no other use for."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    return tuple(p if q == 1 else q for p, q in zip(a, b))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """x1 c - sign x2 s | x2 c + sign x1 s (sign -1: the transpose, i.e. the backward) into one
    fresh tensor: four fused multiply-adds, no concatenations or negated copies."""
    half = cos.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., :half], x[..., half:2 * half]
    out = torch.empty(_broadcast_shape(x.shape, cos.shape[:-1] + (x.shape[-1],)), dtype=torch.result_type(x, cos),
                      device=x.device)
    o1, o2 = out[..., :half], out[..., half:2 * half]
    torch.mul(x1, c, out=o1)
    o1.addcmul_(x2, s, value=-sign)
    torch.mul(x2, c, out=o2)
    o2.addcmul_(x1, s, value=sign)
    if x.shape[-1] > 2 * half:
        out[..., 2 * half:] = x[..., 2 * half:]
    return out


class _Rotary(torch.autograd.Function):
    """RoPE is a rotation: its backward is the rotation by the opposite angle (no saved activations
    beyond cos / sin, no zero-filled slice gradients)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.x_shape = x.shape
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        g = _rotate(grad, cos, sin, -1.0)
        if g.shape != ctx.x_shape:
            g = g.sum_to_size(ctx.x_shape)
        return g, None, None


class KVCache(nn.Module):
    """Fixed-size cache for one layer: k, v [B, KV, max_len, head_dim], written at `start`."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, KV, T, d] at slots start..start+T; return views of slots 0..start+T."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    """Multi-head attention with GQA over a fused [Q | K | V] projection (spec §1.3)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, cache_start: int = 0):
        b, t, _ = x.shape
        qkv = self.qkv_proj(x)
        if cache is not None and cpu_kernels.can_decode_attend_f16(qkv, cos, cache.k, cache_start):
            lib = cpu_kernels.library()
            if lib is not None:  # one native call: RoPE, cache write, attention (quantized models' decode)
                out = cpu_kernels.decode_attend_f16(lib, qkv, cos, sin, cache.k, cache.v, cache_start, mask,
                                                    self.n_heads, self.n_kv, first_visible_key(mask))
                return self.o_proj(out)
        qkv = qkv.view(b, t, self.n_heads + 2 * self.n_kv, self.head_dim)
        # split (its backward is one concatenation; slicing would zero-fill a full-size gradient per
        # slice), then RoPE on q and k together ([B, T, H + KV, d] against cos / sin as [B, T, 1, rot])
        qk, v = qkv.split([self.n_heads + self.n_kv, self.n_kv], dim=2)
        q, k = apply_rotary(qk, cos.transpose(1, 2), sin.transpose(1, 2)).split([self.n_heads, self.n_kv], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H or KV, T, d]
        if cache is not None:
            k, v = cache.update(cache_start, k, v)  # [B, KV, S, d]
        # mask None (no cache): plain causal attention, which SDPA computes without a mask tensor
        out = attention(q, k, v, mask, is_causal=mask is None and cache is None)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


# PyTorch's fused CPU flash-attention kernel, which also returns each row's log-sum-exp, so that
# attention over parts of the keys can be merged exactly: (out [B, H, T, d], lse [B, H, T]) = f(q, k, v, ...)
FLASH_WITH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def fused_kernel_runs(q: torch.Tensor) -> bool:
    """Whether FLASH_WITH_LSE can take these queries."""
    return FLASH_WITH_LSE is not None and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)


STACKED_ROWS = 256  # GQA queries per KV head up to which `attention` stacks them (decode, short chunks)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """softmax(q·kᵀ·scale)·v with GQA: q [B, H, T, d], k, v [B, KV, S, d], mask bool (True = attend),
    broadcastable to [B, 1, T, S]; scale 1/√d unless given.

    One new query (decode) over an fp16 cache (`kv_cache_dtype`: quantized models) or a bf16 one
    runs on the native kernel (PyTorch's CPU attention reads a bf16 cache at a fraction of memory
    speed); anything else goes to SDPA, an fp16 cache upcast first. Without autograd, the queries of
    a KV head over a cache are stacked ([B, KV, G·T, d], the mask repeated G times): SDPA's
    `enable_gqa` takes a slower path there (one token over 32K keys, 32 / 8 heads, 2 threads: 78 vs
    23 ms in fp32, 122 vs 14 ms in bf16). One token goes through `_attend_one_token` (faster than
    SDPA at one row per head); up to STACKED_ROWS rows through SDPA, so that the repeated mask stays
    small. A mask that is plain causal runs as `is_causal`; a longer prompt chunk continuing a cache
    (it sees all the past, itself causally) goes through `_attend_past_then_chunk`; other chunks and
    causal prefill keep `enable_gqa`, which the flash kernel handles there."""
    no_grad = not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    if no_grad and mask is not None and not torch.compiler.is_compiling():
        lo = first_visible_key(mask)
        if lo:  # keys a sliding window has left behind for every query: not read
            k, v, mask = k[:, :, lo:], v[:, :, lo:], mask[..., lo:]
    if no_grad and (mask is None or mask.shape[1] == 1) and cpu_kernels.can_attend_cache(q, k, v):
        lib = cpu_kernels.library()
        if lib is not None:
            return cpu_kernels.attend_cache(lib, q, k, v, mask, scale).to(q.dtype)
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    b, h, t, d = q.shape
    kv, S = k.shape[1], k.shape[2]
    if no_grad and not is_causal and h * t <= STACKED_ROWS * kv and (mask is None or mask.shape[1] == 1):
        g = h // kv
        if mask is not None:
            mask = mask.expand(mask.shape[0], 1, t, S).repeat(1, 1, g, 1)  # [B|1, 1, G·T, S]
        qs = q.reshape(b, kv, g * t, d)  # rows (g, t): head kv·G + g
        if t == 1:
            out = _attend_one_token(qs, k, v, mask, d ** -0.5 if scale is None else scale)
        else:
            out = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale)
        return out.reshape(b, h, t, d)
    if mask is not None and mask.shape[1] == 1 and 1 < t <= S and _is_past_then_causal(mask, t, S):
        if t == S:  # plain causal: the flash kernel skips the upper triangle instead of masking it
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=kv != h)
        if no_grad and fused_kernel_runs(q):
            return _attend_past_then_chunk(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=kv != h)


def first_visible_key(mask: torch.Tensor | None) -> int:
    """The first key slot that some query may see under `mask` (bool [..., S], True = attend), 0 without
    a mask: a sliding window leaves the keys before it behind, and attention need not read them."""
    if mask is None or bool(mask[..., 0].any()):
        return 0
    seen = mask.reshape(-1, mask.shape[-1]).any(0)  # [S]
    return int(seen.to(torch.uint8).argmax())  # the first True (none: 0)


def _is_past_then_causal(mask: torch.Tensor, t: int, S: int) -> bool:
    """mask [B, 1, T, S]: every query sees all S - T earlier keys, and the chunk's own keys causally
    (a prompt chunk continuing a cache, no padding, no sliding window reaching back)."""
    chunk = mask[..., S - t:]
    return bool(mask[..., :S - t].all()) and torch.equal(chunk, torch.ones_like(chunk).tril_())


def _attend_past_then_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """`attention` for a mask `_is_past_then_causal` accepts, in two flash calls merged by log-sum-exp:
    the past keys without a mask (a KV head's queries stacked), the chunk's own keys causal (the flash
    kernel then skips the upper triangle). An explicit mask would make every tile be computed (256
    queries over 16K keys, 8 / 2 heads, fp32, 1 thread: 0.20 vs 0.27 s)."""
    b, h, t, d = q.shape
    kv, S = k.shape[1], k.shape[2]
    g, past = h // kv, S - t
    o_past, lse_past = FLASH_WITH_LSE(q.reshape(b, kv, g * t, d), k[:, :, :past], v[:, :, :past], scale=scale)
    k_own, v_own = (x[:, :, past:].repeat_interleave(g, 1) for x in (k, v))  # [B, H, T, d]
    o_own, lse_own = FLASH_WITH_LSE(q, k_own, v_own, is_causal=True, scale=scale)
    lse_past = lse_past.reshape(b, h, t)
    total = torch.logaddexp(lse_past, lse_own)
    out = (o_past.reshape(b, h, t, d).float() * (lse_past - total).exp().unsqueeze(-1)
           + o_own.float() * (lse_own - total).exp().unsqueeze(-1))
    return out.to(q.dtype)


def _attend_one_token(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      scale: float) -> torch.Tensor:
    """q [B, KV, G, d] (one token's query heads, stacked per KV head), k, v [B, KV, S, d] -> [B, KV, G, d].
    The scores as k·qᵀ: a row-major matrix times vectors, which PyTorch's CPU matmul streams at several
    times the speed of q·kᵀ (fp32, 8 × 16K × 128: 26 vs 7 GB/s, 1 thread); softmax in fp32."""
    s = torch.matmul(k, q.transpose(-1, -2)).transpose(-1, -2).float().mul_(scale)  # [B, KV, G, S]
    if mask is not None:
        s.masked_fill_(~mask, float("-inf"))
    return torch.matmul(s.softmax(-1).to(v.dtype), v)


def activation_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model computes in: its `dtype` (the norms'; a quantized model's embedding table may
    be stored narrower), else that of its first floating-point parameter."""
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def kv_cache_dtype(model: nn.Module) -> torch.dtype:
    """fp16 (as llama.cpp) for a model with quantized linears where the native kernels run: decode
    attention then reads half the bytes; otherwise the model's dtype, so that full-precision
    models stay exactly equal to the reference."""
    from .quant import QUANTIZED
    dtype = activation_dtype(model)
    if dtype in (torch.float32, torch.bfloat16) and cpu_kernels.library() is not None \
            and any(isinstance(m, QUANTIZED) for m in model.modules()):
        return torch.float16
    return dtype


class GatedMLP(nn.Module):
    """down(up ⊙ silu(gate)) over a fused [gate | up] projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return self.down_proj(_SwiGLU.apply(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class _SwiGLU(torch.autograd.Function):
    """up * silu(gate) from [gate | up]; the backward writes both halves of one gradient (no
    concatenation) with aten's fused silu_backward."""

    @staticmethod
    def forward(ctx, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gate_up, act)
        return act.mul(up)

    @staticmethod
    def backward(ctx, g):
        gate_up, act = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        d = torch.empty_like(gate_up)
        d_gate, d_up = d.chunk(2, dim=-1)
        torch.mul(g, act, out=d_up)
        torch.ops.aten.silu_backward.grad_input(g * up, gate, grad_input=d_gate)
        return d


def step_positions(input_ids: torch.Tensor, positions: torch.Tensor | None, seq_len: int | None,
                   cache) -> tuple[torch.Tensor, int, int, torch.Tensor]:
    """The decoders' shared prologue: (query positions [B, T] (default 0..T-1), the sequence length
    that picks LongRoPE's factors (default: the longest position + 1), where this call's keys start in
    the cache (0 without one), every key position [B, start + T] (the cache records this call's))."""
    b, t = input_ids.shape
    if positions is None:
        positions = torch.arange(t, device=input_ids.device).expand(b, t)
        seq_len = t if seq_len is None else seq_len  # no data-dependent max (torch.compile traces this)
    if seq_len is None:
        seq_len = int(positions.max()) + 1
    if cache is None:
        return positions, seq_len, 0, positions
    return positions, seq_len, cache.length, cache.record_positions(positions)


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None,
                   segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask [B, 1, T, S]: key s is visible to query t when it is valid (position >= 0),
    not in the future, and inside the sliding window (t - s < W: W keys including itself, as HF).

    q_pos [B, T] and k_pos [B, S] are absolute positions; padding slots carry position -1.
    A query that sees nothing (a padding query) is allowed everything, to keep softmax finite.
    `segment_ids` [B, T] (no cache: q and k are the same tokens) keeps packed documents apart:
    a key is visible only to queries of the same segment.
    """
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    mask = (kp >= 0) & (kp <= qp)
    if segment_ids is not None:
        mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
    if sliding_window is not None:
        mask &= qp - kp < sliding_window
    mask |= ~mask.any(-1, keepdim=True)
    return mask[:, None]


# ---- training loss ------------------------------------------------------------------------------
LOGITS_CHUNK_ELEMENTS = 1 << 24  # rows per chunk x vocab: 64 MiB of fp32 logits at a time


# runs eagerly under torch.compile (a chunk loop with in-place ops, already fused); torch's lazy form of
# torch.compiler.disable, so that importing phi3 does not import torch._dynamo (~1.4 s, ~80 MB resident)
@torch._disable_dynamo
def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """sum over rows with target != -100 of cross_entropy(h @ weight.T, target), fused with the head.

    h [N, D], weight [V, D] (the LM head), targets [N]. The [N, V] logits are never materialised:
    rows go through in chunks of `chunk_rows` (default: ~64 MiB of fp32 logits, 523 rows at phi-3's
    vocabulary: ~6 % faster than 261-row chunks in a measurement of the three head GEMMs on 2048 rows,
    whose small-M matmuls run below the machine's peak), and when a gradient is needed each chunk's gradients (softmax - onehot, into
    d h and d weight) are computed right there in the forward, so backward only scales them.
    Under autocast the matmuls run in the autocast dtype; the softmax is always fp32.
    """
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    chunk = chunk_rows or max(1, LOGITS_CHUNK_ELEMENTS // weight.shape[0])
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, chunk, dtype)
    with torch.autocast(dev, enabled=False):
        return _lce_chunks(h, weight, targets, chunk, dtype, False, False)[0]


def _lce_chunks(h, weight, targets, chunk, dtype, grad_h: bool, grad_w: bool):
    with torch.profiler.record_function("linear_cross_entropy"):  # names the chunks in a profile
        n, v = h.shape[0], weight.shape[0]
        hc, wc = h.to(dtype), weight.to(dtype)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty(h.shape, dtype=dtype, device=h.device) if grad_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if grad_w else None
        rows = min(chunk, n)
        logits = torch.empty(rows, v, dtype=dtype, device=h.device)
        logp = logits if dtype == torch.float32 else torch.empty(rows, v, dtype=torch.float32, device=h.device)
        for s in range(0, n, rows):
            e = min(n, s + rows)
            lg, lp = logits[: e - s], logp[: e - s]
            torch.mm(hc[s:e], wc.t(), out=lg)
            torch.log_softmax(lg, -1, dtype=torch.float32, out=lp)  # in place when fp32 (a row at a time)
            tgt = targets[s:e]
            valid = tgt != -100
            safe = tgt.clamp(min=0)[:, None]
            loss -= (lp.gather(1, safe)[:, 0] * valid).sum()
            if dh is None and dw is None:
                continue
            g = lp.exp_()  # softmax
            g.scatter_add_(1, safe, -valid[:, None].to(g.dtype))  # - onehot(target)
            if not bool(valid.all()):
                g.mul_(valid[:, None])
            if g.dtype != dtype:
                g = g.to(dtype)
            if dh is not None:
                torch.mm(g, wc, out=dh[s:e])
            if dw is not None:
                if dtype == torch.float32:
                    dw.addmm_(g.t(), hc[s:e])
                else:
                    dw += (g.t() @ hc[s:e]).float()
        return loss, dh, dw


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk, dtype):
        with torch.autocast(h.device.type, enabled=False):
            loss, dh, dw = _lce_chunks(h, weight, targets, chunk, dtype, ctx.needs_input_grad[0],
                                       ctx.needs_input_grad[1])
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = (h.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        if dh is not None:
            dh = (dh * grad_loss).to(ctx.dtypes[0])
        if dw is not None:
            dw = dw.mul_(grad_loss).to(ctx.dtypes[1])
        return dh, dw, None, None, None
