"""Model configuration: read a raw HF `config.json`, ignore what we do not use, validate the rest.

One dataclass covers the dense Phi-3 family (mini, medium, 3.5-mini, 4-mini) and Llama-layout
checkpoints, which are the same decoder with unfused projections (`layout == "llama"`).
Released configs live as data in `phi3/presets/*.json`; `load_preset(name)` reads one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

PRESETS_DIR = Path(__file__).parent / "presets"

# model_type -> checkpoint layout. "phi3": fused qkv_proj / gate_up_proj; "llama": separate q/k/v, gate/up.
LAYOUTS = {"phi3": "phi3", "llama": "llama", "mistral": "llama"}


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    original_max_position_embeddings: int
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    rope_scaling: dict | None = None  # normalised: {"type": "longrope", short_factor, long_factor, factor?, attention_factor?}
    sliding_window: int | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    hidden_act: str = "silu"
    model_type: str = "phi3"
    torch_dtype: str | None = None
    raw: dict = field(default_factory=dict, repr=False)  # the config.json as read, written back on export

    # ---- derived -------------------------------------------------------------------------
    @property
    def layout(self) -> str:
        return LAYOUTS[self.model_type]

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def is_longrope(self) -> bool:
        return self.rope_scaling is not None and self.rope_scaling["type"] == "longrope"

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)

    def num_parameters(self) -> int:
        d, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        qkv = (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim * d
        o = self.num_attention_heads * self.head_dim * d
        per_layer = qkv + o + 3 * d * i + 2 * d
        return v * d * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * per_layer + d

    # ---- HF config.json in / out ----------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, cfg: dict, source: str = "config.json") -> "ModelConfig":
        """Build from a raw HF config dict; unknown keys are kept in `raw` and otherwise ignored."""
        if not isinstance(cfg, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
        model_type = cfg.get("model_type")
        if model_type not in LAYOUTS:
            raise ConfigError(
                f"{source}: unsupported model_type {model_type!r} "
                f"(this loader handles {sorted(LAYOUTS) + ['phi3small', 'phimoe']}; architectures={cfg.get('architectures')})"
            )

        def get(key, typ, default=..., positive=False):
            value = cfg.get(key, default)
            if value is ...:
                raise ConfigError(f"{source}: missing required field {key!r}")
            if value is None and default is None:
                return None
            if typ is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, typ) or isinstance(value, bool) and typ is not bool:
                raise ConfigError(f"{source}: field {key!r} must be {typ.__name__}, got {value!r}")
            if positive and value <= 0:
                raise ConfigError(f"{source}: field {key!r} must be positive, got {value!r}")
            return value

        hidden = get("hidden_size", int, positive=True)
        heads = get("num_attention_heads", int, positive=True)
        kv_heads = get("num_key_value_heads", int, heads, positive=True)
        head_dim = get("head_dim", int, None) or hidden // heads
        if heads % kv_heads:
            raise ConfigError(f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        max_pos = get("max_position_embeddings", int, 4096, positive=True)
        rope_params = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
        rope_theta = get("rope_theta", float, rope_params.get("rope_theta", 10000.0))
        partial = get("partial_rotary_factor", float, rope_params.get("partial_rotary_factor", 1.0))
        scaling_raw = cfg.get("rope_scaling")
        if scaling_raw is None and rope_params.get("rope_type", "default") != "default":
            scaling_raw = rope_params
        original = cfg.get("original_max_position_embeddings")
        if original is None and isinstance(scaling_raw, dict):
            original = scaling_raw.get("original_max_position_embeddings")
        original = int(original) if original else max_pos

        self = cls(
            vocab_size=get("vocab_size", int, positive=True),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size", int, positive=True),
            num_hidden_layers=get("num_hidden_layers", int, positive=True),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=max_pos,
            original_max_position_embeddings=original,
            rope_theta=rope_theta,
            partial_rotary_factor=partial,
            sliding_window=get("sliding_window", int, None),
            rms_norm_eps=get("rms_norm_eps", float, 1e-5, positive=True),
            tie_word_embeddings=get("tie_word_embeddings", bool, False),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
            hidden_act=get("hidden_act", str, "silu"),
            model_type=model_type,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            raw=dict(cfg),
        )
        if self.hidden_act != "silu":
            raise ConfigError(f"{source}: hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ConfigError(f"{source}: attention_bias/mlp_bias=true is not supported for model_type {model_type!r}")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= head_dim:
            raise ConfigError(f"{source}: partial_rotary_factor={partial} gives an invalid rotary dim {self.rotary_dim}")
        self.rope_scaling = _normalise_rope_scaling(scaling_raw, self, source)
        return self

    def to_hf_dict(self) -> dict:
        """The config.json to write: the original keys, with our values on top (for the checkpoint's layout)."""
        out = {k: v for k, v in self.raw.items() if k not in ("_name_or_path", "auto_map", "rope_parameters", "dtype")}
        out.update(
            architectures=["Phi3ForCausalLM" if self.layout == "phi3" else "LlamaForCausalLM"],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings,
            rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act=self.hidden_act,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        if self.head_dim != self.hidden_size // self.num_attention_heads or "head_dim" in self.raw:
            out["head_dim"] = self.head_dim
        if self.torch_dtype:
            out["torch_dtype"] = self.torch_dtype
        if self.layout == "phi3":
            out["original_max_position_embeddings"] = self.original_max_position_embeddings
            out["sliding_window"] = self.sliding_window
            if self.partial_rotary_factor != 1.0:
                out["partial_rotary_factor"] = self.partial_rotary_factor
        else:
            out.setdefault("attention_bias", False)
            out.setdefault("mlp_bias", False)
        if self.rope_scaling is not None:
            rs = {"type": "longrope", "short_factor": list(self.rope_scaling["short_factor"]),
                  "long_factor": list(self.rope_scaling["long_factor"])}
            for key in ("factor", "attention_factor"):
                if self.rope_scaling.get(key) is not None:
                    rs[key] = self.rope_scaling[key]
            out["rope_scaling"] = rs
        else:
            out["rope_scaling"] = None
        return out


def _normalise_rope_scaling(raw: Any, cfg: ModelConfig, source: str) -> dict | None:
    """Legacy "su"/"yarn" (Phi-3) mean LongRoPE, as in HF's Phi3Config; check the factor lengths."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: rope_scaling must be an object or null, got {raw!r}")
    kind = raw.get("type", raw.get("rope_type"))
    if kind == "default":
        return None
    if kind in ("su", "longrope") or (kind == "yarn" and cfg.model_type == "phi3"):
        expected = cfg.rotary_dim // 2
        out = {"type": "longrope"}
        for key in ("short_factor", "long_factor"):
            values = raw.get(key)
            if not isinstance(values, list) or len(values) != expected:
                got = len(values) if isinstance(values, list) else values
                raise ConfigError(f"{source}: rope_scaling.{key} must be a list of {expected} numbers "
                                  f"(rotary_dim/2), got {got}")
            out[key] = [float(v) for v in values]
        for key in ("factor", "attention_factor"):
            if raw.get(key) is not None:
                out[key] = float(raw[key])
        return out
    raise ConfigError(f"{source}: rope_scaling type {kind!r} is not supported (supported: longrope/su)")


def longrope_attention_factor(cfg: ModelConfig) -> float:
    """mscale: rope_scaling.attention_factor, else sqrt(1 + ln(s)/ln(L0)) with s = factor or Lmax/L0 (spec §1.4)."""
    rs = cfg.rope_scaling or {}
    if rs.get("attention_factor") is not None:
        return rs["attention_factor"]
    l0 = cfg.original_max_position_embeddings
    scale = rs.get("factor") or cfg.max_position_embeddings / l0
    return 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(l0))


def read_config_file(path: str | Path) -> ModelConfig:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable config ({e})") from None
    return config_from_hf_dict(raw, source=str(path))


def config_from_hf_dict(raw: Any, source: str = "config.json") -> ModelConfig:
    """The config class of the checkpoint's family, chosen by `model_type` (dense Phi-3/Llama by default)."""
    kind = raw.get("model_type") if isinstance(raw, dict) else None
    if kind == "phi3small":
        from .models.phi3small import Phi3SmallConfig
        return Phi3SmallConfig.from_hf_dict(raw, source)
    if kind == "phimoe":
        from .models.phimoe import PhiMoEConfig
        return PhiMoEConfig.from_hf_dict(raw, source)
    return ModelConfig.from_hf_dict(raw, source)


def base_fields(raw: dict, source: str) -> dict:
    """The shared ModelConfig fields parsed (and validated) from a raw dict, for the family configs."""
    base = ModelConfig.from_hf_dict(raw, source)
    return {f.name: getattr(base, f.name) for f in fields(ModelConfig)}


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def load_preset(name: str) -> ModelConfig:
    """A released config by name (e.g. "phi-3-mini-128k-instruct"); see `list_presets()`."""
    path = PRESETS_DIR / f"{name}.json"
    if not path.exists():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    return read_config_file(path)
