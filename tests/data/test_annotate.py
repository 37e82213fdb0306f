"""Annotation with a real teacher LLM over real HTTP; kill part-way and rerun."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from phi3.data.annotate import annotate, build_prompt, load_prompt, parse_score, sample_records
from phi3.data.io import read_records
from phi3.data.teacher import Cache, TeacherConfig, cache_key
from phi3.errors import Phi3Error

SHORT_PROMPT = ("Rate the educational value of this text for a student, from 0 (none: jokes, spam) to 5 "
                "(excellent: a clear textbook explanation).\n\nText: \"\"\"{document}\"\"\"\n\n"
                "Answer with one digit from 0 to 5.")
SAMPLE, MAX_CHARS, MAX_TOKENS = 8, 300, 4
CONCURRENCY = 4  # requests in flight: the server decodes them together (continuous batching)


@pytest.mark.parametrize("answer,score", [
    ("3", 3), ("Educational score: 4", 4), ("The score is 0.", 0), ("**Score:** 5/5", 5),
    ("1. The text is fine", 1), ("I'd give it a 2 out of 5", 2), ("Points: 7 of 10; score: 3", 3),
    ("The answer is 10.", None), ("no idea", None), ("", None), ("2.5 stars", None),
    ("2to3 is a Python 2 to 3 code translator.", 2), ("2to3 translates code", None), ("the 3rd module", None),
])
def test_parse_score_takes_the_first_rubric_integer(answer, score):
    assert parse_score(answer) == score


def test_prompt_file_is_replaceable_and_checked(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("Score this: {document}")
    assert build_prompt(load_prompt(p), "abcdef", 3) == "Score this: abc"
    assert "{document}" in load_prompt(None)  # the default rubric
    p.write_text("no placeholder")
    with pytest.raises(Phi3Error, match="no {document} placeholder"):
        load_prompt(p)
    with pytest.raises(Phi3Error, match="cannot read prompt file"):
        load_prompt(tmp_path / "missing.txt")


def test_sample_is_seeded_and_stable(corpus_shards):
    a = [r["id"] for r in sample_records(corpus_shards, 5, seed=1)]
    assert a == [r["id"] for r in sample_records(corpus_shards, 5, seed=1)]
    assert a != [r["id"] for r in sample_records(corpus_shards, 5, seed=2)]
    assert len(set(a)) == 5


def _saved(db) -> int:
    """Answers committed to the cache so far (read from outside the annotating process)."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
    except sqlite3.OperationalError:  # the table is not created yet
        return 0


def test_annotation_killed_part_way_resumes_without_reasking_or_losing(teacher, corpus_shards, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(SHORT_PROMPT)
    out = tmp_path / "ann"
    args = [sys.executable, "-m", "phi3.cli", "data", "annotate", str(corpus_shards), "--out", str(out),
            "--base-url", teacher.base_url, "--model", teacher.model, "--sample", str(SAMPLE),
            "--max-chars", str(MAX_CHARS), "--max-tokens", str(MAX_TOKENS), "--prompt", str(prompt),
            "--concurrency", str(CONCURRENCY)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while _saved(out / "cache.sqlite") < 3:
        assert proc.poll() is None, "annotate finished before it could be killed"
        assert time.monotonic() < deadline, "teacher never answered"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "annotations.jsonl").exists()

    cfg = TeacherConfig(base_url=teacher.base_url, model=teacher.model, max_tokens=MAX_TOKENS, concurrency=CONCURRENCY)
    template = load_prompt(prompt)
    sample = sample_records(corpus_shards, SAMPLE, seed=0)
    cache = Cache(out / "cache.sqlite")
    cached = {i for i, r in enumerate(sample)
              if cache.get(cache_key(cfg, build_prompt(template, r["text"], MAX_CHARS))) is not None}
    cache.close()
    assert 3 <= len(cached) < SAMPLE  # killed part-way, with answers saved

    # The killed run's requests still in flight are answered (to nobody): wait for that, then count.
    mark = teacher.settle()
    report = annotate(corpus_shards, out, cfg, sample=SAMPLE, prompt_path=prompt, max_chars=MAX_CHARS)
    asked = teacher.answered() - mark
    # The server answered exactly as many requests as were missing, and (below) every sampled document
    # now has its answer: so each missing one was asked once and nothing saved before the kill again.
    assert asked == SAMPLE - len(cached) == report["teacher_calls"]
    assert report["cached"] == len(cached)
    cache = Cache(out / "cache.sqlite")
    assert len(cache) == SAMPLE
    cache.close()

    rows = list(read_records(out / "annotations.jsonl"))
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in sample)  # nothing lost, nothing duplicated
    for r in rows:
        assert r["score"] == parse_score(r["answer"])
    scores = report["scores"]
    assert sum(scores.values()) == SAMPLE
    assert scores.get("unparseable", 0) == sum(r["score"] is None for r in rows) == report["reasons"]["unparseable"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats == report

    mark = teacher.answered()
    again = annotate(corpus_shards, out, cfg, sample=SAMPLE, prompt_path=prompt, max_chars=MAX_CHARS)
    assert teacher.answered() == mark and again["cached"] == SAMPLE  # a rerun costs nothing
    assert list(read_records(out / "annotations.jsonl")) == rows
