"""The Neo4j side of embedding: every read and write the pipeline needs, batched."""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field

from app import cypher
from app.embeddings.state import ITEM, USER

BATCH = 2000
_WRITE = {USER: cypher.WRITE_USERS, ITEM: cypher.WRITE_ITEMS}
_SEEN = {USER: cypher.MARK_USERS_SEEN, ITEM: cypher.MARK_ITEMS_SEEN}
_EDGES = {USER: cypher.USER_EDGES, ITEM: cypher.ITEM_EDGES}
_STATE = {USER: cypher.USER_STATE, ITEM: cypher.ITEM_STATE}


@dataclass
class Snapshot:
    """The whole interaction graph as id lists and parallel edge arrays."""

    user_ids: list[str]
    items: list[dict]
    user_revs: list[int] = field(default_factory=list)  # parallel to user_ids; items carry their `rev`
    edges_u: list[str] = field(default_factory=list)
    edges_i: list[str] = field(default_factory=list)
    w: list[float] = field(default_factory=list)
    rev: list[int] = field(default_factory=list)
    taken_at: int = 0


class Rows(list):
    """A query parameter list with a short repr.

    The driver builds `repr()` of every RUN's parameters for a debug log line even when debug
    logging is off: over 20,000 embeddings that alone took over a second.
    """

    def __repr__(self) -> str:
        return f"<{len(self)} rows>"


def chunks(rows: list, size: int = BATCH):
    """Consecutive slices of `rows` as query parameter lists."""
    for start in range(0, len(rows), size):
        yield Rows(rows[start:start + size])


def server_time(session) -> int:
    """Neo4j's clock in epoch ms: watermarks compare with timestamps it wrote."""
    return session.run(cypher.SERVER_TIME).single()["now"]


def export(session, progress=None) -> Snapshot:
    """Stream edges, then users and items, out of Neo4j.

    Each statement sees the latest commits (read committed), so under concurrent ingest the
    nodes are read after the edges (every endpoint of an edge is then listed), and edges of a
    user erased in between are dropped. Later changes are left to the next incremental run.
    """
    snap = Snapshot(user_ids=[], items=[], taken_at=server_time(session))
    # One record per user, not per edge: the driver's per-record cost dominated a 1M-edge export.
    for record in session.run(cypher.EXPORT_EDGES):
        items = record["items"]
        snap.edges_u.extend([record["u"]] * len(items))
        snap.edges_i.extend(items)
        snap.w.extend(record["w"])
        snap.rev.extend(record["rev"])
        if progress is not None:
            progress.update(len(items))
    users = [(r["id"], r["rev"]) for r in session.run(cypher.EXPORT_USERS)]
    snap.user_ids, snap.user_revs = [u for u, _ in users], [rev for _, rev in users]
    snap.items = [dict(r) for r in session.run(cypher.EXPORT_ITEMS)]
    users = set(snap.user_ids)
    if not users.issuperset(snap.edges_u):
        keep = [k for k, u in enumerate(snap.edges_u) if u in users]
        for name in ("edges_u", "edges_i", "w", "rev"):
            values = getattr(snap, name)
            setattr(snap, name, [values[k] for k in keep])
    return snap


def write_nodes(tx, ntype: str, rows: list[dict], version: str) -> None:
    """Write `{id, props}` rows (embedding and refresh state) under model `version`."""
    for chunk in chunks(rows):
        tx.run(_WRITE[ntype], rows=chunk, version=version).consume()


def mark_edges(tx, rows: list[dict]) -> None:
    """Record on each edge (`{u, i, w, rev}`) the weight and revision the stored state accounts for."""
    by_user = defaultdict(dict)
    for r in rows:
        by_user[r["u"]][r["i"]] = [r["w"], r["rev"]]
    users = [{"u": u, "m": m} for u, m in by_user.items()]
    for chunk in chunks(users, 1000):
        tx.run(cypher.MARK_EDGES, rows=chunk).consume()


def mark_edges_changed(tx, rows: list[dict]) -> None:
    """Like `mark_edges` for changed edges (`{e, u, i, w, rev}`), keeping in `ig_wi` the weight the
    items' last-layer sums still hold."""
    for chunk in chunks(rows, 5000):
        tx.run(cypher.MARK_EDGES_CHANGED, rows=chunk).consume()


def mark_pending(tx, users: list[dict], items: list[dict]) -> None:
    """Flag users (`{id, hs}`) and items (`{id, scratch}`) whose items' side is still due."""
    for query, rows in ((cypher.MARK_USERS_PENDING, users), (cypher.MARK_ITEMS_PENDING, items)):
        for chunk in chunks(rows, 5000):
            tx.run(query, rows=chunk).consume()


def pending(session, users: int, items: int) -> tuple[list[dict], list[dict]]:
    """Up to `users` pending users ({id, degree}) and `items` pending items ({id, scratch})."""
    return ([dict(r) for r in session.run(cypher.PENDING_USERS, limit=users)],
            [dict(r) for r in session.run(cypher.PENDING_ITEMS, limit=items)])


def pending_count(session) -> dict:
    """How many users and items still wait for the items' side of a refresh."""
    return session.run(cypher.PENDING_COUNT).single().data()


def sides(session, ntype: str, ids: list[str], h: str | None) -> dict[str, dict]:
    """Per user (USER_SIDES) or item (ITEM_SIDES): both sides' edge weights and the layer vectors."""
    query = cypher.USER_SIDES if ntype == USER else cypher.ITEM_SIDES
    out = {}
    for chunk in chunks(ids, 2000):
        for r in session.run(query, ids=chunk, h=h):
            out[r["id"]] = dict(r)
    return out


def clear_pending(tx, users: list[str], items: list[str]) -> None:
    """The items' side of these users and these items' embeddings are now up to date.

    Items, then users, each by id: the lock order of the ingest path.
    """
    for chunk in chunks(sorted(items), 5000):
        tx.run(cypher.CLEAR_ITEMS_PENDING, ids=chunk).consume()
    for chunk in chunks(sorted(users), 2000):
        tx.run(cypher.CLEAR_USERS_PENDING, ids=chunk).consume()


def clear_all_pending(tx) -> None:
    """After a full recompute: nothing is pending."""
    tx.run(cypher.CLEAR_ALL_PENDING).consume()


def mark_seen(tx, ntype: str, rows: list[dict]) -> None:
    """Record that the stored state of each node (`{id, rev}`) reflects its revision `rev`."""
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


def advance(tx, mark: int, run: dict, owner: str | None, full_run: str | None = None) -> None:
    """Move the watermark and record the run (with its owner) inside the run's transaction, fenced by
    the lease; `full_run` (the full run's id) also lowers the `full_pending` that run raised."""
    if owner is None:
        raise LeaseLost("writing embeddings needs the refresh lease (no owner given)")
    record = tx.run(cypher.REFRESH_ADVANCE, watermark=mark, run=json.dumps({**run, "owner": owner}),
                    owner=owner, full_run=full_run).single()
    if record["updated"] == 0:
        raise LeaseLost(f"worker {owner} no longer holds the refresh lease")


def changes(session) -> tuple[list[dict], list[dict], list[dict]]:
    """Edges, users and items with a revision not yet reflected (users and items with their `rev`)."""
    edges = [dict(r) for r in session.run(cypher.CHANGED_EDGES)]
    users = [dict(r) for r in session.run(cypher.CHANGED_USERS)]
    items = [dict(r) for r in session.run(cypher.CHANGED_ITEMS)]
    return edges, users, items


def oldest_pending(session) -> int | None:
    """Time stamp (ms) of the oldest change not yet reflected, or None."""
    return session.run(cypher.OLDEST_PENDING).single()["oldest"]


def incident_edges(session, ntype: str, ids: list[str]) -> list[dict]:
    """All edges of the given users or items: dicts {u, i, ig_w}."""
    out = []
    for chunk in chunks(ids, 5000):
        for r in session.run(_EDGES[ntype], ids=chunk):
            own = r["id"]
            if ntype == USER:
                out.extend({"u": own, "i": x, "ig_w": w} for x, w in zip(r["other"], r["ig_w"]))
            else:
                out.extend({"u": x, "i": own, "ig_w": w} for x, w in zip(r["other"], r["ig_w"]))
    return out


def node_state(session, ntype: str, ids: list[str], keys: list[str]) -> dict[str, list]:
    """Stored properties `keys` of the given nodes: id -> values (None where unset)."""
    out = {}
    for chunk in chunks(ids, 5000):
        for r in session.run(_STATE[ntype], ids=chunk, keys=keys):
            out[r["id"]] = r["vals"]
    return out


def node_count(session) -> int:
    """Users plus items (count store lookups, no scan)."""
    record = session.run(cypher.NODE_COUNT).single()
    return record["users"] + record["items"]
