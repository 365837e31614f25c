"""Streaming learning in production: fold new items in and fine-tune the current version's responses on
the recent edges, publish the result as a new version only if it passes the check on the latest ones."""
from __future__ import annotations

import logging
import time

import numpy as np

from app import cypher
from app.config import Config
from app.embeddings import models
from app.embeddings.training import _publish, new_version, publish
from graph_models.streaming import Edges, fine_tune

log = logging.getLogger(__name__)
DAY_MS = 86_400_000


def export_edges(session, lm: models.LoadedModel) -> tuple[Edges, list[str], int]:
    """The live graph as Edges with first-seen times, the version's items first in its row order;
    the item ids by column and the latest event time."""
    us, its, ws, firsts = [], [], [], []
    for r in session.run(cypher.EXPORT_EDGE_TIMES):
        us.extend([r["u"]] * len(r["items"]))
        its.extend(r["items"])
        ws.extend(r["w"])
        firsts.extend(r["first"])
    latest = session.run(cypher.LATEST_EVENT_TS).single()["latest"] or 0
    item_ids = list(lm.meta["item_ids"])
    col = {x: k for k, x in enumerate(item_ids)}
    for x in sorted(set(its) - col.keys()):  # items new since the version, after its rows
        col[x] = len(item_ids)
        item_ids.append(x)
    users = {x: k for k, x in enumerate(dict.fromkeys(us))}
    edges = Edges(np.fromiter((users[x] for x in us), dtype=np.int64, count=len(us)),
                  np.fromiter((col[x] for x in its), dtype=np.int64, count=len(its)),
                  np.asarray(ws, dtype=np.float64) * lm.scale, np.asarray(firsts, dtype=np.int64),
                  (len(users), len(item_ids)))
    return edges, item_ids, int(latest)


def fine_tune_and_publish(driver, cfg: Config, owner: str | None, progress: bool = False, tune=None) -> dict:
    """One streaming update of the current version (see `graph_models.streaming.fine_tune`).

    The check is the last `IG_FINETUNE_CHECK_DAYS` of events (by an edge's first time), the recent
    window the `IG_FINETUNE_RECENT_DAYS` before it. A candidate not worse on the check becomes a new
    current version (full re-embed, switch with its last write); a worse one is kept as a non-current
    version with its check result, so `status` shows what was refused and why.
    """
    started = time.monotonic()
    lm = models.current(driver, cfg)
    if lm is None:
        raise RuntimeError("no trained model yet: run a retrain first")
    with driver.session(database=cfg.neo4j_database) as session:
        edges, item_ids, latest = session.execute_read(lambda tx: export_edges(tx, lm))
    check_from = latest - int(cfg.finetune_check_days * DAY_MS)
    recent_from = check_from - int(cfg.finetune_recent_days * DAY_MS)
    candidate, report = fine_tune(lm.model, edges, recent_from, check_from, lm.mcfg, replay=cfg.finetune_replay,
                                  rounds=cfg.finetune_rounds, tune=tune)
    lineage = {"fine_tuned_from": lm.version,
               "tuned_on": {"recent_from": recent_from, "check_from": check_from, "until": latest,
                            "recent_targets": report["recent_targets"], "replay": report["replay"],
                            "items_folded": report["items_folded"], "rounds": report["rounds"],
                            "bias_moved": report["bias_moved"]},
               "check": {"accepted": report["accepted"], "users": report["check_users"], **report["check"]}}
    meta = {"ref_ms": lm.meta["ref_ms"], "item_ids": item_ids}
    if report["accepted"]:
        out = publish(driver, cfg, lm.mcfg, candidate, meta, owner, "fine-tuned version", lineage=lineage,
                      progress=progress)
    else:
        version = new_version()
        meta = {"decay_anchor_ms": lm.meta["decay_anchor_ms"], "half_life_days": lm.meta["half_life_days"], **meta}
        out = {"version": version, "checkpoint": str(_publish(driver, cfg, lm.mcfg, candidate, version, meta,
                                                                {}, 0, lineage))}
        log.info("fine-tune of %s refused by its check: %s", lm.version, lineage["check"])
    return {**out, **lineage, "current": out["version"] if report["accepted"] else lm.version,
            "seconds": round(time.monotonic() - started, 2)}
