"""LoRA by module swap: y = base(x) + (alpha / r) * B(A(x)), base frozen; merged on export."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import Lora


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update. `base.weight` keeps its HF name under
    `<module>.base`; `merge_state_dict` folds A and B back into `<module>.weight`."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))  # zero: starts as the base model
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype) * self.scale


def apply_lora(model: nn.Module, cfg: Lora) -> list[str]:
    """Swap every nn.Linear whose attribute name is in cfg.targets; freeze everything else."""
    for p in model.parameters():
        p.requires_grad_(False)
    swapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in cfg.targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, cfg.rank, cfg.alpha))
                swapped.append(f"{name}.{child_name}" if name else child_name)
    if not swapped:
        raise ValueError(f"lora.targets {cfg.targets} matched no linear layer")
    return swapped


def merge_state_dict(sd: dict[str, torch.Tensor], cfg: Lora) -> dict[str, torch.Tensor]:
    """Fold `X.lora_A`, `X.lora_B` into `X.weight` (from `X.base.weight`): a plain HF state dict."""
    out = {}
    for name, t in sd.items():
        if name.endswith(".lora_A") or name.endswith(".lora_B"):
            continue
        if name.endswith(".base.weight"):
            stem = name[: -len(".base.weight")]
            a, b = sd[f"{stem}.lora_A"].float(), sd[f"{stem}.lora_B"].float()
            out[f"{stem}.weight"] = (t.float() + (b @ a) * (cfg.alpha / cfg.rank)).to(t.dtype)
        else:
            out[name] = t
    return out
