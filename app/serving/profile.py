"""A user's interests now and how the vector moved; churn risk with its reasons."""
from __future__ import annotations

import json
from collections import defaultdict
from datetime import datetime, timezone

from app import cypher
from app.errors import ApiError
from app.serving.ranking import read


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat()


def interests(session, user_key: str, user_id: str, k: int) -> dict:
    """The items and categories that weigh most in the user's interest, and the drift history; 404 if unknown."""
    rows = read(session, cypher.USER_INTERESTS, user_id=user_key)
    if not rows:
        raise ApiError(404, f"no user {user_id!r}", field="user_id")
    row = rows[0]
    items = sorted(row["items"], key=lambda r: (-r["weight"], r["item_id"]))
    categories = defaultdict(float)
    for item in items:
        if item["category"] is not None:
            categories[item["category"]] += item["weight"]
    return {"user_id": user_id, "version": row["version"], "refreshed_at": row["refreshed_at"],
            "items": items[:k],
            "categories": [{"category": c, "weight": w}
                           for c, w in sorted(categories.items(), key=lambda cw: (-cw[1], cw[0]))[:k]],
            "history": [{"at": _iso(at), "drift": d} for at, d in zip(row["drift_at"], row["drift"])]}


def churn_risk(session, k: int, min_events: int, max_edges: int) -> list[dict]:
    """The stored churn scores' top k (app/churn.py) once a churn model has scored; before that, users most
    overdue against their own rhythm (the ratio is the score, the reasons say what lies behind it)."""
    if read(session, cypher.CHURN_SCORED):
        return stored_churn(session, k, min_events)
    # The query scans every edge: past `max_edges` (IG_CHURN_MAX_EDGES) it would outlast the read's budget.
    edges = read(session, cypher.INTERACTED_EDGE_COUNT)[0]["n"]
    if edges > max_edges:
        raise ApiError(413, f"churn risk scans every edge: this graph has {edges}, more than the bound "
                            "IG_CHURN_MAX_EDGES", limit=max_edges)
    out = []
    for r in read(session, cypher.CHURN_RISK, k=k, min_events=min_events):
        moves = r.pop("moves")
        recent, previous = r["recent_items"], r["previous_items"]
        reasons = {
            "overdue": r["risk"],  # days silent over the user's typical gap between events
            "silent_days": r["silent_days"], "typical_gap_days": r["typical_gap_days"],
            "recent_items": recent, "previous_items": previous,
            "frequency_trend": round((recent - previous) / previous, 3) if previous else None,
            "drift_from_demand": r["drift"],
            "vector_moved": round(sum(moves), 4), "refreshes": len(moves),
        }
        out.append({"user_id": r["user_id"], "score": r["risk"], "reasons": reasons, **r})
    return out


def stored_churn(session, k: int, min_days: int) -> list[dict]:
    """The stored top k, most at risk first (an index read): P(no event in the horizon) and what drives it."""
    return [{"user_id": r["user_id"], "score": r["score"], "risk": r["score"], "silent_days": r["silent_days"],
             "typical_gap_days": r["typical_gap_days"],
             "reasons": {"contributions": json.loads(r["reasons"]), "version": r["version"],
                         "scored_at": r["scored_at"]}}
            for r in read(session, cypher.CHURN_TOP, k=k, min_days=min_days)]
