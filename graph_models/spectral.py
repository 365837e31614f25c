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


def top_k_columns(sim, k):
    """Item x item `sim` keeping, in each column j, the k largest entries off the diagonal (ties, in
    float32, to the lower row): j's k nearest neighbours i, so that sum_i r_ui sim(i, j) reads only those."""
    csc = sp.csc_matrix(sim, dtype=np.float64)
    csc.sort_indices()
    cols = np.repeat(np.arange(csc.shape[1], dtype=np.int64), np.diff(csc.indptr))
    keep = (csc.indices != cols) & (csc.data > 0)
    rows, cols, vals = csc.indices[keep], cols[keep], csc.data[keep]
    # One int64 key: column, then falling value (a positive float32's bits order like its value); a
    # stable sort keeps the lower row first among equal values (entries come by column, then row).
    key = (cols << 32) | (0x7FFFFFFF - vals.astype(np.float32).view(np.int32)).astype(np.int64)
    order = np.argsort(key, kind="stable")
    del key
    rows, cols, vals = rows[order], cols[order], vals[order]
    starts = np.searchsorted(cols, np.arange(csc.shape[1]))
    keep = (np.arange(len(cols)) - starts[cols]) < k
    return sp.csr_matrix((vals[keep], (rows[keep], cols[keep])), shape=csc.shape)


class LinearFilter:
    """lin(u, j) of a graph under a model's settings: GF-CF's r_u R~^T R~ by default.

    `weights` replaces every weight w of the graph (so its degrees too) by log(1 + w) or 1 before the
    filter, and `user_weights` (default: `weights`) those of the scored user's own row; `topk` > 0
    keeps of the item-item matrix R~^T R~ only each item j's `topk` most similar items i (off the
    diagonal), as a neighbourhood model does:
    lin(u, j) = sum over u's items i among j's neighbours of f_user(r_ui) (R~^T R~)_ij.
    `beta` replaces the target item's d_j^-1/2 by d_j^-beta (SGFCF's and ChebyCF's degree exponent).
    """

    def __init__(self, graph, weights="raw", topk=0, user_weights=None, beta=0.5):
        self.weights, self.topk = weights, int(topk or 0)
        self.user_weights = user_weights or weights
        lin_weights(graph[:0], self.user_weights)  # an unknown name fails here
        g = lin_weights(graph, weights)
        self.rt = normalised(g)
        self.sim = top_k_columns(self.rt.T @ self.rt, self.topk) if self.topk else None
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
