"""Continuous batching against the generator run alone: same tokens, joins mid-flight, leaves at once.

The reference for every request is `phi3.generate.generate_tokens` on that request alone (batch
of one, the path the CLI uses), so any slot bookkeeping error (a wrong write column, a stale key
visible after compaction, a LongRoPE factor chosen for the wrong row) changes the tokens.
"""

import pytest
import torch
import transformers

from phi3.api import LanguageModel
from phi3.checkpoint import build_model
from phi3.config import ModelConfig
from phi3.generate import SamplingParams, generate_tokens
from phi3.serve.engine import Engine, QueueFull, Request
from phi3.tokenizer import Tokenizer

from ..conftest import SHARED, scaled_down

VOCAB = 32064  # the Phi-3 tokenizer's


@pytest.fixture(scope="module")
def phi3_tok():
    return Tokenizer.from_gguf(SHARED / "tokenizer" / "ggml-vocab-phi-3.gguf")


def _lm(preset, tok, **kw) -> LanguageModel:
    hf = scaled_down(preset, vocab=VOCAB, **kw)
    ref = transformers.Phi3ForCausalLM(transformers.Phi3Config(**hf)).eval()
    return LanguageModel(build_model(ModelConfig.from_hf_dict(hf), ref.state_dict(), torch.float32), tok, preset)


@pytest.fixture(scope="module")
def lm4k(phi3_tok):
    return _lm("phi-3-mini-4k-instruct", phi3_tok, original=64)


@pytest.fixture(scope="module")
def lm128k(phi3_tok):
    return _lm("phi-3-mini-128k-instruct", phi3_tok, original=32)  # L0 = 32: the switch comes early


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(100, 30000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _alone(lm, prompt, params) -> list[int]:
    stop = lm.tokenizer.stop_token_ids
    return [t for (t,) in generate_tokens(lm.model, [prompt], params, stop, 0)]


def _req(prompt, params, events=None):
    return Request(prompt, params, (events if events is not None else []).append)


def _run(engine, max_steps=500):
    for _ in range(max_steps):
        if not engine.active and not engine.waiting:
            return
        engine.step()
    raise AssertionError("engine did not finish")


def test_concurrent_greedy_requests_equal_each_alone(lm4k):
    prompts = [_prompt(i, n) for i, n in enumerate([5, 17, 9, 30, 2, 11])]
    params = [SamplingParams(max_new_tokens=m) for m in [12, 25, 3, 18, 30, 7]]
    engine = Engine(lm4k, slots=4, slot_len=128)
    reqs = [_req(p, q) for p, q in zip(prompts, params)]
    for r in reqs:
        engine.submit(r)
    widest = 0
    while engine.active or engine.waiting:
        engine.step()
        widest = max(widest, len(engine.active))
    assert widest == 4  # four slots decoded together, two requests waited for a free slot
    for r, p, q in zip(reqs, prompts, params):
        assert r.output_ids == _alone(lm4k, p, q)


def test_seeded_sampling_equals_the_generator_alone(lm4k):
    prompts = [_prompt(10 + i, 6 + i) for i in range(3)]
    params = [SamplingParams(max_new_tokens=15, temperature=1.3, top_p=0.9, seed=s) for s in (1, 2, 3)]
    engine = Engine(lm4k, slots=3, slot_len=64)
    reqs = [_req(p, q) for p, q in zip(prompts, params)]
    for r in reqs:
        engine.submit(r)
    _run(engine)
    outs = [r.output_ids for r in reqs]
    assert outs == [_alone(lm4k, p, q) for p, q in zip(prompts, params)]
    assert len({tuple(o) for o in outs}) == 3


def test_a_request_joining_mid_flight(lm4k):
    first, second = _prompt(20, 8), _prompt(21, 13)
    params = SamplingParams(max_new_tokens=20)
    engine = Engine(lm4k, slots=2, slot_len=64)
    a, b = _req(first, params), _req(second, params)
    engine.submit(a)
    for _ in range(6):
        engine.step()
    assert len(a.output_ids) == 7 and engine.stats()["active"] == 1
    engine.submit(b)
    engine.step()
    assert engine.stats()["active"] == 2 and len(b.output_ids) == 2  # prefill token + one decode step
    _run(engine)
    assert a.output_ids == _alone(lm4k, first, params)
    assert b.output_ids == _alone(lm4k, second, params)


def test_finished_and_cancelled_sequences_leave_at_once_and_rows_compact(lm4k):
    prompts = [_prompt(30 + i, 4 + 3 * i) for i in range(3)]
    engine = Engine(lm4k, slots=3, slot_len=64)
    short = _req(prompts[0], SamplingParams(max_new_tokens=2))
    events = []
    cancelled = _req(prompts[1], SamplingParams(max_new_tokens=40), events)
    long = _req(prompts[2], SamplingParams(max_new_tokens=30))
    for r in (short, cancelled, long):
        engine.submit(r)
    engine.step()  # all three prefilled, one decode step: `short` has its 2 tokens and leaves
    assert engine.stats()["active"] == 2 and len(short.output_ids) == 2
    engine.step()
    cancelled.cancel()
    seen = len(events)
    engine.step()
    assert engine.stats()["active"] == 1 and len(events) == seen  # left before decoding again
    assert [s.req for s in engine.active] == [long]  # moved into row 0
    _run(engine)
    assert long.output_ids == _alone(lm4k, prompts[2], SamplingParams(max_new_tokens=30))
    assert not engine.active  # every row free again: empty, or keeping a sequence that left (prefix reuse)
    for row, kept in enumerate(engine.cache.kept):
        held = int(engine.cache.lengths[row]) if kept is not None else 0
        assert int((engine.cache.store.positions[row] >= 0).sum()) == held
        if kept is not None:
            assert kept.tokens in [(r.prompt_ids + r.output_ids)[:held] for r in (short, cancelled, long)]
    assert any(kept is not None for kept in engine.cache.kept)


def test_longrope_rows_switch_factors_each_on_its_own(lm128k):
    # L0 = 32: one prompt starts past it, one crosses it while decoding, one stays below.
    prompts = [_prompt(40, 40), _prompt(41, 20), _prompt(42, 5)]
    params = [SamplingParams(max_new_tokens=m) for m in (10, 30, 12)]
    engine = Engine(lm128k, slots=3, slot_len=256)
    reqs = [_req(p, q) for p, q in zip(prompts, params)]
    for r in reqs:
        engine.submit(r)
    _run(engine)
    for r, p, q in zip(reqs, prompts, params):
        assert r.output_ids == _alone(lm128k, p, q)


def test_text_events_and_finish_reasons(lm4k):
    prompt = _prompt(50, 6)
    events = []
    engine = Engine(lm4k, slots=1, slot_len=64)
    engine.submit(_req(prompt, SamplingParams(max_new_tokens=9), events))
    _run(engine)
    assert events[-1].finish_reason == "length"
    text = "".join(e.text for e in events)
    expected = lm4k.tokenizer.decode(_alone(lm4k, prompt, SamplingParams(max_new_tokens=9)))
    assert text == expected
    # the slot's context bounds max_new_tokens: 64 - 6 tokens at most
    events.clear()
    req = _req(prompt, SamplingParams(max_new_tokens=1000), events)
    engine.submit(req)
    _run(engine)
    assert len(req.output_ids) == 58 and events[-1].finish_reason == "length"


def test_stop_strings_end_a_request(lm4k):
    prompt = _prompt(60, 6)
    free = lm4k.tokenizer.decode(_alone(lm4k, prompt, SamplingParams(max_new_tokens=12)))
    stop = free[len(free) // 2: len(free) // 2 + 3]
    events = []
    engine = Engine(lm4k, slots=2, slot_len=64)
    engine.submit(_req(prompt, SamplingParams(max_new_tokens=12, stop_strings=(stop,)), events))
    _run(engine)
    assert "".join(e.text for e in events) == free[: free.find(stop)]
    assert events[-1].finish_reason == "stop"


def test_the_queue_is_bounded(lm4k):
    engine = Engine(lm4k, slots=1, slot_len=64, max_queue=2)
    engine.submit(_req([5], SamplingParams()))
    engine.submit(_req([6], SamplingParams()))
    with pytest.raises(QueueFull):
        engine.submit(_req([7], SamplingParams()))


def test_the_background_loop_serves_and_stops(lm4k):
    import threading
    done = threading.Event()
    events = []

    def on_event(e):
        events.append(e)
        if getattr(e, "finish_reason", None):
            done.set()

    engine = Engine(lm4k, slots=2, slot_len=64).start()
    try:
        engine.submit(Request(_prompt(70, 5), SamplingParams(max_new_tokens=5), on_event))
        assert done.wait(30)
    finally:
        engine.stop()
    assert events[-1].finish_reason == "length"


def test_a_request_the_engine_cannot_start_fails_alone(lm4k):
    events, bad_events = [], []
    engine = Engine(lm4k, slots=2, slot_len=64)
    good = _req(_prompt(80, 5), SamplingParams(max_new_tokens=4), events)
    engine.submit(good)
    engine.submit(_req(_prompt(81, 5), SamplingParams(max_new_tokens=4, seed=2**70), bad_events))
    _run(engine)
    assert len(bad_events) == 1 and isinstance(bad_events[0], Exception)
    assert events[-1].finish_reason == "length" and len(good.output_ids) == 4


def test_quantized_rows_decode_natively_each_at_its_own_slot(phi3_tok, monkeypatch):
    """An int4 model in the engine: each decode step runs the native whole-stack step with a slot
    per row (rows of different lengths, joining and leaving), and every request's greedy tokens
    equal the generator's alone (whose decode runs the same native step at one shared slot)."""
    from phi3 import cpu_kernels, decode_step
    from phi3.quant import quantize_model

    if cpu_kernels.library() is None:
        pytest.skip("no native kernels on this CPU: the engine takes the module path (tested above)")
    lm = _lm("phi-3-mini-4k-instruct", phi3_tok, original=64)
    quantize_model(lm.model, bits=4, group_size=32)
    per_row = []
    real = decode_step.DecodeStep.__call__

    def spy(self, x, cos, sin, mask, start):
        if not isinstance(start, int):
            per_row.append(start.tolist())
        return real(self, x, cos, sin, mask, start)
    monkeypatch.setattr(decode_step.DecodeStep, "__call__", spy)
    prompts = [_prompt(20 + i, n) for i, n in enumerate([5, 17, 9, 30, 2])]
    params = [SamplingParams(max_new_tokens=m) for m in [12, 20, 3, 15, 9]]
    engine = Engine(lm, slots=3, slot_len=96)
    reqs = [_req(p, q) for p, q in zip(prompts, params)]
    for r in reqs:
        engine.submit(r)
    _run(engine)
    assert per_row and any(len(set(s)) > 1 for s in per_row)  # rows at different slots in one step
    for r, p, q in zip(reqs, prompts, params):
        assert r.output_ids == _alone(lm, p, q)


# ---- prefix reuse: a sequence that left is kept in a free row --------------------------------------------
def _turn(engine, prompt, params):
    req = _req(prompt, params)
    engine.submit(req)
    _run(engine)
    return req


def test_a_conversation_sent_again_prefills_only_its_new_tokens(lm4k):
    """A chat client sends the whole conversation each turn: turn 2 finds turn 1's sequence kept in
    a free row and prefills only what follows it; the tokens are those of the generator alone."""
    params = SamplingParams(max_new_tokens=8)
    engine = Engine(lm4k, slots=2, slot_len=128)
    first = _prompt(40, 12)
    one = _turn(engine, first, params)
    second = first + one.output_ids + _prompt(41, 6)
    two = _turn(engine, second, params)
    assert one.cached_tokens == 0 and two.cached_tokens == len(first) + len(one.output_ids) - 1  # its last token never ran
    assert two.output_ids == _alone(lm4k, second, params)
    three = _turn(engine, second, params)  # the same prompt again: all but its last token
    assert three.cached_tokens == len(second) - 1 and three.output_ids == two.output_ids


def test_interleaved_conversations_each_keep_their_row(lm4k):
    """Two clients taking turns: a newcomer's row is the first free one, and what that row kept
    moves to an empty row instead of being overwritten, so both conversations are reused."""
    params = SamplingParams(max_new_tokens=6)
    engine = Engine(lm4k, slots=3, slot_len=128)
    x1, y1 = _prompt(50, 10), _prompt(51, 14)
    rx1 = _turn(engine, x1, params)
    ry1 = _turn(engine, y1, params)
    x2, y2 = x1 + rx1.output_ids + _prompt(52, 5), y1 + ry1.output_ids + _prompt(53, 5)
    rx2 = _turn(engine, x2, params)
    ry2 = _turn(engine, y2, params)
    assert rx2.cached_tokens == len(x1) + 5 and ry2.cached_tokens == len(y1) + 5
    assert rx2.output_ids == _alone(lm4k, x2, params) and ry2.output_ids == _alone(lm4k, y2, params)
    # while both run at once, rows are busy; each finds its kept row all the same
    x3, y3 = x2 + rx2.output_ids + [7, 8], y2 + ry2.output_ids + [9, 10]
    rx3, ry3 = _req(x3, params), _req(y3, params)
    engine.submit(rx3)
    engine.submit(ry3)
    _run(engine)
    assert rx3.cached_tokens == len(x2) + 5 and ry3.cached_tokens == len(y2) + 5
    assert rx3.output_ids == _alone(lm4k, x3, params) and ry3.output_ids == _alone(lm4k, y3, params)


def test_a_kept_sequence_is_not_reused_across_the_longrope_switch(lm128k):
    """Kept under the short factors, a prefix is not reused for a prompt past L0 (= 32), which a
    fresh prefill computes under the long ones."""
    params = SamplingParams(max_new_tokens=4)
    engine = Engine(lm128k, slots=2, slot_len=96)
    first = _prompt(60, 20)
    one = _turn(engine, first, params)
    longer = first + one.output_ids + _prompt(61, 15)  # 39 tokens > L0
    two = _turn(engine, longer, params)
    assert two.cached_tokens == 0 and two.output_ids == _alone(lm128k, longer, params)
    again = _turn(engine, longer + two.output_ids + [5], params)  # kept under the long factors: reused
    assert again.cached_tokens == len(longer) + 3
    assert again.output_ids == _alone(lm128k, longer + two.output_ids + [5], params)
