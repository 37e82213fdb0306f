"""Fixtures for the data-pipeline tests: a small real corpus and a real teacher LLM on loopback.

The corpus is cut from Debian's documentation packages (python3.11-doc, python-sklearn-doc,
python-django-doc), the Python standard library sources and Debian's fortunes (`make data-deps`
installs the packages; CI does it in .ci/run), with injected exact and near duplicates.

The teacher is an OpenAI-compatible server started by the test session on 127.0.0.1 that runs the
default SmolLM2 model. It is `tests/data/teacher_server.py` until `phi3 serve` lands; to use
another server, set PHI3_TEST_TEACHER_CMD, e.g. "phi3 serve --port {port}".
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TeacherServer:
    base_url: str
    log: Path
    model: str = "smollm2"

    def calls(self) -> list[str]:
        """sha256 of every prompt the server has answered, in order."""
        return self.log.read_text().split() if self.log.exists() else []


@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("teacher") / "calls.txt"
    custom = os.environ.get("PHI3_TEST_TEACHER_CMD")
    cmd = shlex.split(custom.format(port=port)) if custom else \
        [sys.executable, str(HERE / "teacher_server.py"), "--port", str(port), "--log", str(log)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(base + "/models", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"teacher server exited: {proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("teacher server did not start in 300 s")
            time.sleep(0.5)
    yield TeacherServer(base, log)
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
