"""Item biases: a learned per-item prior next to the graph's scores (which items new adopters pick).

The graph filter ranks an item by how close it is to what the shopper has; it knows nothing of which
items shoppers are taking up now. With biases on, a shopper's scores are divided by their largest, so
that every shopper's best item scores 1, and each item adds its bias b_j. The biases are fitted by
gradient steps on the cross-entropy of a softmax, at a temperature, over each target user's unseen
items, with the graph's scores held fixed: the gradient of b_j is (expected - observed adoptions)/T.
Fine-tuning starts from the current biases, which is what streaming learning updates.

With a trend on (cfg.trend_weight > 0), each item also adds `trend_weight x trend_j`, a live prior: new
adopters of the item, each decayed by the age of their first edge, relative to the most trending
item. It is read from the graph being scored, like the filter, so the biases learn what the trend
does not explain.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch


def with_bias(scores, bias) -> torch.Tensor:
    """`scores` (users x items) divided per row by its largest magnitude, plus `bias` (0 past its end)."""
    s = torch.as_tensor(scores)
    top = s.abs().amax(dim=1, keepdim=True)
    b = torch.zeros(s.shape[1], dtype=s.dtype)
    n = min(len(bias), s.shape[1])
    b[:n] = torch.as_tensor(bias[:n], dtype=s.dtype)
    return s / torch.where(top > 0, top, torch.ones_like(top)) + b


DAY_MS = 86_400_000


def decayed(first_ms, anchor_ms: float, halflife_days: float) -> np.ndarray:
    """Each edge's part of its item's trend: 2^((first seen - anchor) / half-life)."""
    return np.exp2((np.asarray(first_ms, dtype=np.float64) - anchor_ms) / (halflife_days * DAY_MS))


def trend(items, first_ms, n_items: int, halflife_days: float) -> np.ndarray:
    """Per item, the sum over its positive edges (`items`, first seen at `first_ms`) of
    2^(-age / half-life), divided by the largest: 1 for the most trending item, independent of when
    it is computed (every age grows alike), and 0 for items without an edge."""
    items = np.asarray(items, dtype=np.int64)
    out = np.zeros(n_items)
    if len(items) and halflife_days > 0:
        np.add.at(out, items, decayed(first_ms, np.max(first_ms), halflife_days))
        out /= out.max()
    return out


def graph_trend(mcfg, graph, first) -> np.ndarray | None:
    """The items' trend (bias.trend) of `graph`'s positive edges, first seen at `first`'s entries (None
    without them), when settings `mcfg` read one; else None."""
    if not mcfg.reads_trend:
        return None
    if first is None:
        raise ValueError("this version's ranking reads the items' trend: give the edges' first times")
    g = sp.coo_matrix(graph)
    pos = g.data > 0
    times = np.asarray(sp.csr_matrix(first)[g.row[pos], g.col[pos]]).ravel()
    return trend(g.col[pos], times, graph.shape[1], mcfg.trend_halflife)


def prior(cfg, n_items: int, item_trend=None) -> np.ndarray:
    """What the live trend adds to each item's bias under model settings `cfg` (zeros without one),
    `item_trend` being `trend` of the graph scored at cfg.trend_halflife."""
    if not cfg.reads_trend:
        return np.zeros(n_items)
    if item_trend is None:
        raise ValueError("this model's ranking reads the items' trend: give the graph's first times")
    t = np.asarray(item_trend, dtype=np.float64)
    out = np.zeros(n_items)
    out[:min(len(t), n_items)] = t[:n_items]
    return cfg.trend_weight * out


def fit_bias(score_fn, graph, targets: dict, cfg, start=None, steps: int | None = None, extra=None,
             l2: float | None = None) -> np.ndarray:
    """Item biases fitted to `targets` (user row -> held-out item rows) on the unbiased `score_fn`
    (user rows -> scores over the items of `graph`), each user's `graph` items excluded.

    Starts from `start` (zeros by default; padded with zeros for items added since) and takes `steps`
    full-batch gradient steps (cfg.bias_steps by default) of size cfg.bias_lr with L2 `l2` (cfg.bias_l2
    by default); `extra` (per item, e.g. `prior`) is added to the biases and held fixed.
    Users whose scores are all zero (no vector: the service answers trending items) are left out;
    at most cfg.sample_users target users, sampled with cfg.seed, are used.
    """
    n_items = graph.shape[1]
    b = np.zeros(n_items)
    if start is not None:
        b[:min(len(start), n_items)] = np.asarray(start, dtype=np.float64)[:n_items]
    users = np.array(sorted(u for u, t in targets.items() if t), dtype=np.int64)
    if len(users) > cfg.sample_users:
        users = np.sort(np.random.default_rng(cfg.seed).choice(users, size=cfg.sample_users, replace=False))
    if not len(users):
        return b
    with torch.no_grad():
        s = torch.cat([torch.as_tensor(score_fn(users[k:k + 512])).float() for k in range(0, len(users), 512)])
    base = with_bias(s, np.zeros(0) if extra is None else extra).numpy().astype(np.float32)
    live = np.abs(base).max(axis=1) > 0
    users, base = users[live], base[live]
    seen = graph[users].tocoo()
    base[seen.row, seen.col] = -np.inf
    counts = np.asarray([len(targets[int(u)]) for u in users], dtype=np.float32)
    observed = np.zeros(n_items)
    for u in users:
        np.add.at(observed, list(targets[int(u)]), 1.0)
    total, tau = counts.sum(), cfg.bias_temperature
    l2 = cfg.bias_l2 if l2 is None else l2
    for _ in range(cfg.bias_steps if steps is None else steps):
        z = (base + b.astype(np.float32)) / tau
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        expected = counts @ p
        b -= cfg.bias_lr * ((expected - observed) / (tau * total) + l2 * b)
    return b
