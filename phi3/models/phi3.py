"""Dense Phi-3 (`Phi3ForCausalLM`): mini, medium, 3.5-mini, 4-mini — and Llama-layout checkpoints.

Module names follow the HF checkpoint, so `state_dict()` keys are the HF tensor names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import decode_step
from ..config import ModelConfig
from ..layers import (Attention, GatedMLP, KVCache, RMSNorm, RotaryEmbedding, attention_mask, embedding,
                      kv_cache_dtype, linear_cross_entropy, step_positions)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, cache_start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Phi3Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Phi3ForCausalLM(nn.Module):
    """Decoder-only LM. `forward(input_ids, positions, cache)` -> logits [B, T, V].

    With a `Cache`, tokens are written at `cache.length`; `positions` are absolute positions per
    row (padding: -1), which drive RoPE, the causal mask and the sliding window. For packed
    training rows, `segment_ids` [B, T] stops attention across documents (positions restart at 0
    in each document).

    With `targets` [B, T] (training; -100 = ignored) it returns the summed next-token
    cross-entropy instead of logits, fused with the LM head (`linear_cross_entropy`: the
    [B, T, vocab] logits are never materialised).
    """

    fused_loss = True  # forward(..., targets=) is supported (see phi3.train.loop.lm_loss_sum)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Phi3Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        """Activation dtype (the norms' weights; embeddings and linears may be quantized)."""
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: "Cache | None" = None,
        seq_len: int | None = None,
        last_only: bool = False,
        segment_ids: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        t = input_ids.shape[1]
        # plain causal attention (SDPA's is_causal, no mask tensor): a fresh batch of rows that all
        # start at position 0, one document each, inside the sliding window
        window = self.config.sliding_window
        causal = positions is None and cache is None and segment_ids is None and (window is None or t <= window)
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed documents) is for training, without a KV cache")
        positions, seq_len, start, k_pos = step_positions(input_ids, positions, seq_len, cache)
        x = self.model.embed_tokens(input_ids).to(self.dtype)  # a table may be stored narrower
        cos, sin = self.rotary(positions.clamp(min=0), seq_len, x.dtype)
        mask = None if causal else attention_mask(positions, k_pos, window, segment_ids)
        native = cache is not None and t == 1 and (isinstance(start, int) or mask is not None)
        step = decode_step.for_cache(self, cache) if native else None
        if step is not None:  # quantized decode: all layers in one native call (one slot, or a slot per row)
            x = step(x, cos, sin, mask, start)
        else:
            for i, layer in enumerate(self.model.layers):
                x = layer(x, cos, sin, mask, cache.layers[i] if cache is not None else None, start)
        if cache is not None:
            cache.length = start + t
        if last_only:
            x = x[:, -1:]
        if targets is not None and isinstance(self.lm_head, nn.Linear):
            return linear_cross_entropy(self.model.norm(x).flatten(0, 1), self.lm_head.weight, targets.flatten())
        logits = self.lm_head(self.model.norm(x))
        if targets is not None:
            return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        return logits


class Cache(nn.Module):
    """All layers' KV caches plus the absolute position held in each slot (-1 = empty / padding)."""

    def __init__(self, model: Phi3ForCausalLM, batch: int, max_len: int, dtype=None, device=None):
        super().__init__()
        cfg = model.config
        dtype = dtype or self.default_dtype(model)
        self.max_len = max_len
        self.layers = nn.ModuleList(self.layer_cache(cfg, i, batch, max_len, dtype, device)
                                    for i in range(cfg.num_hidden_layers))
        self.register_buffer("positions", torch.full((batch, max_len), -1, dtype=torch.long, device=device),
                             persistent=False)
        self.length = 0

    @staticmethod
    def default_dtype(model: nn.Module) -> torch.dtype:
        return kv_cache_dtype(model)

    @staticmethod
    def layer_cache(cfg: ModelConfig, layer: int, batch: int, max_len: int, dtype, device) -> nn.Module:
        """The cache of one layer (a model family with other kinds of layers overrides this)."""
        return KVCache(batch, cfg.num_key_value_heads, max_len, cfg.head_dim, dtype, device)

    def record_positions(self, positions: torch.Tensor) -> torch.Tensor:
        end = self.length + positions.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > max_len {self.max_len}")
        self.positions[:, self.length:end] = positions
        return self.positions[:, :end]

    def reset(self) -> None:
        self.length = 0
        self.positions.fill_(-1)

    def _plain_layers(self) -> bool:
        """Whether every layer is a plain `KVCache` (slot i holds token i, so it can go back or be copied)."""
        return all(type(layer) is KVCache for layer in self.layers)

    def truncate(self, length: int) -> bool:
        """Keep slots 0 .. length-1 and forget the rest (a prompt cache going back to the prefix a new
        prompt shares; the forgotten slots are overwritten as the sequence goes on). False, changing
        nothing, where a layer cannot go back: phi-3-small's ring of recent keys has moved on."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        if length < self.length and not self._plain_layers():
            return False
        self.length = length
        self.positions[:, length:] = -1
        return True

    def resized(self, model: Phi3ForCausalLM, max_len: int) -> "Cache | None":
        """A cache of `max_len` slots (at least `length`) holding this one's tokens, or None where a layer
        is not a plain `KVCache`."""
        if not self._plain_layers() or max_len < self.length:
            return None
        first = self.layers[0].k
        new = type(self)(model, first.shape[0], max_len, first.dtype, first.device)
        n = self.length
        for old_layer, new_layer in zip(self.layers, new.layers):
            new_layer.k[:, :, :n] = old_layer.k[:, :, :n]
            new_layer.v[:, :, :n] = old_layer.v[:, :, :n]
        new.positions[:, :n] = self.positions[:, :n]
        new.length = n
        return new
