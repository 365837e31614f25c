"""How the churn model's design was chosen: variants scored at validation cuts only, against the best baseline."""
from __future__ import annotations

import numpy as np
import pandas as pd

from . import churn
from .churneval import BASELINES

# The booster's settings the first settings search chose; each variant is fitted with them.
SETTINGS = dict(num_leaves=2, learning_rate=0.02, n_estimators=400, min_child_samples=20)
# name -> (features beyond churn.HISTORY, BG/NBD weight, regression weight)
VARIANTS = {
    "history (the model before)": ([], 0.0, 0.0),
    "history, BG/NBD blended": ([], 0.25, 0.0),
    "+ regularity of gaps, activity trend": (["gap_cv", "days_trend"], 0.25, 0.0),
    "+ item drift (recent items seen before)": (["item_overlap", "new_item_share"], 0.25, 0.0),
    "+ trend of the user's items' buyers": (["item_trend"], 0.25, 0.0),
    "+ buyers of all the user's items": (["item_buyers"], 0.25, 0.0),
    "+ buyers of the user's recent items (kept)": (["recent_item_buyers"], 0.25, 0.0),
    "+ both": (["item_buyers", "recent_item_buyers"], 0.25, 0.0),
    "kept features, regression blended": (["recent_item_buyers"], 0.25, 0.5),
    "kept features, regression alone": (["recent_item_buyers"], 0.0, 1.0),
}


def candidates(events: pd.DataFrame, x: pd.DataFrame, cut: pd.Timestamp, window_days: int = 90) -> pd.DataFrame:
    """`x` with the features tried and not kept, from the history before `cut`."""
    before = events[events["ts"] < cut]
    start = cut - window_days * churn.DAY
    late = before["ts"] >= start
    pairs = before.assign(recent=late, old=~late).groupby(["user", "item"])[["recent", "old"]].any()
    users = pairs.index.get_level_values("user")
    recent, both = pairs["recent"].groupby(users).sum(), (pairs["recent"] & pairs["old"]).groupby(users).sum()
    old = pairs["old"].groupby(users).sum()
    prior = before[(before["ts"] >= start - window_days * churn.DAY) & ~late].groupby("item")["user"].nunique()
    now = before[late].groupby("item")["user"].nunique()
    items = pairs.index.get_level_values("item")
    now_n, prior_n = now.reindex(items).fillna(0).to_numpy(), prior.reindex(items).fillna(0).to_numpy()
    buyers = pd.Series(np.log1p(now_n), index=users)
    trend = pd.Series(np.log((now_n + 1) / (prior_n + 1)), index=users)
    out = x.assign(gap_cv=x["std_gap"] / x["mean_gap"].clip(lower=1),
                   days_trend=(x["days_90"] + 1) / (x["days_180"] - x["days_90"] + 1))
    extra = pd.DataFrame({"item_overlap": (both / recent).where(recent > 0),
                          "new_item_share": (recent - both) / (recent + old - both),
                          "item_trend": trend.groupby(level=0).mean(), "item_buyers": buyers.groupby(level=0).mean()})
    return out.join(extra)


def run(events: pd.DataFrame, groups: dict, horizon_days: int = 90, step_days: int = 14,
        min_history_days: int = 60) -> dict:
    """Per group of validation cuts (name -> cuts) and variant: mean AUC, mean and least margin over the best
    baseline at each cut, each variant trained on the cuts every `step_days` whose labels end by that cut."""
    days = churn.daily(events)
    cache = {}

    def frame(c):
        if c not in cache:
            x, y = churn.frame(days, events, c, horizon_days)
            cache[c] = (candidates(events, x, c), y)
        return cache[c]
    report = {}
    for group, cuts in groups.items():
        rows = {name: [] for name in VARIANTS}
        for v in cuts:
            train = churn.training_cuts(days["day"].min(), v - horizon_days * churn.DAY, step_days, min_history_days)
            if not train:
                continue
            x, y = (pd.concat(parts) for parts in zip(*(frame(c) for c in train)))
            xv, yv = frame(v)
            best = max(churn.auc(yv, score(xv)) for score in BASELINES.values())
            for name, (extra, w, a) in VARIANTS.items():
                model = churn.fit(x, y, {**SETTINGS, "bgnbd_weight": w, "linear_weight": a},
                                  features=churn.HISTORY + extra)
                auc = churn.auc(yv, model.score(xv))
                rows[name].append((auc, auc - best))
        report[group] = {name: {"cuts": len(r), "auc": round(float(np.mean([a for a, _ in r])), 4),
                                "margin": round(float(np.mean([m for _, m in r])), 4),
                                "least_margin": round(float(min(m for _, m in r)), 4)} for name, r in rows.items() if r}
    return report
