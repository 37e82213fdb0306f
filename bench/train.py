"""Training throughput: phi3's trainer vs transformers' Phi3ForCausalLM in a plain loop, same run.

A ~20M-parameter Phi-3 (vocab 32064, hidden 256, 4 layers, MLP 1024), batch 8 x 256 tokens,
AdamW, fp32 on this machine's CPU cores. Ours is one step of the trainer's own pieces (its model,
AdamW param groups, loss, clipping); transformers runs forward(labels) / backward / clip / step.
MFU = training FLOPs per token (6 N + 12 L d T) x tokens/s / the matmul peak measured here.

    .venv/bin/python bench/train.py [--steps 12] [--compile] [--write]
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
        grad_norm_and_clip(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, step


def hf_step_fn():
    import transformers

    hf_cfg = transformers.Phi3Config(**{k: v for k, v in SIZE.items() if k != "original_max_position_embeddings"},
                                     attn_implementation="sdpa")
    model = transformers.Phi3ForCausalLM(hf_cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, foreach=True)
    ids = torch.randint(0, 32000, (BATCH, SEQ))

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def timed(step) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--compile", action="store_true", help="also time ours with torch.compile")
    ap.add_argument("--write", action="store_true", help="append the table to BENCHMARKS.md")
    args = ap.parse_args()
    # the machine may be shared: steps of the two trainers are interleaved (both see the same load)
    # and medians compared; the peak is the best of the matmul measurements taken between rounds
    model, ours = ours_step_fn(False)
    hf = hf_step_fn()
    trainers = [("transformers Phi3ForCausalLM, plain loop", hf), ("phi3 trainer step (eager)", ours)]
    if args.compile:
        trainers.append(("phi3 trainer step (torch.compile)", ours_step_fn(True)[1]))
    for _, step in trainers:  # warm-up (and compilation)
        step()
    times = {name: [] for name, _ in trainers}
    peaks = []
    for _ in range(args.steps):
        for name, step in trainers:
            times[name].append(timed(step))
        peaks.append(measure_peak_flops(torch.device("cpu"), torch.float32, n=1024, reps=5))
    peak = max(peaks)
    n_params = sum(p.numel() for p in model.parameters())
    fpt = flops_per_token(model, SEQ)
    rows = [(name, BATCH * SEQ / statistics.median(times[name])) for name, _ in trainers]
    hf_tps = rows[0][1]
    lines = [f"Model: {n_params / 1e6:.1f}M parameters, batch {BATCH} x {SEQ} tokens, fp32, "
             f"{torch.get_num_threads()} threads, {args.steps} interleaved steps each; matmul peak (best): {peak / 1e9:.1f} GFLOP/s; "
             f"{fpt / 1e6:.1f} MFLOP per token", "",
             "| trainer | tokens/s | MFU | vs transformers |", "|---|---:|---:|---:|"]
    for name, tps in rows:
        lines.append(f"| {name} | {tps:,.0f} | {fpt * tps / peak:.1%} | {tps / hf_tps:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        md = ROOT / "BENCHMARKS.md"
        text = md.read_text() if md.exists() else "# Benchmarks\n"
        cmd = (f"`.venv/bin/python bench/train.py --steps {args.steps}" + (" --compile" if args.compile else "")
               + " --write`")
        section = f"\n## Training throughput (bench/train.py)\n\n{cmd}, {time.strftime('%Y-%m-%d')}\n\n{table}\n"
        start = text.find("\n## Training throughput")
        if start >= 0:
            end = text.find("\n## ", start + 5)
            text = text[:start] + section + (text[end:] if end >= 0 else "")
        else:
            text += section
        md.write_text(text)


if __name__ == "__main__":
    main()
