"""`phi3 serve` as a user runs it: a real process on a free loopback port, the API key from the environment."""

import os
import socket

import httpx

from phi3.checkpoint import save_hf_checkpoint
from phi3.cli import main

from ..conftest import phi3_serve


def test_bad_serve_arguments_are_one_line_errors(capsys):
    assert main(["serve", "--port", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --port must be >= 0"
    assert main(["serve", "--slots", "0"]) == 2
    assert "--slots must be >= 1" in capsys.readouterr().err


def test_serve_process_binds_loopback_and_requires_the_key_from_the_environment(tmp_path, tiny_lm):
    save_hf_checkpoint(tiny_lm.model, tmp_path / "tiny", tokenizer=tiny_lm.tokenizer)
    env = dict(os.environ, PHI3_API_KEY="k3y")
    with phi3_serve(["--model", str(tmp_path / "tiny"), "--slots", "2", "--ctx", "64"],
                    tmp_path / "serve.log", env=env, timeout=120) as server:
        url, port = server.url, int(server.url.rsplit(":", 1)[1])
        assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k3y"})
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"
        assert _listening_addresses(port) == {"127.0.0.1"}  # loopback only, by default
        assert "<title>phi3 chat</title>" in httpx.get(url + "/").text
    err = server.stderr()
    assert f"on http://127.0.0.1:{port}" in err and "API key required" in err


def _listening_addresses(port: int) -> set[str]:
    """IPv4 addresses with a socket listening on `port`, from the kernel's table (/proc/net/tcp)."""
    found = set()
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found
