"""Phi-3-small (`Phi3SmallForCausalLM`, spec §2): dense and block-sparse attention layers alternating,
GQA over a head-major grouped `query_key_value`, LayerNorm and biases everywhere, GEGELU, muP scalings.

Module names follow the original checkpoint, so `state_dict()` keys are its tensor names. The head is
tied to the embedding (`lm_head` shares its weight, and is not saved).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..blocksparse import SparseKVCache, SparsePattern, blocksparse_prefill
from ..config import ModelConfig, base_fields
from ..errors import ConfigError
from ..layers import KVCache, RotaryEmbedding, apply_rotary, attention, attention_mask, embedding, step_positions
from .phi3 import Cache

# The released tokenizer's unused ids (spec §2.7), masked out of the logits.
RELEASE_DUMMY_TOKENS = [100256, 100258, 100259, 100260, 100264, 100265] + list(range(100267, 100352))


@dataclass
class Phi3SmallConfig(ModelConfig):
    gegelu_limit: float = 20.0
    blocksparse_block_size: int = 64
    blocksparse_num_local_blocks: int = 16
    blocksparse_vert_stride: int = 8
    blocksparse_homo_head_pattern: bool = False
    dense_attention_every_n_layers: int = 2
    mup_use_scaling: bool = True
    mup_attn_multiplier: float = 1.0
    mup_embedding_multiplier: float | None = 10.0
    mup_width_multiplier: float | None = 8.0
    dummy_token_indices: list[int] = field(default_factory=list)

    @property
    def layout(self) -> str:
        return "phi3small"

    @property
    def pattern(self) -> SparsePattern:
        return SparsePattern(self.blocksparse_block_size, self.blocksparse_num_local_blocks,
                             self.blocksparse_vert_stride, self.num_attention_heads, self.blocksparse_homo_head_pattern)

    def is_dense_layer(self, layer: int) -> bool:
        """Dense when (l + 1) % n == 0, block-sparse otherwise (n = 2: even layers are sparse)."""
        return (layer + 1) % self.dense_attention_every_n_layers == 0

    @property
    def attention_scale(self) -> float:
        return self.mup_attn_multiplier / self.head_dim if self.mup_use_scaling else 1 / math.sqrt(self.head_dim)

    def num_parameters(self) -> int:
        d, i, v, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        qkv = (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim
        per_layer = (d + 1) * qkv + (d + 1) * d + (d + 1) * 2 * i + (i + 1) * d + 4 * d
        return v * d * (1 if self.tie_word_embeddings else 2) + L * per_layer + 2 * d

    @classmethod
    def from_hf_dict(cls, cfg: dict, source: str = "config.json") -> "Phi3SmallConfig":
        if not isinstance(cfg, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
        if cfg.get("hidden_act", "gegelu") != "gegelu":
            raise ConfigError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported for phi3small (only 'gegelu')")
        if cfg.get("ff_intermediate_size") is None:
            raise ConfigError(f"{source}: missing required field 'ff_intermediate_size'")
        if cfg.get("rope_position_scale", 1.0) != 1.0:
            raise ConfigError(f"{source}: rope_position_scale={cfg['rope_position_scale']!r} is not supported (only 1.0)")
        shim = dict(cfg, model_type="phi3", hidden_act="silu", intermediate_size=cfg["ff_intermediate_size"],
                    rope_theta=cfg.get("rope_embedding_base", 1e6), rms_norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
                    tie_word_embeddings=cfg.get("tie_word_embeddings", True))
        shim.pop("head_dim", None)
        fields_ = base_fields(shim, source)
        fields_.update(model_type="phi3small", hidden_act="gegelu", raw=dict(cfg))

        def number(key, default, positive=True, allow_none=False):
            value = cfg.get(key, default)
            if value is None and allow_none:
                return None
            if not isinstance(value, (int, float)) or isinstance(value, bool) or (positive and value <= 0):
                raise ConfigError(f"{source}: field {key!r} must be a positive number, got {value!r}")
            return value

        extra = dict(
            gegelu_limit=float(number("gegelu_limit", 20.0)),
            blocksparse_block_size=int(number("blocksparse_block_size", 64)),
            blocksparse_num_local_blocks=int(number("blocksparse_num_local_blocks", 16)),
            blocksparse_vert_stride=int(number("blocksparse_vert_stride", 8)),
            blocksparse_homo_head_pattern=bool(cfg.get("blocksparse_homo_head_pattern", False)),
            dense_attention_every_n_layers=int(number("dense_attention_every_n_layers", 2)),
            mup_use_scaling=bool(cfg.get("mup_use_scaling", True)),
            mup_attn_multiplier=float(number("mup_attn_multiplier", 1.0)),
            mup_embedding_multiplier=number("mup_embedding_multiplier", 10.0, positive=False, allow_none=True),
            mup_width_multiplier=number("mup_width_multiplier", 8.0, allow_none=True),
        )
        dummy = cfg.get("dummy_token_indices")
        if dummy is None:
            dummy = RELEASE_DUMMY_TOKENS if fields_["vocab_size"] == 100352 else []
        if not isinstance(dummy, list) or any(not isinstance(i, int) or not 0 <= i < fields_["vocab_size"] for i in dummy):
            raise ConfigError(f"{source}: field 'dummy_token_indices' must be a list of token ids below vocab_size")
        return cls(**fields_, **extra, dummy_token_indices=list(dummy))

    def to_hf_dict(self) -> dict:
        out = {k: v for k, v in self.raw.items() if k not in ("_name_or_path", "auto_map")}
        out.update(architectures=["Phi3SmallForCausalLM"], model_type="phi3small")
        return out


def gegelu(y: torch.Tensor, limit: float) -> torch.Tensor:
    """Interleaved GEGELU: quick_gelu(min(a, λ)) · (clip(b, ±λ) + 1), a = y[..., 0::2], b = y[..., 1::2]; ±inf kept."""
    a_gelu, a_linear = y[..., 0::2], y[..., 1::2]
    a_gelu = torch.where(torch.isinf(a_gelu), a_gelu, a_gelu.clamp(max=limit))
    a_linear = torch.where(torch.isinf(a_linear), a_linear, a_linear.clamp(-limit, limit))
    return a_gelu * torch.sigmoid(1.702 * a_gelu) * (a_linear + 1)


class GegeluMLP(nn.Module):
    def __init__(self, cfg: Phi3SmallConfig):
        super().__init__()
        self.limit = cfg.gegelu_limit
        self.up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gegelu(self.up_proj(x), self.limit))


class SmallAttention(nn.Module):
    """GQA attention over the head-major `query_key_value`: [KV groups, (G queries, 1 key, 1 value), d]."""

    def __init__(self, cfg: Phi3SmallConfig, layer: int):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.group = self.n_heads // self.n_kv
        self.dense_layer = cfg.is_dense_layer(layer)
        self.pattern = cfg.pattern
        self.scale = cfg.attention_scale
        self.query_key_value = nn.Linear(cfg.hidden_size, (self.n_heads + 2 * self.n_kv) * self.head_dim)
        self.dense = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size)

    def split_heads(self, qkv: torch.Tensor):
        b, t, _ = qkv.shape
        qkv = qkv.view(b, t, self.n_kv, self.group + 2, self.head_dim)  # [B, T, KV, G+2, d]
        q = qkv[:, :, :, :self.group].reshape(b, t, self.n_heads, self.head_dim)  # head h = g*G + j
        k, v = qkv[:, :, :, self.group], qkv[:, :, :, self.group + 1]  # [B, T, KV, d]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, d]

    def forward(self, x, cos, sin, positions, mask, cache=None, cache_start=0):
        b, t, _ = x.shape
        q, k, v = self.split_heads(self.query_key_value(x))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.dense_layer:
            if cache is not None:
                k, v = cache.update(cache_start, k, v)
            out = attention(q, k, v, mask, scale=self.scale)
        else:
            out = self.sparse_attention(q, k, v, positions, cache)
        return self.dense(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def sparse_attention(self, q, k, v, positions, cache: SparseKVCache | None):
        """A fresh sequence (each row's tokens at 0..n-1, nothing cached) goes through the block-level
        prefill kernel row by row; anything else (decode, chunked prefill) through the sparse cache."""
        fresh = cache is None or int(cache.lengths.max()) == 0
        starts_at_zero = all(_is_prefix(row) for row in positions)
        if not (fresh and starts_at_zero):
            if cache is None:  # e.g. positions not starting at 0: a throwaway cache holds this call only
                cache = SparseKVCache(q.shape[0], self.n_kv, int(positions.max()) + 1, self.head_dim,
                                      self.pattern, k.dtype, k.device)
            if cache.can_prefill_chunk(q, positions):  # a long prompt's later chunks
                return cache.prefill_chunk(q, k, v, positions, self.scale)
            return cache.attend(q, k, v, positions, self.scale)
        out = torch.zeros_like(q)
        for r, row in enumerate(positions):
            valid = torch.nonzero(row >= 0).flatten()
            if valid.numel():
                lo = int(valid[0])
                out[r:r + 1, :, lo:] = blocksparse_prefill(q[r:r + 1, :, lo:], k[r:r + 1, :, lo:], v[r:r + 1, :, lo:],
                                                           self.pattern, self.scale)
        if cache is not None:
            cache.write(k, v, positions)
        return out


def _is_prefix(row: torch.Tensor) -> bool:
    """Left padding (-1) then positions 0, 1, 2, ..."""
    valid = row[row >= 0]
    n = valid.numel()
    return n == 0 or (bool((row[: row.numel() - n] < 0).all()) and torch.equal(valid, torch.arange(n, device=row.device)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Phi3SmallConfig, layer: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = SmallAttention(cfg, layer)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = GegeluMLP(cfg)

    def forward(self, x, cos, sin, positions, mask, cache=None, cache_start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, mask, cache, cache_start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Phi3SmallModel(nn.Module):
    def __init__(self, cfg: Phi3SmallConfig):
        super().__init__()
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


def _rotary(cfg: Phi3SmallConfig) -> RotaryEmbedding:
    if cfg.is_longrope:  # Phi-3-small-128k: LongRoPE with the config's mscales (unverified, spec §2.1)
        from .phimoe import MscaleRotary
        rs = cfg.raw.get("rope_scaling") or {}
        cfg.short_mscale = rs.get("short_mscale", 1.0)
        cfg.long_mscale = rs.get("long_mscale", 1.0)
        return MscaleRotary(cfg)
    return RotaryEmbedding(cfg)


class Phi3SmallForCausalLM(nn.Module):
    """forward(input_ids, positions, cache, seq_len, last_only) -> fp32 logits [B, T, V], as Phi3ForCausalLM."""

    def __init__(self, cfg: Phi3SmallConfig):
        super().__init__()
        self.config = cfg
        self.model = Phi3SmallModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = _rotary(cfg)
        self.register_buffer("dummy_tokens", torch.tensor(cfg.dummy_token_indices, dtype=torch.long), persistent=False)

    def reset_buffers(self) -> None:
        self.rotary = _rotary(self.config)
        self.dummy_tokens = torch.tensor(self.config.dummy_token_indices, dtype=torch.long)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.final_layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.final_layernorm.weight.device

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None) -> "SmallCache":
        return SmallCache(self, batch, max_len, dtype, device)

    def forward(self, input_ids, positions=None, cache=None, seq_len=None, last_only=False):
        cfg = self.config
        t = input_ids.shape[1]
        positions, seq_len, start, k_pos = step_positions(input_ids, positions, seq_len, cache)
        x = self.model.embed_tokens(input_ids).to(self.dtype)  # a table may be stored narrower
        if cfg.mup_embedding_multiplier is not None and cfg.mup_embedding_multiplier > 0:
            x = x * cfg.mup_embedding_multiplier
        cos, sin = self.rotary(positions.clamp(min=0), seq_len, x.dtype)
        mask = attention_mask(positions, k_pos, None)  # for the dense layers
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, positions, mask, cache.layers[i] if cache is not None else None, start)
        if cache is not None:
            cache.length = start + t
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.model.final_layernorm(x)).float()
        if cfg.mup_width_multiplier:
            logits = logits / cfg.mup_width_multiplier
        if self.dummy_tokens.numel():
            logits[..., self.dummy_tokens] = torch.finfo(torch.float32).min
        return logits


class SmallCache(Cache):
    """Per layer: a full `KVCache` for dense layers, a `SparseKVCache` (ring + vertical blocks) for sparse ones."""

    @staticmethod
    def default_dtype(model: nn.Module) -> torch.dtype:
        return model.dtype

    @staticmethod
    def layer_cache(cfg: Phi3SmallConfig, layer: int, batch: int, max_len: int, dtype, device) -> nn.Module:
        if cfg.is_dense_layer(layer):
            return KVCache(batch, cfg.num_key_value_heads, max_len, cfg.head_dim, dtype, device)
        return SparseKVCache(batch, cfg.num_key_value_heads, max_len, cfg.head_dim, cfg.pattern, dtype, device)

    def reset(self) -> None:
        super().reset()
        for layer in self.layers:
            if isinstance(layer, SparseKVCache):
                layer.reset()

    def nbytes(self, sparse_only: bool = False) -> int:
        total = 0
        for layer in self.layers:
            if isinstance(layer, SparseKVCache):
                total += layer.nbytes()
            elif not sparse_only:
                total += layer.k.numel() * layer.k.element_size() * 2
        return total
