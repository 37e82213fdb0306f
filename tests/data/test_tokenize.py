"""`phi3 data tokenize`: JSONL / Parquet / text -> shards that decode back to the documents,
parallel == serial, resumable, and clear errors for bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from phi3.cli import main
from phi3.data.tokenize import DataError, TokenShards, tokenize
from phi3.tokenizer import Tokenizer

from ..conftest import SHARED

GPT2 = SHARED / "tokenizer" / "ggml-vocab-gpt-2.gguf"  # byte-level BPE: decode(encode(x)) == x


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_gguf(GPT2)


def make_sources(tmp: Path) -> tuple[Path, list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp / "src"
    src.mkdir()
    docs_jsonl = ["First document.\nWith two lines.", "Zweites Dokument — ünïcödé ✓", "def f(x):\n    return x * 2\n"]
    with open(src / "a.jsonl", "w") as f:
        for d in docs_jsonl:
            f.write(json.dumps({"text": d, "meta": 1}) + "\n")
        f.write("\n")
    docs_parquet = ["parquet row one", "parquet row two, a bit longer than the first"]
    pq.write_table(pa.table({"text": docs_parquet, "id": [1, 2]}), src / "b.parquet")
    stdlib = Path(json.__file__).read_text()  # real text that is always there: the stdlib's json/__init__.py
    (src / "c.py").write_text(stdlib)
    return src, docs_jsonl + docs_parquet + [stdlib]


def test_shards_decode_back_to_the_documents(tmp_path, tok):
    src, docs = make_sources(tmp_path)
    index = tokenize([src], tmp_path / "out", tokenizer=str(GPT2), progress=False)
    assert index["dtype"] == "uint16" and index["eos_token_id"] == tok.eos_token_id == 50256
    shards = TokenShards(tmp_path / "out")
    stream = np.concatenate([np.asarray(s) for s in shards.shards])
    assert stream[-1] == tok.eos_token_id and shards.tokens == index["tokens"] == len(stream)
    pieces = np.split(stream, np.flatnonzero(stream == tok.eos_token_id) + 1)[:-1]
    assert [tok.decode(p[:-1].tolist()) for p in pieces] == docs
    assert [s["documents"] for s in index["shards"]] == [3, 2, 1]


def test_parallel_equals_serial_and_resume_skips_done_files(tmp_path):
    src, _ = make_sources(tmp_path)
    tokenize([src], tmp_path / "serial", tokenizer=str(GPT2), progress=False)
    tokenize([src], tmp_path / "par", tokenizer=str(GPT2), workers=2, progress=False)
    for name in ("00000.bin", "00001.bin", "00002.bin"):
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "par" / name).read_bytes()
    out = tmp_path / "serial"
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.bin")}
    (out / "00001.json").unlink()  # as if killed before this file's record was written
    os.utime(src / "c.py", ns=(1, 1))  # a changed source is tokenized again
    tokenize([src], out, tokenizer=str(GPT2), progress=False)
    now = {p.name: p.stat().st_mtime_ns for p in out.glob("*.bin")}
    assert now["00000.bin"] == mtimes["00000.bin"]
    assert now["00001.bin"] != mtimes["00001.bin"] and now["00002.bin"] != mtimes["00002.bin"]
    assert (out / "00001.bin").read_bytes() == (tmp_path / "par" / "00001.bin").read_bytes()


def test_cli_and_bad_inputs(tmp_path, capsys):
    src, _ = make_sources(tmp_path)
    assert main(["data", "tokenize", str(src / "a.jsonl"), "-o", str(tmp_path / "o"), "--tokenizer", str(GPT2),
                 "--no-progress"]) == 0
    assert "wrote 1 shards" in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    assert main(["data", "tokenize", str(tmp_path / "bad.jsonl"), "-o", str(tmp_path / "o2"), "--tokenizer",
                 str(GPT2), "--no-progress"]) == 2
    assert f"{tmp_path / 'bad.jsonl'}:2: expected an object with a string field 'text'" in capsys.readouterr().err
    assert main(["data", "tokenize", str(tmp_path / "nope"), "-o", str(tmp_path / "o3"), "--no-progress"]) == 2
    assert "nope: no such file or directory" in capsys.readouterr().err
    # a missing or truncated shard is named when the shards are opened
    (tmp_path / "o" / "00000.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(DataError, match=r"00000.bin: 3 bytes, expected .* truncated"):
        TokenShards(tmp_path / "o")
    (tmp_path / "o" / "00000.bin").unlink()
    with pytest.raises(DataError, match=r"shard .*00000.bin is missing"):
        TokenShards(tmp_path / "o")
