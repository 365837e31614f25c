"""The refresh worker: one active process per database, chosen by a lease held in Neo4j."""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from contextlib import contextmanager

from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger

from app import churn, cypher, jobs
from app.config import Config
from app.db import get_driver
from app.embeddings import models, store
from app.embeddings.finetune import fine_tune_and_publish
from app.embeddings.full import embed_full, interrupted
from app.embeddings.refresh import RunSize, refresh
from app.embeddings.store import LeaseLost
from app.embeddings.training import train_and_publish
from app.ingest import writer
from app.runtime import freeze_heap, limit_malloc_arenas

log = logging.getLogger(__name__)
# On SIGTERM the worker exits within this many seconds whatever Neo4j's state; a run still going
# is one transaction, which Neo4j rolls back when the connection closes.
STOP_GRACE = 3.0


def _token() -> str:
    """A new lease owner token: host, pid (to find the process) and a random part (never reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Worker:
    """Runs incremental refreshes, queued admin jobs and scheduled retraining under the lease."""

    def __init__(self, cfg: Config, progress: bool = False):
        self.cfg = cfg
        self.driver = get_driver(cfg)
        self.progress = progress
        self.owner = _token()  # replaced by a fresh token whenever the lease is taken anew
        self.active = None  # unknown until the first renewal
        self.stopping = threading.Event()  # set at SIGTERM/SIGINT: a backlog's next run is not started
        self.run_size = RunSize()

    def _session(self):
        return self.driver.session(database=self.cfg.neo4j_database)

    def renew_lease(self) -> bool:
        """Take or extend the lease; True while this worker is the active one.

        Taking it from another worker (or a lapsed one) starts a new tenure under a fresh owner token,
        so whatever this process began under an earlier tenure stays fenced out.
        """
        ttl_ms = int(self.cfg.lease_seconds * 1000)
        try:
            with self._session() as s:
                record = s.execute_write(lambda tx: tx.run(
                    cypher.LEASE_ACQUIRE, owner=self.owner, fresh=_token(), ttl_ms=ttl_ms).single())
                held = record is not None
                if held and (record["owner"] != self.owner or not self.active):
                    self.owner = record["owner"]
                    log.info("worker %s is now active", self.owner)
                    requeued = jobs.requeue_orphans(s, self.owner)
                    if requeued:
                        log.info("requeued %d job(s) left running by a previous worker", requeued)
                elif not held and self.active is not False:
                    log.info("worker %s standing by: another worker holds the lease", self.owner)
        except Exception:  # noqa: BLE001 - Neo4j away: not active until it answers again
            log.exception("lease renewal failed")
            held = False
        self.active = held
        return held

    @contextmanager
    def renewing(self):
        """Keep renewing the lease from a background thread while the block runs (the CLI's jobs;
        `run_forever` has its own schedule), so a job longer than the lease keeps it."""
        stop = threading.Event()

        def loop():
            while not stop.wait(self._renew_every()):
                self.renew_lease()
        thread = threading.Thread(target=loop, name="lease-renewal", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()

    @contextmanager
    def holding(self, timeout: float = 60.0):
        """Take the lease (waiting up to `timeout` s for another holder's to lapse), keep it renewed
        while the block runs, then release it: for writers outside `run_forever` (benchmarks, tests)."""
        deadline = time.monotonic() + timeout
        while not self.renew_lease():
            if time.monotonic() > deadline:
                raise LeaseLost(f"the refresh lease stayed held by another worker for {timeout:.0f}s")
            time.sleep(0.2)
        try:
            with self.renewing():
                yield self
        finally:
            self.release()

    def _renew_every(self) -> float:
        return max(self.cfg.lease_seconds / 3, 0.5)

    def tick(self) -> dict | None:
        """One scheduler run: a queued job if any, else incremental refreshes back to back while a capped
        run leaves changed users waiting (a backlog is not left to one run per interval); returns the last."""
        while True:
            result = self._step()
            if not (result and result.get("users_left")) or self.stopping.is_set():
                return result

    def _step(self) -> dict | None:
        """A queued job if any, else one incremental refresh."""
        if not self.renew_lease():
            return None
        owner = self.owner  # this tenure's token: if the lease changes hands, everything below is fenced
        try:
            with self._session() as s:
                job = jobs.claim_next(s, owner)
            if job:
                return self._run_job(job)
            lm = models.current(self.driver, self.cfg)
            if lm is None:
                return None
            started = time.monotonic()
            run = refresh(self.driver, self.cfg, lm, owner=owner, max_users=self.run_size.limit(self.cfg))
            self.run_size.update(self.cfg, run, time.monotonic() - started)
            return run
        except LeaseLost as exc:
            log.warning("%s", exc)
            self.active = False
        except Exception:  # noqa: BLE001 - keep the scheduler alive; the next run retries
            log.exception("refresh run failed")
        return None

    def _run_job(self, job: dict) -> dict | None:
        """Run a claimed job under the owner token it was claimed with, and record its outcome."""
        owner = job["owner"]
        log.debug("job %s (%s) started", job["id"], job["kind"])  # one INFO line per job: its outcome
        started = time.monotonic()
        try:
            result = self._job_result(job, owner)
        except Exception as exc:  # noqa: BLE001 - record the failure on the job
            log.exception("job %s (%s) failed after %.1fs", job["id"], job["kind"], time.monotonic() - started)
            with self._session() as s:
                if not jobs.finish(s, job["id"], owner, "failed", error=f"{type(exc).__name__}: {exc}"):
                    log.warning("job %s is no longer ours: left to the lease holder", job["id"])
            return None
        with self._session() as s:
            if not jobs.finish(s, job["id"], owner, "succeeded", result=result):
                log.warning("job %s is no longer ours: left to the lease holder", job["id"])
                return None
        log.info("job %s (%s) succeeded in %.1fs", job["id"], job["kind"], time.monotonic() - started)
        return result

    def _job_result(self, job: dict, owner: str) -> dict:
        """Run a claimed job as lease holder `owner`."""
        lm = models.current(self.driver, self.cfg)
        if job["kind"] == "retrain":
            with self._session() as s:
                state = store.refresh_state(s)
            target, publish = interrupted(self.driver, self.cfg, state, lm) if state["full_pending"] else (lm, False)
            if publish:  # a retrain interrupted after training (this job, requeued): finish that version
                return embed_full(self.driver, self.cfg, target, progress=self.progress, owner=owner,
                                  reason=f"interrupted retrain to {target.version}", publish=True)
            result = train_and_publish(self.driver, self.cfg, progress=self.progress, owner=owner,
                                       epochs=job["params"].get("epochs"))
            return {**result, "churn": self._churn_quietly(owner)}  # the churn model retrains with it
        if job["kind"] == "churn":
            return churn.run(self.driver, self.cfg, owner)
        if lm is None:
            raise RuntimeError("no trained model yet: run a retrain first")
        if job["kind"] == "finetune":
            return fine_tune_and_publish(self.driver, self.cfg, owner, progress=self.progress)
        full = job["params"].get("mode") == "full"
        return refresh(self.driver, self.cfg, lm, full=full, owner=owner, progress=self.progress)

    def enqueue_retrain(self) -> None:
        """Scheduled retraining: queue a job if this worker is the active one."""
        if self.active:
            with self._session() as s:
                jobs.create(s, "retrain", {"reason": "schedule"})

    def _churn_quietly(self, owner: str) -> dict:
        """The churn job after a retrain: its failure is recorded there, not the retrain's."""
        try:
            return churn.run(self.driver, self.cfg, owner)
        except Exception as exc:  # noqa: BLE001 - the published model stands; the scheduled churn job retries
            log.exception("churn scoring after the retrain failed")
            return {"error": f"{type(exc).__name__}: {exc}"}

    def enqueue_churn(self) -> None:
        """Scheduled churn retraining and rescoring (IG_CHURN_INTERVAL): queue a job if this worker is active."""
        if self.active:
            with self._session() as s:
                jobs.create(s, "churn", {"reason": "schedule"})

    def enqueue_finetune(self) -> None:
        """Scheduled streaming learning (IG_FINETUNE_CRON): queue a job if this worker is the active one."""
        if self.active:
            with self._session() as s:
                jobs.create(s, "finetune", {"reason": "schedule"})
    def purge_event_ids(self) -> int:
        """Delete expired event ids (bounded per run) if this worker is the active one."""
        if not self.active:
            return 0
        try:
            deleted = writer.purge_event_ids(self.driver, self.cfg.neo4j_database, self.cfg.dedup_retention_days,
                                             self.cfg.purge_batch, max_batches=100)
        except Exception:  # noqa: BLE001 - the next run retries
            log.exception("event id purge failed")
            return 0
        if deleted:
            log.info("purged %d event ids older than %g days", deleted, self.cfg.dedup_retention_days)
        return deleted

    def release(self) -> None:
        """Give the lease up at shutdown so a standby takes over at once."""
        with self._session() as s:
            s.execute_write(lambda tx: tx.run(cypher.LEASE_RELEASE, owner=self.owner).consume())

    def run_forever(self) -> None:
        """Block running the schedule until SIGTERM/SIGINT."""
        scheduler = BlockingScheduler(timezone="UTC")
        scheduler.add_job(self.tick, "interval", seconds=self.cfg.refresh_interval, id="refresh",
                          max_instances=1, coalesce=True)
        # Renewal runs on its own thread so a long job does not let the lease lapse.
        scheduler.add_job(self.renew_lease, "interval", seconds=self._renew_every(),
                          id="lease", max_instances=1, coalesce=True)
        scheduler.add_job(self.enqueue_retrain, CronTrigger.from_crontab(self.cfg.retrain_cron, timezone="UTC"),
                          id="retrain", max_instances=1, coalesce=True)
        scheduler.add_job(self.enqueue_churn, "interval", seconds=self.cfg.churn_interval, id="churn",
                          max_instances=1, coalesce=True)
        scheduler.add_job(self.purge_event_ids, "interval", seconds=self.cfg.purge_interval,
                          id="purge", max_instances=1, coalesce=True)

        if self.cfg.finetune_cron:  # off by default
            scheduler.add_job(self.enqueue_finetune, CronTrigger.from_crontab(self.cfg.finetune_cron, timezone="UTC"),
                              id="finetune", max_instances=1, coalesce=True)

        def stop(*_):
            self.stopping.set()
            scheduler.shutdown(wait=False)
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        freeze_heap()
        limit_malloc_arenas()
        # Refresh runs are background work: where they share cores with the API and Neo4j, requests
        # (whose answers never wait for a run) go first.
        os.nice(max(self.cfg.worker_nice, 0))
        log.info("worker %s started (interval %.1fs, retrain '%s')", self.owner,
                 self.cfg.refresh_interval, self.cfg.retrain_cron)
        try:
            scheduler.start()
        finally:
            self._stop(time.monotonic() + STOP_GRACE)

    def _stop(self, deadline: float) -> None:
        """Give the lease up if Neo4j answers in time, let a run in progress finish until `deadline`,
        then exit even if one still waits on Neo4j (its transaction is rolled back)."""
        if self.active:
            releaser = threading.Thread(target=self._release_quietly, name="lease-release", daemon=True)
            releaser.start()
            releaser.join(max(deadline - time.monotonic(), 0))
        busy = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
        for thread in busy:
            thread.join(max(deadline - time.monotonic(), 0))
        if any(t.is_alive() for t in busy):
            log.warning("worker %s stopping with a run in progress: Neo4j rolls it back", self.owner)
            logging.shutdown()
            os._exit(0)
        log.info("worker %s stopped", self.owner)

    def _release_quietly(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - Neo4j away: the lease lapses by itself
            log.warning("could not release the lease (Neo4j unreachable); it lapses in %.0fs",
                        self.cfg.lease_seconds)
