"""Training checkpoints: model + optimizer + schedule position + data position + RNG, no pickle.

Layout: `RUN/checkpoints/step_00000120/` with
  model.safetensors      full (unsharded) model state, HF tensor names
  optimizer.safetensors  AdamW moments and step per parameter: `state/<param>/<key>`, plus `rng/*`
  state.json             step, param groups (hyper-parameters), file sizes and sha256, extra JSON state

A checkpoint is built in a temporary directory and renamed into place (atomic on POSIX), so a
failed or killed save leaves the previous checkpoints untouched; older ones beyond `keep` are
removed only after the new one is in place. Loading checks every file's size and sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

PREFIX = "step_"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flatten_optimizer_state(osd: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """{"state": {fqn: {k: tensor}}, "param_groups": [...]} -> flat tensors + JSON-able groups."""
    tensors = {}
    for fqn, st in osd["state"].items():
        for key, value in st.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state/{fqn}/{key}"] = t.detach().contiguous().cpu()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
    return tensors, groups


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[str, dict] = {}
    for name, t in tensors.items():
        if not name.startswith("state/"):
            continue
        fqn, key = name[len("state/"):].rsplit("/", 1)
        state.setdefault(fqn, {})[key] = t
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": groups}


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints (those renamed into place), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def save_checkpoint(ckpt_dir: Path, step: int, model_sd: dict[str, torch.Tensor], optim_sd: dict,
                    extra: dict, keep: int) -> Path:
    """Write checkpoint `step` atomically (tmp dir + rename), then drop all but the last `keep`."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"{PREFIX}{step:08d}"
    tmp = ckpt_dir / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        opt_tensors, groups = flatten_optimizer_state(optim_sd)
        opt_tensors["rng/torch_cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            opt_tensors["rng/torch_cuda"] = torch.cuda.get_rng_state()
        model_sd = {k: v.detach().contiguous().cpu() for k, v in model_sd.items()}
        save_file(model_sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"), metadata={"format": "pt"})
        files = {}
        for name in ("model.safetensors", "optimizer.safetensors"):
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
            files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
        state = {"step": step, "param_groups": groups, "files": files, **extra}
        with open(tmp / "state.json", "w") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. the final save): replace it
            old = ckpt_dir / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(state.json, model state dict, optimizer state dict) of a checkpoint, each file verified."""
    state_file = path / "state.json"
    try:
        state = json.loads(state_file.read_text())
        files = state["files"]
        int(state["step"])
    except FileNotFoundError:
        raise CheckpointError(f"{state_file}: missing (incomplete checkpoint)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{state_file}: corrupt checkpoint state ({e!r})") from None
    for name, meta in files.items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"{f}: missing from checkpoint")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"{f}: {size} bytes, expected {meta['bytes']} (truncated or corrupt checkpoint)")
        if _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{f}: sha256 mismatch (corrupt checkpoint); delete {path} to resume "
                                  "from the previous one")
    try:
        model_sd = load_file(str(path / "model.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint tensors ({e})") from None
    optim_sd = unflatten_optimizer_state(opt_tensors, state["param_groups"])
    optim_sd["rng"] = {k[len("rng/"):]: v for k, v in opt_tensors.items() if k.startswith("rng/")}
    return state, model_sd, optim_sd
