"""Phi-3.5-MoE (`PhimoeForCausalLM`, spec §3): 16 experts, top-2 SparseMixer routing, LayerNorm with bias.

Module names follow the on-disk checkpoint (`block_sparse_moe.gate`, `block_sparse_moe.experts.{e}.w1/w2/w3`),
so `state_dict()` keys are the original tensor names. Experts are plain `nn.Linear`s, so
`phi3.quant.quantize_model` quantizes them like any other linear; the router stays in full precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, base_fields, longrope_attention_factor
from ..errors import ConfigError
from ..layers import (KVCache, RotaryEmbedding, apply_rotary, attention, attention_mask, embedding,
                      step_positions)


@dataclass
class PhiMoEConfig(ModelConfig):
    num_local_experts: int = 16
    num_experts_per_tok: int = 2
    router_jitter_noise: float = 0.01  # SparseMixer's relative threshold ε (not noise at inference)
    attention_bias: bool = True
    lm_head_bias: bool = True
    short_mscale: float = 1.0
    long_mscale: float = 1.0

    @property
    def layout(self) -> str:
        return "phimoe"

    def num_parameters(self) -> int:
        d, i, v, e = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_local_experts
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attn = d * (q + 2 * kv) + q * d + (q + 2 * kv + d) * self.attention_bias
        per_layer = attn + e * 3 * d * i + e * d + 4 * d
        head = 0 if self.tie_word_embeddings else v * d + v * self.lm_head_bias
        return v * d + head + self.num_hidden_layers * per_layer + 2 * d

    def active_parameters(self) -> int:
        """Parameters used per token: the router's top-2 experts instead of all of them."""
        unused = (self.num_local_experts - self.num_experts_per_tok) * 3 * self.hidden_size * self.intermediate_size
        return self.num_parameters() - self.num_hidden_layers * unused

    @classmethod
    def from_hf_dict(cls, cfg: dict, source: str = "config.json") -> "PhiMoEConfig":
        if not isinstance(cfg, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported for phimoe (only 'silu')")
        experts, top_k = cfg.get("num_local_experts", 16), cfg.get("num_experts_per_tok", 2)
        if not isinstance(experts, int) or isinstance(experts, bool) or experts < 2:
            raise ConfigError(f"{source}: field 'num_local_experts' must be an integer >= 2, got {experts!r}")
        if top_k != 2:
            raise ConfigError(f"{source}: field 'num_experts_per_tok' must be 2 (SparseMixer routing is top-2), got {top_k!r}")
        eps = cfg.get("router_jitter_noise", 0.01)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
            raise ConfigError(f"{source}: field 'router_jitter_noise' must be a number >= 0, got {eps!r}")
        # The shared fields, parsed by the dense parser; HF's PhimoeConfig defaults rope_theta to 1e6.
        shim = dict(cfg, model_type="phi3", attention_bias=False, mlp_bias=False, rope_theta=cfg.get("rope_theta", 1e6))
        fields = base_fields(shim, source)
        fields.update(model_type="phimoe", raw=dict(cfg))
        self = cls(**fields, num_local_experts=experts, num_experts_per_tok=2, router_jitter_noise=float(eps),
                   attention_bias=bool(cfg.get("attention_bias", False)), lm_head_bias=bool(cfg.get("lm_head_bias", False)))
        # LongRoPE magnitude: the config's short/long mscale when given (1.2431... on the release), else §1.4's.
        rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        default = longrope_attention_factor(self) if self.is_longrope else 1.0
        for key in ("short_mscale", "long_mscale"):
            value = rs.get(key, default) if isinstance(rs, dict) else default
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{source}: rope_scaling.{key} must be a positive number, got {value!r}")
            setattr(self, key, float(value))
        return self

    def to_hf_dict(self) -> dict:
        out = {k: v for k, v in self.raw.items() if k not in ("_name_or_path", "auto_map")}
        out.update(architectures=["PhimoeForCausalLM"], model_type="phimoe")
        return out


class MscaleRotary(RotaryEmbedding):
    """LongRoPE whose magnitude is the config's `long_mscale` past L0 and `short_mscale` up to it (spec §3.2)."""

    def __init__(self, cfg: PhiMoEConfig):
        super().__init__(cfg)
        self.short_mscale, self.long_mscale = cfg.short_mscale, cfg.long_mscale

    def forward(self, positions, seq_len, dtype):
        self.mscale = self.long_mscale if self.uses_long_factors(seq_len) else self.short_mscale
        return super().forward(positions, seq_len, dtype)


class MoEAttention(nn.Module):
    """Llama-style GQA attention with separate, biased q/k/v/o projections."""

    def __init__(self, cfg: PhiMoEConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, cache_start: int = 0):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, d]
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # [B, KV, T, d]
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # [B, KV, T, d]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(cache_start, k, v)  # [B, KV, S, d]
        out = attention(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


def sparsemixer_top2(scores: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseMixer inference routing (spec §3.3). scores [N, E] -> weights [N, 2], experts [N, 2].

    Each round keeps the experts whose logit is within a relative gap 2ε of that round's maximum,
    and weights the round's winner by its softmax over the kept ones. No renormalisation.
    """

    def one_round(masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top, index = masked.max(dim=-1, keepdim=True)  # [N, 1]
        gap = (top - scores) / scores.abs().clamp(min=top)  # denominator: max(|s_j|, top), original scores
        gates = masked.masked_fill(gap > 2 * eps, float("-inf")).softmax(dim=-1)
        return gates.gather(-1, index), index

    w1, e1 = one_round(scores)
    w2, e2 = one_round(scores.scatter(-1, e1, float("-inf")))
    return torch.cat((w1, w2), dim=-1), torch.cat((e1, e2), dim=-1)


class Expert(nn.Module):
    """w2(silu(w1 x) ⊙ w3 x), no biases."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, intermediate, bias=False)
        self.w2 = nn.Linear(intermediate, hidden, bias=False)
        self.w3 = nn.Linear(hidden, intermediate, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Router(nn.Module):
    """The gate: a bias-free linear to one logit per expert. Not an nn.Linear on purpose, so
    quantization leaves it (and so the routing decisions) in full precision."""

    def __init__(self, hidden: int, experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class SparseMoE(nn.Module):
    def __init__(self, cfg: PhiMoEConfig):
        super().__init__()
        self.eps = cfg.router_jitter_noise
        self.gate = Router(cfg.hidden_size, cfg.num_local_experts)
        self.experts = nn.ModuleList(Expert(cfg.hidden_size, cfg.intermediate_size) for _ in range(cfg.num_local_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        weights, chosen = sparsemixer_top2(self.gate(x), self.eps)  # [N, 2] each
        return dispatch_grouped(x, weights, chosen, self.experts).view(shape)


def dispatch_grouped(x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor:
    """Σ_k weights[n, k] · experts[chosen[n, k]](x[n]), one batched call per expert that has tokens.

    The N·2 (token, slot) pairs are sorted by expert, so each expert sees all its tokens at once.
    """
    flat = chosen.flatten()  # [N*2]
    order = flat.argsort(stable=True)  # pair indices grouped by expert
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start:start + n]
        start += n
        tokens = pairs // 2  # [n]
        y = experts[e](x[tokens]) * weights.flatten()[pairs, None].to(x.dtype)  # [n, D]
        out.index_add_(0, tokens, y)
    return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: PhiMoEConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = MoEAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.block_sparse_moe = SparseMoE(cfg)

    def forward(self, x, cos, sin, mask, cache=None, cache_start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_start)
        return x + self.block_sparse_moe(self.post_attention_layernorm(x))


class PhiMoEModel(nn.Module):
    def __init__(self, cfg: PhiMoEConfig):
        super().__init__()
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class PhiMoEForCausalLM(nn.Module):
    """Same calling convention as `Phi3ForCausalLM` (and the same `Cache`): forward(ids, positions, cache)."""

    def __init__(self, cfg: PhiMoEConfig):
        super().__init__()
        self.config = cfg
        self.model = PhiMoEModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        self.rotary = MscaleRotary(cfg)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_buffers(self) -> None:
        """Rebuild the non-persistent buffers (after building on the meta device)."""
        self.rotary = MscaleRotary(self.config)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def forward(self, input_ids, positions=None, cache=None, seq_len=None, last_only=False):
        t = input_ids.shape[1]
        positions, seq_len, start, k_pos = step_positions(input_ids, positions, seq_len, cache)
        x = self.model.embed_tokens(input_ids).to(self.dtype)  # a table may be stored narrower
        cos, sin = self.rotary(positions.clamp(min=0), seq_len, x.dtype)
        mask = attention_mask(positions, k_pos, self.config.sliding_window)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache.layers[i] if cache is not None else None, start)
        if cache is not None:
            cache.length = start + t
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))
