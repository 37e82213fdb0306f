"""`phi3 train plot RUN`: the run's loss curves (train, held-out; LR beside) as a PNG."""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import atomic_write
from ..errors import Phi3Error


def read_metrics(run: str | Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise Phi3Error(f"{path}: not found (is {run} a training run directory?)") from None
    rows = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise Phi3Error(f"{path}:{i}: invalid JSON ({e.msg})") from None
    if not rows:
        raise Phi3Error(f"{path}: no steps logged yet")
    return rows


def plot_run(run: str | Path, output: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run)
    out = Path(output) if output else Path(run) / "loss.png"
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], label="train loss", lw=1)
    ev = [r for r in rows if "eval_loss" in r]
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="held-out loss")
    for i in range(1, len(rows)):  # phase boundaries
        if rows[i].get("phase") != rows[i - 1].get("phase"):
            ax.axvline(rows[i]["step"] - 0.5, color="grey", ls="--", lw=0.8)
            ax.text(rows[i]["step"], ax.get_ylim()[1], rows[i]["phase"], va="top", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(Path(run).name)
    ax.legend()
    ax_lr.plot(steps, [r["lr"] for r in rows], color="tab:green")
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return out
