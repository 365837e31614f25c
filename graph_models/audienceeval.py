"""Audience evaluation at a cut: for each item bought after it, rank the users active before it."""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import rankdata


def matrix(events: pd.DataFrame, users: pd.Index, items: pd.Index) -> sp.csr_matrix:
    """users x items counting the lines of `events` whose user and item are indexed."""
    u, i = users.get_indexer(events["user"]), items.get_indexer(events["item"])
    keep = (u >= 0) & (i >= 0)
    m = sp.csr_matrix((np.ones(keep.sum()), (u[keep], i[keep])), shape=(len(users), len(items)))
    m.sum_duplicates()
    return m


def item_metrics(scores: np.ndarray, truth: np.ndarray, allowed: np.ndarray, k: int) -> tuple[float, float]:
    """(recall@k, AUC) of one item's user scores against its buyers, over the `allowed` users only."""
    s, t = scores[allowed], truth[allowed]
    pos = int(t.sum())
    if pos == 0 or pos == len(t):
        return float("nan"), float("nan")
    top = np.argsort(-s, kind="stable")[:k]
    ranks = rankdata(s)
    auc = (ranks[t].sum() - pos * (pos + 1) / 2) / (pos * (len(t) - pos))
    return float(t[top].sum() / pos), float(auc)


def measure(score_columns, truth: sp.csc_matrix, past: sp.csc_matrix, items, k: int, new_only: bool) -> dict:
    """Mean recall@k and AUC over `items`; `new_only` drops each item's past buyers from ranking and truth."""
    recalls, aucs = [], []
    n = truth.shape[0]
    for j, col in zip(items, score_columns(items)):
        t = np.zeros(n, dtype=bool)
        t[truth.indices[truth.indptr[j]:truth.indptr[j + 1]]] = True
        allowed = np.ones(n, dtype=bool)
        if new_only:
            allowed[past.indices[past.indptr[j]:past.indptr[j + 1]]] = False
        r, a = item_metrics(np.asarray(col, dtype=np.float64), t, allowed, k)
        if not np.isnan(r):
            recalls.append(r)
            aucs.append(a)
    return {f"recall@{k}": round(float(np.mean(recalls)), 4), "auc": round(float(np.mean(aucs)), 4),
            "items": len(recalls)}


def dense_columns(full: np.ndarray):
    """A score_columns function over a dense users x items matrix."""
    return lambda items: (full[:, j] for j in items)


def run(events: pd.DataFrame, cut: pd.Timestamp, scorers: dict, horizon_days: int = 90, k: int = 100) -> dict:
    """Each scorer's audience quality; `scorers` maps a name to f(past csr) -> users x items dense scores, or
    to {"all": f, "new": f}, f(items) -> their columns (for "new", the item's past buyers already left out)."""
    t0 = time.time()
    before = events[events["ts"] < cut]
    after = events[(events["ts"] >= cut) & (events["ts"] < cut + pd.Timedelta(days=horizon_days))]
    users, items = pd.Index(np.sort(before["user"].unique())), pd.Index(np.sort(before["item"].unique()))
    past, future = matrix(before, users, items), matrix(after, users, items)
    bought = np.flatnonzero(np.diff(future.tocsc().indptr) > 0)
    truth, past_c = (future > 0).tocsc(), (past > 0).tocsc()
    report = {"test": {"cut": str(cut.date()), "horizon_days": horizon_days, "users": len(users),
                       "items": int(len(bought)), "k": k}}
    for name, make in scorers.items():
        t1 = time.time()
        full = make(past)  # dense users x items, or column functions {"all": f, "new": f} (items -> columns)
        cols = full if isinstance(full, dict) else {"all": dense_columns(full), "new": dense_columns(full)}
        report[name] = {"all": measure(cols["all"], truth, past_c, bought, k, False),
                        "new": measure(cols["new"], truth, past_c, bought, k, True),
                        "seconds": round(time.time() - t1, 1)}
    report["seconds"] = round(time.time() - t0, 1)
    return report


def most_active(past: sp.csr_matrix) -> np.ndarray:
    """Every item's audience is the users with the most purchase lines."""
    lines = np.asarray(past.sum(axis=1)).ravel()
    return np.repeat(lines[:, None], past.shape[1], axis=1)


def _validation(past: sp.csr_matrix, before: pd.DataFrame, users, items, fraction: float = 0.9):
    """(fit, val) inside the past: its first `fraction` of rows in time, and each user's new items after."""
    ts = before["ts"].to_numpy()
    val_cut = ts[min(int(len(ts) * fraction), len(ts) - 1)]
    fit = matrix(before[before["ts"] < val_cut], users, items)
    later = matrix(before[before["ts"] >= val_cut], users, items)
    new = ((later > 0).astype(np.int8) - (later > 0).multiply(fit > 0).astype(np.int8)).tocsr()
    new.eliminate_zeros()
    val = {u: set(new.indices[new.indptr[u]:new.indptr[u + 1]].tolist()) for u in range(new.shape[0])
           if new.indptr[u + 1] > new.indptr[u] and fit.indptr[u + 1] > fit.indptr[u]}
    return fit, val


def scorers(events: pd.DataFrame, cut: pd.Timestamp, cfg, budget_s: float | None = None) -> tuple[dict, dict, object]:
    """Ours (the full recommendation score over every user, graph filter included; the same before its
    per-user scaling; the vector cosine cos(p_u, q_j) the API once served), the most active users and the
    ItemKNN audience, each chosen on validation inside the past; and our fitted model."""
    from .baselines import itemknn_scorer, tune_itemknn
    from .train import Scorer, fit as fit_model

    before = events[events["ts"] < cut]
    users, items = pd.Index(np.sort(before["user"].unique())), pd.Index(np.sort(before["item"].unique()))
    past = matrix(before, users, items)
    fit_csr, val = _validation(past, before, users, items)
    knn = tune_itemknn(fit_csr, val, k=20)
    model, result = fit_model(past, cfg, progress=False, split=(fit_csr, val), budget_s=budget_s)
    scorer = Scorer(model, past)
    every = np.arange(past.shape[0])
    p, q = scorer.p.numpy().astype(np.float64), scorer.q.numpy().astype(np.float64)
    norm = np.linalg.norm(p, axis=1, keepdims=True)
    chosen = {"itemknn": {"k": knn["k"], "shrink": knn["shrink"]}, "ours": result["metrics"]}
    return {
        "ours_cosine": lambda _: (p @ q.T) / np.where(norm > 0, norm, 1.0),
        # the recommendation score (graph filter and EASE included) over each user's best item: the item
        # bias is the same for every user of an item, so it does not change an audience's order
        "ours_full": lambda _: scorer(every).numpy(),
        "ours_raw": lambda _: raw(scorer, every),
        "most_active": most_active,
        "itemknn": lambda m: itemknn_scorer(m, k=knn["k"], shrink=knn["shrink"])(every).numpy(),
    }, chosen, model


def raw(scorer, users) -> np.ndarray:
    """The recommendation score before its per-user scaling (vectors, graph filter, EASE), as an array."""
    from .train import ease_scores
    s = scorer.p[users] @ scorer.q.T
    if scorer.lin_weight:
        s = s.numpy() + scorer.lin_weight * scorer.lin(scorer.graph[users])
    else:
        s = s.numpy()
    if scorer.ease is not None:
        s = s + scorer.ease_weight * ease_scores(scorer.graph[users], scorer.ease).numpy()
    return np.asarray(s)
