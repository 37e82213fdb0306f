import pytest

from phi3.data.decontam import decontaminate, ngram_hashes, words
from phi3.data.io import list_shards, read_records, write_records
from phi3.errors import Phi3Error


def test_documents_sharing_a_13_gram_with_an_eval_set_are_dropped(corpus_shards, tmp_path):
    docs = {r["id"]: r["text"] for s in list_shards(corpus_shards) for r in read_records(s)}
    heap_words = words(docs["pydoc/heapq.html#0"])
    bisect_words = words(docs["pydoc/bisect.html#0"])
    evals = tmp_path / "evals"
    # one eval item quotes 13 words of heapq's page (with other case and punctuation), another only 12 of bisect's
    write_records(evals / "qa.jsonl", [
        {"id": "q1", "text": "Question: " + ", ".join(heap_words[200:213]).upper() + "!! What is it?"},
        {"id": "q2", "text": "Prompt: " + " ".join(bisect_words[100:112])},
    ])
    (tmp_path / "code_eval.txt").write_text(docs["code/colorsys.py#0"][:2000])
    report = decontaminate(corpus_shards, tmp_path / "out", {"qa": [evals], "code": [tmp_path / "code_eval.txt"]},
                           workers=2)
    kept = {r["id"] for s in list_shards(tmp_path / "out") for r in read_records(s)}
    assert set(docs) - kept == {"pydoc/heapq.html#0", "code/colorsys.py#0"}
    assert "pydoc/bisect.html#0" in kept
    assert report["reasons"] == {"contaminated:qa": 1, "contaminated:code": 1}
    assert report["ngram"] == 13


def test_ngram_size_is_configurable_and_checked(tmp_path):
    write_records(tmp_path / "in" / "a.jsonl", [{"id": "1", "text": "one two three four five six"}])
    (tmp_path / "e.txt").write_text("three four five")
    assert decontaminate(tmp_path / "in", tmp_path / "o13", {"e": [tmp_path / "e.txt"]})["out"] == 1
    assert decontaminate(tmp_path / "in", tmp_path / "o3", {"e": [tmp_path / "e.txt"]}, n=3)["out"] == 0
    with pytest.raises(Phi3Error, match="no such file"):
        decontaminate(tmp_path / "in", tmp_path / "x", {"e": [tmp_path / "missing.txt"]})
    assert len(ngram_hashes("a b c d", 2)) == 3
