"""DPO: starts at loss log 2 (policy == reference), frozen and precomputed references agree, and
training raises held-out preference accuracy above 0.5 and the chosen-minus-rejected margin."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from phi3.errors import Phi3Error
from phi3.train.config import load_config
from phi3.train.dpo import DPOTask
from phi3.train.loop import train

from .helpers import read_metrics, write_config
from .test_sft import COLORS, PHI3_VOCAB, TINY

EXTRA = {"apple": "red", "banana": "yellow", "frog": "green", "milk": "white", "crow": "black", "ocean": "blue",
         "ruby": "red", "pine": "green", "ivory": "white", "ink": "black", "gold": "yellow", "sapphire": "blue"}


def preference_set(path: Path) -> Path:
    with open(path, "w") as f:
        for thing, color in {**COLORS, **EXTRA}.items():
            for q in (f"What color is the {thing}?", f"Describe the {thing}."):
                f.write(json.dumps({"prompt": q, "chosen": f"The {thing} is {color}.",
                                    "rejected": "I do not know, sorry."}) + "\n")
    return path


def dpo_config(tmp: Path, **dpo) -> dict:
    over = dict(TINY, vocab_size=32064, bos_token_id=1, eos_token_id=32000, pad_token_id=32000)
    return {
        "run_dir": str(tmp / "run"), "tokenizer": str(PHI3_VOCAB),
        "model": {"preset": "phi-3-mini-4k-instruct", "overrides": over},
        "seq_len": 48, "micro_batch_size": 4, "grad_accum": 1,
        "optimizer": {"lr": 1e-3, "weight_decay": 0.0},
        "checkpoint": {"every": 1000, "keep": 1},
        "eval": {"every": 5},
        "dpo": {"data": str(preference_set(tmp / "prefs.jsonl")), "steps": 15, "beta": 0.1,
                "eval_fraction": 0.25, "schedule": {"kind": "constant"}, **dpo},
    }


def test_dpo_raises_heldout_accuracy_and_margin(tmp_path):
    run = train(load_config(write_config(tmp_path, dpo_config(tmp_path))), DPOTask, progress=False)
    rows = read_metrics(run)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # first step: policy == reference
    assert rows[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    evals = [r for r in rows if "eval_accuracy" in r]
    assert len(evals) == 3
    assert evals[-1]["eval_accuracy"] > 0.5
    assert evals[-1]["eval_reward_margin"] > 0.05
    assert evals[-1]["eval_loss"] < math.log(2)
    assert rows[-1]["accuracy"] > 0.5 and rows[-1]["loss"] < rows[0]["loss"]
    assert (run / "reference_logps.safetensors").exists() and (run / "hf" / "model.safetensors").exists()


def test_frozen_and_precomputed_reference_agree(tmp_path):
    curves = {}
    for ref in ("frozen", "precomputed"):
        (tmp_path / ref).mkdir()
        cfg = dpo_config(tmp_path / ref, steps=3, reference=ref)
        curves[ref] = read_metrics(train(load_config(write_config(tmp_path / ref, cfg)), DPOTask, progress=False))
    for a, b in zip(curves["frozen"], curves["precomputed"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["reward_margin"] == pytest.approx(b["reward_margin"], abs=1e-5)


def test_bad_preference_record_is_named(tmp_path):
    cfg = dpo_config(tmp_path)
    with open(cfg["dpo"]["data"], "a") as f:
        f.write(json.dumps({"prompt": "Hi", "chosen": "Hello"}) + "\n")
    with pytest.raises(Phi3Error, match=r"prefs.jsonl:49: expected a string field 'rejected'"):
        train(load_config(write_config(tmp_path, cfg)), DPOTask, progress=False)
