"""The normalised user-item adjacency, its top singular vectors and the linear graph filter."""
import numpy as np
import scipy.sparse as sp
import torch


def degrees(csr):
    """(user, item) weighted degrees of a users x items matrix, as float64 arrays."""
    return (np.asarray(csr.sum(axis=1), dtype=np.float64).ravel(),
            np.asarray(csr.sum(axis=0), dtype=np.float64).ravel())


def inv_sqrt(d):
    """d^-1/2, defined as 0 where d <= 0 (a node without weight passes nothing on)."""
    d = np.asarray(d, dtype=np.float64)
    return np.where(d > 0, 1.0 / np.sqrt(np.where(d > 0, d, 1.0)), 0.0)


def normalised(csr):
    """R~ = D_U^-1/2 R D_I^-1/2 as float64 CSR."""
    du, di = degrees(csr)
    return (sp.diags(inv_sqrt(du)) @ csr.astype(np.float64) @ sp.diags(inv_sqrt(di))).tocsr()


def item_basis(csr, k, seed=0, niter=4):
    """Top-k right singular vectors V (items x k) and squared singular values of R~, largest first.

    Randomised SVD (Halko et al.) seeded without touching the caller's RNG: the same graph and seed
    give the same basis. k is capped below the matrix rank.
    """
    rt = normalised(csr).tocoo()
    k = int(max(1, min(k, min(rt.shape) - 1)))
    m = torch.sparse_coo_tensor(np.vstack([rt.row, rt.col]), rt.data, rt.shape).coalesce()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, s, v = torch.svd_lowrank(m, q=min(k + 32, min(rt.shape)), niter=niter)
    order = torch.argsort(s, descending=True)[:k]
    return v[:, order].numpy(), (s[order] ** 2).numpy()


LIN_WEIGHTS = ("raw", "log1p", "binary")


def lin_weights(csr, how="raw"):
    """The weights the linear filter reads: as given ("raw"), log(1 + w) ("log1p"), or 1 per edge
    ("binary"); zero stays zero (the filter reads positive weights only)."""
    if how == "raw":
        return csr
    if how not in LIN_WEIGHTS:
        raise ValueError(f"unknown lin weights {how!r} (known: {', '.join(LIN_WEIGHTS)})")
    out = sp.csr_matrix(csr, dtype=np.float64, copy=True)
    out.data = np.log1p(out.data) if how == "log1p" else (out.data != 0).astype(np.float64)
    out.eliminate_zeros()
    return out


def top_k_rows(sim, k, first=0):
    """Item x item `sim` (rows `first`.. of the whole matrix) keeping, in each row i, its k largest positive
    entries off the diagonal (ties, in float32, to the lower column), as float32: i's k nearest items.
    A shopper's filter then reads k entries per item they have, whatever the size of the graph."""
    csr = sp.csr_matrix(sim, dtype=np.float64)
    csr.sort_indices()
    rows = np.repeat(np.arange(csr.shape[0], dtype=np.int64), np.diff(csr.indptr))
    keep = (csr.indices != rows + first) & (csr.data > 0)
    rows, cols, vals = rows[keep], csr.indices[keep], csr.data[keep].astype(np.float32)
    # One int64 key: row, then falling value (a positive float32's bits order like its value); a
    # stable sort keeps the lower column first among equal values (entries come by row, then column).
    key = (rows << 32) | (0x7FFFFFFF - vals.view(np.int32)).astype(np.int64)
    order = np.argsort(key, kind="stable")
    del key
    rows, cols, vals = rows[order], cols[order], vals[order]
    keep = (np.arange(len(rows)) - np.searchsorted(rows, np.arange(csr.shape[0]))[rows]) < k
    return sp.csr_matrix((vals[keep], (rows[keep], cols[keep])), shape=csr.shape)


def item_table(rt, k, block_entries=20_000_000):
    """R~^T R~ of `rt` (normalised users x items) with each row pruned to its k nearest items
    (`top_k_rows`), built a block of rows at a time so that the whole product is never held: a block
    spans about `block_entries` of the product's terms."""
    t = sp.csr_matrix(rt.T, dtype=np.float64)
    reach = np.asarray(t.astype(bool).astype(np.float64) @ np.diff(rt.indptr).astype(np.float64)).ravel()
    bounds, n = [0], t.shape[0]
    for end in np.searchsorted(np.cumsum(reach), np.arange(block_entries, reach.sum() + block_entries, block_entries)):
        end = int(min(max(end, bounds[-1] + 1), n))
        if end > bounds[-1]:
            bounds.append(end)
    if bounds[-1] < n:
        bounds.append(n)
    blocks = [top_k_rows(t[a:b] @ rt, k, a) for a, b in zip(bounds, bounds[1:])]
    return sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix(t.shape[:1] * 2, dtype=np.float32)


def table_topk(edges, items, cfg):
    """The item table's row length for a graph of `edges` and `items` under `cfg` (a ModelConfig): 0 (the
    exact filter) up to cfg.table_edges edges or with cfg.lin_topk set, else cfg.table_k bounded so that
    the table holds at most cfg.table_mb MiB (8 bytes an entry)."""
    if cfg.lin_topk or not cfg.table_edges or edges <= cfg.table_edges:
        return int(cfg.lin_topk)
    return int(max(1, min(cfg.table_k, cfg.table_mb * 2 ** 20 // (8 * max(1, items)))))


class LinearFilter:
    """lin(u, j) of a graph under a model's settings: GF-CF's r_u R~^T R~ by default.

    `weights` replaces every weight w of the graph (so its degrees too) by log(1 + w) or 1 before the
    filter, and `user_weights` (default: `weights`) those of the scored user's own row; `topk` > 0
    keeps of the item-item matrix R~^T R~ only each item i's `topk` most similar items j (off the
    diagonal, `item_table`), as item-to-item filtering does:
    lin(u, j) = sum over u's items i that have j among their neighbours of f_user(r_ui) (R~^T R~)_ij.
    `beta` replaces the target item's d_j^-1/2 by d_j^-beta (SGFCF's and ChebyCF's degree exponent).
    """

    def __init__(self, graph, weights="raw", topk=0, user_weights=None, beta=0.5):
        self.weights, self.topk = weights, int(topk or 0)
        self.user_weights = user_weights or weights
        lin_weights(graph[:0], self.user_weights)  # an unknown name fails here
        g = lin_weights(graph, weights)
        self.rt = normalised(g)
        self.sim = item_table(self.rt, self.topk) if self.topk else None
        # The target's degree to the power -beta instead of -1/2: a factor d_j^(1/2 - beta) per column.
        self.tilt = None if beta == 0.5 else target_tilt(degrees(g)[1], beta)

    @classmethod
    def of(cls, graph, cfg):
        """The filter of model settings `cfg` (a ModelConfig) on `graph`."""
        return cls(graph, getattr(cfg, "lin_weights", "raw"), getattr(cfg, "lin_topk", 0),
                   getattr(cfg, "lin_user_weights", None), getattr(cfg, "lin_beta", 0.5))

    def __call__(self, rows):
        """lin of the users whose (stored) weights are `rows`, a users x items CSR: dense users x items."""
        rows = lin_weights(rows, self.user_weights)
        if self.sim is None:
            out = linear_filter(rows, self.rt)
        else:
            out = np.asarray((sp.csr_matrix(rows, dtype=np.float64) @ self.sim).todense())
        return out if self.tilt is None else out * self.tilt


def target_tilt(item_deg, beta):
    """d_j^(1/2 - beta) per item (0 where d_j <= 0): turns the filter's d_j^-1/2 into d_j^-beta."""
    d = np.asarray(item_deg, dtype=np.float64)
    return np.where(d > 0, np.power(np.where(d > 0, d, 1.0), 0.5 - beta), 0.0)


def linear_filter(rows, rt):
    """r_u R~^T R~ for users' rows `rows` (users x items CSR), with `rt = normalised(graph)`.

    The normalised item-item co-occurrence of GF-CF applied through the users, never as the dense
    item x item matrix: score(u, j) = sum over paths u-i-v-j of r_ui r_vi r_vj / (sqrt(d_i) d_v sqrt(d_j)).
    """
    return np.asarray(((rows.astype(np.float64) @ rt.T) @ rt).todense())
