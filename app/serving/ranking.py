"""Exact top-k answers of the scoring queries, with filters, seen-item exclusion and widening."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app import cypher
from app.errors import ApiError
from app.serving.state import State

MAX_CANDIDATES = 20_000  # widest index query before the filtered scan takes over
EXPLAIN_TOP = 3  # the user's items shown per recommended item
CONTENT_REASON = ("new item: scored from the items most like it in title, category and price, as your "
                  "interests score them")


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


def recommend(open_session, st: State | None, user_key: str, k: int, filters: Filters,
              explain: bool = False) -> dict:
    """A user's answer without the id: personal when the user has a vector, else trending.

    Scored on `st`, a state of the process's copy of the graph (app/serving/state.py), with no round
    trip to Neo4j; the vector is summed from the user's edges there: exactly what the next refresh run
    stores, so a shopper's first event personalises the answers from the copy's next sync on. Cypher
    answers (in a session from `open_session()`) only while there is no model (`st` None).
    """
    if st is None:
        with open_session() as session:
            return _recommend_cypher(session, user_key, k, filters, explain)
    cols, w, refreshed_at = st.row(user_key)
    seen = cols if filters.exclude_seen else None
    pos = w > 0
    cols, a = cols[pos], w[pos]
    p = st.vector(cols, a)
    if not p.any():  # no positive edge to an item the version knows: no vector
        # as TRENDING_ITEMS: by decayed popularity (the raw weights), whatever the graph filter reads
        ok = st.mask(filters.category, filters.max_price, seen, embedded=False) & (st.dr > 0)
        results = st.top(st.dr / st.dr.max() if st.dr.size and st.dr.max() > 0 else st.dr, ok, k)
        return {"source": "trending", "version": None, "refreshed_at": None, "results": results}
    idx, scores = st.ranked(p, cols, a, k, lambda at: st.mask(filters.category, filters.max_price, seen, at=at))
    results = st.answer(idx, scores)
    if explain and results:
        _explain(st, cols, a, results)
    return {"source": "personal", "version": st.lm.version, "refreshed_at": refreshed_at, "results": results}


def _explain(st, cols, a, results: list[dict]) -> None:
    """Each result's `because`: the user's own items with the largest parts of its score (EXPLAIN_ITEMS)."""
    targets = np.asarray([st.items.index[r["item_id"]] for r in results], dtype=np.int64)
    parts, bias = st.parts(cols, a, targets), st.bias(targets)
    k = min(EXPLAIN_TOP, len(cols))  # per result, its k largest parts (argpartition), then in order
    top = np.argpartition(-parts, k - 1, axis=0)[:k]
    order = np.take_along_axis(top, np.argsort(-np.take_along_axis(parts, top, 0), axis=0, kind="stable"), 0)
    own, weight = cols[order].T.tolist(), (a * st.lm.scale)[order].T.tolist()
    part = np.take_along_axis(parts, order, axis=0).T.tolist()
    ids, title, content = st.items.ids, st.items.title, st.items.content.at >= 0
    for n, (r, cs, ws, ps) in enumerate(zip(results, own, weight, part)):
        r["because"] = [{"item_id": ids[c], "title": title[c], "weight": w, "contribution": x,
                         "from_content": bool(content[c])} for c, w, x in zip(cs, ws, ps)]
        r["from_content"] = bool(content[targets[n]])
        if r["from_content"]:
            r["reason"] = CONTENT_REASON
        if bias is not None:
            r["bias"] = float(bias[n])


def similar(open_session, st: State | None, item_id: str, k: int, filters: Filters) -> dict:
    """Items a shopper who has only this item would be recommended (on `st`); 404 for an item not embedded."""
    j = None if st is None else st.items.index.get(item_id)
    if st is None or j is None or j >= st.n_items or not st.items.embedded[j]:
        with open_session() as session:
            return _similar_cypher(session, item_id, k, filters)
    x = st.x_rows(np.asarray([j]))[0]
    # one unit of aggregated weight on i: raw weight 1 / scale
    idx, scores = st.ranked(x, np.asarray([j]), np.asarray([1.0 / st.lm.scale]), k,
                            lambda at: st.mask(filters.category, filters.max_price, at=at) & (at != j))
    return {"version": st.lm.version, "results": st.answer(idx, scores)}


def _recommend_cypher(session, user_key: str, k: int, filters: Filters, explain: bool = False) -> dict:
    """`recommend` in Cypher alone (the live graph; docs/cypher.md's recipe)."""
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


def _similar_cypher(session, item_id: str, k: int, filters: Filters) -> dict:
    """`similar` in Cypher alone; 404 for an item not embedded."""
    row = ranked(session, (cypher.SIMILAR_ITEMS, cypher.SIMILAR_ITEMS_SCAN), k, item_id=item_id,
                 **{**filters.params(), "exclude_seen": False})
    if row is None:
        raise ApiError(404, f"no embedded item {item_id!r} (unknown, or not embedded yet)", field="item_id")
    return {"version": row["version"], "results": row["results"]}
