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


def linear_filter(rows, rt):
    """r_u R~^T R~ for users' rows `rows` (users x items CSR), with `rt = normalised(graph)`.

    The normalised item-item co-occurrence of GF-CF applied through the users, never as the dense
    item x item matrix: score(u, j) = sum over paths u-i-v-j of r_ui r_vi r_vj / (sqrt(d_i) d_v sqrt(d_j)).
    """
    return np.asarray(((rows.astype(np.float64) @ rt.T) @ rt).todense())
