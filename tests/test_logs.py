"""Logs: quiet by default, JSON on request, and the API's request id in every line of a request."""
from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time

import pytest
import requests

from app import logs
from app.config import ROOT


@pytest.fixture
def json_lines(app):
    """The process's log handler writing JSON into a buffer, with per-request DEBUG lines on."""
    handler = next(h for h in logging.getLogger().handlers if getattr(h, "_ig", False))
    buffer = io.StringIO()
    old_stream, old_formatter = handler.setStream(buffer), handler.formatter
    handler.setFormatter(logs.formatter("json"))
    access = logging.getLogger("app.access")
    access.setLevel(logging.DEBUG)
    try:
        yield lambda: [json.loads(line) for line in buffer.getvalue().splitlines()]
    finally:
        access.setLevel(logging.NOTSET)
        handler.setStream(old_stream)
        handler.setFormatter(old_formatter)


def test_request_id_is_carried_in_and_out_and_into_log_lines(base_url, json_lines):
    mine = requests.get(f"{base_url}/healthz", headers={"X-Request-ID": "req-42.a:b"}, timeout=10)
    assert mine.headers["X-Request-ID"] == "req-42.a:b"
    fresh = requests.get(f"{base_url}/healthz", timeout=10).headers["X-Request-ID"]
    junk = requests.get(f"{base_url}/healthz", headers={"X-Request-ID": "x y\"z"}, timeout=10)
    assert len(fresh) == 32 and junk.headers["X-Request-ID"] not in ("x y\"z", fresh)
    lines = json_lines()
    ours = [r for r in lines if r.get("request_id") == "req-42.a:b"]
    assert ours and ours[0]["logger"] == "app.access" and "GET /healthz 200" in ours[0]["message"]
    assert {"time", "level", "logger", "message"} <= set(ours[0])
    assert any(r.get("request_id") == fresh for r in lines)


def test_scheduler_ticks_are_silent_at_info(cfg):
    """Three ticks of an interval job under the default setup print nothing from APScheduler."""
    from apscheduler.schedulers.background import BackgroundScheduler
    logs.setup(cfg)
    handler = next(h for h in logging.getLogger().handlers if getattr(h, "_ig", False))
    buffer = io.StringIO()
    old = handler.setStream(buffer)
    ticks = []
    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.add_job(lambda: ticks.append(1), "interval", seconds=0.2, max_instances=1, coalesce=True)
    try:
        scheduler.start()
        deadline = time.monotonic() + 5
        while len(ticks) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        scheduler.shutdown()
    finally:
        handler.setStream(old)
    assert len(ticks) >= 3
    assert "apscheduler" not in buffer.getvalue()
    assert logging.getLogger("app.embeddings.refresh").isEnabledFor(logging.INFO)  # a run that did work


def _cli(*args, **env):
    import os
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=120)


def test_log_settings_are_checked_and_json_is_one_object_a_line(cfg):
    bad = _cli("neo4j", "status", IG_LOG_LEVEL="LOUD")
    assert bad.returncode == 1 and "IG_LOG_LEVEL must be one of" in bad.stderr
    code = ("from app import logs; from app.config import load_config; import logging; "
            "logs.setup(load_config()); logging.getLogger('app.x').info('hello %s', 'there'); "
            "logging.getLogger('app.x').debug('hidden')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "IG_LOG_FORMAT": "json"})
    records = [json.loads(line) for line in out.stderr.splitlines()]
    assert records == [{"time": records[0]["time"], "level": "INFO", "logger": "app.x",
                        "message": "hello there", "request_id": None}]
