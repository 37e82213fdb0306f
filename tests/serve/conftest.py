"""Servers on free loopback ports: the real default model (SmolLM2-135M-Instruct) and a tiny random Phi-3."""

import contextlib
import socket
import threading
import time

import pytest
import torch
import transformers

from phi3.api import LanguageModel
from phi3.checkpoint import build_model
from phi3.config import ModelConfig
from phi3.serve.server import build
from phi3.tokenizer import Tokenizer

from ..conftest import SHARED, scaled_down


@contextlib.contextmanager
def running(app):
    """Run `app` with uvicorn in a thread on 127.0.0.1:<free port>; yield its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextlib.contextmanager
def served(lm, **kw):
    """(base URL, engine) of a server for `lm`; the engine stops afterwards."""
    app, engine = build(lm, **kw)
    try:
        with running(app) as url:
            yield url, engine
    finally:
        engine.stop()


@pytest.fixture(scope="session")
def smol():
    """The real default model, loaded once for all server tests."""
    import phi3

    return phi3.load()


@pytest.fixture(scope="session")
def tiny_lm():
    """A tiny random Phi-3 with the real Phi-3 tokenizer (and its chat template): fast to generate."""
    torch.manual_seed(0)
    hf = scaled_down("phi-3-mini-4k-instruct", vocab=32064, original=64)
    ref = transformers.Phi3ForCausalLM(transformers.Phi3Config(**hf)).eval()
    model = build_model(ModelConfig.from_hf_dict(hf), ref.state_dict(), torch.float32)
    return LanguageModel(model, Tokenizer.from_gguf(SHARED / "tokenizer" / "ggml-vocab-phi-3.gguf"), "tiny-phi3")
