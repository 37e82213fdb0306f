"""Phase mixtures: datasets drawn from sources by weight up to a token budget.

A mixture spec (TOML) names phases; each phase has a token budget and sources, each a set of
shards with a weight. A source's share of the budget is `tokens * weight / sum(weights)`; its
documents are taken in a seeded order until the share is met, going through the source again
(at most `max_epochs` times) when it is too small. The output, per phase, is JSONL (or Parquet)
shards with `text`, `source` and `id`, plus `manifest.json`: what `phi3 data tokenize` reads.

    [[phase]]
    name = "phase1"
    tokens = 2_000_000
    [[phase.source]]
    name = "web"
    path = "out/classified"
    weight = 0.8
"""

from __future__ import annotations

import hashlib
import time
import tomllib
from pathlib import Path

from ..errors import Phi3Error
from .io import list_shards, read_records, write_json, write_records

DEFAULT_TOKENIZER = "default"


def load_tokenizer(spec: str | None):
    """Count tokens with the given tokenizer: an HF dir / tokenizer.json / .gguf, or the default model's."""
    from ..tokenizer import Tokenizer

    if spec in (None, DEFAULT_TOKENIZER):
        from ..default_model import default_model_path
        return Tokenizer.from_gguf(default_model_path())
    p = Path(spec)
    if p.suffix == ".gguf":
        return Tokenizer.from_gguf(p)
    if p.is_dir():
        return Tokenizer.from_dir(p)
    if p.name == "tokenizer.json":
        return Tokenizer.from_dir(p.parent)
    raise Phi3Error(f"{spec}: not a tokenizer (give a .gguf file, an HF directory or its tokenizer.json)")


def load_spec(path: str | Path) -> dict:
    try:
        spec = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Phi3Error(f"{path}: no such mixture spec") from None
    except tomllib.TOMLDecodeError as e:
        raise Phi3Error(f"{path}: invalid TOML ({e})") from None
    return check_spec(spec.get("mix", spec), str(path), base=Path(path).parent)


def check_spec(spec: dict, where: str, base: Path | None = None) -> dict:
    phases = spec.get("phase")
    if not isinstance(phases, list) or not phases:
        raise Phi3Error(f"{where}: no [[phase]] tables")
    names = set()
    for i, ph in enumerate(phases):
        at = f"{where}: phase {ph.get('name', i)!r}"
        if not isinstance(ph.get("name"), str) or ph["name"] in names:
            raise Phi3Error(f"{at}: needs a unique string 'name'")
        names.add(ph["name"])
        if not isinstance(ph.get("tokens"), int) or ph["tokens"] <= 0:
            raise Phi3Error(f"{at}: 'tokens' must be a positive integer, got {ph.get('tokens')!r}")
        sources = ph.get("source")
        if not isinstance(sources, list) or not sources:
            raise Phi3Error(f"{at}: no [[phase.source]] tables")
        for s in sources:
            if not isinstance(s.get("name"), str) or "path" not in s:
                raise Phi3Error(f"{at}: each source needs 'name' and 'path'")
            w = s.get("weight", 1.0)
            if not isinstance(w, (int, float)) or w <= 0:
                raise Phi3Error(f"{at}: source {s['name']!r}: 'weight' must be > 0, got {w!r}")
            if base is not None and not Path(s["path"]).is_absolute():
                s["path"] = str(base / s["path"])
    return spec


def _order_key(seed: int, phase: str, rec_id: str) -> str:
    return hashlib.sha256(f"{seed}\x00{phase}\x00{rec_id}".encode()).hexdigest()


def draw(counts: list[int], target: int, max_epochs: int) -> tuple[list[tuple[int, int]], int, bool]:
    """(index, epoch) of the documents taken, in order, cycling up to `max_epochs`; tokens; short.

    A document is taken when it brings the total closer to `target` (whole documents only, so
    the total lands within half a document of the budget); short means the source ran out.
    """
    taken, tokens = [], 0
    for epoch in range(max_epochs):
        for i, c in enumerate(counts):
            if tokens >= target:
                return taken, tokens, False
            if abs(target - tokens - c) < target - tokens:
                taken.append((i, epoch))
                tokens += c
    return taken, tokens, tokens < target and sum(counts) * max_epochs < target


def build_mixtures(spec: dict, out_dir: str | Path, *, tokenizer: str | None = None, seed: int = 0,
                   shard_records: int = 1000, fmt: str = "jsonl") -> dict:
    """Write each phase's shards and manifest under `out_dir/<phase>/`; return the manifests."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    tok = load_tokenizer(tokenizer or spec.get("tokenizer"))
    seed = spec.get("seed", seed)
    shard_records = spec.get("shard_records", shard_records)
    fmt = spec.get("format", fmt)
    manifests = {}
    for phase in spec["phase"]:
        ph_dir = out_dir / phase["name"]
        manifest_path = ph_dir / "manifest.json"
        if manifest_path.exists():  # a finished phase (its manifest is written last)
            from .io import read_json
            manifests[phase["name"]] = read_json(manifest_path)
            continue
        total_w = sum(s.get("weight", 1.0) for s in phase["source"])
        out, source_rows = [], []
        for s in phase["source"]:
            recs = [r for shard in list_shards(s["path"]) for r in read_records(shard)]
            recs.sort(key=lambda r: _order_key(seed, phase["name"], str(r["id"])))
            counts = [len(e) for e in tok.backend.encode_batch([r["text"] for r in recs], add_special_tokens=False)] \
                if recs else []
            target = round(phase["tokens"] * s.get("weight", 1.0) / total_w)
            idx, tokens, short = draw(counts, target, int(s.get("max_epochs", 1)))
            for i, ep in idx:
                r = recs[i]
                out.append({"id": f"{r['id']}" if ep == 0 else f"{r['id']}@{ep}", "text": r["text"],
                            "source": s["name"]})
            source_rows.append({
                "name": s["name"], "path": s["path"], "weight": s.get("weight", 1.0),
                "target_tokens": target, "tokens": tokens, "documents": len(idx),
                "available_documents": len(recs), "available_tokens": int(sum(counts)),
                "epochs": round(len(idx) / len(recs), 3) if recs else 0.0, "short": short,
            })
        out.sort(key=lambda r: _order_key(seed, phase["name"] + "/mix", r["id"]))  # interleave sources
        suffix = ".parquet" if fmt == "parquet" else ".jsonl"
        shards = []
        for j in range(0, max(len(out), 1), max(1, shard_records)):
            name = f"{phase['name']}-{j // shard_records:05d}{suffix}"
            write_records(ph_dir / name, out[j:j + shard_records])
            shards.append(name)
        manifest = {
            "phase": phase["name"], "format": fmt, "text_field": "text", "shards": shards,
            "documents": len(out), "tokens": sum(r["tokens"] for r in source_rows), "target_tokens": phase["tokens"],
            "tokenizer": str(tokenizer or spec.get("tokenizer") or DEFAULT_TOKENIZER), "seed": seed,
            "sources": source_rows,
        }
        write_json(manifest_path, manifest)
        manifests[phase["name"]] = manifest
    report = {"stage": "mix", "phases": {k: {"documents": m["documents"], "tokens": m["tokens"],
                                             "target_tokens": m["target_tokens"]} for k, m in manifests.items()},
              "seconds": round(time.perf_counter() - start, 3)}
    write_json(out_dir / "stats.json", report)
    return report
