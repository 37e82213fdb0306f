"""HF checkpoints in and out: config.json + (sharded) safetensors + generation_config.json + tokenizer.

Llama-layout checkpoints (separate q/k/v and gate/up) are fused onto the Phi-3 module layout at
load time and split back on export, so one model class serves both.
"""

from __future__ import annotations

import dataclasses
import json
import os
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from .atomic import atomic_write_bytes
from .config import ModelConfig, read_config_file
from .errors import CheckpointError
from .layers import RotaryEmbedding, use_native_bf16
from .memory import drop_file_pages, return_freed_memory
from .models.phi3 import Phi3ForCausalLM
from .quant import (QUANTIZED, densify_unplanned, load_quantized_modules, quantization_config, quantization_plan,
                    quantized_layout, quantized_stored)
from .safetensors_writer import DTYPES_BY_NAME, Entry, write_safetensors

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
INDEX_NAME = "model.safetensors.index.json"


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


# ---- layout conversion ----------------------------------------------------------------------
def fuse_llama_layout(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """q_proj/k_proj/v_proj -> qkv_proj ([Q | K | V] rows); gate_proj/up_proj -> gate_up_proj."""
    out = dict(sd)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        parts = [p + f"self_attn.{n}_proj.weight" for n in "qkv"]
        if all(n in out for n in parts):
            out[p + "self_attn.qkv_proj.weight"] = torch.cat([out.pop(n) for n in parts], dim=0)
        parts = [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
        if all(n in out for n in parts):
            out[p + "mlp.gate_up_proj.weight"] = torch.cat([out.pop(n) for n in parts], dim=0)
    return out


def split_to_llama_layout(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    for name, t in sd.items():
        if name.endswith("self_attn.qkv_proj.weight"):
            stem = name[: -len("qkv_proj.weight")]
            for part, w in zip("qkv", t.split([q, kv, kv], dim=0)):
                out[f"{stem}{part}_proj.weight"] = w
        elif name.endswith("mlp.gate_up_proj.weight"):
            stem = name[: -len("gate_up_proj.weight")]
            gate, up = t.chunk(2, dim=0)
            out[stem + "gate_proj.weight"], out[stem + "up_proj.weight"] = gate, up
        else:
            out[name] = t
    return out


# ---- building a model from tensors ------------------------------------------------------------
def model_class(cfg: ModelConfig) -> type[torch.nn.Module]:
    """The model class of a config's family (dense Phi-3 / Llama layout by default)."""
    if cfg.model_type == "phi3small":
        from .models.phi3small import Phi3SmallForCausalLM
        return Phi3SmallForCausalLM
    if cfg.model_type == "phimoe":
        from .models.phimoe import PhiMoEForCausalLM
        return PhiMoEForCausalLM
    return Phi3ForCausalLM


def build_model(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype,
                source: str = "checkpoint", consume: bool = False) -> Phi3ForCausalLM:
    """Assign `state_dict` (HF names, either layout) to a model built without allocating weights.

    With `consume`, `state_dict` is emptied first, so each stored quantized tensor is freed as soon
    as its module is built (the loaders use this to keep peak memory near the model's size)."""
    sd = fuse_llama_layout(state_dict, cfg) if cfg.layout == "llama" else dict(state_dict)
    if consume:
        state_dict.clear()
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    qcfg = cfg.raw.get("quantization")
    # a quantized head or embedding table unties the two (each is stored on its own)
    quantized = qcfg.get("modules") or {} if qcfg else {}
    tied = cfg.tie_word_embeddings and "lm_head" not in quantized and "model.embed_tokens" not in quantized
    if tied:
        sd.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    if qcfg:  # quantized linears are built from their stored tensors, one at a time
        load_quantized_modules(model, qcfg, sd, source, dtype)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if tied:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(sd))
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{source}: missing tensor {', '.join(missing[:3])}{more}")
    unexpected = sorted(set(sd) - set(expected))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]} for model_type {cfg.model_type!r}")
    for name, shape in expected.items():
        if tuple(sd[name].shape) != tuple(shape):
            raise CheckpointError(f"{source}: tensor {name} has shape {list(sd[name].shape)}, "
                                  f"expected {list(shape)} from config.json")
    # a quantized model's dense embedding table (not also a dense head) is only looked up: stored
    # narrower than the activations (bf16 beside fp32), it stays so, memory-mapped, its rows cast
    # as they are read (resident: the rows looked up, not a widened copy of the table)
    lookup_only = "model.embed_tokens.weight" if qcfg and not tied else None
    for k in sd:  # one at a time, so each original is freed as soon as it is converted
        sd[k] = sd[k].to(_table_dtype(sd[k].dtype, dtype) if k == lookup_only else dtype)
    model.load_state_dict(sd, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    if hasattr(model, "reset_buffers"):  # buffers were on the meta device
        model.reset_buffers()
    else:
        model.rotary = RotaryEmbedding(cfg)
    if dtype == torch.bfloat16:  # decode steps on the native bf16 kernel
        use_native_bf16(model)
    if consume:
        return_freed_memory()
    return model.eval()


def _table_dtype(stored: torch.dtype, act: torch.dtype) -> torch.dtype:
    """The dtype a quantized model keeps its dense embedding table in, when the table is only looked
    up (not also the head): the narrower of its stored and the activation dtype. A bf16 table beside
    fp32 activations stays bf16 (and memory-mapped) and the model casts the rows it looks up."""
    if stored.is_floating_point and torch.finfo(stored).bits < torch.finfo(act).bits:
        return stored
    return act


# ---- reading safetensors ----------------------------------------------------------------------
def safetensors_files(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from None
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{index}: shard {f.name} is missing")
        return files
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    raise CheckpointError(f"{path}: no model.safetensors or {INDEX_NAME} found")


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of the shards, memory-mapped (read when first touched); a truncated file is named.

    Each tensor comes through its own handle, so each has its own map, unmapped when the tensor is
    freed. With one handle per file, the map lives as long as any of its tensors, and every page
    touched while converting the others (quantized layouts, dtypes) would stay resident: loading
    would peak at twice the file."""
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        size = f.stat().st_size
        try:
            with safe_open(str(f), framework="pt") as handle:
                names = list(handle.keys())
            for name in names:
                with safe_open(str(f), framework="pt") as handle:
                    tensors[name] = handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{f}: truncated or corrupt safetensors file ({size} bytes): {e}") from None
    return tensors


def load_hf_checkpoint(path: str | Path, dtype: str | torch.dtype | None = None) -> Phi3ForCausalLM:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    cfg = read_config_file(path / "config.json")
    tensors = read_safetensors(safetensors_files(path))
    dense = None
    qcfg = cfg.raw.get("quantization")
    if isinstance(qcfg, dict) and isinstance(qcfg.get("modules"), dict):
        quantized = qcfg["modules"]
        dense = sum(t.numel() for k, t in tensors.items() if k.rsplit(".", 1)[0] not in quantized)
    return build_model(cfg, tensors, default_dtype(cfg, dtype, dense), source=str(path), consume=True)


def mapped_entries(files: list[Path]) -> list[Entry]:
    """Every tensor of the shards as an `Entry` whose `get()` maps it from its file (one handle a
    tensor, as `read_safetensors`): a tensor's pages are let go with it once it is written."""
    entries = []
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():
                    view = handle.get_slice(name)
                    entries.append(Entry(name, tuple(view.get_shape()), DTYPES_BY_NAME[view.get_dtype()],
                                         partial(_mapped_tensor, f, name)))
        except (SafetensorError, OSError, KeyError) as e:
            raise CheckpointError(f"{f}: truncated or corrupt safetensors file: {e}") from None
    return entries


def _mapped_tensor(f: Path, name: str) -> torch.Tensor:
    with safe_open(str(f), framework="pt") as handle:
        return handle.get_tensor(name)


def convert_hf_checkpoint(src: str | Path, dst: str | Path, dtype: str | torch.dtype | None = None,
                          tokenizer=None) -> Path:
    """A full-precision HF directory rewritten (`phi3 convert dir/ out/ --dtype ...`): what
    `load_hf_checkpoint` then `save_hf_checkpoint` write, a tensor at a time, each cast as it is
    written, so the model is never held (fp32 -> bf16 of a 14B model needs one tensor in memory, not
    28 GB). Names and shapes are checked first against the model the config describes, as loading
    does. A quantized checkpoint is refused (load it with `dequantize`, then save)."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory")
    cfg = read_config_file(src / "config.json")
    if cfg.raw.get("quantization"):
        raise CheckpointError(f"{src}: a quantized checkpoint; load it and save the model instead")
    dt = default_dtype(cfg, dtype)
    entries = [e for e in mapped_entries(safetensors_files(src)) if not e.name.endswith("rotary_emb.inv_freq")]
    def cast(e: Entry) -> Entry:
        to = dt if e.dtype.is_floating_point else e.dtype
        return Entry(e.name, e.shape, to, lambda: e.get().to(to))
    entries = checked_entries([cast(e) for e in entries], cfg, dt, str(src))
    return write_hf_checkpoint(dst, entries, cfg, dt, tokenizer, progress=True)


def checked_entries(entries: list[Entry], cfg: ModelConfig, dtype: torch.dtype, source: str) -> list[Entry]:
    """Full-precision `entries` read straight from another file, ready for `write_hf_checkpoint`: their
    names and shapes checked against the model `cfg` describes (on the meta device, as loading checks
    them: a missing or misshapen tensor is named before anything is written), and a tied model's head
    left out, as `save_hf_checkpoint` leaves it out."""
    build_model(cfg, {e.name: torch.empty(e.shape, dtype=e.dtype, device="meta") for e in entries}, dtype,
                source=source)
    return [e for e in entries if not (cfg.tie_word_embeddings and e.name == "lm_head.weight")]


DENSE_SHARE_FP32 = 0.1  # quantized checkpoints with fewer dense parameters than this share run in fp32


def default_dtype(cfg: ModelConfig, dtype: str | torch.dtype | None, dense_params: int | None = None) -> torch.dtype:
    """'auto' (None): fp32 below 2B parameters; fp32 also for a quantized checkpoint whose dense
    (not quantized) parameters, `dense_params`, are under a tenth of the model: its matmuls take fp32
    activations (the residual stream stays fp32 between quantized matmuls, as in llama.cpp), so bf16
    would only add roundings and casts, and its decode steps run natively (`phi3.decode_step`);
    else the checkpoint's dtype (bf16 for releases)."""
    if dtype not in (None, "auto"):
        return parse_dtype(dtype)
    n = cfg.num_parameters()
    if n < 2e9 or (dense_params is not None and dense_params < DENSE_SHARE_FP32 * n):
        return torch.float32
    return DTYPES.get(str(cfg.torch_dtype), torch.bfloat16)


# ---- writing ----------------------------------------------------------------------------------
def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def _save_safetensors(entries: list[Entry], path: Path, final: Path, progress: bool = False) -> None:
    """`entries` written to `path`, on their way to `final` (the name errors and the bar show)."""
    try:
        write_safetensors(path, entries, metadata={"format": "pt"},
                          progress=f"writing {final.name}" if progress else None)
    except OSError as e:  # the disk filling up, a read-only place: the old files kept
        raise CheckpointError(f"{final}: could not write ({e})") from None


def _once(produce: Callable[[], dict[str, torch.Tensor]]) -> Callable[[str], torch.Tensor]:
    """`get(key)`: `produce()[key]`, produced once for all its keys (a module's `stored()`: a native
    layout is unpacked in one pass), each handed out once so that it is freed when written."""
    cache: dict[str, torch.Tensor] = {}

    def get(key: str) -> torch.Tensor:
        if key not in cache:
            cache.clear()
            cache.update(produce())
        return cache.pop(key)
    return get


def export_entries(model: Phi3ForCausalLM, dtype: torch.dtype | None = None) -> list[Entry]:
    """The tensors of the model's HF checkpoint, by HF name, each produced when it is written
    (`dtype`: the float tensors cast, one at a time). A quantized model keeps the fused Phi-3
    names whatever its layout (its quantized tensors are read by phi3, not by transformers)."""
    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings and isinstance(model.model.embed_tokens, torch.nn.Embedding):
        sd.pop("lm_head.weight", None)
    quantized = [(name, m) for name, m in model.named_modules() if isinstance(m, QUANTIZED)]
    if not quantized and cfg.layout == "llama":
        sd = split_to_llama_layout(sd, cfg)
    entries = _dense_entries(sd, dtype)
    for name, m in quantized:
        entries += _module_entries(name, m.stored_layout(), _once(m.stored), dtype)
    return entries


def _dense_entries(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> list[Entry]:
    """Entries of full-precision tensors, the float ones cast to `dtype` (None: as they are) when written."""
    def cast(t: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and t.is_floating_point() else t.dtype
    return [Entry(name, tuple(t.shape), cast(t), lambda t=t: t.to(cast(t))) for name, t in sd.items()]


def _module_entries(name: str, layout: dict, get: Callable[[str], torch.Tensor],
                    dtype: torch.dtype | None) -> list[Entry]:
    """The entries of one quantized module's stored tensors (`layout`: key -> shape, dtype); the
    bias is cast to `dtype`, the quantized tensors are written as they are."""
    entries = []
    for key, (shape, dt) in layout.items():
        if key == "bias" and dtype is not None:
            entries.append(Entry(f"{name}.{key}", shape, dtype, lambda key=key: get(key).to(dtype)))
        else:
            entries.append(Entry(f"{name}.{key}", shape, dt, lambda key=key: get(key)))
    return entries


def quantize_to_checkpoint(model: Phi3ForCausalLM, path: str | Path, bits: int = 4, group_size: int = 64,
                           head_bits: int | None = 8, embedding_bits: int | str | None = "head", tokenizer=None,
                           dtype: str | torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """`quantize_model` then `save_hf_checkpoint` (`phi3 quantize`): the same directory, but each module
    is quantized as it is written, straight into the file layout, so the quantized model is never
    held (nor packed for the kernels and unpacked again). The model is left as it was, except that
    quantized modules the plan keeps in full precision become dense (`quantize_model` does the same)."""
    plan = quantization_plan(model, bits, group_size, head_bits, embedding_bits)
    densify_unplanned(model, set(plan))
    cfg = model.config
    dtype = None if dtype is None else parse_dtype(dtype)
    planned = tuple(f"{name}." for name in plan)
    sd = {k: v.detach() for k, v in model.state_dict().items() if not k.startswith(planned)}
    if cfg.tie_word_embeddings and "model.embed_tokens" not in plan:
        sd.pop("lm_head.weight", None)

    def quantized(m: torch.nn.Module, b: int) -> dict[str, torch.Tensor]:
        parts = quantized_stored(m, b, group_size)
        if isinstance(getattr(m, "weight", None), torch.Tensor):
            drop_file_pages(m.weight)  # a memory-mapped checkpoint's weight: read once, not kept resident
        return parts

    entries = _dense_entries(sd, dtype)
    for name, b in plan.items():
        m = model.get_submodule(name)
        entries += _module_entries(name, quantized_layout(m, b, group_size), _once(partial(quantized, m, b)), dtype)
    section = quantization_config(bits, group_size, plan)
    quantized_cfg = dataclasses.replace(cfg, raw={**cfg.raw, "quantization": section})
    return write_hf_checkpoint(path, entries, quantized_cfg, model.dtype if dtype is None else dtype, tokenizer,
                               max_shard_bytes)


def save_hf_checkpoint(model: Phi3ForCausalLM, path: str | Path, tokenizer=None,
                       max_shard_bytes: int = 5 * 2**30, dtype: str | torch.dtype | None = None) -> Path:
    """Write an HF directory that transformers loads unchanged. Every file is written atomically,
    a tensor at a time (`export_entries`): no second copy of the model is made."""
    dtype = None if dtype is None else parse_dtype(dtype)
    return write_hf_checkpoint(path, export_entries(model, dtype), model.config,
                               model.dtype if dtype is None else dtype, tokenizer, max_shard_bytes)


def write_hf_checkpoint(path: str | Path, entries: list[Entry], cfg: ModelConfig, dtype: torch.dtype,
                        tokenizer=None, max_shard_bytes: int = 5 * 2**30, progress: bool = False) -> Path:
    """The HF directory of the tensors `entries` (HF names; each produced as it is written) for a model
    of config `cfg` whose weights are in `dtype`: safetensors shards (and their index), config.json,
    generation_config.json and the tokenizer files. `progress`: a bar on a terminal."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards = _shard(entries, max_shard_bytes)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    # every shard is written beside the checkpoint first and moved in only once all are: a failure
    # (disk full) leaves the directory's previous checkpoint whole, never old and new shards mixed
    staged = [(path / f".{name}.partial", path / name) for name in names]
    try:
        for (part, final), shard in zip(staged, shards):
            _save_safetensors(shard, part, final, progress)
    except BaseException:
        for part, _ in staged:
            part.unlink(missing_ok=True)
        raise
    for part, final in staged:
        os.replace(part, final)
    for old in path.glob("model-*-of-*.safetensors"):  # shards of a previous checkpoint of another count
        if old.name not in names:
            old.unlink()
    if len(shards) == 1:
        (path / INDEX_NAME).unlink(missing_ok=True)
    else:
        weight_map = {e.name: name for name, shard in zip(names, shards) for e in shard}
        total = sum(e.nbytes for e in entries)
        atomic_write_json(path / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        (path / "model.safetensors").unlink(missing_ok=True)
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    atomic_write_json(path / "config.json", hf)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
    if tokenizer is not None and tokenizer.stop_token_ids:
        gen["eos_token_id"] = sorted(tokenizer.stop_token_ids)
    atomic_write_json(path / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def _shard(entries: list[Entry], max_bytes: int) -> list[list[Entry]]:
    shards, current, size = [], [], 0
    for e in entries:
        if current and size + e.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += e.nbytes
    shards.append(current)
    return shards
