"""EASE (Steck, WWW 2019): the closed-form item-item model, as a term of the ranking and as a baseline."""
import numpy as np
import scipy.sparse as sp
import torch

# Items past which EASE is not offered: its dense item x item matrix grows with the square of the catalogue
# (4 bytes an entry in every API process) and its inverse with the cube.
MAX_ITEMS = 8000


def gram(csr) -> np.ndarray:
    """X^T X of the binary users x items matrix, dense float64 (computed once for every lambda)."""
    x = (sp.csr_matrix(csr) > 0).astype(np.float64)
    return np.asarray((x.T @ x).todense())


def content_gram(feats, graph) -> np.ndarray:
    """F F^T of items' feature rows F scaled to length 1 (cosines), dense float64, for EASE with side
    information (Jeunen, Van Balen & Goethals, RecSys 2020: the closed form on [X; sqrt(alpha) F^T]).

    The rows of items without an edge in `graph` are zero: their columns of EASE stay zero, so that an
    item nobody has bought is scored by the content map's mix alone (graph_models.coldstart), not twice."""
    f = np.asarray(feats, dtype=np.float64)
    n = np.sqrt((f * f).sum(axis=1, keepdims=True))
    f = np.divide(f, n, out=np.zeros_like(f), where=n > 0)
    f[np.asarray((sp.csr_matrix(graph) > 0).sum(axis=0)).ravel() == 0] = 0.0
    return f @ f.T


def ease_matrix(csr_or_gram, lam: float) -> np.ndarray:
    """B = I - P diag(1/diag(P)) with P = (X^T X + lam I)^-1, zero diagonal, dense float32 items x items.

    Scores are x_u B for the binary row x_u of a shopper. Accepts the matrix or its `gram`.
    """
    g = gram(csr_or_gram) if sp.issparse(csr_or_gram) else np.array(csr_or_gram, dtype=np.float64)
    n = g.shape[0]
    if n > MAX_ITEMS:
        raise ValueError(f"EASE is offered up to {MAX_ITEMS} items, not {n}")
    g[np.diag_indices(n)] += lam
    p = torch.linalg.inv(torch.from_numpy(g)).numpy()
    b = -p / np.diag(p)[None, :]
    b[np.diag_indices(n)] = 0.0
    return b.astype(np.float32)


def ease_scorer(train_csr, lam: float = 300.0):
    """Score function of EASE fitted on `train_csr` (binary), for `graph_models.evaluation.evaluate`."""
    b = torch.from_numpy(ease_matrix(train_csr, lam))
    x = (sp.csr_matrix(train_csr) > 0).astype(np.float32)
    return lambda users: torch.from_numpy(np.asarray(x[np.asarray(users)].todense())) @ b


def tune_ease(fit_csr, val, k=20, lambdas=(10, 30, 100, 300, 1000, 3000, 10000), users=None, seed=0) -> dict:
    """Pick EASE's lambda by validation Recall@k (then NDCG@k) over a grid; ties go to the earlier entry.

    `val` maps user row -> held-out item rows, `fit_csr` is never recommended; `users` as in
    `baselines.tune_itemknn` (None: every validation user, an int: a seeded sample)."""
    from .baselines import _pick_users
    from .evaluation import evaluate
    rows, _ = _pick_users(val, users, seed)
    truth = {int(u): val[int(u)] for u in rows}
    g, x = gram(fit_csr), (sp.csr_matrix(fit_csr) > 0).astype(np.float32)
    grid = []
    for lam in lambdas:
        b = torch.from_numpy(ease_matrix(g, lam))
        m = evaluate(lambda u: torch.from_numpy(np.asarray(x[u].todense())) @ b, truth, fit_csr, k)
        grid.append({"lambda": float(lam), f"recall@{k}": m[f"recall@{k}"], f"ndcg@{k}": m[f"ndcg@{k}"]})
    best = max(grid, key=lambda r: (r[f"recall@{k}"], r[f"ndcg@{k}"]))
    return {"lambda": best["lambda"], "grid": grid, "users": int(len(rows))}
