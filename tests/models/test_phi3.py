"""Dense Phi-3: shapes and cache behaviour, and logit/generation parity with transformers on random weights."""

import pytest
import torch
import transformers

from phi3.checkpoint import build_model
from phi3.config import ModelConfig, list_presets, load_preset
from phi3.generate import SamplingParams, generate_tokens
from phi3.models.phi3 import Cache

from ..conftest import scaled_down

PRESETS = ["phi-3-mini-4k-instruct", "phi-3-mini-128k-instruct", "phi-3-medium-4k-instruct",
           "phi-3-medium-128k-instruct", "phi-3.5-mini-instruct", "phi-4-mini-instruct"]


def make_pair(preset: str, **kw):
    """(transformers reference, our model) with the same random weights."""
    hf_cfg = scaled_down(preset, **kw)
    ref = transformers.Phi3ForCausalLM(transformers.Phi3Config(**hf_cfg)).eval()
    ours = build_model(ModelConfig.from_hf_dict(hf_cfg), ref.state_dict(), torch.float32)
    return ref, ours


# Every released text checkpoint with a preset. Phi-3-small-128k-instruct is missing on purpose: no
# trustworthy copy of its config.json (LongRoPE factors, mscales) was found (presets/SOURCES.md).
ALL_PRESETS = PRESETS + ["phi-3-small-8k-instruct", "phi-3.5-moe-instruct"]


def test_every_preset_loads_with_one_factor_per_rotary_pair():
    assert set(ALL_PRESETS) == set(list_presets())
    for name in ALL_PRESETS:
        cfg = load_preset(name)
        if cfg.rope_scaling is not None:
            for key in ("short_factor", "long_factor"):
                assert len(cfg.rope_scaling[key]) == cfg.rotary_dim // 2, (name, key)


def test_every_released_preset_is_present_and_valid():
    assert set(PRESETS) <= set(list_presets())
    mini = load_preset("phi-3-mini-4k-instruct")
    assert (mini.hidden_size, mini.num_hidden_layers, mini.head_dim, mini.sliding_window) == (3072, 32, 96, 2047)
    assert abs(mini.num_parameters() / 1e9 - 3.82) < 0.01
    four = load_preset("phi-4-mini-instruct")
    assert four.rotary_dim == 96 and four.tie_word_embeddings and four.num_key_value_heads == 8
    medium = load_preset("phi-3-medium-128k-instruct")
    assert medium.is_longrope and len(medium.rope_scaling["long_factor"]) == 64
    assert abs(medium.num_parameters() / 1e9 - 13.96) < 0.01


@pytest.mark.parametrize("preset", PRESETS)
def test_logits_match_transformers(preset):
    ref, ours = make_pair(preset)
    cfg = ours.config
    l0 = cfg.original_max_position_embeddings
    lengths = [5, l0, l0 + 1, 2 * l0 + 7]  # short, at L0, just past the LongRoPE switch, well past it
    if cfg.sliding_window:
        lengths.append(cfg.max_position_embeddings)  # the whole context, twice the sliding window
    for t in lengths:
        ids = torch.randint(0, cfg.vocab_size, (2, t))
        with torch.no_grad():
            expected = ref(ids).logits
            got = ours(ids)
        diff = (expected - got).abs().max().item()
        assert diff < 1e-4, f"{preset}: T={t} max |Δlogit| = {diff}"


def test_long_factors_change_the_result_past_the_switch():
    _, ours = make_pair("phi-3-mini-128k-instruct")
    l0 = ours.config.original_max_position_embeddings
    ids = torch.randint(0, 100, (1, l0 + 1))
    with torch.no_grad():
        short = ours(ids[:, :l0])
        long = ours(ids)[:, :l0]  # same tokens, but this call uses the long factors
    assert (short - long).abs().max() > 1e-3


def test_sliding_window_masks_exactly_w_keys():
    """With one layer, the last query sees exactly the W most recent tokens (itself included), as HF."""
    hf_cfg = scaled_down("phi-3-mini-4k-instruct", layers=1)
    ref = transformers.Phi3ForCausalLM(transformers.Phi3Config(**hf_cfg)).eval()
    ours = build_model(ModelConfig.from_hf_dict(hf_cfg), ref.state_dict(), torch.float32)
    w = ours.config.sliding_window
    ids = torch.randint(0, 100, (1, w + 5))
    first_visible = ids.shape[1] - w

    def last_logits_after_changing(pos):
        changed = ids.clone()
        changed[0, pos] = (changed[0, pos] + 1) % 100
        with torch.no_grad():
            return ours(changed)[0, -1], ref(changed).logits[0, -1]

    with torch.no_grad():
        base = ours(ids)[0, -1]
    outside, outside_ref = last_logits_after_changing(first_visible - 1)
    inside, inside_ref = last_logits_after_changing(first_visible)
    assert torch.equal(outside, base), "a token W positions back must be invisible"
    assert not torch.allclose(inside, base), "the oldest token inside the window must be visible"
    assert (outside - outside_ref).abs().max() < 1e-4 and (inside - inside_ref).abs().max() < 1e-4


@pytest.mark.parametrize("preset", ["phi-3-mini-4k-instruct", "phi-3-medium-128k-instruct", "phi-4-mini-instruct"])
def test_incremental_decode_matches_full_forward(preset):
    _, ours = make_pair(preset)
    cfg = ours.config
    t = min(cfg.original_max_position_embeddings, cfg.max_position_embeddings)  # stay on one factor set
    ids = torch.randint(0, cfg.vocab_size, (2, t))
    with torch.no_grad():
        full = ours(ids)
        cache = Cache(ours, batch=2, max_len=t)
        pos = torch.arange(t).expand(2, t)
        parts = [ours(ids[:, :7], pos[:, :7], cache)]
        for i in range(7, t):
            parts.append(ours(ids[:, i:i + 1], pos[:, i:i + 1], cache))
    assert cache.length == t
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-4


def test_shapes_and_cache_overflow():
    _, ours = make_pair("phi-3-medium-4k-instruct")
    cache = Cache(ours, batch=3, max_len=8)
    assert cache.layers[0].k.shape == (3, ours.config.num_key_value_heads, 8, ours.config.head_dim)
    out = ours(torch.zeros(3, 5, dtype=torch.long), torch.arange(5).expand(3, 5), cache)
    assert out.shape == (3, 5, ours.config.vocab_size)
    with pytest.raises(ValueError, match="overflow"):
        ours(torch.zeros(3, 4, dtype=torch.long), torch.arange(5, 9).expand(3, 4), cache)


def _hf_greedy(ref, prompts, new_tokens):
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    out = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, longest:].tolist()


@pytest.mark.parametrize("preset", ["phi-3-mini-128k-instruct", "phi-3-medium-4k-instruct", "phi-4-mini-instruct"])
def test_greedy_generation_matches_transformers(preset):
    # Two prompts of 18 and 9 tokens; 32 new tokens cross the LongRoPE switch at L0 = 24 (128K presets)
    # or the sliding window of 31 in a context of 64 (4K presets).
    ref, ours = make_pair(preset, original=24 if "4k" not in preset else 64)
    prompts = [torch.randint(3, 160, (18,)).tolist(), torch.randint(3, 160, (9,)).tolist()]
    expected = _hf_greedy(ref, prompts, 32)
    steps = list(generate_tokens(ours, prompts, SamplingParams(max_new_tokens=32)))
    got = [[s[i] for s in steps] for i in range(2)]
    assert got == expected
    # Each row alone (no padding) gives the same tokens as in the batch — except a shorter row of a
    # LongRoPE model, whose factor switch follows the batch's longest row (transformers' rule).
    rows = [0] if ours.config.is_longrope else [0, 1]
    for i in rows:
        p = prompts[i]
        alone = [s[0] for s in generate_tokens(ours, [p], SamplingParams(max_new_tokens=32))]
        assert alone == expected[i]
