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
