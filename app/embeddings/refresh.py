"""Incremental refresh: recompute exactly the stored values a change reaches.

With InterestSAGE an item's embedding is fixed by the model version, and a user's embedding is the
weighted sum of the fixed inputs of the items it touched. So a changed edge (u, i) reaches exactly:
- u's embedding and degree, recomputed from all of u's current edges (not by differences, so weights
  that cancel leave exactly nothing behind);
- i's degree, summed again over its edges by Neo4j in the write transaction of the run that leaves
  nobody waiting (or, while users wait, of a run at most DEGREE_DELAY_MS after it went stale: it feeds
  only the trending recipe, and summing every touched item's edges in every run of a flood cost more
  than the users' vectors);
- i's embedding only if i is new since the version was embedded (the version's zero row), or takes its
  rows from its content (a version with a content part, an item without a trained row) and its
  metadata changed: then also the embeddings of i's users, whose sums hold i's content row.
Nothing else: the graph filter that also ranks items is computed at query time from the live graph,
so the cost of a run grows with the changed edges and the degrees of their endpoints, never with the
graph, and one run is one transaction. Since a user's values depend on that user's edges alone, a
run may take some of the changed users and leave the rest flagged for the next: a burst becomes
several short runs instead of one long full recompute.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import scipy.sparse as sp

from app.config import Config
from app.embeddings import state, store
from app.embeddings.full import embed_full, interrupted
from app.embeddings.models import LoadedModel
from app.embeddings.state import ITEM, USER

log = logging.getLogger(__name__)


ALL = 2**31 - 1  # no bound on the users a run may take (IG_REFRESH_MAX_USERS 0)
DEGREE_DELAY_MS = 10_000  # while users wait, items' degrees are summed again at most this long after


class Phases:
    """Seconds each phase of a run took, in order: where a run's time goes shows in its log line."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.monotonic()

    def done(self, name: str) -> None:
        now = time.monotonic()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._last, 4)
        self._last = now

    def __str__(self) -> str:
        return ", ".join(f"{k} {v:.3f}s" for k, v in self.seconds.items())


class TooLarge(Exception):
    """The affected set passed the configured share of the graph: a full recompute is cheaper."""


def refresh(driver, cfg: Config, lm: LoadedModel, full: bool = False, progress: bool = False,
            owner: str | None = None, max_users: int | None = None) -> dict:
    """One run over the changes since the watermark: incremental when possible, else full; a capped
    run takes at most `max_users` changed users (default: `refresh_max_users`)."""
    with driver.session(database=cfg.neo4j_database) as session:
        status = store.refresh_state(session)
        reason = ("requested" if full else "interrupted full recompute" if status["full_pending"]
                  else "no watermark yet" if status["watermark"] is None else None)
        if reason is None:
            started = time.monotonic()
            phases = Phases()
            now = store.server_time(session)
            limit = cfg.refresh_max_users and (max_users or cfg.refresh_max_users)  # 0: uncapped
            ids, left = take(*session.execute_read(store.pending_users, limit or ALL, limit), limit)
            phases.done("pending")
            edges, users, items = session.execute_read(store.changes, ids)
            phases.done("changes")
            if not (edges or users or items or status["deg_stale"]):
                return {"mode": "noop", "seconds": round(time.monotonic() - started, 4)}
            try:
                writes, run = incremental(session, cfg, lm, edges, users, items, phases)
            except TooLarge as exc:
                reason = str(exc)
            else:
                phases.done("inference")
                writes["degrees"] = degree_plan(status, writes["items"], now, left)
                run["degrees"] = len(writes["degrees"][0])
                run.update(mode="incremental", version=lm.version, users_left=left, phases=phases.seconds,
                           seconds=round(time.monotonic() - started, 4), finished_at=int(time.time() * 1000))
                session.execute_write(lambda tx: _write(tx, lm, writes, now, run, owner, cfg.interest_history,
                                                        phases))
                phases.done("commit")
                log.info("incremental refresh: %d edges, %d users, %d items in %.3fs (%d users wait; %s)",
                         run["changed_edges"], run["users"], run["items"], time.monotonic() - started, left,
                         phases)
                return run
    publish = False
    if status["full_pending"]:  # finish the interrupted run under the version it was writing
        lm, publish = interrupted(driver, cfg, status, lm)
    return embed_full(driver, cfg, lm, progress=progress, owner=owner, reason=reason, publish=publish)


def take(waiting: int, oldest: list[str], newest: list[str], limit: int) -> tuple[list[str], int]:
    """The changed users one run takes, at most `limit` (0: all), and how many wait; from the longest
    waiting and the newest without a vector yet (`pending_users`).

    A quarter of the run (at least one user) goes to the longest waiting, so that a backlog also drains
    from its old end and nobody waits for ever; the rest to the users without a vector yet, newest first
    (their first vector turns trending answers into personal ones, and a shopper arriving right after a
    flood of new ones is not queued behind the whole flood), then again to the longest waiting.
    """
    if not limit:
        return oldest, 0
    reserved = max(limit // 4, 1)
    chosen = dict.fromkeys(oldest[:reserved])
    for uid in newest + oldest[reserved:]:
        if len(chosen) == limit:
            break
        chosen.setdefault(uid)
    return list(chosen), max(waiting - len(chosen), 0)


class RunSize:
    """How many users the worker's next run takes: as many as the last full runs' pace fits in
    `refresh_target_seconds`, between a quarter of `refresh_max_users` and all of it.

    A run's length is what a shopper arriving during a backlog waits for twice (the run in flight, then
    its own), and on a busy machine a run of the full cap can take seconds; the floor keeps a run's
    fixed costs from eating the users refreshed per second.
    """

    def __init__(self):
        self.learned: float | None = None  # users the last runs' pace fits in the target

    def limit(self, cfg: Config) -> int:
        """Users the next run takes at most under `cfg`."""
        cap = cfg.refresh_max_users
        if not cap or cfg.refresh_target_seconds <= 0 or self.learned is None:
            return cap
        return int(min(max(self.learned, cap / 4, 1), cap))

    def update(self, cfg: Config, run: dict | None, seconds: float) -> int:
        """Learn from a run that took `seconds` in all (a full one: it left users waiting); the next limit."""
        if run and run.get("users_left") and seconds > 0 and cfg.refresh_target_seconds > 0:
            fits = run["users"] * cfg.refresh_target_seconds / seconds
            # geometric mean with the last limit: one slow run (a lock wait) halves nothing at once
            self.learned = (self.limit(cfg) * fits) ** 0.5
        return self.limit(cfg)


def degree_plan(status: dict, items: list[str], now: int, left: int) -> tuple[list[str], list[str], int | None]:
    """The items whose degrees a run sums again, those it leaves stale and since when (ms): all of them
    when the run leaves nobody waiting or the oldest stale one has waited DEGREE_DELAY_MS, else none."""
    stale, since = sorted(set(status["deg_stale"]) | set(items)), status["deg_stale_since"]
    if not left or not stale or (since is not None and now - since >= DEGREE_DELAY_MS):
        return stale, [], None
    return [], stale, now if since is None else since


def incremental(session, cfg: Config, lm: LoadedModel, edges: list[dict], users: list[dict],
                items: list[dict], phases: Phases | None = None) -> tuple[dict, dict]:
    """The writes of one incremental run over the changed edges and nodes, and its summary. Only
    uncapped runs (`refresh_max_users` 0) turn into a full recompute when large: a capped one is
    bounded already, and a full run would hold back every change behind it for its whole length."""
    user_ids = sorted({e["u"] for e in edges} | {u["id"] for u in users})
    item_ids = sorted({e["i"] for e in edges} | {i["id"] for i in items})
    # A changed item whose rows come from its content (a metadata change) moves the vectors of its users.
    changed = [i["id"] for i in items]
    recontent = [i for i, u in zip(changed, _untrained(lm, changed)) if u] if lm.trained_rows is not None else []
    if recontent:
        user_ids = sorted(set(user_ids) | set(store.content_item_users(session, recontent)))
    total = store.node_count(session)
    if not cfg.refresh_max_users and len(user_ids) + len(item_ids) > cfg.full_share * max(total, 1):
        raise TooLarge(f"affected set {len(user_ids) + len(item_ids)} > {cfg.full_share:.0%} of {total} nodes")
    edges_of = store.user_edges(session, user_ids)  # erased users are not there
    if phases:
        phases.done("edges")
    ids = sorted(edges_of)
    # All users at once: one sparse users x version-rows matrix of weights times the item inputs.
    counts = [len(edges_of[u][0]) for u in ids]
    raw = np.maximum(np.fromiter((w for u in ids for w in edges_of[u][1]), dtype=np.float64, count=sum(counts)), 0.0)
    touched = [i for u in ids for i in edges_of[u][0]]
    cols = lm.rows(touched)
    row_of = np.repeat(np.arange(len(ids)), counts)
    x = lm.tables[0]
    content = _content(session, lm, set(touched) | set(item_ids))
    at = {i: k for k, i in enumerate(content)}
    cold = np.fromiter((at.get(i, -1) for i in touched), dtype=np.int64, count=len(touched))
    cols[cold >= 0] = lm.model.num_items  # the zero row, their content rows added below (as full.compute)
    weights = sp.csr_matrix((raw * lm.scale, (row_of, cols)), shape=(len(ids), x.shape[0]))
    p = np.asarray(weights @ x) if len(ids) else np.zeros((0, x.shape[1]))
    if content:
        on = cold >= 0
        xc = np.array([content[i][0] for i in content])
        p = p + sp.csr_matrix(((raw * lm.scale)[on], (row_of[on], cold[on])), shape=(len(ids), len(content))) @ xc
    deg = np.bincount(row_of, weights=raw, minlength=len(ids))
    writes = {"users": [{"id": uid, "nonce": edges_of[uid][2], "props": pr}
                        for uid, pr in zip(ids, state.user_props(p, deg))],
              "items": item_ids,
              "content": content,  # item -> (x, q) rows from content
              "recontent": recontent,  # items to embed again: their content changed
              "affected": user_ids,  # erased ones included: the serving log drops their rows
              "edges": [{"e": e["e"], "u": e["u"], "i": e["i"], "rev": e["rev"]} for e in edges],
              # The revisions this run read: one committed since keeps its node flagged for the next.
              "seen": {USER: [{"id": r["id"], "rev": r["rev"], "nonce": r["nonce"]} for r in users],
                       ITEM: [{"id": r["id"], "rev": r["rev"]} for r in items]}}
    run = {"changed_edges": len(edges), "changed_nodes": len(users) + len(items),
           "users": len(ids), "items": len(item_ids)}
    return writes, run


def _untrained(lm: LoadedModel, ids) -> np.ndarray:
    """Whether each item lacks a trained row of a version with content (its rows may come from content)."""
    return ~lm.trained_rows[lm.rows(ids)]


def _content(session, lm: LoadedModel, ids) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """item -> (x, q) rows from content (LoadedModel.cold) of those of `ids` that take them."""
    if lm.trained_rows is None or not ids:
        return {}
    ids = sorted(ids)
    meta = store.content_items(session, [i for i, cold in zip(ids, _untrained(lm, ids)) if cold])
    pos, x, q, _ = lm.cold(meta)
    return {meta[k]["id"]: (x[n], q[n]) for n, k in enumerate(pos)}


def _embed_new_items(tx, lm: LoadedModel, ids: list[str], content: dict) -> int:
    """Embed, under `lm`, the items it has not embedded yet or whose content changed: rows from content
    (`content`, item -> (x, q)) where they have them, else the version's (its zero row for new ones)."""
    x, q = lm.tables
    rows = lm.rows(ids)
    xi, qi = x[rows], q[rows]
    for k, i in enumerate(ids):
        if i in content:
            xi[k], qi[k] = content[i]
    store.write_nodes(tx, ITEM, [{"id": i, "props": pr} for i, pr in zip(ids, state.item_props(
        qi, xi, lm.item_norm, None))], lm.version)
    return len(ids)


def _write(tx, lm: LoadedModel, writes: dict, mark: int, run: dict, owner: str | None, history: int,
           phases: Phases) -> None:
    """Everything one run changes, in its single transaction.

    Locks are taken in the ingest path's order (items by id, then users by id, then edges), so a run
    and concurrent ingest queue instead of deadlocking (a deadlock costs a retry after ~1 s); the
    lease node before them all (the fence, as in every fenced transaction).
    """
    store.check_lease(tx, owner)
    summed, stale, since = writes["degrees"]  # summed holds the run's items whenever it is not empty
    store.item_degrees(tx, summed)
    new = store.unembedded_items(tx, writes["items"], lm.version)
    phases.done("degrees")
    run["embeddings"] = len(writes["users"]) + _embed_new_items(tx, lm, sorted(set(new) | set(writes["recontent"])),
                                                                writes["content"])
    store.write_nodes(tx, USER, writes["users"], lm.version, history)
    phases.done("vectors")
    for ntype in (ITEM, USER):
        store.mark_seen(tx, ntype, writes["seen"][ntype])
    store.mark_edges_changed(tx, writes["edges"])
    phases.done("marks")
    store.advance(tx, mark, run, owner, users=writes["affected"], items=writes["items"], stale=stale,
                  stale_since=since)
