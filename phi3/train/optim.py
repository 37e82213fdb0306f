"""AdamW parameter groups, learning-rate schedules and muP-style init: small pure functions."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import Optimizer, Schedule


def no_decay(name: str, p: torch.Tensor) -> bool:
    """Norms, biases (1-D) and embeddings get no weight decay."""
    return p.ndim < 2 or "embed_tokens" in name or name.endswith(".bias")


def param_groups(model: nn.Module, opt: Optimizer, mup_base_width: int | None = None,
                 width: int | None = None) -> list[dict]:
    """Decoupled weight decay on matrices only. With muP (Adam), hidden matrices' LR scales
    by base_width / width; the embedding, the head and vectors keep the base LR."""
    groups: dict[tuple[float, float], dict] = {}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        wd = 0.0 if no_decay(name, p) else opt.weight_decay
        lr_scale = 1.0
        if mup_base_width and width and p.ndim >= 2 and "embed_tokens" not in name and "lm_head" not in name:
            lr_scale = mup_base_width / width
        g = groups.setdefault((wd, lr_scale), {"params": [], "names": [], "weight_decay": wd, "lr_scale": lr_scale})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, opt: Optimizer, mup_base_width=None, width=None) -> torch.optim.AdamW:
    groups = param_groups(model, opt, mup_base_width, width)
    for g in groups:
        g.pop("names")
    # fused: one pass over each tensor (param, grad, both moments) instead of foreach's ~10 passes;
    # DTensor parameters (FSDP2) keep the foreach implementation
    dtensor = any(type(p).__name__ == "DTensor" for g in groups for p in g["params"])
    kind = {"foreach": True} if dtensor else {"fused": True}
    return torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, **kind)


def lr_at(step: int, total: int, peak: float, s: Schedule) -> float:
    """LR at `step` (0-based) of a phase of `total` steps: linear warmup, then the decay."""
    if s.warmup_steps and step < s.warmup_steps:
        return peak * (step + 1) / s.warmup_steps
    floor = peak * s.min_lr_ratio
    if s.kind == "constant":
        return peak
    if s.kind == "wsd":  # warmup, stable, then linear decay over the last decay_fraction
        decay_steps = max(1, round(total * s.decay_fraction))
        start = total - decay_steps
        if step < start:
            return peak
        return peak - (peak - floor) * (step - start + 1) / decay_steps
    span = max(1, total - s.warmup_steps)
    frac = min(1.0, (step - s.warmup_steps + 1) / span)
    if s.kind == "linear":
        return peak - (peak - floor) * frac
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * frac))  # cosine


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


@torch.no_grad()
def init_weights(model: nn.Module, std: float, mup_base_width: int | None = None, width: int | None = None,
                 generator: torch.Generator | None = None) -> None:
    """Normal(0, std) matrices and embeddings, ones for norms. muP-style (when asked): hidden
    matrices get std * sqrt(base/width), the output head std * base/width."""
    mult = (mup_base_width / width) if mup_base_width and width else 1.0
    for name, p in model.named_parameters():
        if p.ndim < 2:
            p.fill_(1.0) if "norm" in name else p.zero_()
        elif "embed_tokens" in name:
            p.normal_(0.0, std, generator=generator)
        elif "lm_head" in name:
            p.normal_(0.0, std * mult, generator=generator)
        else:
            p.normal_(0.0, std * math.sqrt(mult), generator=generator)
