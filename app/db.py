"""One Neo4j driver per process, built from the Config."""
from __future__ import annotations

import threading
import time

from neo4j import READ_ACCESS, Driver, GraphDatabase, Query, Session, unit_of_work

from app.config import Config

_lock = threading.Lock()
_drivers: dict[tuple, Driver] = {}


def driver_settings(cfg: Config) -> dict:
    """Timeouts that keep every wait on Neo4j within `cfg.neo4j_timeout` when it is away.

    The driver retries a failed managed transaction until `max_transaction_retry_time` has passed
    since the first failure, sleeping `initial_retry_delay` (x2 each time, +-20%) in between: with a
    quarter of the budget for both, a stopped server costs three attempts in under 0.8 of it, and a
    deadlock or a leader switch still gets its retries.
    """
    budget = cfg.neo4j_timeout
    return {"connection_timeout": budget / 2, "connection_acquisition_timeout": budget / 2,
            "max_transaction_retry_time": budget / 4, "initial_retry_delay": budget / 8}


def get_driver(cfg: Config) -> Driver:
    """Return the process-wide driver for these connection settings (created lazily)."""
    key = (cfg.neo4j_uri, cfg.neo4j_user, cfg.neo4j_password, cfg.neo4j_timeout)
    with _lock:
        if key not in _drivers:
            _drivers[key] = GraphDatabase.driver(
                cfg.neo4j_uri, auth=(cfg.neo4j_user, cfg.neo4j_password),
                max_connection_pool_size=64, notifications_min_severity="OFF", **driver_settings(cfg))
        return _drivers[key]


def timed(work, seconds: float):
    """`work` (a transaction function) with a server-side timeout: Neo4j aborts it after `seconds`."""
    return unit_of_work(timeout=seconds)(work)


class TimedReads:
    """A read session whose queries Neo4j aborts once `seconds` have passed since it was opened."""

    # A request's reads then answer (503 when Neo4j is too slow) within its budget, not the 30 s cap.

    def __init__(self, session: Session, seconds: float):
        self.session, self.deadline = session, time.monotonic() + seconds

    def __enter__(self) -> TimedReads:
        return self

    def __exit__(self, *exc) -> None:
        self.session.close()

    def _left(self) -> float:
        return max(self.deadline - time.monotonic(), 0.01)  # 0 would mean no timeout at all

    def execute_read(self, work, *args, **kwargs):
        """`Session.execute_read` within what is left of the budget."""
        return self.session.execute_read(timed(work, self._left()), *args, **kwargs)

    def run(self, statement: str, **params):
        """An auto-commit read within what is left of the budget."""
        return self.session.run(Query(statement, timeout=self._left()), **params)


def read_session(driver: Driver, cfg: Config) -> TimedReads:
    """A session for reads (a cluster routes them to its readers), within IG_NEO4J_TIMEOUT from now."""
    return TimedReads(driver.session(database=cfg.neo4j_database, default_access_mode=READ_ACCESS),
                      cfg.neo4j_timeout)
