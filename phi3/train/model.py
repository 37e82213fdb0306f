"""Building the model to train: a preset or config.json (fresh init), or a checkpoint (its weights),
optionally grown into a deeper / wider model (scale-up init, see scaleup.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ModelConfig, PRESETS_DIR, list_presets
from ..errors import ConfigError
from ..models.phi3 import Phi3ForCausalLM
from .config import ModelSpec
from .optim import init_weights


def _raw_config(spec: ModelSpec) -> tuple[dict, str]:
    if spec.preset is not None:
        path = PRESETS_DIR / f"{spec.preset}.json"
        if not path.exists():
            raise ConfigError(f"model.preset: unknown preset {spec.preset!r}; available: {', '.join(list_presets())}")
    else:
        path = Path(spec.config)
    try:
        return json.loads(path.read_text()), str(path)
    except FileNotFoundError:
        raise ConfigError(f"model.config: {path}: file not found") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.config: {path}: unreadable ({e})") from None


def model_config(spec: ModelSpec) -> ModelConfig:
    raw, source = _raw_config(spec)
    raw = {k: v for k, v in raw.items() if not k.startswith("_") and k != "auto_map"}
    raw.update(spec.overrides)
    return ModelConfig.from_hf_dict(raw, source=f"{source} + model.overrides")


def build_model(spec: ModelSpec, seed: int) -> tuple[Phi3ForCausalLM, str | None]:
    """(fp32 model, the checkpoint path it came from or None). Fresh weights depend only on `seed`."""
    if spec.init_from is None:
        cfg = model_config(spec)
        model = Phi3ForCausalLM(cfg)
        gen = torch.Generator().manual_seed(seed)
        init_weights(model, spec.init_std, spec.mup_base_width, cfg.hidden_size, generator=gen)
        return model, None
    if Path(spec.init_from).is_dir():  # an HF directory (a tokenizer is optional for training)
        from ..checkpoint import load_hf_checkpoint
        src = load_hf_checkpoint(spec.init_from, "float32")
    else:
        from ..api import load
        src = load(spec.init_from, "float32").model
    if spec.scale_up is None:
        if spec.overrides:
            raise ConfigError("model.overrides: cannot change the shape of a model loaded with init_from "
                              "(add model.scale_up to grow it)")
        return src, spec.init_from
    from .scaleup import scale_up

    raw = {k: v for k, v in src.config.raw.items() if not k.startswith("_") and k != "auto_map"}
    raw.update(src.config.to_hf_dict())
    raw.update(spec.overrides)
    cfg = ModelConfig.from_hf_dict(raw, source=f"{spec.init_from} + model.overrides")
    return scale_up(src, cfg, spec.scale_up.layer_map), spec.init_from


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks (for FSDP units and activation checkpointing); [] when there are none."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None) or getattr(model, "layers", None)
    return list(layers) if layers is not None else []
