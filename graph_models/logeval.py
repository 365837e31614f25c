"""Any interaction log, each shopper's latest interactions held out: the model `train` serves against
tuned baselines, all chosen on a validation split made the same way inside the training part."""
from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp

from .baselines import gfcf_scorer, itemknn_scorer, popularity_scorer, tune_itemknn
from .bias import graph_trend
from .ease import MAX_ITEMS, ease_scorer, tune_ease
from .evaluation import evaluate
from .split import user_latest_holdout
from .train import Scorer, fit


def first_matrix(graph: sp.csr_matrix, u, i, first) -> sp.csr_matrix:
    """First times (ms) of edges (u, i) on `graph`'s pattern, as a users x items CSR."""
    out = sp.csr_matrix((np.asarray(first, dtype=np.float64), (u, i)), shape=graph.shape)
    out.sum_duplicates()
    return out.multiply(graph > 0).tocsr()


def choose_and_fit(graph, first, cfg, fixed=None, budget_s=None, progress=True, log_dir=None, content=None):
    """What `train` does: hold out each shopper's latest cfg.holdout of edges (`first`: first times on
    `graph`'s pattern), choose the settings on them (`content`: the items' feature rows, or None),
    rebuild on the whole graph. Returns (model, result, (fit_csr, validation targets))."""
    split = user_latest_holdout(graph, first, cfg.holdout)
    model, result = fit(graph, cfg, progress=progress, log_dir=log_dir, split=split,
                        trend=graph_trend(cfg, split[0], first),
                        fixed=fixed, budget_s=budget_s, content=content)
    return model, result, split


def run(graph, first, cfg, test_fraction=0.2, fixed=None, budget_s=None, progress=True, log_dir=None) -> dict:
    """Each user's latest `test_fraction` of edges is the test (items never seen in training are left
    out of it); ours is trained as `train` would on the rest; EASE (up to ease.MAX_ITEMS items) and
    ItemKNN are tuned on the same validation split ours chooses on; GF-CF and popularity as they are."""
    k = cfg.k
    train, test = user_latest_holdout(graph, first, test_fraction)
    seen = np.asarray((train > 0).sum(axis=0)).ravel() > 0
    truth = {u: {i for i in items if seen[i]} for u, items in test.items()}
    truth = {u: items for u, items in truth.items() if items}
    train_first = first_matrix(train, *_edges(first))
    t0 = time.time()
    model, result, (fit_csr, val) = choose_and_fit(train, train_first, cfg, fixed, budget_s, progress, log_dir)
    report = {"ours": {**evaluate(Scorer(model, train), truth, train, k), "seconds": time.time() - t0,
                       "settings": result["search"]["chosen"] if result.get("search") else None,
                       "bias_temperature": model.cfg.bias_temperature,
                       "validation": result["metrics"]}}
    tuning_users = cfg.search_users
    if graph.shape[1] <= MAX_ITEMS:
        t0 = time.time()
        e = tune_ease(fit_csr, val, k=k, users=tuning_users, seed=cfg.seed)
        report["ease"] = {**evaluate(ease_scorer(train, e["lambda"]), truth, train, k),
                          "params": {"lambda": e["lambda"]}, "seconds": time.time() - t0}
    t0 = time.time()
    knn = tune_itemknn(fit_csr, val, k=k, users=tuning_users)
    report["itemknn"] = {**evaluate(itemknn_scorer(train, k=knn["k"], shrink=knn["shrink"]), truth, train, k),
                         "params": {"k": knn["k"], "shrink": knn["shrink"]}, "seconds": time.time() - t0}
    report["gfcf"] = evaluate(gfcf_scorer(train, seed=cfg.seed), truth, train, k)
    report["popularity"] = evaluate(popularity_scorer(train), truth, train, k)
    report["split"] = {"users": graph.shape[0], "items": graph.shape[1], "edges": int(graph.nnz),
                       "train_edges": int(train.nnz), "test_users": len(truth),
                       "test_pairs": sum(map(len, truth.values())), "val_users": len(val),
                       "val_pairs": sum(map(len, val.values())), "test_fraction": test_fraction,
                       "val_fraction": cfg.holdout}
    return report


def _edges(first: sp.csr_matrix):
    """(rows, columns, values) of a CSR's entries."""
    coo = first.tocoo()
    return coo.row, coo.col, coo.data
