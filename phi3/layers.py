"""Building blocks shared by the model families: RMSNorm, RoPE / LongRoPE, attention, gated MLP, KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, longrope_attention_factor


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x²) + eps) computed in fp32, cast back, then scaled (HF semantics)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE on the first `rotary_dim` channels, with optional LongRoPE.

    LongRoPE rule (HF semantics, spec §1.4): a forward call whose longest sequence `seq_len =
    max(position)+1` exceeds `original_max_position_embeddings` (L0) uses the long factors for
    *all* its positions, otherwise the short ones; cos/sin are multiplied by the attention factor
    (mscale) in both cases. Keys cached under short factors are stale once a sequence passes L0:
    the generator recomputes the whole cache at that point (see `generate.py`).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.rotary_dim = cfg.rotary_dim
        self.original_max = cfg.original_max_position_embeddings
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).float() / self.rotary_dim
        base = cfg.rope_theta**exponents  # [rotary_dim/2]
        if cfg.is_longrope:
            short = torch.tensor(cfg.rope_scaling["short_factor"], dtype=torch.float32)
            long = torch.tensor(cfg.rope_scaling["long_factor"], dtype=torch.float32)
            self.register_buffer("inv_freq_short", 1.0 / (short * base), persistent=False)
            self.register_buffer("inv_freq_long", 1.0 / (long * base), persistent=False)
            self.mscale = longrope_attention_factor(cfg)
        else:
            self.register_buffer("inv_freq_short", 1.0 / base, persistent=False)
            self.inv_freq_long = None
            self.mscale = 1.0

    def uses_long_factors(self, seq_len: int) -> bool:
        return self.inv_freq_long is not None and seq_len > self.original_max

    def forward(self, positions: torch.Tensor, seq_len, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, 1, T, rotary_dim] in `dtype` (computed in fp32).

        `seq_len`: an int for the whole call, or a LongTensor [B] choosing the factors per row
        (the server's continuous batching, where each row is its own sequence).
        """
        if torch.is_tensor(seq_len) and self.inv_freq_long is not None:
            long_rows = (seq_len > self.original_max)[:, None, None]  # [B, 1, 1]
            inv_freq = torch.where(long_rows, self.inv_freq_long, self.inv_freq_short)  # [B, 1, rotary_dim/2]
        elif torch.is_tensor(seq_len):
            inv_freq = self.inv_freq_short
        else:
            inv_freq = self.inv_freq_long if self.uses_long_factors(seq_len) else self.inv_freq_short
        angles = positions.float()[..., None] * inv_freq  # [B, T, rotary_dim/2]
        emb = torch.cat((angles, angles), dim=-1)  # [B, T, rotary_dim]
        cos = (emb.cos() * self.mscale).to(dtype)[:, None]
        sin = (emb.sin() * self.mscale).to(dtype)[:, None]
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, head_dim]; rotate the first cos.shape[-1] channels, pass the rest through."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    out = x_rot * cos + rotated * sin
    return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out


class KVCache(nn.Module):
    """Fixed-size cache for one layer: k, v [B, KV, max_len, head_dim], written at `start`."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, KV, T, d] at slots start..start+T; return views of slots 0..start+T."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    """Multi-head attention with GQA over a fused [Q | K | V] projection (spec §1.3)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, cache_start: int = 0):
        b, t, _ = x.shape
        q, k, v = self.qkv_proj(x).split(
            [self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim], dim=-1
        )
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, d]
        k = k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # [B, KV, T, d]
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # [B, KV, T, d]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(cache_start, k, v)  # [B, KV, S, d]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class GatedMLP(nn.Module):
    """down(up ⊙ silu(gate)) over a fused [gate | up] projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None,
                   segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask [B, 1, T, S]: key s is visible to query t when it is valid (position >= 0),
    not in the future, and inside the sliding window (t - s < W: W keys including itself, as HF).

    q_pos [B, T] and k_pos [B, S] are absolute positions; padding slots carry position -1.
    A query that sees nothing (a padding query) is allowed everything, to keep softmax finite.
    `segment_ids` [B, T] (no cache: q and k are the same tokens) keeps packed documents apart:
    a key is visible only to queries of the same segment.
    """
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    mask = (kp >= 0) & (kp <= qp)
    if segment_ids is not None:
        mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
    if sliding_window is not None:
        mask &= qp - kp < sliding_window
    mask |= ~mask.any(-1, keepdim=True)
    return mask[:, None]
