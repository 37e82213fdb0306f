"""SFT: assistant-only labels, packing without cross-document attention, LoRA merge, and a tiny
model that learns to answer in the chat template and stop at <|end|>."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import phi3
from phi3.models.phi3 import Phi3ForCausalLM
from phi3.tokenizer import Tokenizer
from phi3.train.chat_data import encode_chat, example_tensors, pack
from phi3.train.config import Lora, ModelSpec, load_config
from phi3.train.loop import train
from phi3.train.model import model_config
from phi3.train.sft import SFTTask

from ..conftest import SHARED
from .helpers import TINY, read_metrics, write_config

PHI3_VOCAB = SHARED / "tokenizer" / "ggml-vocab-phi-3.gguf"
COLORS = {"sky": "blue", "grass": "green", "sun": "yellow", "snow": "white", "coal": "black", "blood": "red",
          "sea": "blue", "leaf": "green", "lemon": "yellow", "cloud": "white", "night": "black", "cherry": "red"}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_gguf(PHI3_VOCAB)


def test_labels_cover_exactly_the_assistant_turns(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "See you."}]
    ids, mask = encode_chat(tok, msgs)
    labelled = [i for i, m in zip(ids, mask) if m]
    end = tok.token_to_id("<|end|>")
    # two turns, each its content then <|end|>; nothing of the prompts
    assert labelled.count(end) == 2
    first = labelled[:labelled.index(end) + 1]
    assert tok.decode(first) == "Hello!<|end|>"
    assert tok.decode(labelled[len(first):]).strip() == "See you.<|end|>"
    # the ids are the plain tokenization of the rendered text (what inference sees)
    assert ids == tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=False))
    inputs, targets = example_tensors(ids, mask, 512)
    assert len(inputs) == len(targets) == len(ids) - 1
    assert [t for t in targets if t != -100] == labelled[0 if not mask[0] else 1:]


def test_packed_documents_do_not_see_each_other():
    cfg = model_config(ModelSpec(preset="phi-3-mini-4k-instruct", overrides=dict(TINY)))
    model = Phi3ForCausalLM(cfg).eval()
    a = ([5, 6, 7, 8, 9], [-100] * 5)
    b = ([10, 11, 12], [1, 2, 3])
    row = pack([a, b], seq_len=12, pad_id=0)
    assert len(row) == 1
    r = row[0]
    assert r["positions"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2] + [-1] * 4
    with torch.no_grad():
        packed = model(r["input_ids"][None], positions=r["positions"][None], segment_ids=r["segment_ids"][None])
        alone_a = model(torch.tensor([a[0]]))
        alone_b = model(torch.tensor([b[0]]))
        unmasked = model(r["input_ids"][None], positions=r["positions"][None])
    torch.testing.assert_close(packed[0, :5], alone_a[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[0, 5:8], alone_b[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked[0, 5:8], alone_b[0], atol=1e-3)  # without segments b would see a


def test_lora_starts_as_base_and_merges_exactly():
    from phi3.train.lora import apply_lora, merge_state_dict

    cfg = model_config(ModelSpec(preset="phi-3-mini-4k-instruct", overrides=dict(TINY)))
    model = Phi3ForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        before = model(ids)
    lcfg = Lora(rank=4, alpha=8.0)
    swapped = apply_lora(model, lcfg)
    assert len(swapped) == 4 * TINY["num_hidden_layers"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before)
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.normal_(0, 0.1)
        adapted = model(ids)
    merged = Phi3ForCausalLM(cfg).eval()
    merged.load_state_dict(merge_state_dict(model.state_dict(), lcfg))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), adapted, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(adapted, before, atol=1e-3)


def chat_set(path: Path) -> Path:
    with open(path, "w") as f:
        for thing, color in COLORS.items():
            for q in (f"What color is the {thing}?", f"Tell me the color of the {thing}."):
                msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": f"The {thing} is {color}."}]
                f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def sft_config(tmp: Path, **sft) -> dict:
    over = dict(TINY, vocab_size=32064, bos_token_id=1, eos_token_id=32000, pad_token_id=32000)
    return {
        "run_dir": str(tmp / "run"), "tokenizer": str(PHI3_VOCAB),
        "model": {"preset": "phi-3-mini-4k-instruct", "overrides": over},
        "seq_len": 64, "micro_batch_size": 4, "grad_accum": 1,
        "optimizer": {"lr": 3e-3, "weight_decay": 0.0},
        "checkpoint": {"every": 1000, "keep": 1},
        "sft": {"data": str(chat_set(tmp / "chat.jsonl")), "steps": 80, "eval_fraction": 0.1,
                "schedule": {"kind": "cosine", "warmup_steps": 5}, **sft},
    }


def test_sft_answers_in_template_and_stops_at_end(tmp_path):
    cfg = load_config(write_config(tmp_path, sft_config(tmp_path)))
    run = train(cfg, SFTTask, progress=False)
    rows = read_metrics(run)
    assert rows[-1]["loss"] < 0.3 * rows[0]["loss"], (rows[0]["loss"], rows[-1]["loss"])
    assert "eval_loss" in rows[-1]
    lm = phi3.load(run / "hf")
    end = lm.tokenizer.token_to_id("<|end|>")
    for thing in ("sky", "coal", "cherry"):
        [c] = lm.complete_ids([lm.chat_prompt(f"What color is the {thing}?")], max_new_tokens=24, temperature=0)
        # the answer format of the training set (a tiny model after 80 steps may mix up the nouns)
        assert re.fullmatch(rf"The ({'|'.join(COLORS)}) is ({'|'.join(set(COLORS.values()))})\.", c.text), c.text
        assert c.finish_reason == "stop" and len(c.token_ids) < 24, c
        with torch.no_grad():  # the stop token it chose is <|end|>
            logits = lm.model(torch.tensor([lm.chat_prompt(f"What color is the {thing}?") + c.token_ids]))
        assert int(logits[0, -1].argmax()) == end


def test_sft_with_lora_trains_adapters_only_and_exports_merged(tmp_path):
    base_cfg = sft_config(tmp_path, steps=6, pack=False)
    cfg = load_config(write_config(tmp_path, dict(base_cfg, sft=dict(base_cfg["sft"], lora={"rank": 4, "alpha": 8}))))
    run = train(cfg, SFTTask, progress=False)
    from safetensors.torch import load_file
    exported = load_file(run / "hf" / "model.safetensors")
    assert not any("lora" in k or ".base." in k for k in exported)
    ckpt = load_file(next((run / "checkpoints").iterdir()) / "model.safetensors")
    assert any(k.endswith("lora_A") for k in ckpt)
    # frozen base: the exported weights differ from the base only by B @ A
    w0 = ckpt["model.layers.0.self_attn.o_proj.base.weight"]
    delta = exported["model.layers.0.self_attn.o_proj.weight"] - w0
    assert 0 < torch.linalg.matrix_rank(delta) <= 4
