"""Serving: recommendations, similar items, audiences and churn risk from the vector indexes."""
from __future__ import annotations

from flask import Blueprint, request

from app import cypher
from app.api import cfg, driver
from app.errors import ApiError
from app.ids import user_key

bp = Blueprint("recs", __name__, url_prefix="/v1")
MAX_K = 500
MAX_CANDIDATES = 20_000  # widest index query when widening for an exact top k


def _int_arg(name: str, default: int, low: int = 1, high: int = MAX_K) -> int:
    raw = request.args.get(name, default)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise ApiError(400, f"{name} must be an integer", field=name) from None
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be between {low} and {high}", field=name)
    return value


def _query(statement: str, **params) -> list[dict]:
    with driver().session(database=cfg().neo4j_database) as s:
        return s.execute_read(lambda tx: [dict(r) for r in tx.run(statement, **params)])


def _answer(rows: list[dict], what: str, node_id: str, field: str) -> dict:
    embedded = cypher.USER_EMBEDDED if what == "User" else cypher.ITEM_EMBEDDED
    if not rows and not _query(embedded, id=node_id):
        raise ApiError(404, f"no embedded {what.lower()} {node_id!r} (unknown, or not embedded yet)",
                       field=field)
    version = rows[0].pop("version") if rows else None
    for row in rows[1:]:
        row.pop("version")
    return {"version": version, "results": rows}


def _ranked(statement: str, k: int, what: str, node_id: str, field: str, **params) -> dict:
    """The exact top k of a scoring query over its two candidate sets (see RECOMMEND_ITEMS).

    The index's `n` nearest are widened until the k-th score is at least the n-th nearest's inner
    product, so no item outside both sets could have made the list.
    """
    n = 2 * k + 50
    while True:
        rows = _query(statement, k=k, n=n, **params)
        if not rows:
            return _answer([], what, node_id, field)
        results = rows[0]["results"]
        floor = rows[0]["floor"]
        if floor is None or (len(results) >= k and results[-1]["score"] >= floor) or n >= MAX_CANDIDATES:
            return {"version": rows[0]["version"], "results": results}
        n = min(4 * n, MAX_CANDIDATES)


@bp.get("/users/<user_id>/recommendations")
def recommendations(user_id: str):
    """Items for a user: inner product of the embeddings plus the live graph filter, unseen items only."""
    key = user_key(cfg(), user_id)
    return {"user_id": user_id, **_ranked(cypher.RECOMMEND_ITEMS, _int_arg("k", 20), "User", key, "user_id",
                                          user_id=key)}


@bp.get("/items/<item_id>/similar")
def similar(item_id: str):
    """Items a shopper who has only this item would be recommended."""
    return {"item_id": item_id, **_ranked(cypher.SIMILAR_ITEMS, _int_arg("k", 20), "Item", item_id, "item_id",
                                          item_id=item_id)}


@bp.get("/items/<item_id>/audience")
def audience(item_id: str):
    """Users nearest to an item (ad targeting); `include_known=true` keeps those who have it."""
    include = request.args.get("include_known", "false").lower()
    if include not in ("true", "false"):
        raise ApiError(400, "include_known must be true or false", field="include_known")
    rows = _query(cypher.ITEM_AUDIENCE, item_id=item_id, k=_int_arg("k", 100, high=10_000),
                  include_known=include == "true")
    return {"item_id": item_id, **_answer(rows, "Item", item_id, "item_id")}


@bp.get("/users/churn-risk")
def churn_risk():
    """Users most overdue against their own purchase rhythm, with their drift from current demand."""
    rows = _query(cypher.CHURN_RISK, k=_int_arg("k", 50, high=10_000),
                  min_events=_int_arg("min_events", 3, low=2, high=1_000_000))
    return {"results": rows}
