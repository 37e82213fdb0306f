"""`phi3 data <verb>`: the data-optimal recipe, one verb per stage, and `run` for the whole chain."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import Phi3Error


def _print(report: dict) -> int:
    json.dump(report, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


def _parallel(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: cores, at most 8)")
    p.add_argument("--engine", default="local", choices=["local", "dask"], help="local processes or a Dask cluster")
    p.add_argument("--dask-address", default=None, help="Dask scheduler address (default: a local Dask cluster)")


def _par(args) -> dict:
    return dict(workers=args.workers, engine=args.engine, dask_address=args.dask_address)


def _teacher_args(p: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    p.add_argument("--base-url", required=True, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", default="default", help="model name sent to the endpoint")
    p.add_argument("--api-key", default=None, help="API key (default: $PHI3_TEACHER_API_KEY or $OPENAI_API_KEY)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--retries", type=int, default=5)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=temperature)
    p.add_argument("--cache", default=None, help="SQLite answer cache (default: OUT/cache.sqlite)")


def _teacher(args):
    from .teacher import TeacherConfig
    return TeacherConfig(base_url=args.base_url, model=args.model, api_key=args.api_key, concurrency=args.concurrency,
                         retries=args.retries, timeout=args.timeout, max_tokens=args.max_tokens,
                         temperature=args.temperature)


def _settings(pairs: list[str], where: str) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise Phi3Error(f"{where}: expected NAME=VALUE, got {pair!r}")
        out[key.replace("-", "_")] = None if value.lower() in ("none", "off") else json.loads(value)
    return out


def cmd_ingest(args) -> int:
    from .ingest import ingest
    return _print(ingest(args.paths, args.out, args.source, kind=args.kind, group=args.group,
                         shard_size=args.shard_size, limit=args.limit, fmt=args.format))


def cmd_dedup(args) -> int:
    from .dedup import DedupConfig, dedup
    cfg = DedupConfig(shingle=args.shingle, num_perm=args.num_perm, threshold=args.threshold, bands=args.bands)
    return _print(dedup(args.inputs, args.out, cfg, **_par(args)))


def cmd_filter(args) -> int:
    from .filters import FilterConfig, quality_filter
    return _print(quality_filter(args.inputs, args.out, FilterConfig.from_dict(_settings(args.set, "--set")),
                                 **_par(args)))


def cmd_annotate(args) -> int:
    from .annotate import annotate
    return _print(annotate(args.inputs, args.out, _teacher(args), sample=args.sample, seed=args.seed,
                           prompt_path=args.prompt, max_chars=args.max_chars, cache_path=args.cache,
                           threshold=args.threshold))


def cmd_classify_train(args) -> int:
    from .classify import train_classifier
    return _print(train_classifier(args.annotations, args.out, threshold=args.threshold, test_size=args.test_size,
                                   seed=args.seed))


def cmd_classify_score(args) -> int:
    from .classify import score_shards
    return _print(score_shards(args.inputs, args.out, args.classifier, threshold=args.threshold, **_par(args)))


def cmd_decontam(args) -> int:
    from .decontam import decontaminate
    evals: dict[str, list] = {}
    for item in args.eval:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = item, item
        evals.setdefault(name, []).append(path)
    return _print(decontaminate(args.inputs, args.out, evals, n=args.ngram, **_par(args)))


def cmd_mix(args) -> int:
    from .mix import build_mixtures, load_spec
    return _print(build_mixtures(load_spec(args.spec), args.out, tokenizer=args.tokenizer))


def cmd_synth(args) -> int:
    from .synth import SynthConfig, synthesize
    cfg = SynthConfig.from_file(args.config) if args.config else SynthConfig()
    return _print(synthesize(args.seeds, args.out, _teacher(args), cfg, n=args.n, seed=args.seed,
                             prompt_path=args.prompt, cache_path=args.cache))


def cmd_run(args) -> int:
    from .pipeline import run_pipeline
    return _print(run_pipeline(args.config, only=args.only))


def add_data_commands(sub) -> None:
    """Register `phi3 data ...` on the top-level subparsers."""
    data = sub.add_parser("data", help="the data recipe: dedup, filter, annotate, classify, synth, decontam, mix, run")
    verbs = data.add_subparsers(dest="data_command", required=True)

    p = verbs.add_parser("ingest", help="raw files (HTML, text, Python, fortunes) to JSONL shards")
    p.add_argument("paths", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--source", required=True, help="source name (shard prefix and `source` field)")
    p.add_argument("--kind", default="auto", choices=["auto", "html", "text", "fortune"])
    p.add_argument("--group", type=int, default=10, help="fortunes per document")
    p.add_argument("--shard-size", type=int, default=1000, help="documents per shard")
    p.add_argument("--limit", type=int, default=None, help="at most this many documents")
    p.add_argument("--format", default="jsonl", choices=["jsonl", "parquet"])
    p.set_defaults(func=cmd_ingest)

    p = verbs.add_parser("dedup", help="exact (content hash) and near (MinHash LSH) dedup")
    p.add_argument("inputs", nargs="+", help="shards, directories of shards or glob patterns")
    p.add_argument("--out", required=True)
    p.add_argument("--shingle", type=int, default=5, help="words per shingle")
    p.add_argument("--num-perm", type=int, default=128)
    p.add_argument("--threshold", type=float, default=0.8, help="Jaccard similarity of near duplicates")
    p.add_argument("--bands", type=int, default=None, help="LSH bands (default: chosen from the threshold)")
    _parallel(p)
    p.set_defaults(func=cmd_dedup)

    p = verbs.add_parser("filter", help="heuristic quality filters (length, symbols, lines, repetition)")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a filter threshold, e.g. min_words=20 or max_top_2gram=off (repeatable)")
    _parallel(p)
    p.set_defaults(func=cmd_filter)

    p = verbs.add_parser("annotate", help="teacher LLM scores a sample on the 0-5 educational rubric")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--out", required=True)
    _teacher_args(p, max_tokens=16, temperature=0.0)
    p.add_argument("--sample", type=int, default=1000, help="documents to annotate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default=None, help="prompt file with a {document} placeholder")
    p.add_argument("--max-chars", type=int, default=2000, help="characters of each document sent")
    p.add_argument("--threshold", type=int, default=3)
    p.set_defaults(func=cmd_annotate)

    p = verbs.add_parser("classify", help="train the educational classifier, or score documents with it")
    cv = p.add_subparsers(dest="classify_command", required=True)
    q = cv.add_parser("train", help="fit on teacher annotations; report held-out agreement")
    q.add_argument("annotations", help="annotations.jsonl from `phi3 data annotate`")
    q.add_argument("--out", required=True, help="classifier file to write (.pkl); its report goes beside (.json)")
    q.add_argument("--threshold", type=float, default=3.0)
    q.add_argument("--test-size", type=float, default=0.2)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_classify_train)
    q = cv.add_parser("score", help="add edu_score to every document; keep those >= threshold")
    q.add_argument("inputs", nargs="+")
    q.add_argument("--classifier", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--threshold", type=float, default=None, help="default: the classifier's")
    _parallel(q)
    q.set_defaults(func=cmd_classify_score)

    p = verbs.add_parser("synth", help="synthetic textbooks: topic x audience x style, seeded by web extracts")
    p.add_argument("seeds", nargs="+", help="shards whose documents seed the prompts")
    p.add_argument("--out", required=True)
    _teacher_args(p, max_tokens=512, temperature=0.8)
    p.add_argument("--n", type=int, default=100, help="textbooks to generate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default=None, help="TOML with topics, audiences, styles lists")
    p.add_argument("--prompt", default=None, help="prompt file with {topic} {audience} {style} {extract}")
    p.set_defaults(func=cmd_synth)

    p = verbs.add_parser("decontam", help="drop documents sharing a long n-gram with evaluation sets")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--eval", action="append", required=True, metavar="NAME=PATH",
                   help="an evaluation set: shards, a text file or a directory (repeatable)")
    p.add_argument("--ngram", type=int, default=13)
    _parallel(p)
    p.set_defaults(func=cmd_decontam)

    p = verbs.add_parser("mix", help="phase-1 / phase-2 mixtures from weighted sources and token budgets")
    p.add_argument("spec", help="mixture spec (TOML with [[phase]] and [[phase.source]])")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default=None, help=".gguf, HF dir or tokenizer.json (default: the default model's)")
    p.set_defaults(func=cmd_mix)

    p = verbs.add_parser("run", help="the whole chain from a pipeline TOML, each stage resumable")
    p.add_argument("config")
    p.add_argument("--only", action="append", default=None, help="run only this stage (repeatable)")
    p.set_defaults(func=cmd_run)
    return verbs
