"""Churn evaluation at a cut: ours against recency, frequency, today's formula and BG/NBD, in one run."""
from __future__ import annotations

import time

import pandas as pd

from . import churn

# score: higher = more at risk
BASELINES = {
    "recency": lambda x: x["recency_days"],
    "frequency": lambda x: -x["active_days"],
    "overdue": lambda x: x["overdue"],  # days silent over the mean gap: the formula served before this model
    "bgnbd_p_alive": lambda x: 1 - x["bgnbd_p_alive"],
    "bgnbd_p_silent": lambda x: 1 - x["bgnbd_p_return"],
}


def run(events: pd.DataFrame, cut: pd.Timestamp, horizon_days: int = 90, min_days: int = 2,
        top: float = 0.1) -> dict:
    """Train on cuts whose labels end by `cut` (settings chosen on the latest of them), test at `cut`."""
    t0 = time.time()
    days = churn.daily(events)
    if cut + horizon_days * churn.DAY > days["day"].max() + churn.DAY:
        raise ValueError(f"the data end before cut + {horizon_days} days: the test labels are not all observed")
    model = churn.train(days, events, cut, horizon_days, min_days)
    x, y = churn.frame(days, events, cut, horizon_days, min_days)
    if not len(x) or y.nunique() < 2:
        raise ValueError("the test cut has no users with enough history, or only one label")
    report = {"ours": _metrics(y, model.score(x), top)}
    for name, score in BASELINES.items():
        report[name] = _metrics(y, score(x).to_numpy(), top)
    best = max((k for k in BASELINES), key=lambda k: report[k]["auc"])
    report["margin"] = {"best_baseline": best, "auc_over_best": round(report["ours"]["auc"] - report[best]["auc"], 4)}
    report["test"] = {"cut": str(cut.date()), "horizon_days": horizon_days, "min_days": min_days,
                      "users": len(x), "churned": int(y.sum()), "top_fraction": top}
    report["chosen"] = model.params
    report["validation"] = {k: v for k, v in model.meta["validation"].items() if k != "trials"}
    report["validation"]["best_auc"] = max(t["auc"] for t in model.meta["validation"]["trials"])
    report["train"] = {"cuts": model.meta["train_cuts"], "rows": model.meta["train_rows"]}
    report["seconds"] = round(time.time() - t0, 1)
    return report


def _metrics(y, score, top) -> dict:
    """ROC AUC and precision at the top fraction, rounded as the tables show them."""
    return {"auc": round(churn.auc(y, score), 4),
            f"precision@{int(top * 100)}%": round(churn.precision_at(y, score, top), 4)}
