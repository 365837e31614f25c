"""What a sync of the serving copy read (a Delta), and `apply(state, delta)`: the next state, built
beside the old one, which stays as it was (requests may still be scoring on it)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.sparse as sp

from app.serving.matrices import (edge_degrees, filter_matrix, filter_weights, fits, grown, inverse, neighbours,
                                  overlay_matrices, pad, popularity, trend_sums)
from app.serving.state import Rows, State, item_arrays
from graph_models.bias import decayed

COMPACT_MIN, COMPACT_SHARE = 256, 0.05  # overlay rows past which it is folded into the base
# With an item table, an overlay older than this is folded in too, so that the table (built with the
# base) reflects every edge at most this long after the sync that read it, plus the build's time.
TABLE_MAX_AGE_S = 300.0


@dataclass(frozen=True)
class Delta:
    """What changed since a state, as a sync read it: the rows to set and the items to update, as of run
    `seq` and Neo4j's clock `now` (ms)."""

    seq: int
    now: int
    # User id -> (item ids, raw weights, first times, when the vector was stored) of the rows read whole;
    # a user of `user_ids` missing here has no edges any more (erased, or never written).
    rows: dict = field(default_factory=dict)
    user_ids: list = field(default_factory=list)  # the users whose rows are read whole, sorted
    item_ids: list = field(default_factory=list)  # the items whose metadata changed, sorted
    items: list = field(default_factory=list)  # SERVING_ITEMS records of those and of items new to the state
    patches: dict = field(default_factory=dict)  # user -> {item: (raw weight, first time)}: pending edges set
    erasures: frozenset = frozenset()  # every (key, at) applied as of this sync
    gone: frozenset = frozenset()  # users erased since the state: their ids leave it unless they came back
    pending: dict = field(default_factory=dict)  # signatures of the pending writes read (State.pending)

    def new_items(self, known) -> list:
        """The items the delta's edges reach that `known` (an item index) lacks, in the order they come."""
        found = [i for its, _, _, _ in self.rows.values() for i in its if i not in known]
        return found + [i for p in self.patches.values() for i in p if i not in known]


def apply(st: State, d: Delta, table_mb: float = 256) -> State:
    """`st` moved by `d` (rows of `d.user_ids` set as read, `d.patches`' edges set, items updated), then
    compacted if due; `st` itself is left as it was. An empty delta (no run, no change) leaves `st` as
    it is, but compacted if due. `table_mb`: State.table's bound."""
    if d.seq == st.seq and not d.user_ids and not d.item_ids and not d.patches:
        return compacted(st, table_mb)
    changed = list(d.user_ids) + sorted(d.patches)
    users = st.users.with_ids(changed)
    new_items = [i for i in dict.fromkeys(list(d.item_ids) + d.new_items(st.items.index)) if i not in st.items.index]
    index = st.items.index.with_ids(new_items)
    ids = st.items.ids + new_items if new_items else st.items.ids
    n_u, n_i = users.rows, len(ids)
    items = item_arrays(d.items, st.lm, index, ids, st.items, n_i)
    keep = grown(st.keep, n_u, True)
    du = grown(st.du, n_u, 0.0)
    refreshed = grown(st.refreshed, n_u, None)
    base_rows = Rows(grown(st.rows.ptr, n_u + 1, st.rows.ptr[-1]), st.rows.cols, st.rows.w, st.rows.first)
    overlay = dict(st.overlay)
    base_csr, base_t = pad(st.base_csr, n_u, n_i), pad(st.base_t, n_i, n_u)
    f = filter_weights(st.lm)[0]
    # Item degrees by differences, with each item's count of positive edges so that an item left
    # with none is exactly 0; summed again at each compaction, so rounding never accumulates far.
    di, dn, tn = grown(st.di, n_i, 0.0), grown(st.dn, n_i, 0), grown(st.tn, n_i, 0.0)
    dr = grown(st.dr, n_i, 0.0)
    trended, halflife, anchor = st.lm.mcfg.reads_trend, st.lm.mcfg.trend_halflife, st.anchor
    for u in changed:
        row = users[u]
        old_cols, old_w, old_first = overlay[row] if row in overlay else base_rows.row(row)
        if u in d.patches:  # the row as it was, with the pending edges set
            p = d.patches[u]
            new = np.fromiter((index[i] for i in p), dtype=np.int64, count=len(p))
            kept = ~np.isin(old_cols, new)
            cols = np.concatenate([old_cols[kept], new])
            w = np.concatenate([old_w[kept], np.fromiter((e[0] for e in p.values()), np.float64, count=len(p))])
            first = np.concatenate([old_first[kept], np.fromiter((e[1] for e in p.values()), np.float64, count=len(p))])
        else:
            its, w, first, refreshed[row] = d.rows.get(u, ([], [], [], None))
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
    # An erased user's id leaves the index (its row stays, empty), unless the user came back since.
    users = users.without(u for u in d.gone if u in users and not len(_row(overlay, base_rows, users[u])))
    over_csr, over_t = overlay_matrices(overlay, n_u, n_i, st.lm)
    nxt = replace(st, seq=d.seq, users=users, n_users=n_u, items=items, rows=base_rows, refreshed=refreshed,
                  base_csr=base_csr, base_t=base_t, keep=keep, overlay=overlay, over_csr=over_csr, over_t=over_t,
                  du=du, di=di, dn=dn, dr=dr, tn=tn, anchor=anchor, server_ms=d.now, erasures=d.erasures,
                  pending=d.pending)
    nxt = replace(nxt, **dict(zip(("fix", "fix_sign"), _table_fix(nxt))))
    return compacted(nxt, table_mb)


def _row(overlay: dict, base: Rows, row: int) -> np.ndarray:
    """A row's item columns: the overlay's if it has the row, else the base's."""
    return overlay[row][0] if row in overlay else base.row(row)[0]


def compacted(st: State, table_mb: float) -> State:
    """`st` with its overlay folded into the base when it has grown past its bound or, with an item table,
    has waited TABLE_MAX_AGE_S."""
    stale = st.nbr is not None and time.monotonic() - st.nbr_built > TABLE_MAX_AGE_S
    if st.overlay and (len(st.overlay) > max(COMPACT_MIN, COMPACT_SHARE * st.n_users) or stale):
        n_u, n_i = st.n_users, st.n_items
        base_rows, base_csr = _compact(st)
        over_csr, over_t = overlay_matrices({}, n_u, n_i, st.lm)
        st = replace(st, users=st.users.flat(), items=replace(st.items, index=st.items.index.flat()),
                     rows=base_rows, base_csr=base_csr, base_t=base_csr.tocsc().T, keep=np.ones(n_u, dtype=bool),
                     overlay={}, over_csr=over_csr, over_t=over_t, dr=popularity(base_rows, n_i),
                     tn=trend_sums(base_rows, n_i, st.lm, st.anchor),
                     table=_folded_table(st, table_mb), fix=None, fix_sign=None, **edge_degrees(base_csr),
                     **neighbours(base_csr, st.lm))
    return st


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
    return rows, filter_matrix(r, c, w, (n_u, st.n_items), st.lm)


def _table_fix(st: State) -> tuple[sp.csr_matrix | None, np.ndarray | None]:
    """State.fix and fix_sign for `st`'s overlay: its rows now (+) and in the base (-), over d_u^1/2."""
    if st.table is None or not st.overlay:
        return None, None
    rows = np.fromiter(st.overlay, dtype=np.int64, count=len(st.overlay))
    now, was = st.over_csr[rows], st.base_csr[rows]

    def scaled(m):
        return sp.diags(inverse(np.sqrt(np.asarray(m.sum(axis=1)).ravel()))) @ m
    fix = sp.vstack([scaled(now), scaled(was)]).T.tocsr()
    return fix, np.repeat([1.0, -1.0], len(rows))


def _folded_table(st: State, limit_mb: float) -> np.ndarray | None:
    """`st`'s table with its overlay's change folded in, grown to its items (a compaction)."""
    n = st.n_items
    if st.table is None or not fits(n, limit_mb):
        return None
    table = np.zeros((n, n))
    b = len(st.table)
    table[:b, :b] = st.table  # a copy: states in use keep theirs
    if st.fix is not None:
        change = (st.fix @ sp.diags(st.fix_sign) @ st.fix.T).tocoo()
        table[change.row, change.col] += change.data
    return table
