"""Gowalla benchmark (LightGCN split): InterestSAGE against popularity, tuned ItemKNN and GF-CF."""
import gzip
import os
import time

import numpy as np
import scipy.sparse as sp
import torch

from .baselines import gfcf_scorer, itemknn_scorer, popularity_scorer, tune_itemknn
from .config import ModelConfig
from .evaluation import evaluate
from .split import holdout
from .train import Scorer, fit

NUM_USERS, NUM_ITEMS = 29858, 40981


def read_interactions(path):
    """Dict user -> list of items from a `user item item ...` file (optionally gzipped)."""
    opener = gzip.open if path.endswith(".gz") else open
    out = {}
    with opener(path, "rt") as fh:
        for line in fh:
            parts = line.split()
            if parts:
                out.setdefault(int(parts[0]), []).extend(int(x) for x in parts[1:])
    return out


def to_csr(interactions, shape):
    """Binary users x items CSR from a dict user -> items."""
    rows = [u for u, items in interactions.items() for _ in items]
    cols = [i for items in interactions.values() for i in items]
    m = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=shape)
    m.data[:] = 1.0  # a repeated pair counts once
    return m


def load_split(data_dir):
    """(train_csr, test dict user -> set of items, num_users, num_items) of the Gowalla split."""
    train = read_interactions(os.path.join(data_dir, "train.txt.gz"))
    test = read_interactions(os.path.join(data_dir, "test.txt.gz"))
    n_users = max(NUM_USERS, max(train) + 1, max(test) + 1)
    n_items = max(NUM_ITEMS, 1 + max(i for v in (*train.values(), *test.values()) for i in v))
    return to_csr(train, (n_users, n_items)), {u: set(v) for u, v in test.items()}, n_users, n_items


def run_evaluation(data_dir, cfg=None, progress=True, log_dir=None, fixed=None):
    """Train on Gowalla train, report test Recall/NDCG@k of ours and every baseline from one run.

    Everything chosen (our responses, early stopping, ItemKNN's neighbourhood and shrink) is chosen
    on a per-user hold-out of the training items; the test file is only read for the final scores.
    """
    cfg = cfg or ModelConfig()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    train_csr, test, n_users, n_items = load_split(data_dir)
    t0 = time.time()
    budget = cfg.max_minutes * 60 if cfg.max_minutes else None
    model, result = fit(train_csr, cfg, progress=progress, log_dir=log_dir, fixed=fixed, budget_s=budget)
    train_seconds = time.time() - t0
    k = cfg.k
    report = {"model": evaluate(Scorer(model, train_csr), test, train_csr, k)}
    report["model"]["seconds"] = train_seconds
    fit_csr, val = holdout(train_csr, cfg.holdout, cfg.seed)
    t0 = time.time()
    knn = tune_itemknn(fit_csr, val, k=k, users=10000)
    report["itemknn"] = evaluate(itemknn_scorer(train_csr, k=knn["k"], shrink=knn["shrink"]), test, train_csr, k)
    report["itemknn"].update(params={"k": knn["k"], "shrink": knn["shrink"]}, seconds=time.time() - t0,
                             grid=knn["grid"], tuned_on=f"{knn['users']} validation users, {knn['user_selection']}")
    t0 = time.time()
    report["gfcf"] = evaluate(gfcf_scorer(train_csr, seed=cfg.seed), test, train_csr, k)
    report["gfcf"]["seconds"] = time.time() - t0
    report["popularity"] = evaluate(popularity_scorer(train_csr), test, train_csr, k)
    report["ease"] = {"recall@20": None, "ndcg@20": None, "note": f"not run: {n_items} items, above EASE's cap"}
    report.update(train_seconds=train_seconds, epochs=result["epochs"], history=result["history"],
                  validation=result["metrics"], config=model.cfg.to_dict(), search=result.get("search"),
                  bias=result.get("bias"), responses={"low": model.low.tolist(), "sharp": model.sharp.tolist()},
                  interactions={"train": int(train_csr.nnz), "test": sum(map(len, test.values())),
                                "users": n_users, "items": n_items})
    return report
