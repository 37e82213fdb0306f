"""GGUF out: a model (dense or quantized) plus its tokenizer and chat template as one GGUF file
that llama.cpp (and so ollama, LM Studio …) loads.

* Architecture `phi3` for Phi-3 checkpoints (fused `attn_qkv` / `ffn_up`, LongRoPE as the
  `rope_factors_long/short` tensors plus `rope.scaling.attn_factor`), `llama` for Llama-layout
  ones (q/k rows permuted into llama.cpp's interleaved RoPE order).
* Tensor types: `f16`, `q8_0`, `q4_0`, `q4_1` (linears), with our own quantizers that reproduce
  ggml's reference rounding bit for bit (in C where the native kernels run, else vectorised torch).
  A quantized model's weights in groups of 32 that the type holds exactly (int8 as Q8_0, int4 as
  Q4_1, int4 with Q4_0's implied min as Q4_0) are written as they are, not requantized: a Q4_0 /
  Q4_1 / Q8_0 GGUF loaded and written back gives the same blocks. Norms and RoPE factors stay F32;
  with q4_0 / q4_1 the embedding table and the output head are written as Q8_0 (the head is the layer most hurt by
  4 bits, see `phi3.quant.quantize_model`).
* Tensors are streamed: header and tensor infos first, then one tensor at a time, so the peak
  memory is one tensor; the file is written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np
import torch

from . import cpu_kernels
from .atomic import atomic_write
from .config import ModelConfig, longrope_attention_factor
from .errors import Phi3Error
from .gguf import GGUFFile, GGUFTensor, dequantize, raw_bytes
from .memory import drop_file_pages
from .quant import QUANTIZED, dense_weight, unpack_nibbles
from .tokenizer import _BYTE_LEVEL_PRES, Tokenizer, _is_phi3_vocab

GGML = gguf.GGMLQuantizationType
EXPORT_TYPES = {"f32": GGML.F32, "f16": GGML.F16, "q8_0": GGML.Q8_0, "q4_0": GGML.Q4_0, "q4_1": GGML.Q4_1}
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7}  # general.file_type (llama_ftype)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_BYTE = 1, 2, 3, 4, 6


# ---- ggml block quantizers (reference rounding, vectorised) ----------------------------------
def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """[n] float -> [n, 2] uint8, little-endian fp16."""
    return x.to(torch.float16).view(torch.uint8).view(-1, 2)


def quantize_q8_0(w: torch.Tensor) -> np.ndarray:
    """[rows, cols] float -> [rows, cols/32*34] uint8 Q8_0 blocks: d = amax/127, q = round(w/d)."""
    rows, cols = w.shape
    blocks = w.float().reshape(-1, 32)  # [n_blocks, 32]
    d = blocks.abs().amax(dim=1) / 127.0
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = _round_half_away(blocks * inv[:, None]).to(torch.int8).view(torch.uint8)
    return torch.cat((_fp16_bytes(d), q), dim=1).reshape(rows, cols // 32 * 34).numpy()


def quantize_q4_0(w: torch.Tensor) -> np.ndarray:
    """[rows, cols] float -> [rows, cols/32*18] uint8 Q4_0 blocks: d = (signed max)/−8,
    q = trunc(w/d + 8.5) clipped to 0..15; low nibbles hold w0..15, high nibbles w16..31."""
    rows, cols = w.shape
    blocks = w.float().reshape(-1, 32)  # [n_blocks, 32]
    signed_max = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))[:, 0]
    d = signed_max / -8.0
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = torch.trunc(blocks * inv[:, None] + 8.5).clamp(0, 15).to(torch.uint8)
    qs = q[:, :16] | (q[:, 16:] << 4)  # [n_blocks, 16]
    return torch.cat((_fp16_bytes(d), qs), dim=1).reshape(rows, cols // 32 * 18).numpy()


def quantize_q4_1(w: torch.Tensor) -> np.ndarray:
    """[rows, cols] float -> [rows, cols/32*20] uint8 Q4_1 blocks: d = (max − min)/15, m = min,
    q = trunc((w − m)/d + 0.5) clipped to 0..15; nibbles as Q4_0's."""
    rows, cols = w.shape
    blocks = w.float().reshape(-1, 32)  # [n_blocks, 32]
    lo, hi = blocks.amin(dim=1), blocks.amax(dim=1)
    d = (hi - lo) / 15.0
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = torch.trunc((blocks - lo[:, None]) * inv[:, None] + 0.5).clamp(0, 15).to(torch.uint8)
    qs = q[:, :16] | (q[:, 16:] << 4)  # [n_blocks, 16]
    return torch.cat((_fp16_bytes(d), _fp16_bytes(lo), qs), dim=1).reshape(rows, cols // 32 * 20).numpy()


TORCH_QUANTIZERS = {GGML.Q8_0: quantize_q8_0, GGML.Q4_0: quantize_q4_0, GGML.Q4_1: quantize_q4_1}


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (half away from zero), as ggml uses; torch.round rounds half to even."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


@dataclass(frozen=True)
class QuantizedRows:
    """A quantized weight in groups of 32 along its rows, as ggml's blocks hold one: bits 4, levels
    q uint8 [rows, k] in 0..15 with w = q·scale + min; bits 8, q int8 [rows, k] with w = q·scale
    (mins None). scales, mins fp16 [rows, k/32]. Rows can be taken and reordered (llama q/k splits and
    permutations) and written as GGUF blocks with no change of value where the type holds them."""
    bits: int
    q: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dim(self) -> int:
        return 2

    def numel(self) -> int:
        return self.q.numel()

    def map_rows(self, fn) -> "QuantizedRows":
        """The same rows transformed by `fn` (a slice, a permutation) in all three parts."""
        return QuantizedRows(self.bits, fn(self.q), fn(self.scales), None if self.mins is None else fn(self.mins))

    def __getitem__(self, rows: slice) -> "QuantizedRows":
        return self.map_rows(lambda t: t[rows])

    def dequantize(self) -> torch.Tensor:
        rows, k = self.q.shape
        w = self.q.float().view(rows, k // 32, 32) * self.scales.float()[..., None]
        if self.mins is not None:
            w = w + self.mins.float()[..., None]
        return w.view(rows, k)

    def ggml_blocks(self, qtype: GGML) -> np.ndarray | None:
        """The weights as `qtype` blocks [rows, k/32 · bytes], exactly; None where `qtype` cannot hold
        them (Q8_0: int8; Q4_1: int4; Q4_0: int4 whose min is −8·scale, as Q4_0's implied one)."""
        rows, k = self.q.shape
        d = self.scales.reshape(-1).view(torch.uint8).view(-1, 2)  # fp16 bytes [blocks, 2]
        if qtype == GGML.Q8_0 and self.bits == 8:
            return torch.cat((d, self.q.view(torch.uint8).reshape(-1, 32)), dim=1).reshape(rows, -1).numpy()
        q4_0 = self.mins is not None and cpu_kernels.is_q4_0(self.scales, self.mins)
        if self.bits != 4 or qtype not in (GGML.Q4_0, GGML.Q4_1) or (qtype == GGML.Q4_0 and not q4_0):
            return None
        q = self.q.reshape(-1, 32)
        qs = q[:, :16] | (q[:, 16:] << 4)  # [blocks, 16]: w_j low, w_{j+16} high
        head = (d,) if qtype == GGML.Q4_0 else (d, self.mins.reshape(-1).view(torch.uint8).view(-1, 2))
        return torch.cat((*head, qs), dim=1).reshape(rows, -1).numpy()


def quantized_rows(module: torch.nn.Module) -> QuantizedRows | None:
    """A quantized linear's or table's weight as `QuantizedRows`, None for a dense module or one whose
    groups are not ggml's 32 (per-channel int8, int4 groups of 64 ...)."""
    if not isinstance(module, QUANTIZED):
        return None
    stored = module.stored()
    scales, mins = stored["scales"], stored.get("mins")
    q = stored["qweight"]
    bits = 4 if "mins" in stored else 8
    k = q.shape[1] * (2 if bits == 4 else 1)
    if scales.dim() != 2 or scales.shape[1] * 32 != k:
        return None
    if bits == 4:
        q = unpack_nibbles(q, torch.uint8)
        mins = mins if mins is not None else (scales.float() * -8).half()
    return QuantizedRows(bits, q, scales.half(), None if bits == 8 else mins.half())


def _weight(module: torch.nn.Module) -> torch.Tensor | QuantizedRows:
    """What a tensor of the file is made from: the module's quantized rows where ggml's groups hold
    them (written unchanged where the file's type matches), else its full-precision weight."""
    rows = quantized_rows(module)
    return rows if rows is not None else dense_weight(module)


def encode_tensor(w: torch.Tensor | QuantizedRows, qtype: GGML) -> np.ndarray:
    if isinstance(w, QuantizedRows):
        blocks = w.ggml_blocks(qtype)
        if blocks is not None:
            return blocks
        w = w.dequantize()
    if qtype == GGML.F32:
        return w.float().numpy()
    if qtype == GGML.F16:
        return w.to(torch.float16).numpy()
    if w.shape[-1] % 32:
        raise Phi3Error(f"cannot write a tensor of shape {list(w.shape)} as {qtype.name}: "
                        "its rows are not a multiple of 32")
    lib = cpu_kernels.library()
    if lib is not None and w.dim() == 2:  # the same bytes, in C (~20x faster, no fp32 copy)
        return cpu_kernels.quantize_ggml(lib, w, qtype.name).numpy()
    return TORCH_QUANTIZERS[qtype](w)


# ---- tensors ----------------------------------------------------------------------------------
def _shape(module: torch.nn.Module) -> tuple[int, ...]:
    """A linear's, table's or norm's weight shape, without reading (or dequantizing) it."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return tuple(weight.shape)
    if hasattr(module, "out_features"):
        return module.out_features, module.in_features
    return module.num_embeddings, module.embedding_dim


def _tensor_plan(model, cfg: ModelConfig) -> list[tuple[str, tuple[int, ...], Any]]:
    """(GGUF name, shape, zero-argument function giving the tensor or its `QuantizedRows`), in file
    order; the shapes are known without reading a weight (the header is written first)."""
    arch = "phi3" if cfg.layout == "phi3" else "llama"
    m = model.model
    plan: list[tuple[str, tuple[int, ...], Any]] = [
        ("token_embd.weight", _shape(m.embed_tokens), lambda: _weight(m.embed_tokens))]
    q_rows = cfg.num_attention_heads * cfg.head_dim
    kv_rows = cfg.num_key_value_heads * cfg.head_dim

    def whole(name: str, module: torch.nn.Module):
        return name, _shape(module), lambda: _weight(module)

    def rows(name: str, module: torch.nn.Module, lo: int, hi: int, heads: int = 0):
        def get():
            w = _weight(module)[lo:hi]
            if not heads:
                return w
            if isinstance(w, QuantizedRows):
                return w.map_rows(lambda t: permute_rows(t, heads))
            return permute_rows(w, heads)
        return name, (hi - lo, _shape(module)[1]), get

    for i, layer in enumerate(m.layers):
        a, f, p = layer.self_attn, layer.mlp, f"blk.{i}."
        plan.append(whole(p + "attn_norm.weight", layer.input_layernorm))
        if arch == "phi3":
            plan += [whole(p + "attn_qkv.weight", a.qkv_proj), whole(p + "ffn_up.weight", f.gate_up_proj)]
        else:
            half = cfg.intermediate_size
            plan += [rows(p + "attn_q.weight", a.qkv_proj, 0, q_rows, cfg.num_attention_heads),
                     rows(p + "attn_k.weight", a.qkv_proj, q_rows, q_rows + kv_rows, cfg.num_key_value_heads),
                     rows(p + "attn_v.weight", a.qkv_proj, q_rows + kv_rows, q_rows + 2 * kv_rows),
                     rows(p + "ffn_gate.weight", f.gate_up_proj, 0, half),
                     rows(p + "ffn_up.weight", f.gate_up_proj, half, 2 * half)]
        plan.append(whole(p + "attn_output.weight", a.o_proj))
        plan.append(whole(p + "ffn_norm.weight", layer.post_attention_layernorm))
        plan.append(whole(p + "ffn_down.weight", f.down_proj))
    plan.append(whole("output_norm.weight", m.norm))
    head, table = model.lm_head, m.embed_tokens
    tied = cfg.tie_word_embeddings and (  # one tensor: dense and shared, or the table read from the quantized head
        getattr(table, "head", None) is head or getattr(head, "weight", None) is getattr(table, "weight", False))
    if not tied:
        plan.append(whole("output.weight", head))
    if cfg.is_longrope:
        rs = cfg.rope_scaling
        for key in ("long", "short"):
            factors = rs[f"{key}_factor"]
            plan.append((f"rope_factors_{key}.weight", (len(factors),),
                         lambda factors=factors: torch.tensor(factors, dtype=torch.float32)))
    return plan


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half q/k rows -> llama.cpp's interleaved order (the inverse of `unpermute_rows`)."""
    rows, rest = w.shape[0], w.shape[1:]
    head_dim = rows // n_head
    halves = w.reshape(n_head, 2, head_dim // 2, *rest)  # (head, j, i, ...)
    return halves.transpose(1, 2).reshape(rows, *rest)  # (head, i, j, ...) -> rows


def _tensor_type(name: str, shape: tuple[int, ...], kind: str) -> GGML:
    if len(shape) == 1 or kind == "f32":
        return GGML.F32
    if kind in ("q4_0", "q4_1") and name in ("token_embd.weight", "output.weight"):
        return GGML.Q8_0
    return EXPORT_TYPES[kind]


# ---- metadata -------------------------------------------------------------------------------
PHI3_NAME = re.compile(r"phi-?3", re.IGNORECASE)  # what llama.cpp looks for in general.name
PHI3_RULE_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")  # the tokens its Phi-3 rule looks up


def gguf_model_name(name: str, tokenizer: Tokenizer | None) -> str:
    """`general.name` for llama.cpp, which reads more than a label into it: a name containing "phi-3"
    or "phi3" turns on Phi-3's tokenizer rule (the whitespace after a chat token is dropped, as the
    Phi-3 `tokenizer.json` does) and that rule looks up </s>, <unk>, <s> and <|endoftext|>, failing
    the load of a vocabulary without them. So a Phi-3 chat vocabulary gets a name that says phi3
    (else llama.cpp would tokenize chat prompts differently from us and transformers), any other one
    a name that does not (else llama.cpp could not load the file)."""
    if tokenizer is None:
        return name
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    phi3_vocab = _is_phi3_vocab(vocab) and all(t in vocab for t in PHI3_RULE_TOKENS)
    if phi3_vocab and not PHI3_NAME.search(name):
        return f"phi3-{name}"
    if not phi3_vocab:
        return PHI3_NAME.sub(lambda m: m.group(0).replace("-", "").replace("3", " 3"), name)
    return name


def model_metadata(cfg: ModelConfig, name: str) -> dict[str, Any]:
    arch = "phi3" if cfg.layout == "phi3" else "llama"
    md: dict[str, Any] = {
        "general.name": name,
        f"{arch}.context_length": cfg.max_position_embeddings,
        f"{arch}.embedding_length": cfg.hidden_size,
        f"{arch}.feed_forward_length": cfg.intermediate_size,
        f"{arch}.block_count": cfg.num_hidden_layers,
        f"{arch}.attention.head_count": cfg.num_attention_heads,
        f"{arch}.attention.head_count_kv": cfg.num_key_value_heads,
        f"{arch}.attention.layer_norm_rms_epsilon": cfg.rms_norm_eps,
        f"{arch}.rope.dimension_count": cfg.rotary_dim,
        f"{arch}.rope.freq_base": cfg.rope_theta,
    }
    if arch == "phi3":
        md["phi3.rope.scaling.original_context_length"] = cfg.original_max_position_embeddings
        md["phi3.attention.sliding_window"] = cfg.sliding_window or 0
        if cfg.is_longrope:
            md["phi3.rope.scaling.attn_factor"] = longrope_attention_factor(cfg)
    else:
        md["llama.attention.key_length"] = md["llama.attention.value_length"] = cfg.head_dim
        md["llama.vocab_size"] = cfg.vocab_size
    return md


def tokenizer_metadata(tok: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """The `tokenizer.*` keys. A tokenizer read from a GGUF gives its own keys back unchanged;
    one from `tokenizer.json` is described from its BPE model (SentencePiece-style byte-fallback
    vocabularies as `llama`, byte-level ones as `gpt2`)."""
    if getattr(tok, "gguf_metadata", None):
        md = dict(tok.gguf_metadata)
    else:
        md = _tokenizer_json_metadata(tok, vocab_size)
    if tok.chat_template:
        md["tokenizer.chat_template"] = tok.chat_template
    return md


def _tokenizer_json_metadata(tok: Tokenizer, vocab_size: int) -> dict[str, Any]:
    spec = json.loads(tok.backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise Phi3Error(f"{tok.source}: cannot describe a {model.get('type')} tokenizer in GGUF (only BPE)")
    n = max(vocab_size, tok.vocab_size)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [TOKEN_USER_DEFINED] * n  # ids the tokenizer does not use (the padded rows of the embedding)
    for text, i in model["vocab"].items():
        tokens[i], types[i] = text, TOKEN_NORMAL
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    md: dict[str, Any] = {"tokenizer.ggml.tokens": tokens}
    if model.get("byte_fallback"):
        # SentencePiece BPE merges the adjacent pair whose result has the highest score, so a
        # token's score is minus the rank of the merge that makes it.
        rank = {m.replace(" ", ""): r for r, m in reversed(list(enumerate(merges)))}
        scores = [-1000.0 if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED) else 0.0 for t in types]
        for i, text in enumerate(tokens):
            if types[i] != TOKEN_NORMAL:
                continue
            if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                types[i] = TOKEN_BYTE
            else:
                scores[i] = -float(rank.get(text, 1e9 if len(text) > 1 else i))
        if tok.unk_token_id is not None:
            types[tok.unk_token_id] = TOKEN_UNKNOWN
        md.update({"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
                   "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
                   "tokenizer.ggml.add_space_prefix": _prepends_space(spec)})
    else:
        md.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": _byte_level_pre_name(spec, tok.source),
                   "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges})
    for key, value in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("unknown", tok.unk_token_id),
                       ("padding", tok.pad_token_id)):
        if value is not None:
            md[f"tokenizer.ggml.{key}_token_id"] = value
    md["tokenizer.ggml.add_bos_token"] = tok.add_bos_token
    md["tokenizer.ggml.add_eos_token"] = tok.add_eos_token
    return md


def _prepends_space(spec: dict) -> bool:
    """SentencePiece's add_dummy_prefix: the normalizer prepends '▁' to the text."""
    return '"Prepend"' in json.dumps(spec.get("normalizer") or {})


def _byte_level_pre_name(spec: dict, source: str) -> str:
    """The llama.cpp `tokenizer.ggml.pre` name whose regex split this byte-level tokenizer uses."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    split, digits = None, False
    for step in steps:
        if step.get("type") == "Split":
            split = step["pattern"].get("Regex")
        elif step.get("type") == "Digits":
            digits = True
    for name, (regex, wants_digits, _) in _BYTE_LEVEL_PRES.items():
        if regex == split and wants_digits == digits:
            return name
    raise Phi3Error(f"{source}: its byte-level pre-tokenizer (split {split!r}, digits {digits}) has no "
                    "llama.cpp equivalent known to phi3")


def _add_kv(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    T = gguf.GGUFValueType
    if isinstance(value, bool):
        writer.add_key_value(key, value, T.BOOL)
    elif isinstance(value, int):
        writer.add_key_value(key, value, T.UINT32)
    elif isinstance(value, float):
        writer.add_key_value(key, value, T.FLOAT32)
    elif isinstance(value, str):
        writer.add_key_value(key, value, T.STRING)
    elif isinstance(value, (list, tuple)):
        sub = (T.STRING if isinstance(value[0], str) else T.FLOAT32 if isinstance(value[0], float)
               else T.INT32) if value else T.INT32
        writer.add_key_value(key, list(value), T.ARRAY, sub)
    else:
        raise Phi3Error(f"cannot write metadata {key!r} of type {type(value).__name__} to GGUF")


# ---- the file ----------------------------------------------------------------------------------
def write_gguf(model, tokenizer: Tokenizer | None, path: str | Path, kind: str = "f16",
               name: str | None = None, progress: bool = False, source: GGUFFile | None = None) -> Path:
    """Write `model` (+ `tokenizer`) as a GGUF file of tensor type `kind` (f32|f16|q8_0|q4_0|q4_1).
    `name` (default: the checkpoint's `_name_or_path`, else its model_type) goes to `general.name`
    as `gguf_model_name` makes it safe for llama.cpp. `source`: the GGUF the model was loaded from;
    a tensor it holds under the same name and shape is taken from it (its bytes where the type is the
    same, else dequantized from it exactly), not from the model, whose non-native types were
    requantized when it loaded."""
    if kind not in EXPORT_TYPES:
        raise Phi3Error(f"GGUF type {kind!r} is not supported (use one of {', '.join(EXPORT_TYPES)})")
    cfg: ModelConfig = model.config
    if cfg.layout not in ("phi3", "llama"):
        raise Phi3Error(f"GGUF export of model_type {cfg.model_type!r} is not supported")
    path = Path(path)
    arch = "phi3" if cfg.layout == "phi3" else "llama"
    plan = _tensor_plan(model, cfg)
    name = gguf_model_name(name or Path(str(cfg.raw.get("_name_or_path") or cfg.model_type)).name, tokenizer)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        for key, value in model_metadata(cfg, name).items():
            _add_kv(writer, key, value)
        writer.add_key_value("general.file_type", FILE_TYPES[kind], gguf.GGUFValueType.UINT32)
        writer.add_key_value("general.quantization_version", 2, gguf.GGUFValueType.UINT32)
        if tokenizer is not None:
            for key, value in tokenizer_metadata(tokenizer, cfg.vocab_size).items():
                _add_kv(writer, key, value)
        # tensor infos need each encoded size: shapes and types are known without encoding
        encoded_specs = []
        for gguf_name, shape, _ in plan:
            qtype = _tensor_type(gguf_name, shape, kind)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            nbytes = math.prod(shape) // block * type_size
            dtype = {GGML.F32: np.float32, GGML.F16: np.float16}.get(qtype, np.uint8)
            shape = list(shape)
            if dtype is np.uint8:  # the writer takes quantized shapes in bytes per row
                shape[-1] = shape[-1] // block * type_size
            writer.add_tensor_info(gguf_name, shape, np.dtype(dtype), nbytes, raw_dtype=qtype)
            encoded_specs.append(qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for (gguf_name, shape, get), qtype in _progress(list(zip(plan, encoded_specs)), progress):
            original = source.tensors.get(gguf_name) if source is not None else None
            if original is not None and tuple(original.shape) == tuple(shape):
                writer.write_tensor_data(_encode_original(original, qtype))
                source.release_pages()
                continue
            w = get()
            if tuple(w.shape) != shape:  # the header promised `shape`
                raise Phi3Error(f"{gguf_name}: weight of shape {list(w.shape)}, expected {list(shape)}")
            writer.write_tensor_data(encode_tensor(w, qtype))
            if isinstance(w, torch.Tensor):
                drop_file_pages(w)  # a memory-mapped checkpoint's weights: read once, not kept resident
        writer.close()

    try:
        atomic_write(path, write)
    except OSError as e:  # the disk filling up, a read-only place: one line, the old file kept
        raise Phi3Error(f"{path}: could not write the GGUF file ({e.strerror or e})") from None
    return path


def all_from_source(model, source: GGUFFile) -> bool:
    """Whether every tensor the file of `model` holds would be taken from `source` (same names and
    shapes): the model's weights are then never read, and a model without them (on the meta device)
    will do."""
    return all(name in source.tensors and tuple(source.tensors[name].shape) == tuple(shape)
               for name, shape, _ in _tensor_plan(model, model.config))


def _encode_original(t: GGUFTensor, qtype: GGML) -> np.ndarray:
    """A source file's tensor as `qtype`: its own bytes when it is of that type, else dequantized
    (exactly, in fp32) and encoded."""
    if t.qtype == qtype.name:
        return np.ascontiguousarray(np.asarray(t.raw))
    lib = cpu_kernels.library()
    if lib is not None and len(t.shape) == 2 and t.qtype in cpu_kernels.DEQUANT_TYPES \
            and qtype.name in cpu_kernels.GGML_QUANTIZERS:  # in C, a row at a time: no float copy
        rows = cpu_kernels.GGMLRows(raw_bytes(t.raw).view(t.shape[0], -1), t.qtype, tuple(t.shape))
        return cpu_kernels.quantize_ggml(lib, rows, qtype.name).numpy()
    return encode_tensor(dequantize(t), qtype)


def _progress(items: list, enabled: bool) -> Iterator:
    if not enabled:
        return iter(items)
    from tqdm import tqdm
    return iter(tqdm(items, desc="writing GGUF", unit="tensor"))
