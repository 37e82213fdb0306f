"""Weight-only quantization by module swap: int8 per output channel, int4 group-wise (scale + zero).

Matmuls run on PyTorch's packed CPU kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`).

On disk (safetensors, HF tensor names, plus a `quantization` section in config.json):
  int8: `{linear}.qweight` int8 [out, in], `{linear}.scales` fp32 [out]           w = q · s
  int4: `{linear}.qweight` uint8 [out, in/2] (low nibble = even column, q in 0..15),
        `{linear}.scales`, `{linear}.zeros` bf16 [out, in/group]                  w = (q − 8) · s + z
The int4 file layout is portable; it is repacked into the kernel's layout at load time, one layer
at a time, so full-precision weights are never materialised.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError

GROUP_SIZES = (32, 64, 128, 256)


class Int8Linear(nn.Module):
    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        # saved through `stored()`, not state_dict (see `quantized_state_dict`)
        self.register_buffer("qweight", qweight, persistent=False)  # int8 [out, in]
        self.register_buffer("scales", scales, persistent=False)  # fp32 [out]

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> "Int8Linear":
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        q = torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8)
        return cls(q, scales)

    def stored(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "scales": self.scales}

    @classmethod
    def from_stored(cls, t: dict[str, torch.Tensor], group_size: int | None = None) -> "Int8Linear":
        return cls(t["qweight"], t["scales"].float())

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.qweight, self.scales.to(x.dtype))
        return y.view(*shape[:-1], self.out_features)


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [out, in] -> q int32 [out, in] in 0..15, scales and zeros fp32 [out, in/group]."""
    out_f, in_f = weight.shape
    w = weight.detach().float().view(out_f, in_f // group_size, group_size)  # [out, groups, group]
    lo, hi = w.amin(-1), w.amax(-1)
    scales = ((hi - lo) / 15.0).clamp(min=1e-8)
    zeros = lo + 8.0 * scales  # the value of q = 8
    q = torch.round((w - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32)
    return q.view(out_f, in_f), scales, zeros


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """int [out, in] in 0..15 -> uint8 [out, in/2], even column in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2] -> int32 [out, in]."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).view(packed.shape[0], -1).to(torch.int32)


class Int4Linear(nn.Module):
    """Group-wise int4. Keeps the portable nibble layout (`qweight`, memory-mapped when loaded from a
    file) for saving, and the kernel's packed layout for the matmul."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int):
        super().__init__()
        self.out_features, self.in_features = qweight.shape[0], qweight.shape[1] * 2
        self.group_size = group_size
        self.qweight = qweight  # uint8 [out, in/2], the file layout (not a buffer: never copied)
        self.scales, self.zeros = scales.to(torch.bfloat16), zeros.to(torch.bfloat16)  # [out, in/group]
        q = unpack_nibbles(qweight)  # int32 [out, in], one layer at a time
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), persistent=False)
        sz = torch.stack((self.scales.float(), self.zeros.float()), dim=-1)  # [out, groups, 2]
        self.register_buffer("scales_and_zeros", sz.transpose(0, 1).contiguous(), persistent=False)  # [groups, out, 2]

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int) -> "Int4Linear":
        q, scales, zeros = quantize_int4(weight, group_size)
        return cls(pack_nibbles(q), scales, zeros, group_size)

    @classmethod
    def from_stored(cls, t: dict[str, torch.Tensor], group_size: int) -> "Int4Linear":
        return cls(t["qweight"], t["scales"], t["zeros"], group_size)

    def stored(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros}

    def dequantize(self) -> torch.Tensor:
        q = unpack_nibbles(self.qweight).view(self.out_features, -1, self.group_size).float()
        w = (q - 8.0) * self.scales.float()[..., None] + self.zeros.float()[..., None]
        return w.view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        sz = self.scales_and_zeros if x.dtype == torch.float32 else self.scales_and_zeros.to(x.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]), self.packed, self.group_size, sz)
        return y.view(*shape[:-1], self.out_features)


def check_quant_args(bits: int, group_size: int) -> None:
    if bits not in (4, 8):
        raise ConfigError(f"quantization bits={bits!r} is not supported (use 4 or 8)")
    if bits == 4 and group_size not in GROUP_SIZES:
        raise ConfigError(f"int4 group_size={group_size!r} is not supported (use one of {GROUP_SIZES})")


def quantizable_linears(model: nn.Module, include_head: bool) -> list[str]:
    """Names of the nn.Linear modules to quantize: every linear of the decoder, plus the head if asked."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and (include_head or name != "lm_head")]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 64, include_head: bool = True) -> nn.Module:
    """Swap every nn.Linear (and the head if `include_head`) for its quantized version, in place."""
    check_quant_args(bits, group_size)
    names = quantizable_linears(model, include_head)
    for name in names:
        linear = model.get_submodule(name)
        if bits == 4 and linear.in_features % group_size:
            raise ConfigError(f"{name}: in_features {linear.in_features} is not a multiple of group_size {group_size}")
        new = Int8Linear.quantize(linear.weight) if bits == 8 else Int4Linear.quantize(linear.weight, group_size)
        _set_module(model, name, new)
    model.config.raw["quantization"] = quantization_config(bits, group_size, names)
    return model


def quantization_config(bits: int, group_size: int, modules: list[str]) -> dict:
    return {"quant_method": "phi3-weight-only", "bits": bits, "group_size": group_size if bits == 4 else None,
            "modules": modules}


def load_quantized_modules(model: nn.Module, qcfg: dict, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Build the quantized modules named in `qcfg` from the stored tensors (consumed from `tensors`)."""
    bits, group = qcfg.get("bits"), qcfg.get("group_size")
    check_quant_args(bits, group if bits == 4 else 32)
    cls = Int8Linear if bits == 8 else Int4Linear
    keys = ("qweight", "scales") if bits == 8 else ("qweight", "scales", "zeros")
    from .errors import CheckpointError
    for name in qcfg.get("modules", []):
        parts = {}
        for key in keys:
            full = f"{name}.{key}"
            if full not in tensors:
                raise CheckpointError(f"{source}: missing tensor {full} (quantized {bits}-bit module {name})")
            parts[key] = tensors.pop(full)
        _set_module(model, name, cls.from_stored(parts, group))


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (Int8Linear, Int4Linear)):
            out.update({f"{name}.{k}": v.contiguous() for k, v in m.stored().items()})
    return out
