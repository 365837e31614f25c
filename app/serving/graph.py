"""The API's in-process copy of the interaction graph, kept current by polling Neo4j, so that a
request reads nothing from Neo4j.

A score is `p_u . q_j + lin(u, j)` (graph_models/model.py). The graph filter `lin` walks u-i-v-j over
the whole neighbourhood: in Cypher that is 10^5-10^6 rows a request. Here it is two sparse products
over a copy of the edges or, for a version served from an item table (past IG_LIN_TABLE_EDGES), the
table rows of the shopper's items, and then only the items they reach are ranked (`State.ranked`).
Each process loads the copy once, in the background, and then moves it by what changed: every
refresh run logs the users and items it recomputed (cypher.APPLIED_LOG), ingest marks what it wrote
as not yet reflected (`ig_unseen`, cypher.SERVING_SYNC), and the copy re-reads just those rows. A
sync runs in the background at most every `poll` seconds while requests come; a request finds the
copy at most that old (plus one sync), or waits up to `wait` for a sync when it is older than
`max_age` (a first request after a quiet spell). The user's vector is summed from the copy's row
of their live edges: exactly what the next refresh run stores, so a shopper's first event
personalises the answers from the next sync on, before any run.

A state is never changed in place: a sync builds the next one (sharing what only grows) and swaps
it in, so concurrent requests each score on one consistent state. Rows changed since the last
compaction live in a small overlay over the base matrices, so a sync costs what changed.

For `explain` without an item table, each process also keeps C = R^T D_U^-1 R of the base rows dense
(when the catalogue is small enough for IG_EXPLAIN_TABLE_MB): an answer's parts read its entries
instead of R's rows, and the overlay's change to it is a small product; a compaction folds that in.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import scipy.sparse as sp

from app import cypher
from app.embeddings import models
from app.errors import NotReady
from app.ids import erasure_key
from graph_models.bias import decayed, prior, with_bias
from graph_models.candidates import top_bias
from graph_models.spectral import degrees, item_table, normalised, target_tilt

log = logging.getLogger(__name__)

ERASURE_MARGIN_MS = 120_000  # beyond the longest transaction: an erasure that commits late is still found
# Ingest writes committing this much after their timestamp are still read by the next sync; later
# ones wait for the refresh run that reflects them (a second or so, longer in bursts).
PENDING_MARGIN_MS = 1_000
COMPACT_MIN, COMPACT_SHARE = 256, 0.05  # overlay rows past which it is folded into the base
# With an item table, an overlay older than this is folded in too, so that the table (built with the
# base) reflects every edge at most this long after the sync that read it, plus the build's time.
TABLE_MAX_AGE_S = 300.0
LOG_RETRIES, LOG_WAIT = 200, 0.005  # how long a background sync waits for committed runs' log entries to show


# The weights the graph filter reads (graph_models.spectral.lin_weights), applied to stored weight x scale.
_WEIGHTS = {"raw": lambda w: w, "log1p": np.log1p, "binary": lambda w: (w != 0).astype(np.float64)}


def filter_weights(lm) -> tuple:
    """The version's weight functions for the graph and for the scored user's own row."""
    mcfg = lm.mcfg
    graph_w = getattr(mcfg, "lin_weights", "raw")
    return _WEIGHTS[graph_w], _WEIGHTS[getattr(mcfg, "lin_user_weights", None) or graph_w]


class Index(dict):
    """User id -> row, shared by a copy's states; `rows` counts the rows ever given (none is given twice)."""

    rows = 0

    def add(self, key) -> int:
        """The row of `key`, a new one if it has none."""
        if key not in self:
            self[key] = self.rows
            self.rows += 1
        return self[key]


@dataclass(frozen=True)
class Items:
    """Item ids (append-only, shared), and per-item arrays of this state."""

    index: dict
    ids: list
    title: np.ndarray
    category: np.ndarray
    price: np.ndarray  # NaN where unknown (no price filter admits it, as in Cypher)
    embedded: np.ndarray  # embedded by the state's model version
    rows: np.ndarray  # the version's table rows (its zero row for items it does not know)


@dataclass(frozen=True)
class Rows:
    """Every edge of each user, raw stored weights of any sign and when each was first seen (ms), as
    CSR arrays (the base rows)."""

    ptr: np.ndarray
    cols: np.ndarray
    w: np.ndarray
    first: np.ndarray

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b = self.ptr[r], self.ptr[r + 1]
        return self.cols[a:b], self.w[a:b], self.first[a:b]


@dataclass(frozen=True)
class State:
    """One consistent copy: the graph as of run `seq` of `epoch` and the writes seen since, under model
    version `lm.version`."""

    epoch: str | None
    seq: int
    lm: models.LoadedModel
    users: Index  # user id -> row (shared); an erased user's row stays, empty, without its id
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
        return len(self.items.embedded)

    def row(self, user_id: str) -> tuple[np.ndarray, np.ndarray, str | None]:
        """A user's edges as (item columns, raw weights) and when their vector was stored; empty if unknown."""
        r = self.users.get(user_id, self.n_users)
        if r >= self.n_users:
            return np.zeros(0, dtype=np.int64), np.zeros(0), None
        cols, w, _ = self.overlay[r] if r in self.overlay else self.rows.row(r)
        return cols, w, self.refreshed[r]

    @cached_property
    def _inv_du(self) -> np.ndarray:
        return _inverse(self.du)

    @cached_property
    def _bias(self) -> np.ndarray | None:
        """The version's item biases plus the live trend's prior (graph_models.bias), None without biases."""
        if self.lm.bias is None:
            return None
        top = self.tn.max(initial=0.0)
        return self.lm.bias[self.items.rows] + prior(self.lm.mcfg, self.n_items, self.tn / top if top > 0 else self.tn)

    @cached_property
    def _inv_sqrt_di(self) -> np.ndarray:
        return _inverse(np.sqrt(self.di))

    @cached_property
    def _target_di(self) -> np.ndarray:
        """d_j^-beta, the filter's factor of the target item (GF-CF: beta = 1/2)."""
        beta = getattr(self.lm.mcfg, "lin_beta", 0.5)
        return self._inv_sqrt_di if beta == 0.5 else _inverse(self.di ** beta)

    def lin(self, cols: np.ndarray, a: np.ndarray) -> np.ndarray:
        """The graph filter of a row with stored weights `a` on item columns `cols`: f(a s) D_I^-1/2 R^T D_U^-1
        R D_I^-1/2, R the copy's f(w s) (`filter_weights`)."""
        if self.nbr is not None:
            out = np.zeros(self.n_items)
            cand, vals = self._reach(cols, a)
            out[cand] = vals
            return out
        isd = self._inv_sqrt_di
        y = np.zeros(self.n_items)
        y[cols] = filter_weights(self.lm)[1](a * self.lm.scale) * isd[cols]
        # Two full sparse products: cheaper than selecting the columns and rows a heavy row reaches.
        z = self.base_csr @ y
        if self.overlay:
            z = z * self.keep + self.over_csr @ y
        w = z * self._inv_du
        t = self.base_t @ (w * self.keep if self.overlay else w)
        if self.overlay:
            t += self.over_t @ w
        return t * self._target_di

    def _reach(self, cols: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The item table's filter of a row (as `lin`): the items its rows reach (sorted) and their values."""
        inside = cols < self.nbr.shape[0]  # items new since the table was built have no row yet
        f = filter_weights(self.lm)[1](a[inside] * self.lm.scale)
        ptr, c = self.nbr.indptr, cols[inside]
        lengths = ptr[c + 1] - ptr[c]
        at = np.repeat(ptr[c] - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
        targets, w = self.nbr.indices[at], self.nbr.data[at] * np.repeat(f, lengths)
        if 8 * len(at) > self.nbr.shape[0]:  # a wide reach: summing over the catalogue beats sorting
            dense = np.bincount(targets, weights=w, minlength=self.nbr.shape[0])
            cand = np.flatnonzero(dense)
            vals = dense[cand]
        else:
            cand, inv = np.unique(targets, return_inverse=True)
            vals = np.bincount(inv, weights=w, minlength=len(cand))
        return cand.astype(np.int64), vals if self.nbr_tilt is None else vals * self.nbr_tilt[cand]

    @cached_property
    def _top_bias(self) -> np.ndarray:
        """The items of highest bias, which every shopper's candidates include (graph_models.candidates)."""
        return top_bias(self._bias)

    def _candidates(self, cols: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """A table-served row's candidates (sorted) and their filter values, None when every item is scored
        (no table, or EASE, which reads every item)."""
        if self.nbr is None or self.lm.ease is not None:
            return None
        cand, vals = self._reach(cols, a)
        extra = np.setdiff1d(self._top_bias, cand, assume_unique=True)
        if not len(extra):
            return cand, vals
        order = np.argsort(np.concatenate([cand, extra]), kind="stable")
        return np.concatenate([cand, extra])[order], np.concatenate([vals, np.zeros(len(extra))])[order]

    def ranked(self, p: np.ndarray, cols: np.ndarray, a: np.ndarray, k: int,
               admit) -> tuple[np.ndarray, np.ndarray]:
        """The k best items that `admit(columns)` (a mask of them) lets through, best first, and their scores:
        a table-served row's candidates only, unless fewer than k of them are new to it or admitted
        (graph_models.candidates: the offline ranking's rule), else every item."""
        found = self._candidates(cols, a)
        if found is not None:
            cand, lin = found
            s = self._low(p, cand) + self.lm.mcfg.lin_weight * lin  # `_unbiased` at the candidates
            if self._bias is not None:
                s = s / _largest(s) + self._bias[cand]
            ok = admit(cand)
            if ok.sum() >= k and len(cand) - np.isin(cols, cand).sum() >= self.lm.mcfg.k:
                idx, s = cand[ok], s[ok]
                best = _best(s, k)
                return idx[best], s[best]
        s = self.scores(p, cols, a)
        idx = np.flatnonzero(admit(np.arange(self.n_items)))
        best = _best(s[idx], k)
        return idx[best], s[idx][best]

    def _low(self, p: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """p . q_j of items `cand`: their rows gathered, or (for many) every row's product, which is then cheaper."""
        rows, q = self.items.rows[cand], self.lm.q32
        if 4 * len(cand) > len(q):
            return (q @ p.astype(np.float32))[rows].astype(np.float64)
        return (q[rows] @ p.astype(np.float32)).astype(np.float64)

    def work(self, user_ids: list[str]) -> int:
        """Entries recommending to `user_ids` reads: per user, every edge of the copy (the exact filter's two
        sparse products), or their items' rows of the item table."""
        if self.nbr is None:
            return len(user_ids) * (self.base_csr.nnz + self.over_csr.nnz)
        return sum(len(self.row(u)[0]) for u in user_ids) * self.lm.mcfg.lin_topk

    def vector(self, cols: np.ndarray, a: np.ndarray) -> np.ndarray:
        """p_u of a row of positive raw weights `a` on `cols`: the sum of w * scale * x_i the refresh stores
        (app/embeddings/refresh.py)."""
        x = self.lm.tables[0]
        return (a * self.lm.scale) @ x[self.items.rows[cols]] if len(cols) else np.zeros(x.shape[1])

    def scores(self, p: np.ndarray, cols: np.ndarray, a: np.ndarray) -> np.ndarray:
        """Every item's score for a shopper with model-space vector `p` and raw edge weights `a` on `cols`
        (with item biases: divided by the largest magnitude, plus the bias, as graph_models.bias.with_bias)."""
        s = self._unbiased(p, cols, a)
        if self._bias is None:
            return s
        found = self._candidates(cols, a)
        if found is None:
            return with_bias(s[None, :], self._bias)[0].numpy()
        return s / _largest(s[found[0]]) + self._bias

    def _unbiased(self, p: np.ndarray, cols: np.ndarray, a: np.ndarray) -> np.ndarray:
        """`scores` before item biases: p . q_j plus the version's filter and EASE terms."""
        s = (self.lm.q32 @ p.astype(np.float32))[self.items.rows].astype(np.float64)
        mcfg = self.lm.mcfg
        if mcfg.lin_weight:
            s += mcfg.lin_weight * self.lin(cols, a)
        if self.lm.ease is not None:
            s += mcfg.ease_weight * self.lm.ease[self.items.rows[cols[a > 0]]].sum(axis=0)[self.items.rows]
        return s

    def parts(self, cols: np.ndarray, a: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Each own item's part of each target's score (rows: `cols`, columns: `targets`), as EXPLAIN_ITEMS;
        with item biases, divided as `scores` divides, so that the parts and `bias(targets)` add up to the score."""
        x, q = self.lm.tables
        s = self.lm.scale
        inner = (a * s)[:, None] * (x[self.items.rows[cols]] @ q[self.items.rows[targets]].T)
        mcfg, rows = self.lm.mcfg, self.items.rows
        if mcfg.lin_weight:
            fa = filter_weights(self.lm)[1](a * s) * mcfg.lin_weight
            inner += fa[:, None] * self._filter_block(cols, targets)
        if self.lm.ease is not None:
            inner += mcfg.ease_weight * (a > 0)[:, None] * self.lm.ease[np.ix_(rows[cols], rows[targets])]
        if self._bias is None:
            return inner
        p, found = self.vector(cols, a), self._candidates(cols, a)
        if found is None:
            return inner / _largest(self._unbiased(p, cols, a))
        cand, lin = found  # the candidates' scores alone, as `ranked` divides them
        return inner / _largest(self._low(p, cand) + self.lm.mcfg.lin_weight * lin)

    def bias(self, targets: np.ndarray) -> np.ndarray | None:
        """Each target's bias (the version's, plus the live trend's prior): its score's part that no own
        item has (None without biases)."""
        return None if self._bias is None else self._bias[targets]

    def _filter_block(self, cols: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """What one unit of filter weight on each of `cols` adds to each target's filter score: the item
        table's entries, or d_i^-1/2 C[i, j] d_j^-beta of the current rows."""
        if self.nbr is None:
            return self._inv_sqrt_di[cols][:, None] * self._co(cols, targets) * self._target_di[targets][None, :]
        n = self.nbr.shape[0]
        out = np.zeros((len(cols), len(targets)))
        ci, ti = cols < n, targets < n
        out[np.ix_(ci, ti)] = self.nbr[cols[ci]][:, targets[ti]].toarray()
        return out if self.nbr_tilt is None else out * _grown(self.nbr_tilt, self.n_items, 0.0)[targets][None, :]

    def _co(self, cols: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """C[cols, targets] of the current rows, C[i, j] = sum_u R[u, i] R[u, j] / d_u."""
        if self.table is None:
            # The targets' columns dense (users x targets) under the own items' rows of R^T: 1.5 ms
            # against 2.6 with a sparse-sparse product; the table's entries: 0.2 ms (docs/benchmarks.md).
            w = np.ascontiguousarray((self._rows_t(targets).toarray() * self._inv_du).T)
            return self._rows_t(cols) @ w
        n = len(self.table)  # items added since the table was built have no base edges: zeros
        ci, ti = cols < n, targets < n
        co = np.zeros((len(cols), len(targets)))
        co[np.ix_(ci, ti)] = self.table[targets[ti]][:, cols[ci]].T  # symmetric: whole rows, then a gather
        if self.fix is not None:
            co += self.fix[cols] @ (self.fix[targets].toarray() * self.fix_sign).T
        return co

    def _rows_t(self, items: np.ndarray) -> sp.csr_matrix:
        """The current rows `items` of R^T (len(items) x users)."""
        if not self.overlay:
            return self.base_t[items]
        return self.base_t[items] @ sp.diags(self.keep.astype(np.float64)) + self.over_t[items]

    def mask(self, category: str | None, max_price: float | None, seen: np.ndarray | None = None,
             embedded: bool = True, at: np.ndarray | None = None) -> np.ndarray:
        """Items admitted by the filters, without the `seen` columns: of every item, or of columns `at`."""
        items, sel = self.items, slice(None) if at is None else at
        ok = items.embedded[sel].copy() if embedded else np.ones(self.n_items if at is None else len(at), dtype=bool)
        if category is not None:
            ok &= items.category[sel] == category
        if max_price is not None:
            with np.errstate(invalid="ignore"):
                ok &= items.price[sel] <= max_price
        if seen is not None and len(seen):
            if at is None:
                ok[seen] = False
            else:
                ok &= ~np.isin(at, seen)
        return ok

    def top(self, scores: np.ndarray, ok: np.ndarray, k: int) -> list[dict]:
        """The k best admitted items, best first, as answer rows."""
        idx = np.flatnonzero(ok)
        idx = idx[_best(scores[idx], k)]
        return self.answer(idx, scores[idx])

    def answer(self, idx: np.ndarray, scores: np.ndarray) -> list[dict]:
        """Answer rows of item columns `idx` scored `scores`, in that order."""
        items = self.items
        price = items.price[idx]
        return [{"item_id": items.ids[j], "score": s, "title": t, "category": c, "price": None if math.isnan(p) else p}
                for j, s, t, c, p in zip(idx.tolist(), scores.tolist(), items.title[idx].tolist(),
                                         items.category[idx].tolist(), price.tolist())]


def _largest(s: np.ndarray) -> float:
    """The largest magnitude of `s`, 1 where there is none (what scores are divided by before biases)."""
    top = float(np.abs(s).max(initial=0.0))
    return top if top > 0 else 1.0


def _best(s: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest of `s`, largest first (ties: the lower position)."""
    idx = np.arange(len(s))
    if len(s) > k:
        idx = np.argpartition(-s, k - 1)[:k]
        idx.sort()
    return idx[np.argsort(-s[idx], kind="stable")]


def _inverse(x: np.ndarray) -> np.ndarray:
    """1 / x where x > 0, else 0 (a node without positive edges)."""
    return np.divide(1.0, x, out=np.zeros_like(x), where=x > 0)


def _pad(m, rows: int, cols: int):
    """CSR `m` grown to rows x cols with empty rows and columns (no copy of the entries)."""
    if m.shape == (rows, cols):
        return m
    indptr = np.concatenate([m.indptr, np.full(rows - m.shape[0], m.indptr[-1])])
    return sp.csr_matrix((m.data, m.indices, indptr), shape=(rows, cols))


def _grown(a: np.ndarray, n: int, fill) -> np.ndarray:
    """`a` copied into a length-n array, the new tail `fill`."""
    out = np.full(n, fill, dtype=a.dtype)
    out[:len(a)] = a
    return out


def _filter_matrix(r: np.ndarray, c: np.ndarray, w: np.ndarray, shape: tuple, lm) -> sp.csr_matrix:
    """The graph filter's R over edges (r, c) of raw weights `w`: f(w s) on the positive ones."""
    pos = w > 0
    return sp.csr_matrix((filter_weights(lm)[0](w[pos] * lm.scale), (r[pos], c[pos])), shape=shape)


def _trend_sums(rows: Rows, n_items: int, lm, anchor: float) -> np.ndarray:
    """State.tn summed whole over the positive edges of `rows` (zeros for a version without a trend)."""
    if not lm.mcfg.reads_trend:
        return np.zeros(n_items)
    pos = rows.w > 0
    return np.bincount(rows.cols[pos], weights=decayed(rows.first[pos], anchor, lm.mcfg.trend_halflife),
                       minlength=n_items)


def _popularity(rows: Rows, n_items: int) -> np.ndarray:
    """State.dr summed whole over the positive edges of `rows`."""
    pos = rows.w > 0
    return np.bincount(rows.cols[pos], weights=rows.w[pos], minlength=n_items)


def _overlay_matrices(overlay: dict, n_users: int, n_items: int, lm) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """The overlay's rows as R (users x items) and R^T, both CSR."""
    if overlay:
        r = np.concatenate([np.full(len(c), u, dtype=np.int64) for u, (c, _, _) in overlay.items()])
        c = np.concatenate([c for c, _, _ in overlay.values()])
        w = np.concatenate([w for _, w, _ in overlay.values()])
    else:
        r = c = np.zeros(0, dtype=np.int64)
        w = np.zeros(0)
    m = _filter_matrix(r, c, w, (n_users, n_items), lm)
    return m, m.tocsc().T


def _fits(n_items: int, limit_mb: float) -> bool:
    """Whether a dense items x items float64 table fits in `limit_mb`."""
    return n_items * n_items * 8 <= limit_mb * 2**20


def _table(base_t: sp.csr_matrix, base: sp.csr_matrix, du: np.ndarray, limit_mb: float) -> np.ndarray | None:
    """State.table of base rows R (None past `limit_mb`)."""
    if not _fits(base.shape[1], limit_mb):
        return None
    return (base_t @ sp.diags(_inverse(du)) @ base).toarray()


def _table_fix(st: State) -> tuple[sp.csr_matrix | None, np.ndarray | None]:
    """State.fix and fix_sign for `st`'s overlay: its rows now (+) and in the base (-), over d_u^1/2."""
    if st.table is None or not st.overlay:
        return None, None
    rows = np.fromiter(st.overlay, dtype=np.int64, count=len(st.overlay))
    now, was = st.over_csr[rows], st.base_csr[rows]

    def scaled(m):
        return sp.diags(_inverse(np.sqrt(np.asarray(m.sum(axis=1)).ravel()))) @ m
    fix = sp.vstack([scaled(now), scaled(was)]).T.tocsr()
    return fix, np.repeat([1.0, -1.0], len(rows))


def _folded_table(st: State, limit_mb: float) -> np.ndarray | None:
    """`st`'s table with its overlay's change folded in, grown to its items (a compaction)."""
    n = st.n_items
    if st.table is None or not _fits(n, limit_mb):
        return None
    table = np.zeros((n, n))
    b = len(st.table)
    table[:b, :b] = st.table  # a copy: states in use keep theirs
    if st.fix is not None:
        change = (st.fix @ sp.diags(st.fix_sign) @ st.fix.T).tocoo()
        table[change.row, change.col] += change.data
    return table


def _item_arrays(rows: list[dict], lm, index: dict, ids: list, old: Items | None, n: int) -> Items:
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
    for r in rows:
        j = index[r["id"]]
        title[j], category[j] = r["title"], r["category"]
        price[j] = np.nan if r["price"] is None else r["price"]
        embedded[j] = r["version"] == lm.version
    done = 0 if old is None else len(old.rows)
    rows_ = lm.rows(ids[done:n]) if old is None else np.concatenate([old.rows, lm.rows(ids[done:n])])
    return Items(index, ids, title, category, price, embedded, rows_)


class Copy:
    """A process's copy of one database's graph: the current State and how to move it.

    `current()` is what a request calls. It reads nothing from Neo4j while the copy's last sync began
    at most `max_age` seconds ago (past `poll` seconds it starts one in the background); an older
    copy waits up to `wait` seconds for a sync that begins after that. `max_age` 0 makes every answer
    reflect Neo4j as of the request (a sync each). The first load runs in the background too: a request
    waits for it up to `start_wait` seconds, then gets NotReady (503) rather than waiting for the whole
    load; `ready()` says whether it has ended.
    """

    def __init__(self, driver, database: str, wait: float = 0.25, poll: float = 0.5, max_age: float = 1.0,
                 table_mb: float = 256, *, secret: str):
        self.driver, self.database, self.secret = driver, database, secret  # secret: IG_ERASURE_SECRET
        self.wait, self.poll, self.max_age = wait, poll, max_age
        self.table_mb = table_mb  # State.table's bound
        self.state: State | None = None
        self.loaded = False  # whether a first load ended (state None then: no model)
        self.start_wait = 1.5
        self.synced = float("-inf")  # monotonic time the current state's sync began
        self.failed = float("-inf")  # monotonic time the last sync failed
        self._load_lock = threading.Lock()
        self._cond = threading.Condition()
        self._syncing = False
        self._sync_began = float("-inf")  # monotonic time the running sync began

    def current(self) -> State | None:
        """The copy for a request (None: no model)."""
        now = time.monotonic()
        if not self.loaded:
            self._await(lambda: self.loaded, self.start_wait)
            if not self.loaded:
                raise NotReady("the serving copy of the graph is loading; send the request again after Retry-After")
            return self.state
        if now - self.synced > self.max_age:
            self._await(lambda: self.synced >= now - self.max_age, self.wait)
        elif now - self.synced > self.poll:
            self._await(lambda: True, 0.0)
        return self.state

    def ready(self) -> str | None:
        """None once the first load has ended, else why requests cannot be answered yet (and a load starts)."""
        if self.loaded:
            return None
        self._await(lambda: self.loaded, 0.0)
        return "the serving copy of the graph is loading"

    def _await(self, done, wait: float) -> None:
        """Run background syncs, one at a time, until `done()`, waiting for them up to `wait` s (0: start one).
        A failed sync ends the wait: the request answers from the copy as it is. So does a sync already
        running longer than `wait` once the copy has loaded (a reload of the whole graph): requests do
        not each wait for it, they answer from the state they have until it ends."""
        began = time.monotonic()
        deadline = began + wait
        with self._cond:
            if self.loaded and self._syncing and began - self._sync_began > wait:
                return
            while True:
                if not self._syncing and (wait == 0 or not done()):
                    self._syncing, self._sync_began = True, time.monotonic()
                    threading.Thread(target=self._sync, daemon=True).start()
                left = deadline - time.monotonic()
                if done() or left <= 0 or self.failed >= began:
                    return
                self._cond.wait(left)

    def _sync(self) -> None:
        """Bring the copy to what Neo4j has now (off the request threads)."""
        try:
            with self._load_lock:
                started = time.monotonic()
                self.state = self._read(self.state)  # None: the graph has no model any more
                self.synced, self.loaded = started, True
        except Exception as exc:  # Neo4j away or the like: requests go on with the copy they have
            self.failed = time.monotonic()
            log.warning("serving copy: sync failed, answering from the copy as it is: %s", exc)
        finally:
            with self._cond:
                self._syncing = False
                self._cond.notify_all()

    def _read(self, st: State | None) -> State | None:
        started = time.monotonic()
        with self.driver.session(database=self.database) as session:
            nxt = session.execute_read(lambda tx: _advance(tx, st, self.table_mb, self.secret))
        if nxt is not None and nxt is not st:
            log.debug("serving copy at run %s (%.3fs)", nxt.seq, time.monotonic() - started)
        return nxt


def _advance(tx, st: State | None, table_mb: float, secret: str) -> State | None:
    """The next state, at the run Neo4j is at now: the logged runs and pending writes since `st` applied,
    or everything read again. `table_mb`: State.table's bound; `secret`: the erasure keys'."""
    if st is None:
        return _load(tx, table_mb)
    sync = tx.run(cypher.SERVING_SYNC, since=st.server_ms - PENDING_MARGIN_MS, seq=st.seq,
                  erased_since=st.server_ms - ERASURE_MARGIN_MS, first=st.lm.mcfg.reads_trend).single()
    seq = sync["head"]
    if st.epoch != sync["epoch"]:
        return _load(tx, table_mb)
    # What this window holds, to skip next time: ("e", user, item) -> edge revision, ("i", item) -> item's.
    pending = {("e", u, i): rev for u, i, rev, _, _ in sync["edges"]} | {("i", i): rev for i, rev in sync["items"]}
    patches = {}  # user -> {item: (raw weight, first time)} of the pending edges not read yet
    for u, i, rev, w, first in sync["edges"]:
        if st.pending.get(("e", u, i)) != rev:
            patches.setdefault(u, {})[i] = (w, first)
    changed_items = {i for i, rev in sync["items"] if st.pending.get(("i", i)) != rev}
    entries = sync["applied"]
    for _ in range(LOG_RETRIES):
        # A run seen committed (its number on _Refresh) can still be missing from a scan or seek of
        # _Applied for a few milliseconds (measured on Neo4j 5.26: about one sync in four under a 1 s
        # refresh), and for more than 0.1 s while ingest bursts saturate the server (every reload of
        # a 10-minute soak fell in a burst). Wait until every entry up to `seq` shows, the last one or
        # one in between, rather than read the whole graph again: requests do not wait for this.
        last = entries[-1]["seq"] if entries else st.seq
        if seq <= last and len(entries) == last - st.seq:
            break
        time.sleep(LOG_WAIT)
        entries = list(tx.run(cypher.APPLIED_SINCE, seq=st.seq))
    # Only a run of entries with no gap moves the copy: a missing one (no longer logged, or still not
    # showing after the wait) may have changed rows that no later entry names.
    contiguous = [e["seq"] for e in entries] == list(range(st.seq + 1, st.seq + 1 + len(entries)))
    if (seq > st.seq and not entries) or not contiguous or any(e["full"] for e in entries):
        return _load(tx, table_mb)  # a full run, or an entry missing
    users = {u for e in entries for u in e["users"]}
    items = {i for e in entries for i in e["items"]} | changed_items
    erased = {(key, at) for key, at in sync["erased"]}
    fresh = erased - st.erasures
    gone = set()  # ids of the users erased since `st`
    if fresh:
        keys = {key for key, _ in fresh}
        gone = {u for u in set(st.users) | users | set(patches) if erasure_key(secret, u) in keys}
        users |= gone
    if not entries and not users and not items and not patches:
        return _compacted(st, table_mb)  # nothing new (another sync got there first, or nothing was written)
    last = entries[-1]["seq"] if entries else st.seq
    patches = {u: p for u, p in patches.items() if u not in users}  # those rows are read whole
    nxt = _apply(tx, replace(st, pending=pending), last, sorted(users), sorted(items), sync["now"],
                 frozenset(erased), patches, table_mb)
    for u in gone:  # the id leaves the index (its row stays, empty), unless the user came back since
        if not len(nxt.row(u)[0]):
            nxt.users.pop(u, None)
    return nxt


def _load(tx, table_mb: float) -> State | None:
    """Everything read again, at the run Neo4j is at now (None without a current model)."""
    head = tx.run(cypher.SERVING_STATE).single()
    now = head["now"]
    info = tx.run(cypher.MODEL_CURRENT).single()
    if info is None:
        return None
    lm = models.load(info["path"], info["version"])
    users, item_index, refreshed = Index(), {}, []
    ptr, c, w, first = [0], [], [], []
    for rec in tx.run(cypher.SERVING_EDGES, first=lm.mcfg.reads_trend):
        users.add(rec["u"])
        refreshed.append(rec["refreshed_at"])
        c.extend(item_index.setdefault(i, len(item_index)) for i in rec["items"])
        w.extend(rec["w"])
        first.extend(rec["first"])  # empty for a version without a trend
        ptr.append(len(c))
    item_rows = [dict(x) for x in tx.run(cypher.SERVING_ITEMS)]
    rows = Rows(np.asarray(ptr, dtype=np.int64), np.asarray(c, dtype=np.int64), np.asarray(w, dtype=np.float64),
                np.asarray(first, dtype=np.float64) if first else np.zeros(len(c)))
    st = built(head["epoch"], head["seq"], now, lm, users, np.asarray(refreshed, dtype=object), rows, item_rows,
               item_index, table_mb)
    log.info("serving copy loaded: run %s, %d users, %d items, %d edges", st.seq, st.n_users, st.n_items,
             st.base_csr.nnz)
    return st


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
    base = _filter_matrix(np.repeat(np.arange(n_u), np.diff(rows.ptr)), rows.cols, rows.w, (n_u, n_i), lm)
    items = _item_arrays(item_rows, lm, item_index, item_ids, None, n_i)
    over_csr, over_t = _overlay_matrices({}, n_u, n_i, lm)
    base_t, degrees = base.tocsc().T, _degrees(base)
    return State(epoch, seq, lm, users, n_u, items, rows, refreshed, base, base_t, np.ones(n_u, dtype=bool), {},
                 over_csr, over_t, server_ms=now, dr=_popularity(rows, n_i), tn=_trend_sums(rows, n_i, lm, anchor),
                 anchor=anchor, table=_table(base_t, base, degrees["du"], table_mb), **degrees,
                 **_neighbours(base, lm))


def _compact(st: State) -> tuple[Rows, sp.csr_matrix]:
    """The overlay folded into the base rows (O(edges), rarely)."""
    n_u = st.n_users
    lengths = np.diff(st.rows.ptr)
    r = np.repeat(np.arange(len(lengths)), lengths)
    kept = st.keep[r]
    over = sorted(st.overlay.items())
    r = np.concatenate([r[kept]] + [np.full(len(c), u, dtype=np.int64) for u, (c, _, _) in over])
    c = np.concatenate([st.rows.cols[kept]] + [c for _, (c, _, _) in over])
    w = np.concatenate([st.rows.w[kept]] + [w for _, (_, w, _) in over])
    first = np.concatenate([st.rows.first[kept]] + [f for _, (_, _, f) in over])
    order = np.argsort(r, kind="stable")
    r, c, w, first = r[order], c[order], w[order], first[order]
    rows = Rows(np.searchsorted(r, np.arange(n_u + 1)), c, w, first)
    return rows, _filter_matrix(r, c, w, (n_u, st.n_items), st.lm)


def _apply(tx, st: State, seq: int, user_ids: list, item_ids: list, now: int, erasures: frozenset,
           patches: dict, table_mb: float) -> State:
    """`st` with the rows of `user_ids` and the metadata of `item_ids` read again, and the edges of
    `patches` (user -> {item: (raw weight, first time)}) set, as of run `seq`."""
    rows = {r["u"]: (r["items"], r["w"], r["first"], r["refreshed_at"])
            for r in (tx.run(cypher.SERVING_USER_EDGES, ids=user_ids, first=st.lm.mcfg.reads_trend) if user_ids else [])}
    users, index, ids = st.users, st.items.index, st.items.ids
    changed = list(user_ids) + sorted(patches)
    for u in changed:
        users.add(u)
    new_items = [i for its, _, _, _ in rows.values() for i in its if i not in index]
    new_items += [i for p in patches.values() for i in p if i not in index]
    for i in list(item_ids) + new_items:
        if i not in index:
            index[i] = len(ids)
            ids.append(i)
    n_u, n_i = users.rows, len(ids)
    # Only this state's users and items are read past here: the shared dicts may grow meanwhile.
    read = sorted(set(item_ids) | set(new_items))
    meta = [dict(x) for x in tx.run(cypher.SERVING_ITEMS_BY_ID, ids=read)] if read else []
    items = _item_arrays(meta, st.lm, index, ids, st.items, n_i)
    keep = _grown(st.keep, n_u, True)
    du = _grown(st.du, n_u, 0.0)
    refreshed = _grown(st.refreshed, n_u, None)
    base_rows = Rows(_grown(st.rows.ptr, n_u + 1, st.rows.ptr[-1]), st.rows.cols, st.rows.w, st.rows.first)
    overlay = dict(st.overlay)
    base_csr, base_t = _pad(st.base_csr, n_u, n_i), _pad(st.base_t, n_i, n_u)
    f = filter_weights(st.lm)[0]
    # Item degrees by differences, with each item's count of positive edges so that an item left
    # with none is exactly 0; summed again at each compaction, so rounding never accumulates far.
    di, dn, tn = _grown(st.di, n_i, 0.0), _grown(st.dn, n_i, 0), _grown(st.tn, n_i, 0.0)
    dr = _grown(st.dr, n_i, 0.0)
    trended, halflife, anchor = st.lm.mcfg.reads_trend, st.lm.mcfg.trend_halflife, st.anchor
    for u in changed:
        row = users[u]
        old_cols, old_w, old_first = overlay[row] if row in overlay else base_rows.row(row)
        if u in patches:  # the row as it was, with the pending edges set
            p = patches[u]
            new = np.fromiter((index[i] for i in p), dtype=np.int64, count=len(p))
            kept = ~np.isin(old_cols, new)
            cols = np.concatenate([old_cols[kept], new])
            w = np.concatenate([old_w[kept], np.fromiter((e[0] for e in p.values()), np.float64, count=len(p))])
            first = np.concatenate([old_first[kept], np.fromiter((e[1] for e in p.values()), np.float64, count=len(p))])
        else:
            its, w, first, refreshed[row] = rows.get(u, ([], [], [], None))
            cols = np.fromiter((index[i] for i in its), dtype=np.int64, count=len(its))
            w = np.asarray(w, dtype=np.float64)
            first = np.asarray(first, dtype=np.float64) if len(first) else np.zeros(len(w))
        overlay[row] = (cols, w, first)
        keep[row] = False
        old_pos, pos = old_w > 0, w > 0
        np.subtract.at(di, old_cols[old_pos], f(old_w[old_pos] * st.lm.scale))
        np.subtract.at(dn, old_cols[old_pos], 1)
        np.subtract.at(dr, old_cols[old_pos], old_w[old_pos])
        if trended:
            np.subtract.at(tn, old_cols[old_pos], decayed(old_first[old_pos], anchor, halflife))
        fw = f(w[pos] * st.lm.scale)
        np.add.at(di, cols[pos], fw)
        np.add.at(dn, cols[pos], 1)
        np.add.at(dr, cols[pos], w[pos])
        if trended:
            latest = first[pos].max(initial=anchor)
            if latest > anchor:  # a later first time: the sums anchored there instead (all scaled alike)
                tn *= decayed(anchor, latest, halflife)
                anchor = latest
            np.add.at(tn, cols[pos], decayed(first[pos], anchor, halflife))
        du[row] = fw.sum()
    di[dn == 0] = 0.0
    dr[dn == 0] = 0.0
    tn[dn == 0] = 0.0
    over_csr, over_t = _overlay_matrices(overlay, n_u, n_i, st.lm)
    st = replace(st, seq=seq, n_users=n_u, items=items, rows=base_rows, refreshed=refreshed, base_csr=base_csr,
                 base_t=base_t, keep=keep, overlay=overlay, over_csr=over_csr, over_t=over_t, du=du,
                 di=di, dn=dn, dr=dr, tn=tn, anchor=anchor, server_ms=now, erasures=erasures)
    st = replace(st, **dict(zip(("fix", "fix_sign"), _table_fix(st))))
    return _compacted(st, table_mb)


def _compacted(st: State, table_mb: float) -> State:
    """`st` with its overlay folded into the base when it has grown past its bound or, with an item table,
    has waited TABLE_MAX_AGE_S."""
    stale = st.nbr is not None and time.monotonic() - st.nbr_built > TABLE_MAX_AGE_S
    if st.overlay and (len(st.overlay) > max(COMPACT_MIN, COMPACT_SHARE * st.n_users) or stale):
        n_u, n_i = st.n_users, st.n_items
        base_rows, base_csr = _compact(st)
        over_csr, over_t = _overlay_matrices({}, n_u, n_i, st.lm)
        st = replace(st, rows=base_rows, base_csr=base_csr, base_t=base_csr.tocsc().T, keep=np.ones(n_u, dtype=bool),
                     overlay={}, over_csr=over_csr, over_t=over_t, dr=_popularity(base_rows, n_i),
                     tn=_trend_sums(base_rows, n_i, st.lm, st.anchor),
                     table=_folded_table(st, table_mb), fix=None, fix_sign=None, **_degrees(base_csr),
                     **_neighbours(base_csr, st.lm))
    return st


def _neighbours(base: sp.csr_matrix, lm) -> dict:
    """State.nbr and its tilt for base rows R (nothing for a version served without an item table)."""
    k = getattr(lm.mcfg, "lin_topk", 0)
    if not k:
        return {}
    beta = getattr(lm.mcfg, "lin_beta", 0.5)
    tilt = None if beta == 0.5 else target_tilt(degrees(base)[1], beta)
    return {"nbr": item_table(normalised(base), k), "nbr_tilt": tilt, "nbr_built": time.monotonic()}


def _degrees(r: sp.csr_matrix) -> dict:
    """The user and item degrees of R, summed whole, and each item's count of positive edges."""
    return {"du": np.asarray(r.sum(axis=1)).ravel(), "di": np.asarray(r.sum(axis=0)).ravel(),
            "dn": np.bincount(r.indices, minlength=r.shape[1])}


_copies: dict[tuple, Copy] = {}
_copies_lock = threading.Lock()


def copy_of(driver, database: str, wait: float = 0.25, poll: float = 0.5, max_age: float = 1.0,
            table_mb: float = 256, *, secret: str, start_wait: float = 1.5) -> Copy:
    """This process's copy of `database` behind `driver` (see Copy for the settings)."""
    key = (id(driver), database, table_mb)  # State.table depends on the bound: apps with another keep their own
    with _copies_lock:
        if key not in _copies:
            _copies[key] = Copy(driver, database, table_mb=table_mb, secret=secret)
        c = _copies[key]
        c.wait, c.poll, c.max_age, c.table_mb, c.secret, c.start_wait = wait, poll, max_age, table_mb, secret, start_wait
        return c
