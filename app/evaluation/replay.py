"""The `incremental` model through the real service: ingest, refresh and recommendations in Neo4j.

The in-memory loop (`graph_models.stream`) is what long streams run; this replays the same stream
through `pipeline.ingest`, `refresh` and the recommendation query, for a test that both give the
same figures, and for `evaluate stream --engine neo4j`.
"""
from __future__ import annotations

import time

import numpy as np
from tqdm.auto import tqdm

from app.config import Config
from app.embeddings import models
from app.embeddings.refresh import refresh
from app.embeddings.training import publish
from app.ingest import pipeline, writer
from graph_models.stream import Live, scored_pairs

CHUNK = 5000


def _ingest(driver, cfg: Config, raw: list[dict]) -> None:
    for s in range(0, len(raw), CHUNK):
        pipeline.ingest(driver, cfg, raw[s:s + CHUNK])


def run(driver, cfg: Config, log, start: int, bounds: list, model, mcfg, recommend, owner: str,
        k: int = 20, progress: bool = True) -> dict:
    """Hit rate, NDCG and MRR at k of the served ranking over the stream, as `graph_models.stream.run`
    scores it. `model` was fitted on the first `start` events (item rows in stream order); `recommend
    (user_id, k)` returns the served item ids; `owner` holds the refresh lease. Needs an empty graph."""
    if writer.interacted_edges(driver, cfg.neo4j_database):
        raise ValueError("the Neo4j replay needs a graph without interactions")
    stream, raw = log.stream, log.raw
    key_to_user = {}
    for ev, u in zip(raw, stream.u):
        key_to_user.setdefault(int(u), ev["user_id"])
    _ingest(driver, cfg, raw[:start])
    live = Live(stream, start)
    meta = {"ref_ms": log.ref_ms, "item_ids": [str(x) for x in stream.item_ids[:model.num_items]]}
    published = publish(driver, cfg, mcfg, model, meta, owner, "stream evaluation")
    lm = models.load(published["checkpoint"], published["version"])
    totals, n, seconds = np.zeros(3), 0, 0.0
    for lo, hi in tqdm(bounds, desc="neo4j replay", unit="batch", disable=not progress):
        t0 = time.time()
        for u, i in scored_pairs(live, stream, lo, hi):
            served = recommend(key_to_user[int(u)], k)
            target = str(stream.item_ids[i])
            if target in served:
                r = served.index(target) + 1
                totals += [1.0, 1.0 / np.log2(r + 1), 1.0 / r]
            n += 1
        _ingest(driver, cfg, raw[lo:hi])
        while refresh(driver, cfg, lm, owner=owner).get("users_left"):  # a capped run leaves the rest
            pass
        seconds += time.time() - t0
        live = Live(stream, hi)
    hr, ndcg, mrr = totals / max(n, 1)
    return {"hr": hr, "ndcg": ndcg, "mrr": mrr, "seconds": round(seconds, 2), "events_scored": n}
