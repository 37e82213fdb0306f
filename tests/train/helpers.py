"""Small builders shared by the training tests: token shards from arrays, tiny configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 512,
        "original_max_position_embeddings": 512, "sliding_window": None, "rope_scaling": None,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def write_shards(out: Path, arrays: list[np.ndarray], vocab: int = 256, eos: int = 0) -> Path:
    """A token-shard directory in the `phi3 data tokenize` format, from token arrays."""
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for i, a in enumerate(arrays):
        name = f"{i:05d}.bin"
        np.asarray(a, dtype=np.uint16).tofile(out / name)
        shards.append({"file": name, "tokens": int(len(a)), "documents": 1, "source": f"array{i}"})
    index = {"format": "phi3-token-shards/1", "tokenizer": "test", "vocab_size": vocab, "dtype": "uint16",
             "eos_token_id": eos, "text_field": "text", "shards": shards, "tokens": sum(len(a) for a in arrays)}
    (out / "index.json").write_text(json.dumps(index))
    return out


def patterned_tokens(n: int, seed: int, vocab: int = 256) -> np.ndarray:
    """A learnable stream: a repeated random phrase with noise (so loss curves move)."""
    rng = np.random.default_rng(seed)
    phrase = rng.integers(1, vocab, size=17)
    reps = np.tile(phrase, n // len(phrase) + 1)[:n]
    noise = rng.random(n) < 0.1
    reps[noise] = rng.integers(1, vocab, size=int(noise.sum()))
    return reps


def tiny_config(tmp: Path, **over) -> dict:
    data = write_shards(tmp / "data_a", [patterned_tokens(3000, 1), patterned_tokens(2000, 2)])
    data_b = write_shards(tmp / "data_b", [patterned_tokens(4000, 3)])
    cfg = {
        "run_dir": str(tmp / "run"),
        "model": {"preset": "phi-3-mini-4k-instruct", "overrides": dict(TINY)},
        "seq_len": 32, "micro_batch_size": 4, "grad_accum": 2, "seed": 0,
        "sources": {"a": str(data), "b": str(data_b)},
        "phases": [
            {"name": "web", "tokens": 32 * 8 * 6, "mixture": {"a": 1.0},
             "schedule": {"kind": "cosine", "warmup_steps": 2}},
            {"name": "filtered", "tokens": 32 * 8 * 6, "mixture": {"a": 0.3, "b": 0.7}, "lr": 1e-3,
             "schedule": {"kind": "wsd", "decay_fraction": 0.5}},
        ],
        "optimizer": {"lr": 2e-3, "weight_decay": 0.1, "grad_clip": 1.0},
        "checkpoint": {"every": 4, "keep": 2},
        "eval": {"every": 6, "batches": 1, "source": "b"},
    }
    for k, v in over.items():
        cfg[k] = v
    return cfg


def write_config(tmp: Path, cfg: dict) -> Path:
    path = tmp / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
