"""The Neo4j side of ingest: idempotent event + edge writes, item upserts, erasure, counters."""
from __future__ import annotations

import math
import random
from collections import Counter, defaultdict

from app import cypher

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


def _write_tx(tx, events: list[dict], counts: dict) -> int:
    """One transaction: claim event ids, add only the new ones to edges, bump counters.

    Everything it does happens inside `tx`, so the driver may re-run it after a deadlock.
    """
    new_ids = set(tx.run(cypher.INGEST_MERGE_EVENTS, ids=[e["id"] for e in events]).single()["new"]) \
        if events else set()
    rows = aggregate([e for e in events if e["id"] in new_ids])
    if rows:
        tx.run(cypher.INGEST_UPSERT_EDGES, rows=rows, items=sorted({r["i"] for r in rows})).consume()
    totals = {k: v for k, v in {**counts, "accepted": len(new_ids),
                                "duplicates": counts.get("duplicates", 0) + len(events) - len(new_ids)}.items() if v}
    if totals:
        # Counters last: the shard lock is then held only while the transaction commits.
        tx.run(cypher.INGEST_COUNT, shard=random.randrange(STATS_SHARDS), counts=totals).consume()
    return len(new_ids)


def write_events(driver, database: str, events: list[dict], counts: dict) -> int:
    """Commit events (sorted by id) and their counters; return how many were new."""
    events = sorted(events, key=lambda e: e["id"])
    with driver.session(database=database) as session:
        return session.execute_write(_write_tx, events, counts)


def read_stats(driver, database: str) -> dict:
    """The persisted counters summed over their shards."""
    with driver.session(database=database) as session:
        records = session.execute_read(lambda tx: [r["counts"] for r in tx.run(cypher.INGEST_STATS)])
    total = Counter()
    for record in records:
        total.update({k: v for k, v in record.items() if k != "shard"})
    return dict(total)


def upsert_items(driver, database: str, rows: list[dict]) -> int:
    """Upsert item metadata rows ({"id", "props"}); return how many items changed."""
    rows = sorted(rows, key=lambda r: r["id"])
    with driver.session(database=database) as session:
        return session.execute_write(lambda tx: tx.run(cypher.ITEM_UPSERT, rows=rows).single()["changed"])


def delete_user(driver, database: str, user_id: str) -> int:
    """Erase a user and its edges; return how many items were marked changed."""
    with driver.session(database=database) as session:
        record = session.execute_write(lambda tx: tx.run(cypher.USER_DELETE, id=user_id).single())
    return record["items"] if record else 0


def interacted_edges(driver, database: str) -> int:
    """Number of INTERACTED edges (the demo loader runs only on an empty graph)."""
    with driver.session(database=database) as session:
        return session.execute_read(lambda tx: tx.run(cypher.INTERACTED_EDGE_COUNT).single()["n"])
