"""Heuristic quality filters in the manner of the Gopher, C4 and FineWeb web-data rules.

Each rule is a small pure function of the text returning True when the document passes; each
has its thresholds in `FilterConfig` (set one to None to switch the rule off) and is counted in
the stats report under its own name. A document is dropped for the first rule it fails.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import Phi3Error
from .stage import filter_shard, run_stage

_WORD = re.compile(r"\S+")
BULLETS = ("•", "-", "*", "·", "‣", "◦", "–")
STOP_WORDS = frozenset("the be to of and that have with".split())


@dataclass(frozen=True)
class FilterConfig:
    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1      # '#' and '...' per word
    max_bullet_lines: float | None = 0.9           # fraction of lines starting with a bullet
    max_ellipsis_lines: float | None = 0.3         # fraction of lines ending with an ellipsis
    min_alpha_words: float | None = 0.8            # fraction of words with an alphabetic character
    min_stop_words: int | None = 2                 # English stop words present
    max_duplicate_lines: float | None = 0.3        # fraction of lines that repeat an earlier line
    max_top_2gram: float | None = 0.20             # characters in the most frequent word 2-gram
    max_top_3gram: float | None = 0.18
    max_top_4gram: float | None = 0.16
    max_duplicate_5grams: float | None = 0.15      # characters in repeated word 5-grams
    max_duplicate_10grams: float | None = 0.10

    @classmethod
    def from_dict(cls, d: dict) -> "FilterConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise Phi3Error(f"unknown filter setting(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**d)


def _top_ngram_frac(words: list[str], n: int) -> float:
    if len(words) < n:
        return 0.0
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    gram, count = grams.most_common(1)[0]
    if count == 1:
        return 0.0
    total = sum(len(w) for w in words)
    return count * sum(len(w) for w in gram) / max(total, 1)


def _duplicate_ngram_frac(words: list[str], n: int) -> float:
    if len(words) < n:
        return 0.0
    seen: set[tuple] = set()
    dup = [False] * len(words)
    for i in range(len(words) - n + 1):
        g = tuple(words[i:i + n])
        if g in seen:
            for j in range(i, i + n):
                dup[j] = True
        seen.add(g)
    total = sum(len(w) for w in words)
    return sum(len(w) for w, d in zip(words, dup) if d) / max(total, 1)


def quality_reason(text: str, cfg: FilterConfig) -> str | None:
    """The name of the first rule `text` fails, or None when it passes them all."""
    words = _WORD.findall(text)
    n = len(words)
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    c = cfg
    if c.min_words is not None and n < c.min_words:
        return "min_words"
    if c.max_words is not None and n > c.max_words:
        return "max_words"
    mean_len = sum(map(len, words)) / n if n else 0.0
    if c.min_mean_word_length is not None and mean_len < c.min_mean_word_length:
        return "min_mean_word_length"
    if c.max_mean_word_length is not None and mean_len > c.max_mean_word_length:
        return "max_mean_word_length"
    if c.max_symbol_word_ratio is not None and n:
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols / n > c.max_symbol_word_ratio:
            return "max_symbol_word_ratio"
    if lines and c.max_bullet_lines is not None:
        if sum(l.startswith(BULLETS) for l in lines) / len(lines) > c.max_bullet_lines:
            return "max_bullet_lines"
    if lines and c.max_ellipsis_lines is not None:
        if sum(l.endswith(("...", "…")) for l in lines) / len(lines) > c.max_ellipsis_lines:
            return "max_ellipsis_lines"
    if c.min_alpha_words is not None and n:
        if sum(any(ch.isalpha() for ch in w) for w in words) / n < c.min_alpha_words:
            return "min_alpha_words"
    lower = [w.lower().strip(".,;:!?\"'()[]") for w in words]
    if c.min_stop_words is not None and len(STOP_WORDS.intersection(lower)) < c.min_stop_words:
        return "min_stop_words"
    if lines and c.max_duplicate_lines is not None:
        if (len(lines) - len(set(lines))) / len(lines) > c.max_duplicate_lines:
            return "max_duplicate_lines"
    for k, limit in ((2, c.max_top_2gram), (3, c.max_top_3gram), (4, c.max_top_4gram)):
        if limit is not None and _top_ngram_frac(lower, k) > limit:
            return f"max_top_{k}gram"
    for k, limit in ((5, c.max_duplicate_5grams), (10, c.max_duplicate_10grams)):
        if limit is not None and _duplicate_ngram_frac(lower, k) > limit:
            return f"max_duplicate_{k}grams"
    return None


def filter_shard_quality(src: Path, dst: Path, cfg: dict, skip_sources: list[str]) -> dict:
    config = FilterConfig(**cfg)
    skip = set(skip_sources)
    return filter_shard(src, dst, lambda rec: None if rec.get("source") in skip else quality_reason(rec["text"], config))


def quality_filter(inputs, out_dir, cfg: FilterConfig = FilterConfig(), *, skip_sources=(), workers=None,
                   engine="local", dask_address=None) -> dict:
    """Apply the rules to every record except those whose `source` is in `skip_sources` (e.g. code)."""
    return run_stage("filter", filter_shard_quality, inputs, out_dir,
                     params={"cfg": asdict(cfg), "skip_sources": list(skip_sources)},
                     workers=workers, engine=engine, dask_address=dask_address,
                     extra={"config": asdict(cfg), "skip_sources": list(skip_sources)})
