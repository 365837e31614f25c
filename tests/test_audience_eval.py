"""`evaluate audience` scores the served audience through the API's code, and with every user a
candidate it ranks as the offline full score does."""
from __future__ import annotations

import numpy as np
import pandas as pd

from app.evaluation.audience import served
from graph_models import ModelConfig, audienceeval


def _history() -> pd.DataFrame:
    """Two taste groups of 40 users over 30 items, 120 days; each user buys mostly within their group."""
    rng = np.random.default_rng(5)
    rows = []
    for u in range(80):
        group = u % 2
        for _ in range(14):
            item = int(rng.integers(0, 15)) + 15 * (group if rng.random() < 0.85 else 1 - group)
            rows.append((f"u{u}", f"i{item}", pd.Timestamp("2011-01-01") + pd.Timedelta(days=float(rng.uniform(0, 120)))))
    return pd.DataFrame(rows, columns=["user", "item", "ts"]).assign(value=1.0).sort_values("ts", ignore_index=True)


def test_served_audience_is_measured_and_matches_the_full_score_with_every_user_a_candidate():
    events, cut = _history(), pd.Timestamp("2011-03-15")
    cfg = ModelConfig(dim=8, sharp_dim=4, search_trials=2, sample_users=100, search_users=100)
    scorers, _, model = audienceeval.scorers(events, cut, cfg, budget_s=30)
    picked = {"ours_served": served(model, 1000), "ours_small": served(model, 10), "ours_full": scorers["ours_full"],
              "most_active": scorers["most_active"]}
    report = audienceeval.run(events, cut, picked, horizon_days=40, k=10)
    assert report["test"]["items"] > 0
    for part in ("all", "new"):  # the item's bias is the same for all its users: the same order
        assert report["ours_served"][part] == report["ours_full"][part], (model.biased, report)
    small = report["ours_small"]["all"]
    assert 0 <= small["recall@10"] <= 1 and 0 <= small["auc"] <= 1
