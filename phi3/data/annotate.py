"""Educational-value annotation: the teacher scores a sample of documents on a 0-5 rubric.

The sample is chosen by a seeded hash of each record's id, so it is the same on every rerun.
The prompt is a text file with a `{document}` placeholder (default: `prompts/edu_score.txt`,
after the FineWeb-Edu rubric); the first integer 0-5 in the answer is the score, and answers
without one are counted as `unparseable`.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import Counter
from importlib import resources
from pathlib import Path

from ..errors import Phi3Error
from .io import content_hash, list_shards, read_records, write_json, write_records
from .teacher import Cache, Teacher, TeacherConfig

# a digit standing alone: not part of a number (10, 2.5) nor of a word (2to3, 3rd, v1)
_SCORE_AFTER_LABEL = re.compile(r"score\s*(?:is|of|=|:)?\s*\**\s*([0-5])(?!\w|[.,][0-9])", re.IGNORECASE)
_FIRST_DIGIT = re.compile(r"(?<![\w.])([0-5])(?!\w|[.,][0-9])")


def default_prompt_path() -> Path:
    return Path(str(resources.files("phi3.data") / "prompts" / "edu_score.txt"))


def load_prompt(path: str | Path | None, placeholder: str = "{document}") -> str:
    path = Path(path) if path else default_prompt_path()
    try:
        template = path.read_text(encoding="utf-8")
    except OSError as e:
        raise Phi3Error(f"{path}: cannot read prompt file ({e.strerror})") from None
    if placeholder not in template:
        raise Phi3Error(f"{path}: prompt file has no {placeholder} placeholder")
    return template


def build_prompt(template: str, text: str, max_chars: int) -> str:
    return template.replace("{document}", text[:max_chars])


def parse_score(answer: str) -> int | None:
    """The rubric score in a teacher's answer: after 'score', else the first integer 0-5."""
    m = _SCORE_AFTER_LABEL.search(answer) or _FIRST_DIGIT.search(answer)
    return int(m.group(1)) if m else None


def sample_key(seed: int, rec_id: str) -> str:
    return hashlib.sha256(f"{seed}\x00{rec_id}".encode()).hexdigest()


def sample_records(inputs, n: int | None, seed: int) -> list[dict]:
    """`n` records chosen by seeded hash of their id (all when n is None), one per content."""
    records, seen = [], set()
    for shard in list_shards(inputs):
        for rec in read_records(shard):
            h = content_hash(rec["text"])
            if h not in seen:
                seen.add(h)
                records.append(rec)
    records.sort(key=lambda r: sample_key(seed, str(r["id"])))
    return records if n is None else records[:n]


def annotate(inputs, out_dir: str | Path, teacher: TeacherConfig, *, sample: int | None = 1000, seed: int = 0,
             prompt_path: str | Path | None = None, max_chars: int = 2000, cache_path: str | Path | None = None,
             threshold: int = 3) -> dict:
    """Score a sample with the teacher; write `annotations.jsonl` and `stats.json` in `out_dir`."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    template = load_prompt(prompt_path)
    records = sample_records(inputs, sample, seed)
    if not records:
        raise Phi3Error(f"annotate: no records in {inputs}")
    cache = Cache(cache_path or out_dir / "cache.sqlite")
    try:
        t = Teacher(teacher, cache)
        answers = t.complete_many([build_prompt(template, r["text"], max_chars) for r in records], desc="annotate")
        calls = t.stats
    finally:
        cache.close()
    scores = Counter()
    out = []
    for rec, answer in zip(records, answers):
        score = parse_score(answer)
        scores["unparseable" if score is None else str(score)] += 1
        out.append({"id": rec["id"], "text": rec["text"], "source": rec.get("source"), "score": score,
                    "answer": answer})
    write_records(out_dir / "annotations.jsonl", out)
    parsed = [r["score"] for r in out if r["score"] is not None]
    report = {
        "stage": "annotate", "in": len(records), "out": len(out), "scores": dict(sorted(scores.items())),
        "reasons": {"unparseable": scores.get("unparseable", 0)},
        "educational": sum(s >= threshold for s in parsed), "threshold": threshold,
        "teacher_calls": calls.calls, "cached": calls.cached, "retries": calls.retries,
        "model": teacher.model, "base_url": teacher.base_url, "prompt": str(prompt_path or default_prompt_path()),
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_json(out_dir / "stats.json", report)
    return report
