"""Training throughput: phi3's trainer vs transformers' Phi3ForCausalLM in a plain loop, same run.

A ~20M-parameter Phi-3 (vocab 32064, hidden 256, 4 layers, MLP 1024), batch 8 x 256 tokens,
AdamW, fp32 on this machine's CPU cores. Ours runs the real `phi3 train pretrain` loop (data
sampling, loss, clipping, logging included); transformers runs forward(labels) / backward / step.
MFU = training FLOPs per token (6 N + 12 L d T) x tokens/s / the matmul peak measured here.

    .venv/bin/python bench/train.py [--steps 12] [--compile] [--write]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from phi3.train.config import parse_config  # noqa: E402
from phi3.train.loop import flops_per_token, measure_peak_flops, train  # noqa: E402
from phi3.train.pretrain import PretrainTask  # noqa: E402

SIZE = {"vocab_size": 32064, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 4096,
        "original_max_position_embeddings": 4096, "sliding_window": None, "rope_scaling": None,
        "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000}
BATCH, SEQ = 8, 256


def shards(tmp: Path) -> Path:
    out = tmp / "data"
    out.mkdir()
    toks = np.random.default_rng(0).integers(0, 32000, size=400_000).astype(np.uint16)
    toks.tofile(out / "00000.bin")
    (out / "index.json").write_text(json.dumps({"vocab_size": 32064, "dtype": "uint16", "eos_token_id": 32000,
                                                "shards": [{"file": "00000.bin", "tokens": len(toks)}]}))
    return out


def bench_ours(tmp: Path, steps: int, compile_: bool) -> tuple[float, int, float]:
    cfg = parse_config({
        "run_dir": str(tmp / f"run{int(compile_)}"), "model": {"preset": "phi-3-mini-4k-instruct", "overrides": SIZE},
        "seq_len": SEQ, "micro_batch_size": BATCH, "sources": {"rand": str(shards(tmp) if not (tmp / "data").exists()
                                                                         else tmp / "data")},
        "phases": [{"name": "bench", "tokens": steps * BATCH * SEQ, "mixture": {"rand": 1.0}}],
        "checkpoint": {"every": 10**6, "keep": 1}, "compile": compile_, "peak_flops": 1.0, "export": str(tmp / "hf"),
    }, "bench")
    run = train(cfg, PretrainTask, progress=False)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    from phi3.train.model import build_model
    model, _ = build_model(cfg.model, 0)
    n = sum(p.numel() for p in model.parameters())
    return statistics.median(r["tokens_per_s"] for r in rows[2:]), n, flops_per_token(model, SEQ)


def bench_transformers(steps: int) -> float:
    import transformers

    hf_cfg = transformers.Phi3Config(**{k: v for k, v in SIZE.items() if k != "original_max_position_embeddings"},
                                     attn_implementation="sdpa")
    model = transformers.Phi3ForCausalLM(hf_cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, foreach=True)
    ids = torch.randint(0, 32000, (BATCH, SEQ + 1))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return BATCH * SEQ / statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--compile", action="store_true", help="also time ours with torch.compile")
    ap.add_argument("--write", action="store_true", help="append the table to BENCHMARKS.md")
    args = ap.parse_args()
    peak = measure_peak_flops(torch.device("cpu"), torch.float32, n=1024, reps=20)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf = bench_transformers(args.steps)
        ours, n_params, fpt = bench_ours(tmp, args.steps, False)
        rows = [("transformers Phi3ForCausalLM, plain loop", hf), ("phi3 train pretrain (eager)", ours)]
        if args.compile:
            rows.append(("phi3 train pretrain (torch.compile)", bench_ours(tmp, args.steps, True)[0]))
    lines = [f"Model: {n_params / 1e6:.1f}M parameters, batch {BATCH} x {SEQ} tokens, fp32, "
             f"{torch.get_num_threads()} threads; matmul peak measured: {peak / 1e9:.1f} GFLOP/s; "
             f"{fpt / 1e6:.1f} MFLOP per token", "",
             "| trainer | tokens/s | MFU | vs transformers |", "|---|---:|---:|---:|"]
    for name, tps in rows:
        lines.append(f"| {name} | {tps:,.0f} | {fpt * tps / peak:.1%} | {tps / hf:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        md = ROOT / "BENCHMARKS.md"
        text = md.read_text() if md.exists() else "# Benchmarks\n"
        cmd = "`.venv/bin/python bench/train.py" + (" --compile" if args.compile else "") + " --write`"
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
