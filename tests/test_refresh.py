"""Incremental refresh against the real server: exactness, crash safety, lease, admin jobs."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import cypher, jobs
from app.config import load_config
from app.embeddings import full, models, store
from app.embeddings.refresh import refresh
from app.embeddings.training import train_and_publish
from app.ingest import pipeline, writer
from app.status import status
from app.worker import Worker
from tests.conftest import wipe

TYPES = ["view", "click", "cart", "purchase", "return"]
SEED_NOW = 1_767_225_600_000  # 2026-01-01: the seed graph is the same in every example
_seq = iter(range(10**9))


def events(rng: random.Random, n: int, users: int, items: int, now: int | None = None) -> list[dict]:
    """Random valid events over `users` x `items` ids."""
    now = now or int(time.time() * 1000)
    return [{"event_id": f"e{next(_seq)}-{rng.random()}", "user_id": f"u{rng.randrange(users)}",
             "item_id": f"i{rng.randrange(items)}", "type": rng.choice(TYPES), "quantity": rng.randint(1, 3),
             "ts": now - rng.randrange(30 * 86_400_000)} for _ in range(n)]


def max_error(driver, cfg, lm) -> float:
    """Largest difference between what is stored and a full recompute, over every stored value.

    Vectors are unit length (compared absolutely); norms and degrees are compared relative to their
    size (degrees carry the decay anchor's scale). inf if any value is missing or of another version.
    """
    with driver.session(database=cfg.neo4j_database) as s:
        snap = s.execute_read(lambda tx: store.export(tx))
        stored = {(r["l"], r["id"]): r["p"] for r in s.run(
            "MATCH (n:User|Item) RETURN labels(n)[0] AS l, n.id AS id, properties(n) AS p")}
    worst = 0.0
    for label, ntype in (("User", "user"), ("Item", "item")):
        for node_id, expected in zip(*full.compute(lm, snap)[ntype]):
            got = stored.get((label, node_id))
            if got is None or got.get("embedding_version") != lm.version:
                return float("inf")
            for key, want in expected.items():
                have = got.get(key)
                if want is None or have is None:
                    if want is not have:
                        return float("inf")
                elif isinstance(want, list):
                    worst = max(worst, float(np.abs(np.asarray(have) - np.asarray(want)).max()))
                else:
                    worst = max(worst, abs(have - want) / max(abs(want), 1e-300))
    return worst


@pytest.fixture(scope="module")
def trained(cfg, driver):
    """A small graph with a trained current model and every node embedded."""
    wipe(driver, cfg.neo4j_database)
    clean_db = driver
    rng = random.Random(7)
    pipeline.ingest(clean_db, cfg, events(rng, 600, 60, 40))
    writer.upsert_items(clean_db, cfg.neo4j_database, [
        {"id": f"i{k}", "props": {"title": f"mug {k % 3}", "category": f"c{k % 4}", "price": 1.0 + k}}
        for k in range(40)])
    result = train_and_publish(clean_db, cfg, progress=False, epochs=1)
    return models.load(result["checkpoint"], result["version"])


@pytest.fixture(scope="module")
def exact_cfg(cfg):
    """Never fall back to a full recompute, so every run exercises the delta path."""
    return load_config(full_share=10.0)


op = st.one_of(
    st.tuples(st.just("events"), st.integers(1, 6), st.integers(0, 10**6)),
    st.tuples(st.just("cancel"), st.integers(0, 70), st.integers(0, 10**6)),
    st.tuples(st.just("item"), st.integers(0, 50), st.integers(0, 10**6)),
    st.tuples(st.just("delete"), st.integers(0, 70), st.integers(0, 10**6)),
    st.tuples(st.just("refresh"), st.just(0), st.just(0)),
)
TOLERANCE = 1e-9  # the path is float64 end to end; measured differences are ~1e-15


def reset(driver, cfg, lm) -> None:
    """The same small seed graph, embedded by `lm`, for every example: examples are independent."""
    with driver.session(database=cfg.neo4j_database) as s:
        s.run("MATCH (n) WHERE n:User OR n:Item OR n:Event OR n:_Refresh OR n:_IngestStats "
              "CALL { WITH n DETACH DELETE n } IN TRANSACTIONS OF 10000 ROWS").consume()
    pipeline.ingest(driver, cfg, events(random.Random(7), 300, 60, 40, now=SEED_NOW))
    refresh(driver, cfg, lm, full=True)


def cancel(driver, cfg, user: str, item: str, rng: random.Random) -> None:
    """Purchases, then returns that take the edge's weight back to exactly zero or below."""
    now = int(time.time() * 1000)
    batch = [{"event_id": f"c{next(_seq)}", "user_id": user, "item_id": item, "type": "purchase", "quantity": 1,
              "ts": now} for _ in range(rng.randint(1, 3))]
    batch += [{**e, "event_id": f"c{next(_seq)}", "type": "return"} for e in batch]
    pipeline.ingest(driver, cfg, batch)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(op, min_size=1, max_size=6))
def test_incremental_equals_full_recompute(trained, exact_cfg, driver, ops):
    """New users and items, repeats, returns that cancel purchases, metadata changes and erasures, with
    refreshes in between: every stored value equals a full recompute. Each example starts from the
    same freshly embedded graph, so examples are independent and shrinking is meaningful."""
    reset(driver, exact_cfg, trained)
    for kind, n, seed in ops:
        rng = random.Random(seed)
        if kind == "events":  # ids beyond the seed graph are brand-new users and items
            pipeline.ingest(driver, exact_cfg, events(rng, n, 75, 50))
        elif kind == "cancel":
            cancel(driver, exact_cfg, f"u{n}", f"i{rng.randrange(50)}", rng)
        elif kind == "item":
            writer.upsert_items(driver, exact_cfg.neo4j_database, [
                {"id": f"i{n}", "props": {"title": f"mug {rng.randrange(9)}", "category": f"c{rng.randrange(6)}",
                                          "price": rng.random() * 50}}])
        elif kind == "delete":
            writer.delete_user(driver, exact_cfg.neo4j_database, f"u{n}")
        else:
            refresh(driver, exact_cfg, trained)
    run = refresh(driver, exact_cfg, trained)
    assert run["mode"] in ("incremental", "noop")
    assert max_error(driver, exact_cfg, trained) < TOLERANCE


def test_weights_that_cancel_leave_exactly_zero(trained, exact_cfg, driver):
    """Purchases then returns across runs: degrees are summed again, not kept by differences, so a
    node whose weights all cancel has degree exactly 0 (and a user no vector), like a full recompute."""
    reset(driver, exact_cfg, trained)
    now, rng = int(time.time() * 1000), random.Random(1)
    for k, (kind, qty) in enumerate([("purchase", 1), ("purchase", 2), ("return", 1), ("return", 2)]):
        pipeline.ingest(driver, exact_cfg, [{"event_id": f"cz-{now}-{k}", "user_id": "zero-user",
                                             "item_id": "zero-item", "type": kind, "quantity": qty, "ts": now}])
        refresh(driver, exact_cfg, trained)
    with driver.session(database=exact_cfg.neo4j_database) as s:
        row = s.run("MATCH (u:User {id: 'zero-user'})-[r]->(i:Item {id: 'zero-item'}) "
                    "RETURN r.w AS w, u.ig_deg AS ud, i.ig_deg AS d, u.embedding AS e").single()
    assert row["w"] <= 0 and row["ud"] == 0.0 and row["d"] == 0.0 and row["e"] is None
    assert max_error(driver, exact_cfg, trained) < TOLERANCE


def test_incremental_touches_only_the_affected_nodes(trained, exact_cfg, driver):
    refresh(driver, exact_cfg, trained)
    pipeline.ingest(driver, exact_cfg, [{"event_id": f"solo-{time.time()}", "user_id": "solo-user",
                                         "item_id": "i1", "type": "view", "ts": int(time.time() * 1000)}])
    run = refresh(driver, exact_cfg, trained)
    assert run["mode"] == "incremental" and run["changed_edges"] == 1
    with driver.session(database=exact_cfg.neo4j_database) as s:
        total = store.node_count(s)
        has = s.run("MATCH (u:User {id: 'solo-user'}) RETURN u.embedding_version AS v").single()["v"]
    assert has == trained.version  # the brand-new user is embedded without retraining
    assert run["users"] == 1 and run["items"] == 1 and run["users"] + run["items"] < total
    assert max_error(driver, exact_cfg, trained) < TOLERANCE


@pytest.mark.parametrize("query", ["CHANGED_EDGES", "CHANGED_USERS", "CHANGED_ITEMS", "OLDEST_PENDING"])
def test_change_queries_seek_the_changed_at_index(cfg, driver, query):
    """A label or relationship scan here would make every run's cost grow with the graph."""
    def leaves(op):
        kids = op.get("children", [])
        return [x for c in kids for x in leaves(c)] if kids else [op["operatorType"]]
    with driver.session(database=cfg.neo4j_database) as s:
        plan = s.run("EXPLAIN " + getattr(cypher, query), since=0).consume().plan
    assert all("IndexSeek" in op for op in leaves(plan)), leaves(plan)


def test_large_change_falls_back_to_full_with_reason(trained, cfg, driver):
    small = load_config(full_share=0.01)
    pipeline.ingest(driver, small, events(random.Random(3), 20, 60, 40))
    run = refresh(driver, small, trained)
    assert run["mode"] == "full" and "affected set" in run["reason"]
    assert max_error(driver, small, trained) < TOLERANCE


def _worker(env_extra: dict) -> subprocess.Popen:
    env = {**os.environ, "IG_REFRESH_INTERVAL": "0.2", "IG_LEASE_SECONDS": "2", **env_extra}
    return subprocess.Popen([sys.executable, "-m", "app", "worker"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait(predicate, timeout: float = 60.0, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not reached in time")


def _owner(driver, cfg) -> str | None:
    return status(driver, cfg)["worker"]["owner"]


@pytest.mark.slow
def test_worker_killed_mid_run_loses_nothing(trained, cfg, driver):
    rng = random.Random(11)
    pipeline.ingest(driver, cfg, events(rng, 3000, 400, 300))  # a graph big enough for a slow full run
    with driver.session(database=cfg.neo4j_database) as s:
        job = jobs.create(s, "reindex", {"mode": "full"})
    proc = _worker({})
    try:
        def full_in_progress():
            with driver.session(database=cfg.neo4j_database) as s:
                return store.refresh_state(s)["full_pending"]
        _wait(full_in_progress, step=0.005)  # the full run has started writing: kill it now
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with driver.session(database=cfg.neo4j_database) as s:
            interrupted = store.refresh_state(s)["full_pending"]
        pipeline.ingest(driver, cfg, events(rng, 50, 420, 310))  # changes while no worker runs
        proc = _worker({})

        def done():
            with driver.session(database=cfg.neo4j_database) as s:
                state = jobs.get(s, job["id"])["state"]
            return state == "succeeded" and status(driver, cfg)["lag_seconds"] == 0
        _wait(done, timeout=120)
        assert interrupted, "the kill landed after the run finished; the graph should be larger"
        _wait(lambda: max_error(driver, cfg, trained) < TOLERANCE, timeout=30, step=0.5)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_standby_takes_over_when_active_worker_dies(trained, cfg, driver):
    first = _worker({})
    second = None
    try:
        _wait(lambda: f":{first.pid}:" in (_owner(driver, cfg) or ""))  # after any earlier lease lapses
        second = _worker({})
        time.sleep(1.5)
        assert f":{first.pid}:" in _owner(driver, cfg)  # the second one stands by
        first.send_signal(signal.SIGKILL)
        first.wait()
        _wait(lambda: f":{second.pid}:" in (_owner(driver, cfg) or ""), timeout=30)
        now = int(time.time() * 1000)
        pipeline.ingest(driver, cfg, [{"event_id": f"takeover-{now}", "user_id": "after-takeover",
                                       "item_id": "i2", "type": "cart", "ts": now}])

        def embedded():
            with driver.session(database=cfg.neo4j_database) as s:
                return s.run("MATCH (u:User {id: 'after-takeover'}) RETURN u.embedding IS NOT NULL AS e"
                             ).single()["e"]
        _wait(embedded, timeout=30)
    finally:
        for proc in (first, second):
            if proc:
                proc.kill()
                proc.wait()


def test_admin_routes_need_the_token(base_url):
    assert requests.post(f"{base_url}/admin/retrain", timeout=10).status_code == 401
    wrong = requests.post(f"{base_url}/admin/retrain", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 403 and wrong.json()["error"]["message"]


def test_admin_reindex_job_runs_and_survives_restart(trained, cfg, driver, base_url):
    auth = {"Authorization": f"Bearer {cfg.admin_token}"}
    bad = requests.post(f"{base_url}/admin/reindex", json={"mode": "sideways"}, headers=auth, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "mode"
    queued = requests.post(f"{base_url}/admin/reindex", json={"mode": "full"}, headers=auth, timeout=10)
    assert queued.status_code == 202
    job_id = queued.json()["job_id"]
    assert requests.get(f"{base_url}/admin/jobs/{job_id}", headers=auth, timeout=10).json()["state"] == "queued"
    worker = Worker(cfg)  # a worker started later finds the job in Neo4j (once earlier leases lapse)
    assert _wait(worker.tick, timeout=30, step=0.2)["mode"] == "full"
    worker.release()
    job = requests.get(f"{base_url}/admin/jobs/{job_id}", headers=auth, timeout=10).json()
    assert job["state"] == "succeeded" and job["result"]["mode"] == "full"
    state = requests.get(f"{base_url}/admin/status", headers=auth, timeout=10).json()
    assert state["model"]["version"] == trained.version
    assert state["recent_runs"][0]["mode"] == "full" and state["counts"]["users"] > 0
    missing = requests.get(f"{base_url}/admin/jobs/nope", headers=auth, timeout=10)
    assert missing.status_code == 404


def test_cli_reindex_runs_the_job_when_no_worker_is_active(trained, cfg, driver):
    _wait(lambda: _owner(driver, cfg) is None, timeout=30, step=0.2)  # earlier leases have lapsed
    done = subprocess.run([sys.executable, "-m", "app", "reindex", "--full"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"state": "succeeded"' in done.stdout and '"mode": "full"' in done.stdout
    shown = subprocess.run([sys.executable, "-m", "app", "status"], capture_output=True, text=True, check=True)
    assert '"lag_seconds"' in shown.stdout and trained.version in shown.stdout
