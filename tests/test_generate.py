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


# ---- a conversation's KV cache kept between calls (PromptCache) ---------------------------------------
def _cached_run(model, prompt, cache, **kw):
    """(tokens, lengths of the forward calls) of one generation through `cache`."""
    calls = []
    forward = type(model).forward

    def counting(self, ids, *a, **k):
        calls.append(ids.shape[1])
        return forward(self, ids, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(model), "forward", counting)
        steps = list(generate_tokens(model, [prompt], SamplingParams(**kw), frozenset(), 0, cache))
    return [s[0] for s in steps], calls


@pytest.mark.parametrize("slots", [1024, 8])  # 8: the cache grows (copied into a bigger one) as turns add tokens
def test_prompt_cache_prefills_only_what_is_new_and_changes_no_token(tiny, slots, monkeypatch):
    """Turn 2's prompt is turn 1's prompt + reply + a new message (a chat): only the reply's last token
    (never fed back) and the new message are prefilled, and every token is what a fresh run gives, here
    past the scaled-down 4K model's sliding window (31) too. A prompt that shares only a prefix
    goes back to it."""
    from phi3.generate import PromptCache

    monkeypatch.setattr(PromptCache, "SLOTS", slots)
    cache = PromptCache()
    first = list(range(3, 15))
    out1, calls1 = _cached_run(tiny, first, cache, max_new_tokens=6)
    assert out1 == _run(tiny, [first], max_new_tokens=6)[0] and calls1 == [12] + [1] * 5
    assert cache.tokens == first + out1[:-1]
    second = first + out1 + list(range(40, 50))
    out2, calls2 = _cached_run(tiny, second, cache, max_new_tokens=20)
    assert calls2 == [11] + [1] * 19  # out1[-1] and the 10 new tokens
    assert out2 == _run(tiny, [second], max_new_tokens=20)[0]
    assert len(second) + 20 > tiny.config.sliding_window and cache.cache.max_len >= len(second) + 20
    third = first[:5] + [99, 98, 97]  # a different conversation with the same start
    out3, calls3 = _cached_run(tiny, third, cache, max_new_tokens=4)
    assert calls3 == [3, 1, 1, 1] and out3 == _run(tiny, [third], max_new_tokens=4)[0]
    again, calls = _cached_run(tiny, third, cache, max_new_tokens=4)  # the same prompt: its last token re-run
    assert calls == [1, 1, 1, 1] and again == out3


def test_prompt_cache_keeps_what_the_caller_read_and_nothing_after_an_error(tiny):
    from phi3.generate import PromptCache

    cache = PromptCache()
    prompt = list(range(3, 13))
    steps = generate_tokens(tiny, [prompt], SamplingParams(max_new_tokens=10), frozenset(), 0, cache)
    got = [next(steps)[0] for _ in range(3)]
    steps.close()  # a stop string ends the reply early
    assert cache.tokens == prompt + got[:2]  # the third token was never fed back
    with pytest.raises(Phi3Error, match="token id 999"):  # rejected before the cache is touched
        list(generate_tokens(tiny, [prompt + [999]], SamplingParams(max_new_tokens=2), frozenset(), 0, cache))
    assert cache.tokens == prompt + got[:2]
    forward = type(tiny).forward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(tiny), "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory")))
        with pytest.raises(RuntimeError):
            list(generate_tokens(tiny, [prompt + got], SamplingParams(max_new_tokens=2), frozenset(), 0, cache))
    assert cache.tokens == [] and type(tiny).forward is forward  # a failed forward call: nothing is trusted
    out, calls = _cached_run(tiny, prompt, cache, max_new_tokens=3)
    assert calls[0] == len(prompt) and out == _run(tiny, [prompt], max_new_tokens=3)[0]
    with pytest.raises(ValueError, match="one sequence"):
        list(generate_tokens(tiny, [prompt, prompt], SamplingParams(max_new_tokens=2), frozenset(), 0, cache))


def test_prompt_cache_follows_the_longrope_switch():
    """Keys cached under the short factors are not reused for a prompt past L0 (a fresh run computes
    it under the long ones); once the cache itself has passed L0 it is reused there."""
    from phi3.generate import PromptCache

    hf_cfg = scaled_down("phi-3-mini-128k-instruct")  # L0 = 32
    model = build_model(ModelConfig.from_hf_dict(hf_cfg),
                        transformers.Phi3ForCausalLM(transformers.Phi3Config(**hf_cfg)).state_dict(), torch.float32)
    cache = PromptCache()
    first = list(range(3, 23))  # 20 tokens + 8 new: short factors throughout
    out1, _ = _cached_run(model, first, cache, max_new_tokens=8)
    assert not cache.long_factors
    second = first + out1 + list(range(40, 50))  # 38 tokens > L0
    out2, calls2 = _cached_run(model, second, cache, max_new_tokens=6)
    assert calls2[0] == len(second) and cache.long_factors  # all recomputed under the long factors
    assert out2 == _run(model, [second], max_new_tokens=6)[0]
    third = second + out2 + [60, 61]
    out3, calls3 = _cached_run(model, third, cache, max_new_tokens=4)
    assert calls3[0] == 3 and out3 == _run(model, [third], max_new_tokens=4)[0]


def test_phi3_small_prompt_cache_goes_back_only_where_its_ring_allows():
    """Phi-3-small's sparse layers keep a ring of recent keys, which cannot go back: a prompt that
    continues every cached token reuses the cache, one that diverges starts afresh; the same tokens."""
    from phi3.generate import PromptCache

    from .models.test_phi3small import make

    _, _, model = make()
    cache = PromptCache()
    first = torch.randint(8, 120, (20,)).tolist()
    out1, _ = _cached_run(model, first, cache, max_new_tokens=5)
    assert out1 == _run(model, [first], max_new_tokens=5)[0]
    second = first + out1[:-1] + [9, 10]  # continues every cached token
    out2, calls2 = _cached_run(model, second, cache, max_new_tokens=5)
    assert calls2[0] == 2 and out2 == _run(model, [second], max_new_tokens=5)[0]
    third = first[:10] + [11, 12]  # goes back: not possible through the ring
    out3, calls3 = _cached_run(model, third, cache, max_new_tokens=5)
    assert calls3[0] == len(third) and out3 == _run(model, [third], max_new_tokens=5)[0]
