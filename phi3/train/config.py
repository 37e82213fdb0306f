"""Training configs: YAML -> nested dataclasses, checked before any work starts.

An unknown key, a missing required key, a wrong type or an out-of-range value is a `ConfigError`
naming the file and the dotted field (`phases[1].schedule.kind`). One `TrainConfig` serves
pretraining, SFT and DPO; each verb checks the sections it needs (`phases`, `sft`, `dpo`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError


@dataclass
class ModelSpec:
    preset: str | None = None  # a name from phi3/presets
    config: str | None = None  # or an HF config.json
    init_from: str | None = None  # or an HF checkpoint directory / .gguf to start from (weights too)
    overrides: dict[str, Any] = field(default_factory=dict)  # config.json keys on top (sizes of a tiny model)
    init_std: float = 0.02
    mup_base_width: int | None = None  # muP-style init and per-layer LR when set (see optim.py)
    scale_up: ScaleUp | None = None  # grow `init_from` into the configured (deeper/wider) model


@dataclass
class ScaleUp:
    layer_map: list[int] | None = None  # new layer i <- old layer layer_map[i]; default: spread evenly


@dataclass
class Optimizer:
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0


@dataclass
class Schedule:
    kind: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # WSD: the last fraction of the phase decays


@dataclass
class Phase:
    name: str
    tokens: int  # token budget: steps = ceil(tokens / (global batch * seq_len))
    mixture: dict[str, float]  # source name -> weight
    lr: float | None = None  # peak LR (default: optimizer.lr)
    schedule: Schedule = field(default_factory=Schedule)


@dataclass
class Distributed:
    strategy: Literal["ddp", "fsdp"] = "ddp"
    backend: Literal["auto", "gloo", "nccl"] = "auto"


@dataclass
class Checkpointing:
    every: int = 100  # steps
    keep: int = 3  # keep the last N


@dataclass
class Eval:
    every: int = 100
    batches: int = 4
    source: str | None = None  # pretraining: a source name (held-out shards)


@dataclass
class Lora:
    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])


@dataclass
class SFT:
    data: str  # chat JSONL: {"messages": [{"role", "content"}, ...]}
    steps: int
    eval_fraction: float = 0.1
    pack: bool = True
    lr: float | None = None
    schedule: Schedule = field(default_factory=Schedule)
    lora: Lora | None = None


@dataclass
class DPO:
    data: str  # JSONL: {"prompt", "chosen", "rejected"}; prompt is a string (user turn) or a message list
    steps: int
    beta: float = 0.1
    reference: Literal["frozen", "precomputed"] = "precomputed"
    eval_fraction: float = 0.1
    lr: float | None = None
    schedule: Schedule = field(default_factory=Schedule)


@dataclass
class TrainConfig:
    run_dir: str
    model: ModelSpec
    seq_len: int = 256
    micro_batch_size: int = 8  # rows per rank per micro-step
    grad_accum: int = 1  # global batch = micro_batch_size * grad_accum * world_size
    seed: int = 0
    tokenizer: str | None = None  # HF dir / .gguf (default: the model's, else the default model's)
    sources: dict[str, str] = field(default_factory=dict)  # name -> token shard directory
    phases: list[Phase] = field(default_factory=list)
    optimizer: Optimizer = field(default_factory=Optimizer)
    precision: Literal["fp32", "bf16"] = "fp32"
    activation_checkpointing: bool = False
    compile: bool = False
    distributed: Distributed = field(default_factory=Distributed)
    checkpoint: Checkpointing = field(default_factory=Checkpointing)
    eval: Eval | None = None
    log_every: int = 1
    export: str | None = None  # HF directory written at the end (default: RUN_DIR/hf)
    peak_flops: float | None = None  # for MFU; default: measured matmul peak at start
    sft: SFT | None = None
    dpo: DPO | None = None


# ---- generic checking ---------------------------------------------------------------------------
def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, typing.get_args(tp)))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (arg,) = typing.get_args(tp)
        return [_convert(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp)
        return {_convert(k, kt, f"{where} key"): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (isinstance(value, bool) and tp is not bool):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls, data: Any, where: str):
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types (named by path)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{where}.{name}"
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key {name!r}")
    return cls(**kwargs)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: TrainConfig, where: str) -> TrainConfig:
    """Ranges and cross-references that types alone do not catch."""
    for name in ("seq_len", "micro_batch_size", "grad_accum", "log_every"):
        _check(getattr(cfg, name) > 0, f"{where}.{name}: must be positive, got {getattr(cfg, name)}")
    m = cfg.model
    _check(sum(x is not None for x in (m.preset, m.config, m.init_from)) == 1,
           f"{where}.model: give exactly one of preset, config, init_from")
    _check(m.scale_up is None or m.init_from is not None, f"{where}.model.scale_up: needs model.init_from")
    _check(cfg.optimizer.lr > 0, f"{where}.optimizer.lr: must be positive, got {cfg.optimizer.lr}")
    _check(len(cfg.optimizer.betas) == 2, f"{where}.optimizer.betas: expected two numbers")
    _check(cfg.checkpoint.every > 0 and cfg.checkpoint.keep > 0, f"{where}.checkpoint: every and keep must be positive")
    for i, ph in enumerate(cfg.phases):
        at = f"{where}.phases[{i}]"
        _check(ph.tokens > 0, f"{at}.tokens: must be positive, got {ph.tokens}")
        _check(bool(ph.mixture), f"{at}.mixture: empty")
        for src, w in ph.mixture.items():
            _check(src in cfg.sources, f"{at}.mixture: unknown source {src!r} (sources: {', '.join(cfg.sources)})")
            _check(w >= 0, f"{at}.mixture.{src}: weight must be >= 0, got {w}")
        _check(sum(ph.mixture.values()) > 0, f"{at}.mixture: weights sum to 0")
        _check(ph.schedule.warmup_steps >= 0, f"{at}.schedule.warmup_steps: must be >= 0")
    if cfg.eval is not None and cfg.eval.source is not None:
        _check(cfg.eval.source in cfg.sources, f"{where}.eval.source: unknown source {cfg.eval.source!r}")
    if cfg.sft is not None:
        _check(cfg.sft.steps > 0, f"{where}.sft.steps: must be positive")
        _check(0 <= cfg.sft.eval_fraction < 1, f"{where}.sft.eval_fraction: must be in [0, 1)")
    if cfg.dpo is not None:
        _check(cfg.dpo.steps > 0, f"{where}.dpo.steps: must be positive")
        _check(cfg.dpo.beta > 0, f"{where}.dpo.beta: must be positive")
        _check(0 <= cfg.dpo.eval_fraction < 1, f"{where}.dpo.eval_fraction: must be in [0, 1)")
    return cfg


def parse_config(data: Any, source: str = "config") -> TrainConfig:
    return validate(from_dict(TrainConfig, data, source), source)


def load_config(path: str | Path) -> TrainConfig:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: unreadable YAML ({str(e).splitlines()[0]})") from None
    return parse_config(data, str(path))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
