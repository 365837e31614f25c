"""Group commit: concurrent ingest calls in one process share a transaction, each keeping its own counts."""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import deque
from concurrent.futures import Future

from neo4j.exceptions import DriverError, ResultFailedError, TransientError

from app.errors import Overloaded
from app.ingest import writer

log = logging.getLogger(__name__)

# Enough to amortise a commit and the lock rounds, small enough to keep a transaction short
# (the refresh job's watermark margin assumes commits land within seconds of timestamp()).
MAX_GROUP_EVENTS = 20_000
# Two, so one transaction runs in Neo4j while the other is packed or commits; their edge phases
# still queue on the sorted item locks (more threads measured no better).
WRITER_THREADS = 2
# The driver gives up on transient errors after a quarter of IG_NEO4J_TIMEOUT (so that an outage is
# reported fast); a deadlock with a refresh run is not an outage: try the group again a few times.
TRANSIENT_RETRIES = 5


def _cause(exc: BaseException) -> BaseException:
    """The error behind a failed result (the driver reports a statement's failure on the next result)."""
    return exc.__cause__ if isinstance(exc, ResultFailedError) and exc.__cause__ is not None else exc


def _shared_fault(exc: BaseException) -> bool:
    """True when a failure is Neo4j's state (unreachable, busy), not something in one batch."""
    return isinstance(_cause(exc), (DriverError, TransientError))


class GroupWriter:
    """Writer threads per process: each takes every batch queued meanwhile into its next transaction.

    While they write, request threads validate and clean the next batches, so Neo4j is never idle
    waiting for Python, and concurrent requests no longer queue on each other's item locks.
    """

    def __init__(self, driver, database: str, tx_timeout: float | None = None, *, secret: str):
        self.driver, self.database, self.tx_timeout, self.secret = driver, database, tx_timeout, secret
        self.pending: deque = deque()  # (events, counts, future), oldest first
        self.queued = 0  # events in `pending`
        self._cond = threading.Condition()
        for _ in range(WRITER_THREADS):
            threading.Thread(target=self._run, name="ingest-group-writer", daemon=True).start()

    def write(self, events: list[dict], counts: dict, timeout: float | None = None,
              max_queued: int | None = None) -> int:
        """Queue a batch, wait up to `timeout` s for its transaction to commit, return how many of its
        events were new. Overloaded, without waiting, while `max_queued` events wait already. On
        TimeoutError a batch still queued is dropped (never written); one whose transaction had begun
        may still commit: a resend is then a duplicate."""
        done: Future = Future()
        entry = (events, counts, done)
        with self._cond:
            if max_queued is not None and self.queued and self.queued + len(events) > max_queued:
                raise Overloaded(f"ingest queue full ({self.queued} events wait for a commit)")
            self.pending.append(entry)
            self.queued += len(events)
            self._cond.notify()
        try:
            return done.result(timeout)
        except TimeoutError:
            with self._cond:
                if done.cancel():  # still queued: no writer took it
                    self.pending.remove(entry)
                    self.queued -= len(events)
            raise

    def _take(self) -> list:
        """The oldest queued batches up to MAX_GROUP_EVENTS (at least one), marked running."""
        with self._cond:
            while not self.pending:
                self._cond.wait()
            group, size = [], 0
            while self.pending and (not group or size + len(self.pending[0][0]) <= MAX_GROUP_EVENTS):
                entry = self.pending.popleft()
                self.queued -= len(entry[0])
                size += len(entry[0])
                if entry[2].set_running_or_notify_cancel():
                    group.append(entry)
            return group

    def _run(self) -> None:
        while True:
            group = self._take()
            if group:
                self._commit(group)

    def _commit(self, group: list) -> None:
        """Write a group in one transaction; if a batch in it fails it, write each batch alone, so one
        client's bad batch fails only its own request."""
        try:
            for attempt in range(TRANSIENT_RETRIES + 1):
                try:
                    accepted = writer.write_batches(self.driver, self.database, [(e, c) for e, c, _ in group],
                                                    timeout=self.tx_timeout, secret=self.secret)
                    break
                except (TransientError, ResultFailedError) as exc:
                    # A deadlock can surface as a failed result, which the driver does not retry; the
                    # transaction rolled back whole either way.
                    if attempt == TRANSIENT_RETRIES or not isinstance(_cause(exc), TransientError):
                        raise
                    time.sleep(random.uniform(0.05, 0.2))  # the two writers must not collide again
        except BaseException as exc:  # noqa: BLE001 - every waiting request must hear of it
            if len(group) > 1 and not _shared_fault(exc):
                log.warning("group of %d batches failed (%s): writing them one by one", len(group),
                            type(exc).__name__)
                for part in group:
                    self._commit([part])
                return
            for _, _, done in group:
                done.set_exception(exc)
        else:
            for (_, _, done), n in zip(group, accepted):
                done.set_result(n)


_lock = threading.Lock()
_writers: dict[tuple, GroupWriter] = {}


def write_events(driver, database: str, events: list[dict], counts: dict, timeout: float | None = None,
                 tx_timeout: float | None = None, *, secret: str, max_queued: int | None = None) -> int:
    """`writer.write_events` through this process's group writer (created lazily, again after a fork);
    waits at most `timeout` s; each transaction runs at most `tx_timeout` s in Neo4j; Overloaded while
    `max_queued` events wait already."""
    key = (os.getpid(), id(driver), database, secret)
    with _lock:
        if key not in _writers:
            _writers[key] = GroupWriter(driver, database, tx_timeout, secret=secret)
    return _writers[key].write(events, counts, timeout, max_queued)
