"""What the refresh pipeline is doing: watermark, lag, recent runs, model, counts."""
from __future__ import annotations

import json

from app import cypher
from app.config import Config
from app.db import read_session
from app.embeddings import models, store


def status(driver, cfg: Config) -> dict:
    """One snapshot of the pipeline's state, for `GET /admin/status` and `interest-graph status`."""
    with read_session(driver, cfg) as s:
        row = s.execute_read(lambda tx: dict(tx.run(cypher.REFRESH_STATUS).single()))
        counts = s.execute_read(lambda tx: tx.run(cypher.NODE_COUNT).single())
        oldest = store.oldest_pending(s) if row["watermark"] is not None else None
        tunes = s.execute_read(lambda tx: [dict(r) for r in tx.run(cypher.MODEL_FINE_TUNES, limit=5)])
    now = row["now"]
    model = models.current_info(driver, cfg)
    lease_live = bool(row["lease_owner"]) and (row["lease_until"] or 0) > now
    return {
        "watermark": row["watermark"],
        "lag_seconds": round((now - oldest) / 1000, 3) if oldest else 0.0,
        "pending_since": oldest,
        "recent_runs": [json.loads(r) for r in (row["recent"] or [])],
        "model": model and {"version": model["version"], "trained_at": model["trained_at"],
                            "metrics": model["metrics"], "fine_tuned_from": model["fine_tuned_from"],
                            "tuned_on": model["tuned_on"], "check": model["check"]},
        "fine_tunes": [{**t, "tuned_on": json.loads(t["tuned_on"] or "null"), "check": json.loads(t["check"] or "null")}
                       for t in tunes],
        "counts": {"users": counts["users"], "items": counts["items"]},
        "worker": {"owner": row["lease_owner"] if lease_live else None, "active": lease_live},
    }


RUN_FIELDS = ("mode", "reason", "version", "finished_at", "seconds", "changed_edges", "users", "items", "embeddings")


def public(state: dict) -> dict:
    """What anyone may see of `status()`: lag, freshness, model and runs, without worker identities."""
    runs = [{k: r[k] for k in RUN_FIELDS if k in r} for r in state["recent_runs"]]
    return {"lag_seconds": state["lag_seconds"],
            "last_refresh_at": next((r["finished_at"] for r in runs if r.get("finished_at")), None),
            "model": state["model"], "recent_runs": runs[:10], "counts": state["counts"],
            "worker_active": state["worker"]["active"]}
