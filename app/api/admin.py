"""Admin triggers: reindex, retrain, job state and pipeline status (bearer token required)."""
from __future__ import annotations

import hmac
from functools import wraps

from flask import request
from flask_openapi3 import APIBlueprint, Tag

from app import jobs
from app.api import cfg, driver
from app.api.schemas import Anything, ErrorOut, JobOut, JobPath
from app.errors import ApiError
from app.status import status as pipeline_status

bp = APIBlueprint("admin", __name__, url_prefix="/admin", abp_tags=[Tag(name="admin")],
                  abp_security=[{"bearer": []}], abp_responses={401: ErrorOut, 403: ErrorOut})
MODES = ("incremental", "full")


def require_token(view):
    """401 without a bearer token, 403 with a wrong one (or when no token is configured)."""

    @wraps(view)
    def wrapped(*args, **kwargs):
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or not header[7:].strip():
            raise ApiError(401, "admin routes need 'Authorization: Bearer <token>'", field="Authorization")
        expected = cfg().admin_token
        if not expected:
            raise ApiError(403, "admin routes are disabled: IG_ADMIN_TOKEN is not set")
        if not hmac.compare_digest(header[7:].strip().encode(), expected.encode()):
            raise ApiError(403, "invalid admin token", field="Authorization")
        return view(*args, **kwargs)

    return wrapped


def _queue(kind: str, params: dict):
    with driver().session(database=cfg().neo4j_database) as s:
        job = jobs.create(s, kind, params)
    return {"job_id": job["id"], "state": job["state"]}, 202


@bp.post("/reindex", responses={202: JobOut, 400: ErrorOut})
@require_token
def reindex():
    """Queue a refresh: incremental (default) or full."""
    body = request.get_json(silent=True) if request.data else {}
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object like {\"mode\": \"full\"}")
    mode = body.get("mode", "incremental")
    if mode not in MODES:
        raise ApiError(400, f"mode must be one of {', '.join(MODES)}", field="mode")
    return _queue("reindex", {"mode": mode})


@bp.post("/retrain", responses={202: JobOut})
@require_token
def retrain():
    """Queue a retraining followed by a full re-embed under the new version."""
    return _queue("retrain", {"reason": "admin"})


@bp.get("/jobs/<job_id>", responses={200: Anything, 404: ErrorOut})
@require_token
def job(path: JobPath):
    """State, progress and result of a job."""
    job_id = path.job_id
    with driver().session(database=cfg().neo4j_database) as s:
        found = jobs.get(s, job_id)
    if found is None:
        raise ApiError(404, f"no job {job_id}", field="job_id")
    return found


@bp.get("/status", responses={200: Anything})
@require_token
def status():
    """Watermark, lag, recent runs, model version, node counts, active worker."""
    return pipeline_status(driver(), cfg())
