"""Fuzz every operation of the served OpenAPI schema (schemathesis): valid and invalid bodies alike
get a non-5xx answer, every error is an OpenAI error body, and the server keeps serving.

The model is a tiny random Phi-3 with 64-token slots, so even a valid request generates quickly.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation import GenerationMode

from phi3.serve.server import build


@pytest.fixture(scope="module")
def api_schema(tiny_lm):
    app, engine = build(tiny_lm, slots=2, slot_len=64, max_queue=64)
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    engine.stop()


def _fuzz(operation, mode: GenerationMode, examples: int) -> int:
    """Send `examples` generated requests to one operation; return how many were sent."""
    sent = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def check(case):
        response = case.call()
        sent.append(response.status_code)
        assert response.status_code < 500, \
            f"{case.method} {case.path} {case.body!r} -> {response.status_code} {response.text}"
        if response.status_code >= 400:
            error = response.json()["error"]
            assert error["message"] and error["type"]

    check()
    return len(sent)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(api_schema, mode):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    if mode is GenerationMode.NEGATIVE:  # only operations with a body can be sent a wrong one
        operations = [op for op in operations if op.method.upper() == "POST"]
    assert len(operations) >= (2 if mode is GenerationMode.NEGATIVE else 6)
    for op in operations:
        assert _fuzz(op, mode, 40 if op.method.upper() == "POST" else 3) > 0


def test_the_schema_covers_the_api(api_schema):
    paths = set(api_schema.raw_schema["paths"])
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"} <= paths
