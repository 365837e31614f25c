"""HTTP blueprints."""
from __future__ import annotations

from flask import current_app

from app.config import Config
from app.db import get_driver


def cfg() -> Config:
    """The app's Config."""
    return current_app.config["IG"]


def driver():
    """The process-wide Neo4j driver."""
    return get_driver(cfg())


def serving_copy():
    """This process's copy of the graph (app/serving/graph.py), with the configured bounds."""
    from app.serving import graph
    c = cfg()
    return graph.copy_of(driver(), c.neo4j_database, c.serving_sync_wait, c.serving_poll, c.serving_max_age,
                         c.explain_table_mb, secret=c.erasure_secret, start_wait=c.serving_start_wait)
