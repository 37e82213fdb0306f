"""GGUF checkpoints in: the container, our own torch dequantization, HF names and an HF config.

* `read_gguf` parses the container itself (a short sequential parser, ~30x faster than
  `gguf.GGUFReader` on real tokenizer metadata, and checked against it in the tests). The file is
  memory-mapped, so no tensor data is read until a tensor is dequantized. The `gguf` package
  supplies the type tables (ggml type ids, block sizes).
* `dequantize` turns one tensor's raw blocks into a torch tensor with vectorised torch ops
  (no Python loop over blocks) for F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K-Q6_K, IQ4_NL
  and IQ4_XS; the remaining types llama.cpp writes (IQ1-IQ3, TQ, MXFP4) through gguf-py's reference.
  Each kernel computes in float32 in the same order as ggml's reference, so the result is
  bit-exact with `gguf.quants.dequantize`.
* `gguf_state_dict` renames llama.cpp tensors to HF names (phi3 and llama architectures), fuses
  separate q/k/v for phi3 and undoes the q/k row permutation llama.cpp applies to llama models.
* `gguf_to_hf_config` rebuilds an HF `config.json` dict from the GGUF metadata.

Block layouts (little-endian, `d`/`m`/`dmin` are fp16, one block = `block_size` weights):

    Q8_0  34 B / 32:   d, qs[32] int8                      w = d * q
    Q4_0  18 B / 32:   d, qs[16] (lo nibbles = w0..15,      w = d * (q - 8)
                                  hi nibbles = w16..31)
    Q4_1  20 B / 32:   d, m, qs[16] (as Q4_0)              w = d * q + m
    Q4_K 144 B / 256:  d, dmin, scales[12], qs[128]        w = d*sc[j] * q - dmin*mn[j]
    Q5_K 176 B / 256:  d, dmin, scales[12], qh[32], qs[128]  (q gets a 5th bit from qh)
    Q6_K 210 B / 256:  ql[128], qh[64], scales[16] int8, d   w = d*sc[j] * (q - 32)
"""

from __future__ import annotations

import mmap
import re
import struct
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import cpu_kernels
from .errors import CheckpointError
from .safetensors_writer import Entry

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("phi3", "llama")

# qtype name -> (weights per block, bytes per block)
BLOCK_LAYOUT: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}
# llama.cpp writes the types below for Q2_K / Q3_K_* / IQ* files and as per-tensor fallbacks in other
# mixes (a row not a multiple of 256 turns Q3_K into IQ4_NL). Loading quantized, they are requantized
# (`requant_bits`). The lattice types (IQ1-IQ3), ternary and FP4 ones dequantize through gguf-py's
# numpy reference (`gguf.quants.dequantize`: ~25 M weights/s here, ~20x slower than our kernels).
BLOCK_LAYOUT.update({"Q2_K": (256, 84), "Q3_K": (256, 110), "IQ4_NL": (32, 18), "IQ4_XS": (256, 136)})
GGUF_PY_TYPES: dict[str, tuple[int, int]] = {
    "IQ1_S": (256, 50), "IQ1_M": (256, 56), "IQ2_XXS": (256, 66), "IQ2_XS": (256, 74), "IQ2_S": (256, 82),
    "IQ3_XXS": (256, 98), "IQ3_S": (256, 110), "TQ1_0": (256, 54), "TQ2_0": (256, 66), "MXFP4": (32, 17),
}
BLOCK_LAYOUT.update(GGUF_PY_TYPES)
DENSE_TYPES = ("F32", "F16", "BF16")


# ---------------------------------------------------------------------------------------------
# Container
# ---------------------------------------------------------------------------------------------
@dataclass
class GGUFTensor:
    """One tensor of a GGUF file, not yet dequantized."""

    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    qtype: str  # ggml type name, e.g. "Q4_0"
    shape: tuple[int, ...]  # PyTorch order, e.g. (out_features, in_features)
    raw: np.ndarray = field(repr=False)  # memory-mapped values/bytes, as gguf.GGUFReader gives them


@dataclass
class GGUFFile:
    """A parsed GGUF file: decoded metadata plus lazily-read tensors."""

    path: Path
    metadata: dict[str, Any]  # every KV field as plain python values
    tensors: dict[str, GGUFTensor]  # keyed by GGUF name
    architecture: str  # metadata["general.architecture"]
    mapping: mmap.mmap | None = field(default=None, repr=False)  # the file, memory-mapped

    def release_pages(self) -> None:
        """Drop the file's pages from this process's resident memory. They stay in the OS page cache
        and a later read of any tensor maps them back, so nothing is invalidated; loaders call this
        after converting each tensor so that the mapping never adds a second copy of the weights."""
        if self.mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            self.mapping.madvise(mmap.MADV_DONTNEED)


def parse_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF container of any architecture (metadata + tensor views); memory-mapped.

    Raises CheckpointError for a missing file, a file that is not GGUF, a truncated or corrupt
    file, or a big-endian or version-1 file.
    """
    path = Path(path)
    _check_magic(path)
    with open(path, "rb") as fh:
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)  # stays valid after close
    try:
        metadata, tensors = _parse(buf)
    except _Unsupported as e:
        raise CheckpointError(f"{path}: {e}") from e
    except _Corrupt as e:
        raise CheckpointError(f"{path}: truncated or corrupt GGUF ({e})") from e
    except (struct.error, ValueError, OverflowError, MemoryError) as e:  # a length field gone wild
        raise CheckpointError(f"{path}: truncated or corrupt GGUF ({type(e).__name__}: {e})") from e
    return GGUFFile(path=path, metadata=metadata, tensors=tensors, architecture=metadata.get("general.architecture"),
                    mapping=buf)


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF model checkpoint; also rejects an architecture other than phi3/llama."""
    f = parse_gguf(path)
    path, metadata = f.path, f.metadata
    arch = metadata.get("general.architecture")
    if arch is None:
        raise CheckpointError(f"{path}: GGUF has no 'general.architecture' metadata")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return f


def _check_magic(path: Path) -> None:
    """Fail with a clear message on a missing file, a directory or a file that is not GGUF."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such GGUF file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a .gguf file")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")


# Our own container parser. gguf.GGUFReader builds a numpy view per array element, which takes
# 3-5 s on the 100k-entry token/merge lists of a small model; reading sequentially with
# `struct` takes ~0.1 s. The layout (GGUF v2/v3, little-endian) is:
#   magic "GGUF", u32 version, u64 n_tensors, u64 n_kv,
#   n_kv x (string key, u32 value_type, value),
#   n_tensors x (string name, u32 n_dims, u64 dims[n_dims] (innermost first), u32 ggml_type, u64 offset),
#   padding to `general.alignment` (default 32), then the tensor data (offsets relative to it).
# A string is u64 length + utf-8 bytes; an array is u32 element_type, u64 count, elements.
# tests/test_gguf.py checks the result against gguf.GGUFReader.
class _Corrupt(Exception):
    """Raised inside the parser; read_gguf turns it into a CheckpointError naming the file."""


class _Unsupported(Exception):
    """A well-formed file in a variant we do not read (big-endian, version 1)."""


# GGUF value type id -> (struct format, numpy dtype) for fixed-size values
_FIXED_TYPES: dict[int, tuple[str, str]] = {
    0: ("<B", "u1"), 1: ("<b", "i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"), 5: ("<i", "<i4"),
    6: ("<f", "<f4"), 7: ("<?", "?"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"), 12: ("<d", "<f8"),
}
_STRING, _ARRAY = 8, 9
# ggml types whose raw data is handed out as typed values rather than bytes (as GGUFReader does)
_TYPED_RAW = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}


class _Cursor:
    """Sequential little-endian reads from the mapped file; reading past its end raises _Corrupt."""

    def __init__(self, buf: mmap.mmap):
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def _advance(self, n: int, what: str) -> int:
        start = self.pos
        if n < 0 or start + n > self.size:
            raise _Corrupt(f"file ends at byte {self.size} while reading {what} at byte {start}")
        self.pos += n
        return start

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self._advance(struct.calcsize(fmt), what))[0]

    def check_count(self, count: int, min_size: int, what: str) -> None:
        """Reject a count that cannot fit in the rest of the file (a corrupt length field)."""
        if count > (self.size - self.pos) // min_size:
            raise _Corrupt(f"{count} {what} at byte {self.pos} cannot fit in a file of {self.size} bytes")

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        start = self._advance(n, what)
        return self.buf[start : start + n].decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str) -> Any:
        if vtype == _STRING:
            return self.string(what)
        if vtype in _FIXED_TYPES:
            return self.scalar(_FIXED_TYPES[vtype][0], what)
        if vtype != _ARRAY:
            raise _Corrupt(f"unknown value type {vtype} in {what}")
        etype, count = self.scalar("<I", what), self.scalar("<Q", what)
        if etype in _FIXED_TYPES:  # numbers: one vectorised read
            dt = np.dtype(_FIXED_TYPES[etype][1])
            start = self._advance(count * dt.itemsize, what)
            return np.frombuffer(self.buf, dtype=dt, count=count, offset=start).tolist()
        self.check_count(count, 8, f"elements of {what}")  # strings and arrays take >= 8 bytes each
        if etype == _STRING:
            return self.strings(count, what)
        return [self.value(etype, what) for _ in range(count)]

    def strings(self, count: int, what: str) -> list[str]:
        """`count` strings in a row (a vocabulary: ~100k of them), read in one tight loop."""
        buf, pos, size, out = self.buf, self.pos, self.size, []
        length = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > size:
                raise _Corrupt(f"file ends at byte {size} while reading {what} at byte {pos}")
            n = length(buf, pos)[0]
            if pos + 8 + n > size:
                raise _Corrupt(f"file ends at byte {size} while reading {what} at byte {pos + 8}")
            out.append(buf[pos + 8:pos + 8 + n].decode("utf-8", errors="replace"))
            pos += 8 + n
        self.pos = pos
        return out


def _parse(buf: mmap.mmap) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
    """The whole header: decoded metadata and the tensor table (data left in the map)."""
    cur = _Cursor(buf)
    cur.pos = 4  # magic, checked by _check_magic
    version = cur.scalar("<I", "the version")
    if version & 0xFFFF == 0:
        raise _Unsupported("big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise _Unsupported(f"GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = cur.scalar("<Q", "the tensor count"), cur.scalar("<Q", "the metadata count")
    cur.check_count(n_kv, 12, "metadata entries")  # key length + value type at least
    cur.check_count(n_tensors, 24, "tensor entries")  # name length, n_dims, type, offset

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        if key in metadata:
            raise _Corrupt(f"duplicate metadata key {key!r}")
        metadata[key] = cur.value(cur.scalar("<I", f"metadata {key!r}"), f"metadata {key!r}")

    infos = []
    for i in range(n_tensors):
        name = cur.string(f"tensor name #{i}")
        n_dims = cur.scalar("<I", f"tensor {name!r}")
        if n_dims > 8:
            raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions")
        dims = [cur.scalar("<Q", f"tensor {name!r}") for _ in range(n_dims)]
        ggml_type, offset = cur.scalar("<I", f"tensor {name!r}"), cur.scalar("<Q", f"tensor {name!r}")
        infos.append((name, tuple(reversed(dims)), ggml_type, offset))  # PyTorch order: outermost first

    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise _Corrupt(f"general.alignment = {alignment!r} is not a power of two")
    data_start = -(-cur.pos // alignment) * alignment

    tensors: dict[str, GGUFTensor] = {}
    for name, shape, ggml_type, offset in infos:
        if name in tensors:
            raise _Corrupt(f"duplicate tensor {name!r}")
        tensors[name] = _tensor_view(buf, name, shape, ggml_type, data_start + offset)
    return metadata, tensors


def _tensor_view(buf: mmap.mmap, name: str, shape: tuple[int, ...], ggml_type: int, start: int) -> GGUFTensor:
    """A GGUFTensor whose `raw` is a read-only numpy view of the map (typed for float/int types, else bytes)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType(ggml_type)
    except ValueError:
        raise _Corrupt(f"tensor {name!r} has unknown ggml type id {ggml_type}") from None
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    row = shape[-1] if shape else 1
    if row % block_size:
        raise _Corrupt(f"tensor {name!r}: row length {row} is not a multiple of the {qtype.name} blocks ({block_size})")
    n_elements = int(np.prod(shape, dtype=np.int64))
    n_bytes = n_elements // block_size * type_size
    if start + n_bytes > len(buf):
        raise _Corrupt(f"tensor {name!r} needs bytes {start}..{start + n_bytes}, the file has {len(buf)}")
    if qtype.name in _TYPED_RAW:
        dt = np.dtype(_TYPED_RAW[qtype.name])
        raw = np.frombuffer(buf, dtype=dt, count=n_elements, offset=start).reshape(shape)
    else:  # blocks: (*outer dims, bytes per row)
        raw = np.frombuffer(buf, dtype=np.uint8, count=n_bytes, offset=start)
        raw = raw.reshape(*shape[:-1], row // block_size * type_size)
    return GGUFTensor(name, qtype.name, shape, raw)


# ---------------------------------------------------------------------------------------------
# Dequantization
# ---------------------------------------------------------------------------------------------
def dequantize(t: GGUFTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize one tensor to a new torch tensor of shape `t.shape` (never a view of the file).

    CheckpointError (naming the tensor) for an unsupported type or data of the wrong size.
    """
    if t.qtype not in BLOCK_LAYOUT:
        raise CheckpointError(
            f"tensor {t.name!r}: GGUF type {t.qtype} is not supported (supported: {', '.join(BLOCK_LAYOUT)})"
        )
    block_size, type_size = BLOCK_LAYOUT[t.qtype]
    n = int(np.prod(t.shape, dtype=np.int64))
    if t.shape and t.shape[-1] % block_size:
        raise CheckpointError(
            f"tensor {t.name!r}: row length {t.shape[-1]} is not a multiple of the {t.qtype} block size {block_size}"
        )
    data = raw_bytes(t.raw)
    if data.numel() != n // block_size * type_size:
        raise CheckpointError(
            f"tensor {t.name!r}: {t.qtype} data has {data.numel()} bytes, shape {t.shape} needs "
            f"{n // block_size * type_size}"
        )

    if t.qtype == "F32":
        out = data.view(torch.float32).to(dtype, copy=True)
    elif t.qtype == "F16":
        out = data.view(torch.float16).to(dtype, copy=True)
    elif t.qtype == "BF16":
        out = data.view(torch.bfloat16).to(dtype, copy=True)
    else:
        out = _dequantize_blocks(t.qtype, data.view(-1, type_size), dtype)
    return out.reshape(t.shape)


def _block_kernel(qtype: str):
    """The C kernel where it runs (the same floats, several times faster), else the tensor-op one."""
    lib = cpu_kernels.library()
    if lib is not None and qtype in cpu_kernels.DEQUANT_TYPES:
        return lambda blocks: cpu_kernels.dequant_ggml(lib, blocks, qtype)
    return _BLOCK_KERNELS[qtype]


_CHUNK_WEIGHTS = 1 << 22  # float32 scratch per chunk when the target dtype is not float32 (16 MiB)


def _dequantize_blocks(qtype: str, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n_blocks, type_size) uint8 -> (n_blocks, block_size) in `dtype`.

    The kernels compute in float32 (as ggml does). For float32 our kernels' output is the result; for
    other dtypes, and for gguf-py's kernels (whose numpy temporaries are several times the output), we
    convert chunk by chunk so a large tensor never needs a full float32 copy or scratch of its size.
    """
    kernel = _block_kernel(qtype)
    if dtype == torch.float32 and qtype not in GGUF_PY_TYPES:
        return kernel(blocks)
    block_size = BLOCK_LAYOUT[qtype][0]
    out = torch.empty(blocks.shape[0], block_size, dtype=dtype)
    step = max(1, _CHUNK_WEIGHTS // block_size)
    for i in range(0, blocks.shape[0], step):
        out[i : i + step] = kernel(blocks[i : i + step])
    return out


def raw_bytes(raw: np.ndarray) -> torch.Tensor:
    """Flat uint8 torch view of the raw data, sharing memory with the (read-only) memory map."""
    flat = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    with warnings.catch_warnings():  # the map is read-only; we only ever read from this view
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(flat)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 value at byte `start` of every block, as float32: (n_blocks, type_size) -> (n_blocks, 1)."""
    return blocks[:, start : start + 2].view(torch.float16).float()


def _nibbles(qs: torch.Tensor, groups: int) -> torch.Tensor:
    """Unpack 4-bit values: (n_blocks, groups*G) bytes -> (n_blocks, groups, 2, G) float32.

    For each group of G bytes the low nibbles come first, then the high nibbles (ggml's order).
    """
    qs = qs.reshape(qs.shape[0], groups, 1, -1)
    out = torch.empty(qs.shape[0], groups, 2, qs.shape[-1], dtype=torch.float32)
    out[:, :, 0:1] = qs & 0x0F
    out[:, :, 1:2] = qs >> 4
    return out


def _dequant_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)  # (nb, 1)
    q = blocks[:, 2:].view(torch.int8).float()  # (nb, 32)
    return q.mul_(d)


def _dequant_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)  # (nb, 1)
    q = _nibbles(blocks[:, 2:], 1).view(-1, 32)  # (nb, 16) bytes -> (nb, 32)
    return q.sub_(8).mul_(d)


def _dequant_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks, 0), _f16(blocks, 2)  # (nb, 1) each
    q = _nibbles(blocks[:, 4:], 1).view(-1, 32)  # (nb, 16) bytes -> (nb, 32)
    return q.mul_(d).add_(m)


def _q5(blocks: torch.Tensor, qh_start: int) -> torch.Tensor:
    """Q5_0 / Q5_1: the 32 5-bit values of each block (nb, 32) float32; bit k of the 4 bytes at
    `qh_start` is the fifth bit of weight k, the 16 bytes after them its nibbles (low: 0..15)."""
    qh = blocks[:, qh_start:qh_start + 4].to(torch.int64)
    qh = qh[:, 0] | qh[:, 1] << 8 | qh[:, 2] << 16 | qh[:, 3] << 24  # (nb,)
    high = ((qh[:, None] >> torch.arange(32)) & 1) << 4  # (nb, 32)
    return _nibbles(blocks[:, qh_start + 4:qh_start + 20], 1).view(-1, 32).add_(high)


def _dequant_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    return _q5(blocks, 2).sub_(16).mul_(_f16(blocks, 0))


def _dequant_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    return _q5(blocks, 4).mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 packed bytes -> eight 6-bit scales and eight 6-bit mins, (nb, 8) float32 each.

    bytes 0-3: scale j (low 6 bits) for j<4, top 2 bits = bits 4-5 of scale j+4
    bytes 4-7: min j   (low 6 bits) for j<4, top 2 bits = bits 4-5 of min j+4
    bytes 8-11: low nibble = bits 0-3 of scale j+4, high nibble = bits 0-3 of min j+4
    """
    a, b, c = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], dim=1)
    mn = torch.cat([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], dim=1)
    return sc.float(), mn.float()


def _dequant_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)  # (nb, 1)
    sc, mn = _k_scales(blocks[:, 4:16])  # (nb, 8)
    q = _nibbles(blocks[:, 16:144], 4).view(-1, 8, 32)  # 4 x 32 bytes -> 8 sub-blocks of 32
    scale = (d * sc).unsqueeze(-1)  # (nb, 8, 1)
    offset = (dmin * mn).unsqueeze(-1)
    return q.mul_(scale).sub_(offset).view(-1, 256)


def _dequant_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)  # (nb, 1)
    sc, mn = _k_scales(blocks[:, 4:16])  # (nb, 8)
    qh = blocks[:, 16:48]  # (nb, 32): bit j of byte l is the 5th bit of weight l of sub-block j
    qs = blocks[:, 48:176].reshape(-1, 4, 1, 32)  # (nb, 4, 1, 32)
    low = torch.cat([qs & 0x0F, qs >> 4], dim=2).view(-1, 8, 32)  # (nb, 8, 32)
    shifts = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
    high = ((qh.unsqueeze(1) >> shifts) & 1) << 4  # (nb, 8, 32)
    q = (low | high).float()
    scale = (d * sc).unsqueeze(-1)  # (nb, 8, 1)
    offset = (dmin * mn).unsqueeze(-1)
    return q.mul_(scale).sub_(offset).view(-1, 256)


def _dequant_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # Two halves of 128 weights; half h uses ql[64h:64h+64], qh[32h:32h+32].
    # Weight l + 32*i of a half (i = 0..3, l = 0..31) has low 4 bits from nibble i//2 of
    # ql[l + 32*(i%2)] and high 2 bits from bits 2i..2i+1 of qh[l].
    ql = blocks[:, 0:128].reshape(-1, 2, 1, 64)  # (nb, half, 1, 64)
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32)  # (nb, half, 1, 32)
    scales = blocks[:, 192:208].view(torch.int8).float()  # (nb, 16): one per 16 weights
    d = _f16(blocks, 208)  # (nb, 1)
    low = torch.cat([ql & 0x0F, ql >> 4], dim=2).view(-1, 2, 4, 32)  # (nb, half, i, l)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    high = ((qh >> shifts) & 3) << 4  # (nb, half, i, l)
    q = (low | high).view(torch.int8).float().sub_(32).view(-1, 16, 16)  # (nb, 16 groups, 16)
    scale = (d * scales).unsqueeze(-1)  # (nb, 16, 1)
    return q.mul_(scale).view(-1, 256)


def _dequant_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    # scales[16] (low nibble: scale, high: min, one each per 16 weights), qs[64] (2 bits a weight:
    # weight l + 32i of a half h is bits 2i, 2i + 1 of qs[32h + l]), d, dmin.
    scales = blocks[:, 0:16]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)  # (nb, 1)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    q = ((blocks[:, 16:80].reshape(-1, 2, 1, 32) >> shifts) & 3).float().view(-1, 16, 16)  # (nb, 16, 16)
    scale = (d * (scales & 0x0F).float()).unsqueeze(-1)  # (nb, 16, 1)
    offset = (dmin * (scales >> 4).float()).unsqueeze(-1)
    return q.mul_(scale).sub_(offset).view(-1, 256)


def _dequant_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    # hmask[32] (bit i of byte l, set: no −4 offset, for weight 32i + l), qs[64] (low 2 bits, as Q2_K),
    # scales[12] (sixteen 6-bit scales, biased by 32: low nibbles in bytes 0..7, high 2 bits in 8..11), d.
    d = _f16(blocks, 108)  # (nb, 1)
    low = (blocks[:, 96:104].reshape(-1, 1, 8) >> torch.tensor([0, 4], dtype=torch.uint8).view(1, 2, 1)) & 0x0F
    high = (blocks[:, 104:108].reshape(-1, 1, 4) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 4, 1)) & 3
    sc = (low.reshape(-1, 16) | high.reshape(-1, 16) << 4).to(torch.int8).sub_(32).float()  # (nb, 16)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    ql = ((blocks[:, 32:96].reshape(-1, 2, 1, 32) >> shifts) & 3).view(-1, 16, 16)  # (nb, 16, 16)
    hbit = (blocks[:, 0:32].reshape(-1, 1, 1, 32) >> torch.arange(8, dtype=torch.uint8).view(1, 1, 8, 1)) & 1
    q = ql.to(torch.int8) - ((hbit.view(-1, 16, 16) ^ 1) << 2).to(torch.int8)
    return q.float().mul_((d * sc).unsqueeze(-1)).view(-1, 256)


IQ4_VALUES = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                          dtype=torch.float32)  # the non-uniform 4-bit grid of IQ4_NL / IQ4_XS


def _iq4_values(qs: torch.Tensor) -> torch.Tensor:
    """(nb, groups·16) bytes -> (nb, groups, 32) grid values; per 16 bytes the low nibbles first."""
    qs = qs.reshape(qs.shape[0], -1, 1, 16)
    idx = torch.cat([qs & 0x0F, qs >> 4], dim=2).view(qs.shape[0], -1, 32)
    return IQ4_VALUES[idx.long()]


def _dequant_iq4_nl(blocks: torch.Tensor) -> torch.Tensor:
    return _iq4_values(blocks[:, 2:18]).view(-1, 32).mul_(_f16(blocks, 0))


def _dequant_iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    # d, scales_h (uint16: bits 2j, 2j + 1 are the high bits of scale j), scales_l[4] (nibbles: scale
    # j's low 4 bits), qs[128]: eight sub-blocks of 32 with 6-bit scales biased by 32.
    d = _f16(blocks, 0)  # (nb, 1)
    sh = blocks[:, 2:4].to(torch.int32)
    sh = sh[:, :1] | sh[:, 1:] << 8  # (nb, 1)
    high = (sh >> torch.arange(0, 16, 2, dtype=torch.int32)) & 3  # (nb, 8)
    sl = blocks[:, 4:8].reshape(-1, 4, 1) >> torch.tensor([0, 4], dtype=torch.uint8).view(1, 1, 2)
    sc = ((sl.reshape(-1, 8) & 0x0F).to(torch.int32) | high << 4).to(torch.int8).sub_(32).float()  # (nb, 8)
    return _iq4_values(blocks[:, 8:136]).mul_((d * sc).unsqueeze(-1)).view(-1, 256)


def _gguf_py_kernel(qtype: str):
    """(n_blocks, type_size) uint8 -> (n_blocks, block_size) float32 by gguf-py's reference."""
    def kernel(blocks: torch.Tensor) -> torch.Tensor:
        from gguf import GGMLQuantizationType, quants

        out = quants.dequantize(blocks.numpy(), GGMLQuantizationType[qtype])
        return torch.from_numpy(np.asarray(out, dtype=np.float32))
    return kernel


_BLOCK_KERNELS = {
    **{qtype: _gguf_py_kernel(qtype) for qtype in GGUF_PY_TYPES},
    "Q2_K": _dequant_q2_k,
    "Q3_K": _dequant_q3_k,
    "IQ4_NL": _dequant_iq4_nl,
    "IQ4_XS": _dequant_iq4_xs,
    "Q8_0": _dequant_q8_0,
    "Q4_0": _dequant_q4_0,
    "Q4_1": _dequant_q4_1,
    "Q5_0": _dequant_q5_0,
    "Q5_1": _dequant_q5_1,
    "Q4_K": _dequant_q4_k,
    "Q5_K": _dequant_q5_k,
    "Q6_K": _dequant_q6_k,
}


# ---------------------------------------------------------------------------------------------
# HF config
# ---------------------------------------------------------------------------------------------
_REQUIRED = object()


def _meta(f: GGUFFile, key: str, default: Any = _REQUIRED) -> Any:
    """A metadata value; `{arch}` in the key is replaced by the file's architecture."""
    key = key.format(arch=f.architecture)
    if key in f.metadata:
        return f.metadata[key]
    if default is _REQUIRED:
        raise CheckpointError(f"{f.path}: GGUF metadata key {key!r} is missing")
    return default


def _meta_int(f: GGUFFile, key: str, default: Any = _REQUIRED) -> Any:
    value = _meta(f, key, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        key = key.format(arch=f.architecture)
        raise CheckpointError(f"{f.path}: GGUF metadata {key!r} = {value!r}, expected an integer")
    return value


def _nice_float(x: float) -> float:
    """GGUF stores floats as fp32: the shortest decimal with the same fp32 value (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(x)))


def _sizes(f: GGUFFile) -> dict[str, Any]:
    """Sizes, norm eps, rope base, context and special tokens shared by both architectures."""
    heads = _meta_int(f, "{arch}.attention.head_count")
    cfg: dict[str, Any] = {
        "hidden_size": _meta_int(f, "{arch}.embedding_length"),
        "intermediate_size": _meta_int(f, "{arch}.feed_forward_length"),
        "num_hidden_layers": _meta_int(f, "{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _meta_int(f, "{arch}.attention.head_count_kv", heads),
        "max_position_embeddings": _meta_int(f, "{arch}.context_length"),
        "rope_theta": _nice_float(_meta(f, "{arch}.rope.freq_base", 10000.0)),
        "rms_norm_eps": _nice_float(_meta(f, "{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "vocab_size": _vocab_size(f),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in f.tensors,
    }
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("pad_token_id", "padding_token_id")):
        value = _meta_int(f, "tokenizer.ggml." + gguf_key, None)
        if value is not None:
            cfg[hf_key] = value
    return cfg


def _vocab_size(f: GGUFFile) -> int:
    if "token_embd.weight" in f.tensors:
        return f.tensors["token_embd.weight"].shape[0]
    size = _meta_int(f, "{arch}.vocab_size", None)
    if size is None and "tokenizer.ggml.tokens" in f.metadata:
        size = len(f.metadata["tokenizer.ggml.tokens"])
    if size is None:
        raise CheckpointError(f"{f.path}: cannot tell the vocabulary size (no token_embd.weight, no vocab metadata)")
    return size


def gguf_to_hf_config(f: GGUFFile) -> dict[str, Any]:
    """An HF config.json dict (Phi3ForCausalLM or LlamaForCausalLM) from the GGUF metadata."""
    if f.architecture == "phi3":
        return _phi3_config(f)
    if f.architecture == "llama":
        return _llama_config(f)
    raise CheckpointError(f"{f.path}: GGUF architecture {f.architecture!r} is not supported")


def _phi3_config(f: GGUFFile) -> dict[str, Any]:
    cfg = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", **_sizes(f)}
    cfg["original_max_position_embeddings"] = _meta_int(
        f, "phi3.rope.scaling.original_context_length", cfg["max_position_embeddings"]
    )
    window = _meta_int(f, "phi3.attention.sliding_window", 0)
    cfg["sliding_window"] = window or None  # the converter writes 0 for "no window"

    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    rot_dim = _meta_int(f, "phi3.rope.dimension_count", head_dim)
    if rot_dim < head_dim:
        cfg["partial_rotary_factor"] = rot_dim / head_dim

    cfg["rope_scaling"] = scaling = _longrope_scaling(f)
    if scaling is not None:
        for key in ("short_factor", "long_factor"):
            if len(scaling[key]) != rot_dim // 2:
                raise CheckpointError(
                    f"{f.path}: rope_factors_{key.split('_')[0]}.weight has {len(scaling[key])} values, "
                    f"expected rope.dimension_count/2 = {rot_dim // 2}"
                )
    return cfg


def _longrope_scaling(f: GGUFFile) -> dict[str, Any] | None:
    """rope_factors_long/short tensors (+ attn_factor metadata) -> HF rope_scaling, or None."""
    names = ("rope_factors_long.weight", "rope_factors_short.weight")
    present = [n for n in names if n in f.tensors]
    if not present:
        return None
    if len(present) == 1:
        missing = next(n for n in names if n not in present)
        raise CheckpointError(f"{f.path}: GGUF has {present[0]!r} but not {missing!r}")
    long_f, short_f = (dequantize(f.tensors[n]).reshape(-1).tolist() for n in names)
    scaling: dict[str, Any] = {
        "type": "longrope",
        "short_factor": [_nice_float(x) for x in short_f],
        "long_factor": [_nice_float(x) for x in long_f],
    }
    attn_factor = _meta(f, "phi3.rope.scaling.attn_factor", None)
    if attn_factor is not None:
        scaling["attention_factor"] = _nice_float(attn_factor)
    return scaling


def _llama_config(f: GGUFFile) -> dict[str, Any]:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **_sizes(f)}
    cfg["head_dim"] = _meta_int(f, "llama.attention.key_length", cfg["hidden_size"] // cfg["num_attention_heads"])
    cfg["attention_bias"] = False
    cfg["mlp_bias"] = False
    scaling_type = _meta(f, "llama.rope.scaling.type", "none")
    if scaling_type == "linear":
        cfg["rope_scaling"] = {"type": "linear", "factor": _nice_float(_meta(f, "llama.rope.scaling.factor"))}
    elif scaling_type != "none":
        raise CheckpointError(f"{f.path}: llama rope scaling type {scaling_type!r} is not supported")
    return cfg


# ---------------------------------------------------------------------------------------------
# HF state dict
# ---------------------------------------------------------------------------------------------
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_COMMON_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_NAMES = {
    "phi3": {**_COMMON_BLOCK_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj",
             # separate q/k/v (some phi3 GGUFs): fused into qkv_proj by gguf_state_dict
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj"},
    "llama": {**_COMMON_BLOCK_NAMES, "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj"},
}
_CONFIG_ONLY = {"phi3": {"rope_factors_long.weight", "rope_factors_short.weight"}, "llama": set()}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def hf_tensor_name(f: GGUFFile, gguf_name: str) -> str | None:
    """HF name of one GGUF tensor, None for tensors that only feed the config; CheckpointError if unknown."""
    if gguf_name in _CONFIG_ONLY[f.architecture]:
        return None
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES[f.architecture]:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[f.architecture][m.group(2)]}.weight"
    raise CheckpointError(f"{f.path}: tensor {gguf_name!r} has no HF equivalent for a {f.architecture} model")


def gguf_entries(f: GGUFFile, dtype: torch.dtype = torch.float32) -> list[Entry]:
    """All weights of the file under HF names (see module docstring), each dequantized to `dtype` only
    when asked (`Entry.get`): what `gguf_state_dict` holds, and what a conversion to an HF checkpoint
    writes a tensor at a time."""
    names = {g: hf_tensor_name(f, g) for g in f.tensors}  # validates every name before any work
    heads = _llama_qk_heads(f)

    def load(t: GGUFTensor, hf_name: str) -> torch.Tensor:
        w = dequantize(t, dtype)
        f.release_pages()  # converted: the file's pages need not stay resident
        n = _permuted_heads(heads, hf_name)
        return unpermute_rows(w, n) if n else w

    entries = [Entry(hf, tuple(f.tensors[g].shape), dtype, partial(load, f.tensors[g], hf))
               for g, hf in names.items() if hf is not None]
    return _fused_phi3_qkv(f, entries) if f.architecture == "phi3" else entries


def gguf_state_dict(f: GGUFFile, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """All weights of the file, dequantized to `dtype`, under HF names (see module docstring)."""
    return {e.name: e.get() for e in _progress(gguf_entries(f, dtype), f)}


PROGRESS_AFTER_S = 2.0  # a load that takes longer shows a progress bar (gguf-py's types: minutes)


def _progress(items, f: GGUFFile):
    """`items` as they are converted, behind a progress bar on stderr that appears once loading has
    taken PROGRESS_AFTER_S (so a quick load prints nothing) and only on a terminal."""
    import sys

    from tqdm import tqdm

    return tqdm(items, desc=f"loading {f.path.name}", unit="tensor", delay=PROGRESS_AFTER_S, disable=None,
                leave=False, file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Quantized weights kept quantized
# ---------------------------------------------------------------------------------------------
# Linear weights load into phi3.quant modules: Q4_0/Q4_1 as int4 and Q8_0/Q5_0 as grouped int8, all
# with no change of value (groups of 32, fp16 scales); Q4_K's sub-blocks become int4 groups (scale and
# min rounded to fp16). Every other quantized type is requantized by its bits per weight
# (`requant_bits`): up to 4.5 (Q2_K, Q3_K, IQ4_XS, IQ4_NL, ...) to int4 g32, above that (Q5_K, Q5_1,
# Q6_K) to grouped int8 (a step ~1/8 of Q6_K's), so that a 5- or 6-bit file keeps its extra bits. The
# token embedding stays quantized the same way (looked up row by row), and when the head is tied to
# it, the head is a quantized linear of the same blocks (the dense table would be read in fp32 every
# token: 113 MB of the 135M default model's ~180 MB). Norms and F32/F16/BF16 tensors are dense.
NATIVE_INT4 = ("Q4_0", "Q4_1")
EXACT_TYPES = (*NATIVE_INT4, "Q8_0", "Q5_0")  # what `native_parts` converts with no change of value
GROUP = 32


def requant_bits(qtype: str) -> int:
    """The bits a requantized type loads in: 4 (int4, groups of 32) up to 4.5 bits a weight, else 8
    (grouped int8, groups of 32: per output channel loses ~40 % more on outlier rows)."""
    block, size = BLOCK_LAYOUT[qtype]
    return 4 if size * 8 <= 4.5 * block else 8


REQUANT_TYPES = tuple(t for t in BLOCK_LAYOUT if t not in (*DENSE_TYPES, *EXACT_TYPES))
REQUANT_INT4 = tuple(t for t in REQUANT_TYPES if requant_bits(t) == 4)
REQUANT_INT8 = tuple(t for t in REQUANT_TYPES if requant_bits(t) == 8)


def _block_fields(t: GGUFTensor) -> tuple[torch.Tensor, int, int]:
    """Raw blocks of a 2-D tensor: ([rows, n_blocks, type_size] uint8, rows, cols)."""
    rows, cols = t.shape
    block, size = BLOCK_LAYOUT[t.qtype]
    return raw_bytes(t.raw).view(rows, cols // block, size), rows, cols


def native_int4(t: GGUFTensor) -> dict[str, torch.Tensor]:
    """Q4_0 / Q4_1 -> phi3.quant int4 parts (w = q·s + m) with no change of value. Q4_0's mins are
    None (−8·scale, implied: 0.23 GB less held while loading phi-3-mini); a saved checkpoint always
    has them (`Int4Linear.stored`)."""
    from .quant import pack_nibbles

    blocks, rows, cols = _block_fields(t)
    d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0]  # [rows, groups]
    if t.qtype == "Q4_0":
        m, qs_offset = None, 2  # w = d·(q − 8)
    else:
        m, qs_offset = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0], 4
    lib = cpu_kernels.library()
    if lib is not None:  # the nibble shuffle in C: ~10x faster than the tensor ops below
        qweight = cpu_kernels.ggml_q4_nibbles(lib, blocks.contiguous(), qs_offset)
    else:
        qs = blocks[..., qs_offset:]
        q = torch.cat((qs & 0x0F, qs >> 4), dim=-1).reshape(rows, cols)  # ggml: low nibbles w0..15, high w16..31
        qweight = pack_nibbles(q)
    return {"qweight": qweight, "scales": d.clone(), "mins": None if m is None else m.clone()}


def native_int8(t: GGUFTensor) -> dict[str, torch.Tensor]:
    """Q8_0 -> phi3.quant grouped int8 parts (w = q·d per group of 32) with no change of value."""
    blocks, rows, cols = _block_fields(t)
    lib = cpu_kernels.library()
    if lib is not None:  # one pass in C: the strided copies below take ~9 s for phi-3-mini
        q, d = cpu_kernels.ggml_q8_0_split(lib, blocks.contiguous())
        return {"qweight": q, "scales": d}
    d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0]  # [rows, groups]
    q = blocks[..., 2:].contiguous().view(torch.int8).reshape(rows, cols)
    return {"qweight": q, "scales": d.clone()}


def q5_0_int8(t: GGUFTensor) -> dict[str, torch.Tensor]:
    """Q5_0 -> grouped int8 parts with no change of value: w = d·(q − 16), q − 16 in −16..15."""
    blocks, rows, cols = _block_fields(t)
    q = _q5(blocks.reshape(-1, blocks.shape[-1]), 2).sub_(16).to(torch.int8).view(rows, cols)
    d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0]  # [rows, groups]
    return {"qweight": q, "scales": d.clone()}


def native_parts(t: GGUFTensor) -> tuple[int, dict[str, torch.Tensor]] | None:
    """(bits, stored parts) of a tensor whose blocks load without a change of value: Q4_0/Q4_1 as
    int4, Q8_0 and Q5_0 as grouped int8; None for any other type."""
    if t.qtype in NATIVE_INT4:
        return 4, native_int4(t)
    if t.qtype == "Q8_0":
        return 8, native_int8(t)
    if t.qtype == "Q5_0":
        return 8, q5_0_int8(t)
    return None


def packed_parts(t: GGUFTensor, heads: int | None = None) -> tuple[int, dict[str, torch.Tensor]] | None:
    """(bits, {"packed": ...}): blocks packed straight into the native kernels' layout in one pass, for
    `Int4Linear.from_packed` / `Int8Linear.from_packed`. Q4_0 / Q4_1 / Q8_0 unchanged; Q4_K's
    sub-blocks of 32 as int4 groups (scale and min rounded to fp16); Q6_K / Q5_K / Q3_K / Q2_K / IQ4_XS /
    IQ4_NL requantized as `_portable_linear_parts` does (`requant_bits`). Llama q/k rows of `heads` heads
    are unpermuted on the blocks first. None where the native kernels do not run here or the rows are
    not a multiple of 8 (those take `_portable_linear_parts`)."""
    lib = cpu_kernels.library()
    if lib is None or len(t.shape) != 2 or t.shape[0] % cpu_kernels.ROWS or t.qtype not in PACKED_TYPES:
        return None
    blocks = _block_fields(t)[0]  # [rows, blocks, bytes], a view of the file
    if heads:
        blocks = unpermute_rows(blocks, heads)
    if t.qtype == "Q8_0":
        return 8, {"packed": cpu_kernels.pack_ggml_q8_0(lib, blocks)}
    if t.qtype == "Q4_K":  # sub-blocks of 32 are groups: scale and min rounded to fp16, weights kept
        return 4, {"packed": cpu_kernels.pack_ggml_q4_k(lib, blocks)}
    if t.qtype in cpu_kernels.REQUANT_TYPES:  # requantized as `_portable_linear_parts` does, in C
        bits = requant_bits(t.qtype)
        return bits, {"packed": cpu_kernels.requant_ggml(lib, blocks, t.qtype, bits)}
    return 4, {"packed": cpu_kernels.pack_ggml_q4(lib, blocks, with_mins=t.qtype == "Q4_1")}


PACKED_TYPES = (*NATIVE_INT4, "Q8_0", "Q4_K", *cpu_kernels.REQUANT_TYPES)  # what `packed_parts` packs from the file


def quantized_linear_parts(t: GGUFTensor, heads: int | None = None) -> tuple[int, dict[str, torch.Tensor]] | None:
    """(bits, stored parts) for a quantized linear weight, None for one that stays dense. `heads`:
    a llama q/k projection's head count, whose rows are unpermuted (`unpermute_rows`)."""
    parts = packed_parts(t, heads)
    if parts is None:
        parts = _portable_linear_parts(t)
        if parts is not None and heads:
            parts = (parts[0], _map_rows(parts[1], lambda v: unpermute_rows(v, heads)))
    return parts


def _portable_linear_parts(t: GGUFTensor) -> tuple[int, dict[str, torch.Tensor]] | None:
    from .quant import quantize_int4_nibbles, quantize_int8_groups

    if len(t.shape) != 2:
        return None
    if t.qtype in EXACT_TYPES:
        return native_parts(t)
    if t.qtype in REQUANT_INT4:
        def int4(w):
            return dict(zip(("qweight", "scales", "mins"), quantize_int4_nibbles(w, GROUP)))
        return 4, _requantized(t, int4)
    if t.qtype in REQUANT_INT8:
        return 8, _requantized(t, lambda w: dict(zip(("qweight", "scales"), quantize_int8_groups(w, GROUP))))
    return None


REQUANT_ROWS = 2048  # rows dequantized at a time when requantizing: bounded fp32 scratch (25 MB at 3072)


def _requantized(t: GGUFTensor, quantize_rows) -> dict[str, torch.Tensor]:
    """Dequantize `t` a block of rows at a time and quantize each block with `quantize_rows` (fp32
    [rows, cols] -> stored parts, row-wise); the parts of all blocks concatenated. The whole tensor is
    never held in fp32 (the 32064-row head of phi-3-mini would be 394 MB)."""
    blocks, rows, cols = _block_fields(t)
    size = blocks.shape[-1]
    pieces = []
    for lo in range(0, rows, REQUANT_ROWS):
        chunk = blocks[lo:lo + REQUANT_ROWS]
        w = _dequantize_blocks(t.qtype, chunk.reshape(-1, size), torch.float32).view(chunk.shape[0], cols)
        pieces.append(quantize_rows(w))
    return {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}


def _map_rows(parts: dict[str, torch.Tensor], fn) -> dict[str, torch.Tensor]:
    """Apply a row operation (every part has the output rows as dim 0) to each stored part."""
    return {k: None if v is None else fn(v) for k, v in parts.items()}


def gguf_quantized_state_dict(f: GGUFFile, dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], dict]:
    """Like `gguf_state_dict`, but quantized linear weights stay quantized.

    Returns (state dict with `{module}.qweight/.scales/.mins` entries for the quantized linears
    and dense tensors for the rest, the `quantization` config section naming them). Llama q/k
    rows are unpermuted and separate q/k/v (gate/up) fused on the quantized parts themselves."""
    from .memory import return_freed_memory

    names = {g: hf_tensor_name(f, g) for g in f.tensors}
    untied = "output.weight" in f.tensors
    heads = _llama_qk_heads(f)
    dense: dict[str, torch.Tensor] = {}
    quant: dict[str, tuple[int, dict[str, torch.Tensor]]] = {}  # module name -> (bits, parts)
    for gguf_name, hf_name in _progress(names.items(), f):
        if hf_name is None:
            continue
        t = f.tensors[gguf_name]
        parts = None
        if not _stays_dense(t):
            parts = (_table_parts(t) if hf_name == "model.embed_tokens.weight"
                     else quantized_linear_parts(t, _permuted_heads(heads, hf_name)))
        if parts is None:
            dense[hf_name] = dequantize(t, dtype)
        else:
            quant[hf_name.removesuffix(".weight")] = parts
        if parts is not None and hf_name == "model.embed_tokens.weight" and not untied:
            # the tied head: the same blocks, its own copy (a module may keep the tensors it is given)
            quant["lm_head"] = (parts[0], {k: None if v is None else v.clone() for k, v in parts[1].items()})
        f.release_pages()  # converted: the file's pages need not stay resident,
        return_freed_memory()  # nor the conversion's scratch
    if f.architecture == "llama":
        _unpermute_llama_qk(f, dense)
    _fuse_quantized(f, dense, quant)
    sd = dict(dense)
    for name, (_, parts) in quant.items():
        sd.update({f"{name}.{k}": v for k, v in parts.items()})
    section = {"quant_method": "phi3-weight-only", "bits": 4, "group_size": GROUP,
               "modules": {name: bits for name, (bits, _) in quant.items()}}
    return sd, section


def _table_parts(t: GGUFTensor) -> tuple[int, dict[str, torch.Tensor]]:
    """(bits, stored parts) of a quantized token table: Q4_0 / Q4_1 / Q8_0 / Q5_0 as they are, Q4_K's
    sub-blocks as int4 groups of 32 where the native kernels run (their packing gives the groups),
    any other type requantized as a linear of that type would be."""
    if t.qtype == "Q4_K":
        packed = packed_parts(t)
        if packed is not None:  # the sub-blocks as int4 groups, in the portable form a table reads
            return 4, _portable(*packed)
    return _portable_linear_parts(t)


def _stays_dense(t: GGUFTensor) -> bool:
    """Whether `gguf_quantized_state_dict` loads this tensor dense (else quantized): a matrix of any
    quantized type is a quantized linear, or a quantized table for the token embedding."""
    return len(t.shape) != 2 or t.qtype in DENSE_TYPES


def dense_parameters(f: GGUFFile) -> int:
    """How many of the model's parameters `gguf_quantized_state_dict` loads dense."""
    total = 0
    for gguf_name, t in f.tensors.items():
        hf_name = hf_tensor_name(f, gguf_name)
        if hf_name is not None and _stays_dense(t):
            total += int(np.prod(t.shape, dtype=np.int64))
    return total


_FUSIONS = (("self_attn.", ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
            ("mlp.", ("gate_proj", "up_proj"), "gate_up_proj"))


def _concat_parts(parts: list[dict]) -> dict:
    """Stored parts of the same kind concatenated row-wise. Q4_0 mins are implied (None): beside
    Q4_1 parts they are written out (−8·scale) so the mins concatenate; all Q4_0 stays None."""
    from .quant import q4_0_mins

    out = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        if all(v is None for v in values):
            out[key] = None
            continue
        if key == "mins":
            values = [q4_0_mins(p["scales"]) if v is None else v for p, v in zip(parts, values)]
        out[key] = torch.cat(values, dim=0)
    return out


def _kind(bits: int, parts: dict) -> tuple:
    """What parts must share to be concatenated: the bits, the part names, the packed layout's
    bytes per group (Q4_0's scale-only layout differs from Q4_1's)."""
    packed = parts.get("packed")
    return bits, tuple(sorted(parts)), None if packed is None else packed.shape[1:]


def _portable(bits: int, parts: dict) -> dict:
    """Packed parts (`packed_parts`) back in the portable stored form; others as they are."""
    from .quant import Int4Linear, Int8Linear

    if "packed" not in parts:
        return parts
    return (Int4Linear if bits == 4 else Int8Linear).from_stored(parts, GROUP).stored()


def _fuse_quantized(f: GGUFFile, dense: dict[str, torch.Tensor], quant: dict) -> None:
    """Separate projections -> the fused module. Quantized parts alike (same bits and kind) are
    concatenated row-wise as they are; the same bits in different layouts through the portable form;
    int4 beside int8 requantized together to grouped int8 (no dense copy of the fused matrix);
    a mix of quantized and dense is dequantized and fused densely."""
    from .quant import quantize_int8_groups

    layers = {int(n.split(".")[2]) for n in [*dense, *quant] if n.startswith("model.layers.")}
    for i in sorted(layers):
        for sub, pieces, fused in _FUSIONS:
            names = [f"model.layers.{i}.{sub}{p}" for p in pieces]
            if not all(n in quant or f"{n}.weight" in dense for n in names):
                continue  # already fused in the file, or incomplete (build_model names what is missing)
            target = f"model.layers.{i}.{sub}{fused}"
            kinds = {_kind(*quant[n]) if n in quant else None for n in names}
            if len(kinds) == 1 and None not in kinds:
                bits = quant[names[0]][0]
                parts = [quant.pop(n)[1] for n in names]
                quant[target] = (bits, _concat_parts(parts))
                continue
            if None not in kinds and len({quant[n][0] for n in names}) == 1:  # same bits, other layouts
                bits = quant[names[0]][0]
                parts = [_portable(bits, quant.pop(n)[1]) for n in names]
                quant[target] = (bits, _concat_parts(parts))
                continue
            if None not in kinds:  # int4 beside int8 (Q4_K q/k, Q6_K v): all requantized to int8
                w = torch.cat([_dequantized(*quant.pop(n)) for n in names])
                quant[target] = (8, dict(zip(("qweight", "scales"), quantize_int8_groups(w, GROUP))))
                continue
            dtype = next(dense[f"{n}.weight"].dtype for n in names if n not in quant)
            ws = [_dequantized(*quant.pop(n)).to(dtype) if n in quant else dense.pop(f"{n}.weight") for n in names]
            dense[f"{target}.weight"] = torch.cat(ws, dim=0)


def _dequantized(bits: int, parts: dict) -> torch.Tensor:
    """Quantized parts (stored or packed) -> the float32 weight they hold."""
    from .quant import Int4Linear, Int8Linear

    return (Int4Linear if bits == 4 else Int8Linear).from_stored(parts, GROUP).dequantize().float()


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (HF rotate-half -> GGML interleaved rope).

    llama.cpp stores, for every head, the rotary pairs (i, i + d/2) next to each other: row
    2i+j of a head in the file is row j*d/2 + i of the HF head. So we view the rows of a head as
    (d/2, 2), swap to (2, d/2) and flatten back.
    """
    rows, rest = w.shape[0], w.shape[1:]
    head_dim = rows // n_head
    pairs = w.reshape(n_head, head_dim // 2, 2, *rest)  # (head, i, j, ...)
    return pairs.transpose(1, 2).reshape(rows, *rest)  # (head, j, i, ...) -> rows


def _llama_qk_heads(f: GGUFFile) -> dict[str, int]:
    """{"q_proj": heads, "k_proj": KV heads} whose rows llama.cpp permuted (llama files), else {}."""
    if f.architecture != "llama":
        return {}
    n_head = _meta_int(f, "llama.attention.head_count")
    return {"q_proj": n_head, "k_proj": _meta_int(f, "llama.attention.head_count_kv", n_head)}


def _permuted_heads(heads: dict[str, int], hf_name: str) -> int | None:
    """The head count whose rows to unpermute for tensor `hf_name` (`heads` from `_llama_qk_heads`)."""
    return heads.get(hf_name.rsplit(".", 2)[-2]) if ".self_attn." in hf_name else None


def _unpermute_llama_qk(f: GGUFFile, sd: dict[str, torch.Tensor]) -> None:
    heads = _llama_qk_heads(f)
    for name, t in sd.items():
        n = _permuted_heads(heads, name) if name.endswith(".weight") else None
        if n:
            sd[name] = unpermute_rows(t, n)


def _fused_phi3_qkv(f: GGUFFile, entries: list[Entry]) -> list[Entry]:
    """Separate q/k/v (when a phi3 GGUF has them) -> qkv_proj with [Q | K | V] rows."""
    by_name = {e.name: e for e in entries}
    stems = sorted({n[: -len("q_proj.weight")] for n in by_name if re.search(r"self_attn\.[qkv]_proj\.weight$", n)})
    for stem in stems:
        parts = [f"{stem}{p}_proj.weight" for p in "qkv"]
        missing = [p for p in parts if p not in by_name]
        if missing:
            raise CheckpointError(f"{f.path}: cannot build {stem}qkv_proj.weight, missing {', '.join(missing)}")
        if f"{stem}qkv_proj.weight" in by_name:
            raise CheckpointError(f"{f.path}: {stem}qkv_proj.weight is given both fused and as separate q/k/v")
        q, k, v = (by_name.pop(p) for p in parts)
        rows = q.shape[0] + k.shape[0] + v.shape[0]
        name = f"{stem}qkv_proj.weight"
        by_name[name] = Entry(name, (rows, *q.shape[1:]), q.dtype, lambda q=q, k=k, v=v: torch.cat([q.get(), k.get(), v.get()]))
    return list(by_name.values())
