"""Run a plain function over shards: in this process, on local processes, or on a Dask cluster.

Every stage is `fn(task) -> dict` over independent shard tasks, so the same stage runs on one
machine (`engine="local"`, a process pool) and on a cluster (`engine="dask"`, with
`dask_address` naming a scheduler, or a local Dask cluster when it is None).
"""

from __future__ import annotations

import atexit
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Callable, Iterator, Sequence

from tqdm.auto import tqdm

from ..errors import Phi3Error

ENGINES = ("local", "dask")


def default_workers() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), 8))


def map_shards(fn: Callable[[dict], dict], tasks: Sequence[dict], *, workers: int | None = None,
               engine: str = "local", dask_address: str | None = None, desc: str = "shards") -> list[dict]:
    """`[fn(t) for t in tasks]`, in parallel, results in task order, with a progress bar."""
    if engine not in ENGINES:
        raise Phi3Error(f"unknown engine {engine!r} (expected one of: {', '.join(ENGINES)})")
    workers = workers or default_workers()
    results: list[dict | None] = [None] * len(tasks)
    with tqdm(total=len(tasks), desc=desc, unit="shard", disable=not tasks or None) as bar:
        for i, result in _run(fn, tasks, workers, engine, dask_address):
            results[i] = result
            bar.update(1)
    return results  # type: ignore[return-value]


def _run(fn, tasks, workers, engine, dask_address) -> Iterator[tuple[int, dict]]:
    if not tasks:
        return
    if engine == "dask":
        yield from _run_dask(fn, tasks, workers, dask_address)
    elif workers == 1 or len(tasks) == 1:
        for i, t in enumerate(tasks):
            yield i, fn(t)
    else:
        # forkserver: workers never inherit a parent's threads (torch, tokenizers), which can deadlock a fork
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=get_context("forkserver")) as pool:
            futures = {pool.submit(fn, t): i for i, t in enumerate(tasks)}
            for fut in as_completed(futures):
                yield futures[fut], fut.result()


_LOCAL_CLUSTERS: dict = {}


def _local_dask_client(workers: int):
    """One local Dask cluster per worker count, started on first use and kept for later stages."""
    from dask.distributed import Client, LocalCluster

    if workers not in _LOCAL_CLUSTERS:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, host="127.0.0.1")
        client = Client(cluster)
        _LOCAL_CLUSTERS[workers] = (cluster, client)
        atexit.register(_close_local_clusters)
    return _LOCAL_CLUSTERS[workers][1]


def _close_local_clusters() -> None:
    while _LOCAL_CLUSTERS:
        _, (cluster, client) = _LOCAL_CLUSTERS.popitem()
        client.close()
        cluster.close()


def _run_dask(fn, tasks, workers, dask_address) -> Iterator[tuple[int, dict]]:
    try:
        from dask.distributed import Client, as_completed as dask_completed
    except ImportError:
        raise Phi3Error("engine 'dask' needs dask[distributed] (pip install 'dask[distributed]')") from None
    client = Client(dask_address) if dask_address else _local_dask_client(workers)
    try:
        futures = client.map(fn, tasks, pure=False)
        index = {f.key: i for i, f in enumerate(futures)}
        for fut in dask_completed(futures):
            yield index[fut.key], fut.result()
    finally:
        if dask_address:
            client.close()
