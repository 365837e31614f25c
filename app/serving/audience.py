"""An item's audience scored as its recommendations are: candidate users from the graph and from the
vectors, each ranked by the full score the API's copy of the graph gives it for the item.

For item j the candidates are the users who bought j or one of the items nearest it (the items whose
rows of the version's item table hold j, or without a table the items co-bought with j, nearest
first), at most half of `limit`, and then the users of highest p_u . q_j until there are `limit` of
them. Each is scored with
exactly what `State.scores(p_u, ...)[j]` gives the user's recommendations: p_u . q_j plus the graph
filter and EASE terms (for an item that mixes, with the attention mix of its neighbours' columns) and,
for a version with item biases, divided by the user's largest score over their own candidates
(`State.ranked`) plus j's bias. The work is one pass over the copy's edges for
every user's p_u . q_j (a sparse product), the item's column of the filter, and then per candidate
its own row (with item biases: its recommendation's candidates), so at most `limit` users' rows.
A user's largest score is the same for every item, so it is kept with the state it was computed on
(the last state asked about; a sync's next state starts afresh).
"""
from __future__ import annotations

import threading

import numpy as np
import scipy.sparse as sp

from app.serving.matrices import best, filter_weights, largest, pad
from app.serving.state import State


def audience(st: State, j: int, k: int, include_known: bool, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best user rows for item column `j`, best first, and their scores, among at most `limit`
    candidates; `include_known` False leaves out every user with an edge to j."""
    pq = _vector_part(st, j)
    known = _buyers(st, [j], positive=False)
    cand = _candidates(st, j, pq, limit, None if include_known else known)
    if not len(cand):
        return cand, np.zeros(0)
    s = scores(st, j, cand, pq[cand])
    top = best(s, k)
    return cand[top], s[top]


def scores(st: State, j: int, users: np.ndarray, pq: np.ndarray | None = None) -> np.ndarray:
    """The full score of item column `j` for each user row of `users` (as their recommendations score it)."""
    lm, mcfg, s_ = st.lm, st.lm.mcfg, st.lm.scale
    m = _rows_of(st, users)
    cols, a, ptr, shape = m.indices, m.data, m.indptr, m.shape
    if pq is None:
        pq = s_ * sp.csr_matrix((a, cols, ptr), shape=shape) @ _item_products(st, j)
    out = np.asarray(pq, dtype=np.float64).copy()
    if mcfg.lin_weight:
        f = filter_weights(lm)[1](a * s_)
        out += mcfg.lin_weight * (sp.csr_matrix((f, cols, ptr), shape=shape) @ _filter_column(st, j))
    if lm.ease is not None:
        items, w = _mixed(st, j)
        e = lm.ease[st.items.rows][:, st.items.rows[items]].astype(np.float64) @ w
        out += mcfg.ease_weight * (sp.csr_matrix((np.ones(len(cols)), cols, ptr), shape=shape) @ e)
    if st._bias is None:
        return out
    # the user's own scale: the largest magnitude of their recommendation's scores (State.scores), the
    # same for every item, so kept with the state
    known = _scales(st)
    for n, u in enumerate(users.tolist()):
        if u not in known:
            c, w = cols[ptr[n]:ptr[n + 1]], a[ptr[n]:ptr[n + 1]]
            known[u] = _largest(st, c, w)
    top = np.fromiter((known[u] for u in users.tolist()), dtype=np.float64, count=len(users))
    return out / top + st._bias[j]


def _scales(st: State) -> dict:
    """User row -> its `_largest`, for the state (a new state starts empty)."""
    with _lock:
        hit = _cache.get("scales")
        if hit is None or hit[0] is not st:
            _cache["scales"] = hit = (st, {})
    return hit[1]


def _largest(st: State, cols: np.ndarray, a: np.ndarray) -> float:
    """What `State.scores` divides a row's scores by before adding the biases."""
    p = st.vector(cols, a)
    found = st._candidates(cols, a)
    if found is None:
        return largest(st._unbiased(p, cols, a))
    cand, lin = found
    return largest(st._low(p, cand) + st.lm.mcfg.lin_weight * lin)


def _rows_of(st: State, users: np.ndarray) -> sp.csr_matrix:
    """The positive raw weights of user rows `users` now, as len(users) x items CSR (sorted columns)."""
    m = _edges(st)[0][users]
    if st.overlay:
        moved = np.flatnonzero(~st.keep[users])
        if len(moved):
            m = sp.diags(st.keep[users].astype(np.float64)) @ m
            over = [_row(st, int(users[n])) for n in moved]
            r = np.repeat(moved, [len(c) for c, _ in over])
            m = m + sp.csr_matrix((np.concatenate([w for _, w in over]), (r, np.concatenate([c for c, _ in over]))),
                                  shape=m.shape)
    m = m.tocsr()
    m.eliminate_zeros()
    m.sort_indices()
    return m


def _row(st: State, r: int) -> tuple[np.ndarray, np.ndarray]:
    """User row r's positive edges (item columns, raw weights) in the copy now."""
    cols, w, _ = st.overlay[r] if r in st.overlay else st.rows.row(r)
    pos = w > 0
    return cols[pos], w[pos]


def _candidates(st: State, j: int, pq: np.ndarray, limit: int, known: np.ndarray | None) -> np.ndarray:
    """At most `limit` user rows: the buyers of j and of its nearest items (up to half), then the highest p . q_j."""
    nearest = _filter_column(st, j)
    near = np.flatnonzero(nearest)
    near = near[near != j]
    near = near[np.argsort(-nearest[near], kind="stable")][: 4 * limit]  # enough items to find limit / 2 users
    order = np.concatenate([[j], near])
    drop = np.zeros(st.n_users, dtype=bool)
    if known is not None:
        drop[known] = True
    drop[_erased(st)] = True
    # only as many items as can give limit / 2 buyers (their positive edges counted: State.dn)
    order = order[: int(np.searchsorted(np.cumsum(st.dn[order]), 2 * limit)) + 1]
    by_graph = _first_unique(_buyers(st, order, positive=True), drop, limit // 2)
    drop[by_graph] = True
    rest = np.flatnonzero(~drop)
    want = limit - len(by_graph)
    if len(rest) > want:
        rest = rest[np.argpartition(-pq[rest], want - 1)[:want]] if want > 0 else rest[:0]
    return np.concatenate([by_graph, rest]).astype(np.int64)


def _first_unique(users: np.ndarray, drop: np.ndarray, n: int) -> np.ndarray:
    """The first n distinct entries of `users` not dropped, in their order."""
    users = users[~drop[users]]
    first = {}
    for u in users.tolist():  # bounded: the items were cut to about 2n entries
        if u not in first:
            first[u] = None
            if len(first) == n:
                break
    return np.fromiter(first, dtype=np.int64, count=len(first))


def _buyers(st: State, items, positive: bool) -> np.ndarray:
    """User rows with an edge to any of `items` now (positive ones only, or any weight), item by item."""
    items = np.asarray(items, dtype=np.int64)
    if positive:
        m = st._rows_t(items).tocsr()
        m.eliminate_zeros()
        return m.indices.astype(np.int64)
    # any weight: the base's positive edges (R^T's row), its others (rare: returns), and the overlay's rows
    other = _edges(st)[1]
    hit = np.concatenate([st.base_t[items].indices, other[:, items[items < other.shape[1]]].indices])
    hit = hit[st.keep[hit]]
    over = [r for r, (c, _, _) in st.overlay.items() if np.isin(c, items).any()]
    return np.unique(np.concatenate([hit, np.asarray(over, dtype=np.int64)])).astype(np.int64)


def _vector_part(st: State, j: int) -> np.ndarray:
    """p_u . q_j of every user row: the copy's positive raw weights times scale, times x_i . q_j."""
    xq = _item_products(st, j)
    out = (_edges(st)[0] @ xq) * st.keep
    if st.overlay:
        for r, (c, w, _) in st.overlay.items():
            ok = w > 0
            out[r] = w[ok] @ xq[c[ok]]
    return st.lm.scale * out


def _item_products(st: State, j: int) -> np.ndarray:
    """x_i . q_j of every item column i (x of the version's table rows, 0 for items it does not know;
    items without a trained row: their rows from content, app/serving/content.py)."""
    x, q = st.lm.tables
    c = st.items.content
    qj = c.q_rows(np.asarray([j]), q[st.items.rows[[j]]])[0]
    out = (x @ qj)[st.items.rows]
    if len(c.cols):
        out[c.cols] = c.x[c.at[c.cols]] @ qj
    return out


def _mixed(st: State, j: int) -> tuple[np.ndarray, np.ndarray]:
    """(item columns, weights) whose columns of the filter and EASE make item j's: j alone, and for an
    item that mixes (State.items.mix) also the items it attends to, by their attention."""
    mix = st.items.mix
    at = -1 if mix is None else int(np.searchsorted(mix.cols, j))
    if mix is None or at >= len(mix.cols) or mix.cols[at] != j:
        return np.asarray([j]), np.ones(1)
    row = mix.a[at]
    return np.concatenate([[j], row.indices]).astype(np.int64), np.concatenate([[1.0], row.data])


def _filter_column(st: State, j: int) -> np.ndarray:
    """g with lin(u, j) = sum_i f(a_ui s) g_i: the item table's column j (with its tilt), or
    d_i^-1/2 C[i, j] d_j^-beta of the copy's rows, C = R^T D_U^-1 R; for an item that mixes, with the
    mix of its neighbours' columns."""
    items, w = _mixed(st, j)
    g = np.zeros(st.n_items)
    if st.nbr is not None:
        t = _transposed(st.nbr)
        for x, wx in zip(items.tolist(), w.tolist()):
            if x < st.nbr.shape[0]:
                col = t[x]
                np.add.at(g, col.indices, wx * col.data * (1.0 if st.nbr_tilt is None else st.nbr_tilt[x]))
        return g
    v = (sp.csr_matrix(w * st._target_di[items]) @ st._rows_t(items)).toarray().ravel() * st._inv_du
    z = st.base_t @ (v * st.keep if st.overlay else v)
    if st.overlay:
        z = z + st.over_t @ v
    return z * st._inv_sqrt_di


_lock = threading.Lock()
_cache: dict[str, tuple] = {}  # what is built once per base of the copy, with the object it was built from


def _edges(st: State) -> tuple[sp.csr_matrix, sp.csc_matrix]:
    """The base rows as users x items: the positive raw weights (CSR, padded to the state's size), and
    the edges of other weights (CSC, ones; returns, which still count as having the item)."""
    key = st.rows.cols  # shared by states until a compaction replaces the base
    with _lock:
        hit = _cache.get("edges")
        if hit is None or hit[0] is not key:
            rows = st.rows
            n = len(rows.ptr) - 1
            r = np.repeat(np.arange(n), np.diff(rows.ptr))
            pos = rows.w > 0
            m = sp.csr_matrix((rows.w[pos], (r[pos], rows.cols[pos])), shape=(n, st.n_items))
            other = sp.csc_matrix((np.ones(int((~pos).sum())), (r[~pos], rows.cols[~pos])), shape=(n, st.n_items))
            _cache["edges"] = hit = (key, m, other)
    return _sized(hit[1], st.n_users, st.n_items), hit[2]


def _sized(m: sp.csr_matrix, rows: int, cols: int) -> sp.csr_matrix:
    """`m` padded to rows x cols, or cut to it for an older state than the one it was built on (what is
    cut holds no base edge: users and items added since have theirs in the overlay)."""
    if m.shape[0] > rows or m.shape[1] > cols:
        m = m[:rows, :cols]
    return pad(m, rows, cols)


def _transposed(m: sp.csr_matrix) -> sp.csr_matrix:
    """`m` transposed as CSR, built once per matrix (the item table: its columns)."""
    with _lock:
        hit = _cache.get("nbr_t")
        if hit is None or hit[0] is not m:
            _cache["nbr_t"] = hit = (m, m.T.tocsr())
    return hit[1]


def _erased(st: State) -> np.ndarray:
    """Rows without an id (erased users): never in an audience."""
    return np.flatnonzero(user_ids(st) == None)  # noqa: E711 (elementwise on an object array)


def user_ids(st: State) -> np.ndarray:
    """The stored id of each user row (None for an erased one), built once per size of the index."""
    users = st.users
    with _lock:
        hit = _cache.get("ids")
        if hit is None or hit[0] is not users or hit[1] != (len(users), users.rows):
            ids = np.full(users.rows, None, dtype=object)
            for key, r in list(users.items()):
                ids[r] = key
            _cache["ids"] = hit = (users, (len(users), users.rows), ids)
    ids = hit[2]
    return ids[: st.n_users] if len(ids) >= st.n_users else np.concatenate([ids, np.full(st.n_users - len(ids), None)])
