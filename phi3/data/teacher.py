"""The teacher: any OpenAI-compatible chat endpoint, with retries, concurrency and a cache.

`Teacher.complete_many(prompts)` sends each prompt as one user message, `concurrency` at a
time, retrying transient failures (connection errors, timeouts, 429 and 5xx) with exponential
backoff. Every answer is stored in a SQLite cache keyed by the hash of (model, prompt,
sampling) as soon as it arrives, so a rerun after an interruption asks only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from tqdm.auto import tqdm

from ..errors import Phi3Error


@dataclass
class TeacherConfig:
    base_url: str
    model: str = "default"
    api_key: str | None = None      # default: $PHI3_TEACHER_API_KEY, then $OPENAI_API_KEY
    concurrency: int = 4
    retries: int = 5
    backoff: float = 1.0            # seconds before the first retry; doubles each time
    timeout: float = 120.0
    max_tokens: int = 16
    temperature: float = 0.0

    def key(self) -> str:
        return self.api_key or os.environ.get("PHI3_TEACHER_API_KEY") or os.environ.get("OPENAI_API_KEY") or "none"


class Cache:
    """Answers by key, in SQLite: each answer is committed as it arrives (safe under kill)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, answer TEXT NOT NULL)")
        except sqlite3.DatabaseError as e:
            raise Phi3Error(f"{self.path}: unusable cache database ({e})") from None
        self.lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self.lock:
            row = self.db.execute("SELECT answer FROM answers WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, answer: str) -> None:
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO answers (key, answer) VALUES (?, ?)", (key, answer))

    def __len__(self) -> int:
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        self.db.close()


def cache_key(cfg: TeacherConfig, prompt: str) -> str:
    ident = json.dumps([cfg.model, cfg.max_tokens, cfg.temperature, prompt], ensure_ascii=False)
    return hashlib.sha256(ident.encode("utf-8")).hexdigest()


@dataclass
class CallStats:
    calls: int = 0
    cached: int = 0
    retries: int = 0
    failures: int = 0
    errors: list = field(default_factory=list)


def _transient(exc: BaseException) -> bool:
    import openai

    if isinstance(exc, (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError,
                        openai.InternalServerError)):
        return True
    return isinstance(exc, openai.APIStatusError) and exc.status_code >= 500


class Teacher:
    def __init__(self, cfg: TeacherConfig, cache: Cache, sleep: Callable[[float], None] = time.sleep):
        import openai

        self.cfg, self.cache, self.sleep = cfg, cache, sleep
        self.client = openai.OpenAI(base_url=cfg.base_url, api_key=cfg.key(), max_retries=0, timeout=cfg.timeout)
        self.stats = CallStats()
        self._lock = threading.Lock()

    def ask(self, prompt: str) -> str:
        """One completion, retried with backoff on transient errors; a clear error otherwise."""
        import openai

        delay = self.cfg.backoff
        for attempt in range(self.cfg.retries + 1):
            try:
                with self._lock:
                    self.stats.calls += 1
                resp = self.client.chat.completions.create(
                    model=self.cfg.model, messages=[{"role": "user", "content": prompt}],
                    max_tokens=self.cfg.max_tokens, temperature=self.cfg.temperature)
                return resp.choices[0].message.content or ""
            except openai.APIError as e:
                if not _transient(e) or attempt == self.cfg.retries:
                    status = getattr(e, "status_code", None)
                    raise Phi3Error(f"teacher {self.cfg.base_url} (model {self.cfg.model}) failed"
                                    f"{f' with HTTP {status}' if status else ''} after {attempt + 1} attempt(s): "
                                    f"{type(e).__name__}: {str(e)[:200]}") from None
                with self._lock:
                    self.stats.retries += 1
                self.sleep(delay * (1 + random.random() * 0.1))
                delay *= 2
        raise AssertionError("unreachable")

    def complete_many(self, prompts: Sequence[str], desc: str = "teacher") -> list[str]:
        """Answers to `prompts` in order: cached ones at once, the rest from the endpoint."""
        answers: list[str | None] = [None] * len(prompts)
        todo: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            key = cache_key(self.cfg, p)
            hit = self.cache.get(key)
            if hit is not None:
                answers[i] = hit
                self.stats.cached += 1
            else:
                todo.setdefault(key, []).append(i)
        with tqdm(total=len(todo), desc=desc, unit="call", disable=not todo or None) as bar, \
                ThreadPoolExecutor(max_workers=max(1, self.cfg.concurrency)) as pool:
            futures = {pool.submit(self.ask, prompts[idx[0]]): key for key, idx in todo.items()}
            try:
                for fut in as_completed(futures):
                    key = futures[fut]
                    answer = fut.result()
                    self.cache.put(key, answer)
                    for i in todo[key]:
                        answers[i] = answer
                    bar.update(1)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        return answers  # type: ignore[return-value]
