"""Serving: recommendations, similar items, audiences and churn risk from the vector indexes."""
from __future__ import annotations

from flask_openapi3 import APIBlueprint, Tag

from app import cypher
from app.api import cfg, driver
from app.api.schemas import (AudienceOut, AudienceQuery, ChurnQuery, ErrorOut, ItemPath, RecsOut, RecsQuery,
                              SimilarOut, SimilarQuery, UserPath)
from app.errors import ApiError
from app.ids import user_key

bp = APIBlueprint("recs", __name__, url_prefix="/v1", abp_tags=[Tag(name="serving")],
                  abp_responses={400: ErrorOut})
MAX_CANDIDATES = 20_000  # widest index query when widening for an exact top k


def _k(k: int) -> int:
    """k within the configured bound (the schema holds the default bound)."""
    if k > cfg().max_k:
        raise ApiError(400, f"k must be at most {cfg().max_k}", field="k")
    return k


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


@bp.get("/users/<user_id>/recommendations", responses={200: RecsOut, 404: ErrorOut})
def recommendations(path: UserPath, query: RecsQuery):
    """Items for a user: inner product of the embeddings plus the live graph filter, unseen items only."""
    user_id = path.user_id
    key = user_key(cfg(), user_id)
    return {"user_id": user_id, **_ranked(cypher.RECOMMEND_ITEMS, _k(query.k), "User", key, "user_id",
                                          user_id=key)}


@bp.get("/items/<item_id>/similar", responses={200: SimilarOut, 404: ErrorOut})
def similar(path: ItemPath, query: SimilarQuery):
    """Items a shopper who has only this item would be recommended."""
    item_id = path.item_id
    return {"item_id": item_id, **_ranked(cypher.SIMILAR_ITEMS, _k(query.k), "Item", item_id, "item_id",
                                          item_id=item_id)}


@bp.get("/items/<item_id>/audience", responses={200: AudienceOut, 404: ErrorOut})
def audience(path: ItemPath, query: AudienceQuery):
    """Users nearest to an item (ad targeting); `include_known=true` keeps those who have it."""
    item_id = path.item_id
    rows = _query(cypher.ITEM_AUDIENCE, item_id=item_id, k=query.k, include_known=query.include_known)
    return {"item_id": item_id, **_answer(rows, "Item", item_id, "item_id")}


@bp.get("/users/churn-risk")
def churn_risk(query: ChurnQuery):
    """Users most overdue against their own purchase rhythm, with their drift from current demand."""
    rows = _query(cypher.CHURN_RISK, k=query.k, min_events=query.min_events)
    return {"results": rows}
