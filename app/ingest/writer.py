"""The Neo4j side of ingest: idempotent event + edge writes, item upserts, erasure, counters."""
from __future__ import annotations

import math
import random
from collections import Counter, defaultdict

from neo4j.exceptions import ClientError

from app import cypher
from app.db import timed
from app.ids import erasure_key

STATS_SHARDS = 16


def aggregate(events: list[dict]) -> list[dict]:
    """Pre-aggregate new events into one row per (user, item), sorted to keep lock order stable."""
    groups = defaultdict(list)
    for e in events:
        groups[(e["u"], e["i"])].append(e)
    rows = []
    for (u, i), evs in sorted(groups.items()):
        rows.append({
            "u": u, "i": i,
            # fsum is correctly rounded, so the row's sum does not depend on event order.
            "w": math.fsum(e["w"] for e in evs),
            "qty": math.fsum(e["qty"] for e in evs),
            "first": min(e["ts"] for e in evs),
            "last": max(e["ts"] for e in evs),
            "n": dict(Counter("n_" + e["type"] for e in evs)),
        })
    return rows


class _ErasedMeanwhile(Exception):
    """An erasure of one of the transaction's users committed after the transaction read the erasures."""


def _erased(tx, keys: list[str]) -> dict[str, int]:
    """Erasure key -> when that user was erased, for the erased ones of `keys`."""
    return {r["k"]: r["at"] for r in tx.run(cypher.ERASED_BEFORE, keys=keys)} if keys else {}


def _write_tx(tx, parts: list[tuple[list[dict], dict]], secret: str) -> list[int]:
    """One transaction for several batches: claim unseen ids, add them to edges, bump counters.

    The first batch (then the first event) holding an id wins it. Ids are claimed with MERGE, which
    waits for a concurrent claimer and cannot fail. Everything happens inside `tx`, so the driver
    may re-run it after a transient error.
    """
    # Events that happened before their user was erased are claimed (a retry is a plain duplicate) but
    # add nothing, so a retried old event never brings an erased user back, even after its id left the
    # retention window.
    hashed = {e["u"]: erasure_key(secret, e["u"]) for events, _ in parts for e in events}
    keys = sorted(set(hashed.values()))
    erased = _erased(tx, keys)
    dropped = {e["id"] for events, _ in parts for e in events if erased.get(hashed[e["u"]], -1) >= e["ts"]}
    ids = sorted({e["id"] for events, _ in parts for e in events})
    created = set(tx.run(cypher.INGEST_CLAIM_EVENTS, ids=ids).single()["new"]) if ids else set()
    claimed = (set(ids) - created) | dropped
    new, accepted, totals = [], [], Counter()
    for events, counts in parts:
        mine = []
        for e in events:
            if e["id"] not in claimed:
                claimed.add(e["id"])
                mine.append(e)
        new += mine
        accepted.append(len(mine))
        totals.update({**counts, "accepted": len(mine),
                       "duplicates": counts.get("duplicates", 0) + len(events) - len(mine)})
    totals = {k: v for k, v in totals.items() if v}
    if new or totals:
        rows = aggregate(new)
        tx.run(cypher.INGEST_WRITE, rows=rows, items=sorted({r["i"] for r in rows}), shard=random.randrange(STATS_SHARDS),
               counts=totals).consume()
    # The write holds every written user's key (USER_DELETE takes it too), so no erasure of them can
    # commit from here to our commit; one that committed since the first read is seen now.
    if new and _erased(tx, keys) != erased:
        raise _ErasedMeanwhile()
    return accepted


ENTITY_NOT_FOUND = "Neo.ClientError.Statement.EntityNotFound"


def write_batches(driver, database: str, parts: list[tuple[list[dict], dict]],
                  timeout: float | None = None, *, secret: str) -> list[int]:
    """Commit several (events, counts) batches in one transaction (aborted by Neo4j after `timeout` s);
    return how many of each were new. `secret`: IG_ERASURE_SECRET, to find erased users.

    A user erased while this transaction waited for its lock makes Neo4j fail it with EntityNotFound,
    which the driver does not retry, or commits before this transaction's write of the user: either
    way the transaction is rolled back whole (event claims included) and run again, which drops the
    user's events from before the erasure and writes the later ones to a new user node.
    """
    work = timed(_write_tx, timeout) if timeout else _write_tx
    for attempt in range(3):
        try:
            with driver.session(database=database) as session:
                return session.execute_write(work, parts, secret)
        except (ClientError, _ErasedMeanwhile) as exc:
            if (isinstance(exc, ClientError) and exc.code != ENTITY_NOT_FOUND) or attempt == 2:
                raise


def write_events(driver, database: str, events: list[dict], counts: dict, *, secret: str) -> int:
    """Commit events and their counters in their own transaction; return how many were new."""
    return write_batches(driver, database, [(events, counts)], secret=secret)[0]


def read_stats(driver, database: str, timeout: float | None = None) -> dict:
    """The persisted counters summed over their shards (read within `timeout` s)."""
    def work(tx):
        return [r["counts"] for r in tx.run(cypher.INGEST_STATS)]
    with driver.session(database=database) as session:
        records = session.execute_read(timed(work, timeout) if timeout else work)
    total = Counter()
    for record in records:
        total.update({k: v for k, v in record.items() if k != "shard"})
    return dict(total)


def upsert_items(driver, database: str, rows: list[dict]) -> int:
    """Upsert item metadata rows ({"id", "props"}); return how many items changed."""
    rows = sorted(rows, key=lambda r: r["id"])
    with driver.session(database=database) as session:
        return session.execute_write(lambda tx: tx.run(cypher.ITEM_UPSERT, rows=rows).single()["changed"])


def delete_user(driver, database: str, user_id: str, *, secret: str) -> int:
    """Erase a user, its edges and its id in the serving log (keeping a keyed record); return how many items changed."""
    def erase(tx):
        record = tx.run(cypher.USER_DELETE, id=user_id).single()
        tx.run(cypher.USER_ERASED, key=erasure_key(secret, user_id), id=user_id).consume()
        return record["items"] if record else 0
    with driver.session(database=database) as session:
        return session.execute_write(erase)


def purge_event_ids(driver, database: str, retention_days: float, batch: int, max_batches: int) -> int:
    """Delete event ids claimed longer than `retention_days` ago, `batch` per transaction; return how many."""
    window_ms = int(retention_days * 86_400_000)
    deleted = 0
    with driver.session(database=database) as session:
        for _ in range(max_batches):
            n = session.execute_write(
                lambda tx: tx.run(cypher.EVENT_PURGE, window_ms=window_ms, batch=batch).single()["deleted"])
            deleted += n
            if n < batch:
                break
    return deleted


def interacted_edges(driver, database: str) -> int:
    """Number of INTERACTED edges (the demo loader runs only on an empty graph)."""
    with driver.session(database=database) as session:
        return session.execute_read(lambda tx: tx.run(cypher.INTERACTED_EDGE_COUNT).single()["n"])
