"""A state of the serving copy: the graph's edges, items and degrees as arrays, under one model version.

A state is never changed in place: a sync builds the next one (app/serving/delta.py), sharing the
arrays it leaves as they are, so concurrent requests each score on one consistent state.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from app.serving.content import ContentRows
from app.serving.matrices import edge_degrees, filter_matrix, neighbours, overlay_matrices, popularity, table, trend_sums
from app.serving.scoring import Scoring

if TYPE_CHECKING:  # a type only: a state is arrays, whoever read them
    from app.embeddings import models


class Index(Mapping):
    """Id -> row, never changed once made: a base shared by the states since the last compaction, and
    this state's own ids given or taken out since (few: copied by each sync). A row is given once."""

    __slots__ = ("_base", "_new", "_gone", "rows")

    def __init__(self, keys: Iterable = ()):
        base = {}
        for key in keys:
            base.setdefault(key, len(base))
        self._base, self._new, self._gone, self.rows = base, {}, frozenset(), len(base)

    @classmethod
    def _of(cls, base: dict, new: dict, gone: frozenset, rows: int) -> Index:
        index = cls.__new__(cls)
        index._base, index._new, index._gone, index.rows = base, new, gone, rows
        return index

    def __getitem__(self, key) -> int:
        row = self._new.get(key)
        if row is not None:
            return row
        if key in self._gone:
            raise KeyError(key)
        return self._base[key]

    def get(self, key, default=None):
        """The row of `key`, else `default`."""
        row = self._new.get(key)
        if row is not None:
            return row
        return default if key in self._gone else self._base.get(key, default)

    def __contains__(self, key) -> bool:
        return key in self._new or (key not in self._gone and key in self._base)

    def __iter__(self) -> Iterator:
        yield from (k for k in self._base if k not in self._gone and k not in self._new)
        yield from self._new

    def __len__(self) -> int:
        return len(self._base) - len(self._gone) + len(self._new)

    def with_ids(self, keys: Iterable) -> Index:
        """This index and a new row for each of `keys` it lacks, in order."""
        new, rows = dict(self._new), self.rows
        for key in keys:
            if key not in new and (key in self._gone or key not in self._base):
                new[key] = rows
                rows += 1
        return Index._of(self._base, new, self._gone, rows)

    def without(self, keys: Iterable) -> Index:
        """This index without `keys` (their rows are not given again)."""
        keys = set(keys)
        new = {k: r for k, r in self._new.items() if k not in keys}
        return Index._of(self._base, new, self._gone | (keys & self._base.keys()), self.rows)

    def flat(self) -> Index:
        """The same index with a base of its own (at a compaction: O(ids), like the compaction itself)."""
        if not self._new and not self._gone:
            return self
        base = self._base.copy()
        for key in self._gone:
            del base[key]
        base.update(self._new)
        return Index._of(base, {}, frozenset(), self.rows)


@dataclass(frozen=True)
class Items:
    """Item ids (an Index of columns, and the id of each column), and per-item arrays of this state."""

    index: Index
    ids: list
    title: np.ndarray
    category: np.ndarray
    price: np.ndarray  # NaN where unknown (no price filter admits it, as in Cypher)
    embedded: np.ndarray  # embedded by the state's model version
    rows: np.ndarray  # the version's table rows (its zero row for items it does not know)
    content: ContentRows  # rows from content of items without a trained row (app/serving/content.py)

    @cached_property
    def mix(self) -> Mix | None:
        """The items scored by the mix of the shopper's scores of the items they attend to (a version that
        mixes), with that attention over item columns; None when none is."""
        found = self.content.attention(self.rows, len(self.embedded))
        if found is None:
            return None
        cols, a = found
        return Mix(cols, a, a.T.tocsr())


@dataclass(frozen=True)
class Mix:
    """Items without a trained row that mix (columns), their attention over item columns (rows: those
    items), and its transpose (rows: item columns; which of them attend to each)."""

    cols: np.ndarray
    a: sp.csr_matrix
    by_item: sp.csr_matrix

    def of(self, values: np.ndarray) -> np.ndarray:
        """Each mixing item's attention mix of `values` (one per item column)."""
        return np.asarray(self.a @ values).ravel()


@dataclass(frozen=True)
class Rows:
    """Every edge of each user, raw stored weights of any sign and when each was first seen (ms), as
    CSR arrays (the base rows)."""

    ptr: np.ndarray
    cols: np.ndarray
    w: np.ndarray
    first: np.ndarray

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row r's item columns, raw weights and first times."""
        a, b = self.ptr[r], self.ptr[r + 1]
        return self.cols[a:b], self.w[a:b], self.first[a:b]


@dataclass(frozen=True)
class State(Scoring):
    """One consistent copy: the graph as of run `seq` of `epoch` and the writes seen since, under model
    version `lm.version`."""

    epoch: str | None
    seq: int
    lm: models.LoadedModel
    users: Index  # user id -> row; an erased user's row stays, empty, without its id
    n_users: int
    items: Items
    rows: Rows  # the base rows (all edges, raw weights)
    refreshed: np.ndarray  # per user row: when the stored vector was written (ISO string) or None
    base_csr: sp.csr_matrix  # the graph filter's R = f(w s) over the base's positive edges
    base_t: sp.csr_matrix  # R^T (items x users): the second product and explain's item rows
    keep: np.ndarray  # users whose base row is current (others: the overlay's)
    overlay: dict  # user row -> (item columns, raw weights, first times): a row's edges read since compaction
    over_csr: sp.csr_matrix
    over_t: sp.csr_matrix
    du: np.ndarray
    di: np.ndarray
    dn: np.ndarray  # positive edges per item
    dr: np.ndarray  # per item, the sum of its positive raw weights (`ig_deg`): trending's decayed popularity
    tn: np.ndarray  # per item, the trend's sum over positive edges of 2^((first - anchor) / half-life)
    # ms: the latest first time of a positive edge read (as graph_models.bias.trend anchors it: only
    # the ratio of two items' sums counts, and anchored at the data's last event it does not underflow).
    anchor: float
    server_ms: int  # Neo4j's clock when this state began reading (for erasures and pending writes)
    erasures: frozenset = field(default_factory=frozenset)  # (key, at) applied
    pending: dict = field(default_factory=dict)  # signatures of the pending writes read (SERVING_SYNC)
    table: np.ndarray | None = None  # C = R^T D_U^-1 R over the base rows, dense (None: past the size limit)
    # The overlay's change to C: C now = table + fix diag(fix_sign) fix^T (fix: items x overlay rows,
    # each row of R as now and as in the base, scaled by d_u^-1/2; None without an overlay or a table).
    fix: sp.csr_matrix | None = None
    fix_sign: np.ndarray | None = None
    # A version served from an item table (mcfg.lin_topk): the filter's rows of the base, each item's
    # lin_topk nearest items (graph_models.spectral.item_table), with the target tilt of the base's
    # degrees; built when the base is (load, compaction), at monotonic time `nbr_built`.
    nbr: sp.csr_matrix | None = None
    nbr_tilt: np.ndarray | None = None
    nbr_built: float = 0.0

    @property
    def n_items(self) -> int:
        """How many items (columns) the state has."""
        return len(self.items.embedded)

    def row(self, user_id: str) -> tuple[np.ndarray, np.ndarray, str | None]:
        """A user's edges as (item columns, raw weights) and when their vector was stored; empty if unknown."""
        r = self.users.get(user_id, self.n_users)
        if r >= self.n_users:
            return np.zeros(0, dtype=np.int64), np.zeros(0), None
        cols, w, _ = self.overlay[r] if r in self.overlay else self.rows.row(r)
        return cols, w, self.refreshed[r]


def built(epoch, seq: int, now: int, lm, users: Index, refreshed: np.ndarray, rows: Rows, item_rows: list[dict],
          item_index: dict, table_mb: float) -> State:
    """A whole state from what was read: every user's edges as `rows` (item columns of `item_index`, which
    the items of `item_rows`, SERVING_ITEMS records, join), at run `seq` of `epoch` and server time `now`."""
    for x in item_rows:
        item_index.setdefault(x["id"], len(item_index))
    item_ids = [None] * len(item_index)
    for i, j in item_index.items():
        item_ids[j] = i
    n_u, n_i = len(users), len(item_ids)
    anchor = float(rows.first[rows.w > 0].max(initial=0.0))
    base = filter_matrix(np.repeat(np.arange(n_u), np.diff(rows.ptr)), rows.cols, rows.w, (n_u, n_i), lm)
    items = item_arrays(item_rows, lm, Index(item_ids), item_ids, None, n_i)
    over_csr, over_t = overlay_matrices({}, n_u, n_i, lm)
    base_t, degrees = base.tocsc().T, edge_degrees(base)
    return State(epoch, seq, lm, users, n_u, items, rows, refreshed, base, base_t, np.ones(n_u, dtype=bool), {},
                 over_csr, over_t, server_ms=now, dr=popularity(rows, n_i), tn=trend_sums(rows, n_i, lm, anchor),
                 anchor=anchor, table=table(base_t, base, degrees["du"], table_mb), **degrees,
                 **neighbours(base, lm))


def item_arrays(rows: list[dict], lm, index: Index, ids: list, old: Items | None, n: int) -> Items:
    """Items with `rows` (SERVING_ITEMS records) applied over `old`, grown to n items."""
    def grown(a, fill, dtype):
        out = np.full(n, fill, dtype=dtype)
        if a is not None:
            out[:len(a)] = a
        return out

    title = grown(old and old.title, None, object)
    category = grown(old and old.category, None, object)
    price = grown(old and old.price, np.nan, np.float64)
    embedded = grown(old and old.embedded, False, bool)
    content = (old.content if old is not None else ContentRows.empty(0, lm.model.out_dim)).updated(
        lm, rows, [index[r["id"]] for r in rows], n)
    for r in rows:
        j = index[r["id"]]
        title[j], category[j] = r["title"], r["category"]
        price[j] = np.nan if r["price"] is None else r["price"]
        embedded[j] = r["version"] == lm.version
    done = 0 if old is None else len(old.rows)
    rows_ = lm.rows(ids[done:n]) if old is None else np.concatenate([old.rows, lm.rows(ids[done:n])])
    return Items(index, ids, title, category, price, embedded, rows_, content)

