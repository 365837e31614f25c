"""Admin jobs (reindex, retrain) recorded in Neo4j, so they survive restarts."""
from __future__ import annotations

import json
import uuid

from app import cypher

KINDS = {"reindex", "retrain", "finetune"}


def _decode(job: dict) -> dict:
    for key in ("params", "result"):
        if job.get(key):
            job[key] = json.loads(job[key])
    return job


def create(session, kind: str, params: dict) -> dict:
    """Queue a job; the active worker picks it up."""
    job_id = uuid.uuid4().hex
    record = session.execute_write(lambda tx: tx.run(
        cypher.JOB_CREATE, id=job_id, kind=kind, params=json.dumps(params)).single())
    return _decode(record["job"])


def get(session, job_id: str) -> dict | None:
    """A job by id, or None."""
    record = session.execute_read(lambda tx: tx.run(cypher.JOB_GET, id=job_id).single())
    return _decode(record["job"]) if record else None


def claim_next(session, owner: str) -> dict | None:
    """Mark the oldest queued job running for lease holder `owner` and return it."""
    record = session.execute_write(lambda tx: tx.run(cypher.JOB_NEXT, owner=owner).single())
    return _decode(record["job"]) if record else None


def finish(session, job_id: str, owner: str, state: str, result: dict | None = None,
           error: str | None = None) -> bool:
    """Record a job's outcome; False (nothing written) unless `owner` runs it and holds the lease."""
    return session.execute_write(lambda tx: tx.run(
        cypher.JOB_FINISH, id=job_id, owner=owner, state=state, result=json.dumps(result) if result else None,
        error=error).single()["finished"]) > 0


def requeue_orphans(session, owner: str) -> int:
    """Put back jobs a dead worker left running."""
    return session.execute_write(lambda tx: tx.run(cypher.JOB_REQUEUE_ORPHANS, owner=owner).single()["requeued"])
