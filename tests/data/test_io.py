import json

import pytest

from phi3.data.io import content_hash, list_shards, read_records, write_records
from phi3.errors import Phi3Error


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.parquet"])
def test_shards_round_trip(tmp_path, name):
    recs = [{"id": "x", "text": "héllo", "source": "s"}, {"id": "y", "text": "two", "source": "s"}]
    assert write_records(tmp_path / name, recs) == 2
    assert list(read_records(tmp_path / name)) == recs
    assert list_shards(tmp_path) == [tmp_path / name]


def test_bad_records_name_file_line_and_field(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"id": 1, "text": "ok"}\n{"id": 2, "txt": "no"}\n')
    with pytest.raises(Phi3Error, match=r"bad.jsonl:2: field 'text' is missing"):
        list(read_records(p))
    p.write_text('{"id": 1, "text": "ok"}\n{"id": 2, "text": \n')
    with pytest.raises(Phi3Error, match=r"bad.jsonl:2: invalid JSON"):
        list(read_records(p))
    p.write_text('[1, 2]\n')
    with pytest.raises(Phi3Error, match=r"bad.jsonl:1: record is list"):
        list(read_records(p))
    g = tmp_path / "bad.jsonl.gz"
    g.write_bytes(b"not gzip")
    with pytest.raises(Phi3Error, match="bad.jsonl.gz: unreadable"):
        list(read_records(g))
    q = tmp_path / "bad.parquet"
    q.write_bytes(b"PAR1 garbage")
    with pytest.raises(Phi3Error, match="bad.parquet: unreadable Parquet"):
        list(read_records(q))
    with pytest.raises(Phi3Error, match="no such shard"):
        list_shards(tmp_path / "missing")


def test_records_without_id_get_one_from_the_file(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps({"text": "a"}) + "\n\n" + json.dumps({"text": "b"}) + "\n")
    assert [r["id"] for r in read_records(p)] == ["s:1", "s:3"]


def test_content_hash_ignores_case_and_spacing_only():
    assert content_hash("Hello  World\n") == content_hash("hello world")
    assert content_hash("hello world") != content_hash("hello, world")
