"""The API's in-process copy of the interaction graph, kept at the last refresh run by the serving log.

A score is `p_u . q_j + lin(u, j)` (graph_models/model.py). The graph filter `lin` walks u-i-v-j over
the whole neighbourhood: in Cypher that is 10^5-10^6 rows a request. Here it is two sparse products
over a copy of the positive edges, which each process loads once and then moves run by run: every
refresh run logs the users and items it recomputed (cypher.APPLIED_LOG), and the copy re-reads just
those. A request first reads which run Neo4j is at and brings the copy there, so an answer always
reflects at least the last run, and equals the Cypher recipes (docs/cypher.md) once runs catch up.
The requesting user's own edges are read live with the request, as the Cypher query reads them.

A state is never changed in place: a sync builds the next one (sharing what only grows) and swaps
it in, so concurrent requests each score on one consistent state. Rows changed since the last
compaction live in a small overlay over the base matrices, so a sync costs what the run changed.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.sparse as sp

from app import cypher
from app.embeddings import models
from app.ids import erasure_key
from graph_models.bias import with_bias

log = logging.getLogger(__name__)

ERASURE_MARGIN_MS = 120_000  # beyond the longest transaction: an erasure that commits late is still found
COMPACT_MIN, COMPACT_SHARE = 256, 0.05  # overlay rows past which it is folded into the base
LOG_RETRIES, LOG_WAIT = 200, 0.005  # how long a background sync waits for committed runs' log entries to show
DENSE_SHARE = 0.25  # past this share of users on a walk, one full product beats selecting rows


# The weights the graph filter reads (graph_models.spectral.lin_weights), applied to stored weight x scale.
_WEIGHTS = {"raw": lambda w: w, "log1p": np.log1p, "binary": lambda w: (w != 0).astype(np.float64)}


def filter_weights(lm) -> tuple:
    """The version's weight functions for the graph and for the scored user's own row."""
    mcfg = lm.mcfg
    if getattr(mcfg, "lin_topk", 0):
        raise ValueError("a filter pruned to top-k neighbours is not served (evaluation only)")
    graph_w = getattr(mcfg, "lin_weights", "raw")
    return _WEIGHTS[graph_w], _WEIGHTS[getattr(mcfg, "lin_user_weights", None) or graph_w]


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
class State:
    """One consistent copy: the graph as of run `seq` of `epoch`, under model version `lm.version`."""

    epoch: str | None
    seq: int
    lm: models.LoadedModel
    users: dict  # user id -> row (append-only, shared); an erased user keeps an empty row
    n_users: int
    items: Items
    base_csr: sp.csr_matrix
    base_csc: sp.csc_matrix
    keep: np.ndarray  # users whose base row is current (others: the overlay's)
    overlay: dict  # user row -> (item columns, weights)
    over_csr: sp.csr_matrix
    over_csc: sp.csc_matrix
    du: np.ndarray
    di: np.ndarray
    server_ms: int  # Neo4j's clock when this state began reading (for erasures)
    erasures: frozenset = field(default_factory=frozenset)  # (key, at) applied

    @property
    def n_items(self) -> int:
        return len(self.items.embedded)

    def lin(self, cols: np.ndarray, a: np.ndarray) -> np.ndarray:
        """The graph filter of a row with stored weights `a` on item columns `cols`: f(a s) D_I^-1/2 R^T D_U^-1
        R D_I^-1/2, R the copy's f(w s) (`filter_weights`)."""
        ok = self.di[cols] > 0
        cols, y = cols[ok], filter_weights(self.lm)[1](a[ok] * self.lm.scale) / np.sqrt(self.di[cols[ok]])
        base = self.base_csc
        if np.diff(base.indptr)[cols].sum() > DENSE_SHARE * base.nnz:  # one full product beats slicing
            dense = np.zeros(self.n_items)
            np.add.at(dense, cols, y)
            z = self.base_csr @ dense
        else:
            z = _col_product(base, cols, y)
        z = z * self.keep + _col_product(self.over_csc, cols, y)
        w = np.divide(z, self.du, out=np.zeros_like(z), where=self.du > 0)
        nz = np.flatnonzero(w)
        wk = w * self.keep
        if len(nz) > DENSE_SHARE * self.n_users:
            t = self.base_csr.T @ wk
        else:
            t = self.base_csr[nz].T @ wk[nz]
        t = t + self.over_csr.T @ w
        return np.divide(t, np.sqrt(self.di), out=np.zeros_like(t), where=self.di > 0)

    def vector(self, items: list, weights: list) -> np.ndarray:
        """p_u of a live row: the sum of max(w, 0) * scale * x_i the refresh stores (app/embeddings/refresh.py)."""
        x = self.lm.tables[0]
        w = np.maximum(np.asarray([0.0 if v is None else v for v in weights], dtype=np.float64), 0.0)
        return (w * self.lm.scale) @ x[self.lm.rows(items)] if len(items) else np.zeros(x.shape[1])

    def scores(self, p: np.ndarray, cols: np.ndarray, a: np.ndarray) -> np.ndarray:
        """Every item's score for a shopper with model-space vector `p` and raw edge weights `a` on `cols`
        (with item biases: divided by the largest magnitude, plus the bias, as graph_models.bias.with_bias)."""
        q = self.lm.tables[1]
        s = (q @ p)[self.items.rows] + self.lin(cols, a)
        return s if self.lm.bias is None else with_bias(s[None, :], self.lm.bias[self.items.rows])[0].numpy()

    def parts(self, cols: np.ndarray, a: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Each own item's part of each target's score (rows: `cols`, columns: `targets`), as EXPLAIN_ITEMS."""
        x, q = self.lm.tables
        s = self.lm.scale
        inner = (a * s)[:, None] * (x[self.items.rows[cols]] @ q[self.items.rows[targets]].T)
        ci, cj = self._columns(cols), self._columns(targets)
        inv_du = np.divide(1.0, self.du, out=np.zeros_like(self.du), where=self.du > 0)
        co = (ci.T @ sp.diags(inv_du) @ cj).toarray()
        di, dj = self.di[cols], self.di[targets]
        fa = filter_weights(self.lm)[1](a * s)
        scale_i = np.divide(fa, np.sqrt(di), out=np.zeros_like(fa), where=di > 0)
        scale_j = np.divide(1.0, np.sqrt(dj), out=np.zeros_like(dj), where=dj > 0)
        return inner + scale_i[:, None] * co * scale_j[None, :]

    def _columns(self, cols: np.ndarray) -> sp.csc_matrix:
        """The current columns `cols` of R (users x len(cols))."""
        return sp.diags(self.keep.astype(np.float64)) @ self.base_csc[:, cols] + self.over_csc[:, cols]

    def own(self, items: list, weights: list) -> tuple[np.ndarray, np.ndarray]:
        """A live row as (columns, raw weights): positive edges to items this state knows."""
        index, n = self.items.index, self.n_items
        pairs = [(index[i], w) for i, w in zip(items, weights) if w is not None and w > 0
                 and index.get(i, n) < n]
        if not pairs:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        cols, a = zip(*pairs)
        return np.asarray(cols, dtype=np.int64), np.asarray(a, dtype=np.float64)

    def mask(self, category: str | None, max_price: float | None, seen: list | None = None,
             embedded: bool = True) -> np.ndarray:
        """Items admitted by the filters, without the `seen` ids."""
        items = self.items
        ok = items.embedded.copy() if embedded else np.ones(self.n_items, dtype=bool)
        if category is not None:
            ok &= items.category == category
        if max_price is not None:
            with np.errstate(invalid="ignore"):
                ok &= items.price <= max_price
        if seen:
            n = self.n_items
            ok[[j for j in map(items.index.get, seen) if j is not None and j < n]] = False
        return ok

    def top(self, scores: np.ndarray, ok: np.ndarray, k: int) -> list[dict]:
        """The k best admitted items, best first, as answer rows."""
        idx = np.flatnonzero(ok)
        if len(idx) > k:
            idx = idx[np.argpartition(-scores[idx], k - 1)[:k]]
        idx = idx[np.argsort(-scores[idx], kind="stable")]
        items = self.items
        return [{"item_id": items.ids[j], "score": float(scores[j]), "title": items.title[j],
                 "category": items.category[j], "price": None if np.isnan(items.price[j]) else float(items.price[j])}
                for j in idx]


def _col_product(csc: sp.csc_matrix, cols: np.ndarray, y: np.ndarray) -> np.ndarray:
    """csc[:, cols] @ y, for columns that may lie past the matrix (new items: nothing there)."""
    inside = cols < csc.shape[1]
    if not inside.any():
        return np.zeros(csc.shape[0])
    return csc[:, cols[inside]] @ y[inside]


def _pad(m, rows: int, cols: int):
    """`m` grown to rows x cols with empty rows and columns (no copy of the entries)."""
    if m.shape == (rows, cols):
        return m
    if sp.isspmatrix_csr(m):
        indptr = np.concatenate([m.indptr, np.full(rows - m.shape[0], m.indptr[-1])])
        return sp.csr_matrix((m.data, m.indices, indptr), shape=(rows, cols))
    indptr = np.concatenate([m.indptr, np.full(cols - m.shape[1], m.indptr[-1])])
    return sp.csc_matrix((m.data, m.indices, indptr), shape=(rows, cols))


def _overlay_matrices(overlay: dict, n_users: int, n_items: int) -> tuple[sp.csr_matrix, sp.csc_matrix]:
    """The overlay's rows as users x items matrices."""
    if overlay:
        r = np.concatenate([np.full(len(c), u, dtype=np.int64) for u, (c, _) in overlay.items()])
        c = np.concatenate([c for c, _ in overlay.values()])
        w = np.concatenate([w for _, w in overlay.values()])
    else:
        r = c = np.zeros(0, dtype=np.int64)
        w = np.zeros(0)
    m = sp.csr_matrix((w, (r, c)), shape=(n_users, n_items))
    return m, m.tocsc()


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

    A request behind the last run waits up to `wait` seconds for one background sync to bring the
    copy there, then answers from the copy as it is: only other users' edges since the last sync can
    be missing (the user's own edges are read with the request). A first load, or a new epoch (a
    wiped graph), is waited for.
    """

    def __init__(self, driver, database: str, wait: float = 0.25):
        self.driver, self.database, self.wait = driver, database, wait
        self.state: State | None = None
        self._load_lock = threading.Lock()
        self._cond = threading.Condition()
        self._syncing = False

    def at(self, epoch: str | None, seq: int) -> State | None:
        """The copy at run `seq` of `epoch` or after, or as near as `wait` allows (None: no model yet)."""
        st = self.state
        if st is not None and st.epoch == epoch and st.seq >= seq:
            return st
        if st is None or st.epoch != epoch:
            with self._load_lock:
                st = self.state
                if st is None or st.epoch != epoch or st.seq < seq:
                    self.state = self._read(None, epoch, seq)
                return self.state
        with self._cond:
            if not self._syncing:
                self._syncing = True
                threading.Thread(target=self._sync, args=(epoch, seq), daemon=True).start()
            self._cond.wait_for(lambda: self.state.seq >= seq or not self._syncing, timeout=self.wait)
            return self.state

    def _sync(self, epoch, seq) -> None:
        """Bring the copy to the latest run (one at a time, off the request threads)."""
        try:
            with self._load_lock:
                self.state = self._read(self.state, epoch, seq) or self.state
        except Exception:  # Neo4j away or the like: requests go on with the copy they have
            log.exception("serving copy: sync failed")
        finally:
            with self._cond:
                self._syncing = False
                self._cond.notify_all()

    def _read(self, st: State | None, epoch, seq) -> State | None:
        started = time.monotonic()
        with self.driver.session(database=self.database) as session:
            nxt = session.execute_read(lambda tx: _advance(tx, st, epoch, seq))
        if nxt is not None:
            log.debug("serving copy at run %s (%.3fs)", nxt.seq, time.monotonic() - started)
        return nxt


def _advance(tx, st: State | None, epoch, seq) -> State | None:
    """The next state: the logged runs after `st` applied, or everything read again."""
    if st is None or st.epoch != epoch:
        return _load(tx)
    entries = list(tx.run(cypher.APPLIED_SINCE, seq=st.seq))
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
    if not entries and seq <= st.seq:
        return st  # already there (another sync got there first)
    if not entries or entries[0]["seq"] != st.seq + 1 or any(e["full"] for e in entries):
        return _load(tx)  # a full run, or entries no longer logged
    users = {u for e in entries for u in e["users"]}
    items = {i for e in entries for i in e["items"]}
    now = tx.run(cypher.SERVER_TIME).single()["now"]
    erased = {(r["key"], r["at"]) for r in tx.run(cypher.ERASED_SINCE, since=st.server_ms - ERASURE_MARGIN_MS)}
    fresh = erased - st.erasures
    if fresh:
        keys = {key for key, _ in fresh}
        users |= {u for u in st.users if erasure_key(u) in keys}
    return _apply(tx, st, entries[-1]["seq"], sorted(users), sorted(items), now, frozenset(erased))


def _load(tx) -> State | None:
    """Everything read again, at the run Neo4j is at now (None without a current model)."""
    head = tx.run(cypher.SERVING_STATE).single()
    now = head["now"]
    info = tx.run(cypher.MODEL_CURRENT).single()
    if info is None:
        return None
    lm = models.load(info["path"], info["version"])
    users, item_index, item_ids = {}, {}, []
    r, c, w = [], [], []
    for rec in tx.run(cypher.SERVING_EDGES):
        u = users.setdefault(rec["u"], len(users))
        for i in rec["items"]:
            c.append(item_index.setdefault(i, len(item_index)))
        r.extend([u] * len(rec["items"]))
        w.extend(rec["w"])
    item_rows = [dict(x) for x in tx.run(cypher.SERVING_ITEMS)]
    for x in item_rows:
        item_index.setdefault(x["id"], len(item_index))
    item_ids = [None] * len(item_index)
    for i, j in item_index.items():
        item_ids[j] = i
    n_u, n_i = len(users), len(item_ids)
    f = filter_weights(lm)[0]
    base = sp.csr_matrix((f(np.asarray(w, dtype=np.float64) * lm.scale),
                          (np.asarray(r, dtype=np.int64), np.asarray(c, dtype=np.int64))), shape=(n_u, n_i))
    items = _item_arrays(item_rows, lm, item_index, item_ids, None, n_i)
    over_csr, over_csc = _overlay_matrices({}, n_u, n_i)
    st = State(head["epoch"], head["seq"], lm, users, n_u, items, base, base.tocsc(), np.ones(n_u, dtype=bool),
               {}, over_csr, over_csc, np.asarray(base.sum(axis=1)).ravel(), np.asarray(base.sum(axis=0)).ravel(),
               now)
    log.info("serving copy loaded: run %s, %d users, %d items, %d edges", st.seq, n_u, n_i, base.nnz)
    return st


def _apply(tx, st: State, seq: int, user_ids: list, item_ids: list, now: int, erasures: frozenset) -> State:
    """`st` with the rows of `user_ids` and the metadata of `item_ids` read again, as of run `seq`."""
    rows = {r["u"]: (r["items"], r["w"]) for r in tx.run(cypher.SERVING_USER_EDGES, ids=user_ids)}
    users, index, ids = st.users, st.items.index, st.items.ids
    for u in user_ids:
        users.setdefault(u, len(users))
    new_items = [i for its, _ in rows.values() for i in its if i not in index]
    for i in list(item_ids) + new_items:
        if i not in index:
            index[i] = len(ids)
            ids.append(i)
    n_u, n_i = len(users), len(ids)
    # Only this state's users and items are read past here: the shared dicts may grow meanwhile.
    meta = [dict(x) for x in tx.run(cypher.SERVING_ITEMS_BY_ID, ids=sorted(set(item_ids) | set(new_items)))]
    items = _item_arrays(meta, st.lm, index, ids, st.items, n_i)
    keep = np.ones(n_u, dtype=bool)
    keep[:st.n_users] = st.keep
    du = np.zeros(n_u)
    du[:st.n_users] = st.du
    overlay = dict(st.overlay)
    base_csr, base_csc = _pad(st.base_csr, n_u, n_i), _pad(st.base_csc, n_u, n_i)
    f = filter_weights(st.lm)[0]
    touched = [np.zeros(0, dtype=np.int64)]  # items whose column changes: the rows' old and new items
    for u in user_ids:
        row = users[u]
        old = overlay[row][0] if row in overlay else base_csr.indices[base_csr.indptr[row]:base_csr.indptr[row + 1]]
        its, w = rows.get(u, ([], []))
        cols = np.fromiter((index[i] for i in its), dtype=np.int64, count=len(its))
        overlay[row] = (cols, f(np.asarray(w, dtype=np.float64) * st.lm.scale))
        keep[row] = False
        du[row] = overlay[row][1].sum()
        touched += [old, cols]
    if len(overlay) > max(COMPACT_MIN, COMPACT_SHARE * n_u):  # compact: the overlay becomes part of the base (O(edges), rarely)
        over_csr, _ = _overlay_matrices(overlay, n_u, n_i)
        base_csr = (sp.diags(keep.astype(np.float64)) @ base_csr + over_csr).tocsr()
        base_csr.eliminate_zeros()
        base_csc, keep, overlay = base_csr.tocsc(), np.ones(n_u, dtype=bool), {}
    over_csr, over_csc = _overlay_matrices(overlay, n_u, n_i)
    st = replace(st, seq=seq, n_users=n_u, items=items, base_csr=base_csr, base_csc=base_csc, keep=keep,
                 overlay=overlay, over_csr=over_csr, over_csc=over_csc, du=du, server_ms=now, erasures=erasures)
    # Item degrees summed again over the touched columns (not by differences: no float residue).
    di = np.zeros(n_i)
    di[:len(st.di)] = st.di
    cols = np.unique(np.concatenate(touched))
    if len(cols):
        di[cols] = np.asarray(st._columns(cols).sum(axis=0)).ravel()
    return replace(st, di=di)


_copies: dict[tuple, Copy] = {}
_copies_lock = threading.Lock()


def copy_of(driver, database: str, wait: float = 0.25) -> Copy:
    """This process's copy of `database` behind `driver`; requests wait up to `wait` s for a sync."""
    key = (id(driver), database)
    with _copies_lock:
        if key not in _copies:
            _copies[key] = Copy(driver, database, wait)
        _copies[key].wait = wait
        return _copies[key]
