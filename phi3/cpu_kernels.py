"""Native CPU kernels for the quantized matmuls (phi3/csrc/qgemm_avx2.c).

The C source is compiled on first use with the system C compiler (`$CC`, else `cc`/`gcc`) into
`$PHI3_CACHE/kernels` (default ~/.cache/phi3/kernels), keyed by a hash of the source and flags, and
loaded with ctypes (the GIL is released while a kernel runs). OpenMP comes from the libgomp that torch
has already loaded, so the kernels share torch's threads and `torch.set_num_threads` applies.

On CPUs with AVX-512 VNNI (and VL) a second build (`-DPHI3_VNNI`) does the integer dot products
with vpdpbusd: the same integer sums in fewer instructions, identical results. `PHI3_KERNEL_ISA=avx2`
keeps the AVX2 build there.

When the CPU lacks AVX2/FMA/F16C, no compiler is found, or `PHI3_NATIVE_KERNELS=0`, `library()`
returns None and the quantized layers use PyTorch's packed kernels instead (the same results up to
the activation rounding: the native kernels quantize activations to int8 per block, like llama.cpp).

Weight layouts (8 output rows interleaved; see the C file): `pack_int4`, `pack_int8` build them from
the portable form, `unpack_int4`, `unpack_int8` give it back.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import Phi3Error

SOURCE = Path(__file__).parent / "csrc" / "qgemm_avx2.c"
FLAGS = ["-O3", "-std=gnu11", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
ISA_FLAGS = {"avx2": [], "vnni": ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512vnni", "-DPHI3_VNNI"]}
ROWS = 8  # output rows interleaved per block
INT8_BLOCK = 32  # activation block of the per-channel int8 kernel

_LIB: list = []


def _cpu_flags() -> set[str]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def kernel_isa() -> str | None:
    """Which build of the kernels this CPU runs: "vnni", "avx2", or None (no AVX2/FMA/F16C).
    `PHI3_KERNEL_ISA=avx2` chooses the AVX2 build on a VNNI CPU."""
    flags = _cpu_flags()
    if not {"avx2", "fma", "f16c"} <= flags:
        return None
    forced = os.environ.get("PHI3_KERNEL_ISA")
    if forced not in (None, "", "auto", *ISA_FLAGS):
        raise Phi3Error(f"PHI3_KERNEL_ISA={forced!r}: expected auto, avx2 or vnni")
    vnni = {"avx512_vnni", "avx512vl", "avx512bw"} <= flags
    if forced == "vnni" and not vnni:
        raise Phi3Error("PHI3_KERNEL_ISA=vnni: this CPU has no AVX-512 VNNI")
    return "avx2" if forced == "avx2" or not vnni else "vnni"


def _cache_dir() -> Path:
    root = os.environ.get("PHI3_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "phi3")
    return Path(root) / "kernels"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc"):
        if cc and shutil.which(cc):
            return cc
    return None


def _build(isa: str) -> Path | None:
    cc = _compiler()
    if cc is None:
        return None
    flags = [*FLAGS, *ISA_FLAGS[isa]]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *flags]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"qgemm_{isa}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if res.returncode != 0:
            if isa != "avx2":  # the caller falls back to the AVX2 build
                return None
            warnings.warn(f"phi3: could not compile {SOURCE.name} with {cc} ({res.stderr.strip()[:300]}); "
                          "using PyTorch's quantized kernels")
            return None
        os.replace(tmp, out)  # atomic: a concurrent build writes the same bytes
        return out
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL | None:
    isa = kernel_isa()
    if os.environ.get("PHI3_NATIVE_KERNELS", "1") in ("0", "false", "no") or isa is None:
        return None
    lib = load_build(isa)
    if lib is None and isa != "avx2":  # an old compiler without AVX-512 VNNI: the AVX2 build
        lib = load_build("avx2")
    return lib


def load_build(isa: str) -> ctypes.CDLL | None:
    """The kernels compiled for `isa` ("avx2" or "vnni") with their signatures declared, None when
    they cannot be built or run here. `library()` is the one to use; this is for comparing builds."""
    path = _build(isa)
    if path is None:
        return None
    lib = ctypes.CDLL(str(path))
    if not lib.phi3_cpu_ok():
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.phi3_int4_matmul.argtypes = [p, i, i, p, i, i, p, i, i, i]
    lib.phi3_int4_matmul.restype = None
    lib.phi3_int8_matmul.argtypes = [p, i, i, p, i, i, p, p, i, i]
    lib.phi3_int8_matmul.restype = None
    lib.phi3_bf16_matmul.argtypes = [p, i, i, p, i, p, i]
    lib.phi3_bf16_matmul.restype = None
    lib.phi3_pack_int4.argtypes = [p, p, p, i, i, i, p, i]
    lib.phi3_pack_int4.restype = None
    f = ctypes.c_float
    lib.phi3_attend_f16.argtypes = [p, p, p, p, p, i, i, i, i, i, i, f, i]
    lib.phi3_attend_f16.restype = None
    lib.phi3_attend_bf16.argtypes = [p, p, p, p, p, i, i, i, i, i, i, f, i]
    lib.phi3_attend_bf16.restype = None
    lib.phi3_decode_attend_f16.argtypes = [p, p, p, p, p, p, p, i, i, i, i, p, i, i, i, i, f, i]
    lib.phi3_decode_attend_f16.restype = None
    lib.phi3_decode_layers.argtypes = [p, i, i, p, i, f, i, i, i, i, p, p, i, i, p, i, i, p, f, i]
    lib.phi3_decode_layers.restype = None
    lib.phi3_rms_norm.argtypes = [p, p, f, i, i, p]
    lib.phi3_rms_norm.restype = None
    lib.phi3_swiglu.argtypes = [p, i, i, p]
    lib.phi3_swiglu.restype = None
    lib.phi3_ggml_q4_nibbles.argtypes = [p, ctypes.c_long, i, i, p, i]
    lib.phi3_ggml_q4_nibbles.restype = None
    lib.phi3_pack_int8.argtypes = [p, p, i, i, i, p, i]
    lib.phi3_pack_int8.restype = None
    lib.phi3_ggml_q8_0_split.argtypes = [p, ctypes.c_long, p, p, i]
    lib.phi3_ggml_q8_0_split.restype = None
    lib.phi3_pack_ggml_q4.argtypes = [p, i, i, i, p, i]
    lib.phi3_pack_ggml_q4.restype = None
    lib.phi3_pack_ggml_q4_k.argtypes = [p, i, i, p, i]
    lib.phi3_pack_ggml_q4_k.restype = None
    lib.phi3_requant_ggml.argtypes = [p, i, i, i, i, p, i]
    lib.phi3_requant_ggml.restype = None
    lib.phi3_dequant_ggml.argtypes = [p, i, ctypes.c_long, p, i]
    lib.phi3_dequant_ggml.restype = None
    lib.phi3_pack_ggml_q8_0.argtypes = [p, i, i, p, i]
    lib.phi3_pack_ggml_q8_0.restype = None
    lib.phi3_unpack_int4.argtypes = [p, i, i, i, i, p, p, p, i]
    lib.phi3_unpack_int4.restype = None
    lib.phi3_unpack_int8.argtypes = [p, i, i, i, i, p, p, i]
    lib.phi3_unpack_int8.restype = None
    lib.phi3_quantize_int4.argtypes = [p, i, i, i, i, i, p, p, p, i]
    lib.phi3_quantize_int4.restype = None
    lib.phi3_quantize_ggml.argtypes = [p, i, i, i, i, p, i]
    lib.phi3_quantize_ggml.restype = None
    lib.phi3_quantize_int8_rows.argtypes = [p, i, i, i, p, p, i]
    lib.phi3_quantize_int8_rows.restype = None
    lib.phi3_int4_rows.argtypes = [p, p, i, i, i, i, p]
    lib.phi3_int4_rows.restype = None
    lib.phi3_int8_rows.argtypes = [p, p, i, i, i, p, p]
    lib.phi3_int8_rows.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot run (see the module doc)."""
    if not _LIB:
        try:
            _LIB.append(_load())
        except OSError as e:  # a broken cache entry or loader problem: fall back, say why
            print(f"phi3: native kernels unavailable ({e}); using PyTorch's", file=sys.stderr)
            _LIB.append(None)
    return _LIB[0]


def activation_levels(in_features: int) -> int:
    """How the int4 and int8 kernels round activations. 1: int8 blocks exactly as llama.cpp's Q8_0. 2: the
    rounding error quantized again (x ≈ d·(q + q2/200)), close to exact activations, at twice the
    integer work (prefill half as fast, decode ~20 % slower). Default: 2 for layers narrower than
    2048 inputs — small models, where the noise shows (the embedded 135M model's greedy answers
    change) and the work does not — and 1 for wider ones (phi-3-mini and up). `PHI3_ACTIVATION_LEVELS`
    (1 or 2) overrides."""
    forced = os.environ.get("PHI3_ACTIVATION_LEVELS")
    if forced in ("1", "2"):
        return int(forced)
    return 2 if in_features < 2048 else 1


def _padded(n: int) -> int:
    return -(-n // ROWS) * ROWS


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else torch.cat((t, t.new_zeros(rows - t.shape[0], *t.shape[1:])))


def pad_rows(t: torch.Tensor) -> torch.Tensor:
    """t [n, ...] with zero rows appended up to a multiple of 8, contiguous."""
    return _pad_rows(t, _padded(t.shape[0])).contiguous()


def _fp16_by_block(v: torch.Tensor, rows: int) -> torch.Tensor:
    """fp16 [n, groups] per row -> bytes [rows/8, groups, 16]: the 8 values of a row block together."""
    groups = v.shape[1]
    v = _pad_rows(v.to(torch.float16), rows).view(rows // ROWS, ROWS, groups).transpose(1, 2)
    return v.contiguous().view(torch.uint8)


def _fp16_by_row(b: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of `_fp16_by_block`: bytes [rb, groups, 16] -> fp16 [n, groups]."""
    rb, groups = b.shape[0], b.shape[1]
    return b.contiguous().view(torch.float16).transpose(1, 2).reshape(rb * ROWS, groups)[:n]


# ---- int4 -------------------------------------------------------------------------------------

def is_q4_0(scales: torch.Tensor, mins: torch.Tensor) -> bool:
    """Whether every min is −8·scale (GGUF's Q4_0): the weights then take the scale-only layout."""
    return torch.equal(mins.to(torch.float16), scales.to(torch.float16) * -8)  # exact in fp16, as in fp32


def _int4_head(symmetric: bool) -> int:
    return 16 if symmetric else 32  # bytes of fp16 scales (and mins) per block of 8 rows and group


def pack_int4(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """q [n, k] in 0..15 (any int dtype), scales/mins fp16 [n, k/group] -> uint8 [n8/8, groups, 32 + 4·group]
    with n8 = n rounded up to 8 (padding rows are zero). mins None: the scale-only layout
    [n8/8, groups, 16 + 4·group] for min = −8·scale (Q4_0)."""
    n, k = q.shape
    rows, groups = _padded(n), k // group_size
    q = _pad_rows(q.to(torch.uint8), rows)
    qv = q.view(rows // ROWS, ROWS, groups, group_size // 8, 2, 4)  # [rb, i, g, c, h, b]: k = g·G + 8c + 4h + b
    qv = qv.permute(0, 2, 3, 1, 5, 4)  # [rb, g, c, i, b, h]
    nibbles = (qv[..., 0] | (qv[..., 1] << 4)).reshape(rows // ROWS, groups, 4 * group_size)
    head = [_fp16_by_block(scales, rows)] + ([] if mins is None else [_fp16_by_block(mins, rows)])
    return torch.cat((*head, nibbles), dim=-1)


def pack_int4_nibbles(lib, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                      group_size: int) -> torch.Tensor:
    """`pack_int4` done by the C library straight from the file layout: qweight uint8 [n, k/2]
    (low nibble = even column), scales/mins fp16 [n, k/group] (mins None: scale-only layout)."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    qweight = qweight.contiguous()
    scales = scales.to(torch.float16).contiguous()
    mins = None if mins is None else mins.to(torch.float16).contiguous()
    out = torch.empty(_padded(n) // ROWS, k // group_size, _int4_head(mins is None) + 4 * group_size,
                      dtype=torch.uint8)
    lib.phi3_pack_int4(qweight.data_ptr(), scales.data_ptr(), None if mins is None else mins.data_ptr(), n, k,
                       group_size, out.data_ptr(), torch.get_num_threads())
    return out


def int4_is_symmetric(packed: torch.Tensor, group_size: int) -> bool:
    """Whether `packed` has the scale-only layout (told apart by its size)."""
    return packed.shape[-1] == _int4_head(True) + 4 * group_size


def ggml_q4_nibbles(lib, blocks: torch.Tensor, qs_offset: int) -> torch.Tensor:
    """GGUF Q4_0 / Q4_1 blocks uint8 [rows, blocks, bytes] (contiguous) -> qweight uint8 [rows, 16·blocks]
    in the portable layout (low nibble = even column)."""
    rows, nb, size = blocks.shape
    out = torch.empty(rows, 16 * nb, dtype=torch.uint8)
    lib.phi3_ggml_q4_nibbles(blocks.data_ptr(), rows * nb, size, qs_offset, out.data_ptr(), torch.get_num_threads())
    return out


def unpack_int4(packed: torch.Tensor, n: int, k: int, group_size: int):
    """The inverse of `pack_int4`: q uint8 [n, k] in 0..15, scales, mins fp16 [n, k/group] (the
    scale-only layout gives mins = −8·scale)."""
    rb, groups = packed.shape[0], k // group_size
    head = _int4_head(int4_is_symmetric(packed, group_size))
    scales = _fp16_by_row(packed[..., :16], n)
    mins = (-8 * scales.float()).half() if head == 16 else _fp16_by_row(packed[..., 16:32], n)
    nib = packed[..., head:].reshape(rb, groups, group_size // 8, ROWS, 4)  # [rb, g, c, i, b]
    q = torch.stack((nib & 0x0F, nib >> 4), dim=-1)  # [rb, g, c, i, b, h]
    q = q.permute(0, 3, 1, 2, 5, 4).reshape(rb * ROWS, k)[:n]  # [rb, i, g, c, h, b]
    return q, scales, mins


def unpack_int4_nibbles(lib, packed: torch.Tensor, n: int, k: int, group_size: int):
    """`unpack_int4` in C, with the levels two to a byte: the `pack_int4_nibbles` arguments back,
    qweight uint8 [n, k/2] (low nibble = even column), scales, mins fp16 [n, k/group]."""
    packed = packed.contiguous()
    qweight = torch.empty(n, k // 2, dtype=torch.uint8)
    scales = torch.empty(n, k // group_size, dtype=torch.float16)
    mins = torch.empty_like(scales)
    lib.phi3_unpack_int4(packed.data_ptr(), n, k, group_size, int(int4_is_symmetric(packed, group_size)),
                         qweight.data_ptr(), scales.data_ptr(), mins.data_ptr(), torch.get_num_threads())
    return qweight, scales, mins


def int4_rows(lib, packed: torch.Tensor, ids: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """Rows `ids` of an int4 weight in the `pack_int4` layout, dequantized: fp32 [len(ids), k]."""
    ids = ids.to(torch.int64).contiguous()
    out = torch.empty(len(ids), k)
    lib.phi3_int4_rows(packed.data_ptr(), ids.data_ptr(), len(ids), k, group_size,
                       int(int4_is_symmetric(packed, group_size)), out.data_ptr())
    return out


def int8_rows(lib, packed: torch.Tensor, ids: torch.Tensor, k: int, block: int,
              row_scales: torch.Tensor | None) -> torch.Tensor:
    """Rows `ids` of an int8 weight in the `pack_int8` layout, dequantized: fp32 [len(ids), k];
    `row_scales` fp32 for per-channel weights, None when grouped (scales inline)."""
    ids = ids.to(torch.int64).contiguous()
    out = torch.empty(len(ids), k)
    lib.phi3_int8_rows(packed.data_ptr(), ids.data_ptr(), len(ids), k, block,
                       None if row_scales is None else row_scales.data_ptr(), out.data_ptr())
    return out


def int4_matmul(lib, x: torch.Tensor, packed: torch.Tensor, n: int, group_size: int) -> torch.Tensor:
    """x [m, k] -> fp32 [m, n]."""
    x = x.float().contiguous()
    m, k = x.shape
    rows = packed.shape[0] * ROWS
    y = torch.empty(m, rows)
    lib.phi3_int4_matmul(x.data_ptr(), m, k, packed.data_ptr(), rows, group_size, y.data_ptr(),
                         torch.get_num_threads(), activation_levels(k), int4_is_symmetric(packed, group_size))
    return y if rows == n else y[:, :n]


# ---- int8 -------------------------------------------------------------------------------------

def int8_block(k: int, group_size: int | None) -> int | None:
    """The block of inputs the int8 kernel works on, None when the shape does not fit it."""
    block = group_size or INT8_BLOCK
    return block if k % block == 0 and block % 4 == 0 else None


def pack_int8(q: torch.Tensor, scales: torch.Tensor | None, block: int) -> torch.Tensor:
    """q int8 [n, k] -> uint8 [n8/8, k/block, (16 if grouped) + 8·block]; `scales` fp16 [n, k/block]
    for grouped weights (kept inline), None for per-channel (kept apart, fp32)."""
    n, k = q.shape
    rows, groups = _padded(n), k // block
    q = _pad_rows(q.to(torch.int8), rows).view(torch.uint8)
    qv = q.view(rows // ROWS, ROWS, groups, block // 4, 4).permute(0, 2, 3, 1, 4)  # [rb, g, c, i, b]
    qv = qv.reshape(rows // ROWS, groups, 8 * block)
    if scales is None:
        return qv.contiguous()
    return torch.cat((_fp16_by_block(scales, rows), qv), dim=-1)


def unpack_int8_native(lib, packed: torch.Tensor, n: int, k: int, block: int, grouped: bool):
    """`unpack_int8` in C: q int8 [n, k] and (grouped) scales fp16 [n, k/block] or None."""
    packed = packed.contiguous()
    q = torch.empty(n, k, dtype=torch.int8)
    scales = torch.empty(n, k // block, dtype=torch.float16) if grouped else None
    lib.phi3_unpack_int8(packed.data_ptr(), n, k, block, int(grouped), q.data_ptr(),
                         None if scales is None else scales.data_ptr(), torch.get_num_threads())
    return q, scales


def pack_int8_native(lib, q: torch.Tensor, scales: torch.Tensor | None, block: int) -> torch.Tensor:
    """`pack_int8` done by the C library (one pass; the tensor ops above take ~5 s for phi-3-mini)."""
    n, k = q.shape
    q = q.to(torch.int8).contiguous()
    scales = None if scales is None else scales.to(torch.float16).contiguous()
    out = torch.empty(_padded(n) // ROWS, k // block, (0 if scales is None else 16) + 8 * block, dtype=torch.uint8)
    lib.phi3_pack_int8(q.data_ptr(), None if scales is None else scales.data_ptr(), n, k, block, out.data_ptr(),
                       torch.get_num_threads())
    return out


def ggml_q8_0_split(lib, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF Q8_0 blocks uint8 [rows, blocks, 34] (contiguous) -> (q int8 [rows, 32·blocks], d fp16 [rows, blocks])."""
    rows, nb, _ = blocks.shape
    q = torch.empty(rows, 32 * nb, dtype=torch.int8)
    d = torch.empty(rows, nb, dtype=torch.float16)
    lib.phi3_ggml_q8_0_split(blocks.data_ptr(), rows * nb, q.data_ptr(), d.data_ptr(), torch.get_num_threads())
    return q, d


GGML_GROUP = 32  # weights per GGUF Q4_0 / Q4_1 / Q8_0 block


def pack_ggml_q4(lib, blocks: torch.Tensor, with_mins: bool) -> torch.Tensor:
    """GGUF Q4_0 (`with_mins` False) / Q4_1 blocks uint8 [n, k/32, 18 or 20] (n a multiple of 8) ->
    the int4 layout of `pack_int4` with groups of 32 (Q4_0: scale-only), in one pass."""
    blocks = blocks.contiguous()
    n, nb, _ = blocks.shape
    out = torch.empty(n // ROWS, nb, _int4_head(not with_mins) + 4 * GGML_GROUP, dtype=torch.uint8)
    lib.phi3_pack_ggml_q4(blocks.data_ptr(), n, nb, int(with_mins), out.data_ptr(), torch.get_num_threads())
    return out


def pack_ggml_q4_k(lib, blocks: torch.Tensor) -> torch.Tensor:
    """GGUF Q4_K super-blocks uint8 [n, k/256, 144] (n a multiple of 8) -> the int4 layout (with mins)
    of `pack_int4` with groups of 32: each sub-block's scale d·sc and min −dmin·m rounded to fp16,
    the 4-bit weights as they are."""
    blocks = blocks.contiguous()
    n, nsb, _ = blocks.shape
    out = torch.empty(n // ROWS, nsb * 8, _int4_head(False) + 4 * GGML_GROUP, dtype=torch.uint8)
    lib.phi3_pack_ggml_q4_k(blocks.data_ptr(), n, nsb, out.data_ptr(), torch.get_num_threads())
    return out


REQUANT_TYPES = ("Q6_K", "Q5_K", "Q3_K", "Q2_K", "IQ4_XS", "IQ4_NL")  # `phi3_requant_ggml`'s, in its order


def requant_ggml(lib, blocks: torch.Tensor, qtype: str, bits: int) -> torch.Tensor:
    """GGUF blocks of `qtype` (one of REQUANT_TYPES) uint8 [n, blocks, bytes] (n a multiple of 8) ->
    grouped int8 (bits 8: the layout of `pack_ggml_q8_0`, the bytes `quantize_int8_groups` of the
    dequantized rows gives) or int4 with mins, groups of 32 (bits 4: `quantize_int4(refine=2)`'s fit,
    equal to it but for float summation order), dequantized and requantized in one pass."""
    blocks = blocks.contiguous()
    n, nb, _ = blocks.shape
    groups = nb * (32 if qtype == "IQ4_NL" else 256) // GGML_GROUP
    head = 16 if bits == 8 else _int4_head(False)
    out = torch.empty(n // ROWS, groups, head + (8 if bits == 8 else 4) * GGML_GROUP, dtype=torch.uint8)
    lib.phi3_requant_ggml(blocks.data_ptr(), REQUANT_TYPES.index(qtype), n, nb, bits, out.data_ptr(),
                          torch.get_num_threads())
    return out


# `phi3_dequant_ggml`'s types, in its order (REQUANT_TYPES first): weights per block
DEQUANT_TYPES = {"Q6_K": 256, "Q5_K": 256, "Q3_K": 256, "Q2_K": 256, "IQ4_XS": 256, "IQ4_NL": 32,
                 "Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q4_K": 256}


def dequant_ggml(lib, blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """GGUF blocks of `qtype` (one of DEQUANT_TYPES) uint8 [n_blocks, bytes] -> float32 [n_blocks,
    block size]: the floats of phi3.gguf's tensor-op kernels, several times faster."""
    blocks = blocks.contiguous()
    out = torch.empty(blocks.shape[0], DEQUANT_TYPES[qtype])
    lib.phi3_dequant_ggml(blocks.data_ptr(), list(DEQUANT_TYPES).index(qtype), blocks.shape[0], out.data_ptr(),
                          torch.get_num_threads())
    return out


def pack_ggml_q8_0(lib, blocks: torch.Tensor) -> torch.Tensor:
    """GGUF Q8_0 blocks uint8 [n, k/32, 34] (n a multiple of 8) -> the grouped layout of `pack_int8`
    (block 32), in one pass."""
    blocks = blocks.contiguous()
    n, nb, _ = blocks.shape
    out = torch.empty(n // ROWS, nb, 16 + 8 * GGML_GROUP, dtype=torch.uint8)
    lib.phi3_pack_ggml_q8_0(blocks.data_ptr(), n, nb, out.data_ptr(), torch.get_num_threads())
    return out


DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # what the C quantizers read
DTYPE_GGML = 16  # + the index in DEQUANT_TYPES: rows of GGUF blocks, as the C file's DTYPE_GGML


@dataclass(frozen=True)
class GGMLRows:
    """A weight [n, k] held as GGUF blocks (`blocks` uint8 [n, k / block · bytes], `qtype` one of
    DEQUANT_TYPES): the C quantizers take it as they take a dense weight, dequantizing a row at a
    time, so a requantized GGUF tensor is never held in float."""
    blocks: torch.Tensor
    qtype: str
    shape: tuple[int, int]


def _dense_rows(weight: torch.Tensor | GGMLRows) -> tuple[torch.Tensor, int, int, int]:
    """(contiguous data, its DTYPE_CODES / DTYPE_GGML code, n, k) for the C quantizers."""
    if isinstance(weight, GGMLRows):
        return weight.blocks.contiguous(), DTYPE_GGML + list(DEQUANT_TYPES).index(weight.qtype), *weight.shape
    w = weight.detach()
    if w.dtype not in DTYPE_CODES:
        w = w.float()
    return w.contiguous(), DTYPE_CODES[w.dtype], *w.shape


def quantize_int4(lib, weight: torch.Tensor, group_size: int, refine: int = 0):
    """`phi3.quant.quantize_int4` in C, one pass over the rows, without fp32 copies of the weight:
    weight [n, k] (fp32, bf16 or fp16; k a multiple of `group_size`, itself of 8) -> qweight uint8
    [n, k/2] (low nibble = even column), scales, mins fp16 [n, k/group]."""
    w, code, n, k = _dense_rows(weight)
    qweight = torch.empty(n, k // 2, dtype=torch.uint8)
    scales = torch.empty(n, k // group_size, dtype=torch.float16)
    mins = torch.empty_like(scales)
    lib.phi3_quantize_int4(w.data_ptr(), code, n, k, group_size, refine, qweight.data_ptr(), scales.data_ptr(),
                           mins.data_ptr(), torch.get_num_threads())
    return qweight, scales, mins


GGML_QUANTIZERS = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}  # `phi3_quantize_ggml`'s types, in its order: block bytes


def quantize_ggml(lib, weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """ggml's reference Q8_0 / Q4_0 / Q4_1 quantizer in C (the same bytes as gguf-py's and llama.cpp's):
    weight [n, k] (k a multiple of 32) -> uint8 [n, k/32 · block bytes] blocks."""
    w, code, n, k = _dense_rows(weight)
    out = torch.empty(n, k // 32 * GGML_QUANTIZERS[qtype], dtype=torch.uint8)
    lib.phi3_quantize_ggml(w.data_ptr(), code, n, k, list(GGML_QUANTIZERS).index(qtype), out.data_ptr(),
                           torch.get_num_threads())
    return out


def quantize_int8_rows(lib, weight: torch.Tensor):
    """`phi3.quant.quantize_int8_rows` in C (the same bytes): weight [n, k] -> q int8 [n, k], scales fp32 [n]."""
    w, code, n, k = _dense_rows(weight)
    q = torch.empty(n, k, dtype=torch.int8)
    scales = torch.empty(n)
    lib.phi3_quantize_int8_rows(w.data_ptr(), code, n, k, q.data_ptr(), scales.data_ptr(), torch.get_num_threads())
    return q, scales


def unpack_int8(packed: torch.Tensor, n: int, k: int, block: int, grouped: bool):
    """The inverse of `pack_int8`: q int8 [n, k] and (grouped) scales fp16 [n, k/block] or None."""
    rb, groups = packed.shape[0], k // block
    scales = None
    if grouped:
        scales = _fp16_by_row(packed[..., :16], n)
        packed = packed[..., 16:]
    qv = packed.reshape(rb, groups, block // 4, ROWS, 4).permute(0, 3, 1, 2, 4)  # [rb, i, g, c, b]
    q = qv.reshape(rb * ROWS, k)[:n].contiguous().view(torch.int8)
    return q, scales


def int8_matmul(lib, x: torch.Tensor, packed: torch.Tensor, n: int, block: int,
                row_scales: torch.Tensor | None) -> torch.Tensor:
    """x [m, k] -> fp32 [m, n]; `row_scales` fp32 [n8] for per-channel weights, None when grouped."""
    x = x.float().contiguous()
    m, k = x.shape
    rows = packed.shape[0] * ROWS
    y = torch.empty(m, rows)
    lib.phi3_int8_matmul(x.data_ptr(), m, k, packed.data_ptr(), rows, block,
                         None if row_scales is None else row_scales.data_ptr(), y.data_ptr(),
                         torch.get_num_threads(), activation_levels(k))
    return y if rows == n else y[:, :n]


# ---- dense bf16 weights, few tokens ----------------------------------------------------------

BF16_MAX_ROWS = 3  # above this PyTorch's bf16 matmul is as fast (it re-reads no weights)


def bf16_matmul(lib, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [m, k] (any float dtype) · weight bf16 [n, k] (contiguous) -> fp32 [m, n]."""
    x = x.float().contiguous()
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n)
    lib.phi3_bf16_matmul(x.data_ptr(), m, k, weight.data_ptr(), n, y.data_ptr(), torch.get_num_threads())
    return y


# ---- decode attention over an fp16 KV cache --------------------------------------------------

def attend_cache(lib, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                 scale: float | None = None) -> torch.Tensor:
    """q [B, H, 1, D] (any float dtype); k, v fp16 or bf16 [B, KV, S, D] views of the first S slots of a cache
    [B, KV, L, D] (contiguous, so rows are L·D apart); mask bool broadcastable to [B, 1, 1, S]
    (True = attend) or None. Returns fp32 [B, H, 1, D]; softmax(q·kᵀ·scale)·v in fp32, scale 1/√D unless given."""
    b, h, _, d = q.shape
    kv, s = k.shape[1], k.shape[2]
    length = k.stride(1) // d  # L: the cache's slots per head
    qf = q.float().contiguous()
    valid = None
    if mask is not None:
        valid = mask.expand(b, 1, 1, s).reshape(b, s).contiguous()  # bool [B, S]
    out = torch.empty(b, h, 1, d)
    kernel = lib.phi3_attend_bf16 if k.dtype == torch.bfloat16 else lib.phi3_attend_f16
    kernel(qf.data_ptr(), k.data_ptr(), v.data_ptr(), None if valid is None else valid.data_ptr(), out.data_ptr(),
           b, h, kv, length, s, d, d ** -0.5 if scale is None else scale, torch.get_num_threads())
    return out


MAX_HEAD_DIM = 512  # as in the C file


def decode_attend_f16(lib, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, start: int, mask: torch.Tensor | None, n_heads: int, n_kv: int,
                      lo: int = 0) -> torch.Tensor:
    """One decode step of attention from the fused projection, in one call: qkv fp32 [B, 1, (H + 2·KV)·D];
    cos, sin fp32 broadcastable to [B, 1, 1, rot]; the fp16 caches [B, KV, L, D] get the new key (rotated)
    and value at slot `start`; mask bool broadcastable to [B, 1, 1, start + 1] or None; slots before `lo`
    are visible to no row (`layers.first_visible_key`) and are not read.
    Returns fp32 [B, 1, H·D]: the same as RoPE + `KVCache.update` + `attend_cache` (see `Attention`)."""
    b, _, width = qkv.shape
    d, length, rot = k_cache.shape[-1], k_cache.shape[2], cos.shape[-1]
    s = start + 1
    qkv = qkv.contiguous()
    cos = cos.reshape(-1, rot).expand(b, rot).contiguous()
    sin = sin.reshape(-1, rot).expand(b, rot).contiguous()
    valid = None if mask is None else mask.expand(b, 1, 1, s).reshape(b, s).contiguous()
    starts = torch.full((b,), start, dtype=torch.int32)
    out = torch.empty(b, 1, n_heads * d)
    lib.phi3_decode_attend_f16(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                               None if valid is None else valid.data_ptr(), out.data_ptr(), b, n_heads, n_kv, length,
                               starts.data_ptr(), lo, s, d, rot, d ** -0.5, torch.get_num_threads())
    return out


def can_decode_attend_f16(qkv: torch.Tensor, cos: torch.Tensor, k_cache: torch.Tensor, start: int) -> bool:
    """Whether `decode_attend_f16` takes these: one new fp32 token per row, written at the same slot
    `start` (an int: the server's per-row slots take the unfused path), fp32 cos / sin, a contiguous
    fp16 cache with room at `start`, head_dim a multiple of 8 (at most MAX_HEAD_DIM)."""
    d = k_cache.shape[-1]
    return (isinstance(start, int) and qkv.shape[1] == 1 and qkv.dtype == torch.float32 and cos.dtype == torch.float32
            and k_cache.dtype == torch.float16 and k_cache.is_contiguous() and qkv.device.type == "cpu"
            and d % 8 == 0 and d <= MAX_HEAD_DIM and cos.shape[-1] % 2 == 0 and start < k_cache.shape[2])


def can_attend_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `attend_cache` takes these tensors: one query, fp16 or bf16 cache views laid out as it
    expects."""
    d = q.shape[-1]
    return (q.shape[2] == 1 and k.dtype == v.dtype and k.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0
            and q.device.type == "cpu"
            and k.stride(3) == 1 and k.stride(2) == d and k.stride(1) % d == 0 and k.stride(0) == k.shape[1] * k.stride(1)
            and v.stride() == k.stride() and q.shape[1] % k.shape[1] == 0)
