"""Decontamination: drop documents that share a long word n-gram (13 by default) with an eval set.

Evaluation sets are shards (JSONL/Parquet with `text`) or plain text files (one document per
file). Words are taken from the normalised text with punctuation removed; an eval document
shorter than n words contributes itself as one n-gram. Stats count the drops per eval set.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from ..errors import Phi3Error
from .io import SHARD_SUFFIXES, normalize, read_records
from .stage import filter_shard, run_stage

_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(normalize(text))


def ngram_hashes(text: str, n: int) -> set[bytes]:
    w = words(text)
    if not w:
        return set()
    grams = [w] if len(w) < n else (w[i:i + n] for i in range(len(w) - n + 1))
    return {hashlib.blake2b(" ".join(g).encode(), digest_size=8).digest() for g in grams}


def eval_texts(path: Path) -> list[str]:
    if path.name.endswith(SHARD_SUFFIXES):
        return [r["text"] for r in read_records(path)]
    try:
        return [path.read_text(encoding="utf-8", errors="replace")]
    except OSError as e:
        raise Phi3Error(f"{path}: cannot read eval set ({e.strerror})") from None


def build_index(eval_sets: dict[str, list[str | Path]], n: int) -> dict[bytes, str]:
    """n-gram hash -> name of the eval set it comes from."""
    index: dict[bytes, str] = {}
    for name, paths in eval_sets.items():
        for p in paths:
            p = Path(p)
            files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
            if not p.exists():
                raise Phi3Error(f"eval set {name!r}: {p}: no such file or directory")
            for f in files:
                for text in eval_texts(f):
                    for h in ngram_hashes(text, n):
                        index.setdefault(h, name)
    if not index:
        raise Phi3Error("decontam: the eval sets hold no text")
    return index


def decontam_shard(src: Path, dst: Path, index_path: str, n: int) -> dict:
    import pickle

    index = pickle.loads(Path(index_path).read_bytes())

    def decide(rec):
        for h in ngram_hashes(rec["text"], n):
            name = index.get(h)
            if name is not None:
                return f"contaminated:{name}"
        return None

    return filter_shard(src, dst, decide)


def decontaminate(inputs, out_dir, eval_sets: dict[str, list], *, n: int = 13, workers=None, engine="local",
                  dask_address=None) -> dict:
    import pickle

    from ..atomic import atomic_write_bytes

    if n < 1:
        raise Phi3Error(f"decontam n-gram size must be >= 1, got {n}")
    out_dir = Path(out_dir)
    index = build_index(eval_sets, n)
    index_path = out_dir / ".work" / "eval_ngrams.pkl"
    index_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(index_path, pickle.dumps(index))
    return run_stage("decontam", decontam_shard, inputs, out_dir, params={"index_path": str(index_path), "n": n},
                     workers=workers, engine=engine, dask_address=dask_address,
                     extra={"ngram": n, "eval_sets": {k: [str(p) for p in v] for k, v in eval_sets.items()},
                            "eval_ngrams": len(index)})
