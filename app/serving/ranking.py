"""Exact top-k answers of the scoring queries, with filters, seen-item exclusion and widening."""
from __future__ import annotations

from dataclasses import dataclass

from app import cypher
from app.errors import ApiError

MAX_CANDIDATES = 20_000  # widest index query before the filtered scan takes over
EXPLAIN_TOP = 3  # the user's items shown per recommended item


@dataclass(frozen=True)
class Filters:
    """What a caller admits: one category, a price cap (None: any), and whether seen items go."""

    category: str | None = None
    max_price: float | None = None
    exclude_seen: bool = True

    def params(self) -> dict:
        """The filters as query parameters."""
        return {"category": self.category, "max_price": self.max_price, "exclude_seen": self.exclude_seen}


def read(session, statement: str, **params) -> list[dict]:
    """Rows of a read query as dicts (a managed, retried transaction)."""
    return session.execute_read(lambda tx: [dict(r) for r in tx.run(statement, **params)])


def ranked(session, statements: tuple[str, str], k: int, **params) -> dict | None:
    """The exact top k of a scoring query over its two candidate sets (see RECOMMEND_ITEMS), or None
    when the query found no embedded node to score for.

    The index's `n` nearest are widened until the k-th score is at least the n-th nearest's inner
    product, so no item outside both sets could have made the list; filters only make that take
    longer. Past MAX_CANDIDATES the scan variant ranks every admitted item instead.
    """
    by_index, scan = statements
    n = 2 * k + 50
    while True:
        rows = read(session, by_index if n <= MAX_CANDIDATES else scan, k=k, n=n, **params)
        if not rows:
            return None
        row = rows[0]
        results, floor = row["results"], row["floor"]
        if n > MAX_CANDIDATES or floor is None or (len(results) >= k and results[-1]["score"] >= floor):
            return row
        n = 4 * n if 4 * n <= MAX_CANDIDATES else MAX_CANDIDATES + 1


def recommend(session, user_key: str, k: int, filters: Filters, explain: bool = False) -> dict:
    """A user's answer without the id: personal when the user has a vector, else trending."""
    params = {"user_id": user_key, **filters.params()}
    row = ranked(session, (cypher.RECOMMEND_ITEMS, cypher.RECOMMEND_ITEMS_SCAN), k, **params)
    if row is None:
        return {"source": "trending", "version": None, "refreshed_at": None,
                "results": read(session, cypher.TRENDING_ITEMS, k=k, **params)}
    results = row["results"]
    if explain and results:
        because = {r["item_id"]: r["because"] for r in read(
            session, cypher.EXPLAIN_ITEMS, user_id=user_key, item_ids=[r["item_id"] for r in results],
            top=EXPLAIN_TOP)}
        for r in results:
            r["because"] = because.get(r["item_id"], [])
    return {"source": "personal", "version": row["version"], "refreshed_at": row["refreshed_at"],
            "results": results}


def similar(session, item_id: str, k: int, filters: Filters) -> dict:
    """Items a shopper who has only this item would be recommended; 404 for an item not embedded."""
    row = ranked(session, (cypher.SIMILAR_ITEMS, cypher.SIMILAR_ITEMS_SCAN), k, item_id=item_id,
                 **{**filters.params(), "exclude_seen": False})
    if row is None:
        raise ApiError(404, f"no embedded item {item_id!r} (unknown, or not embedded yet)", field="item_id")
    return {"version": row["version"], "results": row["results"]}
