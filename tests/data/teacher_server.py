"""A small OpenAI-compatible server for tests: `/v1/chat/completions` answered by a real LLM.

It runs the default model (`phi3.load()`, SmolLM2-135M-Instruct) on CPU behind the standard
library's HTTP server on 127.0.0.1, one generation at a time. With `--log FILE` it appends the
sha256 of each answered prompt to FILE, so tests can count what the teacher was asked.
It stands in for `phi3 serve --port N` until that lands; the fixture in conftest.py starts either.

    python tests/data/teacher_server.py --port 8765 [--log calls.txt]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import phi3

MODEL_NAME = "smollm2-135m-instruct"


def make_handler(lm, log_path: str | None):
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": MODEL_NAME, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                messages = req["messages"]
            except (ValueError, KeyError) as e:
                self._send(400, {"error": {"message": f"bad request: {e}"}})
                return
            with lock:
                reply = lm.chat(messages, max_new_tokens=int(req.get("max_tokens") or 64),
                                temperature=float(req.get("temperature", 0.0) or 0.0), seed=req.get("seed"))
                if log_path:
                    prompt = messages[-1]["content"]
                    with open(log_path, "a") as f:
                        f.write(hashlib.sha256(prompt.encode()).hexdigest() + "\n")
            self._send(200, {
                "id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "created": int(time.time()),
                "model": req.get("model", MODEL_NAME),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            })

    return Handler


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--log", default=None)
    args = ap.parse_args()
    lm = phi3.load()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(lm, args.log))
    print(f"listening on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
