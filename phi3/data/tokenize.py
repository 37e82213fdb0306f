"""`phi3 data tokenize`: text sources -> packed token shards, one shard per input file.

Input contract (what the data pipeline hands over):

- `*.jsonl` (JSON Lines, uncompressed): one object per line with a string field `text`
  (the field name is `--text-field`); every line is one document. Blank lines are skipped.
- `*.parquet`: a string column `text` (same `--text-field`); every row is one document.
- anything else (`.txt`, `.md`, `.py`, `.rst`, ...): the whole file is one UTF-8 document.
- a directory stands for every file under it (sorted, recursively); hidden files are skipped.

Output (a directory):

- `NNNNN.bin`: the tokens of input file NNNNN, documents each followed by the EOS id, as raw
  little-endian uint16 (vocabularies up to 65536) or uint32; read with `np.memmap`.
- `NNNNN.json`: that shard's record (source path, size, mtime, tokens, documents).
- `index.json`: tokenizer, dtype, eos id and the list of shards with their token counts.

Each shard and its record are written atomically, so a killed run resumes where it stopped:
a shard whose record matches its source file (path, size, mtime) is not tokenized again.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ..atomic import atomic_write, atomic_write_text
from ..errors import Phi3Error

INDEX = "index.json"


class DataError(Phi3Error):
    """A data source or a token shard is missing, unreadable or inconsistent."""


def load_tokenizer(spec: str | os.PathLike | None):
    """A tokenizer from an HF directory, a .gguf file, or None for the default model's."""
    from ..tokenizer import Tokenizer

    if spec is None:
        from ..default_model import default_model_path
        return Tokenizer.from_gguf(default_model_path())
    path = Path(spec)
    if path.is_dir():
        return Tokenizer.from_dir(path)
    if path.is_file():
        return Tokenizer.from_gguf(path)
    raise DataError(f"tokenizer {path}: no such file or directory (give an HF directory or a .gguf file)")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def expand_sources(sources: list[str | os.PathLike]) -> list[Path]:
    """Files named, and every non-hidden file under the directories named, in a stable order."""
    files: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file()
                            and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or directory")
    if not files:
        raise DataError(f"no input files in {', '.join(map(str, sources))}")
    return files


def iter_documents(path: Path, text_field: str = "text"):
    """The documents of one source file (see the module docstring for the formats)."""
    name = path.name.lower()
    if name.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                text = obj.get(text_field) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    raise DataError(f"{path}:{lineno}: expected an object with a string field {text_field!r}")
                yield text
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError
            raise DataError(f"{path}: unreadable Parquet file ({e})") from None
        if text_field not in pf.schema_arrow.names:
            raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield text
    else:
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _source_record(path: Path) -> dict:
    st = path.stat()
    return {"source": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


_WORKER_TOKENIZER = None


def _init_worker(tokenizer_spec):
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_spec)


def tokenize_file(path: Path, out: Path, shard: str, text_field: str, tokenizer=None) -> dict:
    """Tokenize one source file into `out/shard.bin` + `out/shard.json` (both atomic)."""
    tok = tokenizer or _WORKER_TOKENIZER
    dtype = token_dtype(tok.vocab_size)
    eos = tok.eos_token_id
    n_tokens = n_docs = 0

    def write(tmp: str) -> None:
        nonlocal n_tokens, n_docs
        with open(tmp, "wb") as f:
            for text in iter_documents(path, text_field):
                ids = tok.encode(text) + [eos]
                f.write(np.asarray(ids, dtype=dtype).tobytes())
                n_tokens += len(ids)
                n_docs += 1

    record = _source_record(path)
    atomic_write(out / f"{shard}.bin", write)
    record.update(shard=f"{shard}.bin", tokens=n_tokens, documents=n_docs)
    atomic_write_text(out / f"{shard}.json", json.dumps(record, indent=1) + "\n")
    return record


def _done(out: Path, shard: str, path: Path) -> dict | None:
    """The shard's record when it exists, matches the source file and its .bin is complete."""
    try:
        record = json.loads((out / f"{shard}.json").read_text())
    except (OSError, ValueError):
        return None
    src = _source_record(path)
    if any(record.get(k) != v for k, v in src.items()):
        return None
    return record


def tokenize(sources: list[str | os.PathLike], out: str | os.PathLike, tokenizer: str | None = None,
             text_field: str = "text", workers: int = 1, progress: bool = True) -> dict:
    """Tokenize every source file into shards under `out`; returns the index written there."""
    from tqdm import tqdm

    files = expand_sources(sources)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(tokenizer)
    if tok.eos_token_id is None:
        raise DataError(f"tokenizer {tok.source}: has no EOS token to separate documents")
    shards = [f"{i:05d}" for i in range(len(files))]
    records: dict[str, dict] = {}
    todo = []
    for shard, path in zip(shards, files):
        rec = _done(out, shard, path)
        if rec is not None:
            records[shard] = rec
        else:
            todo.append((shard, path))
    bar = tqdm(total=len(files), initial=len(records), unit="file", desc="tokenize", disable=not progress)
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
            futures = {pool.submit(tokenize_file, path, out, shard, text_field): shard for shard, path in todo}
            for fut, shard in futures.items():
                records[shard] = fut.result()
                bar.update()
    else:
        for shard, path in todo:
            records[shard] = tokenize_file(path, out, shard, text_field, tokenizer=tok)
            bar.update()
    bar.close()
    index = {
        "format": "phi3-token-shards/1",
        "tokenizer": tok.source,
        "vocab_size": tok.vocab_size,
        "dtype": token_dtype(tok.vocab_size).name,
        "eos_token_id": tok.eos_token_id,
        "text_field": text_field,
        "shards": [{"file": records[s]["shard"], "tokens": records[s]["tokens"], "documents": records[s]["documents"],
                    "source": records[s]["source"]} for s in shards],
    }
    index["tokens"] = sum(s["tokens"] for s in index["shards"])
    atomic_write_text(out / INDEX, json.dumps(index, indent=1) + "\n")
    return index


class TokenShards:
    """A tokenized source: its shards memory-mapped, with sampling of fixed-length windows."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index_file = self.path / INDEX
        try:
            self.index = json.loads(index_file.read_text())
        except FileNotFoundError:
            raise DataError(f"{index_file}: not found (tokenize the source first: phi3 data tokenize)") from None
        except (OSError, ValueError) as e:
            raise DataError(f"{index_file}: unreadable index ({e})") from None
        try:
            self.dtype = np.dtype(self.index["dtype"])
            entries = self.index["shards"]
            self.vocab_size = int(self.index["vocab_size"])
            self.eos_token_id = int(self.index["eos_token_id"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{index_file}: malformed index ({e!r})") from None
        self.shards: list[np.ndarray] = []
        for entry in entries:
            f = self.path / entry["file"]
            if not f.exists():
                raise DataError(f"{index_file}: shard {f} is missing")
            expected = entry["tokens"] * self.dtype.itemsize
            if f.stat().st_size != expected:
                raise DataError(f"{f}: {f.stat().st_size} bytes, expected {expected} ({entry['tokens']} tokens); "
                                "truncated or rewritten shard — tokenize again")
            if entry["tokens"]:
                self.shards.append(np.memmap(f, dtype=self.dtype, mode="r"))
        self.tokens = sum(len(s) for s in self.shards)

    def windows(self, length: int) -> np.ndarray:
        """Cumulative count of windows of `length` tokens per shard (a window stays in one shard)."""
        return np.cumsum([max(0, len(s) - length + 1) for s in self.shards])

    def window(self, k: int, length: int, cum: np.ndarray) -> np.ndarray:
        """The k-th window of `length` tokens (0 <= k < cum[-1])."""
        i = int(np.searchsorted(cum, k, side="right"))
        start = k - (int(cum[i - 1]) if i else 0)
        return np.asarray(self.shards[i][start:start + length], dtype=np.int64)
