"""Training throughput: phi3's trainer vs transformers' Phi3ForCausalLM in a plain loop, same run.

A ~20M-parameter Phi-3 (vocab 32064, hidden 256, 4 layers, MLP 1024), batch 8 x 256 tokens,
AdamW, fp32 on this machine's CPU cores. Ours is one step of the trainer's own pieces (its model,
AdamW param groups, loss, clipping); transformers runs forward(labels) / backward / clip / step.
MFU = training FLOPs per token (6 N + 12 L d T) x tokens/s / the matmul peak measured here (the best of
the measurements taken between rounds: under a varying load this is conservative for the median).

    .venv/bin/python bench/train.py [--steps 12] [--compile] [--profile] [--write]

--compile adds torch.compile rows for both (ours through the trainer's `compile: true` switch);
--profile adds a torch.profiler breakdown of an eager step of each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from phi3.train.loop import flops_per_token, measure_peak_flops  # noqa: E402

SIZE = {"vocab_size": 32064, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 4096,
        "original_max_position_embeddings": 4096, "sliding_window": None, "rope_scaling": None,
        "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000}
BATCH, SEQ = 8, 256


def ours_step_fn(compile_: bool):
    """One optimizer step of phi3's trainer: its model, param groups / AdamW, loss and clipping."""
    from phi3.train.config import ModelSpec, Optimizer
    from phi3.train.loop import grad_norm_and_clip, lm_loss_sum
    from phi3.train.model import build_model
    from phi3.train.optim import build_optimizer

    model, _ = build_model(ModelSpec(preset="phi-3-mini-4k-instruct", overrides=SIZE), seed=0)
    model.train()
    opt = build_optimizer(model, Optimizer(lr=3e-4, weight_decay=0.1))
    fwd = torch.compile(model) if compile_ else model
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, 32000, (BATCH, SEQ + 1))
    mb = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}

    def step():
        loss = lm_loss_sum(fwd, mb) / mb["targets"].numel()
        loss.backward()
        with torch.profiler.record_function("clip"):
            grad_norm_and_clip(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, step


def hf_step_fn(compile_: bool = False):
    """transformers' plain loop: forward(labels) / backward / clip / AdamW step (optionally on
    torch.compile(model), as its docs suggest)."""
    import transformers

    hf_cfg = transformers.Phi3Config(**{k: v for k, v in SIZE.items() if k != "original_max_position_embeddings"},
                                     attn_implementation="sdpa")
    model = transformers.Phi3ForCausalLM(hf_cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, foreach=True)
    fwd = torch.compile(model) if compile_ else model
    ids = torch.randint(0, 32000, (BATCH, SEQ))

    def step():
        loss = fwd(input_ids=ids, labels=ids).loss
        loss.backward()
        with torch.profiler.record_function("clip"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


CATEGORIES = ("matmul (GEMM)", "attention (SDPA fwd+bwd)", "LM-head cross-entropy (softmax, not its GEMMs)",
              "norm / RoPE / SwiGLU / residual (elementwise)", "embedding", "AdamW step", "grad-norm clipping",
              "autograd engine + Python (untraced)")


def _category(e) -> str:
    names, p = [], e
    while p is not None:
        names.append(p.name)
        p = p.cpu_parent
    chain = " ".join(names)
    if "Optimizer.step" in chain or "Optimizer.zero_grad" in chain:
        return "AdamW step"
    if "clip" in chain:
        return "grad-norm clipping"
    if e.name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmm_"):
        return "matmul (GEMM)"
    if "scaled_dot_product" in chain or "ScaledDotProduct" in chain:
        return "attention (SDPA fwd+bwd)"
    if any(k in chain for k in ("linear_cross_entropy", "LinearCrossEntropy", "log_softmax", "LogSoftmax",
                                "nll_loss", "NllLoss", "cross_entropy")):
        return "LM-head cross-entropy (softmax, not its GEMMs)"
    if "embedding" in chain.lower():
        return "embedding"
    if e.name.startswith("aten::"):
        return "norm / RoPE / SwiGLU / residual (elementwise)"
    return "autograd engine + Python (untraced)"


def profile_step(step) -> tuple[float, dict[str, float]]:
    """Wall time of one step and the seconds spent per category (self CPU time of the ops)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0
    cats = dict.fromkeys(CATEGORIES, 0.0)
    for e in prof.events():
        if e.name.startswith("aten::"):
            cats[_category(e)] += e.self_cpu_time_total / 1e6
    cats["autograd engine + Python (untraced)"] += max(0.0, wall - sum(cats.values()))
    return wall, cats


def timed(step) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--compile", action="store_true",
                    help="also time both with torch.compile (ours: the trainer's `compile: true`)")
    ap.add_argument("--profile", action="store_true", help="also profile steps of both (eager): where time goes")
    ap.add_argument("--write", action="store_true", help="put the results in BENCHMARKS.md")
    args = ap.parse_args()
    # the machine may be shared: steps of the trainers are interleaved (all see the same load)
    # and medians compared; the peak is the best of the matmul measurements taken between rounds
    model, ours = ours_step_fn(False)
    trainers = [("transformers Phi3ForCausalLM, plain loop", "eager", hf_step_fn()),
                ("phi3 trainer step", "eager", ours)]
    if args.compile:
        trainers += [("transformers Phi3ForCausalLM, plain loop", "torch.compile", hf_step_fn(True)),
                     ("phi3 trainer step (`compile: true`)", "torch.compile", ours_step_fn(True)[1])]
    first = {}
    for name, mode, step in trainers:  # warm-up (and compilation: the first call's wall time)
        first[(name, mode)] = timed(step)
        step()
    times = {(name, mode): [] for name, mode, _ in trainers}
    peaks = []
    for _ in range(args.steps):
        for name, mode, step in trainers:
            times[(name, mode)].append(timed(step))
        peaks.append(measure_peak_flops(torch.device("cpu"), torch.float32, n=1024, reps=5))
    peak = max(peaks)
    n_params = sum(p.numel() for p in model.parameters())
    fpt = flops_per_token(model, SEQ)
    tps = {key: BATCH * SEQ / statistics.median(ts) for key, ts in times.items()}
    # under a load that comes and goes the best peak and the median step come from different moments:
    # also each step against the peak measured right after it in its round (median over rounds)
    round_mfu = {key: statistics.median(flops_per_token(model, SEQ) * BATCH * SEQ / t / pk for t, pk in zip(ts, peaks))
                 for key, ts in times.items()}
    lines = [f"Model: {n_params / 1e6:.1f}M parameters, batch {BATCH} x {SEQ} tokens, fp32, "
             f"{torch.get_num_threads()} threads, {args.steps} interleaved steps each (median); matmul peak (best): "
             f"{peak / 1e9:.1f} GFLOP/s; {fpt / 1e6:.1f} MFLOP per token", "",
             "| trainer | mode | tokens/s (median) | MFU | vs transformers eager | vs transformers, same mode "
             "| MFU vs its round's peak (median) | first step (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    hf_name = trainers[0][0]
    for (name, mode), v in tps.items():
        same = tps[(hf_name, mode)]
        lines.append(f"| {name} | {mode} | {v:,.0f} | {fpt * v / peak:.1%} | {v / tps[(hf_name, 'eager')]:.2f}x | "
                     f"{v / same:.2f}x | {round_mfu[(name, mode)]:.1%} | "
                     f"{first[(name, mode)]:.1f} |")
    if args.compile:
        lines += ["", "First step: compilation included for torch.compile rows (Inductor, C++ on these cores)."]
    if args.profile:
        lines += ["", "Profile (torch.profiler, CPU; self time of the ops by kind, the faster of 2 profiled steps, "
                  "eager, interleaved):", "", "| where the time goes | " + " | ".join(n for n, m, _ in trainers[:2]) + " |",
                  "|---|---:|---:|"]
        profs = {n: [] for n, m, _ in trainers[:2]}
        for _ in range(2):
            for name, mode, step in trainers[:2]:
                profs[name].append(profile_step(step))
        best = {n: min(r, key=lambda x: x[0]) for n, r in profs.items()}
        for cat in CATEGORIES:
            lines.append(f"| {cat} | " + " | ".join(f"{b[1][cat]:.2f} s ({b[1][cat] / b[0]:.0%})" for b in best.values())
                         + " |")
        lines.append("| step (wall, profiled) | " + " | ".join(f"{b[0]:.2f} s" for b in best.values()) + " |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        md = ROOT / "BENCHMARKS.md"
        text = md.read_text() if md.exists() else "# Benchmarks\n"
        cmd = (f"`.venv/bin/python bench/train.py --steps {args.steps}" + (" --compile" if args.compile else "")
               + (" --profile" if args.profile else "") + " --write`")
        section = f"\n## Training throughput (bench/train.py)\n\n{cmd}, {time.strftime('%Y-%m-%d %H:%M')}\n\n{table}\n"
        start = text.find("\n## Training throughput")
        if start >= 0:
            end = text.find("\n## ", start + 5)
            text = text[:start] + section + (text[end:] if end >= 0 else "")
        else:
            text += section
        md.write_text(text)


if __name__ == "__main__":
    main()
