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
from app.embeddings.refresh import items_side, refresh
from app.embeddings.training import train_and_publish
from app.ingest import pipeline, writer
from app.status import status
from app.worker import Worker
from tests.conftest import wipe

TYPES = ["view", "click", "cart", "purchase", "return"]
_seq = iter(range(10**9))


def events(rng: random.Random, n: int, users: int, items: int, now: int | None = None) -> list[dict]:
    """Random valid events over `users` x `items` ids."""
    now = now or int(time.time() * 1000)
    return [{"event_id": f"e{next(_seq)}-{rng.random()}", "user_id": f"u{rng.randrange(users)}",
             "item_id": f"i{rng.randrange(items)}", "type": rng.choice(TYPES), "quantity": rng.randint(1, 3),
             "ts": now - rng.randrange(30 * 86_400_000)} for _ in range(n)]


def max_error(driver, cfg, lm) -> float:
    """Largest |stored - full recompute| over every embedding (inf if any is missing)."""
    with driver.session(database=cfg.neo4j_database) as s:
        snap = s.execute_read(lambda tx: store.export(tx))
        stored = {(r["l"], r["id"]): (r["e"], r["v"]) for r in s.run(
            "MATCH (n:User|Item) RETURN labels(n)[0] AS l, n.id AS id, n.embedding AS e, "
            "n.embedding_version AS v")}
    out, uidx, iidx, _ = full.compute(lm, snap, cfg)
    worst = 0.0
    for label, ntype, index in (("User", "user", uidx), ("Item", "item", iidx)):
        expected = out["emb"][ntype].numpy()
        for node_id, row in index.items():
            vec, version = stored.get((label, node_id), (None, None))
            if vec is None or version != lm.version:
                return float("inf")
            worst = max(worst, float(np.abs(np.asarray(vec) - expected[row]).max()))
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
    st.tuples(st.just("item"), st.integers(0, 50), st.integers(0, 10**6)),
    st.tuples(st.just("delete"), st.integers(0, 70), st.integers(0, 10**6)),
    st.tuples(st.just("refresh"), st.just(0), st.just(0)),
    st.tuples(st.just("users"), st.just(0), st.just(0)),
    st.tuples(st.just("chunk"), st.integers(1, 12), st.just(0)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(op, min_size=1, max_size=6))
def test_incremental_equals_full_recompute(trained, exact_cfg, driver, ops):
    """New users and items, repeats, returns, metadata changes and deletions: still exact.

    Runs may do only the users' side (leaving the items' side pending across several runs) or a
    single small chunk of the items' side, in any order, before the final draining run.
    """
    for kind, n, seed in ops:
        rng = random.Random(seed)
        if kind == "events":  # ids beyond the seed graph are brand-new users and items
            pipeline.ingest(driver, exact_cfg, events(rng, n, 75, 50))
        elif kind == "item":
            writer.upsert_items(driver, exact_cfg.neo4j_database, [
                {"id": f"i{n}", "props": {"title": f"mug {rng.randrange(9)}", "category": f"c{rng.randrange(6)}",
                                          "price": rng.random() * 50}}])
        elif kind == "delete":
            writer.delete_user(driver, exact_cfg.neo4j_database, f"u{n}")
        elif kind == "users":
            refresh(driver, exact_cfg, trained, budget_s=0)
        elif kind == "chunk":
            items_side(driver, exact_cfg, trained, None, n)
        else:
            refresh(driver, exact_cfg, trained)
    run = refresh(driver, exact_cfg, trained)
    assert run["mode"] in ("incremental", "noop")
    assert max_error(driver, exact_cfg, trained) < 1e-5


def test_items_side_catches_up_after_several_users_side_runs(trained, exact_cfg, driver):
    """A user changed twice before its items' side ran: the items still get exactly its latest vector."""
    refresh(driver, exact_cfg, trained)
    now = int(time.time() * 1000)
    for k, item in enumerate(["i3", "i4", "i3"]):
        pipeline.ingest(driver, exact_cfg, [{"event_id": f"twice-{now}-{k}", "user_id": "u5", "item_id": item,
                                             "type": "cart", "ts": now}])
        run = refresh(driver, exact_cfg, trained, budget_s=0)
        assert run["mode"] == "incremental" and run["items_side"]["chunks"] == 0
    assert status(driver, exact_cfg)["items_side_pending"]["users"] >= 1
    assert max_error(driver, exact_cfg, trained) > 1e-5  # the items' side is still due
    while items_side(driver, exact_cfg, trained, None, 1):  # then one user per chunk
        pass
    assert status(driver, exact_cfg)["items_side_pending"] == {"users": 0, "items": 0}
    assert max_error(driver, exact_cfg, trained) < 1e-5


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
    assert run["nodes"] < total
    assert max_error(driver, exact_cfg, trained) < 1e-5


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
    assert max_error(driver, small, trained) < 1e-5


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
        _wait(lambda: max_error(driver, cfg, trained) < 1e-5, timeout=30, step=0.5)
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
