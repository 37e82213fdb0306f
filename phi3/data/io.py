"""Sharded records: JSONL (optionally .gz) and Parquet files whose rows carry a `text` field.

A record is a dict with at least `id` and `text` (and usually `source`). Every stage reads a
list of input shards and writes one output shard per input shard, atomically, so a shard that
exists is complete.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import unicodedata
from pathlib import Path
from typing import Iterable, Iterator

from ..atomic import atomic_write, atomic_write_text
from ..errors import Phi3Error

SHARD_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


def shard_format(path: str | os.PathLike) -> str:
    name = Path(path).name
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    raise Phi3Error(f"{path}: not a shard (expected one of {', '.join(SHARD_SUFFIXES)})")


def list_shards(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Shard files named by `inputs`: files, directories (their shards, sorted) or glob patterns."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    shards: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(SHARD_SUFFIXES)
                           and not f.name.startswith("."))
            if not found:
                raise Phi3Error(f"{p}: directory holds no shards ({', '.join(SHARD_SUFFIXES)})")
            shards.extend(found)
        elif p.is_file():
            shard_format(p)
            shards.append(p)
        else:
            matches = sorted(map(Path, glob.glob(str(item)))) if any(c in str(item) for c in "*?[") else []
            if not matches:
                raise Phi3Error(f"{item}: no such shard, directory or pattern match")
            shards.extend(m for m in matches if m.name.endswith(SHARD_SUFFIXES))
    return shards


def _check_record(rec, path: Path, line: int) -> dict:
    if not isinstance(rec, dict):
        raise Phi3Error(f"{path}:{line}: record is {type(rec).__name__}, expected a JSON object")
    text = rec.get("text")
    if not isinstance(text, str):
        raise Phi3Error(f"{path}:{line}: field 'text' is {'missing' if text is None else type(text).__name__}, "
                        "expected a string")
    if "id" not in rec:
        rec["id"] = f"{path.stem}:{line}"
    return rec


def read_records(path: str | os.PathLike) -> Iterator[dict]:
    """The records of one shard, checked: each is an object with a string `text`."""
    path = Path(path)
    fmt = shard_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise Phi3Error(f"{path}: unreadable Parquet file ({e})") from None
        if "text" not in table.column_names:
            raise Phi3Error(f"{path}: no 'text' column (columns: {', '.join(table.column_names)})")
        for i, rec in enumerate(table.to_pylist(), 1):
            yield _check_record(rec, path, i)
        return
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise Phi3Error(f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno})") from None
                yield _check_record(rec, path, i)
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
        raise Phi3Error(f"{path}: unreadable ({e})") from None


def write_records(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records to a JSONL(.gz) or Parquet shard atomically; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = list(records)
    fmt = shard_format(path)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        def write(tmp: str) -> None:
            table = pa.Table.from_pylist(records) if records else pa.table({"id": pa.array([], pa.string()),
                                                                             "text": pa.array([], pa.string())})
            pq.write_table(table, tmp)
    else:
        def write(tmp: str) -> None:
            data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
            if path.name.endswith(".gz"):
                buf = io.BytesIO()
                with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as g:
                    g.write(data)
                data = buf.getvalue()
            Path(tmp).write_bytes(data)
    atomic_write(path, write)
    return len(records)


def write_json(path: str | os.PathLike, obj) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Phi3Error(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise Phi3Error(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None


def normalize(text: str) -> str:
    """Text for comparison: NFKC, lower case, whitespace collapsed (punctuation kept)."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def content_hash(text: str) -> str:
    """The exact-dedup key and cache key of a document: sha256 of its normalised text."""
    return hashlib.sha256(normalize(text).encode("utf-8")).hexdigest()
