import json

import pytest

from phi3.data.dedup import DedupConfig, dedup, shingles
from phi3.data.io import list_shards, read_records
from phi3.errors import Phi3Error


def ids(directory) -> set[str]:
    return {r["id"] for s in list_shards(directory) for r in read_records(s)}


def test_dedup_removes_injected_duplicates_keeps_unique_documents(corpus_shards, tmp_path):
    out = tmp_path / "dedup"
    report = dedup(corpus_shards, out, DedupConfig(threshold=0.8), workers=2)
    before, after = ids(corpus_shards), ids(out)
    exact, near = "pydoc/zz_json_copy.html#0", "pydoc/zz_csv_near.html#0"
    assert before - after == {exact, near}  # the injected duplicates go, every unique document stays
    assert {"pydoc/json.html#0", "pydoc/csv.html#0"} <= after
    assert report["exact_duplicates"] == 1 and report["near_duplicates"] == 1
    assert report["reasons"] == {"exact_duplicate": 1, "near_duplicate": 1}
    assert report["in"] == len(before) and report["out"] == len(before) - 2
    clusters = json.loads((out / "clusters.json").read_text())
    by_kept = {c["kept"]: [r["id"] for r in c["removed"]] for c in clusters}
    assert by_kept == {"pydoc/json.html#0": [exact], "pydoc/csv.html#0": [near]}
    # rerun: every shard is done, nothing redone, the same output
    again = dedup(corpus_shards, out, DedupConfig(threshold=0.8), workers=2)
    assert again["resumed_shards"] == again["shards"] and ids(out) == after


def test_near_duplicate_threshold_is_configurable(corpus_shards, tmp_path):
    """At a threshold above the pair's similarity the near duplicate is kept (only the exact one goes)."""
    report = dedup(corpus_shards, tmp_path / "d", DedupConfig(threshold=1.0, bands=8), workers=1)
    assert report["exact_duplicates"] == 1 and report["near_duplicates"] == 0


def test_dedup_resumes_after_a_lost_shard(corpus_shards, tmp_path):
    out = tmp_path / "dedup"
    dedup(corpus_shards, out, workers=1)
    victim = sorted(out.glob("*.jsonl"))[0]
    content = victim.read_text()
    victim.unlink()  # as if killed before this shard was written
    report = dedup(corpus_shards, out, workers=1)
    assert report["resumed_shards"] == report["shards"] - 1
    assert victim.read_text() == content


def test_dedup_settings_are_checked(corpus_shards, tmp_path):
    with pytest.raises(Phi3Error, match="bands must divide num_perm"):
        dedup(corpus_shards, tmp_path / "a", DedupConfig(bands=7))
    dedup(corpus_shards, tmp_path / "b", DedupConfig(shingle=5), workers=1)
    with pytest.raises(Phi3Error, match="other settings"):
        dedup(corpus_shards, tmp_path / "b", DedupConfig(shingle=3), workers=1)


def test_shingles_are_word_ngrams_of_normalised_text():
    assert shingles("The  cat sat. the CAT sat", 2) == {b"the cat", b"cat sat", b"sat the"}
    assert shingles("two words", 5) == {b"two words"}
