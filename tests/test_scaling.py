"""Past one machine: a routing `neo4j://` URI works everywhere, and serving reads go to readers."""
from __future__ import annotations

import dataclasses
import threading

import requests
from neo4j import READ_ACCESS
from neo4j._sync.work.session import Session
from werkzeug.serving import make_server

from app import create_app
from tests.conftest import SERVICE

EVENTS = [{"event_id": f"r{k}", "user_id": f"u{k % 5}", "item_id": f"i{k % 7}", "type": "purchase",
           "ts": 1_600_000_000_000 + k * 60_000} for k in range(40)]


def test_a_routing_uri_serves_and_every_serving_read_goes_to_readers(cfg, clean_db, monkeypatch):
    routed = dataclasses.replace(cfg, neo4j_uri=cfg.neo4j_uri.replace("bolt://", "neo4j://"))
    modes, connect = [], Session._connect

    def observe(self, access_mode=None, **kwargs):  # the one place a session picks a server by mode
        modes.append(access_mode or self._config.default_access_mode)
        return connect(self, access_mode, **kwargs)

    monkeypatch.setattr(Session, "_connect", observe)
    server = make_server("127.0.0.1", 0, create_app(routed), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        assert requests.post(f"{url}/v1/events", json=EVENTS, headers=SERVICE, timeout=30).json()["accepted"] == 40
        seen = {}
        for path in ("/v1/users/u1/recommendations", "/v1/users/u1/recommendations?explain=true",
                     "/v1/users/nobody/recommendations", "/v1/users/u1/interests", "/v1/items/i1/similar",
                     "/v1/items/i1/audience", "/v1/users/churn-risk", "/v1/stats", "/metrics"):
            modes.clear()
            assert requests.get(url + path, timeout=30).status_code < 500, path
            seen[path] = set(modes)
    finally:
        server.shutdown()
    assert all(seen.values()) and {p: m for p, m in seen.items() if m != {READ_ACCESS}} == {}
