"""Full recompute: every embedding and every stored intermediate from the whole graph."""
from __future__ import annotations

import logging
import time
import uuid

import numpy as np
import scipy.sparse as sp
import torch
from neo4j.exceptions import TransientError
from tqdm.auto import tqdm

from app import cypher
from app.config import Config
from app.embeddings import models, state, store
from app.embeddings.models import LoadedModel
from graph_models import build_graph

log = logging.getLogger(__name__)
# A batch's own tries past the driver's retries, which end after IG_NEO4J_TIMEOUT / 4 (set for requests):
# under bursts of ingest and erasures a batch can deadlock again within that, and a run must not fail.
TRANSIENT_TRIES = 5


def compute(lm: LoadedModel, snap: store.Snapshot) -> dict:
    """Every stored vector and degree of the snapshot: {user|item: (ids, props)}, where `props(idx)` are
    the rows of props of the nodes at positions `idx` (built per batch: at 10M edges the rows of every
    node as Python lists would outweigh the graph)."""
    uidx = {u: k for k, u in enumerate(snap.user_ids)}
    item_ids = [it["id"] for it in snap.items]
    iidx = {x: k for k, x in enumerate(item_ids)}
    u = np.fromiter((uidx[x] for x in snap.edges_u), dtype=np.int64, count=len(snap.edges_u))
    i = np.fromiter((iidx[x] for x in snap.edges_i), dtype=np.int64, count=len(snap.edges_i))
    raw = np.maximum(np.asarray(snap.w, dtype=np.float64), 0.0)
    rows = lm.rows(item_ids)
    # Items without a trained row take rows from their content (LoadedModel.cold): the zero row in the
    # DGL sum, their content rows added to it (as the incremental refresh adds them).
    pos, xc, qc, _ = lm.cold(snap.items)
    rows[pos] = lm.model.num_items
    g = build_graph(u, i, raw * lm.scale, len(uidx), len(iidx))
    with torch.no_grad():
        p = lm.model.user_embedding(g, torch.from_numpy(rows)).numpy()
    cold = np.full(len(item_ids), -1, dtype=np.int64)
    cold[pos] = np.arange(len(pos))
    if len(pos):
        on = cold[i] >= 0
        p = p + sp.csr_matrix(((raw * lm.scale)[on], (u[on], cold[i[on]])), shape=(len(uidx), len(pos))) @ xc
    x, q = lm.tables
    udeg = np.bincount(u, weights=raw, minlength=len(uidx))
    ideg = np.bincount(i, weights=raw, minlength=len(iidx))

    def item_rows(idx):
        xi, qi, at = x[rows[idx]], q[rows[idx]], cold[idx]
        xi[at >= 0], qi[at >= 0] = xc[at[at >= 0]], qc[at[at >= 0]]
        return state.item_props(qi, xi, lm.item_norm, ideg[idx])
    return {store.USER: (snap.user_ids, lambda idx: state.user_props(p[idx], udeg[idx])),
            store.ITEM: (item_ids, item_rows)}


def props_of(out: dict, ntype: str) -> list:
    """Every node's props of one type from `compute`, in id-list order (for checks on small graphs)."""
    ids, props = out[ntype]
    return props(np.arange(len(ids)))


def _fenced(tx, owner, write, *args):
    """A batch write that lands only while `owner` still holds the refresh lease."""
    store.check_lease(tx, owner)
    write(tx, *args)


def _write(session, work) -> None:
    """`session.execute_write(work)`, tried again after a transient failure (a deadlock): every
    transaction of the run writes the same values again, or was rolled back whole."""
    for attempt in range(TRANSIENT_TRIES):
        try:
            return session.execute_write(work)
        except TransientError:
            if attempt == TRANSIENT_TRIES - 1:
                raise


def embed_full(driver, cfg: Config, lm: LoadedModel, progress: bool = False, owner: str | None = None,
               reason: str = "requested", publish: bool = False) -> dict:
    """Recompute and write every node's embedding and refresh state under `lm.version`, as lease
    holder `owner`; with `publish`, make `lm.version` current in the same last transaction.

    Batches commit one by one, so the run first raises `full_pending` (with its version): a crash
    part-way leaves it raised and the next run finishes the job (`interrupted`), under that version.
    """
    started = time.monotonic()
    run_id = uuid.uuid4().hex
    with driver.session(database=cfg.neo4j_database) as session:
        session.execute_write(lambda tx: store.set_full_pending(tx, owner, run_id, lm.version, publish))
        with tqdm(desc="export edges", unit="edge", disable=not progress) as bar:
            snap = session.execute_read(lambda tx: store.export(tx, bar))
    t_export = time.monotonic() - started
    out = compute(lm, snap)
    t_infer = time.monotonic() - started - t_export
    # Nodes by id (each batch marks its edges user by user, in id order: store.mark_edges), and the
    # last transaction's marks items first: locks are taken in the ingest path's order (items by id,
    # then users by id), so concurrent ingest queues instead of deadlocking. Rows are built batch by
    # batch from the arrays, so the run holds the snapshot and the vectors, not every row at once.
    nonce = dict(zip(snap.user_ids, snap.user_nonces))
    with driver.session(database=cfg.neo4j_database) as session:
        for ntype, (ids, props) in out.items():
            order = np.array(sorted(range(len(ids)), key=ids.__getitem__), dtype=np.int64)
            for start in tqdm(range(0, len(order), cfg.full_batch), desc=f"write {ntype}s", disable=not progress):
                idx = order[start:start + cfg.full_batch]
                chunk = [{"id": ids[k], "props": row} for k, row in zip(idx, props(idx))]
                if ntype == store.USER:
                    for row in chunk:
                        row["nonce"] = nonce[row["id"]]
                _write(session, lambda tx, c=chunk, t=ntype: _fenced(tx, owner, store.write_nodes, t, c,
                                                                     lm.version, cfg.interest_history))
        step = 10 * cfg.full_batch
        for start in tqdm(range(0, len(snap.edges_u), step), desc="mark edges", disable=not progress):
            chunk = [{"u": u, "nonce": nonce[u], "i": i, "rev": rev} for u, i, rev in
                     zip(snap.edges_u[start:start + step], snap.edges_i[start:start + step], snap.rev[start:start + step])]
            _write(session, lambda tx, c=chunk: _fenced(tx, owner, store.mark_edges, c))
        # The revisions the export read: a change committed after it keeps its node flagged.
        seen = sorted(({"id": x, "rev": rev, "nonce": n} for x, rev, n in
                       zip(snap.user_ids, snap.user_revs, snap.user_nonces)), key=lambda r: r["id"])
        seen_items = sorted(({"id": it["id"], "rev": it["rev"]} for it in snap.items), key=lambda r: r["id"])
        run = {"mode": "full", "reason": reason, "version": lm.version, "published": publish,
               "users": len(snap.user_ids), "items": len(snap.items),
               "edges": len(snap.edges_u), "seconds": round(time.monotonic() - started, 3),
               "export_s": round(t_export, 3), "inference_s": round(t_infer, 3), "finished_at": int(time.time() * 1000)}

        def finish(tx):
            store.check_lease(tx, owner)
            store.mark_seen(tx, store.ITEM, seen_items)
            store.mark_seen(tx, store.USER, seen)
            store.advance(tx, snap.taken_at, run, owner, full_run=run_id)
            if publish:  # with the last write: new-model vectors are never left under the old model
                store.set_current_model(tx, lm.version)
        _write(session, finish)
    log.info("full recompute (%(reason)s): %(users)d users, %(items)d items, %(edges)d edges in %(seconds).2fs",
             run)
    return run


def interrupted(driver, cfg: Config, state: dict, lm: LoadedModel | None) -> tuple[LoadedModel | None, bool]:
    """The model an interrupted full run (`state` from `store.refresh_state`) was writing, and whether
    to publish it: a retrain's new version is finished and made current; else `lm` as it was."""
    version = state.get("full_version")
    if version and (lm is None or version != lm.version):
        with driver.session(database=cfg.neo4j_database) as session:
            record = session.execute_read(lambda tx: tx.run(cypher.MODEL_BY_VERSION, version=version).single())
        if record is not None:
            return models.load(record["path"], version), bool(state.get("full_publish"))
        log.warning("interrupted full run was writing unknown model version %s; redoing it with %s",
                    version, lm and lm.version)
    return lm, False
