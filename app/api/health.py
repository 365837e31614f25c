"""Liveness and readiness probes."""
from __future__ import annotations

from flask import jsonify
from flask_openapi3 import APIBlueprint, Tag

from app import cypher, migrate
from app.api import cfg, driver, serving_copy
from app.api.schemas import Anything
from app.errors import unavailable_reason

bp = APIBlueprint("health", __name__, abp_tags=[Tag(name="health")])


@bp.get("/healthz", responses={200: Anything})
def healthz():
    """The process is up."""
    return {"status": "ok"}


@bp.get("/readyz", responses={200: Anything, 503: Anything})
def readyz():
    """Neo4j answers, every migration is applied and the process's copy of the graph has loaded, else 503
    with the reason."""
    try:
        with driver().session(database=cfg().neo4j_database) as session:
            session.run(cypher.PING).consume()
        states = migrate.info(driver(), cfg().neo4j_database)
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        return _not_ready(unavailable_reason(exc) or "neo4j query failed")
    waiting = [s["file"] for s in states if s["state"] != "applied"]
    if waiting:
        return _not_ready(f"migrations not current: {', '.join(waiting)}")
    loading = serving_copy().ready()
    if loading:
        return _not_ready(loading)
    return {"status": "ready", "migrations": len(states)}


def _not_ready(reason: str):
    response = jsonify({"status": "unavailable", "error": {"status": 503, "message": reason}})
    response.status_code = 503
    response.headers["Retry-After"] = str(cfg().retry_after)
    return response
