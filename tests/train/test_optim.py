"""LR schedules, muP-style init and LR scaling, and the precision / activation-checkpointing switches."""

from __future__ import annotations

import pytest
import torch

from phi3.train.config import ModelSpec, Optimizer, Schedule, load_config
from phi3.train.loop import train
from phi3.train.model import build_model
from phi3.train.optim import build_optimizer, lr_at, set_lr
from phi3.train.pretrain import PretrainTask

from .helpers import TINY, read_metrics, tiny_config, write_config


def test_schedules():
    lin = Schedule(kind="linear", warmup_steps=2, min_lr_ratio=0.0)
    assert [lr_at(s, 6, 1.0, lin) for s in range(6)] == pytest.approx([0.5, 1.0, 0.75, 0.5, 0.25, 0.0])
    cos = Schedule(kind="cosine", warmup_steps=0, min_lr_ratio=0.1)
    vals = [lr_at(s, 5, 1.0, cos) for s in range(5)]
    assert vals[-1] == pytest.approx(0.1) and all(a > b for a, b in zip(vals, vals[1:]))
    assert vals[1] == pytest.approx(0.1 + 0.45 * (1 + torch.cos(torch.tensor(0.4 * torch.pi)).item()))
    assert [lr_at(s, 4, 2.0, Schedule(kind="constant")) for s in range(4)] == [2.0] * 4


def test_mup_init_and_lr_scaling():
    over = dict(TINY, hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=8,
                vocab_size=4096)
    spec = ModelSpec(preset="phi-3-mini-4k-instruct", overrides=over, init_std=0.02, mup_base_width=64)
    model, _ = build_model(spec, seed=0)
    mult = 64 / 256
    hidden_std = model.model.layers[0].mlp.down_proj.weight.std().item()
    assert hidden_std == pytest.approx(0.02 * mult**0.5, rel=0.05)
    assert model.lm_head.weight.std().item() == pytest.approx(0.02 * mult, rel=0.05)
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.05)
    opt = build_optimizer(model, Optimizer(lr=1e-3), 64, 256)
    set_lr(opt, 1e-3)
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs[id(model.model.layers[0].self_attn.qkv_proj.weight)] == pytest.approx(1e-3 * mult)
    assert lrs[id(model.lm_head.weight)] == lrs[id(model.model.embed_tokens.weight)] == pytest.approx(1e-3)
    plain, _ = build_model(ModelSpec(preset="phi-3-mini-4k-instruct", overrides=over, init_std=0.02), seed=0)
    assert plain.model.layers[0].mlp.down_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)


def _curve(tmp, **over):
    tmp.mkdir()
    cfg = tiny_config(tmp, **over)
    cfg["phases"] = cfg["phases"][:1]
    cfg["phases"][0]["tokens"] = 32 * 8 * 3
    return read_metrics(train(load_config(write_config(tmp, cfg)), PretrainTask, progress=False))


def test_activation_checkpointing_and_bf16_switches(tmp_path):
    ref = _curve(tmp_path / "ref")
    ac = _curve(tmp_path / "ac", activation_checkpointing=True)
    assert [r["loss"] for r in ac] == pytest.approx([r["loss"] for r in ref], rel=1e-5)
    bf16 = _curve(tmp_path / "bf16", precision="bf16")
    assert bf16[0]["loss"] == pytest.approx(ref[0]["loss"], rel=2e-2)
    assert bf16[0]["loss"] != ref[0]["loss"]  # autocast really ran in bf16


def test_compile_switch(tmp_path):
    """`compile: true` (torch.compile, Inductor) trains the same curve as eager."""
    ref = _curve(tmp_path / "ref")
    compiled = _curve(tmp_path / "compiled", compile=True)
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in ref], rel=1e-4)


def test_fused_loss_matches_logits_loss():
    """The trainer's loss (fused with the LM head, chunked, no [B, T, vocab] logits) equals
    cross-entropy on the model's logits: value and gradients, with ignored targets, in fp32 and bf16."""
    import torch.nn.functional as F

    from phi3.train.loop import lm_loss_sum

    model, _ = build_model(ModelSpec(preset="phi-3-mini-4k-instruct", overrides=dict(TINY)), seed=0)
    ids = torch.randint(0, 256, (3, 41), generator=torch.Generator().manual_seed(0))
    targets = ids[:, 1:].clone()
    targets[0, :7] = -100
    mb = {"input_ids": ids[:, :-1], "targets": targets}
    for dtype in (torch.float32, torch.bfloat16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            ref = F.cross_entropy(model(mb["input_ids"]).float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                                  reduction="sum")
        (ref * 0.3).backward()
        want = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            got = lm_loss_sum(model, mb)
        (got * 0.3).backward()
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert got.item() == pytest.approx(ref.item(), rel=tol)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[n], rtol=tol, atol=tol * want[n].abs().max().item(), msg=n)
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            assert lm_loss_sum(model, mb).item() == pytest.approx(ref.item(), rel=tol)
