"""Weight-only quantization by module swap: int8 per output channel, int4 group-wise (scale + zero).

Matmuls run on phi3's native kernels (`cpu_kernels`, int8-rounded activations as llama.cpp) where
they can, else on PyTorch's packed CPU kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`).

On disk (safetensors, HF tensor names, plus a `quantization` section in config.json):
  int8: `{linear}.qweight` int8 [out, in], `{linear}.scales` fp32 [out]           w = q · s
  int4: `{linear}.qweight` uint8 [out, in/2] (low nibble = even column, q in 0..15),
        `{linear}.scales`, `{linear}.mins` fp16 [out, in/group]                   w = q · s + m
The int4 form is GGUF's Q4_1 (and Q4_0 is m = −8·s), so those blocks convert without loss. It is
repacked into the kernel's layout at load time, one layer at a time, so full-precision weights are
never materialised.

PyTorch's packed kernels are fast only for bf16 activations (fp32 activations take a path ~30×
slower), so on that fallback the matmul runs in `compute_dtype` (bf16 by default) whatever the
model's activation dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from . import cpu_kernels
from .errors import ConfigError
from .layers import activation_dtype
from .memory import return_freed_memory

GROUP_SIZES = (32, 64, 128, 256)


COMPUTE_DTYPE = torch.bfloat16
Layout = tuple[tuple[int, ...], torch.dtype]  # a stored tensor's shape and dtype (`stored_layout()`)


class Int8Linear(nn.Module):
    """int8 weights with one scale per output channel (`scales` [out]), or per group of
    `group_size` inputs (`scales` [out, in/group], GGUF's Q8_0 with groups of 32).

    Runs on phi3's native AVX2 kernel (`cpu_kernels`) where it can, else on PyTorch's: per channel
    `_weight_int8pack_mm`; grouped the int4 kernel, exactly: with u = q + 128 = 16·h + l (h, l
    nibbles), w = d·q = 16d·(h − 8) + d·l, so y = [x | x] @ [h | l]ᵀ with scale 16d / zero 0 on the
    h groups and scale d / zero 8d on the l groups."""

    STORED = ("qweight", "scales")  # the tensors `stored()` gives (plus "bias" for a biased linear)
    compute_dtype = COMPUTE_DTYPE

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.group_size = None if scales.dim() == 1 else self.in_features // scales.shape[1]
        # saved through `stored()`, not state_dict (see `checkpoint.export_entries`)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)  # kept as is [out]
        self._lib = cpu_kernels.library()
        self._block = cpu_kernels.int8_block(self.in_features, self.group_size)
        if self._lib is not None and self._block is not None:
            grouped = self.group_size is not None
            packed = cpu_kernels.pack_int8_native(self._lib, qweight, scales if grouped else None, self._block)
            self.register_buffer("packed", packed, persistent=False)  # [out/8, in/block, ...] bytes
            self._scales = None if grouped else scales.float()  # fp32 [out]
            self._row_scales = None if grouped else cpu_kernels.pad_rows(self._scales)  # fp32 [out8]
            self._qweight = None
            return
        self._lib = None
        self._scales = scales  # fp32 [out] or fp16 [out, in/group]
        self._qweight = qweight  # int8 [out, in]; grouped: rebuilt from the kernel layout when needed
        if self.group_size is None:
            # PyTorch's kernel reads the weight with aligned vector loads: one memory-mapped from a file
            # at an 8-byte offset (safetensors aligns no further) crashes it (measured: a segfault)
            self._qweight = qweight if qweight.data_ptr() % 64 == 0 else qweight.clone()
            self.register_buffer("_qweight_buf", self._qweight, persistent=False)
            self._scales_compute = scales.to(self.compute_dtype)
        else:
            def halves(lo, hi):
                u = qweight[lo:hi].to(torch.int32) + 128  # [rows, in] in 0..255
                return torch.cat((u >> 4, u & 15), dim=1)  # [rows, 2·in]
            self.register_buffer("packed", kernel_pack_int4(halves, self.out_features), persistent=False)
            d = scales.float()  # [out, groups]
            sz = torch.cat((torch.stack((16 * d, torch.zeros_like(d)), dim=-1),
                            torch.stack((d, 8 * d), dim=-1)), dim=1)  # [out, 2·groups, 2]
            self.register_buffer("scales_and_zeros", sz.transpose(0, 1).contiguous().to(self.compute_dtype),
                                 persistent=False)  # [2·groups, out, 2]
            block = kernel_block_n()
            if block and self.out_features % block == 0:
                self._qweight = None  # the weights are held once, in the kernel layout

    def _native_unpacked(self):
        return cpu_kernels.unpack_int8_native(self._lib, self.packed, self.out_features, self.in_features, self._block,
                                              grouped=self.group_size is not None)

    @property
    def qweight(self) -> torch.Tensor:
        """int8 [out, in]"""
        if self._lib is not None:
            return self._native_unpacked()[0]
        if self._qweight is not None:
            return self._qweight
        halves = unpack_kernel_int4(self.packed, self.out_features, 2 * self.in_features)  # [out, 2·in]
        hi, lo = halves[:, :self.in_features], halves[:, self.in_features:]
        return (16 * hi + lo - 128).to(torch.int8)

    @property
    def scales(self) -> torch.Tensor:
        """fp32 [out] per channel, fp16 [out, in/group] grouped"""
        if self._lib is not None and self.group_size is not None:
            return self._native_unpacked()[1]
        return self._scales

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Linear":
        return cls(*quantize_int8_rows_fast(weight), bias)

    def stored(self) -> dict[str, torch.Tensor]:
        if self._lib is not None:  # unpacked once for both
            q, grouped_scales = self._native_unpacked()
            return _with_bias({"qweight": q, "scales": self._scales if grouped_scales is None else grouped_scales},
                              self.bias)
        return _with_bias({"qweight": self.qweight, "scales": self.scales}, self.bias)

    def stored_layout(self) -> dict[str, Layout]:
        return _with_bias_layout(int8_layout(self.out_features, self.in_features, self.group_size), self.bias)

    @classmethod
    def from_stored(cls, t: dict[str, torch.Tensor], group_size: int | None = None, dtype=None) -> "Int8Linear":
        if "packed" in t:
            return cls.from_packed(t["packed"], _bias(t, dtype))
        scales = t["scales"]
        return cls(t["qweight"], scales.float() if scales.dim() == 1 else scales.half(), _bias(t, dtype))

    @classmethod
    def from_packed(cls, packed: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Linear":
        """Grouped int8 (groups of 32) already in the native kernel's layout: GGUF Q8_0 blocks packed
        straight from the file (`cpu_kernels.pack_ggml_q8_0`), or Q6_K requantized into it
        (`cpu_kernels.requant_ggml`: Q6_K, Q5_K, ...)."""
        self = _native_from_packed(cls, packed, bias)
        self._block = self.group_size
        self._scales = None
        self._row_scales = None
        self._qweight = None
        return self

    def dequantize(self) -> torch.Tensor:
        if self._lib is not None:  # in C from the kernel layout: the same floats (q·s is exact in fp32)
            return cpu_kernels.int8_rows(self._lib, self.packed, torch.arange(self.out_features), self.in_features,
                                         self._block, self._row_scales)
        q, scales = self.qweight.float(), self.scales
        if self.group_size is None:
            return q * scales[:, None]
        q = q.view(self.out_features, -1, self.group_size)
        return (q * scales.float()[..., None]).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, shape[-1])  # [tokens, in]
        if self._lib is not None:
            y = cpu_kernels.int8_matmul(self._lib, x, self.packed, self.out_features, self._block,
                                        self._row_scales)
        elif self.group_size is None:
            y = torch.ops.aten._weight_int8pack_mm(x.to(self.compute_dtype), self._qweight_buf,
                                                   self._scales_compute)
        else:
            x = x.to(self.compute_dtype)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.cat((x, x), dim=1), self.packed,
                                                           self.group_size, self.scales_and_zeros)
        return _add_bias(y.view(*shape[:-1], self.out_features).to(dtype), self.bias)


FP16_MAX = 65504.0


def quantize_int8_groups(weight: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> q int8 [out, in], scales fp16 [out, in/group] (symmetric per group, w ≈ q·s:
    GGUF Q8_0's form). The scale is rounded to fp16 first and q chosen against the rounded value."""
    out_f, in_f = weight.shape
    w = weight.detach().float().view(out_f, in_f // group_size, group_size)  # [out, groups, group]
    scales = (w.abs().amax(-1) / 127.0).clamp(min=6.1e-5, max=FP16_MAX).half()
    q = torch.round(w / scales.float()[..., None]).clamp(-127, 127).to(torch.int8)
    return q.view(out_f, in_f), scales


def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> q int8 [out, in], scales fp32 [out] (symmetric, w ≈ q·s)."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    return torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8), scales


def quantize_int8_rows_fast(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_int8_rows`, in C where the native kernels run (the same bytes, ~20× faster)."""
    lib = cpu_kernels.library()
    return quantize_int8_rows(weight) if lib is None else cpu_kernels.quantize_int8_rows(lib, weight)


def _native_from_packed(cls: type[nn.Module], packed: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """An `Int4Linear` / `Int8Linear` (not yet complete: the class sets its own fields) around weights
    already in the native kernel's layout with GGUF's groups of 32: packed [out/8, in/32, bytes]."""
    self = cls.__new__(cls)
    nn.Module.__init__(self)
    self.group_size = cpu_kernels.GGML_GROUP
    self.out_features, self.in_features = packed.shape[0] * cpu_kernels.ROWS, packed.shape[1] * self.group_size
    self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)
    self._lib = cpu_kernels.library()
    self.register_buffer("packed", packed, persistent=False)
    return self


def _with_bias(stored: dict[str, torch.Tensor], bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return stored if bias is None else {**stored, "bias": bias}


def _with_bias_layout(layout: dict[str, Layout], bias: torch.Tensor | None) -> dict[str, Layout]:
    return layout if bias is None else {**layout, "bias": (tuple(bias.shape), bias.dtype)}


def _bias(t: dict[str, torch.Tensor], dtype) -> torch.Tensor | None:
    b = t.get("bias")
    return None if b is None else b.to(dtype) if dtype is not None else b


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias.to(y.dtype)



def quantize_int4(weight: torch.Tensor, group_size: int, refine: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [out, in] -> q int32 [out, in] in 0..15, scales and mins fp16 [out, in/group] (w ≈ q·s + m).

    Scale and min span each group's range; `refine` times, they are then moved to the least-squares
    fit of the levels they give (and the levels chosen again): for values already on a coarser or
    non-uniform grid (GGUF Q3_K, IQ4_XS, ... requantized) it lowers the error by ~20 %. The fp16 scale
    and min are rounded first and q is chosen against the rounded values, so the stored triple is the
    best representation under what is actually stored."""
    out_f, in_f = weight.shape
    w = weight.detach().float().view(out_f, in_f // group_size, group_size)  # [out, groups, group]
    lo, hi = w.amin(-1), w.amax(-1)
    scale, low = ((hi - lo) / 15.0).clamp(min=1e-12), lo
    for _ in range(refine):
        scale, low = _least_squares_fit(w, scale, low)
    mins = low.clamp(-FP16_MAX, FP16_MAX).half()
    scales = (scale if refine else (hi - mins.float()) / 15.0).clamp(min=6.1e-5, max=FP16_MAX).half()
    q = torch.round((w - mins.float()[..., None]) / scales.float()[..., None]).clamp(0, 15).to(torch.int32)
    return q.view(out_f, in_f), scales, mins


REFINE = 2  # least-squares rounds of every int4 quantization (`quantize_int4`), dense or requantized GGUF


def quantize_int4_nibbles(weight: torch.Tensor, group_size: int, refine: int = REFINE) -> tuple[torch.Tensor, ...]:
    """`quantize_int4` with the levels packed two to a byte (`pack_nibbles`): qweight uint8 [out, in/2],
    scales, mins fp16 [out, in/group]; what `phi3 quantize`, `--quantize` and GGUF requantization use.

    Refined (`REFINE` least-squares rounds) by default: on Gaussian weights the squared error is 12 %
    below min–max's at groups of 32, 8 % at 64, 7 % at 128 (Laplace alike); on the embedded SmolLM2
    int4 g64 perplexity 14.07 → 13.85 (fp32 10.96); on values already on a coarser grid (GGUF Q3_K,
    IQ4_XS) ~20 % less error. In C where the native kernels run (~20× faster than the tensor ops, no fp32 copy
    of the weight; a phi-3-mini in ~3 s with 2 threads): the same bytes as `quantize_int4` but where a
    sum of the fit rounds differently (without refinement, always the same bytes)."""
    lib = cpu_kernels.library()
    if lib is not None and group_size % 8 == 0:
        return cpu_kernels.quantize_int4(lib, weight, group_size, refine)
    q, scales, mins = quantize_int4(weight, group_size, refine)
    return pack_nibbles(q), scales, mins


def _least_squares_fit(w: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, groups, G]; per group, the (scale, min) minimising |L·scale + min − w|² for the levels L
    that the current (scale, min) give; groups whose fit degenerates keep theirs."""
    levels = torch.round((w - low[..., None]) / scale[..., None]).clamp_(0, 15)
    n = w.shape[-1]
    sl, sll = levels.sum(-1), (levels * levels).sum(-1)
    sw, slw = w.sum(-1), (levels * w).sum(-1)
    det = n * sll - sl * sl
    fit_scale = (n * slw - sl * sw) / det.clamp(min=1e-12)
    fit_low = (sll * sw - sl * slw) / det.clamp(min=1e-12)
    ok = (det > 0) & (fit_scale > 0)
    return torch.where(ok, fit_scale, scale), torch.where(ok, fit_low, low)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """int [out, in] in 0..15 -> uint8 [out, in/2], even column in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def _find_kernel_block_n() -> int | None:
    """The N-blocking of `_convert_weight_to_int4pack_for_cpu` on this CPU (32 with AVX2, 64 with
    AVX-512): its output is [N/B, K, B/2] bytes holding rows (j, j + B/2) of each block of B rows
    in the low/high nibble. Found by checking a random matrix, None if the layout is another."""
    q = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    for block in (32, 64, 16, 128):
        if torch.equal(_unpack_kernel_layout(packed, 128, 64, block), q):
            return block
    return None


def _unpack_kernel_layout(packed: torch.Tensor, n: int, k: int, block: int) -> torch.Tensor:
    """The kernel's packed int4 weight -> int32 [n, k] in 0..15."""
    b = packed.reshape(n // block, k, block // 2)  # [N/B, K, B/2]
    q = torch.cat((b & 0x0F, b >> 4), dim=-1)  # [N/B, K, B]: rows j and j + B/2
    return q.permute(0, 2, 1).reshape(n, k).to(torch.int32)


_KERNEL_BLOCK_N: list = []


def kernel_block_n() -> int | None:
    if not _KERNEL_BLOCK_N:
        _KERNEL_BLOCK_N.append(_find_kernel_block_n())
    return _KERNEL_BLOCK_N[0]


def unpack_kernel_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor | None:
    """int32 [n, k] back from the kernel layout, or None when it cannot be inverted here."""
    block = kernel_block_n()
    if block is None or n % block:
        return None
    return _unpack_kernel_layout(packed, n, k, block)


def kernel_pack_int4(q_of_rows, n: int) -> torch.Tensor:
    """The kernel's packed layout for an int4 weight with `n` rows, where `q_of_rows(lo, hi)` gives
    int32 [hi − lo, in] values 0..15. The layout is [N/B, K, B/2], so blocks of rows pack on their
    own: packing 1024 rows at a time keeps the int32 scratch small (the whole matrix would need
    4 bytes per weight)."""
    block = kernel_block_n()
    pack = lambda lo, hi: torch.ops.aten._convert_weight_to_int4pack_for_cpu(q_of_rows(lo, hi), 1)  # noqa: E731
    return _by_rows(pack, n, 1024 if block and 1024 % block == 0 and n % block == 0 else n)


def unpack_nibbles(packed: torch.Tensor, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """uint8 [out, in/2] -> [out, in] (int32 by default)."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).view(packed.shape[0], -1).to(dtype)


def q4_0_mins(scales: torch.Tensor) -> torch.Tensor:
    """The mins of Q4_0 weights (w = d·(q − 8)): −8·scale, fp16 [out, in/group]."""
    return scales.to(torch.float16) * -8


class Int4Linear(nn.Module):
    """Group-wise int4, w = q·scale + min. The weights are held once, in the layout of the kernel that
    runs them: phi3's native AVX2 kernel (`cpu_kernels`, scales and mins inline) where it can run,
    else PyTorch's `_weight_int4pack_mm_for_cpu`. The file layout is rebuilt from it when saving."""

    STORED = ("qweight", "scales", "mins")  # mins None (GGUF Q4_0 in memory): −8·scale, implied
    compute_dtype = COMPUTE_DTYPE

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, group_size: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape[0], qweight.shape[1] * 2
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)  # kept as is [out]
        self.group_size = group_size
        scales = scales.to(torch.float16)  # [out, in/group]
        self._lib = cpu_kernels.library()
        if self._lib is not None:
            # Q4_0 weights (min = −8·scale) take the scale-only layout: 4.5 instead of 5 bits a weight
            symmetric = mins is None or cpu_kernels.is_q4_0(scales, mins)
            mins = None if symmetric else mins.to(torch.float16)
            packed = cpu_kernels.pack_int4_nibbles(self._lib, qweight, scales, mins, group_size)
            # [out/8, groups, 32 (16 scale-only) + 4·group] bytes
            self.register_buffer("packed", packed, persistent=False)
            self._qweight = self._scales = self._mins = None
            return
        self._scales, self._mins = scales, q4_0_mins(scales) if mins is None else mins.to(torch.float16)
        packed = kernel_pack_int4(lambda lo, hi: unpack_nibbles(qweight[lo:hi]), self.out_features)
        self.register_buffer("packed", packed, persistent=False)
        # kept in the file layout only where the torch kernel's layout cannot be inverted
        block = kernel_block_n()
        self._qweight = None if block and self.out_features % block == 0 else qweight
        # the kernel computes w = (q − 8)·scale + zero
        s = scales.float()
        sz = torch.stack((s, self._mins.float() + 8.0 * s), dim=-1)  # [out, groups, 2]
        sz = sz.transpose(0, 1).contiguous()  # [groups, out, 2]
        self.register_buffer("scales_and_zeros", sz.to(self.compute_dtype), persistent=False)

    def _native_unpacked(self):
        """(qweight uint8 [out, in/2], scales, mins fp16 [out, in/group]) from the native layout"""
        return cpu_kernels.unpack_int4_nibbles(self._lib, self.packed, self.out_features, self.in_features,
                                               self.group_size)

    @property
    def qweight(self) -> torch.Tensor:
        """uint8 [out, in/2], low nibble = even column (the file layout)."""
        if self._lib is not None:
            return self._native_unpacked()[0]
        if self._qweight is not None:
            return self._qweight
        return pack_nibbles(unpack_kernel_int4(self.packed, self.out_features, self.in_features))

    @property
    def scales(self) -> torch.Tensor:
        """fp16 [out, in/group]"""
        return self._native_unpacked()[1] if self._lib is not None else self._scales

    @property
    def mins(self) -> torch.Tensor:
        """fp16 [out, in/group]"""
        return self._native_unpacked()[2] if self._lib is not None else self._mins

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int, bias: torch.Tensor | None = None) -> "Int4Linear":
        return cls(*quantize_int4_nibbles(weight, group_size), group_size, bias)

    @classmethod
    def from_stored(cls, t: dict[str, torch.Tensor], group_size: int, dtype=None) -> "Int4Linear":
        if "packed" in t:
            return cls.from_packed(t["packed"], _bias(t, dtype))
        return cls(t["qweight"], t["scales"], t["mins"], group_size, _bias(t, dtype))

    @classmethod
    def from_packed(cls, packed: torch.Tensor, bias: torch.Tensor | None = None) -> "Int4Linear":
        """Groups of 32 already in the native kernel's layout (`cpu_kernels.pack_ggml_q4`: GGUF Q4_0 /
        Q4_1 blocks packed straight from the file)."""
        self = _native_from_packed(cls, packed, bias)
        self._qweight = self._scales = self._mins = None
        return self

    def stored(self) -> dict[str, torch.Tensor]:
        if self._lib is not None:
            return _with_bias(dict(zip(self.STORED, self._native_unpacked())), self.bias)
        return _with_bias({"qweight": self.qweight, "scales": self.scales, "mins": self.mins}, self.bias)

    def stored_layout(self) -> dict[str, Layout]:
        return _with_bias_layout(int4_layout(self.out_features, self.in_features, self.group_size), self.bias)

    def dequantize(self) -> torch.Tensor:
        if self._lib is not None:  # in C from the kernel layout: the same floats (q·s is exact in fp32)
            return cpu_kernels.int4_rows(self._lib, self.packed, torch.arange(self.out_features), self.in_features,
                                         self.group_size)
        qweight, scales, mins = self.qweight, self.scales, self.mins
        q = unpack_nibbles(qweight)
        q = q.view(self.out_features, -1, self.group_size).float()
        w = q * scales.float()[..., None] + mins.float()[..., None]
        return w.view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, shape[-1])  # [tokens, in]
        if self._lib is not None:
            y = cpu_kernels.int4_matmul(self._lib, x, self.packed, self.out_features, self.group_size)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(self.compute_dtype), self.packed,
                                                           self.group_size, self.scales_and_zeros)
        return _add_bias(y.view(*shape[:-1], self.out_features).to(dtype), self.bias)


def _by_rows(pack_rows, n: int, step: int = 1024) -> torch.Tensor:
    """`pack_rows(lo, hi)` over blocks of `step` rows (a multiple of 8), written into one tensor along
    dim 0: bounded scratch, and no second copy of the whole result (as a concatenation would make).
    Every full block packs to the same number of leading rows; the last may be shorter."""
    if n <= step:
        return pack_rows(0, n)
    last_lo = (n - 1) // step * step
    last, first = pack_rows(last_lo, n), pack_rows(0, step)
    r = first.shape[0]  # packed rows per full block
    out = first.new_empty((r * (last_lo // step) + last.shape[0], *first.shape[1:]))
    out[:r], out[r * (last_lo // step):] = first, last
    del first, last
    for lo in range(step, last_lo, step):
        out[r * (lo // step):r * (lo // step + 1)] = pack_rows(lo, lo + step)
    return out


class _QuantizedEmbedding(nn.Module):
    """A table whose rows are dequantized as they are looked up; subclasses give `_rows(ids)` -> fp32
    [len(ids), hidden] and set `num_embeddings`, `embedding_dim` and the returned `dtype`."""

    def stored_layout(self) -> dict[str, Layout]:
        """What `stored()` gives, shapes and dtypes (the tables hold their stored tensors as they are)."""
        return {k: (tuple(v.shape), v.dtype) for k, v in self.stored().items()}

    def dequantize(self) -> torch.Tensor:
        return self._rows(torch.arange(self.num_embeddings))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._rows(ids.reshape(-1)).view(*ids.shape, self.embedding_dim).to(self.dtype)


class Int8Embedding(_QuantizedEmbedding):
    """Embedding table in int8, one scale per row (`scales` fp32 [vocab]) or per group of inputs
    (`scales` fp16 [vocab, hidden/group]: GGUF's Q8_0); rows are dequantized as they are looked up."""

    STORED = ("qweight", "scales")

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.dtype = dtype  # the activation dtype the rows are returned in
        self.register_buffer("qweight", qweight, persistent=False)  # int8 [vocab, hidden]
        self.register_buffer("scales", scales, persistent=False)

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> "Int8Embedding":
        return cls(*quantize_int8_rows_fast(weight), weight.dtype)

    @classmethod
    def from_stored(cls, t: dict[str, torch.Tensor], group_size: int | None = None,
                    dtype: torch.dtype = torch.bfloat16) -> "Int8Embedding":
        scales = t["scales"]
        return cls(t["qweight"], scales.float() if scales.dim() == 1 else scales.half(), dtype)

    def stored(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "scales": self.scales}

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 [len(ids), hidden]"""
        q, s = self.qweight[ids].float(), self.scales[ids].float()
        if s.dim() == 1:
            return q * s[:, None]
        return (q.view(len(ids), s.shape[1], -1) * s[..., None]).view(len(ids), self.embedding_dim)



class Int4Embedding(_QuantizedEmbedding):
    """Embedding table in group-wise int4 with the int4 linear's file layout (w = q·s + m per group):
    GGUF's Q4_0/Q4_1 token embeddings load into it unchanged; rows are dequantized as they are looked up."""

    STORED = ("qweight", "scales", "mins")  # mins None: Q4_0, as Int4Linear

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape[0], qweight.shape[1] * 2
        self.group_size = self.embedding_dim // scales.shape[1]
        self.dtype = dtype
        self.register_buffer("qweight", qweight, persistent=False)  # uint8 [vocab, hidden/2]
        self.register_buffer("scales", scales.half(), persistent=False)  # fp16 [vocab, hidden/group]
        mins = q4_0_mins(scales) if mins is None else mins
        self.register_buffer("mins", mins.half(), persistent=False)  # fp16 [vocab, hidden/group]

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int) -> "Int4Embedding":
        return cls(*quantize_int4_nibbles(weight, group_size), weight.dtype)

    @classmethod
    def from_stored(cls, t: dict[str, torch.Tensor], group_size: int | None = None,
                    dtype: torch.dtype = torch.bfloat16) -> "Int4Embedding":
        return cls(t["qweight"], t["scales"], t["mins"], dtype)

    def stored(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "scales": self.scales, "mins": self.mins}

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 [len(ids), hidden]"""
        q = unpack_nibbles(self.qweight[ids], torch.float32).view(len(ids), -1, self.group_size)  # [n, groups, G]
        w = q * self.scales[ids].float()[..., None] + self.mins[ids].float()[..., None]
        return w.view(len(ids), self.embedding_dim)



class TiedEmbedding(_QuantizedEmbedding):
    """The token table of a tied model read from its quantized head (the two hold the same blocks, as
    in a GGUF file without `output.weight`): rows are dequantized from the head's kernel layout as they
    are looked up, so the table is held once. Saved as the table it is (`stored()`), like
    `Int8Embedding` / `Int4Embedding`, which is what loads it back."""

    def __init__(self, head: nn.Module, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if head._lib is None:
            raise ValueError("TiedEmbedding needs a head on the native kernels")
        object.__setattr__(self, "head", head)  # not a submodule: it is the model's lm_head
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.dtype = dtype
        self.bits = 4 if isinstance(head, Int4Linear) else 8

    def stored(self) -> dict[str, torch.Tensor]:
        # copies: a file holds the table and the head apart (safetensors refuses shared storage)
        return {k: v.clone() for k, v in self.head.stored().items() if k != "bias"}

    def stored_layout(self) -> dict[str, Layout]:
        return {k: v for k, v in self.head.stored_layout().items() if k != "bias"}

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 [len(ids), hidden]"""
        h = self.head
        if (ids < 0).any() or (ids >= self.num_embeddings).any():
            raise IndexError(f"token id out of range for a table of {self.num_embeddings} rows")
        if self.bits == 4:
            return cpu_kernels.int4_rows(h._lib, h.packed, ids, self.embedding_dim, h.group_size)
        return cpu_kernels.int8_rows(h._lib, h.packed, ids, self.embedding_dim, h._block, h._row_scales)


QUANTIZED = (Int8Linear, Int4Linear, Int8Embedding, Int4Embedding, TiedEmbedding)


def check_quant_args(bits: int, group_size: int | None, what: str = "quantization") -> None:
    if bits not in (4, 8):
        raise ConfigError(f"{what} bits={bits!r} is not supported (use 4 or 8)")
    if bits == 4 and group_size not in GROUP_SIZES:
        raise ConfigError(f"int4 group_size={group_size!r} is not supported (use one of {GROUP_SIZES})")


LINEARS = (nn.Linear, Int8Linear, Int4Linear)


def decoder_linears(model: nn.Module) -> list[str]:
    """Names of the linear modules (dense or quantized) of the decoder layers (everything but the head)."""
    return [name for name, m in model.named_modules() if isinstance(m, LINEARS) and name != "lm_head"]


def dense_weight(module: nn.Module) -> torch.Tensor:
    """A linear's or embedding's full-precision weight: its own, or dequantized (fp32) from a quantized one."""
    return module.dequantize() if isinstance(module, QUANTIZED) else module.weight.detach()


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantization_plan(model: nn.Module, bits: int = 4, group_size: int = 64, head_bits: int | None = 8,
                      embedding_bits: int | str | None = "head") -> dict[str, int]:
    """Bits per module name that `quantize_model` gives (see there), the arguments checked first."""
    check_quant_args(bits, group_size)
    if head_bits is not None:
        check_quant_args(head_bits, group_size, "head")
    if embedding_bits not in (None, 4, 8, "head"):
        raise ConfigError(f"embedding bits={embedding_bits!r} is not supported (use 4, 8, 'head' or none)")
    if embedding_bits == "head":
        embedding_bits = head_bits
    plan = {name: bits for name in decoder_linears(model)}
    if head_bits is not None:
        plan["lm_head"] = head_bits
    for name, b in plan.items():
        linear = model.get_submodule(name)
        if b == 4 and linear.in_features % group_size:
            raise ConfigError(f"{name}: in_features {linear.in_features} is not a multiple of group_size {group_size}")
    tied = getattr(model.config, "tie_word_embeddings", False) and head_bits is not None
    if embedding_bits is None and tied:
        embedding_bits = head_bits  # the tied table is the head's values (held once: `TiedEmbedding`)
    if embedding_bits is not None:
        plan["model.embed_tokens"] = embedding_bits
        width = model.get_submodule("model.embed_tokens").embedding_dim
        if embedding_bits == 4 and width % group_size:
            raise ConfigError(f"model.embed_tokens: embedding_dim {width} is not a multiple of group_size {group_size}")
    return plan


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 64, head_bits: int | None = 8,
                   embedding_bits: int | str | None = "head") -> nn.Module:
    """Swap every decoder linear for its `bits`-bit version, in place.

    Already-quantized linears and tables (a GGUF loaded as it is, a quantized checkpoint) are
    requantized from their dequantized weights, one module at a time: no full-precision copy of the
    model is made.

    The output head is quantized to `head_bits` (None keeps it in full precision). Its default is 8:
    the head is the layer most sensitive to 4 bits (on SmolLM2-135M, int4 g32 everywhere costs +5 %
    perplexity, int4 with an int8 head +0.1 %), which is also why llama.cpp keeps it at Q6_K/Q8_0.
    The embedding table takes the head's bits by default (`embedding_bits="head"`; none when the head
    stays in full precision), or is stored in int8 (`embedding_bits=8`, a scale per row), int4
    (`embedding_bits=4`, groups of `group_size`) or kept as it is (None). An int8 table is all but free
    (SmolLM2-135M with only its table in int8: +0.05 % perplexity) and keeps the int4 phi-3-mini file
    at 2.24 GB instead of 2.33 with a bf16 table. A model whose table is tied to
    a quantized head keeps one table: with the head's bits (the default, or None) its rows are read
    from the quantized head (`TiedEmbedding`), as llama.cpp reads its output from token_embd."""
    plan = quantization_plan(model, bits, group_size, head_bits, embedding_bits)
    densify_unplanned(model, set(plan))
    for name, b in plan.items():
        if name == "model.embed_tokens":
            continue
        linear = model.get_submodule(name)
        weight, bias = dense_weight(linear), linear.bias
        _set_module(model, name, Int8Linear.quantize(weight, bias) if b == 8 else Int4Linear.quantize(weight, group_size, bias))
        del weight, linear
    if "model.embed_tokens" in plan:
        embedding_bits = plan["model.embed_tokens"]
        embed = model.model.embed_tokens
        dtype = embed.dtype if isinstance(embed, QUANTIZED) else embed.weight.dtype  # of the rows it returns
        head = model.lm_head
        tied = getattr(model.config, "tie_word_embeddings", False) and head_bits is not None
        if tied and embedding_bits == head_bits and head._lib is not None:
            table = TiedEmbedding(head, dtype)  # rows read from the quantized head
        else:
            table = _quantized_table(dense_weight(embed), embedding_bits, group_size)
            table.dtype = dtype
        _set_module(model, "model.embed_tokens", table)
    model.config.raw["quantization"] = quantization_config(bits, group_size, plan)
    return model


def _quantized_table(weight: torch.Tensor, bits: int, group_size: int) -> _QuantizedEmbedding:
    return Int8Embedding.quantize(weight) if bits == 8 else Int4Embedding.quantize(weight, group_size)


def quantized_stored(module: nn.Module, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """What `stored()` of `module` quantized by `quantize_model` to `bits` gives, computed straight
    from its weight (no kernel layout is packed and unpacked): what `phi3 quantize` writes."""
    weight = dense_weight(module)
    if isinstance(module, (nn.Embedding, _QuantizedEmbedding)):
        return _quantized_table(weight, bits, group_size).stored()
    if bits == 8:
        return _with_bias(dict(zip(Int8Linear.STORED, quantize_int8_rows_fast(weight))), module.bias)
    return _with_bias(dict(zip(Int4Linear.STORED, quantize_int4_nibbles(weight, group_size))), module.bias)


def quantized_layout(module: nn.Module, bits: int, group_size: int) -> dict[str, Layout]:
    """The shapes and dtypes of `quantized_stored(module, bits, group_size)`."""
    if isinstance(module, (nn.Embedding, _QuantizedEmbedding)):
        n, k = module.num_embeddings, module.embedding_dim
        return int8_layout(n, k) if bits == 8 else int4_layout(n, k, group_size)
    n, k = module.out_features, module.in_features
    return _with_bias_layout(int8_layout(n, k) if bits == 8 else int4_layout(n, k, group_size), module.bias)


def int8_layout(n: int, k: int, group_size: int | None = None) -> dict[str, Layout]:
    """Stored int8 [n, k]: per-channel fp32 scales, or fp16 per group"""
    scales = ((n,), torch.float32) if group_size is None else ((n, k // group_size), torch.float16)
    return {"qweight": ((n, k), torch.int8), "scales": scales}


def int4_layout(n: int, k: int, group_size: int) -> dict[str, Layout]:
    groups = k // group_size
    return {"qweight": ((n, k // 2), torch.uint8), "scales": ((n, groups), torch.float16),
            "mins": ((n, groups), torch.float16)}


def densify_unplanned(model: nn.Module, planned: set[str]) -> None:
    """Quantized modules the plan keeps in full precision (a GGUF's quantized head with
    `head_bits=None`) become dense again, in the model's dtype; a tied model whose head and table
    are then both dense holds the table once, as a full-precision tied model does."""
    dtype = activation_dtype(model)
    for name, m in list(model.named_modules()):
        if not isinstance(m, QUANTIZED) or name in planned:
            continue
        weight = nn.Parameter(dense_weight(m).to(dtype), requires_grad=False)
        if isinstance(m, _QuantizedEmbedding):
            dense = nn.Embedding(m.num_embeddings, m.embedding_dim, _weight=weight)
        else:
            with torch.device("meta"):
                dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            dense.weight = weight
            if m.bias is not None:
                dense.bias = nn.Parameter(m.bias.to(dtype), requires_grad=False)
        _set_module(model, name, dense)
    head, table = getattr(model, "lm_head", None), model.model.embed_tokens
    if getattr(model.config, "tie_word_embeddings", False) and type(head) is nn.Linear \
            and type(table) is nn.Embedding and head.bias is None:
        head.weight = table.weight


def quantize_on_load(model: nn.Module, bits: int, group_size: int = 64,
                     dtype: str | torch.dtype | None = None) -> nn.Module:
    """A just-loaded model as `phi3 quantize` and a reload would give it, in place: `bits`-bit decoder
    linears, int8 head and table, and the remaining dense parameters (norms) in the dtype a quantized
    checkpoint loads with (`checkpoint.default_dtype`: fp32 when they are under a tenth of the model,
    so that its decode steps run natively) unless `dtype` is given. A model that loaded quantized (a
    GGUF) is requantized from the values it holds (`quantize_model`)."""
    from .checkpoint import default_dtype

    quantize_model(model, bits=bits, group_size=group_size)
    dense = sum(p.numel() for p in model.parameters())
    act = default_dtype(model.config, dtype, dense)
    for p in model.parameters():
        p.data = p.data.to(act)
    for m in model.modules():
        if isinstance(m, _QuantizedEmbedding):
            m.dtype = act  # the rows come out in the activation dtype, as a reload builds them
    return model


def quantization_config(bits: int, group_size: int, modules: dict[str, int]) -> dict:
    """The `quantization` section of config.json: default bits, int4 group size, bits per module."""
    return {"quant_method": "phi3-weight-only", "bits": bits, "group_size": group_size, "modules": modules}


def _module_class(name: str, bits: int) -> type[nn.Module]:
    if name.endswith("embed_tokens"):
        return Int8Embedding if bits == 8 else Int4Embedding
    return Int8Linear if bits == 8 else Int4Linear


def load_quantized_modules(model: nn.Module, qcfg: dict, tensors: dict[str, torch.Tensor], source: str,
                           dtype: torch.dtype) -> None:
    """Build the quantized modules named in `qcfg` from the stored tensors (consumed from `tensors`);
    `dtype` is the model's activation dtype."""
    from .errors import CheckpointError
    group = qcfg.get("group_size")
    modules = qcfg.get("modules")
    if not isinstance(modules, dict):
        raise CheckpointError(f"{source}: config.json quantization.modules must map module names to bits, "
                              f"got {type(modules).__name__}")
    shared = _head_holds_the_table(model, modules, tensors)
    for name, bits in modules.items():
        check_quant_args(bits, group, f"{source}: module {name}")
        if shared and name == "model.embed_tokens":
            continue  # built from the head below
        cls = _module_class(name, bits)
        parts = {}
        # "packed": GGUF blocks already in the native kernel's layout (phi3.gguf), else the stored form
        keys = [k for k in ("packed", "scales") if f"{name}.{k}" in tensors] if f"{name}.packed" in tensors \
            else cls.STORED
        for key in keys:
            full = f"{name}.{key}"
            if full not in tensors:
                raise CheckpointError(f"{source}: missing tensor {full} (quantized {bits}-bit module {name})")
            parts[key] = tensors.pop(full)
        if not issubclass(cls, _QuantizedEmbedding) and f"{name}.bias" in tensors:  # a biased linear keeps its bias as is
            parts["bias"] = tensors.pop(f"{name}.bias")
        _set_module(model, name, cls.from_stored(parts, group, dtype))
        del parts
        return_freed_memory()  # the stored layout just converted
    if shared:
        table = {k.rsplit(".", 1)[1]: tensors.pop(k) for k in [k for k in tensors if k.startswith("model.embed_tokens.")]}
        if model.lm_head._lib is not None:
            model.model.embed_tokens = TiedEmbedding(model.lm_head, dtype)
        else:  # PyTorch's kernels: the head's layout cannot give rows back cheaply, keep the table
            model.model.embed_tokens = _module_class("model.embed_tokens", modules["model.embed_tokens"]).from_stored(
                table, group, dtype)


def _head_holds_the_table(model: nn.Module, modules: dict, tensors: dict) -> bool:
    """A tied model whose embedding and head are stored quantized with the very same values (a GGUF
    file without `output.weight`, or a checkpoint saved from one): the table need not be held twice."""
    cfg = getattr(model, "config", None)
    if not (cfg is not None and cfg.tie_word_embeddings and "lm_head" in modules
            and modules.get("model.embed_tokens") == modules["lm_head"]):
        return False
    if "lm_head.bias" in tensors:
        return False
    keys = {k.rsplit(".", 1)[1] for k in tensors if k.startswith(("model.embed_tokens.", "lm_head."))}
    for k in keys:
        a, b = tensors.get(f"model.embed_tokens.{k}"), tensors.get(f"lm_head.{k}")
        if (a is None) != (b is None):
            return False
        if a is not None and (a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b)):
            return False
    return bool(keys)


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QUANTIZED):
            out.update({f"{name}.{k}": v.contiguous() for k, v in m.stored().items()})
    return out
