"""The served WSGI app asks clients to reconnect now and then, so their requests spread over the workers."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import requests
from werkzeug.test import EnvironBuilder

from app.config import ConfigError, ROOT, load_config
from app.runtime import spread_connections


def test_about_one_answer_in_every_asks_to_reconnect(app):
    environ = EnvironBuilder(path="/healthz").get_environ()

    def closes(wsgi, n: int) -> int:
        said = []
        for _ in range(n):
            b"".join(wsgi(dict(environ), lambda status, headers, exc_info=None: said.append(dict(headers))))
        assert all(h["Content-Type"] == "application/json" for h in said)  # the app's own headers kept
        return sum(h.get("Connection") == "close" for h in said)
    # 400 answers, one in 4 on average: 100 expected, standard deviation 8.7
    assert 60 <= closes(spread_connections(app, 4), 400) <= 140
    assert closes(app, 50) == 0  # the app itself never asks


@pytest.mark.parametrize("name", ["IG_KEEPALIVE_REQUESTS", "IG_EXPLAIN_TABLE_MB"])
def test_a_negative_serving_setting_is_refused(monkeypatch, name):
    monkeypatch.setenv(name, "-1")
    with pytest.raises(ConfigError, match=name):
        load_config()


def test_granian_closes_the_connections_it_is_asked_to(cfg):
    """`interest-graph serve` (granian) with IG_KEEPALIVE_REQUESTS=1: every answer closes its connection."""
    from support.servers import free_port, wait_ready
    port = free_port()
    env = {**os.environ, "IG_PORT": str(port), "IG_WORKERS": "1", "IG_THREADS": "1", "IG_KEEPALIVE_REQUESTS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "app", "serve"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        with requests.Session() as http:  # a keep-alive client
            assert all(http.get(f"{url}/healthz", timeout=30).headers["Connection"] == "close" for _ in range(20))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            answer = b""
            while chunk := conn.recv(65536):  # ends when the server closes (else a timeout error)
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200")
    finally:
        server.terminate()
        server.wait(60)
