"""The teacher client against real HTTP servers: retries with backoff, clear errors, the cache."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from phi3.data.teacher import Cache, Teacher, TeacherConfig
from phi3.errors import Phi3Error


class FlakyServer:
    """A loopback OpenAI-style server that fails the first `failures` requests with `status`."""

    def __init__(self, failures: int, status: int):
        self.failures, self.status, self.requests = failures, status, 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests += 1
                if outer.requests <= outer.failures:
                    data, code = json.dumps({"error": {"message": "try later"}}).encode(), outer.status
                else:
                    reply = "echo: " + body["messages"][-1]["content"]
                    data, code = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                             "choices": [{"index": 0, "finish_reason": "stop",
                                                          "message": {"role": "assistant", "content": reply}}]}
                                            ).encode(), 200
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky(request):
    servers = []

    def make(failures, status):
        s = FlakyServer(failures, status)
        servers.append(s)
        return s
    yield make
    for s in servers:
        s.close()


def test_transient_errors_are_retried_with_exponential_backoff(flaky, tmp_path):
    server = flaky(failures=2, status=503)
    sleeps = []
    t = Teacher(TeacherConfig(base_url=server.url, retries=3, backoff=0.5), Cache(tmp_path / "c.sqlite"),
                sleep=sleeps.append)
    assert t.complete_many(["hello"]) == ["echo: hello"]
    assert server.requests == 3 and t.stats.retries == 2
    assert 0.5 <= sleeps[0] < 0.6 and 1.0 <= sleeps[1] < 1.2  # doubles, with a little jitter


def test_retries_run_out_with_a_clear_error(flaky, tmp_path):
    server = flaky(failures=10, status=500)
    t = Teacher(TeacherConfig(base_url=server.url, retries=2, backoff=0), Cache(tmp_path / "c.sqlite"),
                sleep=lambda s: None)
    with pytest.raises(Phi3Error, match=r"failed with HTTP 500 after 3 attempt"):
        t.complete_many(["x"])


def test_client_errors_are_not_retried(flaky, tmp_path):
    server = flaky(failures=10, status=401)
    t = Teacher(TeacherConfig(base_url=server.url, retries=5), Cache(tmp_path / "c.sqlite"))
    with pytest.raises(Phi3Error, match="HTTP 401 after 1 attempt"):
        t.complete_many(["x"])
    assert server.requests == 1


def test_cache_answers_reruns_and_duplicate_prompts_without_calls(flaky, tmp_path):
    server = flaky(failures=0, status=200)
    cfg = TeacherConfig(base_url=server.url, concurrency=3)
    prompts = ["a", "b", "a", "c"]
    first = Teacher(cfg, Cache(tmp_path / "c.sqlite")).complete_many(prompts)
    assert first == ["echo: a", "echo: b", "echo: a", "echo: c"] and server.requests == 3
    again = Teacher(cfg, Cache(tmp_path / "c.sqlite"))
    assert again.complete_many(prompts) == first and server.requests == 3 and again.stats.cached == 4
    other_model = Teacher(TeacherConfig(base_url=server.url, model="other"), Cache(tmp_path / "c.sqlite"))
    other_model.complete_many(["a"])
    assert server.requests == 4  # the cache key includes the model


def test_unreachable_endpoint_is_a_clear_error(tmp_path):
    t = Teacher(TeacherConfig(base_url="http://127.0.0.1:9/v1", retries=1, backoff=0, timeout=5),
                Cache(tmp_path / "c.sqlite"), sleep=lambda s: None)
    with pytest.raises(Phi3Error, match=r"teacher http://127.0.0.1:9/v1 .* after 2 attempt"):
        t.complete_many(["x"])
