"""Scale-out: the same stages over a local process pool and over Dask (a local Dask cluster)."""

import pytest

from phi3.data.dedup import DedupConfig, dedup
from phi3.data.engine import map_shards
from phi3.data.filters import quality_filter
from phi3.errors import Phi3Error


def shard_contents(d):
    return {p.name: p.read_text() for p in sorted(d.glob("*.jsonl"))}


def test_dask_engine_gives_the_same_shards_as_local_processes(corpus_shards, tmp_path):
    local = dedup(corpus_shards, tmp_path / "local", DedupConfig(), workers=2, engine="local")
    dask = dedup(corpus_shards, tmp_path / "dask", DedupConfig(), workers=2, engine="dask")
    assert shard_contents(tmp_path / "local") == shard_contents(tmp_path / "dask")
    assert (local["in"], local["out"], local["reasons"]) == (dask["in"], dask["out"], dask["reasons"])
    f_local = quality_filter(tmp_path / "local", tmp_path / "fl", workers=1)
    f_dask = quality_filter(tmp_path / "dask", tmp_path / "fd", workers=2, engine="dask")
    assert shard_contents(tmp_path / "fl") == shard_contents(tmp_path / "fd")
    assert f_local["reasons"] == f_dask["reasons"]


def _square(task):
    return {"x": task["x"] ** 2}


def test_map_shards_keeps_task_order():
    tasks = [{"x": i} for i in range(7)]
    assert [r["x"] for r in map_shards(_square, tasks, workers=3)] == [i * i for i in range(7)]
    with pytest.raises(Phi3Error, match="unknown engine 'spark'"):
        map_shards(_square, tasks, engine="spark")


def test_cli_errors_are_one_line(tmp_path, capsys):
    from phi3.cli import main

    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n')
    assert main(["data", "filter", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {tmp_path / 'bad.jsonl'}:1: field 'text' is missing, expected a string"
    assert main(["data", "filter", str(tmp_path), "--out", str(tmp_path / "o"), "--set", "min_wrods=3"]) == 2
    assert "unknown filter setting(s): min_wrods" in capsys.readouterr().err
