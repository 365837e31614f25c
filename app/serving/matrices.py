"""The array helpers of the serving copy: the graph filter's matrices, degrees, tables, growth of arrays."""
from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp

from graph_models.bias import decayed
from graph_models.spectral import degrees, item_table, normalised, target_tilt

# The weights the graph filter reads (graph_models.spectral.lin_weights), applied to stored weight x scale.
_WEIGHTS = {"raw": lambda w: w, "log1p": np.log1p, "binary": lambda w: (w != 0).astype(np.float64)}


def filter_weights(lm) -> tuple:
    """The version's weight functions for the graph and for the scored user's own row."""
    mcfg = lm.mcfg
    graph_w = getattr(mcfg, "lin_weights", "raw")
    return _WEIGHTS[graph_w], _WEIGHTS[getattr(mcfg, "lin_user_weights", None) or graph_w]


def largest(s: np.ndarray) -> float:
    """The largest magnitude of `s`, 1 where there is none (what scores are divided by before biases)."""
    top = float(np.abs(s).max(initial=0.0))
    return top if top > 0 else 1.0


def best(s: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest of `s`, largest first (ties: the lower position)."""
    idx = np.arange(len(s))
    if len(s) > k:
        idx = np.argpartition(-s, k - 1)[:k]
        idx.sort()
    return idx[np.argsort(-s[idx], kind="stable")]


def lookup(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of `values` is in the sorted `keys`, and whether it is there at all (else its position
    is meaningless)."""
    if not len(keys):
        return np.zeros(len(values), dtype=np.int64), np.zeros(len(values), dtype=bool)
    pos = np.minimum(np.searchsorted(keys, values), len(keys) - 1)
    return pos, keys[pos] == values


def merged(keys: np.ndarray, values: np.ndarray, more: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted `keys` with the sorted `more` they lack inserted in order, and `values` with 0 for those."""
    _, hit = lookup(keys, more)
    if hit.all():
        return keys, values
    new = more[~hit]
    at = np.searchsorted(keys, new)
    return np.insert(keys, at, new), np.insert(values, at, 0.0)


def summed(keys: np.ndarray, values: np.ndarray, n: int, dense: bool) -> tuple[np.ndarray, np.ndarray]:
    """The distinct `keys` (below n), sorted, and the sum of each one's `values` (> 0), added in their
    order either way: over an array of n (`dense`), or by a stable sort of the keys, which merges sorted
    runs (an item table's rows) a pass each, at dozens of times the dense way's cost per slot of n."""
    if dense:
        out = np.bincount(keys, weights=values, minlength=n)
        found = np.flatnonzero(out != 0)  # a boolean array's nonzero is several times a float one's
        return found, out[found]
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    first = np.empty(len(keys), dtype=bool)
    first[:1] = True
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    found = keys[first]
    return found, np.bincount(np.cumsum(first) - 1, weights=values[order], minlength=len(found))


def inverse(x: np.ndarray) -> np.ndarray:
    """1 / x where x > 0, else 0 (a node without positive edges)."""
    return np.divide(1.0, x, out=np.zeros_like(x), where=x > 0)


def pad(m, rows: int, cols: int):
    """CSR `m` grown to rows x cols with empty rows and columns (no copy of the entries)."""
    if m.shape == (rows, cols):
        return m
    indptr = np.concatenate([m.indptr, np.full(rows - m.shape[0], m.indptr[-1])])
    return sp.csr_matrix((m.data, m.indices, indptr), shape=(rows, cols))


def grown(a: np.ndarray, n: int, fill) -> np.ndarray:
    """`a` copied into a length-n array, the new tail `fill`."""
    out = np.full(n, fill, dtype=a.dtype)
    out[:len(a)] = a
    return out


def filter_matrix(r: np.ndarray, c: np.ndarray, w: np.ndarray, shape: tuple, lm) -> sp.csr_matrix:
    """The graph filter's R over edges (r, c) of raw weights `w`: f(w s) on the positive ones."""
    pos = w > 0
    return sp.csr_matrix((filter_weights(lm)[0](w[pos] * lm.scale), (r[pos], c[pos])), shape=shape)


def trend_sums(rows, n_items: int, lm, anchor: float) -> np.ndarray:
    """State.tn summed whole over the positive edges of `rows` (zeros for a version without a trend)."""
    if not lm.mcfg.reads_trend:
        return np.zeros(n_items)
    pos = rows.w > 0
    return np.bincount(rows.cols[pos], weights=decayed(rows.first[pos], anchor, lm.mcfg.trend_halflife),
                       minlength=n_items)


def popularity(rows, n_items: int) -> np.ndarray:
    """State.dr summed whole over the positive edges of `rows`."""
    pos = rows.w > 0
    return np.bincount(rows.cols[pos], weights=rows.w[pos], minlength=n_items)


def overlay_matrices(overlay: dict, n_users: int, n_items: int, lm) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """The overlay's rows as R (users x items) and R^T, both CSR."""
    if overlay:
        r = np.concatenate([np.full(len(c), u, dtype=np.int64) for u, (c, _, _) in overlay.items()])
        c = np.concatenate([c for c, _, _ in overlay.values()])
        w = np.concatenate([w for _, w, _ in overlay.values()])
    else:
        r = c = np.zeros(0, dtype=np.int64)
        w = np.zeros(0)
    m = filter_matrix(r, c, w, (n_users, n_items), lm)
    return m, m.tocsc().T


def fits(n_items: int, limit_mb: float) -> bool:
    """Whether a dense items x items float64 table fits in `limit_mb`."""
    return n_items * n_items * 8 <= limit_mb * 2**20


def table(base_t: sp.csr_matrix, base: sp.csr_matrix, du: np.ndarray, limit_mb: float) -> np.ndarray | None:
    """State.table of base rows R (None past `limit_mb`)."""
    if not fits(base.shape[1], limit_mb):
        return None
    return (base_t @ sp.diags(inverse(du)) @ base).toarray()


def neighbours(base: sp.csr_matrix, lm) -> dict:
    """State.nbr and its tilt for base rows R (nothing for a version served without an item table)."""
    k = getattr(lm.mcfg, "lin_topk", 0)
    if not k:
        return {}
    beta = getattr(lm.mcfg, "lin_beta", 0.5)
    tilt = None if beta == 0.5 else target_tilt(degrees(base)[1], beta)
    return {"nbr": item_table(normalised(base), k), "nbr_tilt": tilt, "nbr_built": time.monotonic()}


def edge_degrees(r: sp.csr_matrix) -> dict:
    """The user and item degrees of R, summed whole, and each item's count of positive edges."""
    return {"du": np.asarray(r.sum(axis=1)).ravel(), "di": np.asarray(r.sum(axis=0)).ravel(),
            "dn": np.bincount(r.indices, minlength=r.shape[1])}
