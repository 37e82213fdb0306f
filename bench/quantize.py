"""Quantizing a full-precision model: phi3 vs llama.cpp's quantizer, same weights, same run.

    python bench/quantize.py                        # phi-3-mini shape (32 layers, 3.8B parameters)
    python bench/quantize.py --layers 8 --rounds 1  # fewer layers (quicker)

The weights are `bench/decode.py`'s (same --workdir): random phi-3-mini-shaped bf16, as our HF
checkpoint and as the F16 GGUF written from it. Every job runs in a fresh subprocess (its own peak
RSS), jobs interleaved, `--rounds` times, all with --threads threads; the output goes to
--workdir/quantize-out and is deleted after each job:

- phi3 → GGUF Q4_0 / Q8_0: `phi3 convert bf16/ out.gguf --type q4_0|q8_0` (load, quantize, write);
- llama.cpp → GGUF Q4_0 / Q8_0: `llama_model_quantize` of the F16 GGUF (llama-cpp-python), the peer;
- phi3 int4 g64 checkpoint: `phi3 quantize bf16/ out --bits 4 --group-size 64` (refined fit, int8
  head); llama.cpp's nearest, Q4_1 (int4 with a min per 32 weights), beside it;
- phi3 int4 in memory: `phi3.load(bf16/, quantize=4)`, the time before `phi3 chat --quantize 4` can
  answer (no file written);
- GGUF → GGUF: `phi3 convert q8_0.gguf out.gguf --type q4_0` against llama.cpp requantizing the same
  Q8_0 file (`allow_requantize`);
- HF → HF: `phi3 convert bf16/ out/ --dtype bfloat16` (a tensor at a time) against transformers'
  `from_pretrained(bf16/, dtype=bfloat16)` + `save_pretrained(out/)`;
- GGUF → HF: `phi3 convert q8_0.gguf out/ --dtype bfloat16` beside transformers'
  `from_pretrained(gguf_file=q8_0.gguf)` alone (it refuses `save_pretrained` for a model loaded from
  GGUF, so its row is the load only: no ratio is printed for it).

The Q4_0 / Q8_0 data of the linear layers must come out byte for byte as llama.cpp's (ggml's reference
quantizer; the F16 file holds the bf16 values exactly but for tiny ones, so a block may differ): the
share of identical blocks is printed for each such pair.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

JOBS = {  # name -> (kind, argument, source in the work directory)
    "phi3 → Q4_0 GGUF": ("convert", "q4_0", "bf16"),
    "llama.cpp → Q4_0 GGUF": ("llama", "q4_0", "f16.gguf"),
    "phi3 → Q8_0 GGUF": ("convert", "q8_0", "bf16"),
    "llama.cpp → Q8_0 GGUF": ("llama", "q8_0", "f16.gguf"),
    "phi3 int4 g64 checkpoint": ("quantize", "4", "bf16"),
    "llama.cpp → Q4_1 GGUF": ("llama", "q4_1", "f16.gguf"),
    "phi3 int4 in memory": ("load", "4", "bf16"),
    "phi3 Q8_0 GGUF → Q4_0": ("convert", "q4_0", "q8_0.gguf"),
    "llama.cpp Q8_0 GGUF → Q4_0": ("llama", "q4_0", "q8_0.gguf"),
    "phi3 HF bf16 → HF bf16": ("convert_hf", "bfloat16", "bf16"),
    "transformers HF bf16 → HF bf16": ("transformers", "bfloat16", "bf16"),
    "phi3 Q8_0 GGUF → HF bf16": ("convert_hf", "bfloat16", "q8_0.gguf"),
    "transformers Q8_0 GGUF → model (load only)": ("transformers", "bfloat16", "q8_0.gguf"),
}
PAIRS = [("phi3 → Q4_0 GGUF", "llama.cpp → Q4_0 GGUF"), ("phi3 → Q8_0 GGUF", "llama.cpp → Q8_0 GGUF"),
         ("phi3 int4 g64 checkpoint", "llama.cpp → Q4_1 GGUF"),
         ("phi3 Q8_0 GGUF → Q4_0", "llama.cpp Q8_0 GGUF → Q4_0"),
         ("phi3 HF bf16 → HF bf16", "transformers HF bf16 → HF bf16")]
SAME_BLOCKS = [pair for pair in PAIRS if "GGUF" in pair[1] and "Q4_1" not in pair[1]]  # layer blocks must match


def run_child(kind: str, arg: str, source: Path, out: Path, threads: int) -> dict:
    from decode import peak_rss

    t0 = time.perf_counter()
    if kind == "llama":
        import llama_cpp
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{arg.upper()}")
        params.nthread = threads
        params.allow_requantize = True  # a quantized source (Q8_0 -> Q4_0)
        if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) != 0:
            raise SystemExit("llama_model_quantize failed")
    elif kind == "transformers":  # the peer of an HF -> HF rewrite: load, then save
        import torch
        import transformers
        torch.set_num_threads(threads)
        if source.suffix == ".gguf":  # transformers cannot save a model it loaded from GGUF: the load alone
            transformers.AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                              dtype=getattr(torch, arg))
            out.mkdir()
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, arg))
            model.save_pretrained(out)
    else:
        import torch
        torch.set_num_threads(threads)
        from phi3.cli import main as phi3_main
        if kind == "convert_hf":
            phi3_main(["convert", str(source), str(out), "--dtype", arg])
        elif kind == "load":
            import phi3
            phi3.load(source, quantize=int(arg))
        elif kind == "convert":
            phi3_main(["convert", str(source), str(out), "--type", arg])
        else:
            phi3_main(["quantize", str(source), str(out), "--bits", arg, "--group-size", "64"])
    seconds = time.perf_counter() - t0
    size = out.stat().st_size if out.is_file() else sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {"seconds": seconds, "rss": peak_rss(), "bytes": size}


def same_blocks(ours: Path, peer: Path) -> tuple[int, int]:
    """(identical blocks, blocks) over the linear layers' tensors both files hold in the same type."""
    import numpy as np
    from phi3.gguf import parse_gguf

    a, b = parse_gguf(ours), parse_gguf(peer)
    same = total = 0
    for name, t in a.tensors.items():
        u = b.tensors.get(name)
        if not name.startswith("blk.") or len(t.shape) != 2 or u is None or u.qtype != t.qtype:
            continue
        size = 34 if t.qtype == "Q8_0" else 18
        x = np.frombuffer(t.raw, np.uint8).reshape(-1, size)
        y = np.frombuffer(u.raw, np.uint8).reshape(-1, size)
        same += int((x == y).all(axis=1).sum())
        total += len(x)
    return same, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/phi3-bench-decode")
    ap.add_argument("--jobs", default=",".join(JOBS), help="comma-separated subset")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.workdir) / f"layers{args.layers}"
    if args.child:
        kind, arg, source, out = args.child
        print(json.dumps(run_child(kind, arg, Path(source), Path(out), args.threads)))
        return

    from decode import build_artifacts
    jobs = [j.strip() for j in args.jobs.split(",")]
    unknown = [j for j in jobs if j not in JOBS]
    if unknown:
        raise SystemExit(f"unknown job(s) {unknown}; known: {', '.join(JOBS)}")
    # the bf16 checkpoint and the F16 GGUF, and llama.cpp's Q8_0 of it where a job starts from that
    build_artifacts(work, args.layers, {JOBS[j][2] for j in jobs} - {"bf16", "f16.gguf"})
    outdir = work / "quantize-out"
    results: dict[str, list[dict]] = {j: [] for j in jobs}
    compared = {name for pair in SAME_BLOCKS for name in pair if all(n in jobs for n in pair)}
    kept = {name: work / f"quantize-kept-{i}.gguf" for i, name in enumerate(sorted(compared))}
    for r in range(args.rounds):
        for name in jobs:
            kind, arg, source = JOBS[name]
            shutil.rmtree(outdir, ignore_errors=True)
            outdir.mkdir(parents=True)
            out = outdir / ("int4" if kind == "quantize" else f"{kind}-{arg}" if kind in ("convert_hf", "transformers")
                            else f"{kind}-{arg}.gguf")
            cmd = [sys.executable, __file__, "--layers", str(args.layers), "--workdir", args.workdir,
                   "--threads", str(args.threads), "--child", kind, arg, str(work / source), str(out)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{name}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
                continue
            results[name].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {name}: {results[name][-1]}", flush=True)
            if name in kept and r == 0:
                shutil.move(str(out), kept[name])  # kept for the comparison below
    agreement = {pair: same_blocks(kept[pair[0]], kept[pair[1]]) for pair in SAME_BLOCKS
                 if all(n in kept and kept[n].exists() for n in pair)}
    for path in kept.values():
        path.unlink(missing_ok=True)
    shutil.rmtree(outdir, ignore_errors=True)

    med = {n: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for n, rs in results.items() if rs}
    lines = [f"phi-3-mini shape, {args.layers} layers, {args.threads} threads, median of {args.rounds} "
             "interleaved rounds; phi3 from the bf16 checkpoint, llama.cpp from the F16 GGUF of it "
             "(the Q8_0 → Q4_0 rows: both from llama.cpp's Q8_0 file)", "",
             "| job | seconds | peak RSS GB | output GB |", "|---|---|---|---|"]
    for name, m in med.items():
        lines.append(f"| {name} | {m['seconds']:.1f} | {m['rss'] / 1e9:.2f} | {m['bytes'] / 1e9:.2f} |")
    lines += ["", "| phi3 / peer | time ratio (lower is faster) |", "|---|---|"]
    for ours, peer in PAIRS:
        if ours in med and peer in med:
            lines.append(f"| {ours} / {peer} | {med[ours]['seconds'] / med[peer]['seconds']:.2f} |")
    for (ours, peer), (same, total) in agreement.items():
        lines.append(f"\n{ours}: blocks of the linear layers identical to {peer}'s: {same}/{total} "
                     f"({100 * same / max(total, 1):.3f} %)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
