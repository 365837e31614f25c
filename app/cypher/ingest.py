"""Cypher of ingest and erasure: events onto edges, item metadata, deletion of a user."""

# MERGE on the unique Event id locks the id, so a concurrent claimer waits, then matches.
# `_new` marks the events this transaction created; it is removed before commit. (An optimistic
# check-then-CREATE was cheaper but, under racing writers, now and then hung for minutes before
# failing on the constraint.)
INGEST_CLAIM_EVENTS = """
UNWIND $ids AS id
MERGE (ev:Event {id: id})
ON CREATE SET ev._new = true, ev.at = timestamp()
WITH id, ev WHERE ev._new
REMOVE ev._new
RETURN collect(id) AS new
"""

# The rest of the transaction, one statement: add the new events to edges, bump a counter shard.
# Locks are taken in one global order, events (sorted, by INGEST_CLAIM_EVENTS), items (sorted),
# users (rows sorted), counter shard, so concurrent batches queue instead of deadlocking.
# An Event keeps only its id and claim time: nothing that leads back to a user, and cheap to write.
# Rows are pre-aggregated per (user, item) in Python; min/max and sums keep it order independent.
INGEST_WRITE = """
UNWIND $items AS id
MERGE (i:Item {id: id}) ON CREATE SET i.changed_at = timestamp(), i.rev = 1, i.ig_unseen = true
SET i._lock = true
REMOVE i._lock
WITH count(*) AS locked
UNWIND $rows AS row
MATCH (i:Item {id: row.i})
MERGE (u:User {id: row.u})
  ON CREATE SET u.changed_at = timestamp(), u.rev = 1, u.ig_unseen = true, u.nonce = randomUUID()
MERGE (u)-[r:INTERACTED]->(i)
WITH r, row, coalesce(r.w, 0.0) AS w0
// A sum that cancels to float rounding of its parts (a return of what was bought) is exactly 0.
SET r.w = CASE WHEN abs(w0 + row.w) <= 1e-12 * (abs(w0) + abs(row.w)) THEN 0.0 ELSE w0 + row.w END,
    r.qty = coalesce(r.qty, 0.0) + row.qty,
    r.first_ts = CASE WHEN r.first_ts <= row.first THEN r.first_ts ELSE row.first END,
    r.last_ts = CASE WHEN r.last_ts >= row.last THEN r.last_ts ELSE row.last END,
    r.changed_at = timestamp(),
    r.rev = coalesce(r.rev, 0) + 1,
    r.ig_unseen = true
FOREACH (k IN keys(row.n) | SET r[k] = coalesce(r[k], 0) + row.n[k])
WITH count(*) AS edges
MERGE (s:_IngestStats {shard: $shard})
FOREACH (k IN keys($counts) | SET s[k] = coalesce(s[k], 0) + $counts[k])
"""

# Erasure records of a batch's users (keys hashed as in app/ids.py); their older events are dropped.
ERASED_BEFORE = "UNWIND $keys AS k MATCH (x:_Erased {key: k}) RETURN k, x.at AS at"

# Expired event ids, a bounded batch per transaction; an id older than the window is no longer
# recognised as a duplicate (the documented contract of IG_DEDUP_RETENTION_DAYS).
EVENT_PURGE = """
MATCH (e:Event) WHERE e.at < timestamp() - $window_ms
WITH e LIMIT $batch
DELETE e
RETURN count(*) AS deleted
"""

EVENT_ID_COUNT = "MATCH (e:Event) RETURN count(e) AS n"

# Counters live on a few shard nodes (INGEST_WRITE bumps one) so concurrent writers rarely wait.
INGEST_STATS = "MATCH (s:_IngestStats) RETURN properties(s) AS counts"

# Only properties whose value differs mark the item as changed for the refresh job (a new
# revision). `SET i += ...` has locked the item, so the `rev` read after it is the latest.
ITEM_UPSERT = """
UNWIND $rows AS row
MERGE (i:Item {id: row.id})
ON CREATE SET i.changed_at = timestamp(), i._new = true
WITH i, row, i._new IS NOT NULL OR any(k IN keys(row.props) WHERE i[k] IS NULL OR i[k] <> row.props[k]) AS changed
SET i += row.props
REMOVE i._new
FOREACH (_ IN CASE WHEN changed THEN [1] ELSE [] END |
  SET i.changed_at = timestamp() SET i.rev = coalesce(i.rev, 0) + 1, i.ig_unseen = true)
RETURN count(CASE WHEN changed THEN 1 END) AS changed
"""

# Erasure: every item the user touched loses an edge, so it gets a new revision before the delete
# (the refresh rebuilds its sums from its remaining edges). Locks in ingest's order: the items known
# now, then the user's id, taken by MERGE even when no such user exists, so that an ingest writing
# the user either commits first (its edges go now: the items are read again after it) or waits and
# then finds the erasure's record (app/ingest/writer.py). A refresh run writing the user holds it
# too, so its serving log entry is committed (and cleaned by USER_ERASED) before the erasure goes on.
USER_DELETE = """
OPTIONAL MATCH (:User {id: $id})--(i:Item)
WITH collect(DISTINCT i) AS known
FOREACH (i IN known | SET i._lock = true REMOVE i._lock)
MERGE (u:User {id: $id})
WITH u
OPTIONAL MATCH (u)--(i:Item)
WITH u, collect(DISTINCT i) AS items
FOREACH (i IN items | SET i.changed_at = timestamp() SET i.rev = coalesce(i.rev, 0) + 1, i.ig_unseen = true)
WITH u, items, u.churn_score IS NOT NULL AS scored
DETACH DELETE u
WITH items, scored
// a scored user's erasure changes the churn scores' stamp (CHURN_STAMP): the API's kept top list goes
OPTIONAL MATCH (r:ChurnRun {id: 'current'}) WHERE scored
SET r.erased = r.erased + 1
RETURN size(items) AS items
"""

# The erasure's record, keyed by a keyed hash (same transaction): later events of the key from before
# now are dropped. The id leaves the serving log's entries too (the copies find the erasure by key).
USER_ERASED = """
MERGE (x:_Erased {key: $key}) SET x.at = timestamp()
WITH x
MATCH (a:_Applied) WHERE $id IN a.users
SET a.users = [u IN a.users WHERE u <> $id]
"""

INTERACTED_EDGE_COUNT = "MATCH ()-[r:INTERACTED]->() RETURN count(r) AS n"

LATEST_EVENT_TS = """
MATCH ()-[r:INTERACTED]->()
RETURN max(r.last_ts) AS latest
"""
