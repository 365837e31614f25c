"""Group commit: concurrent ingest calls in one process share a transaction, each keeping its own counts."""
from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import Future

from app.ingest import writer

# Enough to amortise a commit and the lock rounds, small enough to keep a transaction short
# (the refresh job's watermark margin assumes commits land within seconds of timestamp()).
MAX_GROUP_EVENTS = 20_000
# Two, so one transaction runs in Neo4j while the other is packed or commits; their edge phases
# still queue on the sorted item locks (more threads measured no better).
WRITER_THREADS = 2


class GroupWriter:
    """Writer threads per process: each takes every batch queued meanwhile into its next transaction.

    While they write, request threads validate and clean the next batches, so Neo4j is never idle
    waiting for Python, and concurrent requests no longer queue on each other's item locks.
    """

    def __init__(self, driver, database: str):
        self.driver, self.database = driver, database
        self.pending: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(WRITER_THREADS):
            threading.Thread(target=self._run, name="ingest-group-writer", daemon=True).start()

    def write(self, events: list[dict], counts: dict) -> int:
        """Queue a batch, wait for its transaction to commit, return how many of its events were new."""
        done: Future = Future()
        self.pending.put((events, counts, done))
        return done.result()

    def _run(self) -> None:
        while True:
            group = [self.pending.get()]
            size = len(group[0][0])
            while size < MAX_GROUP_EVENTS:
                try:
                    group.append(self.pending.get_nowait())
                except queue.Empty:
                    break
                size += len(group[-1][0])
            try:
                accepted = writer.write_batches(self.driver, self.database, [(e, c) for e, c, _ in group])
            except BaseException as exc:  # noqa: BLE001 - every waiting request must hear of it
                for _, _, done in group:
                    done.set_exception(exc)
            else:
                for (_, _, done), n in zip(group, accepted):
                    done.set_result(n)


_lock = threading.Lock()
_writers: dict[tuple, GroupWriter] = {}


def write_events(driver, database: str, events: list[dict], counts: dict) -> int:
    """`writer.write_events` through this process's group writer (created lazily, again after a fork)."""
    key = (os.getpid(), id(driver), database)
    with _lock:
        if key not in _writers:
            _writers[key] = GroupWriter(driver, database)
    return _writers[key].write(events, counts)
