"""`phi3 info` (phi3/info.py): what it says about a model, checked against what loading it gives."""

import torch

from phi3.config import ModelConfig
from phi3.info import kv_bytes_per_token
from phi3.models.phi3 import Cache, Phi3ForCausalLM

from .conftest import scaled_down


def test_kv_bytes_per_token_is_what_a_cache_allocates():
    cfg = ModelConfig.from_hf_dict(scaled_down("phi-3-medium-4k-instruct"))  # GQA: fewer KV heads than heads
    with torch.device("meta"):
        model = Phi3ForCausalLM(cfg)
    cache = Cache(model, batch=1, max_len=100, dtype=torch.float16, device="meta")
    allocated = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.k, layer.v))
    assert allocated == 100 * kv_bytes_per_token(cfg)
    assert cfg.num_key_value_heads < cfg.num_attention_heads
