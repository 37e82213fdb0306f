"""Real text, offline: a tiny Phi-3 trained on the Python standard library's sources reaches a
held-out loss (on stdlib files it never saw) below the unigram entropy of the held-out text."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from phi3.data.tokenize import TokenShards, tokenize
from phi3.train.config import load_config
from phi3.train.loop import train
from phi3.train.pretrain import PretrainTask

from .helpers import TINY, read_metrics, write_config
from .test_sft import PHI3_VOCAB

STDLIB = Path(json.__file__).resolve().parents[1]
PKGS = ["json", "email", "http", "logging", "unittest", "importlib", "concurrent", "urllib", "html"]


def unigram_entropy(shards: TokenShards) -> float:
    """Entropy (nats/token) of the empirical unigram distribution: the best any unigram model gets."""
    counts = np.bincount(np.concatenate([np.asarray(s) for s in shards.shards]))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def run_stdlib(tmp: Path, steps: int, hidden: int, seq_len: int, layers: int, lr: float = 3e-3) -> tuple[list[dict], float]:
    files = [str(f) for pkg in PKGS for f in sorted((STDLIB / pkg).rglob("*.py")) if "test" not in f.parts]
    t0 = time.time()  # held out: every 6th file (whole files the model never sees)
    tokenize([f for i, f in enumerate(files) if i % 6], tmp / "train", tokenizer=str(PHI3_VOCAB), workers=2,
             progress=False)
    tokenize(files[::6], tmp / "heldout", tokenizer=str(PHI3_VOCAB), progress=False)
    h_unigram = unigram_entropy(TokenShards(tmp / "heldout"))
    print(f"tokenized in {time.time() - t0:.1f}s: {TokenShards(tmp / 'train').tokens} train tokens")
    batch = 8
    over = dict(TINY, vocab_size=32064, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32,
                bos_token_id=1, eos_token_id=32000, pad_token_id=32000)
    cfg = {
        "run_dir": str(tmp / "run"), "tokenizer": str(PHI3_VOCAB),
        "model": {"preset": "phi-3-mini-4k-instruct", "overrides": over},
        "seq_len": seq_len, "micro_batch_size": batch, "grad_accum": 1,
        "sources": {"stdlib": str(tmp / "train"), "heldout": str(tmp / "heldout")},
        "phases": [{"name": "stdlib", "tokens": steps * batch * seq_len, "mixture": {"stdlib": 1.0},
                    "schedule": {"kind": "cosine", "warmup_steps": max(1, steps // 20), "min_lr_ratio": 0.1}}],
        "optimizer": {"lr": lr, "weight_decay": 0.1, "betas": [0.9, 0.95]},
        "checkpoint": {"every": steps, "keep": 1},
        "eval": {"every": max(1, steps // 4), "batches": 8, "source": "heldout"},
        "log_every": 10,
    }
    rows = read_metrics(train(load_config(write_config(tmp, cfg)), PretrainTask, progress=False))
    return rows, h_unigram


def test_short_run_on_stdlib_beats_unigram_entropy(tmp_path):
    rows, h = run_stdlib(tmp_path, steps=150, hidden=64, seq_len=48, layers=2, lr=1e-2)
    final = rows[-1]["eval_loss"]
    print(f"held-out loss {final:.3f} nats vs unigram entropy {h:.3f} (uniform {math.log(32064):.2f})")
    assert final < h, (final, h)


@pytest.mark.slow
def test_few_hundred_steps_on_stdlib_well_below_unigram_entropy(tmp_path):
    rows, h = run_stdlib(tmp_path, steps=400, hidden=64, seq_len=64, layers=2, lr=1e-2)
    final = rows[-1]["eval_loss"]
    print(f"held-out loss {final:.3f} nats vs unigram entropy {h:.3f}")
    assert final < h - 0.4, (final, h)
