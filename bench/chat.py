"""A multi-turn chat: time to the first token of each turn, phi3 with and without the conversation's
KV cache (`PromptCache`, what interactive `phi3 chat` uses) and llama.cpp (llama-cpp-python keeps
its context between calls and evaluates only the tokens after the longest common prefix), same run,
same Q4_0 file.

    .venv/bin/python bench/chat.py                    # phi-3-mini shape, 8 of its 32 layers
    .venv/bin/python bench/chat.py --layers 32

The conversation is made of tokens (random weights: the text would mean nothing): a 64-token system
prompt, then per turn a user message of --user tokens and a greedy reply of --reply tokens; turn k's
prompt is turn k-1's prompt + its reply + the new message, as a chat template builds it. The Q4_0
file is the one `bench/decode.py` builds (llama.cpp's quantizer on our F16 export), shared through
its --workdir. Each engine runs in its own process, engines interleaved over --rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

ENGINES = ["phi3 + prompt cache", "phi3, no cache", "llama.cpp (prefix reuse)"]


def conversation(turns: int, user: int, seed: int = 0) -> list[list[int]]:
    """The system prompt and each turn's user message, as token ids."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 30000, (n,), generator=g).tolist() for n in [64] + [user] * turns]


def run_child(engine: str, path: Path, threads: int, turns: int, user: int, reply: int) -> list[float]:
    """Seconds to the first token of each turn."""
    parts = conversation(turns, user)
    prompt, ttft = list(parts[0]), []
    if engine.startswith("llama.cpp"):
        import llama_cpp

        llm = llama_cpp.Llama(str(path), n_ctx=64 + turns * (user + reply) + 8, n_batch=512, n_threads=threads,
                              n_threads_batch=threads, verbose=False)
        for message in parts[1:]:
            prompt += message
            t = time.perf_counter()
            out = []
            for token in llm.generate(prompt, temp=0.0, reset=True):  # reuses the longest cached prefix
                if not out:
                    ttft.append(time.perf_counter() - t)
                out.append(token)
                if len(out) == reply:
                    break
            prompt += out
        return ttft
    import phi3
    from phi3.generate import PromptCache, SamplingParams, generate_tokens

    torch.set_num_threads(threads)
    model = phi3.load(path).model
    cache = PromptCache() if engine == "phi3 + prompt cache" else None
    for message in parts[1:]:
        prompt += message
        t = time.perf_counter()
        out = []
        for (token,) in generate_tokens(model, [prompt], SamplingParams(max_new_tokens=reply), frozenset(), 0, cache):
            if not out:
                ttft.append(time.perf_counter() - t)
            out.append(token)
        prompt += out
    return ttft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--user", type=int, default=64, help="tokens per user message")
    ap.add_argument("--reply", type=int, default=32, help="tokens per reply")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/phi3-bench-decode")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, Path(args.path), args.threads, args.turns, args.user, args.reply)))
        return

    from decode import build_artifacts

    work = Path(args.workdir) / f"layers{args.layers}"
    build_artifacts(work, args.layers, {"q4_0.gguf"})
    results: dict[str, list[list[float]]] = {e: [] for e in ENGINES}
    for r in range(args.rounds):
        for engine in ENGINES:
            cmd = [sys.executable, __file__, "--child", engine, "--path", str(work / "q4_0.gguf"), "--threads",
                   str(args.threads), "--turns", str(args.turns), "--user", str(args.user), "--reply", str(args.reply)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{engine}: failed\n{out.stderr[-2000:]}")
            results[engine].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {engine}: {[round(x, 3) for x in results[engine][-1]]}", flush=True)

    med = {e: [statistics.median(rs[i] for rs in runs) for i in range(args.turns)] for e, runs in results.items()}
    prompt_len = [64 + k * args.user + (k - 1) * args.reply for k in range(1, args.turns + 1)]
    lines = [f"phi-3-mini shape, {args.layers} layers, Q4_0 file, {args.threads} threads; {args.turns} turns of "
             f"{args.user} user + {args.reply} reply tokens after a 64-token system prompt; seconds to the first "
             f"token of each turn, median of {args.rounds} interleaved rounds", "",
             "| turn | prompt tokens | " + " | ".join(ENGINES) + " | no cache / cache | llama.cpp / cache |",
             "|---|---|" + "---|" * (len(ENGINES) + 2)]
    cached, plain, peer = (med[e] for e in ENGINES)
    for k in range(args.turns):
        lines.append(f"| {k + 1} | {prompt_len[k]} | " + " | ".join(f"{med[e][k]:.3f}" for e in ENGINES)
                     + f" | {plain[k] / cached[k]:.2f} | {peer[k] / cached[k]:.2f} |")
    lines.append(f"| all | | " + " | ".join(f"{sum(med[e]):.3f}" for e in ENGINES)
                 + f" | {sum(plain) / sum(cached):.2f} | {sum(peer) / sum(cached):.2f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
