"""Safetensors files written a tensor at a time.

`safetensors.torch.save_file` needs every tensor of a file in memory at once. A checkpoint written
from a quantized model would then hold its file layout (unpacked from the kernel layout) beside the
model: twice the model. Here the header is built first from each tensor's name, shape and dtype,
and each tensor is produced (`get()`), written and dropped in turn.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length,
the JSON header (name -> dtype, shape, data_offsets; "__metadata__" -> str -> str), padded with
spaces to a multiple of 8, then the tensors' bytes back to back (offsets relative to the end of
the header, no gaps). Every tensor starts at a multiple of its element size: the ones whose byte
length is not a multiple of 8 go last, widest elements first. Files are read back by the
`safetensors` library like its own.
"""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from .atomic import atomic_write

DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@dataclass
class Entry:
    """One tensor of a file to write: `get()` gives it (of this shape and dtype) when it is written."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    get: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


def in_file_order(entries: Iterable[Entry]) -> list[Entry]:
    """The entries as given, but those whose length is not a multiple of 8 bytes last, widest
    element first: every tensor then starts at a multiple of its element size."""
    entries = list(entries)
    odd = [e for e in entries if e.nbytes % 8]
    odd.sort(key=lambda e: -e.dtype.itemsize)  # stable: the given order within a width
    return [e for e in entries if not e.nbytes % 8] + odd


def header_bytes(entries: list[Entry], metadata: dict[str, str] | None) -> bytes:
    """The length prefix and the JSON header of a file holding `entries` in this order."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for e in entries:
        if e.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {e.name}: dtype {e.dtype} cannot be stored in safetensors")
        header[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _check(e: Entry, t: torch.Tensor) -> torch.Tensor:
    if tuple(t.shape) != tuple(e.shape) or t.dtype != e.dtype:
        raise RuntimeError(f"tensor {e.name}: planned {list(e.shape)} {e.dtype}, produced {list(t.shape)} {t.dtype}")
    return t.detach().contiguous().reshape(-1)


def write_safetensors(path: str | Path, entries: Iterable[Entry], metadata: dict[str, str] | None = None,
                      progress: str | None = None) -> None:
    """Write `entries` to `path` atomically (tmp + rename), holding one tensor at a time. `progress`:
    the label of a bar on stderr (shown when it is a terminal)."""
    entries = in_file_order(entries)
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate tensor names: {sorted({n for n in names if names.count(n) > 1})}")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(header_bytes(entries, metadata))
            for e in _bar(entries, progress) if progress else entries:
                t = _check(e, e.get())
                if t.numel():
                    f.write(memoryview(t.view(torch.uint8).numpy()))
                del t

    atomic_write(path, write)


def _bar(entries: list[Entry], label: str):
    from tqdm import tqdm
    return tqdm(entries, desc=label, unit="tensor", disable=None, leave=False, file=sys.stderr)
