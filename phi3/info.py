"""`phi3 info`: what a checkpoint is, from its metadata alone (no weights are loaded)."""

from __future__ import annotations


from .config import ModelConfig, read_config_file


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return ""


def quantized_modules(qcfg: dict) -> str:
    """A checkpoint's `quantization` section in a few words: 'int4 g64×128, int8×2 (lm_head, model.embed_tokens)'."""
    by_bits: dict = {}
    for name, bits in qcfg["modules"].items():
        by_bits.setdefault(bits, []).append(name)
    parts = []
    for bits, names in sorted(by_bits.items(), key=lambda kv: str(kv[0])):
        label = f"int{bits}" + (f" g{qcfg.get('group_size')}" if bits == 4 else "")
        named = [n for n in names if n in ("lm_head", "model.embed_tokens")]
        parts.append(f"{label}×{len(names)}" + (f" ({', '.join(named)})" if named else ""))
    return ", ".join(parts)


def describe(model: str | None) -> str:
    from .api import is_gguf_file, resolve

    path = resolve(model)
    if path.is_dir():
        cfg = read_config_file(path / "config.json")
        files = list(path.glob("*.safetensors"))
        fmt = f"HF safetensors ({len(files)} file{'s' if len(files) != 1 else ''})"
        nbytes = sum(f.stat().st_size for f in files)
        qcfg = cfg.raw.get("quantization")
        if isinstance(qcfg, dict) and isinstance(qcfg.get("modules"), dict):
            types = f"{quantized_modules(qcfg)}; the rest {cfg.torch_dtype}"
        else:
            types = str(cfg.torch_dtype)
    else:
        from .gguf import gguf_to_hf_config, read_gguf

        if not is_gguf_file(path):
            from .errors import CheckpointError
            raise CheckpointError(f"{path}: not a GGUF file (bad magic) and not an HF model directory")
        f = read_gguf(path)
        cfg = ModelConfig.from_hf_dict(gguf_to_hf_config(f), source=str(path))
        counts: dict[str, int] = {}
        for t in f.tensors.values():
            counts[t.qtype] = counts.get(t.qtype, 0) + 1
        fmt = f"GGUF (architecture {f.architecture})"
        nbytes = path.stat().st_size
        types = ", ".join(f"{k}×{v}" for k, v in sorted(counts.items()))
    rope = "LongRoPE" if cfg.is_longrope else "RoPE"
    kv_token = kv_bytes_per_token(cfg)
    lines = [
        f"model:        {path}",
        f"format:       {fmt}",
        f"architecture: {cfg.raw.get('architectures', [cfg.model_type])[0]} (model_type {cfg.model_type}, {cfg.layout} layout)",
        f"parameters:   {cfg.num_parameters() / 1e9:.3f} B",
        f"bytes:        {_human(nbytes)} on disk; weights {types}",
        f"layers:       {cfg.num_hidden_layers}, hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}",
        f"heads:        {cfg.num_attention_heads} query / {cfg.num_key_value_heads} kv, head_dim {cfg.head_dim}",
        f"vocab:        {cfg.vocab_size}, tied embeddings: {cfg.tie_word_embeddings}",
        f"context:      {cfg.max_position_embeddings} ({rope}, theta {cfg.rope_theta:g}, "
        f"original {cfg.original_max_position_embeddings}, rotary dims {cfg.rotary_dim}, "
        f"sliding window {cfg.sliding_window})",
        f"kv cache:     {_human(kv_token)} per token (16-bit keys and values: quantized and bf16 models), "
        f"{_human(kv_token * cfg.max_position_embeddings)} at the full context"
        + (" (block-sparse layers keep less)" if cfg.model_type == "phi3small" else ""),
    ]
    return "\n".join(lines)


def kv_bytes_per_token(cfg, bytes_per_value: int = 2) -> int:
    """Bytes a token's keys and values take in a dense KV cache: every layer, every KV head."""
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * bytes_per_value
