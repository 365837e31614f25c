"""The churn model without Neo4j: labels and features on a hand-made history, BG/NBD, the promotion check."""
import json

import numpy as np
import pandas as pd
import pytest

from graph_models import churn
from graph_models.bgnbd import BgNbd, simulate

CUT = pd.Timestamp("2024-03-01")


def history(rows):
    """(user, "YYYY-MM-DD", item, spend) rows as an event history."""
    return pd.DataFrame({"user": [r[0] for r in rows], "ts": pd.to_datetime([r[1] for r in rows], format="ISO8601"),
                         "item": [r[2] for r in rows], "value": [float(r[3]) for r in rows]})


HAND = history([
    ("a", "2024-01-01", "x", 1), ("a", "2024-01-11", "y", 2), ("a", "2024-01-31", "x", 3),  # back after the cut
    ("a", "2024-03-05", "x", 1),
    ("b", "2024-02-01", "x", 1), ("b", "2024-02-01 18:00", "z", 1), ("b", "2024-02-21", "x", 1),  # never back
    ("c", "2024-02-28", "y", 1),  # one day only: not scored
    ("d", "2024-01-01", "x", 1), ("d", "2024-02-01", "x", 1), ("d", "2024-04-01", "y", 1),  # back after the horizon
])


def test_labels_and_features_on_a_hand_made_history():
    days = churn.daily(HAND)
    x, y = churn.frame(days, HAND, CUT, horizon_days=30)
    assert list(x.index) == ["a", "b", "d"]  # c has one active day
    assert y.to_dict() == {"a": 0, "b": 1, "d": 1}  # d's return on 04-01 is past [03-01, 03-31)
    a, b = x.loc["a"], x.loc["b"]
    assert a["recency_days"] == 30 and a["tenure_days"] == 60 and a["active_days"] == 3
    assert a["mean_gap"] == 15 and a["last_gap"] == 20 and a["max_gap"] == 20
    assert a["overdue"] == 2 and a["spend"] == 6 and a["items"] == 2 and a["lines"] == 3
    assert b["active_days"] == 2 and b["lines"] == 3 and b["items"] == 2  # two lines on one day: one day
    assert b["recency_days"] == 9 and b["days_30"] == 2
    assert churn.labels(days, ["a", "b", "d"], CUT, 40).to_dict() == {"a": 0, "b": 1, "d": 0}


def test_recent_item_buyers_on_a_hand_made_history():
    """Every event is within 90 days of the cut: x has buyers a, b, d; y a, c (c, not scored, counts); z b."""
    x, _ = churn.frame(churn.daily(HAND), HAND, CUT, horizon_days=30)
    assert x.loc["a", "recent_item_buyers"] == pytest.approx((np.log(4) + np.log(3)) / 2)
    assert x.loc["b", "recent_item_buyers"] == pytest.approx((np.log(4) + np.log(2)) / 2)
    assert x.loc["d", "recent_item_buyers"] == pytest.approx(np.log(4))  # d's y comes after the cut
    late = churn.frame(churn.daily(HAND), HAND, pd.Timestamp("2024-06-01"), horizon_days=30)[0]
    assert np.isnan(late.loc["b", "recent_item_buyers"])  # b bought nothing in the 90 days before that cut


def test_the_blend_and_a_model_saved_before_the_new_feature():
    """With weight w the log-odds are (1 - w) x the booster's + w x BG/NBD's; with the regression too, the
    reasons add up to the log-odds; the model survives JSON; a model trained on HISTORY alone still scores."""
    import lightgbm as lgb
    events = population(120, 150, seed=1)
    days = churn.daily(events)
    x, y = churn.frame(days, events, pd.Timestamp("2024-04-01"), 30)
    params = dict(num_leaves=2, learning_rate=0.1, n_estimators=50, min_child_samples=10)
    model = churn.fit(x, y, {**params, "bgnbd_weight": 0.5})
    raw = model.booster.predict(x[churn.FEATURES].to_numpy(dtype=float), raw_score=True)
    silent = (1 - x["bgnbd_p_return"]).clip(1e-6, 1 - 1e-6).to_numpy()
    assert model.score(x) == pytest.approx(1 / (1 + np.exp(-(0.5 * raw + 0.5 * np.log(silent / (1 - silent))))))
    why = model.reasons(x, top=len(churn.FEATURES) + 1)
    assert all("bgnbd_p_silent" in r for r in why)
    assert churn.fit(x, y, params).reasons(x.head(5))[0].keys() <= set(churn.FEATURES)  # w = 0: no BG/NBD part
    both = churn.fit(x, y, {**params, "bgnbd_weight": 0.25, "linear_weight": 0.5})
    odds = np.log(both.score(x) / (1 - both.score(x)))
    parts = np.array([sum(c["contribution"] for c in r.values()) for r in both.reasons(x, top=len(churn.FEATURES) + 1)])
    assert np.ptp(odds - parts) < 1e-3  # the reasons are the whole log-odds, up to one constant and rounding
    assert churn.ChurnModel.from_dict(json.loads(json.dumps(both.to_dict()))).score(x) == pytest.approx(both.score(x))
    old = lgb.LGBMClassifier(**churn.BASE, **params).fit(x[churn.HISTORY].to_numpy(dtype=float), y.to_numpy())
    saved = churn.ChurnModel.from_dict({"booster": old.booster_.model_to_string(), "params": params})
    assert saved.score(x) == pytest.approx(old.predict_proba(x[churn.HISTORY].to_numpy(dtype=float))[:, 1])


def test_training_cuts_keep_history_and_stop_at_the_last():
    cuts = churn.training_cuts(pd.Timestamp("2024-01-01"), pd.Timestamp("2024-04-01"), 14, 60)
    assert cuts[-1] == pd.Timestamp("2024-04-01") and all(c - pd.Timestamp("2024-01-01") >= 60 * churn.DAY
                                                           for c in cuts)


def test_bgnbd_recovers_simulated_parameters():
    true = (0.5, 4.0, 0.8, 2.5)
    model = BgNbd().fit(*simulate(true, 3000, 52, seed=3))
    r, alpha, a, b = model.params
    assert r == pytest.approx(0.5, rel=0.2) and alpha == pytest.approx(4.0, rel=0.3)
    assert a / (a + b) == pytest.approx(0.8 / 3.3, rel=0.3)  # the mean dropout probability
    # no repeat: alive for sure; a long silence after many repeats: less so; P(silent) >= P(dead)
    assert model.p_alive([0], [0], [52])[0] == 1.0
    assert model.p_alive([10], [10], [52])[0] < model.p_alive([10], [50], [52])[0]
    assert model.p_silent([10], [10], [52], 13)[0] >= 1 - model.p_alive([10], [10], [52])[0]


def population(n=250, end=200, seed=0):
    """Users buying at their own pace until their own (random) last day, some forever."""
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2024-01-01")
    rows = []
    for u in range(n):
        gap, day = rng.uniform(2, 12), rng.uniform(0, 40)
        stop = rng.uniform(30, end * 1.5) if rng.random() < 0.7 else end * 2
        while day < min(stop, end):
            rows.append((f"u{u}", start + pd.Timedelta(days=float(day)), f"i{rng.integers(30)}", 1.0))
            day += rng.exponential(gap)
    return pd.DataFrame(rows, columns=["user", "ts", "item", "value"])


def test_the_model_learns_and_the_check_refuses_a_worse_one():
    events = population()
    days = churn.daily(events)
    cut = days["day"].max() + churn.DAY
    grid = [dict(num_leaves=4, learning_rate=0.05, n_estimators=100, min_child_samples=20)]
    good = churn.train(days, events, cut, 14, grid=grid, min_history_days=14)
    val_cut = cut - 14 * churn.DAY
    xv, yv = churn.frame(days, events, val_cut, 14)
    assert good.meta["validation"]["best_auc"] > 0.75  # recency and rhythm predict who stops
    parts = [churn.frame(days, events, c, 14) for c in churn.training_cuts(days["day"].min(), val_cut, 14, 14)[:-1]]
    x, y = pd.concat([p[0] for p in parts]), pd.concat([p[1] for p in parts])
    noise = churn.fit(x, y.sample(frac=1.0, random_state=0).set_axis(y.index), grid[0])  # labels shuffled
    worse = churn.auc(yv, noise.score(xv))
    refused = churn.check(worse, good, xv, yv, tolerance=0.005)
    assert not refused["promote"] and refused["current_auc"] > refused["candidate_auc"] + 0.1
    assert churn.check(good.meta["validation"]["best_auc"], noise, xv, yv)["promote"]
    assert churn.check(0.5, None, xv, yv)["promote"]  # the first model is always taken
    why = good.reasons(xv.head(3))
    assert len(why) == 3 and all(len(r) == 3 and set(r) <= {*churn.FEATURES, "bgnbd_p_silent"} for r in why)


def test_metrics():
    assert churn.auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert churn.precision_at([1, 0, 0, 0, 1, 0, 0, 0, 0, 0], np.arange(10)[::-1], 0.2) == 0.5


def test_evaluate_churn_on_any_csv(tmp_path):
    """`evaluate churn --format csv`: every score of the table, on a log it has never seen."""
    from click.testing import CliRunner

    from app.cli import main
    events = population(80, 200, seed=4)
    path = tmp_path / "log.csv"
    events.assign(ts=events["ts"].dt.strftime("%Y-%m-%dT%H:%M:%S")).to_csv(path, index=False)
    out = tmp_path / "churn.json"
    result = CliRunner().invoke(main, ["evaluate", "churn", "--events", str(path), "--format", "csv", "--user-col",
                                       "user", "--item-col", "item", "--ts-col", "ts", "--horizon", "30",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["test"]["cut"] == "2024-06-18" and report["test"]["users"] > 50  # the last day with 30 after it
    assert {"ours", "recency", "frequency", "overdue", "bgnbd_p_alive", "bgnbd_p_silent"} <= set(report)
    assert report["ours"]["auc"] > 0.8


def test_the_design_study_scores_every_variant_at_validation_cuts(tmp_path):
    """`evaluate churn-study`: each variant's AUC and margin over the best baseline, per group of cuts."""
    from click.testing import CliRunner

    from app.cli import main
    from graph_models.churnstudy import VARIANTS
    events = population(120, 200, seed=5)
    path = tmp_path / "log.csv"
    events.assign(ts=events["ts"].dt.strftime("%Y-%m-%dT%H:%M:%S")).to_csv(path, index=False)
    out = tmp_path / "study.json"
    result = CliRunner().invoke(main, ["evaluate", "churn-study", "--events", str(path), "--format", "csv",
                                       "--user-col", "user", "--item-col", "item", "--ts-col", "ts", "--horizon",
                                       "30", "--early", "2024-05-01:2024-05-07:3", "--late", "2024-05-20",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report) == {"early", "late"} and set(report["late"]) == set(VARIANTS)
    assert report["early"]["history (the model before)"]["cuts"] == 3
    assert all(0.5 < v["auc"] <= 1 and v["least_margin"] <= v["margin"] for g in report.values() for v in g.values())
