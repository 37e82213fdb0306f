"""Exact dedup (hash of the normalised text) and near dedup (MinHash LSH, `datasketch`).

Three passes, each resumable: (1) per shard, in parallel, the content hash and MinHash signature
of every record (`.work/<shard>.sig.npz`); (2) in one process, exact duplicates then LSH
candidates whose estimated Jaccard similarity reaches the threshold are assigned to the
cluster of the first document seen (`clusters.json`); (3) per shard, in parallel, the records
not removed are written out. The first occurrence (shard order, then line order) is kept.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import Phi3Error
from .io import content_hash, normalize, read_json, read_records, write_json
from .stage import plan_shards, run_stage

_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class DedupConfig:
    shingle: int = 5          # words per shingle
    num_perm: int = 128       # MinHash permutations
    threshold: float = 0.8    # Jaccard similarity above which two documents are near duplicates
    bands: int | None = None  # LSH bands (rows = num_perm // bands); None lets datasketch choose
    seed: int = 1

    def check(self) -> None:
        if self.shingle < 1:
            raise Phi3Error(f"dedup shingle must be >= 1, got {self.shingle}")
        if not 0.0 < self.threshold <= 1.0:
            raise Phi3Error(f"dedup threshold must be in (0, 1], got {self.threshold}")
        if self.bands is not None and (self.bands < 1 or self.num_perm % self.bands):
            raise Phi3Error(f"dedup bands must divide num_perm ({self.num_perm}), got {self.bands}")


def shingles(text: str, k: int) -> set[bytes]:
    words = _WORD.findall(normalize(text))
    if len(words) <= k:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i:i + k]).encode("utf-8") for i in range(len(words) - k + 1)}


def minhash(text: str, cfg: DedupConfig):
    from datasketch import MinHash

    m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
    m.update_batch(list(shingles(text, cfg.shingle)))
    return m


def signature_shard(src: Path, dst: Path, cfg: dict) -> dict:
    """Pass 1: ids, content hashes and MinHash signatures of one shard."""
    c = DedupConfig(**cfg)
    ids, hashes, sigs = [], [], []
    for rec in read_records(src):
        ids.append(str(rec["id"]))
        hashes.append(content_hash(rec["text"]))
        sigs.append(minhash(rec["text"], c).hashvalues)
    matrix = np.array(sigs, dtype=np.uint64).reshape(len(sigs), c.num_perm)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp.npz")
    scheme = minhash("", c).scheme
    np.savez(tmp, ids=np.array(ids, dtype=object), hashes=np.array(hashes), sigs=matrix, scheme=np.array(scheme))
    tmp.replace(dst)
    return {"in": len(ids), "out": len(ids)}


def find_duplicates(shard_sigs: list[tuple[str, Path]], cfg: DedupConfig) -> dict:
    """Pass 2: removed records (by shard and position) with the id each duplicates; clusters; counts."""
    from datasketch import LeanMinHash, MinHashLSH

    params = None if cfg.bands is None else (cfg.bands, cfg.num_perm // cfg.bands)
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, params=params)
    seen_hash: dict[str, str] = {}
    kept_sig: dict[str, LeanMinHash] = {}
    kept_id: dict[str, str] = {}
    removed: dict[str, dict[str, list]] = {}
    clusters: dict[str, dict] = {}
    exact = near = 0
    for shard, path in shard_sigs:
        data = np.load(path, allow_pickle=True)
        scheme = str(data["scheme"])
        for pos, (doc_id, h, sig) in enumerate(zip(data["ids"], data["hashes"], data["sigs"])):
            doc_id = str(doc_id)
            if h in seen_hash:
                keeper, kind = seen_hash[h], "exact"
                exact += 1
            else:
                m = LeanMinHash(seed=cfg.seed, hashvalues=sig, scheme=scheme)
                best = None
                for cand in lsh.query(m):
                    if kept_sig[cand].jaccard(m) >= cfg.threshold and (best is None or cand < best):
                        best = cand
                if best is None:
                    seen_hash[h] = doc_id
                    key = f"{shard}\x00{pos}"
                    lsh.insert(key, m)
                    kept_sig[key] = m
                    kept_id[key] = doc_id
                    continue
                keeper, kind = kept_id[best], "near"
                near += 1
                seen_hash[h] = keeper
            removed.setdefault(shard, {})[str(pos)] = [kind, keeper, doc_id]
            cluster = clusters.setdefault(keeper, {"kept": keeper, "removed": []})
            cluster["removed"].append({"id": doc_id, "shard": shard, "kind": kind})
    return {"removed": removed, "clusters": list(clusters.values()), "exact": exact, "near": near}


def write_kept_shard(src: Path, dst: Path, removed: dict) -> dict:
    """Pass 3: the records of one shard that no other record duplicates."""
    from .io import write_records
    from collections import Counter

    kept, reasons, n_in = [], Counter(), 0
    for pos, rec in enumerate(read_records(src)):
        n_in += 1
        hit = removed.get(str(pos))
        if hit is None:
            kept.append(rec)
        else:
            reasons[f"{hit[0]}_duplicate"] += 1
    write_records(dst, kept)
    return {"in": n_in, "out": len(kept), "reasons": dict(reasons)}


def dedup(inputs, out_dir: str | Path, cfg: DedupConfig = DedupConfig(), *, workers: int | None = None,
          engine: str = "local", dask_address: str | None = None) -> dict:
    cfg.check()
    out_dir = Path(out_dir)
    work = out_dir / ".work"
    start = time.perf_counter()
    pairs = plan_shards(inputs, out_dir)
    config_path = work / "config.json"
    if config_path.exists() and read_json(config_path) != asdict(cfg):
        raise Phi3Error(f"{out_dir}: holds a dedup run with other settings ({read_json(config_path)}); "
                        "use a fresh --out")
    write_json(config_path, asdict(cfg))
    # pass 1: signatures, one file per shard (its own resumable stage)
    sig_dir = work / "signatures"
    _signatures(pairs, sig_dir, cfg, workers, engine, dask_address)
    # pass 2: clusters
    plan_path = work / "plan.json"
    if plan_path.exists():
        plan = read_json(plan_path)
    else:
        plan = find_duplicates([(dst.name, sig_dir / (dst.name + ".npz")) for _, dst in pairs], cfg)
        write_json(plan_path, plan)
    write_json(out_dir / "clusters.json", plan["clusters"])
    # pass 3: write the survivors
    report = run_stage("dedup", _kept_shard_by_name, [src for src, _ in pairs], out_dir,
                       params={"plan": str(plan_path)}, workers=workers, engine=engine, dask_address=dask_address,
                       extra={"exact_duplicates": plan["exact"], "near_duplicates": plan["near"],
                              "clusters": len(plan["clusters"]), "config": asdict(cfg)})
    report["seconds"] = round(time.perf_counter() - start, 3)
    write_json(out_dir / "stats.json", report)
    return report


def _signatures(pairs, sig_dir: Path, cfg: DedupConfig, workers, engine, dask_address) -> None:
    from .engine import map_shards

    todo = []
    for src, dst in pairs:
        out = sig_dir / (dst.name + ".npz")
        if not out.exists():
            todo.append({"src": str(src), "dst": str(out), "cfg": asdict(cfg)})
    map_shards(_signature_task, todo, workers=workers, engine=engine, dask_address=dask_address,
               desc="dedup signatures")


def _signature_task(task: dict) -> dict:
    return signature_shard(Path(task["src"]), Path(task["dst"]), task["cfg"])


def _kept_shard_by_name(src: Path, dst: Path, plan: str) -> dict:
    removed = read_json(plan)["removed"].get(dst.name, {})
    return write_kept_shard(src, dst, removed)
