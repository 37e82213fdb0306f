"""The OpenAI API driven by the official `openai` client against a real server on a loopback port.

The model is the real default (SmolLM2-135M-Instruct); every expected text comes from the CLI's
generator (`LanguageModel.complete_ids` / `generate`) on the same model, never a literal.
"""

import json
import threading
import time

import httpx
import openai
import pytest

from .conftest import served

CONTEXT = 256  # tokens per slot in these servers: small, so "too long" is cheap to reach
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(smol):
    with served(smol, slots=4, slot_len=CONTEXT, max_queue=8) as (url, engine):
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def _reference(lm, messages, **sampling):
    """The CLI's generator on the same prompt: (text, finish_reason, prompt tokens, sampled tokens)."""
    prompt = lm.chat_prompt(messages)
    c = lm.complete_ids([prompt], **sampling)[0]
    return c.text, c.finish_reason, len(prompt), c.completion_tokens + (c.finish_reason == "stop")


def test_chat_matches_the_cli_generator_with_usage(client, model_id, smol):
    r = client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=0, max_tokens=30)
    text, reason, prompt_tokens, sampled = _reference(smol, MESSAGES, max_new_tokens=30)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text and "Paris" in text
    assert r.choices[0].finish_reason == reason == "stop"  # the model's end-of-turn token
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, sampled)
    assert r.usage.total_tokens == prompt_tokens + sampled
    assert r.model == model_id and r.object == "chat.completion"


def test_a_conversation_sent_again_reports_its_cached_prompt_tokens(client, model_id, smol):
    """A chat client resends the whole conversation every turn: the server finds the earlier turn's
    tokens kept, prefills only the rest (`usage.prompt_tokens_details.cached_tokens`, as OpenAI's
    API reports it), and the reply is the generator's on the whole conversation."""
    messages = [{"role": "system", "content": "You answer in one short sentence."},
                {"role": "user", "content": "Name a large river in Europe."}]
    first = client.chat.completions.create(model=model_id, messages=messages, temperature=0, max_tokens=20)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "Which countries does it flow through?"}]
    second = client.chat.completions.create(model=model_id, messages=messages, temperature=0, max_tokens=20)
    text, _, prompt_tokens, _ = _reference(smol, messages, max_new_tokens=20)
    assert second.choices[0].message.content == text
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens < cached < prompt_tokens == second.usage.prompt_tokens


def test_streaming_chat_gives_the_same_text_in_pieces(client, model_id, smol):
    messages = [{"role": "system", "content": "You are a poet."},
                {"role": "user", "content": "Write two lines about the sea."}]
    chunks = list(client.chat.completions.create(model=model_id, messages=messages, temperature=0,
                                                 max_completion_tokens=25, stream=True,
                                                 stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    text, reason, prompt_tokens, sampled = _reference(smol, messages, max_new_tokens=25)
    assert len(pieces) > 5 and "".join(pieces) == text
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == sampled == 25


def test_sse_wire_format_ends_with_done(server, model_id):
    body = {"model": model_id, "messages": MESSAGES, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_strings_and_length(client, model_id, smol):
    free, _, _, _ = _reference(smol, MESSAGES, max_new_tokens=30)
    stop = free.split()[2]  # a word from the middle of the reply
    r = client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=0, max_tokens=30, stop=[stop])
    assert r.choices[0].message.content == free[: free.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_seeded_sampling_is_reproducible_and_matches_the_generator(client, model_id, smol):
    messages = [{"role": "user", "content": "Tell me a story."}]
    kw = dict(model=model_id, messages=messages, temperature=1.0, top_p=0.9, max_tokens=12)
    a = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    c = client.chat.completions.create(seed=8, **kw).choices[0].message.content
    assert a == b != c
    assert a == _reference(smol, messages, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)[0]


def test_completions_plain_batched_and_streamed(client, model_id, smol):
    r = client.completions.create(model=model_id, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.choices[0].text == smol.generate("The capital of France is", max_new_tokens=8)
    assert r.usage.prompt_tokens == len(smol.encode("The capital of France is"))
    prompts = ["One, two, three,", "The sky is"]
    r = client.completions.create(model=model_id, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [smol.generate(p, max_new_tokens=6) for p in prompts]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model_id, prompt="The sky is", max_tokens=6, temperature=0, stream=True))
    assert streamed == r.choices[1].text
    echo = client.completions.create(model=model_id, prompt="The sky is", max_tokens=6, temperature=0, echo=True)
    assert echo.choices[0].text == "The sky is" + r.choices[1].text


def test_models_health_metrics_and_schema(server, client, model_id):
    assert [m.id for m in client.models.list().data] == [model_id]
    assert client.models.retrieve(model_id).id == model_id
    url = server[0]
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["slots"] == 4
    metrics = httpx.get(url + "/metrics").text
    for name in ("phi3_requests_total", "phi3_generated_tokens_total", "phi3_prompt_tokens_total",
                 "phi3_queue_depth", "phi3_active_slots", "phi3_time_to_first_token_seconds_bucket",
                 "phi3_inter_token_latency_seconds_bucket", "phi3_request_latency_seconds_bucket"):
        assert name in metrics
    assert _metric(metrics, "phi3_generated_tokens_total") > 0
    schema = httpx.get(url + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"} <= set(schema["paths"])


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_concurrent_requests_share_the_engine_and_equal_each_alone(tiny_lm):
    # An fp32 model: batched and alone are then the same computation row by row (quantized kernels
    # on bf16 activations may round differently at another batch size).
    questions = ["Name a color.", "What is 2+2?", "Name a fruit.", "Say hello."]
    results = {}
    with served(tiny_lm, slots=4, slot_len=64) as (url, engine):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)

        def ask(q):
            results[q] = client.chat.completions.create(
                model="tiny-phi3", messages=[{"role": "user", "content": q}], temperature=0, max_tokens=24)

        threads = [threading.Thread(target=ask, args=(q,)) for q in questions]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        steps = engine.steps
    for q in questions:
        assert results[q].choices[0].message.content == _reference(
            tiny_lm, [{"role": "user", "content": q}], max_new_tokens=24)[0]
    sampled = sum(r.usage.completion_tokens for r in results.values())
    assert sampled == 4 * 24 and steps < sampled / 2  # decoded together: far fewer steps than tokens


# ---- bad input: an OpenAI error body with a 4xx, and the server keeps serving ------------------------
def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize("body,param,words", [
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content", ""),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", ""),
    ({"max_tokens": "10"}, "max_tokens", "integer"),
    ({"max_tokens": 0}, "max_tokens", ""),
    ({"temperature": 2.5}, "temperature", "2"),
    ({"temperature": -1}, "temperature", ""),
    ({"top_p": 0}, "top_p", ""),
    ({"top_p": 1.5}, "top_p", ""),
    ({"n": 2}, "n", ""),
    ({"stream": "yes"}, "stream", "bool"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", ""),
    ({"seed": 2**70}, "seed", ""),
    ({"max_tokens": 10_000}, "max_tokens", "context"),
    ({"messages": [{"role": "user", "content": "word " * 400}]}, "messages", "context"),
])
def test_bad_chat_requests_get_400_naming_the_field(server, model_id, body, param, words):
    full = {"model": model_id, "messages": MESSAGES, **body}
    err = _error(httpx.post(server[0] + "/v1/chat/completions", json=full, timeout=30), 400)
    assert err["param"] == param and words in err["message"]
    assert err["type"] == "invalid_request_error"


def test_bad_requests_through_the_openai_client(client, model_id):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert e.value.code == "model_not_found" and "gpt-4o" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=CONTEXT)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_id, prompt="hi " * 300)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=9)
    assert e.value.param == "temperature"


def test_malformed_oversized_and_unknown(server, model_id):
    url = server[0]
    err = _error(httpx.post(url + "/v1/chat/completions", content=b'{"model": "x", "messages": [',
                            headers={"content-type": "application/json"}), 400)
    assert "malformed JSON" in err["message"]
    _error(httpx.post(url + "/v1/chat/completions", content=b"[1, 2]",
                      headers={"content-type": "application/json"}), 400)
    big = {"model": model_id, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    err = _error(httpx.post(url + "/v1/chat/completions", json=big), 413)
    assert "larger than" in err["message"]

    def chunked():
        for _ in range(3):
            yield b" " * (1 << 20)
    _error(httpx.post(url + "/v1/chat/completions", content=chunked(),
                      headers={"content-type": "application/json"}), 413)
    _error(httpx.get(url + "/v1/nothing-here"), 404)
    _error(httpx.get(url + "/v1/chat/completions"), 405)
    # ... and it still serves
    r = httpx.post(url + "/v1/chat/completions", json={"model": model_id, "messages": MESSAGES, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


# ---- slots: a client that goes away frees its slot; a full queue answers 429 --------------------------
def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_a_disconnecting_client_frees_its_slot(server, model_id):
    url, engine = server
    body = {"model": model_id, "messages": [{"role": "user", "content": "Write a long essay about rivers."}],
            "max_tokens": 200, "temperature": 0, "stream": True}  # greedy: a long essay, deterministically
    before = _metric(httpx.get(url + "/metrics").text, 'phi3_sequences_finished_total{reason="cancelled"}') \
        if "cancelled" in httpx.get(url + "/metrics").text else 0.0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # the role chunk and a couple of tokens
        assert engine.stats()["active"] == 1 and any("content" in g for g in got)
    assert _wait_for(lambda: engine.stats()["active"] == 0, timeout=5)
    text = httpx.get(url + "/metrics").text
    assert _metric(text, 'phi3_sequences_finished_total{reason="cancelled"}') == before + 1
    assert _metric(text, "phi3_active_slots") == 0


def test_a_full_queue_answers_429_and_recovers(smol):
    with served(smol, slots=1, slot_len=CONTEXT, max_queue=1) as (url, engine):
        essay = [{"role": "user", "content": "Write a long essay about rivers."}]
        body = {"model": "SmolLM2-135M-Instruct.Q4_1", "messages": essay, "max_tokens": 200,
                "temperature": 0, "stream": True}  # greedy: runs well past these checks
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as first:
            lines = first.iter_lines()
            seen = [next(lines) for _ in range(4)]  # role chunk, blank, first token: it holds the slot
            assert '"content": ""' not in seen[-2] and "content" in seen[-2], seen
            assert engine.stats()["active"] == 1
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as second:
                assert second.status_code == 200
                assert _wait_for(lambda: engine.stats()["waiting"] == 1)
                with pytest.raises(openai.RateLimitError) as e:
                    client.chat.completions.create(model=body["model"], messages=MESSAGES, max_tokens=2)
                assert e.value.code == "queue_full"
                assert _metric(httpx.get(url + "/metrics").text, "phi3_queue_depth") == 1
        assert _wait_for(lambda: engine.stats()["active"] == engine.stats()["waiting"] == 0)
        r = client.chat.completions.create(model=body["model"], messages=MESSAGES, max_tokens=2)
        assert r.choices[0].finish_reason == "length"


# ---- security -------------------------------------------------------------------------------------
def test_api_key_is_required_when_set(tiny_lm):
    with served(tiny_lm, slots=2, slot_len=64, api_key="s3cret") as (url, _):
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert e.value.code == "invalid_api_key"
        assert httpx.post(url + "/v1/chat/completions", json={}).status_code == 401
        assert httpx.get(url + "/metrics").status_code == 401
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == "tiny-phi3"
        r = good.chat.completions.create(model="tiny-phi3", messages=MESSAGES, max_tokens=3)
        assert r.usage.completion_tokens >= 1
        assert httpx.get(url + "/health").status_code == 200  # the page and health stay open
        assert httpx.get(url + "/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_no_cors_unless_asked(tiny_lm):
    origin = {"Origin": "http://example.test"}
    preflight = {**origin, "Access-Control-Request-Method": "POST"}
    with served(tiny_lm, slots=1, slot_len=64) as (url, _):
        assert "access-control-allow-origin" not in httpx.get(url + "/v1/models", headers=origin).headers
        assert "access-control-allow-origin" not in httpx.options(url + "/v1/models", headers=preflight).headers
    with served(tiny_lm, slots=1, slot_len=64, cors_origins=["http://example.test"]) as (url, _):
        r = httpx.options(url + "/v1/chat/completions", headers=preflight)
        assert r.headers["access-control-allow-origin"] == "http://example.test"
