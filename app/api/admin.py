"""Admin triggers: reindex, retrain, fine-tune, job state and pipeline status (the admin token, checked
for every /admin path in app/api/auth.py)."""
from __future__ import annotations

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


def _queue(kind: str, params: dict):
    with driver().session(database=cfg().neo4j_database) as s:
        job = jobs.create(s, kind, params)
    return {"job_id": job["id"], "state": job["state"]}, 202


@bp.post("/reindex", responses={202: JobOut, 400: ErrorOut})
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
def retrain():
    """Queue a retraining followed by a full re-embed under the new version."""
    return _queue("retrain", {"reason": "admin"})


@bp.post("/finetune", responses={202: JobOut})
def finetune():
    """Queue a streaming update: fold in new items, fine-tune, publish only if not worse on the check."""
    return _queue("finetune", {"reason": "admin"})


@bp.get("/jobs/<job_id>", responses={200: Anything, 404: ErrorOut})
def job(path: JobPath):
    """State, progress and result of a job."""
    job_id = path.job_id
    with driver().session(database=cfg().neo4j_database) as s:
        found = jobs.get(s, job_id)
    if found is None:
        raise ApiError(404, f"no job {job_id}", field="job_id")
    return found


@bp.get("/status", responses={200: Anything})
def status():
    """Watermark, lag, recent runs, model version, node counts, active worker."""
    return pipeline_status(driver(), cfg())
