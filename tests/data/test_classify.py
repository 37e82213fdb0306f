"""The educational classifier: real MiniLM embeddings, scikit-learn, agreement on held-out labels."""

import json
import pickle

import numpy as np
import pytest

from phi3.data.classify import agreement, load_classifier, score_shards, train_classifier
from phi3.data.io import list_shards, read_records, write_records
from phi3.errors import Phi3Error


@pytest.fixture(scope="module")
def labelled(corpus_shards, tmp_path_factory):
    """Documentation pages labelled 4 and fortunes labelled 0: a known signal the classifier must learn."""
    from phi3.data.ingest import ingest

    root = tmp_path_factory.mktemp("labelled")
    ingest(["/usr/share/games/fortunes/education", "/usr/share/games/fortunes/computers"], root / "f", "fortunes",
           kind="fortune", group=6, limit=20)
    docs = [r for s in list_shards(corpus_shards) for r in read_records(s) if r["source"] in ("pydoc", "sklearn", "django")]
    fortunes = [r for s in list_shards(root / "f") for r in read_records(s)]
    rows = [dict(r, score=4) for r in docs] + [dict(r, score=0) for r in fortunes]
    write_records(root / "annotations.jsonl", rows)
    return root / "annotations.jsonl", len(docs), len(fortunes)


def test_classifier_learns_teacher_labels_and_reports_heldout_agreement(labelled, corpus_shards, tmp_path):
    path, n_docs, n_fortunes = labelled
    report = train_classifier(path, tmp_path / "clf.pkl", threshold=3, test_size=0.3)
    assert report["labels"] == n_docs + n_fortunes and report["train"] + report["test"] == report["labels"]
    held = report["heldout"]
    assert held["n"] == report["test"] and sum(map(sum, held["confusion"])) == held["n"]
    assert held["binary_accuracy"] >= 0.8 and held["f1"] >= 0.8
    assert json.loads((tmp_path / "clf.json").read_text())["heldout"] == held

    out = tmp_path / "scored"
    stats = score_shards(corpus_shards, out, tmp_path / "clf.pkl", workers=1)
    kept = [r for s in list_shards(out) for r in read_records(s)]
    assert stats["out"] == len(kept) and stats["in"] - len(kept) == stats["reasons"]["below_threshold"]
    assert all(r["edu_score"] >= 3 for r in kept)
    kept_sources = [r["source"] for r in kept]
    assert kept_sources.count("fortunes") <= 1 and kept_sources.count("pydoc") >= 6


def test_agreement_metrics():
    y = np.array([0, 1, 4, 5, 3, 2.0])
    p = np.array([0.2, 3.4, 4.1, 2.0, 3.0, 1.6])
    a = agreement(y, p, 3)
    # binary truth [F F T T T F], predicted [F T T F T F]: tp 2, fp 1, fn 1, tn 2
    assert a["confusion"] == [[2, 1], [1, 2]]
    assert a["binary_accuracy"] == pytest.approx(4 / 6) and a["f1"] == pytest.approx(2 / 3)
    assert a["score_accuracy"] == pytest.approx(4 / 6)  # rounded 0, 3, 4, 2, 3, 2 vs 0, 1, 4, 5, 3, 2


def test_bad_labels_and_files_are_clear_errors(tmp_path):
    write_records(tmp_path / "a.jsonl", [{"id": "1", "text": "x", "score": 9}])
    with pytest.raises(Phi3Error, match=r"a.jsonl: record 1: field 'score' is 9"):
        train_classifier(tmp_path / "a.jsonl", tmp_path / "c.pkl")
    write_records(tmp_path / "b.jsonl", [{"id": str(i), "text": "x", "score": None} for i in range(20)])
    with pytest.raises(Phi3Error, match="only 0 usable teacher labels"):
        train_classifier(tmp_path / "b.jsonl", tmp_path / "c.pkl")
    (tmp_path / "junk.pkl").write_bytes(b"junk")
    with pytest.raises(Phi3Error, match="not a classifier file"):
        load_classifier(tmp_path / "junk.pkl")
    (tmp_path / "dict.pkl").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(Phi3Error, match="not a classifier file"):
        load_classifier(tmp_path / "dict.pkl")
