"""Fixtures for the data-pipeline tests: a small real corpus and a real teacher LLM on loopback.

The corpus is cut from Debian's documentation packages (python3.11-doc, python-sklearn-doc,
python-django-doc), the Python standard library sources and Debian's fortunes (`make data-deps`
installs the packages; CI does it in .ci/run), with injected exact and near duplicates.

The teacher is `phi3 serve` with the default model (SmolLM2-135M-Instruct), started by the test
session as a real process on a free 127.0.0.1 port; the tests talk to it over HTTP, and count what
it answered from its Prometheus counters (/metrics).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from ..conftest import ServeProcess, phi3_serve

PY_DOCS = Path("/usr/share/doc/python3.11/html/library")
SKLEARN_DOCS = Path("/usr/share/doc/python-sklearn-doc/html/modules")
DJANGO_DOCS = Path("/usr/share/doc/python-django-doc/html/topics")
FORTUNES = Path("/usr/share/games/fortunes")
STDLIB = Path(os.__file__).parent

PY_PAGES = ["json", "csv", "heapq", "bisect", "functools", "statistics", "textwrap", "fractions"]
SKLEARN_PAGES = ["kernel_approximation", "isotonic", "naive_bayes", "cross_validation"]
DJANGO_PAGES = ["pagination", "signals", "cache", "i18n/timezones"]
FORTUNE_FILES = ["computers", "education", "definitions"]
CODE_FILES = ["heapq.py", "bisect.py", "colorsys.py", "textwrap.py"]


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: the data tests read Debian's documentation packages; run `make data-deps`")
    return path


def near_duplicate(html: str) -> str:
    """The page with a few words changed: Jaccard similarity stays well above 0.8."""
    return html.replace("module", "modul", 3).replace("Return", "Give back", 2)


@pytest.fixture(scope="session")
def raw_corpus(tmp_path_factory) -> Path:
    """raw/<source>/ directories of real files, plus one exact and one near duplicate page."""
    root = tmp_path_factory.mktemp("raw")
    (root / "pydoc").mkdir()
    for page in PY_PAGES:
        shutil.copy(_need(PY_DOCS / f"{page}.html"), root / "pydoc" / f"{page}.html")
    shutil.copy(PY_DOCS / "json.html", root / "pydoc" / "zz_json_copy.html")  # exact duplicate
    near = near_duplicate((PY_DOCS / "csv.html").read_text(encoding="utf-8"))
    (root / "pydoc" / "zz_csv_near.html").write_text(near, encoding="utf-8")  # near duplicate
    for name, src, pages in (("sklearn", SKLEARN_DOCS, SKLEARN_PAGES), ("django", DJANGO_DOCS, DJANGO_PAGES)):
        (root / name).mkdir()
        for page in pages:
            shutil.copy(_need(src / f"{page}.html"), root / name / (page.replace("/", "_") + ".html"))
    (root / "fortunes").mkdir()
    for f in FORTUNE_FILES:
        shutil.copy(_need(FORTUNES / f), root / "fortunes" / f)
    (root / "code").mkdir()
    for f in CODE_FILES:
        shutil.copy(STDLIB / f, root / "code" / f)
    return root


@pytest.fixture(scope="session")
def corpus_shards(raw_corpus, tmp_path_factory) -> Path:
    """The raw corpus ingested into shards (fortunes grouped 8 to a document, 8 documents kept)."""
    from phi3.data.ingest import ingest

    out = tmp_path_factory.mktemp("shards")
    ingest([raw_corpus / "pydoc"], out, "pydoc", kind="html", shard_size=4)
    ingest([raw_corpus / "sklearn"], out, "sklearn", kind="html")
    ingest([raw_corpus / "django"], out, "django", kind="html")
    ingest([raw_corpus / "fortunes"], out, "fortunes", kind="fortune", group=8, limit=8)
    ingest([raw_corpus / "code"], out, "code", kind="text")
    return out


@dataclass
class Teacher:
    """`phi3 serve` running the default model: its OpenAI base URL, model id and Prometheus counters."""
    server: ServeProcess
    model: str

    @property
    def base_url(self) -> str:
        return self.server.url + "/v1"

    def _metrics(self) -> dict[tuple, float]:
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.server.url + "/metrics", timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def answered(self) -> int:
        """Chat completions the server has answered (HTTP 200) so far: its `phi3_requests_total` counter."""
        labels = (("endpoint", "/v1/chat/completions"), ("status", "200"))
        return int(self._metrics().get(("phi3_requests_total", labels), 0))

    def settle(self, timeout: float = 120.0) -> int:
        """Wait until nothing is queued or decoding and the answered count holds still; return it.

        A killed client leaves its requests in flight: the server still answers them (to nobody)."""
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            m = self._metrics()
            busy = m.get(("phi3_active_slots", ()), 0) + m.get(("phi3_queue_depth", ()), 0)
            count = self.answered()
            if not busy and count == last:
                return count
            last = count
            time.sleep(0.5)
        pytest.fail(f"the teacher server was still busy after {timeout:.0f} s")


@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    """`phi3 serve` with the default model (SmolLM2-135M-Instruct) on a free loopback port, for the session.

    Short contexts (every test prompt plus its reply fits in 512 tokens) keep the KV slots small;
    8 slots let concurrent requests share decode steps (continuous batching). One torch thread: the
    tests' own processes need the other core, and on a busy machine two OpenMP threads waiting on
    each other make a 135M model several times slower."""
    log = tmp_path_factory.mktemp("teacher") / "serve.log"
    with phi3_serve(["--ctx", "512", "--slots", "8", "--threads", "1"], log, timeout=300) as server:
        model = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
        yield Teacher(server, model)
