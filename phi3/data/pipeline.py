"""`phi3 data run PIPELINE.toml`: the whole chain, each stage in `out/<stage>/`, each resumable.

    out = "data-out"               # relative paths are relative to this file
    workers = 2
    engine = "local"               # or "dask" (with dask_address, or a local Dask cluster)

    [[ingest]]                     # raw files -> out/raw/<source>/
    source = "python-docs"
    paths = ["/usr/share/doc/python3.11/html/library"]
    kind = "html"

    [dedup]                        # out/raw/* -> out/dedup
    threshold = 0.8
    [filter]                       # -> out/filter  (FilterConfig fields; skip_sources pass untouched)
    min_words = 50
    skip_sources = ["code"]
    [decontam]                     # out/filter -> out/decontam (and out/synth -> out/synth_decontam)
    eval = { humaneval = ["evals/humaneval.jsonl"] }
    [annotate]                     # sample of out/decontam -> out/annotate  (teacher settings)
    base_url = "http://127.0.0.1:8000/v1"
    sample = 1000
    [classify]                     # -> out/classifier.pkl, then out/decontam -> out/classify
    threshold = 3
    [synth]                        # seeds from out/classify (or seed_from = "decontam") -> out/synth
    n = 100
    [mix]                          # -> out/mix/<phase>/ ; source paths relative to out
    [[mix.phase]] ...

A stage whose `stats.json` exists is done and skipped; inside a stage, finished shards are kept.
"""

from __future__ import annotations

import time
import tomllib
from dataclasses import fields
from pathlib import Path

from ..errors import Phi3Error
from .io import read_json, write_json

STAGES = ("ingest", "dedup", "filter", "annotate", "classify", "synth", "decontam", "mix")
TEACHER_KEYS = ("base_url", "model", "api_key", "concurrency", "retries", "backoff", "timeout", "max_tokens",
                "temperature")


def load_config(path: str | Path) -> tuple[dict, Path]:
    path = Path(path)
    try:
        cfg = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Phi3Error(f"{path}: no such pipeline config") from None
    except tomllib.TOMLDecodeError as e:
        raise Phi3Error(f"{path}: invalid TOML ({e})") from None
    unknown = set(cfg) - set(STAGES) - {"out", "workers", "engine", "dask_address", "seed"}
    if unknown:
        raise Phi3Error(f"{path}: unknown section(s) {', '.join(sorted(unknown))} (stages: {', '.join(STAGES)})")
    if "out" not in cfg:
        raise Phi3Error(f"{path}: missing 'out' (the output directory)")
    out = Path(cfg["out"])
    return cfg, (out if out.is_absolute() else path.parent / out)


def _teacher(section: dict, defaults: dict | None = None):
    from .teacher import TeacherConfig

    t = {k: section[k] for k in TEACHER_KEYS if k in section}
    if "base_url" not in t:
        raise Phi3Error("pipeline: the teacher needs base_url")
    return TeacherConfig(**{**(defaults or {}), **t})


def _rest(section: dict, exclude=TEACHER_KEYS) -> dict:
    return {k: v for k, v in section.items() if k not in exclude}


def _done(stage_dir: Path) -> dict | None:
    p = stage_dir / "stats.json"
    return read_json(p) if p.exists() else None


def run_pipeline(config_path: str | Path, only: list[str] | None = None) -> dict:
    from .annotate import annotate
    from .classify import score_shards, train_classifier
    from .decontam import decontaminate
    from .dedup import DedupConfig, dedup
    from .filters import FilterConfig, quality_filter
    from .ingest import ingest
    from .mix import build_mixtures, check_spec
    from .synth import SynthConfig, synthesize

    cfg, out = load_config(config_path)
    base = Path(config_path).parent
    par = dict(workers=cfg.get("workers"), engine=cfg.get("engine", "local"), dask_address=cfg.get("dask_address"))
    seed = cfg.get("seed", 0)
    for name in only or []:
        if name not in STAGES:
            raise Phi3Error(f"--only {name}: unknown stage (stages: {', '.join(STAGES)})")
    wanted = lambda s: s in cfg and (not only or s in only)  # noqa: E731
    reports: dict = {}
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)

    def resolve(p):
        p = Path(p)
        return str(p if p.is_absolute() else base / p)

    if wanted("ingest"):
        reports["ingest"] = []
        for item in cfg["ingest"]:
            d = out / "raw" / item["source"]
            rep = _done(d)
            if rep is None:
                opts = {k: v for k, v in item.items() if k not in ("source", "paths")}
                rep = ingest([resolve(p) for p in item["paths"]], d, item["source"], **opts)
                write_json(d / "stats.json", rep)
            reports["ingest"].append(rep)
    raw = [out / "raw" / item["source"] for item in cfg.get("ingest", [])]
    if wanted("dedup"):
        reports["dedup"] = _done(out / "dedup") or dedup(raw, out / "dedup",
                                                         DedupConfig(**{"seed": 1, **cfg["dedup"]}), **par)
    if wanted("filter"):
        f = dict(cfg["filter"])
        skip = f.pop("skip_sources", [])
        reports["filter"] = _done(out / "filter") or quality_filter(out / "dedup", out / "filter",
                                                                    FilterConfig.from_dict(f), skip_sources=skip, **par)
    evals, ngram = {}, 13
    if "decontam" in cfg:
        evals = {name: [resolve(p) for p in paths] for name, paths in cfg["decontam"].get("eval", {}).items()}
        ngram = cfg["decontam"].get("ngram", 13)
    if wanted("decontam"):
        reports["decontam"] = _done(out / "decontam") or decontaminate(out / "filter", out / "decontam", evals,
                                                                       n=ngram, **par)
    clean = out / ("decontam" if "decontam" in cfg else "filter")
    if wanted("annotate"):
        a = cfg["annotate"]
        opts = _rest(a)
        if "prompt_path" in opts:
            opts["prompt_path"] = resolve(opts["prompt_path"])
        opts.setdefault("seed", seed)
        reports["annotate"] = annotate(clean, out / "annotate", _teacher(a), **opts)
    if wanted("classify"):
        c = cfg["classify"]
        clf = out / "classifier.pkl"
        if not clf.exists():
            reports["classify_train"] = train_classifier(out / "annotate" / "annotations.jsonl", clf,
                                                         threshold=c.get("threshold", 3.0), seed=seed)
        else:
            reports["classify_train"] = read_json(clf.with_suffix(".json"))
        reports["classify"] = _done(out / "classify") or score_shards(
            clean, out / "classify", clf, threshold=c.get("threshold"), skip_sources=c.get("skip_sources", []), **par)
    if wanted("synth"):
        s = cfg["synth"]
        scfg = SynthConfig(**{k: v for k, v in s.items() if k in {f.name for f in fields(SynthConfig)}})
        extra = {k: v for k, v in s.items() if k in ("n", "prompt_path")}
        if "prompt_path" in extra:
            extra["prompt_path"] = resolve(extra["prompt_path"])
        seeds = out / s.get("seed_from", "classify" if "classify" in cfg else clean.name)
        if s.get("seed_glob"):
            seeds = str(seeds / s["seed_glob"])
        reports["synth"] = _done(out / "synth") or synthesize(
            seeds, out / "synth", _teacher(s, {"max_tokens": 512, "temperature": 0.8}), scfg, seed=seed, **extra)
        if evals:  # synthetic text is decontaminated like the rest
            reports["synth_decontam"] = _done(out / "synth_decontam") or decontaminate(
                out / "synth", out / "synth_decontam", evals, n=ngram, **par)
    if wanted("mix"):
        spec = check_spec(dict(cfg["mix"]), f"{config_path} [mix]", base=out)
        reports["mix"] = build_mixtures(spec, out / "mix")
    reports["seconds"] = round(time.perf_counter() - start, 3)
    write_json(out / "pipeline.json", reports)
    return reports
