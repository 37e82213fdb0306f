"""Data-pipeline throughput on this machine: documents/s for dedup and for classifier scoring.

Dedup is measured against datatrove's MinHash dedup (signatures, buckets, clusters, filter) on the
same documents, in the same run, with the same shingle size and LSH bands x rows. The corpus is
real offline text (Debian's Python, scikit-learn and Django HTML docs; `make data-deps`) with
injected exact and near duplicates. Results are printed as a table and written to BENCHMARKS.md.

    .venv/bin/pip install datatrove 'xxhash<4' orjson spacy   # the peer, for this bench only
    .venv/bin/python bench/data.py [--docs 1500] [--score-docs 200] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from phi3.data.classify import score_shards, train_classifier  # noqa: E402
from phi3.data.dedup import DedupConfig, dedup  # noqa: E402
from phi3.data.ingest import iter_records  # noqa: E402
from phi3.data.io import list_shards, read_records, write_records  # noqa: E402

SOURCES = [("pydoc", "/usr/share/doc/python3.11/html"), ("sklearn", "/usr/share/doc/python-sklearn-doc/html"),
           ("django", "/usr/share/doc/python-django-doc/html")]
BANDS, ROWS, SHINGLE = 14, 8, 5  # datatrove's defaults: 14 buckets x 8 hashes, 5-grams


def build_corpus(out: Path, n_docs: int, n_shards: int, seed: int = 0) -> tuple[int, int]:
    """n_docs real pages + 5% exact and 5% near duplicates, spread over n_shards JSONL shards."""
    docs = []
    per = n_docs // len(SOURCES) + 1
    for source, path in SOURCES:
        for rec in iter_records([path], source, kind="html"):
            if len(rec["text"].split()) >= 50:
                docs.append({"id": rec["id"], "text": rec["text"], "source": source})
            if sum(d["source"] == source for d in docs) >= per:
                break
    docs = docs[:n_docs]
    rng = random.Random(seed)
    injected = []
    for i, d in enumerate(rng.sample(docs, len(docs) // 10)):
        if i % 2 == 0:
            injected.append({"id": d["id"] + "#exact", "text": d["text"], "source": d["source"]})
        else:
            words = d["text"].split()
            for _ in range(max(1, len(words) // 100)):  # change 1% of the words
                words[rng.randrange(len(words))] = "changed"
            injected.append({"id": d["id"] + "#near", "text": " ".join(words), "source": d["source"]})
    allrecs = docs + injected
    rng.shuffle(allrecs)
    for s in range(n_shards):
        write_records(out / f"bench-{s:05d}.jsonl", allrecs[s::n_shards])
    return len(allrecs), len(injected)


def ours(inp: Path, out: Path, workers: int) -> tuple[float, int]:
    start = time.perf_counter()
    rep = dedup(inp, out, DedupConfig(shingle=SHINGLE, num_perm=BANDS * ROWS, bands=BANDS, threshold=0.7),
                workers=workers)
    return time.perf_counter() - start, rep["removed"]


def datatrove_minhash(inp: Path, work: Path, workers: int, n_shards: int) -> tuple[float, int]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    cfg = MinhashConfig(n_grams=SHINGLE, num_buckets=BANDS, hashes_per_bucket=ROWS)
    logs = work / "logs"
    reader = lambda: JsonlReader(str(inp), text_key="text", id_key="id")  # noqa: E731
    common = dict(workers=workers, start_method="fork")
    start = time.perf_counter()
    LocalPipelineExecutor([reader(), MinhashDedupSignature(str(work / "sigs"), config=cfg)], tasks=n_shards,
                          logging_dir=str(logs / "1"), **common).run()
    LocalPipelineExecutor([MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=cfg)],
                          tasks=BANDS, logging_dir=str(logs / "2"), **common).run()
    LocalPipelineExecutor([MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=cfg)],
                          tasks=1, logging_dir=str(logs / "3"), **common).run()
    LocalPipelineExecutor([reader(), MinhashDedupFilter(str(work / "remove")), JsonlWriter(str(work / "out"))],
                          tasks=n_shards, logging_dir=str(logs / "4"), **common).run()
    seconds = time.perf_counter() - start
    kept = sum(1 for f in (work / "out").rglob("*.jsonl*") for _ in read_records_any(f))
    return seconds, kept


def read_records_any(path: Path):
    import gzip
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def classifier_scoring(tmp: Path, inp: Path, n: int, workers: int) -> tuple[float, int]:
    """Train on source-derived labels (docs 4, fortunes 0), then score n documents."""
    fortunes = list(iter_records(["/usr/share/games/fortunes/computers"], "fortunes", kind="fortune", group=6))[:40]
    docs = [r for s in list_shards(inp) for r in read_records(s)]
    write_records(tmp / "labels.jsonl", [dict(r, score=4) for r in docs[:40]] + [dict(r, score=0) for r in fortunes])
    train_classifier(tmp / "labels.jsonl", tmp / "clf.pkl")
    subset = docs[40:40 + n]
    for s in range(workers * 2):
        write_records(tmp / "score_in" / f"s{s}.jsonl", subset[s::workers * 2])
    start = time.perf_counter()
    score_shards(tmp / "score_in", tmp / "score_out", tmp / "clf.pkl", workers=workers)
    return time.perf_counter() - start, len(subset)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=1500)
    ap.add_argument("--score-docs", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="phi3-bench-data-"))
    try:
        n, injected = build_corpus(tmp / "in", args.docs, args.shards)
        t_ours, removed_ours = ours(tmp / "in", tmp / "ours", args.workers)
        t_dt, kept_dt = datatrove_minhash(tmp / "in", tmp / "dt", args.workers, args.shards)
        t_clf, n_clf = classifier_scoring(tmp, tmp / "ours", args.score_docs, args.workers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [
        ("dedup (phi3: exact + MinHash LSH)", n, t_ours, f"removed {removed_ours} (injected {injected})"),
        ("dedup (datatrove MinHash, 4 stages)", n, t_dt, f"removed {n - kept_dt} (injected {injected})"),
        ("classifier scoring (MiniLM + ridge)", n_clf, t_clf, "embeds every document"),
    ]
    header = "| stage | documents | seconds | documents/s | notes |\n|---|---:|---:|---:|---|"
    lines = [f"| {name} | {docs} | {secs:.1f} | {docs / secs:.1f} | {note} |" for name, docs, secs, note in rows]
    table = "\n".join([header, *lines])
    print(table)
    if not args.no_write:
        cmd = ".venv/bin/python bench/data.py " + " ".join(sys.argv[1:])
        load = os.getloadavg()[0]
        section = (f"## Data pipeline (bench/data.py)\n\n`{cmd.strip()}` (`make bench-data` installs the peer "
                   f"first) — {os.cpu_count()} cores (load average {load:.1f} at the end), {args.workers} workers, "
                   f"{args.shards} shards, shingle {SHINGLE}, {BANDS} bands x {ROWS} rows, "
                   f"{time.strftime('%Y-%m-%d')}. Times are wall clock for the whole stage, worker start-up "
                   f"included (for scoring: loading torch and MiniLM in each worker; documents are cut to "
                   f"2,000 characters before embedding).\n\n{table}\n")
        write_section(ROOT / "BENCHMARKS.md", "## Data pipeline (bench/data.py)", section)


def write_section(path: Path, title: str, section: str) -> None:
    """Replace (or append) our section of BENCHMARKS.md, leaving the others as they are."""
    from phi3.atomic import atomic_write_text

    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if title in text:
        start = text.index(title)
        nxt = text.find("\n## ", start + len(title))
        text = text[:start] + section + (text[nxt + 1:] if nxt != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(path, text)


if __name__ == "__main__":
    main()
