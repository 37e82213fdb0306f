"""Load test of `phi3 serve` against llama.cpp's server (llama-cpp-python), same GGUF, same run.

For each server: one streaming client for --single-seconds (the baseline), then --clients
concurrent streaming clients for --seconds. Each client loops over chat requests (streamed, a
fixed max_tokens, sampled with a per-request seed) until time is up. Measured per server:
requests done and failed, generated tokens/s in aggregate (streamed content chunks: one per
token on both servers), time to first token and inter-token latency (p50 / p99).
Traffic goes to 127.0.0.1 only, and every loop is bounded in time.

    .venv/bin/python bench/serve_load.py                        # both servers, 16 clients, 60 s
    .venv/bin/python bench/serve_load.py --only phi3 --seconds 20

llama.cpp's server needs `llama-cpp-python[server]` built from source in its own virtualenv
(`make bench-serve` builds it, several minutes); --llama-python points at its interpreter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how rain forms, step by step.",
    "List ten animals that live in the ocean and describe each one.",
    "What are the benefits of regular exercise?",
    "Describe a walk through a busy market in the morning.",
    "Give me a recipe for a simple vegetable soup.",
    "Why is the sky blue? Explain it to a child.",
    "Write a letter to a friend about a trip to the mountains.",
]


@dataclass
class Stats:
    ok: int = 0
    failed: int = 0
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, seed: int,
                      max_tokens: int, stats: Stats) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0.8, "seed": seed}
    start = time.perf_counter()
    last, tokens, done = None, 0, False
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                stats.failed += 1
                stats.errors.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(chunk["error"])
                choices = chunk.get("choices") or []
                if choices and (choices[0].get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    if last is None:
                        stats.ttft.append(now - start)
                    else:
                        stats.itl.append(now - last)
                    last, tokens = now, tokens + 1
        if not done:
            raise RuntimeError("stream ended without [DONE]")
        stats.ok += 1
        stats.tokens += tokens
    except Exception as e:  # a failed request is counted and reported, never hidden
        stats.failed += 1
        stats.errors.append(f"{type(e).__name__}: {e}"[:200])


async def load(url: str, model: str, clients: int, seconds: float, max_tokens: int) -> tuple[Stats, float]:
    stats, deadline = Stats(), time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        async def worker(k: int):
            i = 0
            while time.perf_counter() < deadline:
                await one_request(client, url, model, PROMPTS[(k + i) % len(PROMPTS)], 1000 * k + i,
                                  max_tokens, stats)
                i += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        return stats, time.perf_counter() - start


CHAT = [  # one conversation, a message per turn; each request sends the whole history (as chat clients do)
    "I am planning a week-long trip through the north of Italy in October. I like old towns, museums, "
    "mountains and good food, and I will travel by train. Which cities should I visit, and in what order?",
    "Tell me more about the second city on your list: what to see there in one day, and where to eat.",
    "How long does the train take between those places, and do I need to book tickets in advance?",
    "What should I pack for the weather at that time of year, including for a day in the mountains?",
    "Suggest a day trip from the first city that is easy by train, with a short walk at the end.",
    "What are three local dishes I should try, and what is each one made of?",
    "Write the whole plan as a day-by-day list, one line per day.",
    "Thank you. Any last advice about museums: which ones need a reservation?",
]


async def chat_turns(url: str, model: str, max_tokens: int) -> list[float]:
    """One client, one conversation of len(CHAT) turns (greedy): seconds to the first content chunk of
    each turn. The history grows by every reply, so a server that prefills it all again slows down."""
    messages, ttft = [], []
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
        for text in CHAT:
            messages.append({"role": "user", "content": text})
            body = {"model": model, "messages": messages, "stream": True, "max_tokens": max_tokens,
                    "temperature": 0.0}
            start, first, reply = time.perf_counter(), None, []
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    choices = json.loads(line[6:]).get("choices") or []
                    content = (choices[0].get("delta") or {}).get("content") if choices else None
                    if content:
                        first = first or time.perf_counter()
                        reply.append(content)
            ttft.append(first - start)
            messages.append({"role": "assistant", "content": "".join(reply)})
    return ttft


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for the server's /v1/models; return the model id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            r = httpx.get(url + "/v1/models", timeout=2)
            if r.status_code == 200:
                return r.json()["data"][0]["id"]
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server at {url} not ready after {timeout}s")


def start_phi3(gguf: Path, port: int, slots: int, ctx: int, threads: int) -> subprocess.Popen:
    cmd = [str(ROOT / ".venv" / "bin" / "phi3"), "serve", "--model", str(gguf), "--port", str(port),
           "--slots", str(slots), "--ctx", str(ctx), "--max-queue", str(4 * slots), "--threads", str(threads)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_llama(python: str, gguf: Path, port: int, slots: int, ctx: int, threads: int) -> subprocess.Popen:
    threads = str(threads)
    cmd = [python, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "--n_ctx", str(ctx), "--n_threads", threads, "--n_threads_batch", threads, "--verbose", "False",
           "--interrupt_requests", "False"]  # default True: a new request cuts the running stream short
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def row(name: str, clients: int, s: Stats, elapsed: float) -> dict:
    return {"server": name, "clients": clients, "ok": s.ok, "failed": s.failed, "tokens": s.tokens,
            "tok_s": s.tokens / elapsed, "ttft_p50": pct(s.ttft, 50), "ttft_p99": pct(s.ttft, 99),
            "itl_p50": pct(s.itl, 50), "itl_p99": pct(s.itl, 99), "errors": s.errors[:3]}


def bench_server(name: str, proc: subprocess.Popen, url: str, args) -> list[dict]:
    try:
        model = wait_ready(url, proc)
        asyncio.run(load(url, model, 1, 3, 8))  # warm-up
        if args.chat:
            return [{"server": name, "ttft": asyncio.run(chat_turns(url, model, args.max_tokens))}]
        single = row(name, 1, *asyncio.run(load(url, model, 1, args.single_seconds, args.max_tokens)))
        print(f"  {name} 1 client: {single['tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
        many = row(name, args.clients, *asyncio.run(load(url, model, args.clients, args.seconds, args.max_tokens)))
        print(f"  {name} {args.clients} clients: {many['tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
        return [single, many]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def table(rows: list[dict]) -> str:
    head = ("| server | clients | requests ok | failed | tokens | tokens/s | vs 1 client "
            "| TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    base = {}
    for r in rows:
        if r["clients"] == 1:
            base[r["server"]] = r["tok_s"]
        scale = r["tok_s"] / base[r["server"]] if base.get(r["server"]) else float("nan")
        lines.append(f"| {r['server']} | {r['clients']} | {r['ok']} | {r['failed']} | {r['tokens']} "
                     f"| {r['tok_s']:.1f} | {scale:.2f}x | {1000 * r['ttft_p50']:.0f} | {1000 * r['ttft_p99']:.0f} "
                     f"| {1000 * r['itl_p50']:.0f} | {1000 * r['itl_p99']:.0f} |")
    return "\n".join(lines)


def chat_table(rows: list[dict], command: str, gguf: Path, args) -> str:
    names = [r["server"] for r in rows]
    lines = [f"`{command.strip()}`: model `{gguf.name}`, one client, {len(CHAT)} turns, max_tokens "
             f"{args.max_tokens}, greedy, {args.threads} compute thread(s); seconds to the first token of each turn",
             "", "| turn | " + " | ".join(names) + (" | ratio |" if len(rows) == 2 else " |"),
             "|---|" + "---|" * (len(rows) + (len(rows) == 2))]
    for k in range(len(CHAT)):
        cells = [f"{r['ttft'][k]:.3f}" for r in rows]
        ratio = [f"{rows[1]['ttft'][k] / rows[0]['ttft'][k]:.2f}"] if len(rows) == 2 else []
        lines.append(f"| {k + 1} | " + " | ".join(cells + ratio) + " |")
    totals = [sum(r["ttft"]) for r in rows]
    lines.append("| all | " + " | ".join([f"{t:.3f}" for t in totals]
                                       + ([f"{totals[1] / totals[0]:.2f}"] if len(rows) == 2 else [])) + " |")
    return "\n".join(lines)


def write_benchmarks(text: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    begin, end = "<!-- serve_load:begin -->", "<!-- serve_load:end -->"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{begin}\n{text}\n{end}"
    if begin in old:
        new = old[: old.index(begin)] + section + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(new)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--single-seconds", type=float, default=20)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ctx", type=int, default=1024, help="tokens per slot")
    p.add_argument("--threads", type=int, default=1,
                   help="compute threads of each server (default 1: on a shared machine, more threads stall)")
    p.add_argument("--only", choices=["phi3", "llama"], default=None)
    p.add_argument("--llama-python", default=str(ROOT / ".venv-llama" / "bin" / "python"))
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    p.add_argument("--chat", action="store_true",
                   help="instead: one client, one multi-turn conversation; time to the first token of each turn "
                        "(printed, not written to BENCHMARKS.md)")
    args = p.parse_args()

    sys.path.insert(0, str(ROOT))
    from phi3.default_model import default_model_path
    gguf = Path(args.model) if args.model else default_model_path()

    rows = []
    if args.only in (None, "phi3"):
        port = free_port()
        rows += bench_server("phi3 serve", start_phi3(gguf, port, args.clients, args.ctx, args.threads),
                             f"http://127.0.0.1:{port}", args)
    if args.only in (None, "llama"):
        port = free_port()
        rows += bench_server("llama-cpp-python", start_llama(args.llama_python, gguf, port, args.clients, args.ctx,
                                                                 args.threads),
                             f"http://127.0.0.1:{port}", args)

    command = "python bench/serve_load.py " + " ".join(sys.argv[1:])
    if args.chat:
        print(chat_table(rows, command, gguf, args))
        return 0
    text = "\n".join([
        "## Serving under load (`bench/serve_load.py`)",
        "",
        f"`{command.strip()}` on {platform.machine()}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; model `{gguf.name}`; {args.clients} streaming "
        f"clients for {args.seconds:.0f} s after one client for {args.single_seconds:.0f} s; max_tokens "
        f"{args.max_tokens}, temperature 0.8; {args.threads} compute thread(s) per server.",
        "",
        table(rows),
        "",
        "tokens/s: content chunks streamed per second, all clients together (one chunk per token on both "
        "servers); TTFT: request sent to first content chunk; ITL: gap between a stream's chunks. "
        "`phi3 serve` runs with --slots equal to the number of clients. llama-cpp-python's server has no "
        "parallel slots (one Llama object behind a global lock; run with --interrupt_requests False so a "
        "new request waits instead of cutting the running stream short), so its concurrent clients are served "
        "one sequence at a time; both servers use the same compute threads.",
    ])
    print(text)
    for r in rows:
        for e in r["errors"]:
            print(f"  {r['server']} error: {e}", file=sys.stderr)
    if not args.no_write:
        write_benchmarks(text)
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
