"""Safetensors written a tensor at a time: read back by the `safetensors` library as its own files,
every tensor aligned to its element size, one tensor alive at a time, failures atomic."""

import json
import struct
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from phi3.safetensors_writer import Entry, write_safetensors


def _entries(tensors: dict[str, torch.Tensor]) -> list[Entry]:
    return [Entry(name, tuple(t.shape), t.dtype, lambda t=t: t.clone()) for name, t in tensors.items()]


def _header(path) -> dict:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert n % 8 == 0
    return json.loads(raw[8:8 + n])


def test_round_trip_through_the_safetensors_library(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "odd_bytes": torch.randint(0, 255, (3, 5), dtype=torch.uint8),  # 15 bytes: must not misalign the rest
        "w.bf16": torch.randn(4, 6).bfloat16(),
        "w.f32": torch.randn(7),
        "q.i8": torch.randint(-128, 127, (2, 3), dtype=torch.int8),
        "h.f16": torch.randn(3).half(),  # 6 bytes
        "ids": torch.arange(5),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
    }
    path = tmp_path / "x.safetensors"
    write_safetensors(path, _entries(tensors), metadata={"format": "pt"})
    back = load_file(path)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    header = _header(path)
    end = 0
    for name, info in sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                             key=lambda kv: kv[1]["data_offsets"]):
        start, stop = info["data_offsets"]
        assert start == end, "tensors back to back"
        assert start % tensors[name].element_size() == 0, f"{name} starts at {start}"
        end = stop
    assert header["__metadata__"] == {"format": "pt"}


def test_one_tensor_is_alive_at_a_time(tmp_path):
    alive = []

    def produce(i):
        t = torch.full((1000,), float(i))
        alive.append(weakref.ref(t))
        assert sum(r() is not None for r in alive) == 1, "the tensor written before is still held"
        return t

    entries = [Entry(f"t{i}", (1000,), torch.float32, lambda i=i: produce(i)) for i in range(5)]
    write_safetensors(tmp_path / "x.safetensors", entries)
    assert len(alive) == 5
    assert torch.equal(load_file(tmp_path / "x.safetensors")["t3"], torch.full((1000,), 3.0))


def test_a_tensor_unlike_its_plan_is_named_and_the_old_file_kept(tmp_path):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, _entries({"a": torch.ones(2)}))
    before = path.read_bytes()
    bad = [Entry("a", (2,), torch.float32, lambda: torch.ones(2)),
           Entry("b", (3,), torch.float32, lambda: torch.ones(4))]
    with pytest.raises(RuntimeError, match=r"tensor b: planned \[3\] torch.float32, produced \[4\]"):
        write_safetensors(path, bad)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no temporary left behind


def test_duplicate_names_and_unstorable_dtypes_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"duplicate tensor names: \['a'\]"):
        write_safetensors(tmp_path / "x.safetensors", _entries({"a": torch.ones(1)}) * 2)
    with pytest.raises(ValueError, match="tensor c: dtype torch.complex64"):
        write_safetensors(tmp_path / "y.safetensors", _entries({"c": torch.ones(1, dtype=torch.complex64)}))
