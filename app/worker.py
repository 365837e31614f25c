"""The refresh worker: one active process per database, chosen by a lease held in Neo4j."""
from __future__ import annotations

import logging
import os
import signal
import socket
import uuid

from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger

from app import cypher, jobs
from app.config import Config
from app.db import get_driver
from app.embeddings import models
from app.embeddings.refresh import refresh
from app.embeddings.store import LeaseLost
from app.embeddings.training import train_and_publish
from app.runtime import freeze_heap

log = logging.getLogger(__name__)


class Worker:
    """Runs incremental refreshes, queued admin jobs and scheduled retraining under the lease."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.driver = get_driver(cfg)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.active = False

    def _session(self):
        return self.driver.session(database=self.cfg.neo4j_database)

    def renew_lease(self) -> bool:
        """Take or extend the lease; True while this worker is the active one."""
        ttl_ms = int(self.cfg.lease_seconds * 1000)
        try:
            with self._session() as s:
                held = s.execute_write(lambda tx: tx.run(
                    cypher.LEASE_ACQUIRE, owner=self.owner, ttl_ms=ttl_ms).single()) is not None
                if held and not self.active:
                    log.info("worker %s is now active", self.owner)
                    requeued = jobs.requeue_orphans(s, self.owner)
                    if requeued:
                        log.info("requeued %d job(s) left running by a previous worker", requeued)
                elif not held and self.active:
                    log.warning("worker %s lost the lease; standing by", self.owner)
        except Exception:  # noqa: BLE001 - Neo4j away: not active until it answers again
            log.exception("lease renewal failed")
            held = False
        self.active = held
        return held

    def tick(self) -> dict | None:
        """One scheduler run: a queued job if any, else an incremental refresh."""
        if not self.renew_lease():
            return None
        try:
            with self._session() as s:
                job = jobs.claim_next(s, self.owner)
            if job:
                return self._run_job(job)
            lm = models.current(self.driver, self.cfg)
            if lm is None:
                return None
            return refresh(self.driver, self.cfg, lm, owner=self.owner)
        except LeaseLost as exc:
            log.warning("%s", exc)
            self.active = False
        except Exception:  # noqa: BLE001 - keep the scheduler alive; the next run retries
            log.exception("refresh run failed")
        return None

    def _run_job(self, job: dict) -> dict | None:
        log.info("job %s (%s) started", job["id"], job["kind"])
        try:
            if job["kind"] == "retrain":
                result = train_and_publish(self.driver, self.cfg, progress=False, owner=self.owner)
            else:
                lm = models.current(self.driver, self.cfg)
                if lm is None:
                    raise RuntimeError("no trained model yet: run a retrain first")
                full = job["params"].get("mode") == "full"
                result = refresh(self.driver, self.cfg, lm, full=full, owner=self.owner)
        except Exception as exc:  # noqa: BLE001 - record the failure on the job
            log.exception("job %s failed", job["id"])
            with self._session() as s:
                jobs.finish(s, job["id"], "failed", error=f"{type(exc).__name__}: {exc}")
            return None
        with self._session() as s:
            jobs.finish(s, job["id"], "succeeded", result=result)
        log.info("job %s succeeded", job["id"])
        return result

    def enqueue_retrain(self) -> None:
        """Scheduled retraining: queue a job if this worker is the active one."""
        if self.active:
            with self._session() as s:
                jobs.create(s, "retrain", {"reason": "schedule"})

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
        scheduler.add_job(self.renew_lease, "interval", seconds=max(self.cfg.lease_seconds / 3, 0.5),
                          id="lease", max_instances=1, coalesce=True)
        scheduler.add_job(self.enqueue_retrain, CronTrigger.from_crontab(self.cfg.retrain_cron, timezone="UTC"),
                          id="retrain", max_instances=1, coalesce=True)

        def stop(*_):
            scheduler.shutdown(wait=False)
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        freeze_heap()
        log.info("worker %s started (interval %.1fs, retrain '%s')", self.owner,
                 self.cfg.refresh_interval, self.cfg.retrain_cron)
        try:
            scheduler.start()
        finally:
            if self.active:
                self.release()
