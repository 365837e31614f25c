"""Exactness soak (issue 11): one short cycle of `support.soak.Soak` against the test server's app and
a `worker` subprocess; `bench/bench_soak.py` runs cycles for minutes against `serve` and `worker`.
"""
from __future__ import annotations

import json
import os

from app.serving import delta
from support.refresh import worker_owner
from support.servers import spawn, stop, wait_for
from support.soak import SUBPROCESS_ENV, Soak, seed
from support.soak_check import problems


def test_soak_every_writer_at_once_stays_exact(cfg, driver, base_url, tmp_path, monkeypatch):
    """Ingest from several clients (returns cancelling purchases, resent batches), item updates and
    erasures over HTTP (some ids erased and created again while a full run is under way), a worker, `train` and `embed --full` from the CLI, admin reindexes and a retrain,
    all at once while a reader asks for recommendations; drained, every stored value equals a full
    recompute, each answer has one known version, nothing answered 5xx, each event counts once. The
    versions trained during the soak are served from an item table, rebuilt at every sync here: drained,
    the readers' REST answers equal the offline Scorer's on the graph."""
    monkeypatch.setattr(delta, "TABLE_MAX_AGE_S", 0.0)
    wait_for(lambda: worker_owner(driver, cfg) is None, timeout=60, step=0.2)  # an earlier test's worker lapses
    seeded = seed(driver, cfg)
    env = {**os.environ, **SUBPROCESS_ENV, "IG_LIN_TABLE_EDGES": "1", "IG_LIN_TABLE_K": "8"}
    worker = spawn(["worker"], env, tmp_path / "worker.log")
    try:
        wait_for(lambda: f":{worker.pid}:" in (worker_owner(driver, cfg) or ""), timeout=60, step=0.2)
        report = Soak(base_url, driver, cfg, env, tmp_path, seeded, rankings=True).run()
    finally:
        stop(worker)
    assert not problems(report), json.dumps(report, indent=1, default=str)
    # The soak did what it says: every kind of load, several versions, both kinds of run.
    assert report["events"] > 100 and report["erasures"] > 5 and report["item_updates"] > 10, report
    assert report["recreated_in_full_runs"] > 0, report
    assert report["table_k"] == 8 and report["rankings_compared"], report
    assert report["answer_statuses"].get(200, 0) > 20 and report["zero_users"] > 0, report
    assert report["models"] >= 3 and report["cli"] == 2, report
    assert report["runs"].get("full", 0) >= 4 and report["runs"].get("incremental", 0) > 0, report
