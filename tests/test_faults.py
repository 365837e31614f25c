"""Faults on a Neo4j server of this module's own (Bolt 7692, HTTP 7479, or IG_FAULT_BOLT_PORT and
IG_FAULT_HTTP_PORT; data in var/faults), which the tests crash and start again, so the suite's shared
server is never stopped."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import psutil
import pytest
import requests
from werkzeug.serving import make_server

from app import create_app, migrate, neo4j_local
from app.config import ROOT, load_config
from app.db import get_driver
from app.embeddings import models, store
from app.embeddings.refresh import refresh
from app.embeddings.training import train_and_publish
from app.ingest import pipeline
from app.worker import Worker
from tests.conftest import SERVICE, wipe
from support.refresh import events, max_error

pytestmark = pytest.mark.slow
BOLT_PORT, HTTP_PORT = os.environ.get("IG_FAULT_BOLT_PORT", "7692"), os.environ.get("IG_FAULT_HTTP_PORT", "7479")
FAULT_ENV = {"NEO4J_URI": f"bolt://127.0.0.1:{BOLT_PORT}", "NEO4J_HTTP_PORT": HTTP_PORT,
             "IG_HOME": str(ROOT / "var" / "faults"), "IG_NEO4J_HEAP": "512m", "IG_NEO4J_PAGECACHE": "128m"}
SLACK = 0.5  # seconds over the configured budget allowed for a loaded 2-core test machine


@pytest.fixture(scope="module")
def fcfg(cfg):
    """The Config of the fault server, started, migrated and empty."""
    config = load_config(neo4j_uri=FAULT_ENV["NEO4J_URI"], neo4j_http_port=int(HTTP_PORT), home=ROOT / "var" / "faults",
                         neo4j_heap="512m", neo4j_pagecache="128m")
    neo4j_local.start(config)
    migrate.migrate(get_driver(config), config.neo4j_database, {"embed_dim": config.vector_dim})
    wipe(get_driver(config), config.neo4j_database)
    yield config
    neo4j_local.stop(config)


@pytest.fixture(scope="module")
def fdriver(fcfg):
    return get_driver(fcfg)


@pytest.fixture(scope="module")
def furl(fcfg):
    """The API on the fault server, over real HTTP."""
    server = make_server("127.0.0.1", 0, create_app(fcfg), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def crash(fcfg) -> None:
    """Kill Neo4j at once (SIGKILL: no clean shutdown, as in a power cut) and wait until it is gone."""
    pid = neo4j_local.status(fcfg)["pid"]
    assert pid, "the fault server is not running"
    proc = psutil.Process(pid)
    proc.kill()
    try:
        os.waitpid(pid, 0)  # our child when this process started it: reap it
    except ChildProcessError:
        proc.wait(10)


def _worker(env_extra: dict) -> subprocess.Popen:
    env = {**os.environ, **FAULT_ENV, "IG_REFRESH_INTERVAL": "0.2", "IG_LEASE_SECONDS": "2", **env_extra}
    return subprocess.Popen([sys.executable, "-m", "app", "worker"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_line(proc: subprocess.Popen, words: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if words in line:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining
            return
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"worker never logged {words!r}")


class Traffic:
    """Ingest clients that resend what got 503 (as a storefront would) and readers, recording every answer."""

    def __init__(self, url: str, clients: int = 3, batches: int = 40, size: int = 5):
        self.url = url
        self.batches = [[[{"event_id": f"f{c}-{b}-{k}", "user_id": f"u{(c * 7 + b) % 23}",
                           "item_id": f"i{(b * 5 + k) % 17}", "type": "view", "ts": int(time.time() * 1000)}
                          for k in range(size)] for b in range(batches)] for c in range(clients)]
        # (path, status, s, Retry-After, phase at the start, monotonic start and end)
        self.answers: list[tuple[str, int, float, str | None, str, float, float]] = []
        self.phase = "up"
        self.accepted = Counter()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(c,)) for c in range(clients)]
        self.threads += [threading.Thread(target=self._reader, args=(p,)) for p in
                         ("/v1/stats", "/v1/users/u1/recommendations", "/v1/items/i1/similar")]

    def _call(self, http: requests.Session, method: str, path: str, **kwargs) -> requests.Response:
        started, phase = time.monotonic(), self.phase
        reply = http.request(method, self.url + path, timeout=60, **kwargs)
        ended = time.monotonic()
        with self.lock:
            self.answers.append((path, reply.status_code, ended - started, reply.headers.get("Retry-After"), phase,
                                 started, ended))
        return reply

    def _client(self, c: int) -> None:
        with requests.Session() as http:
            for batch in self.batches[c]:
                while not self.stop.is_set():
                    reply = self._call(http, "POST", "/v1/events", json=batch, headers=SERVICE)
                    if reply.status_code == 200:
                        self.accepted[c] += reply.json()["accepted"]
                        break
                    if reply.status_code != 503:
                        return
                    time.sleep(float(reply.headers.get("Retry-After", 1)))
                time.sleep(0.05)

    def _reader(self, path: str) -> None:
        with requests.Session() as http:
            while not self.stop.is_set():
                self._call(http, "GET", path)
                time.sleep(0.1)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads[:len(self.batches)]:
            t.join(max(deadline - time.monotonic(), 0))
        self.stop.set()
        for t in self.threads:
            t.join(30)


def test_neo4j_crash_under_traffic_answers_503_fast_and_loses_nothing(fcfg, fdriver, furl):
    """Neo4j killed during ingest and reads, with a worker running: every answer is 2xx/404 or a 503 with
    Retry-After inside the budget, /readyz says why, the worker stops on SIGTERM within seconds, and
    after the restart every event is in the graph exactly once."""
    worker = _worker({})
    _wait_for_line(worker, "started")
    traffic = Traffic(furl)
    traffic.start()
    time.sleep(2.0)
    traffic.phase, down_at = "down", time.monotonic()
    crash(fcfg)
    time.sleep(1.0)
    started = time.monotonic()
    ready = requests.get(furl + "/readyz", timeout=30)
    ready_seconds = time.monotonic() - started
    worker.send_signal(signal.SIGTERM)
    started = time.monotonic()
    try:
        worker.wait(15)
    finally:
        worker.kill()
    worker_stop_seconds = time.monotonic() - started
    time.sleep(max(0.0, 4.0 - (time.monotonic() - down_at)))  # some seconds of outage under traffic
    # Starting: Bolt answers before the database has rebuilt its indexes (after a crash), and a
    # transaction may wait for them, up to the ingest wait / transaction timeout.
    traffic.phase, starting_at = "starting", time.monotonic()
    neo4j_local.start(fcfg)
    traffic.phase = "up again"
    traffic.finish(timeout=120)

    statuses = Counter(a[1] for a in traffic.answers)
    for phase in ("up", "down", "starting", "up again"):
        mine = [a for a in traffic.answers if a[4] == phase]
        print(f"{phase}: {dict(Counter(a[1] for a in mine))}, slowest "
              f"{max((a[2] for a in mine), default=0):.2f}s")
    print(f"/readyz down {ready_seconds:.2f}s; worker stopped in {worker_stop_seconds:.2f}s; "
          f"{sum(a[5] < down_at < a[6] for a in traffic.answers)} requests in flight at the crash")
    assert statuses[503] > 0, "the crash did not land during the traffic"
    assert set(statuses) <= {200, 404, 503}, statuses
    # Every request in flight while Neo4j was down, whether it began then or before the crash, answers
    # within the budget from the crash or from its start, whichever came later.
    slow = [a for a in traffic.answers if a[5] < starting_at and a[6] > down_at
            and a[6] - max(a[5], down_at) > fcfg.neo4j_timeout + SLACK]
    assert not slow, f"answers slower than the {fcfg.neo4j_timeout}s budget while Neo4j was down: {slow[:5]}"
    # While it starts (recovery, index rebuilds, a cold JVM on a busy machine) a transaction may be slow:
    # bounded by the transaction timeout (reads) and the ingest wait (writes), never a hang.
    assert max(a[2] for a in traffic.answers) <= fcfg.tx_timeout + 10
    assert all(a[3] for a in traffic.answers if a[1] == 503), "a 503 without Retry-After"
    assert ready.status_code == 503 and ready.headers["Retry-After"]
    assert ready.json()["error"]["message"] == "neo4j unreachable"  # the reason, no exception text
    assert ready_seconds <= fcfg.neo4j_timeout + SLACK
    assert worker_stop_seconds <= 5.0, f"worker took {worker_stop_seconds:.1f}s to stop on SIGTERM"

    sent = {e["event_id"] for client in traffic.batches for batch in client for e in batch}
    with fdriver.session(database=fcfg.neo4j_database) as s:
        stored = s.run("MATCH (e:Event) WHERE e.id STARTS WITH 'f' RETURN collect(e.id) AS ids").single()["ids"]
        views = s.run("MATCH (:User)-[r:INTERACTED]->(:Item) RETURN sum(r.n_view) AS n").single()["n"]
    assert set(stored) == sent and len(stored) == len(sent)
    assert views == len(sent), "an event was counted twice or lost"
    # A batch whose 503 came while its commit was still under way is a duplicate when resent.
    assert 0 < sum(traffic.accepted.values()) <= len(sent)
    assert requests.get(furl + "/readyz", timeout=30).status_code == 200


def _user_vectors(driver, cfg) -> dict:
    with driver.session(database=cfg.neo4j_database) as s:
        return {r["id"]: (r["e"], r["deg"], r["v"]) for r in s.run(
            "MATCH (u:User) RETURN u.id AS id, u.embedding AS e, u.ig_deg AS deg, u.embedding_version AS v")}


def test_neo4j_crash_inside_the_refresh_transaction_writes_nothing_then_catches_up(fcfg, fdriver, monkeypatch):
    """Neo4j dies after a run has written its embeddings but before it commits: after the restart no
    embedding and no watermark has moved; the next run catches up to exactly a full recompute."""
    wipe(fdriver, fcfg.neo4j_database)
    rng = random.Random(5)
    pipeline.ingest(fdriver, fcfg, events(rng, 400, 40, 30))
    with Worker(fcfg).holding() as holder:
        result = train_and_publish(fdriver, fcfg, progress=False, owner=holder.owner, epochs=1)
        lm = models.load(result["checkpoint"], result["version"])
        refresh(fdriver, fcfg, lm, owner=holder.owner)
    pipeline.ingest(fdriver, fcfg, events(rng, 60, 45, 32))  # changes: some new users, some known
    fcfg = type(fcfg)(**{**fcfg.__dict__, "full_share": 10.0})  # an incremental run (one transaction)
    before = _user_vectors(fdriver, fcfg)
    with fdriver.session(database=fcfg.neo4j_database) as s:
        mark = store.refresh_state(s)["watermark"]

    advance, crashed = store.advance, []

    def crash_then_advance(tx, *args, **kwargs):
        if not crashed:
            crashed.append(True)
            crash(fcfg)
        return advance(tx, *args, **kwargs)
    monkeypatch.setattr(store, "advance", crash_then_advance)
    holder = Worker(fcfg)
    assert holder.renew_lease()
    with pytest.raises(Exception) as failure:
        refresh(fdriver, fcfg, lm, owner=holder.owner)
    assert crashed and "neo4j" in type(failure.value).__module__
    monkeypatch.setattr(store, "advance", advance)
    neo4j_local.start(fcfg)

    assert _user_vectors(fdriver, fcfg) == before, "a half-written run survived the crash"
    with fdriver.session(database=fcfg.neo4j_database) as s:
        assert store.refresh_state(s)["watermark"] == mark
    with Worker(fcfg).holding(timeout=30) as holder:
        run = refresh(fdriver, fcfg, lm, owner=holder.owner)
    assert run["mode"] == "incremental" and run["users"] > 0
    assert max_error(fdriver, fcfg, lm) < 1e-9


def _serve(port: int) -> subprocess.Popen:
    env = {**os.environ, **FAULT_ENV, "IG_PORT": str(port), "IG_WORKERS": "1"}
    return subprocess.Popen([sys.executable, "-m", "app", "serve"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _ready(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/readyz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise AssertionError("the API did not come up")


def test_api_killed_under_load_loses_no_accepted_event(fcfg, fdriver):
    """The API process killed (SIGKILL) while clients post, then started again: clients resend what got
    no answer, and every event ends in the graph exactly once."""
    from support.servers import free_port
    wipe(fdriver, fcfg.neo4j_database)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api = _serve(port)
    try:
        _ready(url)
        traffic = Traffic(url, clients=3, batches=30, size=20)
        traffic.threads = traffic.threads[:3]  # ingest only

        def client(c: int) -> None:  # as Traffic._client, also resending after a dropped connection
            with requests.Session() as http:
                for batch in traffic.batches[c]:
                    while True:
                        try:
                            reply = http.post(url + "/v1/events", json=batch, headers=SERVICE, timeout=30)
                        except requests.RequestException:
                            time.sleep(0.2)
                            continue
                        if reply.status_code == 200:
                            break
                        assert reply.status_code == 503, reply.text
                        time.sleep(0.2)
        threads = [threading.Thread(target=client, args=(c,)) for c in range(3)]
        for t in threads:
            t.start()
        time.sleep(3.0)
        os.killpg(api.pid, signal.SIGKILL)  # the server and its workers at once
        api.wait()
        api = _serve(port)
        for t in threads:
            t.join(180)
        assert not any(t.is_alive() for t in threads)
    finally:
        os.killpg(api.pid, signal.SIGKILL)
        api.wait()
    sent = {e["event_id"] for client in traffic.batches for batch in client for e in batch}
    with fdriver.session(database=fcfg.neo4j_database) as s:
        stored = s.run("MATCH (e:Event) RETURN collect(e.id) AS ids").single()["ids"]
        views = s.run("MATCH (:User)-[r:INTERACTED]->(:Item) RETURN sum(r.n_view) AS n").single()["n"]
    assert set(stored) == sent and len(stored) == len(sent) and views == len(sent)
