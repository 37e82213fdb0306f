"""Scale-up init (phi-2 from phi-1.5): a deeper and/or wider model from a smaller checkpoint.

Depth: new layer i copies old layer `layer_map[i]` (default: each old layer repeated in order).
Width: the hidden size, the head counts (head_dim fixed) and the MLP size may grow by integer
factors k (hidden) and m (intermediate). Weights are tiled: every output feature is repeated,
and input features are tiled and divided by the factor, so the residual stream of the wide model
is k copies of the small one's and — for untied embeddings and an unchanged depth — the wide model
computes exactly the small model's logits. Training then breaks the symmetry.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..errors import ConfigError
from ..models.phi3 import Phi3ForCausalLM


def _factor(new: int, old: int, name: str) -> int:
    if new < old or new % old:
        raise ConfigError(f"model.scale_up: {name} {new} is not a multiple of the source's {old}")
    return new // old


def default_layer_map(old: int, new: int) -> list[int]:
    return [i * old // new for i in range(new)]


def tile_in(w: torch.Tensor, k: int) -> torch.Tensor:
    """Input features repeated k times, divided by k: W' [x, x, ...] == W x."""
    return torch.cat([w] * k, dim=1) / k


def tile_out(w: torch.Tensor, k: int) -> torch.Tensor:
    return torch.cat([w] * k, dim=0)


def scale_up(src: Phi3ForCausalLM, cfg: ModelConfig, layer_map: list[int] | None = None) -> Phi3ForCausalLM:
    old = src.config
    if cfg.vocab_size != old.vocab_size or cfg.head_dim != old.head_dim:
        raise ConfigError("model.scale_up: vocab_size and head_dim must stay those of the source "
                          f"({old.vocab_size}, {old.head_dim}), got ({cfg.vocab_size}, {cfg.head_dim})")
    k = _factor(cfg.hidden_size, old.hidden_size, "hidden_size")
    m = _factor(cfg.intermediate_size, old.intermediate_size, "intermediate_size")
    if cfg.num_attention_heads != k * old.num_attention_heads or cfg.num_key_value_heads != k * old.num_key_value_heads:
        raise ConfigError(f"model.scale_up: with hidden_size x{k} the head counts must grow x{k} too "
                          f"({k * old.num_attention_heads} heads, {k * old.num_key_value_heads} KV heads)")
    layer_map = layer_map or default_layer_map(old.num_hidden_layers, cfg.num_hidden_layers)
    if len(layer_map) != cfg.num_hidden_layers or not all(0 <= i < old.num_hidden_layers for i in layer_map):
        raise ConfigError(f"model.scale_up.layer_map: needs {cfg.num_hidden_layers} entries in "
                          f"0..{old.num_hidden_layers - 1}, got {layer_map}")
    sd = src.state_dict()
    q, kv = old.num_attention_heads * old.head_dim, old.num_key_value_heads * old.head_dim
    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.cat([sd["model.embed_tokens.weight"]] * k, dim=1),
        "model.norm.weight": sd["model.norm.weight"].repeat(k),
        "lm_head.weight": tile_in(sd["lm_head.weight"], k),
    }
    for i, j in enumerate(layer_map):
        s, d = f"model.layers.{j}.", f"model.layers.{i}."
        wq, wk, wv = sd[s + "self_attn.qkv_proj.weight"].split([q, kv, kv])
        out[d + "self_attn.qkv_proj.weight"] = torch.cat([tile_in(tile_out(w, k), k) for w in (wq, wk, wv)])
        out[d + "self_attn.o_proj.weight"] = tile_in(tile_out(sd[s + "self_attn.o_proj.weight"], k), k)
        gate, up = sd[s + "mlp.gate_up_proj.weight"].chunk(2)
        out[d + "mlp.gate_up_proj.weight"] = torch.cat([tile_in(tile_out(w, m), k) for w in (gate, up)])
        out[d + "mlp.down_proj.weight"] = tile_in(tile_out(sd[s + "mlp.down_proj.weight"], k), m)
        for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            out[d + norm] = sd[s + norm].repeat(k)
    model = Phi3ForCausalLM(cfg)
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight")
    model.load_state_dict(out, strict=not cfg.tie_word_embeddings)
    return model
