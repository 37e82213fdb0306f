"""One stage over shards: one output shard per input shard, resumable, with a stats report.

A shard is done when its output and its stats file (`.stats/<shard>.json`, written after the
output) both exist; a rerun skips done shards and redoes any other (outputs are atomic, so a
half-finished shard never stands at its final path). `stats.json` in the output directory sums
the shards: records in and out, the reasons records were dropped, the time taken.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

from ..errors import Phi3Error
from .engine import map_shards
from .io import list_shards, read_json, read_records, write_json, write_records


def stats_path(out_dir: Path, shard_name: str) -> Path:
    return out_dir / ".stats" / f"{shard_name}.json"


def output_name(src: Path, fmt: str | None) -> str:
    """The output shard name: the input's, with its suffix changed when `fmt` asks another format."""
    name = src.name
    if fmt is None:
        return name
    stem = name.removesuffix(".gz").removesuffix(".jsonl").removesuffix(".parquet")
    return stem + (".parquet" if fmt == "parquet" else ".jsonl")


def plan_shards(inputs, out_dir: Path, fmt: str | None = None) -> list[tuple[Path, Path]]:
    shards = list_shards(inputs)
    pairs, seen = [], {}
    for src in shards:
        dst = out_dir / output_name(src, fmt)
        if dst.name in seen:
            raise Phi3Error(f"{src} and {seen[dst.name]} would both write {dst}; give shards distinct names")
        seen[dst.name] = src
        if dst.resolve() == src.resolve():
            raise Phi3Error(f"{src}: output directory is the input directory; choose another --out")
        pairs.append((src, dst))
    return pairs


def filter_shard(src: Path, dst: Path, decide: Callable[[dict], str | None],
                 transform: Callable[[dict], dict] | None = None) -> dict:
    """Keep the records for which `decide` returns None; count the reasons of the others."""
    kept, reasons, n_in = [], Counter(), 0
    for rec in read_records(src):
        n_in += 1
        if transform is not None:
            rec = transform(rec)
        reason = decide(rec)
        if reason is None:
            kept.append(rec)
        else:
            reasons[reason] += 1
    write_records(dst, kept)
    return {"in": n_in, "out": len(kept), "reasons": dict(reasons)}


def _run_task(task: dict) -> dict:
    """Worker side: run the shard function, then write the shard's stats (marks it done)."""
    start = time.perf_counter()
    stats = task["fn"](Path(task["src"]), Path(task["dst"]), **task["params"])
    stats["seconds"] = round(time.perf_counter() - start, 4)
    write_json(task["stats"], stats)
    return stats


def run_stage(name: str, shard_fn: Callable[..., dict], inputs, out_dir: str | Path, *, params: dict | None = None,
              workers: int | None = None, engine: str = "local", dask_address: str | None = None,
              fmt: str | None = None, extra: dict | None = None) -> dict:
    """Apply `shard_fn(src, dst, **params) -> stats` to every input shard not already done."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pairs = plan_shards(inputs, out_dir, fmt)
    todo, done = [], []
    for src, dst in pairs:
        sp = stats_path(out_dir, dst.name)
        if dst.exists() and sp.exists():
            done.append(dst.name)
        else:
            todo.append({"fn": shard_fn, "src": str(src), "dst": str(dst), "stats": str(sp), "params": params or {}})
    map_shards(_run_task, todo, workers=workers, engine=engine, dask_address=dask_address, desc=name)
    report = summarize(name, [stats_path(out_dir, dst.name) for _, dst in pairs])
    report.update(shards=len(pairs), resumed_shards=len(done), seconds=round(time.perf_counter() - start, 3))
    if extra:
        report.update(extra)
    write_json(out_dir / "stats.json", report)
    return report


def summarize(name: str, stats_files: Iterable[Path]) -> dict:
    n_in = n_out = 0
    reasons: Counter = Counter()
    shard_seconds = 0.0
    for sp in stats_files:
        s = read_json(sp)
        n_in += s["in"]
        n_out += s["out"]
        reasons.update(s.get("reasons", {}))
        shard_seconds += s.get("seconds", 0.0)
    return {"stage": name, "in": n_in, "out": n_out, "removed": n_in - n_out,
            "reasons": dict(reasons.most_common()), "shard_seconds": round(shard_seconds, 3)}
