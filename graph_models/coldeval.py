"""Cold items on UCI Online Retail: items first sold after training, and a seeded share of items hidden.

Data: UCI Machine Learning Repository, "Online Retail" (Chen, Sain & Guo, 2012), DOI 10.24432/C5BW33,
CC BY 4.0. The file has no category column; an item's category here is the last word of its
description (the product noun: HOLDER, MUG, CAKESTAND), the same metadata for every method.
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .coldstart import ColdConfig, ContentMap, attention_matrix, choose_and_train, hide_items, tables
from .content import ContentEncoder, item_text
from .ease import ease_scorer, tune_ease
from .evaluation import evaluate
from .retail import load_time_split, read_purchases
from .train import Scorer, build, fit


def category(description: str) -> str | None:
    """The proxy category of an Online Retail item: the last word of its description."""
    words = str(description or "").split()
    return words[-1].lower() if words else None


def metadata(rows: pd.DataFrame, item_ids) -> tuple[np.ndarray, np.ndarray]:
    """(most frequent description, median unit price) of each of `item_ids` in `rows`."""
    desc = (rows.groupby(["item", "description"]).size().rename("n").reset_index()
            .sort_values(["item", "n", "description"], ascending=[True, False, True])
            .drop_duplicates("item").set_index("item")["description"])
    price = rows.groupby("item")["price"].median()
    return (desc.reindex(item_ids).fillna("").to_numpy(dtype=object),
            price.reindex(item_ids).to_numpy(dtype=np.float64))


class Content:
    """Items' metadata, the encoder fitted on the known ones, and their feature and text rows."""

    def __init__(self, descriptions, prices, known):
        self.texts = [item_text(title=d) for d in descriptions]
        self.cats = [category(d) for d in descriptions]
        self.prices = list(prices)
        k = np.asarray(known)
        self.encoder = ContentEncoder.fit([self.texts[i] for i in k], [self.cats[i] for i in k],
                                          [self.prices[i] for i in k])
        self.feats = self.encoder.transform(self.texts, self.cats, self.prices)

    def tfidf(self) -> sp.csr_matrix:
        """Unit TF-IDF rows of the texts (content-kNN's vectors: all n-grams, no SVD)."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        return sp.csr_matrix(TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True)
                             .fit_transform(self.texts))


def content_knn(graph, tfidf):
    """Content-kNN: score(u, j) = sum over u's items i of cos(text_i, text_j)."""
    x = sp.csr_matrix(graph > 0, dtype=np.float32)
    t = tfidf.astype(np.float32)
    return lambda users: torch.from_numpy(np.asarray(((x[np.asarray(users)] @ t) @ t.T).todense(), dtype=np.float32))


def category_popularity(graph, cats):
    """Popularity by category: the user's purchases in the item's category, then the category's and the
    item's share of all purchases as tie-breaks."""
    x = sp.csr_matrix(graph > 0, dtype=np.float32)
    names = sorted({c for c in cats if c})
    index = {c: k for k, c in enumerate(names)}
    col = np.array([index.get(c, -1) for c in cats])
    ok = col >= 0
    member = sp.csr_matrix((np.ones(ok.sum(), np.float32), (np.flatnonzero(ok), col[ok])),
                           shape=(len(cats), len(names)))
    item_pop = np.asarray(x.sum(axis=0)).ravel()
    cat_pop = np.asarray(member.T @ item_pop).ravel()
    prior = 0.5 * (member @ cat_pop) / max(cat_pop.max(), 1) + 0.25 * item_pop / max(item_pop.max(), 1)
    prior = torch.from_numpy(prior.astype(np.float32))
    return lambda users: torch.from_numpy(
        np.asarray(((x[np.asarray(users)] @ member) @ member.T).todense(), dtype=np.float32)) + prior


def _among(score_fn, cols):
    """The scores of `score_fn` restricted to columns `cols`."""
    c = torch.as_tensor(cols)
    return lambda users: score_fn(users)[:, c]


def _served(model, graph, net, feats, cold, known, mix: bool):
    """The Scorer the service ranks by when `cold` items take their rows from content through `net`
    (over the `known` items' features): by the attention mix of full scores (`mix`), or by their rows."""
    _, x, q = tables(model, graph[:, :model.num_items])
    a = attention_matrix(net, feats[cold], feats[known], known, model.num_items)
    content = (np.asarray(cold), np.asarray(a @ x), np.asarray(a @ q), a if mix else None)
    return Scorer(model, graph, content=content)


def _measure(named, truth_all, truth_cold, cold, exclude, k, truth_warm=None):
    """Each named score function's Recall/NDCG@k on the cold items among all items, among the cold
    items only, and (if given) on the known items among all items."""
    out = {}
    for name, fn in named.items():
        row = {"cold_among_all": evaluate(fn, truth_all, exclude, k),
               "cold_among_cold": evaluate(_among(fn, cold), truth_cold, exclude[:, cold], k)}
        if truth_warm is not None:
            row["warm_among_all"] = evaluate(fn, truth_warm, exclude, k)
        out[name] = row
    return out


def _cold_truth(truth_all, cold):
    """The truth restricted to cold columns, as positions in `cold`."""
    pos = {int(c): n for n, c in enumerate(cold)}
    out = {u: {pos[i] for i in items if i in pos} for u, items in truth_all.items()}
    return {u: items for u, items in out.items() if items}


def _scorers(model, net, graph, content, cold, ease_lambda, plain):
    """Ours as served (the learned map and content-kNN's attention, mixing full scores; the learned map's
    rows alone), the model chosen without content (`plain`), EASE, popularity by category and content-kNN
    over `graph`'s columns."""
    known = np.flatnonzero(np.asarray((graph > 0).sum(axis=0)).ravel() > 0)
    untrained = ContentMap(content.feats.shape[1], net.neighbours)
    return {"ours_mix": _served(model, graph, net, content.feats, cold, known, True),
            "ours_knn_mix": _served(model, graph, untrained, content.feats, cold, known, True),
            "ours_rows": _served(model, graph, net, content.feats, cold, known, False),
            "today": Scorer(plain, graph),
            "ease": ease_scorer(graph, ease_lambda),
            "category_popularity": category_popularity(graph, content.cats),
            "content_knn": content_knn(graph, content.tfidf())}


def _without_content(model, result, refit):
    """(model, fit's result) `train` chooses for a shop without content: `model`'s, unless its EASE reads
    the items' content (then `refit()`'s, the settings searched again without it)."""
    return refit() if model.cfg.ease_content else (model, result)


def time_protocol(path, cfg, ccfg, progress=True, writer=None, fixed=None) -> dict:
    """Train on the first 80% of time; the cold items are those first sold afterwards, described by
    their catalogue metadata (description, price); every model ranks them with all items."""
    split = load_time_split(path)
    rows = read_purchases(path)
    future = rows[rows["ts"] >= split.cutoff]
    warm_ids = pd.Index(split.item_ids)
    new_ids = np.sort(future.loc[~future["item"].isin(warm_ids), "item"].unique())
    ids = pd.Index(np.concatenate([split.item_ids, new_ids]))
    w, n_new, users = len(split.item_ids), len(new_ids), pd.Index(split.user_ids)
    graph = sp.hstack([split.train, sp.csr_matrix((len(users), n_new), dtype=np.float32)]).tocsr().astype(np.float64)
    u, i = users.get_indexer(future["customer"]), ids.get_indexer(future["item"])
    keep = (u >= 0) & (i >= 0)
    fut = sp.csr_matrix((np.ones(keep.sum()), (u[keep], i[keep])), shape=graph.shape)
    fut = sp.csr_matrix((fut > 0).astype(np.int8) - (fut > 0).multiply(graph > 0).astype(np.int8))
    fut.eliminate_zeros()
    has = np.diff(graph.indptr) > 0
    truth = {int(x): set(map(int, fut.indices[fut.indptr[x]:fut.indptr[x + 1]])) for x in np.flatnonzero(has)}
    cold = np.arange(w, w + n_new)
    truth_warm = {x: {j for j in t if j < w} for x, t in truth.items()}
    truth_warm = {x: t for x, t in truth_warm.items() if t}
    truth_all = {x: {j for j in t if j >= w} for x, t in truth.items()}
    truth_all = {x: t for x, t in truth_all.items() if t}
    new_desc, new_price = metadata(future, new_ids)
    content = Content(np.concatenate([split.description, new_desc]), np.concatenate([split.unit_price, new_price]),
                      np.arange(w))
    budget = cfg.max_minutes * 60 if cfg.max_minutes else None

    def fitted(feats=None):
        return fit(split.train.astype(np.float64), cfg, progress=progress, fixed=fixed, budget_s=budget,
                   split=(split.fit.astype(np.float64), split.val), content=feats)
    t0 = time.time()
    model, result = fitted(content.feats[:w])
    net, chosen = choose_and_train(lambda g: build(g, model.cfg, content=content.feats[:w]),
                                   split.train.astype(np.float64), content.feats[:w], ccfg, progress=progress,
                                   writer=writer, mix_check=True)
    seconds = time.time() - t0
    plain, plain_result = _without_content(model, result, fitted)
    lam = tune_ease(split.fit, split.val, k=cfg.k)["lambda"]
    table = _measure(_scorers(model, net, graph, content, cold, lam, plain), truth_all, _cold_truth(truth_all, cold),
                     cold, graph, cfg.k, truth_warm)
    return {"table": table, "content_map": chosen, "settings": model.cfg.to_dict(), "seconds": seconds,
            "validation": result["metrics"], "settings_without_content": plain.cfg.to_dict(),
            "validation_without_content": plain_result["metrics"], "ease_lambda": lam,
            "split": {"cold_items": int(n_new), "cold_users": len(truth_all),
                      "cold_pairs": sum(map(len, truth_all.values())), "warm_users": len(truth_warm),
                      "items": int(w + n_new)}}


def heldout_protocol(path, cfg, ccfg, share=0.2, seed=0, progress=True, writer=None, fixed=None) -> dict:
    """A seeded `share` of all items hidden from training with all their edges, described only by their
    metadata; ranked among the hidden items and among all items."""
    rows = read_purchases(path)
    users, ids = pd.Index(np.sort(rows["customer"].unique())), pd.Index(np.sort(rows["item"].unique()))
    u, i = users.get_indexer(rows["customer"]), ids.get_indexer(rows["item"])
    full = sp.csr_matrix((np.ones(len(rows)), (u, i)), shape=(len(users), len(ids)))
    full.sum_duplicates()
    graph, cold, truth_cold = hide_items(full, share, seed)
    truth_all = {x: {int(cold[j]) for j in t} for x, t in truth_cold.items()}
    desc, price = metadata(rows, ids)
    known = np.setdiff1d(np.arange(len(ids)), cold)
    content = Content(desc, price, known)
    t0 = time.time()
    budget = cfg.max_minutes * 60 if cfg.max_minutes else None
    # `fit` leaves the graph's rows stored in another order, and the validation split `holdout` draws
    # depends on that order: a search run again without content starts from the graph as given.
    given = graph.copy()
    model, result = fit(graph, cfg, progress=progress, fixed=fixed, budget_s=budget, content=content.feats)
    net, chosen = choose_and_train(lambda g: build(g, model.cfg, content=content.feats), graph, content.feats, ccfg,
                                   progress=progress, writer=writer, mix_check=True)
    seconds = time.time() - t0
    plain, plain_result = _without_content(model, result,
                                           lambda: fit(given, cfg, progress=progress, fixed=fixed, budget_s=budget))
    from .split import holdout
    fit_csr, val = holdout(graph, cfg.holdout, cfg.seed)
    lam = tune_ease(fit_csr, val, k=cfg.k, users=cfg.search_users, seed=cfg.seed)["lambda"]
    table = _measure(_scorers(model, net, graph, content, cold, lam, plain), truth_all, truth_cold, cold, graph, cfg.k)
    return {"table": table, "content_map": chosen, "settings": model.cfg.to_dict(), "seconds": seconds,
            "validation": result["metrics"], "settings_without_content": plain.cfg.to_dict(),
            "validation_without_content": plain_result["metrics"],
            "ease_lambda": lam, "split": {"cold_items": int(len(cold)), "cold_users": len(truth_all),
                                          "cold_pairs": sum(map(len, truth_all.values())), "items": len(ids),
                                          "users": len(users), "seed": seed, "share": share}}


def run_evaluation(path, cfg, ccfg=None, progress=True, log_dir=None, fixed=None, protocols=("time", "heldout")):
    """The protocols asked for, each with the baselines in the same run (`fixed`: settings the search
    leaves alone)."""
    from .train import _tensorboard
    writer = _tensorboard(log_dir)
    ccfg = ccfg or ColdConfig(seed=cfg.seed, k=cfg.k)
    report = {}
    if "time" in protocols:
        report["time"] = time_protocol(path, cfg, ccfg, progress, writer, fixed)
    if "heldout" in protocols:
        report["heldout"] = heldout_protocol(path, cfg, ccfg, progress=progress, writer=writer, fixed=fixed)
    if writer is not None:
        writer.close()
    return report


NAMES = {"ours_mix": "ours, mix (learned map)", "ours_knn_mix": "ours, mix (kNN attention)",
         "ours_rows": "ours, rows (learned map)", "today": "model without content", "ease": "EASE",
         "category_popularity": "popularity by category", "content_knn": "content-kNN"}


def table(report: dict) -> str:
    """A plain-text table of both protocols' Recall@20 / NDCG@20."""
    lines = []
    for proto, title in (("time", "new items (time split)"), ("heldout", "held-out items")):
        if proto not in report:
            continue
        r = report[proto]["table"]
        cols = [c for c in ("cold_among_cold", "cold_among_all", "warm_among_all") if c in r["today"]]
        lines.append(f"\n{title}: " + ", ".join(f"{k} {v}" for k, v in report[proto]["split"].items()))
        lines.append(f"{'model':<24}" + "".join(f"{c:>26}" for c in cols))
        for name, row in r.items():
            lines.append(f"{NAMES.get(name, name):<24}" + "".join(
                f"{row[c]['recall@20']:>16.4f} / {row[c]['ndcg@20']:.4f}" for c in cols))
    return "\n".join(lines)
