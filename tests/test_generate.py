"""Sampling against transformers' logits processors, and generator behaviour (stops, context, seeds, streaming)."""

import pytest
import torch
import transformers
from transformers.generation import logits_process as lp

from phi3.checkpoint import build_model
from phi3.config import ModelConfig
from phi3.errors import Phi3Error
from phi3.generate import SamplingParams, apply_repetition_penalty, filter_logits, generate_tokens

from .conftest import scaled_down


def _finite_mask(x):
    return x > torch.finfo(x.dtype).min / 2


@pytest.mark.parametrize("top_k,top_p,min_p", [(5, 1.0, 0.0), (0, 0.8, 0.0), (0, 1.0, 0.1), (7, 0.9, 0.05)])
def test_filters_keep_the_same_tokens_as_transformers(top_k, top_p, min_p):
    logits = torch.randn(4, 50) * 3
    temperature = 0.7
    ours = filter_logits(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p))
    ref = logits.clone()
    processors = [lp.TemperatureLogitsWarper(temperature)]
    if top_k:
        processors.append(lp.TopKLogitsWarper(top_k))
    if top_p < 1:
        processors.append(lp.TopPLogitsWarper(top_p))
    if min_p:
        processors.append(lp.MinPLogitsWarper(min_p))
    for proc in processors:
        ref = proc(None, ref)
    assert torch.equal(_finite_mask(ours), torch.isfinite(ref) & _finite_mask(ref))
    kept = _finite_mask(ours)
    assert torch.allclose(ours[kept], ref[kept])


def test_repetition_penalty_matches_transformers():
    logits = torch.randn(2, 30)
    history = torch.tensor([[1, 5, 5, 7], [0, 2, 29, 3]])
    seen = torch.zeros(2, 30, dtype=torch.bool)
    seen[torch.arange(2)[:, None], history] = True
    ref = lp.RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.3), ref)


@pytest.fixture(scope="module")
def tiny():
    hf_cfg = scaled_down("phi-3-mini-4k-instruct", original=64)
    ref = transformers.Phi3ForCausalLM(transformers.Phi3Config(**hf_cfg)).eval()
    return build_model(ModelConfig.from_hf_dict(hf_cfg), ref.state_dict(), torch.float32)


def _run(model, prompts, **kw):
    stop = kw.pop("stop_ids", frozenset())
    steps = list(generate_tokens(model, prompts, SamplingParams(**kw), stop))
    return [[s[i] for s in steps] for i in range(len(prompts))]


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny):
    a = _run(tiny, [[5, 6, 7]], max_new_tokens=20, temperature=1.5, seed=1)
    b = _run(tiny, [[5, 6, 7]], max_new_tokens=20, temperature=1.5, seed=1)
    c = _run(tiny, [[5, 6, 7]], max_new_tokens=20, temperature=1.5, seed=2)
    assert a == b and a != c


def test_top_k_one_is_greedy(tiny):
    greedy = _run(tiny, [[5, 6, 7]], max_new_tokens=12)
    assert _run(tiny, [[5, 6, 7]], max_new_tokens=12, temperature=1.0, top_k=1, seed=3) == greedy


def test_stop_token_ends_only_its_row(tiny):
    free = _run(tiny, [[5, 6, 7], [9, 9]], max_new_tokens=10)
    stop = free[0][3]
    rows = _run(tiny, [[5, 6, 7], [9, 9]], max_new_tokens=10, stop_ids=frozenset({stop}))
    first_stop = free[0].index(stop)
    assert rows[0][: first_stop + 1] == free[0][: first_stop + 1]
    assert all(t is None for t in rows[0][first_stop + 1:])
    if stop not in free[1]:
        assert rows[1] == free[1][: len(rows[1])]


def test_context_limits(tiny):
    ctx = tiny.config.max_position_embeddings
    with pytest.raises(Phi3Error, match=f"prompt has {ctx} tokens but the model's context is {ctx}"):
        _run(tiny, [[1] * ctx], max_new_tokens=1)
    out = _run(tiny, [[1] * (ctx - 3)], max_new_tokens=50)
    assert len(out[0]) == 3  # clamped to the context
    with pytest.raises(Phi3Error, match="empty prompt"):
        _run(tiny, [[]], max_new_tokens=1)
    with pytest.raises(Phi3Error, match="token id 999 is outside the vocabulary"):
        _run(tiny, [[999]], max_new_tokens=1)


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("min_p", 1.5),
                                         ("max_new_tokens", 0), ("repetition_penalty", 0.0)])
def test_invalid_sampling_values_are_named(tiny, field, value):
    with pytest.raises(Phi3Error, match=f"invalid sampling parameter {field}="):
        _run(tiny, [[1, 2]], **{field: value})


def test_chunked_prefill_equals_one_call(tiny, monkeypatch):
    """Long prompts are prefilled PREFILL_CHUNK tokens at a time; the result does not change."""
    import phi3.generate as gen
    prompts = [list(range(1, 40)), list(range(50, 67))]
    whole = _run(tiny, prompts, max_new_tokens=8)
    calls = []
    forward = type(tiny).forward

    def counting(self, ids, *a, **k):
        calls.append(ids.shape[1])
        return forward(self, ids, *a, **k)

    monkeypatch.setattr(gen, "PREFILL_CHUNK", 7)
    monkeypatch.setattr(type(tiny), "forward", counting)
    assert _run(tiny, prompts, max_new_tokens=8) == whole
    assert calls[:6] == [7, 7, 7, 7, 7, 4]  # 39 prompt tokens in chunks of 7, then one token per step
