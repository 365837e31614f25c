"""Churn: features of each user's history at a cut, labels from the window after it, a blended model."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .bgnbd import BgNbd, summary

DAY = pd.Timedelta(days=1)
# Hyper-parameters tried on the validation cut (LightGBM names); small on purpose: a few thousand rows.
GRID = [dict(num_leaves=leaves, learning_rate=rate, n_estimators=trees, min_child_samples=leaf)
        for leaves in (2, 4, 8, 16) for rate, trees in ((0.05, 200), (0.02, 400)) for leaf in (20, 80)]
BASE = dict(subsample=0.8, subsample_freq=1, colsample_bytree=0.8, reg_lambda=1.0, verbose=-1, n_jobs=1)
HISTORY = ["recency_days", "tenure_days", "active_days", "days_30", "days_90", "days_180", "rate",
            "mean_gap", "std_gap", "max_gap", "last_gap", "overdue", "gap_trend", "lines", "lines_per_day",
            "spend", "spend_per_day", "spend_90", "items", "item_share", "bgnbd_p_alive", "bgnbd_p_return"]
# How popular the items the user bought lately are (their buyers in the last 90 days, all users): the
# one feature beyond the history's counts that validation kept (docs/evaluation.md, "Churn"). HISTORY
# alone is what models trained before it read.
FEATURES = HISTORY + ["recent_item_buyers"]
# Weights of BG/NBD's P(no purchase within the horizon) and of a logistic regression in the score's
# log-odds, chosen on validation; the regression's inverse L2 strength was chosen on validation cuts.
BLEND = (0.0, 0.25, 0.5)
LINEAR = (0.0, 0.25, 0.5, 0.75, 1.0)
LINEAR_C = 0.1
# Inputs the regression reads as they are (in [0, 1]); the others as log(1 + v).
UNIT = {"rate", "item_share", "bgnbd_p_alive", "bgnbd_p_return"}


def daily(events: pd.DataFrame) -> pd.DataFrame:
    """One row per (user, day) with the day's lines, spend and distinct items: what every feature reads.

    `events` has columns user, ts (datetime64), value (spend of the line; 1.0 when unknown) and item.
    """
    day = events["ts"].dt.floor("D")
    out = (events.assign(day=day).groupby(["user", "day"], sort=True)
           .agg(lines=("item", "size"), spend=("value", "sum")).reset_index())
    return out


def labels(days: pd.DataFrame, users, cut: pd.Timestamp, horizon_days: int) -> pd.Series:
    """1 for each of `users` with no active day in [cut, cut + horizon), else 0 (churned = 1)."""
    window = days[(days["day"] >= cut) & (days["day"] < cut + horizon_days * DAY)]
    return pd.Series((~pd.Index(users).isin(window["user"].unique())).astype(np.int8), index=pd.Index(users),
                     name="churned")


def features(days: pd.DataFrame, events: pd.DataFrame, cut: pd.Timestamp, min_days: int = 2) -> pd.DataFrame:
    """Features per user with at least `min_days` active days before `cut`, from that history only."""
    past = days[days["day"] < cut]
    n = past.groupby("user")["day"].transform("size")
    past = past[n >= min_days]
    if past.empty:
        return pd.DataFrame(columns=FEATURES, dtype=float)
    g = past.groupby("user")
    age = (cut - past["day"]).dt.days.to_numpy()
    gaps = past.assign(gap=g["day"].diff().dt.days)
    gg = gaps.groupby("user")["gap"]
    f = pd.DataFrame({
        "recency_days": (cut - g["day"].max()).dt.days,
        "tenure_days": (cut - g["day"].min()).dt.days,
        "active_days": g.size(),
        "days_30": pd.Series(age < 30, index=past.index).groupby(past["user"]).sum(),
        "days_90": pd.Series(age < 90, index=past.index).groupby(past["user"]).sum(),
        "days_180": pd.Series(age < 180, index=past.index).groupby(past["user"]).sum(),
        "mean_gap": gg.mean(), "std_gap": gg.std().fillna(0.0), "max_gap": gg.max(), "last_gap": gg.last(),
        "lines": g["lines"].sum(), "spend": g["spend"].sum(),
        "spend_90": pd.Series(np.where(age < 90, past["spend"], 0.0), index=past.index).groupby(past["user"]).sum(),
    }).astype(float)
    f["rate"] = f["active_days"] / (f["tenure_days"] + 1)
    f["overdue"] = f["recency_days"] / f["mean_gap"].clip(lower=1)  # today's formula, as a feature
    f["gap_trend"] = f["last_gap"] / f["mean_gap"].clip(lower=1)
    f["lines_per_day"] = f["lines"] / f["active_days"]
    f["spend_per_day"] = f["spend"] / f["active_days"]
    everyone = events[events["ts"] < cut]
    before = everyone[everyone["user"].isin(f.index)]
    f["items"] = before.groupby("user")["item"].nunique().reindex(f.index).astype(float)
    f["item_share"] = f["items"] / f["lines"]  # diversity: 1 when every line is a new item
    f["recent_item_buyers"] = recent_item_buyers(everyone, cut).reindex(f.index)
    bg = bgnbd_scores(days, cut)
    f["bgnbd_p_alive"] = bg["p_alive"].reindex(f.index)
    f["bgnbd_p_return"] = 1 - bg["p_silent"].reindex(f.index)
    return f[FEATURES]


def recent_item_buyers(before: pd.DataFrame, cut: pd.Timestamp, window_days: int = 90) -> pd.Series:
    """Per user with events in the last `window_days` before `cut`, the mean over the distinct items of
    those events of log(1 + the item's distinct buyers, all users, in that window): low when what the
    user buys now few others buy.

    Only (user, item, time) is read, so the graph's view (each edge's first and last time) works as well.
    """
    recent = before[before["ts"] >= cut - window_days * DAY]
    buyers = np.log1p(recent.groupby("item")["user"].nunique())
    pairs = recent[["user", "item"]].drop_duplicates()
    return pd.Series(buyers.reindex(pairs["item"]).fillna(0.0).to_numpy(), index=pairs["user"].to_numpy()) \
        .groupby(level=0).mean()


def bgnbd_scores(days: pd.DataFrame, cut: pd.Timestamp, horizon_days: int = 90) -> pd.DataFrame:
    """BG/NBD fitted on every user active before `cut` (weeks): P(alive) and P(no purchase within horizon)."""
    s = summary(days[days["day"] < cut], cut)
    model = BgNbd().fit(s["x"].to_numpy(), s["t_x"].to_numpy(), s["T"].to_numpy())
    x, t_x, T = s["x"].to_numpy(), s["t_x"].to_numpy(), s["T"].to_numpy()
    return pd.DataFrame({"p_alive": model.p_alive(x, t_x, T),
                         "p_silent": model.p_silent(x, t_x, T, horizon_days / 7.0)}, index=s.index)


def frame(days, events, cut, horizon_days: int, min_days: int = 2):
    """(features, labels) at one cut; labels need the horizon after the cut to be in `days`."""
    x = features(days, events, cut, min_days)
    return x, labels(days, x.index, cut, horizon_days)


def training_cuts(start: pd.Timestamp, last_cut: pd.Timestamp, step_days: int = 14,
                  min_history_days: int = 60) -> list[pd.Timestamp]:
    """Cuts every `step_days` back from `last_cut`, each with at least `min_history_days` of history."""
    cuts, cut = [], last_cut
    while cut - start >= min_history_days * DAY:
        cuts.append(cut)
        cut -= step_days * DAY
    return cuts[::-1]


@dataclass
class ChurnModel:
    """A fitted booster, a logistic regression and the settings they were chosen with; `score` is
    P(churn), `reasons` its contributions.

    The score's log-odds: (1 - a) x [(1 - w) x the booster's + w x BG/NBD's P(no purchase within the
    horizon)'s] + a x the regression's, with w = `params["bgnbd_weight"]` and a = `params["linear_weight"]`:
    a sum of per-feature parts, so the reasons stay exact.
    """

    booster: object
    params: dict
    meta: dict = field(default_factory=dict)
    linear: dict | None = None  # the regression: its inputs' means and scales, coefficients, intercept

    @property
    def features(self) -> list[str]:
        """The columns the booster reads (models saved before `recent_item_buyers` read HISTORY)."""
        return self.meta.get("features", HISTORY)

    def _parts(self, x: pd.DataFrame, contrib: bool):
        """(log-odds, or per-feature contributions with BG/NBD's last: each centred on the training rows)."""
        w, a = self.params.get("bgnbd_weight", 0.0), self.params.get("linear_weight", 0.0) if self.linear else 0.0
        booster = self.booster.predict(x[self.features].to_numpy(dtype=float), raw_score=not contrib,
                                       pred_contrib=contrib)
        bgnbd = _bgnbd_logit(x)
        if not contrib:
            out = (1 - a) * ((1 - w) * booster + w * bgnbd)
            return out + a * (self._linear(x).sum(axis=1) + self.linear["intercept"]) if a else out
        parts = np.column_stack([(1 - a) * (1 - w) * booster[:, :-1],
                                 (1 - a) * w * (bgnbd - self.meta.get("bgnbd_logit_mean", 0.0))])
        if a:
            names = [*self.features, "bgnbd_p_silent"]
            for name, column in zip(linear_names(self.features), self._linear(x).T):
                parts[:, names.index(name)] += a * column
        return parts

    def _linear(self, x: pd.DataFrame) -> np.ndarray:
        """The regression's contribution of each of its inputs (coefficient x standardised value)."""
        lin = self.linear
        return (linear_inputs(x, self.features) - lin["mean"]) / lin["scale"] * np.asarray(lin["coef"])

    def score(self, x: pd.DataFrame) -> np.ndarray:
        """P(churned) per row of `x` (columns FEATURES)."""
        return 1 / (1 + np.exp(-self._parts(x, contrib=False)))

    def reasons(self, x: pd.DataFrame, top: int = 3) -> list[dict]:
        """Per row, the `top` features pushing the score up most (log-odds) with their values; BG/NBD's
        part, when blended, as `bgnbd_p_silent`."""
        contrib = self._parts(x, contrib=True)
        names, values = [*self.features, "bgnbd_p_silent"], np.column_stack(
            [x[self.features].to_numpy(dtype=float), 1 - x["bgnbd_p_return"].to_numpy(dtype=float)])
        if not (self.params.get("bgnbd_weight", 0.0) or (self.linear and self.params.get("linear_weight", 0.0))):
            names, contrib, values = names[:-1], contrib[:, :-1], values[:, :-1]
        out = []
        for row, c in zip(values, contrib):
            order = np.argsort(-c)[:top]
            out.append({names[j]: {"value": None if np.isnan(row[j]) else round(float(row[j]), 4),
                                   "contribution": round(float(c[j]), 4)} for j in order})
        return out

    def to_dict(self) -> dict:
        """A JSON-ready copy: the booster as LightGBM's text model."""
        return {"booster": self.booster.model_to_string(), "params": self.params, "meta": self.meta,
                "linear": self.linear}

    @classmethod
    def from_dict(cls, d: dict) -> "ChurnModel":
        """The inverse of `to_dict`."""
        import lightgbm as lgb
        return cls(lgb.Booster(model_str=d["booster"]), d["params"], d.get("meta", {}), d.get("linear"))


def linear_inputs(x: pd.DataFrame, features: list[str]) -> np.ndarray:
    """The regression's inputs: log(1 + v) of the counts and durations, shares and probabilities as they
    are, BG/NBD's log-odds, and whether `recent_item_buyers` is missing; missing values as 0."""
    cols = [x[f].to_numpy(dtype=float) if f in UNIT else np.log1p(np.maximum(x[f].to_numpy(dtype=float), 0))
            for f in features]
    cols.append(_bgnbd_logit(x))
    if "recent_item_buyers" in features:
        cols.append(x["recent_item_buyers"].isna().to_numpy(dtype=float))
    return np.nan_to_num(np.column_stack(cols), nan=0.0)


def linear_names(features: list[str]) -> list[str]:
    """The feature each input of `linear_inputs` is reported as."""
    return [*features, "bgnbd_p_silent", *(["recent_item_buyers"] if "recent_item_buyers" in features else [])]


def fit_linear(x: pd.DataFrame, y: pd.Series, c: float = LINEAR_C, features: list[str] = FEATURES) -> dict:
    """An L2-regularised logistic regression of churned on standardised `linear_inputs`."""
    from sklearn.linear_model import LogisticRegression
    z = linear_inputs(x, features)
    mean, scale = z.mean(axis=0), z.std(axis=0)
    scale[scale == 0] = 1.0
    lr = LogisticRegression(C=c, max_iter=2000).fit((z - mean) / scale, y.to_numpy())
    return {"mean": mean.tolist(), "scale": scale.tolist(), "coef": lr.coef_[0].tolist(),
            "intercept": float(lr.intercept_[0]), "c": c}


def fit(x: pd.DataFrame, y: pd.Series, params: dict, seed: int = 0, linear: dict | None = None,
        features: list[str] = FEATURES) -> ChurnModel:
    """A LightGBM classifier of churned on the stacked rows' `features`, and the regression (`linear`, else
    fitted); `bgnbd_weight` and `linear_weight` in `params`: the blend."""
    import lightgbm as lgb
    booster = {k: v for k, v in params.items() if k not in ("bgnbd_weight", "linear_weight")}
    clf = lgb.LGBMClassifier(**BASE, **booster, random_state=seed)
    clf.fit(x[features].to_numpy(dtype=float), y.to_numpy())
    return ChurnModel(clf.booster_, dict(params), {"features": list(features),
                                                   "bgnbd_logit_mean": float(_bgnbd_logit(x).mean())},
                      linear if linear is not None else fit_linear(x, y, features=features))


def _bgnbd_logit(x: pd.DataFrame) -> np.ndarray:
    """The log-odds of BG/NBD's P(no purchase within the horizon), kept finite."""
    silent = np.clip(1 - x["bgnbd_p_return"].to_numpy(dtype=float), 1e-6, 1 - 1e-6)
    return np.log(silent / (1 - silent))


def auc(y, score) -> float:
    """ROC AUC in [0, 1] (0.5: chance); nan when only one class is present."""
    from sklearn.metrics import roc_auc_score
    y = np.asarray(y)
    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else float("nan")


def precision_at(y, score, fraction: float = 0.1) -> float:
    """Share of churned among the `fraction` of users ranked most at risk (ties by input order)."""
    y = np.asarray(y)
    n = max(1, int(round(len(y) * fraction)))
    return float(y[np.argsort(-np.asarray(score), kind="stable")[:n]].mean())


def choose(frames: dict, val_cut, horizon_days, grid=GRID, blend=BLEND, linear_weights=LINEAR):
    """The grid's settings and blend weights (`blend` for BG/NBD, `linear_weights` for the regression)
    with the best AUC at `val_cut`, trained on the `frames` (cut -> (x, y)) whose labels end by `val_cut`."""
    train_cuts = [c for c in frames if c + horizon_days * DAY <= val_cut and len(frames[c][0])]
    if not train_cuts:
        raise ValueError(f"no labelled cut before the validation cut {val_cut.date()}")
    x, y = pd.concat([frames[c][0] for c in train_cuts]), pd.concat([frames[c][1] for c in train_cuts])
    xv, yv = frames[val_cut]
    if yv.nunique() < 2:
        raise ValueError(f"the validation cut {val_cut.date()} has one label only")
    trials, linear = [], fit_linear(x, y)
    for p in grid:  # one booster a setting; the blend's weights only re-weigh the log-odds
        model = fit(x, y, p, linear=linear)
        for w in blend:
            for a in linear_weights:
                model.params |= {"bgnbd_weight": w, "linear_weight": a}
                trials.append({"params": dict(model.params), "auc": auc(yv, model.score(xv))})
    best = max(trials, key=lambda t: t["auc"])
    return best["params"], {"val_cut": str(val_cut.date()), "train_cuts": len(train_cuts), "train_rows": len(x),
                            "val_rows": len(xv), "best_auc": best["auc"], "trials": trials}


def train(days, events, cut, horizon_days, min_days=2, step_days=14, grid=GRID, min_history_days=60) -> ChurnModel:
    """Settings chosen at the latest cut whose labels end by `cut` (fitted on the cuts whose labels end
    by that one), then refitted on every cut up to it. Cuts every `step_days` back from that cut."""
    val_cut = cut - horizon_days * DAY
    cuts = training_cuts(days["day"].min(), val_cut, step_days, min_history_days)
    frames = {c: frame(days, events, c, horizon_days, min_days) for c in cuts}
    if val_cut not in frames:
        raise ValueError(f"less than {min_history_days} days of history before the validation cut {val_cut.date()}")
    params, search = choose(frames, val_cut, horizon_days, grid)
    x, y = pd.concat([frames[c][0] for c in cuts]), pd.concat([frames[c][1] for c in cuts])
    model = fit(x, y, params)
    model.meta |= {"cut": str(cut), "horizon_days": horizon_days, "min_days": min_days, "train_rows": len(x),
                  "train_cuts": [str(c.date()) for c in cuts], "validation": search}
    return model


def check(candidate_auc: float, current: ChurnModel | None, x_val: pd.DataFrame, y_val: pd.Series,
          tolerance: float = 0.005) -> dict:
    """Promote a candidate unless its validation AUC is below the current model's on the same rows
    (`x_val`, `y_val`: the latest labelled cut) by more than `tolerance`."""
    if current is None:
        return {"promote": True, "candidate_auc": round(candidate_auc, 4), "current_auc": None}
    cur = auc(y_val, current.score(x_val))
    return {"promote": bool(candidate_auc >= cur - tolerance), "candidate_auc": round(candidate_auc, 4),
            "current_auc": round(cur, 4)}
