"""Giving a mapped checkpoint's pages back (`phi3.memory.drop_file_pages`) without losing a byte."""

import resource

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from phi3.checkpoint import read_safetensors
from phi3.memory import drop_file_pages

linux = pytest.mark.skipif(not __import__("os").path.exists("/proc/self/pagemap"), reason="needs Linux /proc")


def resident_pages(t: torch.Tensor) -> int:
    """Pages of t's storage mapped into this process now (/proc/self/pagemap bit 63)."""
    storage, page = t.untyped_storage(), resource.getpagesize()
    start, n = storage.data_ptr() // page, -(-storage.nbytes() // page)
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(start * 8)
        entries = np.frombuffer(f.read(n * 8), dtype=np.uint64)
    return int(((entries >> 63) & 1).sum())


@pytest.fixture
def mapped(tmp_path):
    w = torch.randn(1024, 1024)
    save_file({"w": w, "v": w.clone()}, str(tmp_path / "model.safetensors"))
    tensors = read_safetensors([tmp_path / "model.safetensors"])
    return w, tensors


@linux
def test_a_read_checkpoint_tensor_leaves_memory_and_reads_back(mapped):
    w, tensors = mapped
    t = tensors["w"]
    assert torch.equal(t, w)  # every page read
    assert resident_pages(t) >= 1000  # 4 MB of fp32
    drop_file_pages(t)
    assert resident_pages(t) <= 2
    assert torch.equal(t, w)  # mapped again from the file


@linux
def test_written_and_anonymous_memory_is_left_alone(mapped):
    w, tensors = mapped
    t = tensors["v"]
    t[5, :] = 7.0  # through the private mapping: that page is no longer the file's
    drop_file_pages(t)
    assert (t[5] == 7.0).all() and torch.equal(t[6:], w[6:])
    assert resident_pages(t) >= 1000
    anon = w.clone()
    drop_file_pages(anon)
    assert torch.equal(anon, w) and resident_pages(anon) >= 1000
