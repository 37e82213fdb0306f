"""Decode / prefill speed, load time and peak RSS: phi3 vs llama.cpp vs transformers, same weights, same run.

    python bench/decode.py                       # phi-3-mini shape (32 layers, 3.8B parameters)
    python bench/decode.py --layers 8 --rounds 1 # the same layer shape, fewer layers (quicker)

Set-up (cached in --workdir): random phi-3-mini-shaped weights (speed does not depend on the
values) written once as our bf16 HF checkpoint and as a GGUF F16 by `phi3.gguf_export`; llama.cpp's
own quantizer makes Q4_0, Q8_0, Q4_K_M, Q5_K_M, Q3_K_M and IQ4_XS from that F16 file (those the chosen
engines need); `phi3 quantize --bits 4 --group-size 64` makes our int4 checkpoint (int8 head and
embedding table, the defaults).
llama.cpp runs with llama-cpp-python's defaults (flash attention off); `llama.cpp Q4_0 flash-attn`
turns it on (faster prefill, slower decode on CPUs: BENCHMARKS.md, run 16).
Every engine then runs in a fresh subprocess (so peak RSS is its own), engines interleaved,
`--rounds` times: load, prefill of --prompt tokens, --new greedy tokens. Our int4/int8 load the
llama.cpp Q4_0/Q8_0 files natively, so both sides multiply the very same quantized weights.
The roofline is the memory bandwidth measured in this run divided by the bytes of weights read
per token.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PHI3_VOCAB = ROOT.parent / "shared" / "tokenizer" / "ggml-vocab-phi-3.gguf"

INT4 = "int4-g64-default"  # `phi3 quantize --bits 4 --group-size 64`: int4 linears, int8 head and table
ENGINES = {  # name -> (artifact, kind[, extra environment])
    "phi3 int4 (Q4_0 file)": ("q4_0.gguf", "ours"),
    "phi3 int4 (Q4_0 file) 2-level act.": ("q4_0.gguf", "ours", {"PHI3_ACTIVATION_LEVELS": "2"}),
    "llama.cpp Q4_0": ("q4_0.gguf", "llama"),
    "llama.cpp Q4_0 flash-attn": ("q4_0.gguf", "llama-fa"),  # llama-cpp-python's default is off
    "phi3 int4 (Q4_K_M file)": ("q4_k_m.gguf", "ours"),
    "llama.cpp Q4_K_M": ("q4_k_m.gguf", "llama"),
    "phi3 (Q5_K_M file)": ("q5_k_m.gguf", "ours"),
    "llama.cpp Q5_K_M": ("q5_k_m.gguf", "llama"),
    "phi3 (Q3_K_M file)": ("q3_k_m.gguf", "ours"),
    "llama.cpp Q3_K_M": ("q3_k_m.gguf", "llama"),
    "phi3 (IQ4_XS file)": ("iq4_xs.gguf", "ours"),
    "llama.cpp IQ4_XS": ("iq4_xs.gguf", "llama"),
    "phi3 int8 (Q8_0 file)": ("q8_0.gguf", "ours"),
    "llama.cpp Q8_0": ("q8_0.gguf", "llama"),
    "phi3 int4 g64 (ours)": ("int4-g64-default", "ours"),
    "phi3 bf16": ("bf16", "ours"),
    "llama.cpp F16": ("f16.gguf", "llama"),
    "transformers bf16": ("bf16", "hf"),
}
PAIRS = [("phi3 int4 (Q4_0 file)", "llama.cpp Q4_0"), ("phi3 int4 (Q4_0 file) 2-level act.", "llama.cpp Q4_0"),
         ("phi3 int4 (Q4_K_M file)", "llama.cpp Q4_K_M"), ("phi3 (Q5_K_M file)", "llama.cpp Q5_K_M"),
         ("phi3 (Q3_K_M file)", "llama.cpp Q3_K_M"), ("phi3 (IQ4_XS file)", "llama.cpp IQ4_XS"),
         ("phi3 int8 (Q8_0 file)", "llama.cpp Q8_0"),
         ("phi3 int4 g64 (ours)", "llama.cpp Q4_0"), ("phi3 int4 g64 (ours)", "llama.cpp Q4_0 flash-attn"),
         ("phi3 bf16", "llama.cpp F16")]


# ---- set-up ------------------------------------------------------------------------------------
def build_artifacts(work: Path, layers: int, artifacts: set[str]) -> None:
    """The bf16 checkpoint and F16 GGUF, then whichever of the quantized `artifacts` are missing."""
    from phi3.checkpoint import build_model, load_hf_checkpoint, quantize_to_checkpoint, save_hf_checkpoint
    from phi3.config import load_preset, ModelConfig
    from phi3.gguf_export import write_gguf
    from phi3.models.phi3 import Phi3ForCausalLM
    from phi3.tokenizer import Tokenizer

    work.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_gguf(PHI3_VOCAB)
    if not (work / "bf16" / "config.json").exists():
        hf = load_preset("phi-3-mini-4k-instruct").to_hf_dict()
        hf["num_hidden_layers"] = layers
        cfg = ModelConfig.from_hf_dict(hf)
        with torch.device("meta"):
            shapes = Phi3ForCausalLM(cfg).state_dict()
        gen = torch.Generator().manual_seed(0)
        sd = {}
        for name, t in shapes.items():
            if name.endswith("norm.weight"):
                sd[name] = torch.ones(t.shape, dtype=torch.bfloat16)
            else:
                sd[name] = (torch.randn(t.shape, generator=gen) * 0.02).to(torch.bfloat16)
        model = build_model(cfg, sd, torch.bfloat16)
        print(f"writing {work / 'bf16'} ({cfg.num_parameters() / 1e9:.2f}B parameters)", flush=True)
        save_hf_checkpoint(model, work / "bf16", tokenizer=tok)
        del model, sd
    if not (work / "f16.gguf").exists():
        model = load_hf_checkpoint(work / "bf16")
        print("writing f16.gguf", flush=True)
        write_gguf(model, tok, work / "f16.gguf", "f16", name="phi-3-mini-random", progress=True)
        del model
    import llama_cpp
    for kind in ("q4_0", "q8_0", "q4_k_m", "q5_k_m", "q3_k_m", "iq4_xs"):
        ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
        if f"{kind}.gguf" in artifacts and not (work / f"{kind}.gguf").exists():
            print(f"llama.cpp quantize -> {kind}.gguf", flush=True)
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            params.nthread = os.cpu_count()
            rc = llama_cpp.llama_model_quantize(str(work / "f16.gguf").encode(), str(work / f"{kind}.gguf").encode(),
                                                params)
            if rc != 0:
                raise SystemExit(f"llama_model_quantize failed ({rc})")
    if INT4 in artifacts and not (work / INT4 / "config.json").exists():
        print(f"writing {INT4} (phi3 quantize bf16/ {INT4}/ --bits 4 --group-size 64)", flush=True)
        quantize_to_checkpoint(load_hf_checkpoint(work / "bf16"), work / INT4, bits=4, group_size=64, tokenizer=tok)


def memory_bandwidth(threads: int) -> float:
    """GB/s of a streaming read (sum of 1 GiB of float32) with `threads` threads."""
    torch.set_num_threads(threads)
    x = torch.ones(2**28)
    x.sum()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def weight_bytes_per_token(work: Path, artifact: str) -> int:
    """Bytes of every weight a decode step reads: all tensors but the embedding table."""
    from safetensors import safe_open
    from phi3.gguf import parse_gguf

    if artifact.endswith(".gguf"):
        f = parse_gguf(work / artifact)
        return sum(t.raw.nbytes for name, t in f.tensors.items() if name != "token_embd.weight")
    total = 0
    for file in (work / artifact).glob("*.safetensors"):
        with safe_open(str(file), "pt") as st:
            for name in st.keys():
                if not name.startswith("model.embed_tokens"):
                    s = st.get_slice(name)
                    total += torch.Size(s.get_shape()).numel() * {"BF16": 2, "F16": 2, "F32": 4, "U8": 1,
                                                                  "I8": 1}[s.get_dtype()]
    return total


def peak_rss() -> int:
    """VmHWM of this process in bytes (ru_maxrss would carry the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- one engine, in its own process ----------------------------------------------------------------
def run_child(kind: str, path: Path, threads: int, prompt_len: int, new: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(100, 30000, (prompt_len,), generator=gen).tolist()
    t0 = time.perf_counter()
    if kind in ("llama", "llama-fa"):
        import llama_cpp
        import numpy as np
        llm = llama_cpp.Llama(str(path), n_ctx=prompt_len + new + 8, n_batch=512, n_threads=threads,
                              n_threads_batch=threads, flash_attn=kind == "llama-fa", verbose=False)
        load = time.perf_counter() - t0
        t1 = time.perf_counter()
        def last_logits():
            ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
            return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))

        llm.eval(prompt)
        token = int(np.argmax(last_logits()))
        prefill = time.perf_counter() - t1
        t2 = time.perf_counter()
        for _ in range(new - 1):
            llm.eval([token])
            token = int(np.argmax(last_logits()))
        decode = time.perf_counter() - t2
    else:
        torch.set_num_threads(threads)
        if kind == "hf":
            import transformers
            model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
            load = time.perf_counter() - t0
            ids = torch.tensor([prompt])
            with torch.inference_mode():
                t1 = time.perf_counter()
                out = model(ids, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                prefill = time.perf_counter() - t1
                t2 = time.perf_counter()
                for _ in range(new - 1):
                    out = model(token, past_key_values=past, use_cache=True)
                    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                decode = time.perf_counter() - t2
        else:
            import phi3
            from phi3.generate import SamplingParams, generate_tokens
            # the quantized kernels take fp32 activations (bf16 elementwise work is slow on CPUs
            # without native bf16); the dense model runs in bf16 like transformers' and llama.cpp's F16
            lm = phi3.load(path, dtype="bfloat16" if path.name == "bf16" else None)
            load = time.perf_counter() - t0
            steps = generate_tokens(lm.model, [prompt], SamplingParams(max_new_tokens=new, temperature=0.0))
            t1 = time.perf_counter()
            next(steps)
            prefill = time.perf_counter() - t1
            t2 = time.perf_counter()
            n = sum(1 for _ in steps)
            assert n == new - 1
            decode = time.perf_counter() - t2
    rss = peak_rss()
    return {"load_s": load, "prefill_tps": prompt_len / prefill, "decode_tps": (new - 1) / decode, "rss": rss}


# ---- driver -------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=2, help="0: only build the artifacts")
    ap.add_argument("--workdir", default="/tmp/phi3-bench-decode")
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, Path(args.path), args.threads, args.prompt, args.new)))
        return

    work = Path(args.workdir) / f"layers{args.layers}"
    engines = [e.strip() for e in args.engines.split(",")]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise SystemExit(f"unknown engine(s) {unknown}; known: {', '.join(ENGINES)}")
    build_artifacts(work, args.layers, {ENGINES[e][0] for e in engines})
    if args.rounds == 0:  # set-up only
        return
    results: dict[str, list[dict]] = {e: [] for e in engines}
    bandwidth = []
    for r in range(args.rounds):
        bandwidth.append(memory_bandwidth(args.threads))
        for name in engines:
            artifact, kind, *extra = ENGINES[name]
            env = {**os.environ, **(extra[0] if extra else {})}
            cmd = [sys.executable, __file__, "--child", kind, "--path", str(work / artifact), "--threads",
                   str(args.threads), "--prompt", str(args.prompt), "--new", str(args.new)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {name}: {results[name][-1]}", flush=True)

    bw = statistics.median(bandwidth)
    med = {n: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for n, rs in results.items() if rs}
    lines = [f"phi-3-mini shape, {args.layers} layers, {args.threads} threads, prompt {args.prompt}, "
             f"{args.new} new tokens, median of {args.rounds} interleaved rounds; "
             f"memory bandwidth {bw:.1f} GB/s (same run)", "",
             "| engine | file GB | load s | prefill tok/s | decode tok/s | roofline tok/s | peak RSS GB |",
             "|---|---|---|---|---|---|---|"]
    for name, m in med.items():
        artifact = ENGINES[name][0]
        path = work / artifact
        size = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.glob("*.safetensors"))
        roof = bw * 1e9 / weight_bytes_per_token(work, artifact)
        lines.append(f"| {name} | {size / 1e9:.2f} | {m['load_s']:.1f} | {m['prefill_tps']:.1f} | "
                     f"{m['decode_tps']:.2f} | {roof:.2f} | {m['rss'] / 1e9:.2f} |")
    lines += ["", "| ours / llama.cpp | decode | prefill |", "|---|---|---|"]
    for ours, peer in PAIRS:
        if ours in med and peer in med:
            lines.append(f"| {ours} / {peer} | {med[ours]['decode_tps'] / med[peer]['decode_tps']:.2f} | "
                         f"{med[ours]['prefill_tps'] / med[peer]['prefill_tps']:.2f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
