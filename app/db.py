"""One Neo4j driver per process, built from the Config."""
from __future__ import annotations

import threading

from neo4j import READ_ACCESS, Driver, GraphDatabase, Session

from app.config import Config

_lock = threading.Lock()
_drivers: dict[tuple, Driver] = {}


def get_driver(cfg: Config) -> Driver:
    """Return the process-wide driver for these connection settings (created lazily)."""
    key = (cfg.neo4j_uri, cfg.neo4j_user, cfg.neo4j_password)
    with _lock:
        if key not in _drivers:
            _drivers[key] = GraphDatabase.driver(
                cfg.neo4j_uri, auth=(cfg.neo4j_user, cfg.neo4j_password),
                connection_timeout=5.0, max_connection_pool_size=64,
                notifications_min_severity="OFF")
        return _drivers[key]



def read_session(driver: Driver, cfg: Config) -> Session:
    """A session whose auto-commit queries are reads (a cluster routes them to its readers)."""
    return driver.session(database=cfg.neo4j_database, default_access_mode=READ_ACCESS)
