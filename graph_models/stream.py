"""Prequential evaluation over a time-ordered event stream: score each micro-batch, then learn from it.

Sort by time, fit on the first part, replay the rest in micro-batches. Before a batch is learned,
each of its events in which a known user (one with a positive edge) meets a known item the user has
not had before is scored: hit rate, NDCG and MRR at k of that item in the user's top k over every
known item, the user's own items excluded (the ranking the API serves). Each (user, item) pair is
scored once per batch; ties rank against the item (a constant score is no hit). Then every model
learns the batch. All models see the same stream and are timed on what they do during it.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from .baselines import itemknn_similarity, tune_itemknn
from .retail import time_cutoff
from .streaming import Edges, fine_tune
from .train import Scorer, fit


class Stream(NamedTuple):
    """Events sorted by time; user and item rows numbered in order of first appearance."""

    u: np.ndarray
    i: np.ndarray
    ts: np.ndarray  # epoch ms
    w: np.ndarray  # the event's weight (any sign), as ingest stores it
    user_ids: np.ndarray
    item_ids: np.ndarray


def encode(users, items, ts, w) -> Stream:
    """A Stream from parallel event arrays (ties in time keep their order)."""
    order = np.argsort(np.asarray(ts), kind="stable")
    u, user_ids = pd.factorize(np.asarray(users, dtype=object)[order])
    i, item_ids = pd.factorize(np.asarray(items, dtype=object)[order])
    return Stream(u.astype(np.int64), i.astype(np.int64), np.asarray(ts, dtype=np.int64)[order],
                  np.asarray(w, dtype=np.float64)[order], np.asarray(user_ids), np.asarray(item_ids))


def start_of_test(stream: Stream, train_fraction: float) -> int:
    """Index of the first streamed event: the first `train_fraction` of events, never splitting a timestamp."""
    cut = time_cutoff(stream.ts, train_fraction)
    return int(np.searchsorted(stream.ts, cut, side="left"))


def batch_bounds(stream: Stream, start: int, size: int | None = None, minutes: float | None = None) -> list:
    """(lo, hi) event ranges of the micro-batches after `start`: `size` events, or `minutes` of time each."""
    n = len(stream.ts)
    if minutes:
        slot = (stream.ts[start:] - stream.ts[start]) // int(minutes * 60_000)
        cuts = start + np.flatnonzero(np.diff(slot)) + 1
        edges = [start, *cuts.tolist(), n]
    else:
        edges = [*range(start, n, int(size or 1000)), n]
    return [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]


class Live:
    """The graph after the first `hi` events: positive weights (what models read) and every pair (what
    is never recommended), over the users and items seen so far."""

    def __init__(self, stream: Stream, hi: int):
        self.stream, self.hi = stream, hi
        u, i, w = stream.u[:hi], stream.i[:hi], stream.w[:hi]
        self.shape = (int(u.max()) + 1 if hi else 0, int(i.max()) + 1 if hi else 0)
        raw = sp.csr_matrix((w, (u, i)), shape=self.shape)
        raw.sum_duplicates()
        self.pos = raw.maximum(0).tocsr()
        self.pos.eliminate_zeros()
        self.exists = sp.csr_matrix((np.ones(hi, dtype=np.float32), (u, i)), shape=self.shape)
        self.exists.sum_duplicates()
        self.user_deg = np.asarray(self.pos.sum(axis=1)).ravel()

    def edges(self) -> Edges:
        """Edge arrays with the time each pair was first seen."""
        s, n_i = self.stream, max(self.shape[1], 1)
        key = s.u[:self.hi] * n_i + s.i[:self.hi]
        uniq, inv = np.unique(key, return_inverse=True)
        first = np.full(len(uniq), np.iinfo(np.int64).max)
        np.minimum.at(first, inv, s.ts[:self.hi])
        w = np.bincount(inv, weights=s.w[:self.hi], minlength=len(uniq))
        return Edges(uniq // n_i, uniq % n_i, w, first, self.shape)

    def trend(self, cfg):
        """The items' trend (`bias.trend`) for a model with settings `cfg` that reads one, else None."""
        return self.edges().trend(cfg.trend_halflife) if cfg.reads_trend else None

    def resized(self, shape) -> sp.csr_matrix:
        """The positive weights padded to `shape` (a later, larger graph)."""
        out = self.pos.copy()
        out.resize(shape)
        return out


def scored_pairs(live: Live, stream: Stream, lo: int, hi: int) -> np.ndarray:
    """Distinct (user, item) pairs of events [lo, hi) that count: known user, known item, new to the user."""
    u, i = stream.u[lo:hi], stream.i[lo:hi]
    n_u, n_i = live.shape
    ok = (u < n_u) & (i < n_i)
    ok[ok] = live.user_deg[u[ok]] > 0
    ok[ok] = np.asarray(live.exists[u[ok], i[ok]]).ravel() == 0
    pairs = np.unique(np.stack([u[ok], i[ok]], axis=1), axis=0) if ok.any() else np.zeros((0, 2), np.int64)
    return pairs


def ranks(scores: np.ndarray, users: np.ndarray, live: Live, pairs: np.ndarray) -> np.ndarray:
    """1-based rank of each pair's item among the user's unseen known items (ties count ahead)."""
    scores = np.array(scores, dtype=np.float64)[:, :live.shape[1]]
    seen = live.exists[users].tocoo()
    scores[seen.row, seen.col] = -np.inf
    row = np.searchsorted(users, pairs[:, 0])
    target = scores[row, pairs[:, 1]]
    return (scores[row] >= target[:, None]).sum(axis=1)


def train_at(stream: Stream, hi: int, cfg, val_fraction: float = 0.1, progress: bool = False):
    """InterestSAGE on the first `hi` events: responses fitted on the last `val_fraction` of them in time
    (each user's new items there) against the rest, then the basis of the whole graph."""
    live = Live(stream, hi)
    cut = int(np.searchsorted(stream.ts[:hi], time_cutoff(stream.ts[:hi], 1.0 - val_fraction), side="left"))
    before = Live(stream, cut)
    pairs = scored_pairs(before, stream, cut, hi)
    val: dict = {}
    for u, i in pairs:
        val.setdefault(int(u), set()).add(int(i))
    model, _ = fit(live.pos, cfg, progress=progress, split=(before.resized(live.shape), val), trend=before.trend(cfg))
    return model, before, val


def served_scores(scorer: Scorer, users: np.ndarray) -> np.ndarray:
    """The scorer's rows, with users whose vector is zero (every item of theirs newer than the version)
    scoring nothing: the service has no vector to query for them and answers 404."""
    with torch.no_grad():
        out = scorer(users).numpy()
        out[~(scorer.p[torch.as_tensor(users)] != 0).any(dim=1).numpy()] = 0.0
    return out


class Recommender:
    """A model under prequential test: `score` before a batch, `learn` after it, timed."""

    name = "model"

    def __init__(self):
        self.seconds = 0.0
        self.updates: list = []

    def score(self, users: np.ndarray, live: Live) -> np.ndarray:
        """Scores [len(users), items] of the users over the items of `live`."""
        raise NotImplementedError

    def learn(self, live: Live, batch: int) -> None:
        """Take in the graph after batch number `batch`."""


class Popularity(Recommender):
    """Items by their number of users, counted online."""

    name = "popularity"

    def learn(self, live, batch):
        self.count = np.asarray((live.pos > 0).sum(axis=0), dtype=np.float64).ravel()

    def score(self, users, live):
        return np.broadcast_to(self.count, (len(users), len(self.count)))


class ItemKNN(Recommender):
    """Cosine ItemKNN over the live co-occurrence, its neighbourhood size and shrink tuned at the start."""

    name = "itemknn"

    def __init__(self, k: int, shrink: float):
        super().__init__()
        self.k, self.shrink = k, shrink

    def learn(self, live, batch):
        self.x = (live.pos > 0).astype(np.float32).tocsr()
        self.sim = itemknn_similarity(live.pos, k=self.k, shrink=self.shrink)

    def score(self, users, live):
        return (self.x[users] @ self.sim).toarray()


class Static(Recommender):
    """InterestSAGE as trained on the first part: vectors and graph filter never refreshed."""

    name = "static"

    def __init__(self, model, live: Live):
        super().__init__()
        self.scorer, self.shape = Scorer(model, live.pos, trend=live.trend(model.cfg)), live.shape

    def score(self, users, live):
        out = np.zeros((len(users), live.shape[1]), dtype=np.float32)
        known = users < self.shape[0]
        if known.any():
            out[known, :self.shape[1]] = served_scores(self.scorer, users[known])
        return out


class Incremental(Recommender):
    """The same version, its user vectors and graph filter refreshed from the live graph after each batch."""

    name = "incremental"

    def __init__(self, model):
        super().__init__()
        self.model = model

    def learn(self, live, batch):
        with torch.no_grad():
            self.scorer = Scorer(self.model, live.pos, trend=live.trend(self.model.cfg))

    def score(self, users, live):
        return served_scores(self.scorer, users)


class Retrained(Incremental):
    """Incremental, plus a full retrain on the live graph every `every` batches."""

    name = "incremental_retrain"

    def __init__(self, model, cfg, every: int):
        super().__init__(model)
        self.cfg, self.every = cfg, every

    def learn(self, live, batch):
        if batch >= 0 and (batch + 1) % self.every == 0:
            started = time.time()
            self.model, _, _ = train_at(live.stream, live.hi, self.cfg)
            self.updates.append({"batch": batch, "kind": "retrain", "seconds": round(time.time() - started, 2)})
        super().learn(live, batch)


class Streaming(Incremental):
    """Incremental, plus streaming learning every `every` batches: new items folded into the basis and
    the responses fine-tuned on the window since the last update with replay, kept only if not worse
    on the window's last `check` batches (see `streaming.fine_tune`)."""

    name = "streaming"

    def __init__(self, model, cfg, every: int, bounds: list, check: int, replay: float = 1.0, rounds: int = 2):
        super().__init__(model)
        self.cfg, self.every, self.bounds, self.check = cfg, every, bounds, check
        self.replay, self.rounds = replay, rounds

    def learn(self, live, batch):
        if batch >= 0 and (batch + 1) % self.every == 0:
            started = time.time()
            ts = live.stream.ts
            recent_from = ts[self.bounds[batch + 1 - self.every][0]]
            check_from = ts[self.bounds[batch + 1 - self.check][0]]
            new, report = fine_tune(self.model, live.edges(), recent_from, check_from, self.cfg,
                                    replay=self.replay, rounds=self.rounds)
            if report["accepted"]:
                self.model = new
            self.updates.append({"batch": batch, "kind": "fine-tune", **report,
                                 "seconds": round(time.time() - started, 2)})
        super().learn(live, batch)


def run(stream: Stream, start: int, bounds: list, models: list, k: int = 20, progress: bool = True) -> dict:
    """Replay `bounds` through every model; per-model totals and per-batch hits."""
    live = Live(stream, start)
    for m in models:
        t0 = time.time()
        m.learn(live, -1)
        m.seconds += time.time() - t0
    totals = {m.name: np.zeros(3) for m in models}
    per_batch = []
    n_scored = 0
    for b, (lo, hi) in enumerate(tqdm(bounds, desc="stream", unit="batch", disable=not progress)):
        pairs = scored_pairs(live, stream, lo, hi)
        users = np.unique(pairs[:, 0])
        row = {"t": int(stream.ts[lo]), "n": int(len(pairs)), "hits": {}}
        for m in models:
            if not len(pairs):
                row["hits"][m.name] = 0
                continue
            t0 = time.time()
            r = np.concatenate([ranks(m.score(users[s:s + 512], live), users[s:s + 512], live,
                                      pairs[np.isin(pairs[:, 0], users[s:s + 512])])
                                for s in range(0, len(users), 512)])
            m.seconds += time.time() - t0
            hit = r <= k
            totals[m.name] += [hit.sum(), (hit / np.log2(r + 1)).sum(), (hit / r).sum()]
            row["hits"][m.name] = int(hit.sum())
        n_scored += len(pairs)
        per_batch.append(row)
        live = Live(stream, hi)
        for m in models:
            t0 = time.time()
            m.learn(live, b)
            m.seconds += time.time() - t0
    n = max(n_scored, 1)
    return {"k": k, "events_scored": int(n_scored),
            "models": {m.name: {"hr": totals[m.name][0] / n, "ndcg": totals[m.name][1] / n,
                                "mrr": totals[m.name][2] / n, "seconds": round(m.seconds, 2)} for m in models},
            "batches": per_batch, "updates": {m.name: m.updates for m in models if m.updates}}


def evaluate_stream(stream: Stream, cfg, train_fraction: float = 0.8, k: int = 20, batch_size: int | None = None,
                    batch_minutes: float | None = None, retrain_every: int = 50, finetune_every: int = 10,
                    check_batches: int | None = None, replay: float = 1.0, models=None,
                    progress: bool = True, trained=None, rounds: int = 2) -> dict:
    """The whole comparison on one stream: fit on the first `train_fraction`, replay the rest.

    Our model and ItemKNN are tuned on the last 10% (in time) of the first part, never on the stream.
    `models` restricts which of popularity, itemknn, static, incremental, incremental_retrain and
    streaming run (all by default); `trained` is `train_at`'s result if already computed.
    """
    cfg.k = k
    start = start_of_test(stream, train_fraction)
    bounds = batch_bounds(stream, start, batch_size, batch_minutes)
    t0 = time.time()
    model, fit_live, val = trained or train_at(stream, start, cfg, progress=progress)
    train_seconds = time.time() - t0
    at_start = Live(stream, start)
    graph = at_start.pos
    wanted = set(models or ("popularity", "itemknn", "static", "incremental", "incremental_retrain", "streaming"))
    chosen = []
    if "popularity" in wanted:
        chosen.append(Popularity())
    knn = None
    if "itemknn" in wanted:
        knn = tune_itemknn(fit_live.resized(graph.shape), val, k=k)
        chosen.append(ItemKNN(knn["k"], knn["shrink"]))
    if "static" in wanted:
        chosen.append(Static(model, at_start))
    if "incremental" in wanted:
        chosen.append(Incremental(model))
    if "incremental_retrain" in wanted:
        chosen.append(Retrained(model, cfg, retrain_every))
    if "streaming" in wanted:
        check = check_batches or max(1, finetune_every // 4)
        chosen.append(Streaming(model, cfg, finetune_every, bounds, check, replay=replay, rounds=rounds))
    result = run(stream, start, bounds, chosen, k=k, progress=progress)
    result["protocol"] = {
        "events": int(len(stream.ts)), "train_events": start, "stream_events": int(len(stream.ts) - start),
        "batches": len(bounds), "batch_size": batch_size, "batch_minutes": batch_minutes,
        "train_fraction": train_fraction, "stream_from": int(stream.ts[start]) if start < len(stream.ts) else None,
        "users_at_start": int(graph.shape[0]), "items_at_start": int(graph.shape[1]),
        "users": int(len(stream.user_ids)), "items": int(len(stream.item_ids)),
        "retrain_every": retrain_every, "finetune_every": finetune_every, "replay": replay, "finetune_rounds": rounds,
        "train_seconds": round(train_seconds, 2), "itemknn": knn and {"k": knn["k"], "shrink": knn["shrink"]},
        "model": {"dim": cfg.dim, "sharp_dim": cfg.sharp_dim, "low": model.low.tolist(),
                  "sharp": model.sharp.tolist(), "alpha": cfg.alpha, "lin_weights": cfg.lin_weights,
                  "lin_user_weights": cfg.lin_user_weights, "lin_topk": cfg.lin_topk,
                  "item_bias": cfg.bias_temperature, "bias_l2": cfg.bias_l2,
                  "trend_halflife": cfg.trend_halflife, "trend_weight": cfg.trend_weight},
    }
    return result
