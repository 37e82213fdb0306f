"""Pretraining: config validation, distributed parity, exact resume after SIGKILL, checkpoint safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from phi3.cli import main
from phi3.errors import CheckpointError, ConfigError
from phi3.train.config import load_config
from phi3.train.loop import train
from phi3.train.pretrain import PretrainTask
from phi3.train.state import list_checkpoints, load_checkpoint

from .helpers import read_metrics, tiny_config, write_config

ROOT = Path(__file__).resolve().parents[2]


def _env(threads: int = 1) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _run(args: list[str], cwd: Path, nproc: int = 1, **kw) -> subprocess.CompletedProcess:
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + os.getpid() % 1000), "-m", "phi3.cli", *args]
    else:
        cmd = [sys.executable, "-m", "phi3.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600, **kw)


# ---- config validation ---------------------------------------------------------------------------
@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.update(learning_rate=1.0), "unknown key 'learning_rate'"),
    (lambda c: c["optimizer"].update(lr="fast"), "optimizer.lr: expected float, got 'fast'"),
    (lambda c: c.update(seq_len="32"), "seq_len: expected int, got '32'"),
    (lambda c: c["phases"][1]["schedule"].update(kind="exp"), "phases[1].schedule.kind: 'exp' is not one of"),
    (lambda c: c["phases"][0].update(mixture={"nope": 1.0}), "phases[0].mixture: unknown source 'nope'"),
    (lambda c: c["phases"][0].pop("tokens"), "phases[0]: missing required key 'tokens'"),
    (lambda c: c["distributed"].update(strategy="zero3") if "distributed" in c else c.update(
        distributed={"strategy": "zero3"}), "distributed.strategy: 'zero3' is not one of"),
    (lambda c: c.update(micro_batch_size=0), "micro_batch_size: must be positive"),
])
def test_bad_config_is_one_clear_error(tmp_path, capsys, mutate, message):
    cfg = tiny_config(tmp_path)
    mutate(cfg)
    path = write_config(tmp_path, cfg)
    with pytest.raises(ConfigError, match=r".*" + message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        load_config(path)
    assert main(["train", "pretrain", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}") and "Traceback" not in err[0]
    assert not (tmp_path / "run").exists()  # validated before any work


def test_missing_shard_is_a_clear_error(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    (Path(cfg["sources"]["a"]) / "00001.bin").unlink()
    assert main(["train", "pretrain", str(write_config(tmp_path, cfg)), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "00001.bin is missing" in err and "Traceback" not in err


# ---- the loop ----------------------------------------------------------------------------------
def test_phases_schedule_and_metrics(tmp_path):
    cfg = load_config(write_config(tmp_path, tiny_config(tmp_path)))
    run = train(cfg, PretrainTask, progress=False)
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["phase"] for r in rows] == ["web"] * 6 + ["filtered"] * 6
    # warmup 2 steps to 2e-3, cosine to 0.1 x peak; phase 2: WSD at 1e-3, decaying over its last 3 steps
    assert rows[0]["lr"] == pytest.approx(1e-3) and rows[1]["lr"] == pytest.approx(2e-3)
    assert rows[5]["lr"] == pytest.approx(2e-4)
    assert [r["lr"] for r in rows[6:]] == pytest.approx([1e-3, 1e-3, 1e-3, 7e-4, 4e-4, 1e-4])
    assert all(r["tokens"] == 8 * 32 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["grad_norm"] > 0
               for r in rows)
    assert "eval_loss" in rows[5] and "eval_loss" in rows[11]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000008", "step_00000012"]
    # the exported HF directory loads in transformers and gives our logits
    import transformers
    from phi3.checkpoint import load_hf_checkpoint
    ours = load_hf_checkpoint(run / "hf")
    ref = transformers.AutoModelForCausalLM.from_pretrained(run / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_weight_decay_groups():
    from phi3.models.phi3 import Phi3ForCausalLM
    from phi3.train.config import Optimizer
    from phi3.train.model import model_config
    from phi3.train.config import ModelSpec
    from phi3.train.optim import param_groups
    from .helpers import TINY

    model = Phi3ForCausalLM(model_config(ModelSpec(preset="phi-3-mini-4k-instruct", overrides=dict(TINY))))
    groups = {g["weight_decay"]: g["names"] for g in param_groups(model, Optimizer(weight_decay=0.1))}
    assert set(groups[0.0]) == {n for n, p in model.named_parameters() if p.ndim == 1} | {"model.embed_tokens.weight"}
    assert "lm_head.weight" in groups[0.1] and "model.layers.0.self_attn.qkv_proj.weight" in groups[0.1]


def _parity_config(tmp: Path) -> dict:
    cfg = tiny_config(tmp)
    for ph in cfg["phases"]:
        ph["tokens"] = 32 * 8 * 10
    return cfg


@pytest.fixture(scope="module")
def single_process_curve(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    run = train(load_config(write_config(tmp, _parity_config(tmp))), PretrainTask, progress=False)
    return read_metrics(run), load_file(run / "hf" / "model.safetensors")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_rank_torchrun_matches_one_process(tmp_path, strategy, single_process_curve):
    """Same global batch (1 x 4 x 2 accumulation == 2 ranks x 4): same loss curve to 1e-4 at step 20."""
    ref, b = single_process_curve
    single = _parity_config(tmp_path)
    (tmp_path / "multi").mkdir()
    multi = dict(single, run_dir=str(tmp_path / "multi" / "run"), grad_accum=1,
                 distributed={"strategy": strategy, "backend": "gloo"})
    result = _run(["train", "pretrain", str(write_config(tmp_path / "multi", multi)), "--no-progress"],
                  cwd=tmp_path, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    got = read_metrics(tmp_path / "multi" / "run")
    assert len(got) == len(ref) == 20
    rel = abs(got[19]["loss"] - ref[19]["loss"]) / ref[19]["loss"]
    assert rel <= 1e-4, (got[19]["loss"], ref[19]["loss"])
    assert ref[19]["loss"] < ref[0]["loss"] - 0.2  # the curve moved: the comparison is not of two flat lines
    a = load_file(tmp_path / "multi" / "run" / "hf" / "model.safetensors")
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


def test_sigkill_then_resume_is_bit_exact(tmp_path):
    cfg = tiny_config(tmp_path, checkpoint={"every": 3, "keep": 2})
    for ph in cfg["phases"]:
        ph["tokens"] = 32 * 8 * 15
    for name in ("full", "killed"):
        (tmp_path / name).mkdir()
        write_config(tmp_path / name, dict(cfg, run_dir=str(tmp_path / name / "run")))
    full = _run(["train", "pretrain", "train.yaml", "--no-progress"], cwd=tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]

    cmd = [sys.executable, "-m", "phi3.cli", "train", "pretrain", "train.yaml", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=tmp_path / "killed", env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    target = tmp_path / "killed" / "run" / "checkpoints" / "step_00000006"
    deadline = time.time() + 300
    while not target.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    done = [p.name for p in list_checkpoints(tmp_path / "killed" / "run" / "checkpoints")]
    assert "step_00000030" not in done and not (tmp_path / "killed" / "run" / "hf").exists()

    resumed = _run(["train", "pretrain", "train.yaml", "--no-progress", "--resume"], cwd=tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(tmp_path / "full" / "run" / "hf" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "run" / "hf" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    oa = load_file(tmp_path / "full" / "run" / "checkpoints" / "step_00000030" / "optimizer.safetensors")
    ob = load_file(tmp_path / "killed" / "run" / "checkpoints" / "step_00000030" / "optimizer.safetensors")
    assert all(torch.equal(oa[k], ob[k]) for k in oa)
    la, lb = read_metrics(tmp_path / "full" / "run"), read_metrics(tmp_path / "killed" / "run")
    assert [r["step"] for r in lb] == list(range(1, 31))
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import phi3.train.state as state

    cfg = load_config(write_config(tmp_path, tiny_config(tmp_path)))
    real = state.save_file
    calls = {"n": 0}

    def flaky(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 4:  # the optimizer file of the second save (step 8)
            Path(path).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(state, "save_file", flaky)
    with pytest.raises(OSError, match="No space left"):
        train(cfg, PretrainTask, progress=False)
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000004"]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_00000004"]  # no temp left
    st, model_sd, _ = load_checkpoint(ckpts[0])
    assert st["step"] == 4 and len(model_sd) > 0
    monkeypatch.setattr(state, "save_file", real)
    run = train(cfg, PretrainTask, resume=True, progress=False)
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 13))


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
    path = write_config(tmp_path, tiny_config(tmp_path))
    assert main(["train", "pretrain", str(path), "--no-progress"]) == 0
    latest = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    data = bytearray((latest / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (latest / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(latest)
    capsys.readouterr()
    assert main(["train", "pretrain", str(path), "--no-progress", "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{latest / 'model.safetensors'}: sha256 mismatch" in err and "Traceback" not in err
    # without --resume an existing run is refused rather than overwritten
    (latest / "model.safetensors").unlink()
    assert main(["train", "pretrain", str(path), "--no-progress"]) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_plot_writes_a_png(tmp_path, capsys):
    path = write_config(tmp_path, tiny_config(tmp_path))
    assert main(["train", "pretrain", str(path), "--no-progress"]) == 0
    assert main(["train", "plot", str(tmp_path / "run")]) == 0
    png = (tmp_path / "run" / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert main(["train", "plot", str(tmp_path / "nothing")]) == 2
    assert "metrics.jsonl: not found" in capsys.readouterr().err
