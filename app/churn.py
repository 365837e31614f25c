"""Stored churn scores: train on the graph's own history, check against the current model, write back."""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

import pandas as pd

from app import cypher
from app.config import Config
from app.embeddings import store
from graph_models import churn

log = logging.getLogger(__name__)
BATCH = 5000  # users per write transaction
PAGE = 5000  # users per read transaction of the history


def history(session, page: int = PAGE) -> pd.DataFrame:
    """Events (user, item, ts, value) from the edges: each edge's first and last event, read `page` users
    a transaction in id order (CHURN_HISTORY_PAGE), so no read holds the whole graph.

    The graph keeps one edge per (user, item) with its first and last times, not every event, so a
    user's active days are the distinct days among those; training and scoring read the same view.
    """
    users, items, ms, after = [], [], [], ""
    while True:
        rows = session.execute_read(lambda tx: tx.run(cypher.CHURN_HISTORY_PAGE, after=after, users=page).data())
        for r in rows:
            for item, first, last in r["edges"]:
                for t in (first, last):
                    if t is not None:
                        users.append(r["user"])
                        items.append(item)
                        ms.append(t)
        if len(rows) < page:
            break
        after = rows[-1]["user"]
    if not users:
        return pd.DataFrame({"user": [], "item": [], "ts": pd.to_datetime([]), "value": []})
    e = pd.DataFrame({"user": users, "item": items, "ms": ms}).drop_duplicates()
    return pd.DataFrame({"user": e["user"].astype(str), "item": e["item"].astype(str),
                         "ts": pd.to_datetime(e["ms"].astype("int64"), unit="ms"), "value": 1.0}).reset_index(drop=True)


def current(session) -> tuple[str | None, churn.ChurnModel | None, float | None]:
    """(version, model, validation AUC) of the current churn model, or Nones."""
    rows = session.execute_read(lambda tx: tx.run(cypher.CHURN_MODEL_CURRENT).data())
    if not rows:
        return None, None, None
    return rows[0]["version"], churn.ChurnModel.from_dict(json.loads(rows[0]["model"])), rows[0]["auc"]


def run(driver, cfg: Config, owner: str | None) -> dict:
    """Train a candidate, promote it unless worse than the current model, and score every user with it,
    as refresh lease holder `owner`: every write is fenced by the lease (store.check_lease), so a worker
    that lost it writes nothing more."""
    horizon = cfg.churn_horizon_days
    with driver.session(database=cfg.neo4j_database) as s:
        events = history(s)
        version, model, _ = current(s)
    if events.empty:
        return {"skipped": "no events"}
    log.info("churn: training on %d edge events of %d users (current model %s)", len(events),
             events["user"].nunique(), version)
    days = churn.daily(events)
    cut = days["day"].max() + churn.DAY  # data time, as the events say, not the wall clock: replays work
    try:
        candidate = churn.train(days, events, cut, horizon, min_history_days=horizon)
    except ValueError as exc:  # too little history for one labelled window
        return {"skipped": str(exc)}
    # The candidate's AUC at the latest labelled cut comes from its settings search (a fit on earlier cuts
    # only); the current model may have trained on part of that window, so the check leans towards it.
    x_val, y_val = churn.frame(days, events, cut - horizon * churn.DAY, horizon)
    decision = churn.check(candidate.meta["validation"]["best_auc"], model, x_val, y_val, cfg.churn_tolerance)
    new_version = datetime.now(timezone.utc).strftime("churn-%Y%m%dT%H%M%S%f")
    with driver.session(database=cfg.neo4j_database) as s:
        s.execute_write(lambda tx: _fenced(tx, owner, cypher.CHURN_MODEL_SAVE, version=new_version,
                                           model=json.dumps(candidate.to_dict()), auc=decision["candidate_auc"],
                                           current_auc=decision["current_auc"], promote=decision["promote"]))
    if decision["promote"]:
        version, model = new_version, candidate
    else:
        log.warning("churn candidate %s refused: validation AUC %.4f against %.4f", new_version,
                    decision["candidate_auc"], decision["current_auc"])
    scored = write_scores(driver, cfg, model, version, days, events, cut, owner)
    return {"version": version, "candidate": new_version, **decision, "scored": scored, "cut": str(cut)}


def write_scores(driver, cfg: Config, model: churn.ChurnModel, version: str, days, events, cut,
                 owner: str | None) -> int:
    """Score every user with at least two active days and write score and reasons in batches, each fenced
    by `owner`'s lease."""
    x = churn.features(days, events, cut, min_days=2)
    at = datetime.now(timezone.utc).isoformat()
    rows = []
    if len(x):
        scores, reasons = model.score(x), model.reasons(x)
        rows = [{"user": u, "score": round(float(p), 6), "reasons": json.dumps(r), "days": int(d),
                 "silent_days": float(sd), "gap_days": round(float(g), 1)}
                for u, p, r, d, sd, g in zip(x.index, scores, reasons, x["active_days"], x["recency_days"],
                                             x["mean_gap"])]
    with driver.session(database=cfg.neo4j_database) as s:
        for start in range(0, len(rows), BATCH):
            batch = rows[start:start + BATCH]
            s.execute_write(lambda tx: _fenced(tx, owner, cypher.CHURN_WRITE_SCORES, rows=batch, version=version, at=at))
        s.execute_write(lambda tx: _fenced(tx, owner, cypher.CHURN_CLEAR, at=at, version=version))
    log.info("churn scores written for %d users (model %s)", len(rows), version)
    return len(rows)


def _fenced(tx, owner: str | None, statement: str, **params) -> None:
    """`statement` run only while `owner` holds the refresh lease (store.LeaseLost otherwise)."""
    store.check_lease(tx, owner)
    tx.run(statement, **params).consume()
