"""Synthetic textbooks, Cosmopedia-style: topic x audience x style prompts seeded with web extracts.

Each prompt combines a topic (from the config, or the title of its seed document), an audience
and a style, and carries an extract of a different web document, so that even a small set of
topics gives varied outputs. Outputs are deduplicated (exact and MinHash near duplicates) and
their diversity is measured: distinct n-gram ratios and the mean pairwise cosine distance of
their sentence embeddings.
"""

from __future__ import annotations

import itertools
import random
import time
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import Phi3Error
from .dedup import DedupConfig, minhash
from .io import content_hash, list_shards, normalize, read_records, write_json, write_records
from .teacher import Cache, Teacher, TeacherConfig

AUDIENCES = ["young children", "high school students", "college students", "professionals"]
STYLES = ["textbook chapter", "tutorial with a worked example", "blog post", "step-by-step guide"]


@dataclass
class SynthConfig:
    topics: list[str] = field(default_factory=list)   # empty: the title of each seed document
    audiences: list[str] = field(default_factory=lambda: list(AUDIENCES))
    styles: list[str] = field(default_factory=lambda: list(STYLES))
    extract_chars: int = 400
    min_words: int = 20                                # shorter outputs are dropped
    near_threshold: float = 0.7

    @classmethod
    def from_file(cls, path: str | Path) -> "SynthConfig":
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise Phi3Error(f"{path}: cannot read synth config ({e})") from None
        raw = raw.get("synth", raw)
        known = {f.name for f in fields(cls)}
        if set(raw) - known:
            raise Phi3Error(f"{path}: unknown synth setting(s): {', '.join(sorted(set(raw) - known))}")
        return cls(**raw)


def default_prompt_path() -> Path:
    return Path(str(resources.files("phi3.data") / "prompts" / "textbook.txt"))


def title_of(text: str) -> str:
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return first[:80]


def extract(text: str, chars: int, rng: random.Random) -> str:
    words = text.split()
    if not words:
        return ""
    approx = max(1, chars // 6)
    start = rng.randrange(0, max(1, len(words) - approx))
    return " ".join(words[start:start + approx])[:chars]


def make_prompts(seed_docs: list[dict], cfg: SynthConfig, n: int, seed: int, template: str) -> list[dict]:
    """n prompts: distinct (topic, audience, style) combinations, each with its own seed extract."""
    if not seed_docs:
        raise Phi3Error("synth: no seed documents")
    rng = random.Random(seed)
    docs = list(seed_docs)
    rng.shuffle(docs)
    topics = cfg.topics or [None]
    combos = list(itertools.product(range(len(docs)) if not cfg.topics else [None], topics, cfg.audiences, cfg.styles))
    rng.shuffle(combos)
    prompts = []
    for k, (doc_i, topic, audience, style) in enumerate(combos[:n]):
        doc = docs[doc_i if doc_i is not None else k % len(docs)]
        topic = topic or title_of(doc["text"])
        ex = extract(doc["text"], cfg.extract_chars, rng)
        text = (template.replace("{topic}", topic).replace("{audience}", audience)
                .replace("{style}", style).replace("{extract}", ex))
        prompts.append({"prompt": text, "topic": topic, "audience": audience, "style": style, "seed_id": doc["id"]})
    return prompts


def distinct_ngrams(texts: list[str], n: int) -> float:
    """Distinct n-grams / all n-grams over the corpus (distinct-n); 0 for an empty corpus."""
    total, seen = 0, set()
    for t in texts:
        w = normalize(t).split()
        grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def embedding_spread(texts: list[str]) -> float:
    """Mean pairwise cosine distance of the texts' sentence embeddings."""
    if len(texts) < 2:
        return 0.0
    from .classify import embed

    e = embed(texts)
    sim = e @ e.T
    iu = np.triu_indices(len(texts), k=1)
    return float(np.mean(1.0 - sim[iu]))


def dedup_outputs(items: list[dict], threshold: float) -> tuple[list[dict], dict]:
    from datasketch import MinHashLSH

    cfg = DedupConfig(threshold=threshold)
    lsh = MinHashLSH(threshold=threshold, num_perm=cfg.num_perm)
    kept, seen, reasons = [], set(), {"exact_duplicate": 0, "near_duplicate": 0}
    for it in items:
        h = content_hash(it["text"])
        if h in seen:
            reasons["exact_duplicate"] += 1
            continue
        m = minhash(it["text"], cfg)
        if lsh.query(m):
            reasons["near_duplicate"] += 1
            continue
        seen.add(h)
        lsh.insert(it["id"], m)
        kept.append(it)
    return kept, reasons


def synthesize(seed_inputs, out_dir, teacher: TeacherConfig, cfg: SynthConfig = SynthConfig(), *, n: int = 100,
               seed: int = 0, prompt_path: str | Path | None = None, cache_path: str | Path | None = None) -> dict:
    start = time.perf_counter()
    out_dir = Path(out_dir)
    path = Path(prompt_path) if prompt_path else default_prompt_path()
    try:
        template = path.read_text(encoding="utf-8")
    except OSError as e:
        raise Phi3Error(f"{path}: cannot read prompt file ({e.strerror})") from None
    if "{extract}" not in template:
        raise Phi3Error(f"{path}: prompt file has no {{extract}} placeholder")
    seed_docs = [r for s in list_shards(seed_inputs) for r in read_records(s)]
    prompts = make_prompts(seed_docs, cfg, n, seed, template)
    cache = Cache(cache_path or out_dir / "cache.sqlite")
    try:
        t = Teacher(teacher, cache)
        answers = t.complete_many([p["prompt"] for p in prompts], desc="synth")
    finally:
        cache.close()
    items, short = [], 0
    for i, (p, text) in enumerate(zip(prompts, answers)):
        if len(text.split()) < cfg.min_words:
            short += 1
            continue
        items.append({"id": f"synth-{seed}-{i:06d}", "text": text.strip(), "source": "synthetic",
                      "topic": p["topic"], "audience": p["audience"], "style": p["style"], "seed_id": p["seed_id"]})
    kept, reasons = dedup_outputs(items, cfg.near_threshold)
    reasons["too_short"] = short
    write_records(out_dir / "synthetic-00000.jsonl", kept)
    texts = [k["text"] for k in kept]
    report = {
        "stage": "synth", "in": len(prompts), "out": len(kept), "reasons": reasons,
        "diversity": {"distinct_1": distinct_ngrams(texts, 1), "distinct_2": distinct_ngrams(texts, 2),
                      "distinct_3": distinct_ngrams(texts, 3), "embedding_spread": embedding_spread(texts),
                      "topics": len({k["topic"] for k in kept}), "seed_documents": len({k["seed_id"] for k in kept})},
        "teacher_calls": t.stats.calls, "cached": t.stats.cached, "seconds": round(time.perf_counter() - start, 3),
    }
    write_json(out_dir / "stats.json", report)
    return report
