"""The Neo4j side of embedding: every read and write the pipeline needs, batched."""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field

from app import cypher
from app.embeddings.state import ITEM, USER

BATCH = 2000
APPLIED_KEEP = 1000  # serving log entries kept (a process further behind reloads everything)
_WRITE = {USER: cypher.WRITE_USERS, ITEM: cypher.WRITE_ITEMS}
_SEEN = {USER: cypher.MARK_USERS_SEEN, ITEM: cypher.MARK_ITEMS_SEEN}


@dataclass
class Snapshot:
    """The whole interaction graph as id lists and parallel edge arrays."""

    user_ids: list[str]
    items: list[dict]
    user_revs: list[int] = field(default_factory=list)  # parallel to user_ids; items carry their `rev`
    user_nonces: list[str] = field(default_factory=list)  # parallel to user_ids (EXPORT_USERS)
    edges_u: list[str] = field(default_factory=list)
    edges_i: list[str] = field(default_factory=list)
    w: list[float] = field(default_factory=list)
    rev: list[int] = field(default_factory=list)
    first: list[int] = field(default_factory=list)  # first-seen time per edge, when exported with times
    taken_at: int = 0


class ParamList(list):
    """A query parameter list with a short repr.

    The driver builds `repr()` of every RUN's parameters for a debug log line even when debug
    logging is off, and over thousands of embeddings that alone is a large share of a write.
    """

    def __repr__(self) -> str:
        return f"<{len(self)} rows>"


def chunks(rows: list, size: int = BATCH):
    """Consecutive slices of `rows` as query parameter lists."""
    for start in range(0, len(rows), size):
        yield ParamList(rows[start:start + size])


def server_time(session) -> int:
    """Neo4j's clock in epoch ms: watermarks compare with timestamps it wrote."""
    return session.run(cypher.SERVER_TIME).single()["now"]


def export(session, progress=None, times: bool = False) -> Snapshot:
    """Stream edges (with their first-seen times if `times`), then users and items, out of Neo4j.

    Each statement sees the latest commits (read committed), so under concurrent ingest the
    nodes are read after the edges (every endpoint of an edge is then listed), and edges of a
    user erased in between (and maybe created again: another nonce) are dropped. Later changes are
    left to the next incremental run.
    """
    snap = Snapshot(user_ids=[], items=[], taken_at=server_time(session))
    read = {}  # user -> the nonce its edges were read under
    # One record per user, not per edge: the driver's per-record cost dominated a 1M-edge export.
    for record in session.run(cypher.EXPORT_EDGE_TIMES if times else cypher.EXPORT_EDGES):
        items = record["items"]
        read[record["u"]] = record["nonce"]
        snap.edges_u.extend([record["u"]] * len(items))
        snap.edges_i.extend(items)
        snap.w.extend(record["w"])
        snap.rev.extend(record["rev"])
        if times:
            snap.first.extend(record["first"])
        if progress is not None:
            progress.update(len(items))
    users = [(r["id"], r["rev"], r["nonce"]) for r in session.run(cypher.EXPORT_USERS)]
    snap.user_ids, snap.user_revs, snap.user_nonces = (list(x) for x in zip(*users)) if users else ([], [], [])
    snap.items = [dict(r) for r in session.run(cypher.EXPORT_ITEMS)]
    nonces = dict(zip(snap.user_ids, snap.user_nonces))
    if any(nonces.get(u) != n for u, n in read.items()):
        keep = [k for k, u in enumerate(snap.edges_u) if nonces.get(u) == read[u]]
        for name in ("edges_u", "edges_i", "w", "rev", "first"):
            values = getattr(snap, name)
            setattr(snap, name, [values[k] for k in keep] if values else values)
    return snap


def write_nodes(tx, ntype: str, rows: list[dict], version: str, history: int = 0) -> None:
    """Write `{id, props}` rows (embedding and refresh state; users with their `nonce`) under model
    `version`; users also keep the last `history` moves of their vector (see WRITE_USERS)."""
    for chunk in chunks(rows):
        tx.run(_WRITE[ntype], rows=chunk, version=version, history=history).consume()


def mark_edges(tx, rows: list[dict]) -> None:
    """Record on each edge (`{u, nonce, i, rev}`, the user's nonce) the revision the stored state accounts for."""
    by_user, nonce = defaultdict(dict), {}
    for r in rows:
        by_user[r["u"]][r["i"]] = r["rev"]
        nonce[r["u"]] = r["nonce"]
    users = [{"u": u, "nonce": nonce[u], "m": m} for u, m in sorted(by_user.items())]
    for chunk in chunks(users, 1000):
        tx.run(cypher.MARK_EDGES, rows=chunk).consume()


def mark_edges_changed(tx, rows: list[dict]) -> None:
    """Like `mark_edges` for changed edges found by element id (`{e, u, i, rev}`)."""
    for chunk in chunks(rows, 5000):
        tx.run(cypher.MARK_EDGES_CHANGED, rows=chunk).consume()


def item_degrees(tx, ids: list[str]) -> None:
    """Recompute the degree of items from all their edges (after their edges changed)."""
    for chunk in chunks(sorted(ids), 2000):
        tx.run(cypher.ITEM_DEGREES, ids=chunk).consume()


def unembedded_items(tx, ids: list[str], version: str) -> list[str]:
    """Those of the items `ids` not embedded by `version`."""
    out = []
    for chunk in chunks(sorted(ids), 2000):
        out.extend(tx.run(cypher.ITEMS_UNEMBEDDED, ids=chunk, version=version).single()["unembedded"])
    return out


def mark_seen(tx, ntype: str, rows: list[dict]) -> None:
    """Record that the stored state of each node (`{id, rev}`, users with their `nonce`) reflects its revision `rev`."""
    for chunk in chunks(rows, 5000):
        tx.run(_SEEN[ntype], rows=chunk).consume()


def refresh_state(session) -> dict:
    """The refresh watermark (epoch ms, None before the first run), last run, and whether a full run
    is pending (`full_pending`, with the `full_version` it was writing and `full_publish`)."""
    return session.execute_read(lambda tx: dict(tx.run(cypher.REFRESH_STATE).single()))


def set_full_pending(tx, owner: str, run_id: str, version: str, publish: bool) -> None:
    """Flag full run `run_id` in progress, so a crash mid-way is finished by another full run."""
    check_lease(tx, owner)
    tx.run(cypher.REFRESH_FULL_PENDING, owner=owner, run_id=run_id, version=version, publish=publish).consume()


def set_current_model(tx, version: str) -> None:
    """Make `version` the current model (inside a full run's last, fenced transaction)."""
    tx.run(cypher.MODEL_SET_CURRENT, version=version).consume()


class LeaseLost(RuntimeError):
    """This writer does not hold the refresh lease: its writes must not land."""


def check_lease(tx, owner: str | None) -> None:
    """Raise LeaseLost unless `owner` holds the lease; from here to commit the lease cannot change hands.

    Every writer of embeddings and refresh state calls this first in each transaction: the CLI, the
    API's jobs and tests as much as the worker (they take the lease like a worker does).
    """
    if owner is None:
        raise LeaseLost("writing embeddings needs the refresh lease (no owner given)")
    record = tx.run(cypher.LEASE_HELD, owner=owner).single()
    if record is None or not record["held"]:
        raise LeaseLost(f"worker {owner} no longer holds the refresh lease")


def advance(tx, mark: int, run: dict, owner: str | None, full_run: str | None = None,
            users: list[str] | None = None, items: list[str] | None = None,
            stale: list[str] = (), stale_since: int | None = None) -> None:
    """Move the watermark and record the run (with its owner) inside the run's transaction, fenced by
    the lease; `full_run` (the full run's id) also lowers the `full_pending` that run raised. The
    serving log gets the `users` and `items` an incremental run recomputed (None: a full run). `stale`:
    the items whose degrees are left to a later run, since `stale_since` (none after a full run)."""
    if owner is None:
        raise LeaseLost("writing embeddings needs the refresh lease (no owner given)")
    record = tx.run(cypher.REFRESH_ADVANCE, watermark=mark, run=json.dumps({**run, "owner": owner}),
                    owner=owner, full_run=full_run, deg_stale=ParamList(stale), deg_stale_since=stale_since).single()
    if record["updated"] == 0:
        raise LeaseLost(f"worker {owner} no longer holds the refresh lease")
    full = users is None
    tx.run(cypher.APPLIED_LOG, full=full, users=ParamList([] if full else users), items=ParamList([] if full else items),
           keep=APPLIED_KEEP).consume()


def pending_users(session, oldest: int, newest: int) -> tuple[int, list[str], list[str]]:
    """How many users have a change not yet reflected, the `oldest` longest waiting of them (by their
    oldest such change) and the `newest` last of those without a vector yet, newest first."""
    r = session.run(cypher.PENDING_USERS, oldest=oldest, newest=newest).single()
    first = {}
    for uid, at in sorted(r["edges"] + r["nodes"], key=lambda x: (x[1], x[0])):
        first.setdefault(uid)
    return r["waiting"], list(first)[:oldest], r["newest"]


def changes(session, ids: list[str]) -> tuple[list[dict], list[dict], list[dict]]:
    """The changed edges and user rows of users `ids`, and every changed item (users and items with their `rev`)."""
    edges, users = [], []
    for chunk in chunks(sorted(ids), 5000):
        for r in session.run(cypher.CHANGES_OF, ids=chunk):
            edges.extend({"u": r["id"], "i": i, "rev": rev, "e": e} for i, rev, e in r["edges"])
            if r["changed"]:
                users.append({"id": r["id"], "rev": r["rev"], "nonce": r["nonce"]})
    items = [dict(r) for r in session.run(cypher.CHANGED_ITEMS)]
    return edges, users, items


def oldest_pending(session) -> int | None:
    """Time stamp (ms) of the oldest change not yet reflected, or None."""
    return session.run(cypher.OLDEST_PENDING).single()["oldest"]


def user_edges(session, ids: list[str]) -> dict[str, tuple[list[str], list[float], str]]:
    """All edges of the given users that exist: id -> (item ids, raw weights, the user's nonce)."""
    out = {}
    for chunk in chunks(sorted(ids), 5000):
        for r in session.run(cypher.USER_EDGES, ids=chunk):
            out[r["id"]] = (r["other"], r["w"], r["nonce"])
    return out


def node_count(session) -> int:
    """Users plus items (count store lookups, no scan)."""
    record = session.run(cypher.NODE_COUNT).single()
    return record["users"] + record["items"]


def content_items(session, ids: list[str]) -> list[dict]:
    """The content fields (id, title, category, price) of the given items that exist."""
    out = []
    for chunk in chunks(sorted(ids), 5000):
        out.extend(dict(r) for r in session.run(cypher.CONTENT_ITEMS, ids=chunk))
    return out


def content_item_users(session, ids: list[str]) -> list[str]:
    """The users with an edge to any of the given items."""
    out = set()
    for chunk in chunks(sorted(ids), 5000):
        out.update(session.run(cypher.CONTENT_ITEM_USERS, ids=chunk).single()["users"])
    return sorted(out)
