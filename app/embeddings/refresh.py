"""Incremental refresh: recompute exactly the stored values a change reaches.

With InterestSAGE an item's embedding is fixed by the model version, and a user's embedding is the
weighted sum of the fixed inputs of the items it touched. So a changed edge (u, i) reaches exactly:
- u's embedding and degree, recomputed from all of u's current edges (not by differences, so weights
  that cancel leave exactly nothing behind);
- i's degree, summed again over its edges by Neo4j in the write transaction;
- i's embedding only if i is new since the version was embedded (the version's zero row).
Nothing else: the graph filter that also ranks items is computed at query time from the live graph,
so the cost of a run grows with the changed edges and the degrees of their endpoints, never with the
graph, and one run is one transaction.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from app.config import Config
from app.embeddings import state, store
from app.embeddings.full import embed_full, interrupted
from app.embeddings.models import LoadedModel
from app.embeddings.state import ITEM, USER

log = logging.getLogger(__name__)


class TooLarge(Exception):
    """The affected set passed the configured share of the graph: a full recompute is cheaper."""


def refresh(driver, cfg: Config, lm: LoadedModel, full: bool = False, progress: bool = False,
            owner: str | None = None) -> dict:
    """One run over the changes since the watermark: incremental when possible, else full."""
    with driver.session(database=cfg.neo4j_database) as session:
        st = store.refresh_state(session)
        reason = ("requested" if full else "interrupted full recompute" if st["full_pending"]
                  else "no watermark yet" if st["watermark"] is None else None)
        if reason is None:
            started = time.monotonic()
            now = store.server_time(session)
            edges, users, items = session.execute_read(store.changes)
            if not (edges or users or items):
                return {"mode": "noop", "seconds": round(time.monotonic() - started, 4)}
            try:
                writes, run = incremental(session, cfg, lm, edges, users, items)
            except TooLarge as exc:
                reason = str(exc)
            else:
                run.update(mode="incremental", version=lm.version, seconds=round(time.monotonic() - started, 4),
                           finished_at=int(time.time() * 1000))
                session.execute_write(lambda tx: _write(tx, lm.version, writes, now, run, owner))
                log.debug("incremental refresh: %d edges, %d users, %d items in %.3fs", run["changed_edges"],
                          run["users"], run["items"], time.monotonic() - started)
                return run
    publish = False
    if st["full_pending"]:  # finish the interrupted run under the version it was writing
        lm, publish = interrupted(driver, cfg, st, lm)
    return embed_full(driver, cfg, lm, progress=progress, owner=owner, reason=reason, publish=publish)


def incremental(session, cfg: Config, lm: LoadedModel, edges: list[dict], users: list[dict],
                items: list[dict]) -> tuple[dict, dict]:
    """The writes of one incremental run over the changed edges and nodes, and its summary."""
    user_ids = sorted({e["u"] for e in edges} | {u["id"] for u in users})
    item_ids = sorted({e["i"] for e in edges} | {i["id"] for i in items})
    total = store.node_count(session)
    if len(user_ids) + len(item_ids) > cfg.full_share * max(total, 1):
        raise TooLarge(f"affected set {len(user_ids) + len(item_ids)} > {cfg.full_share:.0%} of {total} nodes")
    x, q = lm.tables
    edges_of = store.user_edges(session, user_ids)
    ids = sorted(store.node_state(session, USER, user_ids, ["id"]))  # erased users are gone
    p, deg = np.zeros((len(ids), x.shape[1])), np.zeros(len(ids))
    for k, uid in enumerate(ids):
        its, w = edges_of[uid]
        raw = np.maximum(np.asarray(w, dtype=np.float64), 0.0)
        if its:
            p[k] = (raw * lm.scale) @ x[lm.rows(its)]
        deg[k] = raw.sum()
    users_out = [{"id": uid, "props": pr} for uid, pr in zip(ids, state.user_props(p, deg))]
    # Items' embeddings are the version's: only items it has not embedded yet need one.
    stored = store.node_state(session, ITEM, item_ids, ["embedding_version"])
    new = [i for i in item_ids if i in stored and stored[i][0] != lm.version]
    rows = lm.rows(new)
    items_out = [{"id": i, "props": pr} for i, pr in zip(new, state.item_props(q[rows], x[rows], lm.item_norm, None))]
    writes = {"users": users_out, "items": items_out, "degrees": [i for i in item_ids if i in stored],
              "edges": [{"e": e["e"], "u": e["u"], "i": e["i"], "rev": e["rev"]} for e in edges],
              # The revisions this run read: one committed since keeps its node flagged for the next.
              "seen": {USER: [{"id": r["id"], "rev": r["rev"]} for r in users],
                       ITEM: [{"id": r["id"], "rev": r["rev"]} for r in items]}}
    run = {"changed_edges": len(edges), "changed_nodes": len(users) + len(items),
           "users": len(users_out), "items": len(writes["degrees"]), "embeddings": len(users_out) + len(items_out)}
    return writes, run


def _write(tx, version: str, writes: dict, mark: int, run: dict, owner: str | None) -> None:
    """Everything one run changes, in its single transaction.

    Locks are taken in the ingest path's order (items by id, then users by id, then edges), so a run
    and concurrent ingest queue instead of deadlocking (a deadlock costs a retry after ~1 s); the
    lease node before them all (the fence, as in every fenced transaction).
    """
    store.check_lease(tx, owner)
    store.write_nodes(tx, ITEM, writes["items"], version)
    store.item_degrees(tx, writes["degrees"])
    store.write_nodes(tx, USER, writes["users"], version)
    for ntype in (ITEM, USER):
        store.mark_seen(tx, ntype, writes["seen"][ntype])
    store.mark_edges_changed(tx, writes["edges"])
    store.advance(tx, mark, run, owner)
