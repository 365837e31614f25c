"""Full recompute: every embedding and every stored intermediate from the whole graph."""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from app.config import Config
from app.embeddings import store
from app.embeddings import state
from app.embeddings.models import LoadedModel
from graph_models import build_graph

log = logging.getLogger(__name__)


def compute(lm: LoadedModel, snap: store.Snapshot) -> dict:
    """Every stored vector and degree of the snapshot: {user|item: (ids, rows of props)}."""
    uidx = {u: k for k, u in enumerate(snap.user_ids)}
    item_ids = [it["id"] for it in snap.items]
    iidx = {x: k for k, x in enumerate(item_ids)}
    u = np.fromiter((uidx[x] for x in snap.edges_u), dtype=np.int64, count=len(snap.edges_u))
    i = np.fromiter((iidx[x] for x in snap.edges_i), dtype=np.int64, count=len(snap.edges_i))
    raw = np.maximum(np.asarray(snap.w, dtype=np.float64), 0.0)
    rows = lm.rows(item_ids)
    g = build_graph(u, i, raw * lm.scale, len(uidx), len(iidx))
    with torch.no_grad():
        p = lm.model.user_embedding(g, torch.from_numpy(rows)).numpy()
    x, q = lm.tables
    users = state.user_props(p, np.bincount(u, weights=raw, minlength=len(uidx)))
    items = state.item_props(q[rows], x[rows], lm.item_norm, np.bincount(i, weights=raw, minlength=len(iidx)))
    return {store.USER: (snap.user_ids, users), store.ITEM: (item_ids, items)}


def _fenced(tx, owner, write, *args):
    """A batch write that lands only while `owner` still holds the refresh lease."""
    store.check_lease(tx, owner)
    write(tx, *args)


def embed_full(driver, cfg: Config, lm: LoadedModel, progress: bool = False, owner: str | None = None,
               reason: str = "requested") -> dict:
    """Recompute and write every node's embedding and refresh state under `lm.version`."""
    started = time.monotonic()
    with driver.session(database=cfg.neo4j_database) as session:
        store.set_full_pending(session, True)
        with tqdm(desc="export edges", unit="edge", disable=not progress) as bar:
            snap = session.execute_read(lambda tx: store.export(tx, bar))
    t_export = time.monotonic() - started
    out = compute(lm, snap)
    t_infer = time.monotonic() - started - t_export
    users, items = ([{"id": x, "props": props} for x, props in zip(*out[t])] for t in (store.USER, store.ITEM))
    edges = [{"u": u, "i": i, "rev": rev} for u, i, rev in zip(snap.edges_u, snap.edges_i, snap.rev)]
    with driver.session(database=cfg.neo4j_database) as session:
        for ntype, rows in ((store.USER, users), (store.ITEM, items)):
            for chunk in tqdm(list(store.chunks(rows)), desc=f"write {ntype}s", disable=not progress):
                session.execute_write(lambda tx, c=chunk, t=ntype: _fenced(tx, owner, store.write_nodes, t, c,
                                                                           lm.version))
        for chunk in tqdm(list(store.chunks(edges, 20000)), desc="mark edges", disable=not progress):
            session.execute_write(lambda tx, c=chunk: _fenced(tx, owner, store.mark_edges, c))
        seen = [{"id": x, "at": snap.taken_at} for x in snap.user_ids]
        seen_items = [{"id": it["id"], "at": snap.taken_at} for it in snap.items]
        run = {"mode": "full", "reason": reason, "version": lm.version, "users": len(users), "items": len(items),
               "edges": len(edges), "seconds": round(time.monotonic() - started, 3),
               "export_s": round(t_export, 3), "inference_s": round(t_infer, 3), "finished_at": int(time.time() * 1000)}

        def finish(tx):
            store.mark_seen(tx, store.USER, seen)
            store.mark_seen(tx, store.ITEM, seen_items)
            store.advance(tx, snap.taken_at, run, owner)
        session.execute_write(finish)
    log.info("full recompute (%(reason)s): %(users)d users, %(items)d items, %(edges)d edges in %(seconds).2fs",
             run)
    return run
