"""Gowalla benchmark (LightGCN split): InterestSAGE against popularity and ItemKNN."""
import gzip
import os
import time

import numpy as np
import scipy.sparse as sp
import torch

from .baselines import itemknn_scorer, popularity_scorer
from .config import ModelConfig
from .evaluation import embedding_scorer, evaluate
from .graph import graph_from_csr
from .model import InterestSAGE
from .split import holdout
from .train import train

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


def run_evaluation(data_dir, cfg=None, progress=True):
    """Train on Gowalla train (10% held out for early stopping), report test Recall/NDCG@k."""
    cfg = cfg or ModelConfig()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    train_csr, test, n_users, n_items = load_split(data_dir)
    fit_csr, val = holdout(train_csr, 0.1, cfg.seed)
    model = InterestSAGE(n_items, cfg)
    result = train(graph_from_csr(fit_csr), model, cfg, val=val, progress=progress)
    # Test users are embedded from ALL their training edges (no retraining needed:
    # user vectors come from the neighbourhood), and all training items are excluded.
    model.eval()
    emb = model.inference(graph_from_csr(train_csr))["emb"]
    k = cfg.k
    report = {"model": evaluate(embedding_scorer(emb["user"], emb["item"]), test, train_csr, k),
              "popularity": evaluate(popularity_scorer(train_csr), test, train_csr, k)}
    t0 = time.time()
    report["itemknn"] = evaluate(itemknn_scorer(train_csr), test, train_csr, k)
    report["itemknn"]["seconds"] = time.time() - t0
    report.update(train_seconds=result["seconds"], epochs=result["epochs"],
                  history=result["history"], config=cfg.to_dict(),
                  interactions={"train": int(train_csr.nnz), "test": sum(map(len, test.values())),
                                "users": n_users, "items": n_items})
    return report


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default="../shared/data/gowalla")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--dim", type=int)
    parser.add_argument("--out", help="also write the report as JSON here")
    args = parser.parse_args()
    config = ModelConfig()
    for name in ("epochs", "dim"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    rep = run_evaluation(args.data_dir, config)
    print(json.dumps({k: v for k, v in rep.items() if k != "history"}, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rep, fh, indent=1)
