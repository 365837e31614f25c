"""UCI Online Retail as a time-ordered split: train on the past, predict each shopper's new items.

Data: UCI Machine Learning Repository, "Online Retail" (Chen, Sain & Guo, 2012),
DOI 10.24432/C5BW33, CC BY 4.0.
"""
import time
from typing import NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .evaluation import evaluate


class RetailSplit(NamedTuple):
    """Train/test (and fit/validation inside train) in one user and item index space."""

    train: sp.csr_matrix  # users x items; weight = number of purchase lines; binary: train > 0
    truth: dict  # user row -> item rows bought in the test period and not in train
    user_ids: np.ndarray  # CustomerID by row (int)
    item_ids: np.ndarray  # StockCode by column (str)
    description: np.ndarray  # per item, its most frequent training description
    unit_price: np.ndarray  # per item, its median training unit price
    fit: sp.csr_matrix  # the first 90% of train rows in time, same shape as train
    val: dict  # user row -> items of train's last 10% the user lacks in fit
    cutoff: pd.Timestamp  # first test timestamp: train < cutoff <= test
    val_cutoff: pd.Timestamp  # first validation timestamp: fit < val_cutoff <= cutoff
    stats: dict  # row, user, item and pair counts


def _decoded(column, convert):
    """`convert` applied to a categorical column's categories only, then taken per row."""
    return np.asarray(convert(column.cat.categories))[column.cat.codes.to_numpy()]


def read_purchases(path):
    """Clean purchase lines (customer, item, ts, price, description), sorted by time.

    Kept: rows with a CustomerID, not a cancellation (InvoiceNo 'C...'), Quantity > 0
    and UnitPrice > 0. Customers are ints (`17850.0` is 17850). Ties in time keep file
    order. Text columns are read as categoricals: parsing each distinct value once
    makes this several times faster than per-row strings.
    """
    df = pd.read_csv(path, usecols=["InvoiceNo", "StockCode", "Description", "Quantity",
                                    "InvoiceDate", "UnitPrice", "CustomerID"],
                     dtype={"InvoiceNo": "category", "StockCode": "category",
                            "Description": "category", "InvoiceDate": "category",
                            "CustomerID": "float64"})
    cancelled = _decoded(df["InvoiceNo"], lambda c: c.str.startswith("C"))
    ok = (df["CustomerID"].notna() & ~cancelled & (df["Quantity"] > 0)
          & (df["UnitPrice"] > 0)).to_numpy()
    df = df[ok]
    out = pd.DataFrame({
        "customer": df["CustomerID"].to_numpy(dtype=np.int64),
        "item": _decoded(df["StockCode"], lambda c: c.astype(str)),
        "ts": _decoded(df["InvoiceDate"], lambda c: pd.to_datetime(c, format="%Y-%m-%d %H:%M:%S")),
        "price": df["UnitPrice"].to_numpy(dtype=np.float64),
        "description": _decoded(df["Description"].cat.add_categories([""]).fillna(""),
                                lambda c: c.astype(str)),
    })
    return out.sort_values("ts", kind="stable", ignore_index=True)


def time_cutoff(ts, fraction):
    """The timestamp of the row at `fraction` of the time-sorted rows (a rows quantile).

    Rows before it are the past, rows at or after it the future, so rows sharing a
    timestamp (one invoice) never straddle the cut.
    """
    return ts[min(int(len(ts) * fraction), len(ts) - 1)]


def _counts(rows, user_row, item_row, shape):
    """users x items CSR counting purchase lines of the known users and items."""
    u, i = user_row.get_indexer(rows["customer"]), item_row.get_indexer(rows["item"])
    keep = (u >= 0) & (i >= 0)
    m = sp.csr_matrix((np.ones(keep.sum(), np.float32), (u[keep], i[keep])), shape=shape)
    m.sum_duplicates()
    return m


def _new_items(before, after):
    """user row -> items in `after` that the user lacks in `before`, over users and items of `before`."""
    known_users = np.diff(before.indptr) > 0
    known_items = np.asarray((before > 0).sum(axis=0)).ravel() > 0
    new = (after > 0).astype(np.int8) - (after > 0).multiply(before > 0).astype(np.int8)
    new = sp.csr_matrix(new)
    new.eliminate_zeros()
    out = {}
    for u in np.flatnonzero(known_users):
        items = new.indices[new.indptr[u]:new.indptr[u + 1]]
        items = items[known_items[items]]
        if len(items):
            out[int(u)] = set(map(int, items))
    return out


def _item_metadata(rows, item_row):
    """(most frequent description, median unit price) per item, from `rows` only."""
    desc = (rows.groupby(["item", "description"]).size().rename("n").reset_index()
            .sort_values(["item", "n", "description"], ascending=[True, False, True])
            .drop_duplicates("item").set_index("item")["description"])
    price = rows.groupby("item")["price"].median()
    return (desc.reindex(item_row).fillna("").to_numpy(dtype=object),
            price.reindex(item_row).to_numpy(dtype=np.float64))


def load_time_split(path, train_fraction=0.8, val_fraction=0.1):
    """Time-ordered split of Online Retail into a RetailSplit (see the class).

    Interactions are (customer, StockCode) pairs. The cut is a rows quantile: the
    first `train_fraction` of the clean rows in time order (rounded so one timestamp
    is never split) is train, the rest test. Only users and items present in train
    are indexed and evaluated; a user's truth is the items bought in the test period
    that the user has no train line for. Validation applies the same rules inside
    train: its last `val_fraction` of rows against the rest (`fit`), in the same
    index space, so a model is tuned without looking at test.
    """
    rows = read_purchases(path)
    cutoff = time_cutoff(rows["ts"].to_numpy(), train_fraction)
    past, future = rows[rows["ts"] < cutoff], rows[rows["ts"] >= cutoff]
    user_row = pd.Index(np.sort(past["customer"].unique()))
    item_row = pd.Index(np.sort(past["item"].unique()))
    shape = (len(user_row), len(item_row))
    train = _counts(past, user_row, item_row, shape)
    truth = _new_items(train, _counts(future, user_row, item_row, shape))
    val_cutoff = time_cutoff(past["ts"].to_numpy(), 1.0 - val_fraction)
    fit = _counts(past[past["ts"] < val_cutoff], user_row, item_row, shape)
    val = _new_items(fit, _counts(past[past["ts"] >= val_cutoff], user_row, item_row, shape))
    description, unit_price = _item_metadata(past, item_row)
    known = future["customer"].isin(user_row) & future["item"].isin(item_row)
    stats = {"rows": len(rows), "train_rows": len(past), "test_rows": len(future),
             "test_rows_known": int(known.sum()), "users": shape[0], "items": shape[1],
             "train_pairs": int(train.nnz), "test_users": len(truth),
             "test_pairs": sum(map(len, truth.values())), "fit_pairs": int(fit.nnz),
             "val_users": len(val), "val_pairs": sum(map(len, val.values()))}
    return RetailSplit(train, truth, user_row.to_numpy(), item_row.to_numpy(dtype=str),
                       description, unit_price, fit, val, pd.Timestamp(cutoff),
                       pd.Timestamp(val_cutoff), stats)


def run_evaluation(path, cfg=None, progress=True, log_dir=None, fixed=None):
    """Ours against popularity, ItemKNN and GF-CF, trained on the first 80% of time and tested on the
    items each user first bought afterwards; ours and ItemKNN are tuned on the last 10% of train."""
    from .baselines import gfcf_scorer, itemknn_scorer, popularity_scorer, tune_itemknn
    from .coldeval import Content
    from .config import ModelConfig
    from .ease import ease_scorer, tune_ease
    from .train import Scorer, fit

    cfg = cfg or ModelConfig(dim=256, sharp_dim=64)
    split = load_time_split(path)
    graph = split.train.astype(np.float64)  # weights: purchase lines per (customer, item)
    t0 = time.time()
    # The items described as `train` describes a shop's (EASE may weigh their content, chosen on validation).
    feats = Content(split.description, split.unit_price, np.arange(len(split.item_ids))).feats
    # Responses fitted on the later part of train against the earlier part, as ItemKNN is tuned.
    model, result = fit(graph, cfg, progress=progress, log_dir=log_dir, split=(split.fit.astype(np.float64), split.val),
                        fixed=fixed, budget_s=cfg.max_minutes * 60 if cfg.max_minutes else None, content=feats)
    report = {"model": {**evaluate(Scorer(model, graph), split.truth, split.train, cfg.k),
                        "seconds": time.time() - t0}}
    ease = tune_ease(split.fit, split.val, k=cfg.k)
    report["ease"] = {**evaluate(ease_scorer(split.train, ease["lambda"]), split.truth, split.train, cfg.k),
                      "params": {"lambda": ease["lambda"]}}
    knn = tune_itemknn(split.fit, split.val, k=cfg.k)
    report["itemknn"] = {**evaluate(itemknn_scorer(split.train, k=knn["k"], shrink=knn["shrink"]), split.truth,
                                    split.train, cfg.k), "params": {"k": knn["k"], "shrink": knn["shrink"]}}
    report["gfcf"] = evaluate(gfcf_scorer(graph, seed=cfg.seed), split.truth, split.train, cfg.k)
    report["popularity"] = evaluate(popularity_scorer(split.train), split.truth, split.train, cfg.k)
    report.update(validation=result["metrics"], epochs=result["epochs"], history=result["history"],
                  config=model.cfg.to_dict(), search=result.get("search"), bias=result.get("bias"),
                  split={**split.stats, "cutoff": str(split.cutoff), "val_cutoff": str(split.val_cutoff)})
    return report
