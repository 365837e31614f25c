"""Training-free baselines on the same split: popularity, cosine ItemKNN (tuned on validation), GF-CF.

Every scorer is a function `score_fn(user_rows) -> tensor [len(users), n_items]`, as
`graph_models.evaluation.evaluate` expects.
"""
import time

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import svds

from .evaluation import evaluate
from .spectral import degrees, inv_sqrt, normalised


def popularity_scorer(train_csr):
    """Score function ranking every item by its number of training users."""
    pop = torch.as_tensor(np.asarray((train_csr > 0).sum(axis=0)).ravel(), dtype=torch.float32)
    return lambda users: pop.expand(len(users), -1)


def _binary(csr):
    """The users x items 0/1 float32 CSR of a weighted interaction matrix."""
    return (csr > 0).astype(np.float32).tocsr()


def _cooccurrence(x):
    """(rows, cols, counts, item norms) of X^T X without its diagonal, grouped by column."""
    c = (x.T.tocsr() @ x).tocsc()
    c.sort_indices()
    cols = np.repeat(np.arange(c.shape[1], dtype=np.int32), np.diff(c.indptr))
    off = c.indices != cols  # an item is not its own neighbour
    norms = np.sqrt(np.asarray(x.sum(axis=0), dtype=np.float64).ravel())
    return c.indices[off], cols[off], c.data[off], norms


def _ranked_neighbours(cooc, shrink):
    """The cosine-with-shrink entries sorted by column, then by falling similarity, with ranks.

    sim(i, j) = |U_i ∩ U_j| / (sqrt|U_i| sqrt|U_j| + shrink). Ties keep the lower item
    first, so the result is deterministic; rank is the position inside column j.
    """
    rows, cols, counts, norms = cooc
    sim = (counts / (norms[rows] * norms[cols] + shrink)).astype(np.float32)
    # One int64 key per entry: column, then falling similarity (the bits of a positive
    # float32 order like its value). A stable sort of it is exact and much faster than
    # lexsort; entries already come by column and row, so ties keep the lower row.
    key = (cols.astype(np.int64) << 32) | (0x7FFFFFFF - sim.view(np.int32)).astype(np.int64)
    order = np.argsort(key, kind="stable")
    del key
    rows, cols, sim = rows[order], cols[order], sim[order]
    starts = np.searchsorted(cols, np.arange(len(norms)))
    return rows, cols, sim, np.arange(len(cols)) - starts[cols]


def _top_k_matrix(ranked, k, n):
    """Sparse item x item similarity keeping each column's k most similar items."""
    rows, cols, sim, rank = ranked
    keep = rank < k
    return sp.csr_matrix((sim[keep], (rows[keep], cols[keep])), shape=(n, n))


def itemknn_similarity(train_csr, k=200, shrink=10.0):
    """Sparse item x item cosine similarity keeping the top-k neighbours of each item.

    sim(i, j) = |U_i ∩ U_j| / (sqrt|U_i| sqrt|U_j| + shrink); the shrink term damps
    similarities resting on very few co-occurrences. Built from the sparse
    co-occurrence matrix, so the dense item x item matrix never exists.
    """
    n = train_csr.shape[1]
    return _top_k_matrix(_ranked_neighbours(_cooccurrence(_binary(train_csr)), shrink), k, n)


def _knn_scores(x, sim):
    """Score function: score(u, j) = sum over u's items i of sim(i, j)."""
    return lambda users: torch.as_tensor((x[np.asarray(users)] @ sim).toarray())


def itemknn_scorer(train_csr, k=200, shrink=10.0):
    """Score function: score(u, j) = sum over u's training items i of sim(i, j)."""
    return _knn_scores(_binary(train_csr), itemknn_similarity(train_csr, k=k, shrink=shrink))


def _pick_users(val, users, seed=0):
    """Validation users to tune on: all, a seeded sample of `users` of them, or the given rows."""
    rows = np.array(sorted(u for u, t in val.items() if t), dtype=np.int64)
    if users is None:
        return rows, "all"
    if np.isscalar(users):
        if users >= len(rows):
            return rows, "all"
        pick = np.sort(np.random.default_rng(seed).choice(rows, size=int(users), replace=False))
        return pick, f"seeded sample (seed {seed})"
    return np.asarray(sorted(set(map(int, users)) & set(map(int, rows))), dtype=np.int64), "given"


def tune_itemknn(fit_csr, val, exclude=None, ks=(50, 100, 200, 400, 800),
                 shrinks=(0, 10, 50, 100), k=20, users=None):
    """Pick ItemKNN's (neighbourhood size, shrink) by validation Recall@k over a grid.

    `val` maps user row -> set of held-out item rows; `exclude` (default `fit_csr`) is
    never recommended. `users` bounds the time: None = every validation user, an int =
    a seeded (seed 0) sample of that many, or explicit user rows. The co-occurrence
    matrix is computed once for the whole grid and each shrink's neighbour ranking
    once for all ks. Returns {"k", "shrink", "grid": [per-config metrics], "users",
    "user_selection", "seconds"}; ties go to the earlier grid entry.
    """
    t0 = time.time()
    x = _binary(fit_csr)
    exclude = fit_csr if exclude is None else exclude
    rows, how = _pick_users(val, users)
    truth = {int(u): val[int(u)] for u in rows}
    cooc = _cooccurrence(x)
    grid = []
    for shrink in shrinks:
        ranked = _ranked_neighbours(cooc, float(shrink))
        for kk in ks:
            t1 = time.time()
            sim = _top_k_matrix(ranked, kk, x.shape[1])
            res = evaluate(_knn_scores(x, sim), truth, exclude, k)
            grid.append({"k": int(kk), "shrink": float(shrink), f"recall@{k}": res[f"recall@{k}"],
                         f"ndcg@{k}": res[f"ndcg@{k}"], "seconds": time.time() - t1})
        del ranked
    best = max(grid, key=lambda g: g[f"recall@{k}"])  # max keeps the first of equal values
    return {"k": best["k"], "shrink": best["shrink"], "grid": grid, "users": int(len(rows)),
            "user_selection": how, "seconds": time.time() - t0}


def top_right_singular_vectors(matrix, k, seed=0, solver="propack", niter=4):
    """Top-k right singular vectors (items x k, float32 tensor) of a sparse matrix, repeatably.

    solver "propack": scipy's svds with PROPACK and a seeded start (exact to solver
    tolerance); "lowrank": torch.svd_lowrank with q = k, `niter` power iterations,
    seeded inside torch.random.fork_rng (faster, but an approximate subspace when the
    spectrum is flat, as on Gowalla). A k that is not below min(shape) uses a dense SVD.
    """
    k = min(k, min(matrix.shape))
    if k >= min(matrix.shape) - 1:
        _, s, vt = np.linalg.svd(sp.csr_matrix(matrix).toarray(), full_matrices=False)
        v = vt[np.argsort(-s)[:k]].T
    elif solver == "propack":
        a = sp.csr_matrix(matrix, dtype=np.float64)
        _, s, vt = svds(a, k=k, solver="propack", random_state=np.random.default_rng(seed))
        v = vt[np.argsort(-s)].T
    elif solver == "lowrank":
        coo = sp.coo_matrix(matrix, dtype=np.float32)
        a = torch.sparse_coo_tensor(np.vstack([coo.row, coo.col]), coo.data, coo.shape)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _, s, v = torch.svd_lowrank(a.coalesce(), q=k, niter=niter)
        v = v[:, torch.argsort(s, descending=True)].numpy()
    else:
        raise ValueError(f"unknown solver {solver!r}")
    return torch.as_tensor(np.ascontiguousarray(v), dtype=torch.float32)


def gfcf_scorer(train_csr, alpha=0.3, k=256, seed=0, solver="propack"):
    """GF-CF (Shen et al., CIKM 2021): a linear filter plus an ideal low-pass filter.

    score(u) = r_u R̃ᵀR̃ + alpha r_u D_I^-1/2 V_k V_kᵀ D_I^1/2, with R̃ = D_U^-1/2 R D_I^-1/2
    and V_k its top-k right singular vectors. R is `train_csr` as given (pass
    `csr > 0` for the binary matrix of the paper). r_u R̃ᵀR̃ is computed as
    (r_u R̃ᵀ) R̃ per batch of users, so no item x item matrix is ever formed.
    """
    r = sp.csr_matrix(train_csr, dtype=np.float32)
    norm, d_i = normalised(r).astype(np.float32).tocsr(), degrees(r)[1]
    norm_t = norm.T.tocsr()
    ideal = alpha > 0 and k > 0
    if ideal:
        v = top_right_singular_vectors(norm, k, seed=seed, solver=solver).numpy()
        sqrt_d = np.sqrt(np.maximum(d_i, 0))[:, None]
        left = (inv_sqrt(d_i)[:, None] * v).astype(np.float32)  # D_I^-1/2 V_k
        right = torch.as_tensor((v * sqrt_d).T, dtype=torch.float32)  # V_kᵀ D_I^1/2

    def score(users):
        ru = r[np.asarray(users)]
        # (r_u R̃ᵀ) is far from sparse on real data: as a dense block times sparse R̃ it beats a
        # sparse x sparse product.
        out = torch.as_tensor(np.ascontiguousarray((norm_t @ (ru @ norm_t).toarray().T).T))
        if ideal:
            out += alpha * (torch.as_tensor(ru @ left) @ right)
        return out

    return score
