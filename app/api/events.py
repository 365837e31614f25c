"""Ingest endpoints: events in, item metadata, user erasure, ingest counters."""
from __future__ import annotations

import json

from flask import request
from flask_openapi3 import APIBlueprint, Tag

from app import metrics
from app.api import cfg, driver
from app.api.schemas import ErrorOut, IngestReport, ItemsReport, StatsOut, UserPath
from app.errors import ApiError
from app.ids import user_key
from app.ingest import cleaning, decay, log, pipeline, schema, writer
from app.runtime import freeze_heap

bp = APIBlueprint("events", __name__, abp_tags=[Tag(name="ingest")])
BATCH_ERRORS = {400: ErrorOut, 413: ErrorOut}


@bp.record_once
def _check_config(state) -> None:
    """Refuse to start with a decay anchor / half-life that would overflow edge weights."""
    decay.check_config(state.app.config["IG"])


@bp.record_once
def _freeze_startup_objects(state) -> None:
    """Exempt the objects that exist once the app is built from garbage collection scans."""
    freeze_heap()


def _batch() -> list:
    """The request body as a non-empty JSON array within the batch limit, else a 4xx that writes nothing."""
    body = request.get_data(cache=False)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise ApiError(400, f"body must be a JSON array, got {type(data).__name__ if data is not None else 'null'}")
    if not data:
        raise ApiError(400, "empty batch: send at least one element")
    if len(data) > cfg().batch_limit:
        raise ApiError(413, f"batch of {len(data)} exceeds the limit of {cfg().batch_limit}; split it",
                       limit=cfg().batch_limit)
    return data


def _partial(body: dict, rejected: list[dict]):
    """200 when all passed validation; 422 (with the report) when some did, naming the first problem."""
    if not rejected:
        return body
    first = rejected[0]
    message = f"{len(rejected)} element(s) rejected; first at index {first['index']}, field " \
              f"{first['field']}: {first['error']}"
    return {"error": {"status": 422, "message": message, "field": first["field"]}, **body}, 422


@bp.post("/v1/events", responses={200: IngestReport, 422: IngestReport, **BATCH_ERRORS})
def post_events():
    """Validate, clean and commit a batch of events (or, with IG_INGEST=kafka, append it to the event
    log); each event_id counts once."""
    if cfg().ingest == "kafka":
        report = pipeline.enqueue(cfg(), _batch(), wait=cfg().kafka_wait)
    else:
        report = pipeline.ingest(driver(), cfg(), _batch(), wait=cfg().ingest_wait)
    metrics.count_events(report)
    return _partial({"accepted": report.accepted, "duplicates": report.duplicates,
                     "rejected": report.rejected, "quarantined": report.quarantined}, report.rejected)


@bp.put("/v1/items", responses={200: ItemsReport, 422: ItemsReport, **BATCH_ERRORS})
def put_items():
    """Upsert item metadata; attributes become `attr_<name>` properties."""
    items, rejected = schema.validate_items(_batch())
    changed = writer.upsert_items(driver(), cfg().neo4j_database, pipeline.item_rows(items)) if items else 0
    return _partial({"upserted": len(items), "changed": changed, "rejected": rejected}, rejected)


@bp.delete("/v1/users/<user_id>", responses={204: None})
def delete_user(path: UserPath):
    """Erase a user, its edges and derived properties; idempotent."""
    user_id = path.user_id
    writer.delete_user(driver(), cfg().neo4j_database, user_key(cfg(), user_id), secret=cfg().erasure_secret)
    return "", 204


@bp.get("/v1/stats", responses={200: StatsOut})
def stats():
    """Event counts since the graph was created, and the refresh pipeline's public state (lag, model, runs)."""
    from app.status import public, status
    counts = writer.read_stats(driver(), cfg().neo4j_database, timeout=cfg().neo4j_timeout)
    head = {k: counts.pop(k, 0) for k in ("accepted", "duplicates", "rejected")}
    out = {**head, "dropped": {**dict.fromkeys(cleaning.REASONS, 0), **counts},
           "pipeline": public(status(driver(), cfg())), "ingest": cfg().ingest}
    if cfg().ingest == "kafka":
        out["log"] = log.lag_summary(cfg())
    return out

