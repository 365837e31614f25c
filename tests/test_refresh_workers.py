"""The refresh's writers against the real server: the lease, workers killed or replaced, CLI jobs and crashes."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from neo4j.exceptions import ClientError

from app import cypher, jobs
from app.config import load_config
from app.embeddings import full, models, store
from app.embeddings.refresh import refresh
from app.embeddings.training import train_and_publish
from app.ingest import pipeline, schema, writer
from app.status import status
from app.worker import Worker
from support.refresh import events, max_error, worker_owner
from support.servers import wait_for

from tests.test_refresh import TOLERANCE, _seq, exact_cfg, make_current, trained  # noqa: F401 (fixtures)


def _written(driver, cfg) -> dict:
    """What any writer of embeddings changes: the latest node write and the refresh record."""
    with driver.session(database=cfg.neo4j_database) as s:
        return s.run("MATCH (n) WHERE n:User OR n:Item WITH max(n.embedding_updated_at) AS at "
                     "MATCH (r:_Refresh {key: 'main'}) RETURN at, r.watermark AS watermark, "
                     "r.full_pending AS pending, r.recent AS recent").single().data()


def test_writers_without_the_lease_cannot_write(trained, cfg, exact_cfg, driver, lease):
    """No owner (as the CLI passed) or a stale one (a worker that lost the lease): nothing lands."""
    refresh(driver, exact_cfg, trained, owner=lease.owner)
    pipeline.ingest(driver, exact_cfg, events(random.Random(5), 3, 60, 40))
    before = _written(driver, cfg)
    for owner in (None, "stalled-host:1:0ld0wn"):
        with pytest.raises(store.LeaseLost):
            full.embed_full(driver, cfg, trained, owner=owner)
        with pytest.raises(store.LeaseLost):
            refresh(driver, exact_cfg, trained, owner=owner)
        with pytest.raises(store.LeaseLost):
            train_and_publish(driver, cfg, progress=False, owner=owner, train_model=False)
    assert _written(driver, cfg) == before
    assert refresh(driver, exact_cfg, trained, owner=lease.owner)["mode"] == "incremental"
    assert status(driver, cfg)["recent_runs"][0]["owner"] == lease.owner


def test_only_the_full_run_that_raised_full_pending_lowers_it(trained, cfg, driver, lease):
    """Neither an incremental run nor another full run may lower a full run's `full_pending`."""
    def pending():
        with driver.session(database=cfg.neo4j_database) as s:
            return store.refresh_state(s)["full_pending"]

    def advance(full_run):
        with driver.session(database=cfg.neo4j_database) as s:
            s.execute_write(lambda tx: store.advance(tx, 0, {"mode": "test"}, lease.owner, full_run=full_run))
    with driver.session(database=cfg.neo4j_database) as s:
        s.execute_write(lambda tx: store.set_full_pending(tx, lease.owner, "run-a", trained.version, False))
    try:
        advance(None)  # an incremental run
        advance("run-b")  # a full run that did not raise it
        assert pending()
        advance("run-a")
        assert not pending()
    finally:
        refresh(driver, cfg, trained, owner=lease.owner, full=True)  # a real watermark and run record again


def _queued_job(driver, cfg, proc: subprocess.Popen, log):
    """The job the CLI process queued, once it is there; fails at once if the CLI ended without one."""
    def queued():
        with driver.session(database=cfg.neo4j_database) as s:
            record = s.run("MATCH (j:Job {state: 'queued'}) RETURN j.id AS id").single()
        if record is None and proc.poll() is not None:
            raise AssertionError(f"the CLI ended without queueing a job: {log.read_text()[-2000:]}")
        return record and record["id"]
    return wait_for(queued)


@pytest.mark.parametrize("args", [("embed", "--full"), ("train", "--epochs", "1")])
def test_cli_train_and_embed_wait_for_the_active_worker(trained, cfg, driver, lease, tmp_path, args):
    """While a worker holds the lease, `embed --full` and `train` queue a job and the worker runs it."""
    log = tmp_path / "cli.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "app", *args], stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        job_id = _queued_job(driver, cfg, proc, log)
        assert lease.tick() is not None  # the active worker runs it
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    try:
        assert proc.returncode == 0, log.read_text()[-2000:]
        with driver.session(database=cfg.neo4j_database) as s:
            job = jobs.get(s, job_id)
        assert job["state"] == "succeeded" and job["owner"] == lease.owner and job["attempts"] == 1
        run = status(driver, cfg)["recent_runs"][0]
        assert run["mode"] == "full" and run["owner"] == lease.owner
        if args[0] == "train":
            assert json.JSONDecoder().raw_decode(out)[0]["version"] == run["version"] == models.current(driver, cfg).version
    finally:
        if args[0] == "train":
            full.embed_full(driver, cfg, trained, owner=lease.owner, publish=True)


def test_a_tick_works_off_a_backlog_in_back_to_back_runs(trained, exact_cfg, driver, lease, monkeypatch):
    """While a capped run leaves users waiting the worker runs again at once, not at its next tick."""
    refresh(driver, exact_cfg, trained, owner=lease.owner)  # nothing waits before
    now = int(time.time() * 1000)
    pipeline.ingest(driver, exact_cfg, [{"event_id": f"backlog-{now}-{k}", "user_id": f"backlog-{now}-{k}",
                                         "item_id": f"i{k}", "type": "view", "ts": now} for k in range(7)])
    monkeypatch.setattr(lease, "cfg", load_config(refresh_max_users=2, full_share=10.0))
    last = lease.tick()
    runs = status(driver, exact_cfg)["recent_runs"]
    assert last["mode"] == "incremental" and last["users_left"] == 0
    assert [r["users"] for r in runs[:4]] == [1, 2, 2, 2]
    assert max_error(driver, exact_cfg, trained) < TOLERANCE


def test_crash_before_the_version_switch_is_finished_on_restart(trained, cfg, driver, lease, monkeypatch):
    """A retrain dies after writing its vectors but before switching versions: the next run finishes it."""
    monkeypatch.setattr(cypher, "MODEL_SET_CURRENT", "RETURN 1 / 0 AS crash")  # dies at the switch
    with pytest.raises(ClientError):
        train_and_publish(driver, cfg, progress=False, owner=lease.owner, epochs=1)
    monkeypatch.undo()
    with driver.session(database=cfg.neo4j_database) as s:
        new = s.run("MATCH (m:Model) RETURN m.version AS v ORDER BY m.trained_at DESC LIMIT 1").single()["v"]
    try:
        lease.tick()  # a restarted worker's first run
        current = models.current(driver, cfg)
        assert current.version == new != trained.version
        assert max_error(driver, cfg, current) < TOLERANCE  # every vector is the new version's
    finally:
        full.embed_full(driver, cfg, trained, owner=lease.owner, publish=True)


# --- node changes are tracked by revision, like edges (defect 3) -------------

def _an_erasable_user(driver, cfg) -> str:
    with driver.session(database=cfg.neo4j_database) as s:
        return s.run("MATCH (u:User)-[:INTERACTED]->() RETURN u.id AS id ORDER BY id LIMIT 1").single()["id"]


@pytest.mark.parametrize("change", ["item update", "erasure"])
def test_node_change_committed_after_a_full_runs_export_is_refreshed(trained, exact_cfg, driver, lease,
                                                                     monkeypatch, change):
    """Stamped before the full run's snapshot, committed after its export: the next run still applies it
    (the full run records the revision it read, not its snapshot time)."""
    refresh(driver, exact_cfg, trained, owner=lease.owner)
    export = store.export
    with driver.session(database=exact_cfg.neo4j_database) as s:
        tx = s.begin_transaction()
        if change == "item update":
            tx.run(cypher.ITEM_UPSERT, rows=[{"id": "i7", "props": {"title": f"lamp {next(_seq)}",
                                                                    "category": "c9", "price": 99.0}}]).consume()
        else:
            assert tx.run(cypher.USER_DELETE, id=_an_erasable_user(driver, exact_cfg)).single()["items"] > 0

        def export_then_commit(*args, **kwargs):
            snap = export(*args, **kwargs)
            tx.commit()
            return snap
        monkeypatch.setattr(store, "export", export_then_commit)
        full.embed_full(driver, exact_cfg, trained, owner=lease.owner)
    monkeypatch.undo()
    run = refresh(driver, exact_cfg, trained, owner=lease.owner)
    assert run["mode"] == "incremental" and run["changed_nodes"] >= 1
    assert max_error(driver, exact_cfg, trained) < TOLERANCE


def _open_event(tx, cfg, raw: dict) -> None:
    """Write one event inside an open transaction, as the ingest path does."""
    (_, ev), = schema.validate_events([raw], cfg)[0]
    writer._write_tx(tx, [([pipeline.weigh(cfg, ev, ev.user_id)], {})], cfg.erasure_secret)


def test_changes_committed_long_after_their_stamp_are_refreshed(trained, exact_cfg, driver, lease):
    """A node or edge change whose transaction commits long after its `changed_at` (lock waits) is
    still found: change tracking uses revisions, with no clock margin to fall behind."""
    refresh(driver, exact_cfg, trained, owner=lease.owner)
    now = int(time.time() * 1000)
    with driver.session(database=exact_cfg.neo4j_database) as s:
        tx = s.begin_transaction()
        tx.run(cypher.ITEM_UPSERT, rows=[{"id": "i9", "props": {"title": f"slow {next(_seq)}"}}]).consume()
        _open_event(tx, exact_cfg, {"event_id": f"slow-{next(_seq)}", "user_id": "u4", "item_id": "i11",
                                    "type": "cart", "ts": now})
        with driver.session(database=exact_cfg.neo4j_database) as other:  # a run an hour after the stamps
            other.run("MATCH (r:_Refresh {key: 'main'}) SET r.watermark = timestamp() + 3600000").consume()
        tx.commit()
    run = refresh(driver, exact_cfg, trained, owner=lease.owner)
    assert run["mode"] == "incremental" and run["changed_edges"] == 1 and run["changed_nodes"] >= 1
    assert max_error(driver, exact_cfg, trained) < TOLERANCE


@pytest.mark.parametrize("when", ["export", "writes"])
def test_full_run_racing_ingest_leaves_the_events_to_the_next_run(trained, exact_cfg, driver, lease,
                                                                  monkeypatch, when):
    """Events committed while a full run exports (between its edge and node reads) or writes are
    applied exactly once, by the next incremental run."""
    refresh(driver, exact_cfg, trained, owner=lease.owner)
    # Some new users and items too; users of their own, since an id erased by an earlier test drops
    # its events from before the erasure.
    racing = [{**e, "user_id": f"race-{e['user_id']}"} for e in events(random.Random(next(_seq)), 6, 80, 45)]
    export, mark_edges = store.export, store.mark_edges

    def export_racing_ingest(tx, progress=None):
        class Racing:
            def run(self, query, **params):
                if query == cypher.EXPORT_USERS:
                    pipeline.ingest(driver, exact_cfg, racing)
                return tx.run(query, **params)
        return export(Racing(), progress)

    def mark_edges_racing_ingest(tx, rows):
        if racing:
            pipeline.ingest(driver, exact_cfg, racing)
            racing_done.extend(racing)
            racing.clear()
        mark_edges(tx, rows)
    racing_done = []
    if when == "export":
        monkeypatch.setattr(store, "export", export_racing_ingest)
    else:
        monkeypatch.setattr(store, "mark_edges", mark_edges_racing_ingest)
    pairs = {(e["user_id"], e["item_id"]) for e in racing}
    assert full.embed_full(driver, exact_cfg, trained, owner=lease.owner)["mode"] == "full"
    monkeypatch.undo()
    run = refresh(driver, exact_cfg, trained, owner=lease.owner)
    assert run["mode"] == "incremental" and run["changed_edges"] == len(pairs)
    assert max_error(driver, exact_cfg, trained) < TOLERANCE


# --- jobs (defect 6) --------------------------------------------------------

def test_a_worker_that_lost_the_lease_does_not_finish_its_job(trained, cfg, driver):
    """Its failing run must not mark the job failed: the job is the new holder's (requeued, then done)."""
    wait_for(lambda: worker_owner(driver, cfg) is None, timeout=30, step=0.2)
    stale, active = Worker(cfg), Worker(cfg)
    assert stale.renew_lease()
    with driver.session(database=cfg.neo4j_database) as s:
        job = jobs.create(s, "reindex", {"mode": "full"})
        claimed = jobs.claim_next(s, stale.owner)
        assert claimed["id"] == job["id"]
        s.run("MATCH (r:_Refresh {key: 'main'}) SET r.lease_until = 0").consume()  # the stale one stalls
    try:
        assert active.renew_lease()  # takes over and requeues the job

        def state():
            with driver.session(database=cfg.neo4j_database) as s:
                return jobs.get(s, job["id"])["state"]
        assert state() == "queued"
        assert stale._run_job(claimed) is None  # its run is fenced off ...
        assert state() == "queued"  # ... and it leaves the job alone
        assert active.tick()["mode"] == "full"
        assert state() == "succeeded"
        stale._run_job(claimed)  # late again: still nothing
        assert state() == "succeeded"
    finally:
        active.release()


def _finished(driver, cfg, job_id) -> bool:
    """The job succeeded and the refresh has caught up with every change."""
    with driver.session(database=cfg.neo4j_database) as s:
        state = jobs.get(s, job_id)["state"]
    return state == "succeeded" and status(driver, cfg)["lag_seconds"] == 0


def _worker(env_extra: dict, log=None) -> subprocess.Popen:
    """A worker process (short interval and lease); its log goes to the file `log` if given."""
    env = {**os.environ, "IG_REFRESH_INTERVAL": "0.2", "IG_LEASE_SECONDS": "2", **env_extra}
    err = open(log, "w") if log else subprocess.DEVNULL
    try:
        return subprocess.Popen([sys.executable, "-m", "app", "worker"], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    finally:
        if log:
            err.close()


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
        wait_for(full_in_progress, step=0.005)  # the full run has started writing: kill it now
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with driver.session(database=cfg.neo4j_database) as s:
            interrupted = store.refresh_state(s)["full_pending"]
        pipeline.ingest(driver, cfg, events(rng, 50, 420, 310))  # changes while no worker runs
        proc = _worker({})
        wait_for(lambda: _finished(driver, cfg, job["id"]), timeout=120)
        assert interrupted, "the kill landed after the run finished; the graph should be larger"
        wait_for(lambda: max_error(driver, cfg, trained) < TOLERANCE, timeout=30, step=0.5)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_standby_takes_over_when_active_worker_dies(trained, cfg, driver, tmp_path):
    first = _worker({})
    second = None

    def refreshed_by(user: str, proc) -> None:
        """An event of `user` gets embedded, by a run of `proc` (run records name their lease owner)."""
        now = int(time.time() * 1000)
        pipeline.ingest(driver, cfg, [{"event_id": f"{user}-{now}", "user_id": user, "item_id": "i2",
                                       "type": "cart", "ts": now}])

        def embedded():
            with driver.session(database=cfg.neo4j_database) as s:
                return s.run("MATCH (u:User {id: $id}) RETURN u.embedding IS NOT NULL AS e", id=user).single()["e"]
        wait_for(embedded, timeout=30)
        run = next(r for r in status(driver, cfg)["recent_runs"] if r["mode"] != "noop")
        assert f":{proc.pid}:" in run["owner"], run
    try:
        wait_for(lambda: f":{first.pid}:" in (worker_owner(driver, cfg) or ""))  # after any earlier lease lapses
        second = _worker({}, log=tmp_path / "second.log")
        # The second tried the lease and stands by (it would take it without the standby logic) ...
        wait_for(lambda: "standing by" in (tmp_path / "second.log").read_text(), timeout=30)
        refreshed_by("while-both-run", first)  # ... and only the first refreshes
        assert f":{first.pid}:" in worker_owner(driver, cfg)
        # Niced below the API and Neo4j (nice adds to the niceness it was started with).
        assert os.getpriority(os.PRIO_PROCESS, first.pid) == min(os.getpriority(os.PRIO_PROCESS, 0) + 10, 19)
        assert "is now active" not in (tmp_path / "second.log").read_text()
        first.send_signal(signal.SIGKILL)
        first.wait()
        wait_for(lambda: f":{second.pid}:" in (worker_owner(driver, cfg) or ""), timeout=30)
        refreshed_by("after-takeover", second)
    finally:
        for proc in (first, second):
            if proc:
                proc.kill()
                proc.wait()


def _nodes_written_since(driver, cfg, t0) -> tuple[int, int]:
    """(nodes whose embedding was written after `t0`, all nodes)."""
    with driver.session(database=cfg.neo4j_database) as s:
        r = s.run("MATCH (n) WHERE n:User OR n:Item RETURN count(n) AS total, "
                  "count(CASE WHEN n.embedding_updated_at > $t0 THEN 1 END) AS done", t0=t0).single()
    return r["done"], r["total"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["reindex", "retrain"])
def test_worker_killed_during_the_batch_writes_loses_nothing(trained, cfg, driver, kind):
    """Killed once some but not all nodes carry the full run's vectors (small batches): the next
    worker finishes that run (a retrain's version too, then current) and everything is exact."""
    wait_for(lambda: worker_owner(driver, cfg) is None, timeout=30, step=0.2)
    rng = random.Random(17)
    pipeline.ingest(driver, cfg, events(rng, 1500, 300, 200))
    with driver.session(database=cfg.neo4j_database) as s:
        t0 = s.run("RETURN datetime() AS t").single()["t"]
        params = {"mode": "full"} if kind == "reindex" else {"reason": "test", "epochs": 1}
        job = jobs.create(s, kind, params)
    proc = _worker({"IG_FULL_BATCH": "5"})
    try:
        def part_written():
            done, total = _nodes_written_since(driver, cfg, t0)
            return 0 < done < total
        wait_for(part_written, timeout=120, step=0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done, total = _nodes_written_since(driver, cfg, t0)
        assert 0 < done < total, (done, total)
        with driver.session(database=cfg.neo4j_database) as s:
            assert store.refresh_state(s)["full_pending"]
            newest = s.run("MATCH (m:Model) RETURN m.version AS v ORDER BY m.trained_at DESC LIMIT 1").single()["v"]
        pipeline.ingest(driver, cfg, events(rng, 50, 320, 210))  # changes while no worker runs
        proc = _worker({})
        wait_for(lambda: _finished(driver, cfg, job["id"]), timeout=180)
        current = models.current(driver, cfg)
        if kind == "retrain":  # the interrupted version was finished and switched to, not trained again
            assert current.version == newest != trained.version
        wait_for(lambda: max_error(driver, cfg, current) < TOLERANCE, timeout=30, step=0.5)
    finally:
        proc.kill()
        proc.wait()
        if kind == "retrain":
            make_current(cfg, driver, trained)


@pytest.mark.slow
def test_a_cli_job_longer_than_the_lease_runs_once(trained, cfg, driver):
    """The CLI renews the lease while it runs a job (here a retrain: training, then a full run in
    small batches), so a standby worker never takes the job over and runs it again."""
    wait_for(lambda: worker_owner(driver, cfg) is None, timeout=30, step=0.2)
    pipeline.ingest(driver, cfg, events(random.Random(19), 1500, 300, 200))
    env = {**os.environ, "IG_LEASE_SECONDS": "2", "IG_FULL_BATCH": "2"}
    cli = subprocess.Popen([sys.executable, "-m", "app", "retrain"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    standby = Worker(load_config(lease_seconds=2.0))  # in this process, so it is ready at once
    try:
        def running():
            with driver.session(database=cfg.neo4j_database) as s:
                record = s.run("MATCH (j:Job {state: 'running'}) RETURN j.id AS id, j.owner AS owner").single()
            return record and dict(record)
        job = wait_for(running)
        assert f":{cli.pid}:" in job["owner"]
        while cli.poll() is None:  # what a standby worker does: take the lease if it lapses, run jobs
            standby.tick()
            time.sleep(0.2)
        out = cli.stdout.read()
        with driver.session(database=cfg.neo4j_database) as s:
            job = jobs.get(s, job["id"])
            models_made = s.run("MATCH (m:Model) WHERE m.trained_at >= datetime({epochMillis: $t}) "
                                "RETURN count(m) AS n", t=job["created_at"]).single()["n"]
    finally:
        cli.kill()
        cli.wait()
        if standby.active:
            standby.release()
        make_current(cfg, driver, trained)
    assert cli.returncode == 0, out[-2000:]
    assert job["state"] == "succeeded" and f":{cli.pid}:" in job["owner"], job  # not taken over ...
    assert job.get("attempts") == 1 and models_made == 1, (job, models_made)  # ... nor run twice
    assert job["finished_at"] - job["started_at"] > 2 * 2000  # it did outlast the lease, twice over
