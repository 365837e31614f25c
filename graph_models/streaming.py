"""Streaming learning between retrains: fold new items into the basis, fine-tune the responses, gate.

A version's item table comes from one SVD of its training graph, so items first seen since have no
row and are reached only through the live graph filter. Between full retrains:
- `fold_in` gives every item of the live graph a row without a new SVD (the classic SVD fold-in:
  a new item's normalised column projected on the user-side singular vectors);
- `fine_tune` moves the response coefficients, warm-started from the current ones, by a bounded
  coordinate search on the recent edges mixed with a replay sample of older ones (so that the
  coefficients do not forget the past; replay as in continual learning for graph recommenders),
  then, with item biases on, takes a few gradient steps on the biases from the current ones on the
  same edges (`bias.fit_bias`);
- the result is kept only if it is not worse than the current model on the most recent held-out
  edges (Recall@k, then NDCG@k), which neither the fold-in nor the search saw.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import torch

from .bias import fit_bias, prior, trend
from .evaluation import evaluate
from .model import InterestSAGE
from .spectral import degrees, normalised
from .train import Scorer, train


class Edges(NamedTuple):
    """The live graph as parallel edge arrays: user and item rows, weight, first time seen (ms)."""

    u: np.ndarray
    i: np.ndarray
    w: np.ndarray
    first: np.ndarray
    shape: tuple

    def graph(self, keep=None) -> sp.csr_matrix:
        """Users x items CSR of the positive weights of the edges in `keep` (all by default)."""
        keep = np.ones(len(self.u), dtype=bool) if keep is None else keep
        csr = sp.csr_matrix((np.maximum(self.w[keep], 0.0), (self.u[keep], self.i[keep])), shape=self.shape)
        csr.eliminate_zeros()
        return csr

    def trend(self, halflife_days: float, keep=None) -> np.ndarray:
        """`bias.trend` of the graph of the edges in `keep` (all by default)."""
        pos = self.w > 0 if keep is None else keep & (self.w > 0)
        return trend(self.i[pos], self.first[pos], self.shape[1], halflife_days)


def with_coefficients(model: InterestSAGE, like: InterestSAGE) -> InterestSAGE:
    """`model` with the response coefficients and item biases of `like` (items past them: bias 0)."""
    model.load_state_dict({k: v for k, v in like.state_dict().items() if k in ("low", "sharp")}, strict=False)
    n = min(like.num_items, model.num_items)
    bias = torch.zeros(model.num_items, dtype=torch.float64)
    bias[:n] = like.bias[:n]
    model.bias = bias
    return model


def fold_in(model: InterestSAGE, graph: sp.csr_matrix) -> InterestSAGE:
    """A model with a basis row for every item column of `graph`: the version's rows as they are,
    later columns (items new since) folded in as v_j = c_jᵀ U Σ⁻¹ = c_jᵀ R̃ V Σ⁻², c_j the item's
    column of the live R̃; components with σ² ≈ 0 are left at zero. Item k of `graph` must be version
    row k for k below the version's item count."""
    known, n = model.num_items, graph.shape[1]
    if n <= known:
        return copy.deepcopy(model)
    rt = normalised(graph).tocsc()
    v = model.basis.numpy()
    s2 = model.s2.numpy()
    inv = np.where(s2 > 1e-10, 1.0 / np.where(s2 > 1e-10, s2, 1.0), 0.0)
    user_side = np.asarray(rt[:, :known] @ v)  # U Σ of every live user, folded in from the known items
    new_rows = np.asarray(rt[:, known:].T @ user_side) * inv
    deg = np.concatenate([model.out_scale.numpy() ** 2, degrees(graph)[1][known:]])
    out = InterestSAGE(np.vstack([v, new_rows]), s2, deg, model.cfg)
    if model.ease.numel():  # EASE is fitted per version: items new since have no row or column in it
        out.ease = torch.zeros(n, n, dtype=model.ease.dtype)
        out.ease[:known, :known] = model.ease
    return with_coefficients(out, model).eval()


def _targets(edges: Edges, recent: np.ndarray, old: np.ndarray, replay: float, rng, weight=None) -> dict:
    """user row -> held-out items: the recent edges of users with older edges, plus a replay sample of
    `replay` times as many older edges (users keep at least one edge), drawn in proportion to `weight`
    (per edge; uniformly if None)."""
    old_users = np.bincount(edges.u[old], minlength=edges.shape[0])
    kept = old_users + np.bincount(edges.u[recent], minlength=edges.shape[0])
    recent_idx = np.flatnonzero(recent & (old_users[edges.u] > 0))
    pool = np.flatnonzero(old & (old_users[edges.u] > 1))
    n_replay = min(len(pool), int(round(replay * len(recent_idx))))
    p = None
    if weight is not None and n_replay:
        p = weight[pool] / weight[pool].sum()
        n_replay = min(n_replay, int(np.count_nonzero(p)))
    replay_idx = rng.choice(pool, size=n_replay, replace=False, p=p) if n_replay else np.zeros(0, dtype=np.int64)
    out: dict = {}
    for k in np.concatenate([recent_idx, replay_idx]):
        out.setdefault(int(edges.u[k]), set()).add(int(edges.i[k]))
    for u in list(out):  # a replayed user keeps at least one old edge
        if len(out[u]) >= kept[u]:
            out[u].discard(max(out[u]))
    return {u: t for u, t in out.items() if t}


def new_items_after(edges: Edges, before: np.ndarray, after: np.ndarray) -> dict:
    """user row -> items of the `after` edges, for users and items with a positive edge `before`."""
    g = edges.graph(before)
    users, items = np.diff(g.indptr) > 0, np.asarray(g.sum(axis=0)).ravel() > 0
    out: dict = {}
    for u, i in zip(edges.u[after], edges.i[after]):
        if users[u] and items[i]:
            out.setdefault(int(u), set()).add(int(i))
    return out


def check(model: InterestSAGE, graph: sp.csr_matrix, truth: dict, k: int, item_trend=None) -> dict:
    """Recall@k and NDCG@k of the served ranking on `graph` (whose trend is `item_trend`) for held-out `truth`."""
    if not truth:
        return {f"recall@{k}": 0.0, f"ndcg@{k}": 0.0, "users": 0}
    with torch.no_grad():
        return evaluate(Scorer(model, graph, trend=item_trend), truth, graph, k)


def _key(metrics: dict, k: int) -> tuple:
    return metrics[f"recall@{k}"], metrics[f"ndcg@{k}"]


def fine_tune(model: InterestSAGE, edges: Edges, recent_from, check_from, cfg, replay: float = 1.0,
              rounds: int = 2, tune=None) -> tuple[InterestSAGE, dict]:
    """One streaming update of a version: fold in new items and fine-tune the responses, then keep the
    result only if it is not worse than `model` on the check edges.

    Edges first seen at or after `check_from` are the check; those from `recent_from` up to it are the
    recent ones the responses are fitted on, with a replay sample of `replay` times as many older
    edges drawn with weight 2^(-age / window) before `recent_from` (the window: the recent part's
    length). The search starts from the current coefficients and runs at most `rounds` rounds (0:
    none) with the smallest step of `cfg`; the biases take cfg.bias_finetune_steps steps.
    `tune(candidate, fit_csr, targets)` replaces both (tests). Returns the candidate folded over the
    whole graph and a report whose `accepted` says whether it may replace `model`.
    """
    rng = np.random.default_rng(cfg.seed)
    before = edges.first < check_from
    recent = before & (edges.first >= recent_from)
    old = edges.first < recent_from
    g_before = edges.graph(before)
    truth = new_items_after(edges, before, ~before)
    # Replay leans to the recent past: what shoppers took up a while ago, not the graph's whole history
    # (uniform draws pulled the item biases back to all-time popularity; docs/evaluation.md).
    window = check_from - recent_from
    weight = np.exp2(-np.maximum(recent_from - edges.first, 0) / window) if window > 0 else None
    targets = _targets(edges, recent, old, replay, rng, weight)
    hidden = sp.csr_matrix((np.ones(sum(map(len, targets.values()))),
                            ([u for u, t in targets.items() for _ in t], [i for t in targets.values() for i in t])),
                           shape=edges.shape)
    fit_csr = g_before - g_before.multiply(hidden > 0)
    fit_csr.eliminate_zeros()
    trend_before = trend_fit = None
    if cfg.reads_trend:  # the trend of the graph each step scores on
        trend_before = edges.trend(cfg.trend_halflife, before)
        trend_fit = edges.trend(cfg.trend_halflife, before & (np.asarray(hidden[edges.u, edges.i]).ravel() == 0))
    folded = fold_in(model, g_before)
    tuned = copy.deepcopy(folded)
    if targets:
        if tune is not None:
            tune(tuned, fit_csr, targets)
        else:
            tcfg = dataclasses.replace(cfg, epochs=rounds, step=2 * cfg.min_step, patience=1,
                                       max_minutes=min(cfg.max_minutes or 5.0, 5.0))
            if rounds:
                train(tuned, fit_csr, targets, tcfg, progress=False)
            if tuned.biased:  # warm-started from the current biases (the new items' at 0)
                tuned.bias = torch.from_numpy(fit_bias(
                    Scorer(tuned, fit_csr, biased=False, candidates=False), fit_csr, targets, cfg, start=tuned.bias.numpy(),
                    steps=cfg.bias_finetune_steps, extra=prior(cfg, fit_csr.shape[1], trend_fit),
                    l2=cfg.bias_finetune_l2))
    scores = {name: check(m, g_before, truth, cfg.k, trend_before)
              for name, m in (("current", model), ("folded", folded), ("tuned", tuned))}
    # The search keeps its own best round (the folded start included), so the tuned model is the one
    # candidate; the folded one is scored to tell the two steps' shares apart.
    accepted = bool(truth) and _key(scores["tuned"], cfg.k) >= _key(scores["current"], cfg.k)
    report = {"accepted": accepted,
              "check": {name: {m: round(v, 6) if isinstance(v, float) else v for m, v in s.items()}
                        for name, s in scores.items()},
              "check_users": len(truth), "check_edges": int(np.count_nonzero(~before)),
              "recent_targets": int(sum(len(t) for t in targets.values())),
              "replay": replay, "rounds": rounds, "items_folded": int(edges.shape[1] - model.num_items),
              "low": tuned.low.tolist(), "sharp": tuned.sharp.tolist(),
              "bias_moved": round(float(np.abs(tuned.bias.numpy() - folded.bias.numpy()).max(initial=0.0)), 6)}
    return with_coefficients(fold_in(model, edges.graph()), tuned), report
