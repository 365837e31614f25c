"""Answers scored on the API's copy of the graph: recommendations (filters, seen items, explain), similar items."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app import cypher
from app.errors import ApiError
from app.serving.state import State

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


def recommend(open_session, st: State | None, user_key: str, k: int, filters: Filters,
              explain: bool = False) -> dict:
    """A user's answer without the id: personal when the user has a vector, else trending.

    Scored on `st`, a state of the process's copy of the graph (app/serving/state.py), with no round
    trip to Neo4j; the vector is summed from the user's edges there: exactly what the next refresh run
    stores, so a shopper's first event personalises the answers from the copy's next sync on. While
    there is no model (`st` None) everyone gets trending items, read in a session from `open_session()`.
    """
    if st is None:
        with open_session() as session:
            return {"source": "trending", "version": None, "refreshed_at": None,
                    "results": read(session, cypher.TRENDING_ITEMS, k=k, user_id=user_key, **filters.params())}
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
    """Each result's `because`: the user's own items with the largest parts of its score (as docs/cypher.md)."""
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


def embedded(st: State | None, item_id: str) -> int:
    """The item's index in `st`; 404 for an item the copy's model does not embed (or no model)."""
    j = None if st is None else st.items.index.get(item_id)
    if j is None or j >= st.n_items or not st.items.embedded[j]:
        raise ApiError(404, f"no embedded item {item_id!r} (unknown, or not embedded yet)", field="item_id")
    return j


def similar(st: State | None, item_id: str, k: int, filters: Filters) -> dict:
    """Items a shopper who has only this item would be recommended (on `st`); 404 for an item not embedded."""
    j = embedded(st, item_id)
    x = st.x_rows(np.asarray([j]))[0]
    # one unit of aggregated weight on i: raw weight 1 / scale
    idx, scores = st.ranked(x, np.asarray([j]), np.asarray([1.0 / st.lm.scale]), k,
                            lambda at: st.mask(filters.category, filters.max_price, at=at) & (at != j))
    return {"version": st.lm.version, "results": st.answer(idx, scores)}
