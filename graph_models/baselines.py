"""Non-graph baselines on the same split: popularity and cosine ItemKNN."""
import numpy as np
import scipy.sparse as sp
import torch


def popularity_scorer(train_csr):
    """Score function ranking every item by its number of training users."""
    pop = torch.as_tensor(np.asarray((train_csr > 0).sum(axis=0)).ravel(), dtype=torch.float32)
    return lambda users: pop.expand(len(users), -1)


def itemknn_similarity(train_csr, k=200, shrink=10.0, chunk=2048):
    """Sparse item x item cosine similarity keeping the top-k neighbours of each item.

    sim(i, j) = |U_i ∩ U_j| / (sqrt|U_i| sqrt|U_j| + shrink); the shrink term damps
    similarities resting on very few co-occurrences. Computed in column chunks so
    the dense item x item matrix never exists.
    """
    x = (train_csr > 0).astype(np.float32).tocsc()
    norms = np.sqrt(np.asarray(x.sum(axis=0)).ravel())
    xt = x.T.tocsr()
    n = x.shape[1]
    rows, cols, vals = [], [], []
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        co = (xt @ x[:, s:e]).toarray()  # items x chunk co-occurrence counts
        sim = co / (norms[:, None] * norms[None, s:e] + shrink + 1e-12)
        sim[np.arange(s, e), np.arange(e - s)] = 0.0  # an item is not its own neighbour
        kk = min(k, n - 1)
        top = np.argpartition(-sim, kk - 1, axis=0)[:kk]  # per column: its top-k rows
        v = np.take_along_axis(sim, top, axis=0)
        keep = v > 0
        rows.append(top[keep])
        cols.append(np.broadcast_to(np.arange(s, e), top.shape)[keep])
        vals.append(v[keep])
    rows, cols, vals = map(np.concatenate, (rows, cols, vals))
    return sp.csr_matrix((vals, (rows, cols)), shape=(n, n))


def itemknn_scorer(train_csr, k=200, shrink=10.0):
    """Score function: score(u, j) = sum over u's training items i of sim(i, j)."""
    sim = itemknn_similarity(train_csr, k=k, shrink=shrink)
    x = (train_csr > 0).astype(np.float32).tocsr()
    return lambda users: torch.as_tensor((x[np.asarray(users)] @ sim).toarray())
