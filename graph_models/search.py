"""Choosing a model's settings on a shop's own validation split: a seeded Optuna search over the score's terms.

The score is a weighted sum of terms (graph_models/model.py): the graph filter (its edge weights, the
shopper's row weights and the target's degree exponent), the ideal low-pass block at a basis size, the
raw low-rank block, and EASE at an L2 weight. Each term is computed once per variant for a seeded
sample of validation users, so a trial costs a weighted sum and a top-k; terms are scaled to a common
size first, so that the searched weights mean the same on any data set. Fixed settings (`fixed`) are
not searched. Known-good points (GF-CF, the filter alone, EASE) are tried first, so the search cannot
end below them on validation. Where the items have content, the search's best is then tried with the
content's cosines in EASE's Gram at each weight of CONTENT_WEIGHTS, kept only if validation improves:
so a shop where content does not help keeps exactly the settings chosen without it.
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import optuna
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from .ease import MAX_ITEMS, content_gram, ease_matrix, gram
from .evaluation import evaluate
from .spectral import LIN_WEIGHTS, LinearFilter, degrees, inv_sqrt, item_basis, lin_weights, target_tilt

RANKS = (32, 64, 128, 256, 512, 1024, 2048)
LAMBDAS = (30.0, 100.0, 300.0, 1000.0, 3000.0)
CONTENT_WEIGHTS = (3.0, 10.0, 30.0, 100.0)  # of the content cosines in EASE's Gram, on the lambdas' scale
BETAS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)
SEARCHED = ("rank", "alpha", "sharp_alpha", "lin_weight", "lin_weights", "lin_user_weights", "lin_beta",
            "ease_lambda", "ease_weight", "ease_content")


class SearchError(ValueError):
    """A search that cannot run as asked (no validation users, no time for one trial)."""


class Terms:
    """The score's terms for a fixed sample of validation users, each computed once and kept."""

    def __init__(self, fit_csr, users, cfg, basis=None, content=None):
        self.x = sp.csr_matrix(fit_csr, dtype=np.float64)
        self.content = content  # the items' feature rows, or None (then EASE reads the edges alone)
        self.cfg, self._cache = cfg, {}
        self.rows = self.x[np.asarray(users)]
        v, self.s2 = basis or item_basis(self.x, cfg.dim, cfg.seed, cfg.svd_iters)
        d = degrees(self.x)[1]
        self.v = v
        self.p_low = torch.from_numpy(np.asarray(self.rows @ (v * inv_sqrt(d)[:, None]), dtype=np.float32))
        self.q_low = torch.from_numpy((v * np.sqrt(np.maximum(d, 0))[:, None]).astype(np.float32))
        self.ease_ok = self.x.shape[1] <= MAX_ITEMS
        self.binary = not (self.x.data != 1).any()  # 0/1 weights: the three weightings are one

    def _kept(self, key, make):
        if key not in self._cache:
            out = make()
            top = out.abs().amax(dim=1).mean().item()  # scaled so that a typical row's largest is 1
            self._cache[key] = (out / top if top > 0 else out, top)
        return self._cache[key]

    def lin(self, weights, user_weights):
        """The filter of the sample (target exponent 1/2; the item table's when cfg.lin_topk) and its scale."""
        return self._kept(("lin", weights, user_weights), lambda: torch.from_numpy(
            LinearFilter(self.x, weights, self.cfg.lin_topk, user_weights)(self.rows).astype(np.float32)))

    def tilt(self, weights, beta):
        """Per item, what the target exponent `beta` multiplies the filter's scores by."""
        key = ("tilt", weights, beta)
        if key not in self._cache:
            self._cache[key] = torch.from_numpy(
                target_tilt(degrees(lin_weights(self.x, weights))[1], beta).astype(np.float32))
        return self._cache[key]

    def low(self, rank):
        """The ideal low-pass block of the first `rank` singular vectors, and its scale."""
        r = min(rank, self.v.shape[1])
        return self._kept(("low", r), lambda: self.p_low[:, :r] @ self.q_low[:, :r].T)

    def sharp(self, rank):
        """The raw low-rank block (the first min(sharp_dim, rank) singular vectors), and its scale."""
        k = min(self.cfg.sharp_dim, rank, self.v.shape[1])
        vs = torch.from_numpy(self.v[:, :k].astype(np.float32))
        return self._kept(("sharp", k), lambda: torch.from_numpy(
            np.asarray(self.rows @ self.v[:, :k], dtype=np.float32)) @ vs.T)

    def ease(self, lam, content=0.0):
        """EASE at L2 weight `lam` (the content cosines at weight `content` in its Gram) on the sample's
        binary rows, and its scale (one inverse per pair: an eigendecomposition shared by all lambdas
        measured slower here than a few inverses)."""
        if "gram" not in self._cache:
            self._cache["gram"] = gram(self.x)
        if content and "content" not in self._cache:
            self._cache["content"] = content_gram(self.content, self.x)

        def make():
            g = self._cache["gram"] + content * self._cache["content"] if content else self._cache["gram"]
            return torch.from_numpy(np.asarray((self.rows > 0).todense(), dtype=np.float32)) @ torch.from_numpy(
                ease_matrix(g, lam))
        return self._kept(("ease", lam, content), make)

    def scores(self, s: dict) -> torch.Tensor:
        """The sample's scores under normalised weights `s` (see `Search`)."""
        out = torch.zeros(self.rows.shape)
        if s["lin_weight"]:
            lin, _ = self.lin(s["lin_weights"], s["lin_user_weights"])
            out += lin * self.tilt(s["lin_weights"], s["lin_beta"]) if s["lin_beta"] != 0.5 else lin
        if s["alpha"]:
            out += s["alpha"] * self.low(s["rank"])[0]
        if s["sharp_alpha"]:
            out += s["sharp_alpha"] * self.sharp(s["rank"])[0]
        if s["ease_weight"]:
            out += s["ease_weight"] * self.ease(s["ease_lambda"], s["ease_content"])[0]
        return out

    def settings(self, s: dict) -> dict:
        """ModelConfig fields of normalised weights `s`: each term's weight divided by its scale, the
        filter's set to 1 (or 0) so that the ranking is the one measured."""
        lin_top = self.lin(s["lin_weights"], s["lin_user_weights"])[1] if s["lin_weight"] else 1.0
        out = {k: s[k] for k in SEARCHED}
        out["lin_weight"] = 1.0 if s["lin_weight"] else 0.0
        out["alpha"] = s["alpha"] * lin_top / self.low(s["rank"])[1] if s["alpha"] else 0.0
        out["sharp_alpha"] = s["sharp_alpha"] * lin_top / self.sharp(s["rank"])[1] if s["sharp_alpha"] else 0.0
        out["ease_weight"] = (s["ease_weight"] * lin_top / self.ease(s["ease_lambda"], s["ease_content"])[1]
                              if s["ease_weight"] else 0.0)
        return out


def _space(trial, cfg, terms, fixed) -> dict:
    """One trial's normalised settings (fixed ones as given)."""
    def pick(name, suggest):
        return fixed[name] if name in fixed else suggest()

    ranks = [r for r in RANKS if r <= cfg.dim] or [cfg.dim]
    weights = ["raw"] if terms.binary else list(LIN_WEIGHTS)
    s = {"rank": pick("rank", lambda: trial.suggest_categorical("rank", ranks)),
         "lin_weight": pick("lin_weight", lambda: trial.suggest_categorical("lin_weight", [1.0, 0.0]))}
    if s["lin_weight"]:
        s["lin_weights"] = pick("lin_weights", lambda: trial.suggest_categorical("lin_weights", weights))
        s["lin_user_weights"] = pick("lin_user_weights", lambda: trial.suggest_categorical("lin_user_weights", weights))
        s["lin_beta"] = pick("lin_beta", lambda: trial.suggest_categorical("lin_beta", BETAS))
    else:  # not read: kept as fixed, else at the defaults
        s.update(lin_weights=fixed.get("lin_weights", "raw"), lin_user_weights=fixed.get("lin_user_weights", "raw"),
                 lin_beta=fixed.get("lin_beta", 0.5))
    # The low-pass block is never off: it is the stored vectors (the index, the Cypher recipes, audiences).
    s["alpha"] = pick("alpha", lambda: trial.suggest_float("alpha", 1e-3, 2.0, log=True))
    s["sharp_alpha"] = pick("sharp_alpha", lambda: trial.suggest_float("sharp_alpha", 0.0, 1.0)) if cfg.sharp_dim else 0.0
    if terms.ease_ok:
        s["ease_weight"] = pick("ease_weight", lambda: trial.suggest_float("ease_weight", 0.0, 3.0))
        s["ease_lambda"] = pick("ease_lambda", lambda: trial.suggest_categorical("ease_lambda", LAMBDAS))
    else:
        s.update(ease_weight=0.0, ease_lambda=0.0)
    s["ease_content"] = fixed.get("ease_content", 0.0)  # chosen after the trials (`_with_content`)
    return s


def _starts(cfg, terms) -> list[dict]:
    """Known-good points tried first: GF-CF at the largest basis, the filter alone, EASE alone (each with
    a trace of the low-pass block)."""
    top = max([r for r in RANKS if r <= cfg.dim] or [cfg.dim])
    gfcf = {"rank": top, "lin_weight": 1.0, "lin_weights": "raw", "lin_user_weights": "raw", "lin_beta": 0.5,
            "alpha": 0.3, "sharp_alpha": 0.0, "ease_weight": 0.0, "ease_lambda": 300.0}
    out = [gfcf, {**gfcf, "alpha": 1e-3}]
    if terms.ease_ok:
        out.append({**gfcf, "lin_weight": 0.0, "alpha": 1e-3, "ease_weight": 1.0})
    return out


def search(fit_csr, targets: dict, cfg, fixed: dict | None = None, budget_s: float | None = None,
           progress: bool = True, log=None, basis=None, content=None):
    """Settings of `cfg`'s score chosen on the validation split (`fit_csr`, `targets`: user row -> held-out
    items), by cfg.search_trials seeded TPE trials (fewer if `budget_s` seconds run out, at least one).

    `fixed` maps setting names (SEARCHED) to values not to search. Returns (the best ModelConfig,
    a report with the chosen settings, each trial's validation figures and the seconds taken);
    `log(row)` is called for each trial (e.g. TensorBoard); `content` (the items' feature rows, or None)
    lets EASE read the items' content. Raises SearchError without validation users.
    """
    t0 = time.time()
    fixed = {k: v for k, v in (fixed or {}).items() if k in SEARCHED and v is not None}
    users = np.array(sorted(u for u, t in targets.items() if t), dtype=np.int64)
    if not len(users):
        raise SearchError("the validation split has no users with held-out interactions: nothing to choose on")
    if len(users) > cfg.search_users:
        users = np.sort(np.random.default_rng(cfg.seed).choice(users, size=cfg.search_users, replace=False))
    terms = Terms(fit_csr, users, cfg, basis, content)
    truth = {int(u): targets[int(u)] for u in users}
    rows = {int(u): k for k, u in enumerate(users)}
    k = cfg.k

    def measure(s):
        scores = terms.scores(s)
        m = evaluate(lambda us: scores[[rows[int(u)] for u in us]], truth, terms.x, k)
        return m[f"recall@{k}"], m[f"ndcg@{k}"]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=10)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for start in _starts(cfg, terms):
        study.enqueue_trial({n: v for n, v in start.items() if n not in fixed}, skip_if_exists=True)
    history = []
    bar = tqdm(total=cfg.search_trials, desc="settings search", disable=not progress, leave=False)

    def objective(trial):
        s = _space(trial, cfg, terms, fixed)
        recall, ndcg = measure(s)
        trial.set_user_attr("settings", s)
        row = {"trial": trial.number, f"recall@{k}": recall, f"ndcg@{k}": ndcg, "seconds": time.time() - t0}
        history.append(row)
        if log:
            log(row)
        bar.update(1)
        return recall + ndcg  # both goals at once; each is a mean over the same users

    left = None if budget_s is None else max(budget_s - (time.time() - t0), 0.0)
    if left is not None and left <= 0:
        raise SearchError(f"the training budget ({budget_s:.0f} s) ran out before the first trial")
    study.optimize(objective, n_trials=max(1, cfg.search_trials), timeout=left)
    bar.close()
    best = study.best_trial
    s, best_row = best.user_attrs["settings"], next(r for r in history if r["trial"] == best.number)
    tried = []
    if terms.content is not None and s["ease_weight"] and "ease_content" not in fixed:
        s, best_row, tried = _with_content(s, best_row, measure, k)
    chosen = terms.settings(s)
    model_cfg = replace(cfg, **chosen)
    return model_cfg, {"chosen": chosen, "validation": {**best_row, "users": int(len(users))},
                       "trials": history, "content_weights": tried, "seconds": time.time() - t0,
                       "fixed": sorted(fixed)}


def _with_content(s, row, measure, k):
    """(settings, their validation row, the rows tried): the settings `s` (validation `row`) with the
    items' content in EASE's Gram at each of CONTENT_WEIGHTS, the best by the trials' goal kept only if
    it beats `s` itself (ties: the smaller weight, then none)."""
    recall, ndcg = f"recall@{k}", f"ndcg@{k}"
    tried = []
    for weight in CONTENT_WEIGHTS:
        r, n = measure({**s, "ease_content": weight})
        tried.append({"ease_content": weight, recall: r, ndcg: n})
    top = max(tried, key=lambda t: t[recall] + t[ndcg])
    if top[recall] + top[ndcg] > row[recall] + row[ndcg]:
        return {**s, "ease_content": top["ease_content"]}, {**row, **top}, tried
    return s, row, tried
