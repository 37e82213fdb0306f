"""The one training loop behind `phi3 train pretrain | sft | dpo`: one process or a torchrun cluster.

A *task* supplies what differs between the three: the steps, the LR at each step, this rank's
micro-batches for a step, and the loss (a sum, plus the count it is a sum over). The loop does
the rest the same way every time:

- the loss of a step is sum / (count over all ranks and micro-batches), so one process with
  `grad_accum = k` and k ranks with `grad_accum = 1` compute the same gradient (DDP and FSDP2
  average gradients over ranks, which the `world` factor undoes);
- batches are a pure function of (seed, step, rank): resuming needs only the step;
- checkpoints hold the full model + AdamW state + RNG and are written atomically (state.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..atomic import atomic_write_text
from ..errors import CheckpointError, ConfigError, Phi3Error
from .config import TrainConfig, to_dict
from .model import build_model, decoder_layers
from .optim import build_optimizer, set_lr
from .state import list_checkpoints, load_checkpoint, save_checkpoint


# ---- distributed --------------------------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def setup_distributed(backend: str = "auto") -> DistInfo:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: gloo on CPU, NCCL on GPUs."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(device=torch.device("cuda" if cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise ConfigError("distributed.backend: nccl needs GPUs; use gloo (or auto) on CPU")
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, device)


def all_reduce_sum(t: torch.Tensor, d: DistInfo) -> torch.Tensor:
    if d.enabled and d.world > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def barrier(d: DistInfo) -> None:
    if d.enabled and d.world > 1:
        dist.barrier()


# ---- losses shared by the tasks -----------------------------------------------------------------
def model_kwargs(mb: dict) -> dict:
    kw = {}
    if "positions" in mb:
        kw["positions"] = mb["positions"]
    if "segment_ids" in mb:
        kw["segment_ids"] = mb["segment_ids"]
    return kw


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module under torch.compile's and DDP's wrappers (FSDP2 keeps the class)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def lm_loss_sum(model, mb: dict) -> torch.Tensor:
    """Summed next-token cross-entropy over targets != -100: inside the model's forward (fused with
    the LM head, no [B, T, vocab] logits) when it supports `targets=`, else from its logits."""
    if getattr(_unwrapped(model), "fused_loss", False):
        return model(mb["input_ids"], targets=mb["targets"], **model_kwargs(mb))
    logits = model(mb["input_ids"], **model_kwargs(mb))
    return F.cross_entropy(logits.float().flatten(0, 1), mb["targets"].flatten(), ignore_index=-100, reduction="sum")


# ---- wrapping -----------------------------------------------------------------------------------
def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward pass (the layer's forward is wrapped in place,
    so parameter names and the state dict do not change)."""
    from torch.utils.checkpoint import checkpoint

    for layer in decoder_layers(model):
        inner = layer.forward
        layer.forward = lambda *a, _f=inner, **k: checkpoint(_f, *a, use_reentrant=False, **k)


def wrap_distributed(model: nn.Module, strategy: str, d: DistInfo) -> nn.Module:
    if not d.enabled or d.world == 1:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(d.device.type, (d.world,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _sync_context(wrapped: nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if hasattr(wrapped, "no_sync") and not sync:
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def grad_norm_and_clip(params: list[torch.Tensor], max_norm: float | None) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


# ---- state dicts (full, on CPU; collective under FSDP2) ------------------------------------------
def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optim_state(model: nn.Module, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def restore(model: nn.Module, optimizer, model_sd: dict, optim_sd: dict, path: Path) -> None:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True)
    expected = set(full_model_state(model))
    if set(model_sd) != expected:
        diff = sorted(set(model_sd) ^ expected)
        raise CheckpointError(f"{path}: model tensors do not match the configured model (e.g. {diff[0]})")
    try:
        set_model_state_dict(model, model_sd, options=opts)
        rng = optim_sd.pop("rng", {})
        set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: does not fit the configured model/optimizer ({str(e).splitlines()[0]})") from None
    if "torch_cpu" in rng:
        torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])


# ---- throughput -----------------------------------------------------------------------------------
def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024, reps: int = 8) -> float:
    """Best-of matmul FLOP/s on this device: the denominator of MFU."""
    gen = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG (checkpointed) alone
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token, PaLM's count: 6 x (matmul parameters) + 12 x layers x d_attn x T."""
    n = sum(p.numel() for name, p in model.named_parameters() if p.ndim >= 2 and "embed_tokens" not in name)
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
        n += cfg.vocab_size * cfg.hidden_size  # the tied head is a matmul
    attn = 0
    if cfg is not None:
        attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
    return 6 * n + attn


# ---- the loop -----------------------------------------------------------------------------------
def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past the resumed step (a killed run may have logged beyond its checkpoint)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def train(cfg: TrainConfig, make_task, resume: bool = False, progress: bool = True) -> Path:
    """Run (or resume) a training job; returns the run directory."""
    from tqdm import tqdm

    d = setup_distributed(cfg.distributed.backend)
    try:
        return _train(cfg, make_task, resume, progress, d, tqdm)
    finally:
        if d.enabled:
            dist.destroy_process_group()


def _train(cfg, make_task, resume, progress, d: DistInfo, tqdm) -> Path:
    torch.manual_seed(cfg.seed)
    run = Path(cfg.run_dir)
    ckpt_dir = run / "checkpoints"
    metrics_file = run / "metrics.jsonl"
    existing = list_checkpoints(ckpt_dir)
    if existing and not resume:
        raise Phi3Error(f"{run}: already has checkpoints ({existing[-1].name}); pass --resume to continue it, "
                        "or choose another run_dir")
    if d.rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run / "config.json", json.dumps(to_dict(cfg), indent=1) + "\n")
    model, _ = build_model(cfg.model, cfg.seed)
    task = make_task(cfg, model, d)  # may swap modules (LoRA) and freeze parameters
    model.to(d.device)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    wrapped = wrap_distributed(model, cfg.distributed.strategy, d)
    width = getattr(getattr(model, "config", None), "hidden_size", None)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.model.mup_base_width, width)
    params = [p for p in model.parameters() if p.requires_grad]
    global_batch = cfg.micro_batch_size * cfg.grad_accum * d.world

    start = 0
    if resume and existing:
        state, model_sd, optim_sd = load_checkpoint(existing[-1])
        if state.get("global_batch") != global_batch:
            raise ConfigError(f"--resume: {existing[-1]} was trained with a global batch of {state.get('global_batch')}"
                              f" rows, this launch has {global_batch} (micro_batch_size x grad_accum x world size)")
        restore(model, optimizer, model_sd, optim_sd, existing[-1])
        start = int(state["step"])
        if d.rank == 0:
            _truncate_metrics(metrics_file, start)
    elif d.rank == 0 and metrics_file.exists():
        metrics_file.unlink()
    barrier(d)

    fwd = torch.compile(wrapped) if cfg.compile else wrapped
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    peak = cfg.peak_flops or measure_peak_flops(d.device, torch.bfloat16 if cfg.precision == "bf16" else torch.float32)
    fpt = flops_per_token(model, cfg.seq_len)
    total = task.total_steps
    bar = tqdm(total=total, initial=start, desc=f"{task.name}", unit="step", disable=not progress or d.rank != 0,
               dynamic_ncols=True)
    log = open(metrics_file, "a") if d.rank == 0 else None
    try:
        for step in range(start, total):
            t0 = time.perf_counter()
            wrapped.train()
            lr = task.lr(step)
            set_lr(optimizer, lr)
            mbs = task.micro_batches(step)
            local = torch.tensor([sum(task.count(mb) for mb in mbs), sum(mb["input_ids"].numel() for mb in mbs)],
                                 dtype=torch.float64, device=d.device)
            count, tokens = all_reduce_sum(local, d).tolist()
            if count == 0:
                raise Phi3Error(f"step {step + 1}: no tokens to train on in this batch (all targets masked)")
            sums: dict[str, float] = {}
            for i, mb in enumerate(mbs):
                with _sync_context(wrapped, i == len(mbs) - 1), autocast:
                    loss_sum, extra = task.loss(fwd, mb)
                (loss_sum * (d.world / count)).backward()
                for k, v in {"loss": loss_sum, **extra}.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
            gnorm = grad_norm_and_clip(params, cfg.optimizer.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            keys = sorted(sums)
            reduced = all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=d.device), d)
            if d.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            record = {"step": step + 1, "phase": task.phase(step), **{k: v / count for k, v in zip(keys, reduced.tolist())},
                      "lr": lr, "grad_norm": gnorm, "tokens": int(tokens), "tokens_per_s": tokens / dt,
                      "mfu": fpt * tokens / dt / (peak * d.world), "time_s": dt}
            if (cfg.eval is not None and (step + 1) % cfg.eval.every == 0) or step + 1 == total:
                wrapped.eval()
                with torch.no_grad(), autocast:
                    record.update(task.evaluate(fwd))
            if log is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == total or "eval_loss" in record):
                log.write(json.dumps(record) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update()
            if (step + 1) % cfg.checkpoint.every == 0 or step + 1 == total:
                _save(cfg, model, optimizer, ckpt_dir, step + 1, task, d, global_batch)
    finally:
        bar.close()
        if log is not None:
            log.close()
    _export(cfg, model, task, d)
    return run


def _save(cfg, model, optimizer, ckpt_dir, step, task, d, global_batch) -> None:
    model_sd = full_model_state(model)
    optim_sd = full_optim_state(model, optimizer)
    if d.rank == 0:
        extra = {"phase": task.phase(step - 1), "data_position": {"step": step}, "global_batch": global_batch,
                 "world_size": d.world, "task": task.name}
        save_checkpoint(ckpt_dir, step, model_sd, optim_sd, extra, cfg.checkpoint.keep)
    barrier(d)


def _export(cfg, model, task, d) -> None:
    from ..checkpoint import build_model as assemble, save_hf_checkpoint

    sd = full_model_state(model)
    if d.rank == 0 and hasattr(model, "config"):
        sd = task.export_state_dict(sd) if hasattr(task, "export_state_dict") else sd
        out = Path(cfg.export) if cfg.export else Path(cfg.run_dir) / "hf"
        final = assemble(model.config, {k: v.float() for k, v in sd.items()}, torch.float32, source="trained model")
        save_hf_checkpoint(final, out, tokenizer=getattr(task, "tokenizer", None))
    barrier(d)


def steps_for_tokens(tokens: int, global_batch: int, seq_len: int) -> int:
    return max(1, math.ceil(tokens / (global_batch * seq_len)))
