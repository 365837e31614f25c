"""Every Cypher statement the service runs, as named, parameterised constants."""

# --- migrations -------------------------------------------------------------
MIGRATIONS_APPLIED = """
MATCH (m:_Migration)
RETURN m.version AS version, m.checksum AS checksum, toString(m.applied_at) AS applied_at
ORDER BY version
"""

MIGRATION_RECORD = """
CREATE (:_Migration {version: $version, description: $description, checksum: $checksum,
                     file: $file, applied_at: datetime()})
"""

# The vector indexes' size, and their rebuild at another one (V006's statements, with the old vectors).
VECTOR_INDEX_SIZES = """
SHOW VECTOR INDEXES YIELD name, options
WHERE name IN ['user_embedding', 'item_embedding']
RETURN name, options.indexConfig['vector.dimensions'] AS dim
"""

VECTOR_INDEX_REBUILD = [
    "DROP INDEX user_embedding IF EXISTS",
    "DROP INDEX item_embedding IF EXISTS",
    "MATCH (n:User|Item) WHERE n.embedding IS NOT NULL "
    "CALL { WITH n REMOVE n.embedding, n.embedding_version } IN TRANSACTIONS OF 10000 ROWS",
    """CREATE VECTOR INDEX user_embedding IF NOT EXISTS FOR (u:User) ON (u.embedding)
OPTIONS {indexConfig: {`vector.dimensions`: $embed_dim, `vector.similarity_function`: 'cosine',
                       `vector.hnsw.m`: 16, `vector.hnsw.ef_construction`: 32}}""",
    """CREATE VECTOR INDEX item_embedding IF NOT EXISTS FOR (i:Item) ON (i.embedding)
OPTIONS {indexConfig: {`vector.dimensions`: $embed_dim, `vector.similarity_function`: 'cosine',
                       `vector.hnsw.m`: 16, `vector.hnsw.ef_construction`: 32}}""",
]

# --- health -----------------------------------------------------------------
PING = "RETURN 1 AS ok"

# --- embeddings: export, state write-back, models --------------------------
SERVER_TIME = "RETURN timestamp() AS now"

# `rev`: the node revision the export reflects, recorded by the full run as what it has seen.
# `nonce`: drawn when the user node is created (INGEST_WRITE; '' for nodes older than it). Revisions
# restart at 1 on a node created again after an erasure, so every write and mark of the full run
# also matches the nonce: what it computed for an erased user never lands on a new one of that id.
EXPORT_USERS = "MATCH (u:User) RETURN u.id AS id, coalesce(u.rev, 0) AS rev, coalesce(u.nonce, '') AS nonce"

EXPORT_ITEMS = """
MATCH (i:Item)
RETURN i.id AS id, i.category AS category, i.price AS price, i.title AS title, coalesce(i.rev, 0) AS rev
"""

# Grouped by user; coalesce keeps the three lists aligned (collect skips nulls).
EXPORT_EDGES = """
MATCH (u:User)-[r:INTERACTED]->(i:Item)
RETURN u.id AS u, coalesce(u.nonce, '') AS nonce, collect(i.id) AS items, collect(coalesce(r.w, 0.0)) AS w,
       collect(coalesce(r.rev, 0)) AS rev
"""

# `row.props` holds embedding and refresh state (ig_h*, ig_a*, ig_deg): keys are fixed by the model's
# layer count, values are parameters, so the statement stays parameterised.
# A user whose vector moved under the same version also records how far (cosine distance 1 - cos,
# from Neo4j's (1 + cos) / 2) and when, in two parallel lists of at most $history entries (what
# GET /v1/users/<id>/interests and the churn reasons show). Moves below Neo4j's float32 cosine
# resolution (a full recompute of an unchanged user) are not recorded. History is extra data: it
# never enters the embedding.
WRITE_USERS = """
UNWIND $rows AS row
MATCH (n:User {id: row.id}) WHERE coalesce(n.nonce, '') = row.nonce
WITH n, row, n.embedding AS old, n.embedding_version = $version AS same
SET n += row.props, n.embedding_version = $version, n.embedding_updated_at = datetime()
WITH n, CASE WHEN same AND old IS NOT NULL AND n.embedding IS NOT NULL
             THEN 2 * (1 - vector.similarity.cosine(old, n.embedding)) END AS drift
WHERE $history > 0 AND drift > 1e-6
SET n.ig_drift = (coalesce(n.ig_drift, []) + drift)[-$history..],
    n.ig_drift_at = (coalesce(n.ig_drift_at, []) + timestamp())[-$history..]
"""

WRITE_ITEMS = """
UNWIND $rows AS row
MATCH (n:Item {id: row.id})
SET n += row.props, n.embedding_version = $version, n.embedding_updated_at = datetime()
"""

# ig_rev is the edge revision the stored state accounts for. One row per user with a map item id ->
# rev: one expand per user instead of one per edge (matching each edge by both ids re-scans a heavy
# user's edges for every one of them). `ig_unseen` (set by every writer) goes only if no newer
# revision committed: the SET has locked the edge, so `r.rev` read after it is the latest. An edge
# lives and dies with its user, so the user's nonce tells an edge created again apart too.
MARK_EDGES = """
UNWIND $rows AS row
MATCH (u:User {id: row.u}) WHERE coalesce(u.nonce, '') = row.nonce
MATCH (u)-[r:INTERACTED]->(i:Item)
WITH r, row.m[i.id] AS rev WHERE rev IS NOT NULL
SET r.ig_rev = rev
WITH r, rev WHERE r.rev = rev
REMOVE r.ig_unseen
"""

# Edges are found by the element id the change query returned (a run changes few edges of a user, so
# expanding all of a heavy user's edges cost more), checked against both ids in case of reuse.
MARK_EDGES_CHANGED = """
UNWIND $rows AS row
MATCH ()-[r:INTERACTED]->() WHERE elementId(r) = row.e
WITH r, row WHERE startNode(r).id = row.u AND endNode(r).id = row.i
SET r.ig_rev = row.rev
WITH r, row WHERE r.rev = row.rev
REMOVE r.ig_unseen
"""

# An item's degree (sum of its positive raw edge weights), summed again over all its edges rather
# than kept by differences, so weights that cancel leave exactly 0 and no float residue; returns the
# items the version has not embedded yet (brand-new ones), which the same transaction then embeds.
ITEM_DEGREES = """
UNWIND $ids AS id
MATCH (i:Item {id: id})
CALL {
  WITH i
  MATCH (i)<-[r:INTERACTED]-()
  RETURN sum(CASE WHEN r.w > 0 THEN r.w ELSE 0.0 END) AS d
}
SET i.ig_deg = d
WITH i WHERE coalesce(i.embedding_version, '') <> $version
RETURN collect(i.id) AS unembedded
"""

# `ig_rev`: the node revision the stored state accounts for; `ig_unseen` goes as in MARK_EDGES.
MARK_USERS_SEEN = """
UNWIND $rows AS row
MATCH (n:User {id: row.id}) WHERE coalesce(n.nonce, '') = row.nonce
SET n.ig_rev = row.rev
WITH n, row WHERE coalesce(n.rev, 0) = row.rev
REMOVE n.ig_unseen
"""

MARK_ITEMS_SEEN = """
UNWIND $rows AS row
MATCH (n:Item {id: row.id})
SET n.ig_rev = row.rev
WITH n, row WHERE coalesce(n.rev, 0) = row.rev
REMOVE n.ig_unseen
"""

# `scale` and `item_norm` are what Cypher needs to turn stored vectors back into scores (app/embeddings/state.py).
# A fine-tuned version also records the version it was tuned from, on what (JSON) and its check (JSON);
# null for a full training.
MODEL_CREATE = """
CREATE (m:Model {version: $version, trained_at: datetime($trained_at), metrics: $metrics,
                 config: $config, path: $path, ref_ms: $ref_ms, scale: $scale, item_norm: $item_norm,
                 fine_tuned_from: $fine_tuned_from, tuned_on: $tuned_on, check: $check, search: $search,
                 current: false})
"""

# The latest fine-tunes, kept or refused (a refused one stays a non-current version with its check).
MODEL_FINE_TUNES = """
MATCH (m:Model) WHERE m.fine_tuned_from IS NOT NULL
RETURN m.version AS version, m.fine_tuned_from AS fine_tuned_from, toString(m.trained_at) AS trained_at,
       m.tuned_on AS tuned_on, m.check AS check, m.current AS current
ORDER BY m.trained_at DESC LIMIT $limit
"""

MODEL_SET_CURRENT = """
MATCH (m:Model)
SET m.current = (m.version = $version)
"""

MODEL_BY_VERSION = "MATCH (m:Model {version: $version}) RETURN m.path AS path"

MODEL_CURRENT = """
MATCH (m:Model {current: true})
RETURN m.version AS version, m.path AS path, m.ref_ms AS ref_ms, toString(m.trained_at) AS trained_at,
       m.metrics AS metrics, m.scale AS scale, m.item_norm AS item_norm, m.fine_tuned_from AS fine_tuned_from,
       m.tuned_on AS tuned_on, m.check AS check
"""

# Edges with the time each was first seen (streaming learning's windows).
EXPORT_EDGE_TIMES = """
MATCH (u:User)-[r:INTERACTED]->(i:Item)
RETURN u.id AS u, coalesce(u.nonce, '') AS nonce, collect(i.id) AS items, collect(coalesce(r.w, 0.0)) AS w,
       collect(coalesce(r.rev, 0)) AS rev, collect(coalesce(r.first_ts, 0)) AS first
"""

# --- refresh: change detection and the L-hop pull ---------------------------
# Edges, users and items are tracked alike: every writer bumps `rev` and sets `ig_unseen`; the
# refresh records the revision its stored state accounts for in `ig_rev` and removes `ig_unseen`
# once nothing newer committed (MARK_*). A change is found however late it commits after its
# `changed_at` (no clock, no margin). Each query must seek the `ig_unseen` index (V005), which holds
# only what is not yet reflected: a scan makes every run O(graph). The planner scans edges unless
# told, and may scan even this small index under an aggregation, hence the SEEK hints.
CHANGED_EDGES = """
MATCH (u:User)-[r:INTERACTED]->(i:Item) USING INDEX SEEK r:INTERACTED(ig_unseen)
WHERE r.ig_unseen = true AND r.rev - coalesce(r.ig_rev, -1) > 0
RETURN u.id AS u, i.id AS i, r.rev AS rev, elementId(r) AS e, coalesce(r.changed_at, 0) AS at
"""

CHANGED_USERS = """
MATCH (n:User) USING INDEX SEEK n:User(ig_unseen)
WHERE n.ig_unseen = true AND n.rev - coalesce(n.ig_rev, 0) > 0
RETURN n.id AS id, n.rev AS rev, coalesce(n.nonce, '') AS nonce, coalesce(n.changed_at, 0) AS at,
       n.ig_rev IS NULL AS new
"""

CHANGED_ITEMS = """
MATCH (n:Item) USING INDEX SEEK n:Item(ig_unseen)
WHERE n.ig_unseen = true AND n.rev - coalesce(n.ig_rev, 0) > 0
RETURN n.id AS id, n.rev AS rev, n.changed_at AS at, n.category AS category, n.price AS price, n.title AS title
"""

OLDEST_PENDING = """
CALL {
  MATCH ()-[r:INTERACTED]->() USING INDEX SEEK r:INTERACTED(ig_unseen)
  WHERE r.ig_unseen = true AND r.rev - coalesce(r.ig_rev, -1) > 0
  RETURN min(r.changed_at) AS at
  UNION ALL
  MATCH (n:User) USING INDEX SEEK n:User(ig_unseen)
  WHERE n.ig_unseen = true AND n.rev - coalesce(n.ig_rev, 0) > 0
  RETURN min(n.changed_at) AS at
  UNION ALL
  MATCH (n:Item) USING INDEX SEEK n:Item(ig_unseen)
  WHERE n.ig_unseen = true AND n.rev - coalesce(n.ig_rev, 0) > 0
  RETURN min(n.changed_at) AS at
}
RETURN min(at) AS oldest
"""

# Edges of the given users with their raw weights and nonce (every existing user, erased ones not
# at all); one record per node (the driver's per-record cost dominated); the CASE keeps the lists aligned.
USER_EDGES = """
UNWIND $ids AS id
MATCH (u:User {id: id})
OPTIONAL MATCH (u)-[r:INTERACTED]->(i:Item)
RETURN id, coalesce(u.nonce, '') AS nonce, collect(i.id) AS other, collect(CASE WHEN r IS NOT NULL THEN coalesce(r.w, 0.0) END) AS w
"""

NODE_COUNT = """
CALL { MATCH (u:User) RETURN count(u) AS users }
CALL { MATCH (i:Item) RETURN count(i) AS items }
RETURN users, items
"""

# A read: before the first run there is no node, hence no watermark, hence a full recompute.
# While `full_pending`, `full_version` is the model version the interrupted full run was writing
# and `full_publish` whether it was to make that version current.
REFRESH_STATE = """
OPTIONAL MATCH (s:_Refresh {key: 'main'})
RETURN s.watermark AS watermark, coalesce(s.full_pending, false) AS full_pending, s.last_run AS last_run,
       s.full_version AS full_version, coalesce(s.full_publish, false) AS full_publish
"""

# Written after LEASE_HELD in the same transaction (fenced). `full_run` names the run, so that only
# that run's last transaction clears the flag.
REFRESH_FULL_PENDING = """
MATCH (s:_Refresh {key: 'main'}) WHERE s.lease_owner = $owner
SET s.full_pending = true, s.full_run = $run_id, s.full_version = $version, s.full_publish = $publish
"""

# Fenced by the lease: a worker that lost it cannot move the watermark (the transaction is rolled back).
# Only the full run that raised `full_pending` ($full_run) lowers it; an incremental run passes null.
REFRESH_ADVANCE = """
MATCH (s:_Refresh {key: 'main'}) WHERE s.lease_owner = $owner
SET s.watermark = $watermark, s.last_run = $run,
    s.full_pending = CASE WHEN s.full_run = $full_run THEN false ELSE s.full_pending END,
    s.recent = ([$run] + coalesce(s.recent, []))[0..20]
RETURN count(s) AS updated
"""

# --- the serving log: what each run changed, for the API's in-process graph (app/serving/graph.py) --
# Every run also numbers itself (`seq`, under an `epoch` drawn once per graph, so a wiped graph never
# reuses a number) and records the users and items it recomputed, in the same fenced transaction:
# a process that has applied run n knows exactly which rows to re-read to reach run n + 1. A full
# run records `full` (re-read everything). Only the last $keep entries stay. Users erased meanwhile
# are left out (an erasure waiting for a user this run wrote takes the id out of the entry after it).
APPLIED_LOG = """
MATCH (s:_Refresh {key: 'main'})
SET s.seq = coalesce(s.seq, 0) + 1, s.epoch = coalesce(s.epoch, randomUUID())
CREATE (a:_Applied {seq: s.seq, full: $full, users: [u IN $users WHERE EXISTS { (:User {id: u}) }], items: $items,
                    at: timestamp()})
WITH s
MATCH (old:_Applied) WHERE old.seq <= s.seq - $keep
DELETE old
"""

SERVING_STATE = """
OPTIONAL MATCH (s:_Refresh {key: 'main'})
RETURN s.epoch AS epoch, coalesce(s.seq, 0) AS seq, timestamp() AS now
"""

APPLIED_SINCE = """
MATCH (a:_Applied) WHERE a.seq > $seq
RETURN a.seq AS seq, a.full AS full, a.users AS users, a.items AS items ORDER BY seq
"""

# Every edge, one record per user: the positive ones feed the graph filter, all of them are the
# user's seen items; with when the user's stored vector was last written, and when each edge was
# first seen if `$first` (a version that reads the items' trend; else an empty list, nothing to ship).
SERVING_EDGES = """
MATCH (u:User)-[r:INTERACTED]->(i:Item)
RETURN u.id AS u, collect(i.id) AS items, collect(coalesce(r.w, 0.0)) AS w,
       collect(CASE WHEN $first THEN coalesce(r.first_ts, 0) END) AS first, toString(u.embedding_updated_at) AS refreshed_at
"""

SERVING_USER_EDGES = """
UNWIND $ids AS id
OPTIONAL MATCH (u:User {id: id})
OPTIONAL MATCH (u)-[r:INTERACTED]->(i:Item)
WITH id, u, collect(CASE WHEN r IS NOT NULL THEN [i.id, coalesce(r.w, 0.0), coalesce(r.first_ts, 0)] END) AS e
RETURN id AS u, [x IN e | x[0]] AS items, [x IN e | x[1]] AS w, [x IN e WHERE $first | x[2]] AS first,
       toString(u.embedding_updated_at) AS refreshed_at
"""

# One sync of the API's copy, one round trip: the run Neo4j is at; what ingest wrote from `since`
# (ms) on that no run has reflected yet (the edges themselves, with their revision, so that the copy
# patches rows edge by edge and skips what it has read; and the items whose metadata changed); the
# runs logged after `seq`; and the erasures from `erased_since` (found by time, a few a day: the
# caller gives a margin beyond the longest transaction and skips the ones it applied). Pending
# writes are read before the log: a run committing in between shows in the log.
SERVING_SYNC = """
OPTIONAL MATCH (s:_Refresh {key: 'main'})
WITH s.epoch AS epoch, coalesce(s.seq, 0) AS head, timestamp() AS now
CALL {
  MATCH (u:User)-[r:INTERACTED]->(i:Item) USING INDEX SEEK r:INTERACTED(ig_unseen)
  WHERE r.ig_unseen = true AND r.changed_at >= $since
  RETURN collect([u.id, i.id, r.rev, coalesce(r.w, 0.0), CASE WHEN $first THEN coalesce(r.first_ts, 0) ELSE 0 END]) AS edges
}
CALL {
  MATCH (n:Item) USING INDEX SEEK n:Item(ig_unseen)
  WHERE n.ig_unseen = true AND n.changed_at >= $since
  RETURN collect([n.id, n.rev]) AS items
}
CALL {
  MATCH (a:_Applied) WHERE a.seq > $seq
  WITH a ORDER BY a.seq
  RETURN collect(a {.seq, .full, .users, .items}) AS applied
}
CALL {
  MATCH (x:_Erased) WHERE x.at >= $erased_since
  RETURN collect([x.key, x.at]) AS erased
}
RETURN epoch, head, now, edges, items, applied, erased
"""

_SERVING_ITEM = """RETURN i.id AS id, i.title AS title, i.category AS category, i.price AS price,
       i.embedding_version AS version"""
SERVING_ITEMS = "MATCH (i:Item)\n" + _SERVING_ITEM
SERVING_ITEMS_BY_ID = "UNWIND $ids AS id MATCH (i:Item {id: id})\n" + _SERVING_ITEM


# --- ingest -----------------------------------------------------------------
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
DETACH DELETE u
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

# --- worker: lease and jobs -------------------------------------------------
# `lease_owner` is the fencing token every write of embeddings checks (LEASE_HELD). Whoever takes
# the lease from someone else (or from nobody) writes the fresh token `$fresh`: a token never comes
# back, so a run begun under an earlier tenure stays fenced out even when its process gets the lease
# again. Our own token is kept while nobody else took the lease, lapsed or not. Each statement
# locks the node before reading the lease (`_lock`), so a takeover and a fenced write are ordered.
LEASE_ACQUIRE = """
MERGE (s:_Refresh {key: 'main'})
SET s._lock = true
REMOVE s._lock
WITH s, timestamp() AS now
WHERE s.lease_owner IS NULL OR s.lease_owner = $owner OR s.lease_until < now
SET s.lease_owner = CASE WHEN s.lease_owner = $owner THEN $owner ELSE $fresh END, s.lease_until = now + $ttl_ms
RETURN s.lease_owner AS owner
"""

# The first statement of every fenced transaction: it holds the lock until commit, so the lease
# cannot change hands while the transaction's writes are pending.
LEASE_HELD = """
MATCH (s:_Refresh {key: 'main'})
SET s._lock = true
REMOVE s._lock
RETURN s.lease_owner = $owner AS held
"""

LEASE_RELEASE = """
MATCH (s:_Refresh {key: 'main'}) WHERE s.lease_owner = $owner
SET s.lease_until = 0
"""

# A read (it runs on every /metrics scrape): before the first run every field is null.
REFRESH_STATUS = """
OPTIONAL MATCH (s:_Refresh {key: 'main'})
RETURN s.watermark AS watermark, s.recent AS recent, s.lease_owner AS lease_owner,
       s.lease_until AS lease_until, timestamp() AS now
"""

JOB_CREATE = """
CREATE (j:Job {id: $id, kind: $kind, params: $params, state: 'queued', progress: 0.0,
               created_at: timestamp()})
RETURN j {.*} AS job
"""

JOB_GET = "MATCH (j:Job {id: $id}) RETURN j {.*} AS job"

# Only the lease holder claims or finishes jobs, and only the owner a job runs under finishes it:
# a worker that lost the lease mid-job leaves the job to its successor (requeued or already done).
# Both lock the lease node first, like LEASE_HELD.
JOB_NEXT = """
MATCH (s:_Refresh {key: 'main'})
SET s._lock = true
REMOVE s._lock
WITH s WHERE s.lease_owner = $owner
MATCH (j:Job {state: 'queued'})
WITH j ORDER BY j.created_at LIMIT 1
SET j.state = 'running', j.started_at = timestamp(), j.owner = $owner, j.attempts = coalesce(j.attempts, 0) + 1
RETURN j {.*} AS job
"""

JOB_FINISH = """
MATCH (s:_Refresh {key: 'main'})
SET s._lock = true
REMOVE s._lock
WITH s WHERE s.lease_owner = $owner
MATCH (j:Job {id: $id, state: 'running', owner: $owner})
SET j.state = $state, j.finished_at = timestamp(), j.result = $result, j.error = $error,
    j.progress = CASE $state WHEN 'succeeded' THEN 1.0 ELSE j.progress END
RETURN count(j) AS finished
"""

# Jobs left running by a worker that died go back to the queue when a new worker takes the lease.
JOB_REQUEUE_ORPHANS = """
MATCH (j:Job {state: 'running'}) WHERE j.owner <> $owner
SET j.state = 'queued', j.owner = null
RETURN count(j) AS requeued
"""

# --- serving: InterestSAGE scores from the vector index and the live graph -------------------
# score(u, j) = p_u . q_j + lin(u, j) (graph_models/model.py). The inner product comes back from the
# stored unit vectors as (2 * cosine - 1) * |p_u| * M (app/embeddings/state.py; Neo4j's cosine is
# (1 + cos) / 2). lin is GF-CF's normalised co-occurrence over the paths u-i-v-j of the live graph,
# with the degrees of the last refresh; every weight is scaled by the version's `scale` so that
# intermediate products stay near 1. Two candidate sets hold the exact top k between them: every item
# the filter reaches, and the $n nearest by the index, queried once (all others score p_u . q_j <=
# the $n-th's, returned as `floor` so the caller can widen $n when the k-th score falls below it;
# null once the index has returned every item). Only items embedded by the user's model version are
# ranked, so an answer never mixes two versions. The item filters ($category, $max_price, null for
# none) and $exclude_seen apply to both sets before the top k is cut; when widening would pass the
# widest index query, the `_SCAN` variants take every item the filters admit as the second set (exact,
# and cheap when the filters are selective: V007 indexes category and price).
_RECOMMEND = """
MATCH (u:User {id: $user_id}) WHERE u.embedding IS NOT NULL
MATCH (m:Model {version: u.embedding_version})
CALL {
  WITH u
  %(nearest)s
}
CALL {
  WITH u, m
  MATCH (u)-[a:INTERACTED]->(i:Item) WHERE a.w > 0 AND i.ig_deg > 0
  // a second clause, so that v may be u itself (one pattern would keep b from being a): that path
  // counts in lin for the user's own items, which `exclude_seen=false` ranks
  MATCH (i)<-[b:INTERACTED]-(v:User) WHERE b.w > 0 AND v.ig_deg > 0
  WITH m, v, sum(a.w * m.scale * b.w * m.scale / sqrt(i.ig_deg * m.scale)) AS t
  WITH m, v, t / (v.ig_deg * m.scale) AS z
  MATCH (v)-[c:INTERACTED]->(j:Item) WHERE c.w > 0 AND j.ig_deg > 0
  WITH m, j, sum(z * c.w * m.scale) AS t
  RETURN j, t / sqrt(j.ig_deg * m.scale) AS lin
  UNION
  WITH nearest
  UNWIND nearest AS j
  RETURN j, 0.0 AS lin
}
WITH u, m, farthest, j, sum(lin) AS lin
WHERE j.embedding_version = u.embedding_version
  AND ($category IS NULL OR j.category = $category) AND ($max_price IS NULL OR j.price <= $max_price)
  AND (NOT $exclude_seen OR NOT EXISTS { (u)-[:INTERACTED]->(j) })
WITH u, m, farthest, j,
     lin + (2 * vector.similarity.cosine(u.embedding, j.embedding) - 1) * u.ig_norm * m.item_norm AS score
ORDER BY score DESC LIMIT $k
WITH u, m, farthest, collect({item_id: j.id, score: score, title: j.title, category: j.category,
                              price: j.price}) AS results
RETURN results, u.embedding_version AS version, toString(u.embedding_updated_at) AS refreshed_at,
       (2 * farthest - 1) * u.ig_norm * m.item_norm AS floor
"""

_BY_INDEX = """CALL db.index.vector.queryNodes('item_embedding', $n, u.embedding) YIELD node, score
  RETURN collect(node) AS nearest, CASE WHEN count(node) < $n THEN null ELSE min(score) END AS farthest"""

# Every item the filters admit (the planner seeks the category or price index).
_ADMITTED = """MATCH (node:Item) WHERE ($category IS NULL OR node.category = $category)
    AND ($max_price IS NULL OR node.price <= $max_price)
  RETURN collect(node) AS nearest, null AS farthest"""

RECOMMEND_ITEMS = _RECOMMEND % {"nearest": _BY_INDEX}
RECOMMEND_ITEMS_SCAN = _RECOMMEND % {"nearest": _ADMITTED}

# Why an item is recommended: score(u, j) is a sum over the user's items i (weight a_ui > 0) of
# a_ui * s * (x_i . q_j) (p_u is that weighted sum of x_i) plus i's paths u-i-v-j of lin; each item's
# part is its contribution, and the parts of all of u's items add up to the score. The $top largest
# per recommended item, with the user's weight at the version's reference time (a_ui * s).
EXPLAIN_ITEMS = """
MATCH (u:User {id: $user_id})
MATCH (m:Model {version: u.embedding_version})
MATCH (j:Item) WHERE j.id IN $item_ids
WITH u, m, collect(j) AS targets
MATCH (u)-[a:INTERACTED]->(i:Item) WHERE a.w > 0
WITH m, targets, collect({i: i, w: a.w * m.scale}) AS mine
CALL {
  // lin's paths i-v-j, walked once from the user's items and grouped by the middle user v (separate
  // clauses, so v may be u and j may be i, as in RECOMMEND_ITEMS)
  WITH m, targets, mine
  UNWIND mine AS own
  WITH m, targets, own.i AS i, own.w AS w WHERE i.ig_deg > 0
  MATCH (i)<-[b:INTERACTED]-(v:User) WHERE b.w > 0 AND v.ig_deg > 0
  WITH m, targets, v, collect({i: i, w: w, z: w / sqrt(i.ig_deg * m.scale) * b.w * m.scale / (v.ig_deg * m.scale)}) AS via
  MATCH (v)-[c:INTERACTED]->(j:Item) WHERE c.w > 0 AND j.ig_deg > 0 AND j IN targets
  UNWIND via AS f
  RETURN f.i AS i, f.w AS w, j, f.z * c.w * m.scale / sqrt(j.ig_deg * m.scale) AS part
  UNION ALL
  // the inner product's part, w_ui s (x_i . q_j), for every pair
  WITH m, targets, mine
  UNWIND mine AS own
  UNWIND targets AS j
  WITH m, own.i AS i, own.w AS w, j
  RETURN i, w, j, CASE WHEN i.ig_x IS NULL THEN 0.0
                       ELSE w * (2 * vector.similarity.cosine(i.ig_x, j.embedding) - 1) * i.ig_xnorm * m.item_norm END AS part
}
WITH j, i, w, sum(part) AS contribution
ORDER BY contribution DESC
WITH j, collect({item_id: i.id, title: i.title, weight: w, contribution: contribution}) AS parts
RETURN j.id AS item_id, parts[0..$top] AS because
"""

# Trending (cold start): items by time-decayed popularity. An item's degree `ig_deg` (kept by the
# refresh) sums its edges' positive weights, each stored relative to one fixed anchor, so decaying
# them all to any reference time multiplies every item by the same factor: the degree order is the
# decayed-popularity order at any time. The score is the share of the most popular item's.
TRENDING_ITEMS = """
CALL {
  MATCH (top:Item) WHERE top.ig_deg > 0
  RETURN top.ig_deg AS most ORDER BY most DESC LIMIT 1
}
MATCH (j:Item) WHERE j.ig_deg > 0
  AND ($category IS NULL OR j.category = $category) AND ($max_price IS NULL OR j.price <= $max_price)
  AND (NOT $exclude_seen OR NOT EXISTS { (:User {id: $user_id})-[:INTERACTED]->(j) })
WITH j, most ORDER BY j.ig_deg DESC LIMIT $k
RETURN j.id AS item_id, j.ig_deg / most AS score, j.title AS title, j.category AS category, j.price AS price
"""

# Similar items: the same score for a shopper whose only item is i (one unit of weight), i.e.
# "bought i, so also ...": x_i . q_j from the stored `ig_x`, plus lin over the paths i-v-j; the same
# candidate sets, filters and widening as recommendations.
_SIMILAR = """
MATCH (i:Item {id: $item_id}) WHERE i.embedding IS NOT NULL
MATCH (m:Model {version: i.embedding_version})
CALL {
  WITH i
  %(nearest)s
}
CALL {
  WITH i, m
  MATCH (i)<-[b:INTERACTED]-(v:User)
  WHERE b.w > 0 AND i.ig_deg > 0 AND v.ig_deg > 0
  WITH m, v, b.w * m.scale / sqrt(i.ig_deg * m.scale) / (v.ig_deg * m.scale) AS z
  MATCH (v)-[c:INTERACTED]->(j:Item) WHERE c.w > 0 AND j.ig_deg > 0
  WITH m, j, sum(z * c.w * m.scale) AS t
  RETURN j, t / sqrt(j.ig_deg * m.scale) AS lin
  UNION
  WITH nearest
  UNWIND nearest AS j
  RETURN j, 0.0 AS lin
}
WITH i, m, farthest, j, sum(lin) AS lin
WHERE j <> i AND j.embedding_version = i.embedding_version
  AND ($category IS NULL OR j.category = $category) AND ($max_price IS NULL OR j.price <= $max_price)
WITH i, m, farthest, j, lin + CASE WHEN i.ig_x IS NULL THEN 0.0
     ELSE (2 * vector.similarity.cosine(i.ig_x, j.embedding) - 1) * i.ig_xnorm * m.item_norm END AS score
ORDER BY score DESC LIMIT $k
WITH i, m, farthest, collect({item_id: j.id, score: score, title: j.title, category: j.category,
                              price: j.price}) AS results
RETURN results, i.embedding_version AS version,
       CASE WHEN i.ig_x IS NULL THEN 0.0 WHEN farthest IS NULL THEN null
            ELSE (2 * farthest - 1) * i.ig_xnorm * m.item_norm END AS floor
"""

_SIMILAR_BY_INDEX = """WITH i WHERE i.ig_x IS NOT NULL
  CALL db.index.vector.queryNodes('item_embedding', $n, i.ig_x) YIELD node, score
  RETURN collect(node) AS nearest, CASE WHEN count(node) < $n THEN null ELSE min(score) END AS farthest"""

SIMILAR_ITEMS = _SIMILAR % {"nearest": _SIMILAR_BY_INDEX}
SIMILAR_ITEMS_SCAN = _SIMILAR % {"nearest": _ADMITTED}

# Audience (ad targeting): users by cos(p_u, q_j), i.e. p_u . q_j / |p_u|: how much of each user's
# interest points at the item, so heavy shoppers do not crowd out the rest.
ITEM_AUDIENCE = """
MATCH (i:Item {id: $item_id}) WHERE i.embedding IS NOT NULL
CALL db.index.vector.queryNodes('user_embedding', $k * 3, i.embedding) YIELD node AS user, score
WHERE user.embedding_version = i.embedding_version
  AND ($include_known OR NOT EXISTS { (user)-[:INTERACTED]->(i) })
RETURN user.id AS user_id, 2 * score - 1 AS score, i.embedding_version AS version
ORDER BY score DESC LIMIT $k
"""

# Churn risk: silence measured against the user's own rhythm (days since the last event over the
# average gap between their events), for users with a history; drift is 1 - the cosine similarity
# (Neo4j's, (1 + cos) / 2, so drift is in [0, 1]) between the user's vector and the mean vector of
# what sold in the last 30 days of the data (the 200 items with most buyers, ties by id). Drift
# uses only vectors of the current model version, so it never mixes two (null for a user not yet
# embedded under it).
CHURN_RISK = """
CALL {
  MATCH ()-[r:INTERACTED]->() RETURN max(r.last_ts) AS now
}
CALL {
  OPTIONAL MATCH (m:Model {current: true}) RETURN m.version AS version
}
CALL {
  WITH now, version
  MATCH (:User)-[r:INTERACTED]->(i:Item)
  WHERE r.last_ts >= now - 30 * 86400000
  // counted per item first: each item's vector is then read once, not once per edge
  WITH version, i, count(r) AS buyers WHERE i.embedding IS NOT NULL AND i.embedding_version = version
  WITH i, buyers ORDER BY buyers DESC, i.id LIMIT 200
  WITH collect(i.embedding) AS trending
  // their sum, once (the cosine below does not need the mean)
  RETURN CASE WHEN size(trending) > 0 THEN reduce(acc = [x IN trending[0] | 0.0], v IN trending |
                                                  [k IN range(0, size(v) - 1) | acc[k] + v[k]]) END AS demand
}
MATCH (u:User)-[r:INTERACTED]->()
WITH u, now, version, demand, min(r.first_ts) AS first, max(r.last_ts) AS last,
     sum(coalesce(r.n_view, 0) + coalesce(r.n_click, 0) + coalesce(r.n_cart, 0) + coalesce(r.n_purchase, 0)) AS events,
     // frequency trend: items active in the last 30 days of the data against the 30 days before
     // (an edge is active over [first_ts, last_ts]; single events are not kept)
     count(CASE WHEN r.last_ts >= now - 30 * 86400000 THEN 1 END) AS recent,
     count(CASE WHEN r.first_ts < now - 30 * 86400000 AND r.last_ts >= now - 60 * 86400000 THEN 1 END) AS previous
WHERE events >= $min_events
WITH u, version, demand, recent, previous, (now - last) / 86400000.0 AS silent_days,
     ((last - first) / 86400000.0) / (events - 1) AS gap_days
WITH u, version, demand, recent, previous, silent_days, gap_days,
     silent_days / CASE WHEN gap_days < 1 THEN 1 ELSE gap_days END AS risk
ORDER BY risk DESC LIMIT $k
RETURN u.id AS user_id, round(risk, 3) AS risk, round(silent_days, 1) AS silent_days,
       round(gap_days, 1) AS typical_gap_days, recent AS recent_items, previous AS previous_items,
       coalesce(u.ig_drift, []) AS moves,
       CASE WHEN u.embedding IS NULL OR demand IS NULL OR NOT coalesce(u.embedding_version = version, false)
            THEN null
            ELSE round(1 - vector.similarity.cosine(u.embedding, demand), 4) END AS drift
"""

ITEM_EMBEDDED = "MATCH (n:Item {id: $id}) WHERE n.embedding IS NOT NULL RETURN n.id AS id"

# What weighs in a user's interest now. With a vector, item i's share of p_u = sum_i w_ui s x_i is its
# projection on p_u over |p_u|^2, w_ui s (x_i . p_u) / |p_u|^2 (the shares add up to 1; an item new
# since the version has x_i = 0); without one, its share of the user's positive weight. With the
# moves of the vector over its last refreshes (WRITE_USERS).
USER_INTERESTS = """
MATCH (u:User {id: $user_id})
OPTIONAL MATCH (m:Model {version: u.embedding_version})
WITH u, m, u.embedding IS NOT NULL AND m IS NOT NULL AS embedded
CALL {
  WITH u, m, embedded
  OPTIONAL MATCH (u)-[a:INTERACTED]->(i:Item) WHERE a.w > 0
  WITH u, m, embedded, i, a.w AS w
  WITH embedded, sum(w) AS total, collect(CASE WHEN i IS NOT NULL THEN {
         item_id: i.id, title: i.title, category: i.category,
         part: CASE WHEN NOT embedded THEN w WHEN i.ig_x IS NULL THEN 0.0
                    ELSE w * m.scale * (2 * vector.similarity.cosine(i.ig_x, u.embedding) - 1)
                         * i.ig_xnorm / u.ig_norm END} END) AS parts
  RETURN [p IN parts | p {.item_id, .title, .category,
                          weight: CASE WHEN embedded THEN p.part ELSE p.part / total END}] AS items
}
RETURN items, CASE WHEN embedded THEN u.embedding_version END AS version,
       CASE WHEN embedded THEN toString(u.embedding_updated_at) END AS refreshed_at,
       coalesce(u.ig_drift, []) AS drift, coalesce(u.ig_drift_at, []) AS drift_at
"""

# --- Stored churn scores (app/churn.py) --------------------------------------------------------------

# Every edge's first and last event time: the history the churn model reads (two events per edge).
CHURN_MODEL_CURRENT = """
MATCH (m:ChurnModel {current: true}) RETURN m.version AS version, m.model AS model, m.auc AS auc
"""

# A new version; `promote` makes it the current one in the same transaction.
CHURN_MODEL_SAVE = """
CREATE (m:ChurnModel {version: $version, model: $model, auc: $auc, current_auc: $current_auc,
                      promoted: $promote, created_at: datetime()})
WITH m WHERE $promote
OPTIONAL MATCH (old:ChurnModel {current: true}) WHERE old <> m
SET old.current = false, m.current = true
"""

# One batch of scores; users that were not scored this run lose theirs afterwards (CHURN_CLEAR).
CHURN_WRITE_SCORES = """
UNWIND $rows AS row
MATCH (u:User {id: row.user})
SET u.churn_score = row.score, u.churn_reasons = row.reasons, u.churn_days = row.days,
    u.churn_silent_days = row.silent_days, u.churn_gap_days = row.gap_days,
    u.churn_version = $version, u.churn_at = $at
"""

CHURN_CLEAR = """
MATCH (u:User) WHERE u.churn_score IS NOT NULL AND u.churn_at <> $at
REMOVE u.churn_score, u.churn_reasons, u.churn_days, u.churn_silent_days, u.churn_gap_days, u.churn_version,
       u.churn_at
"""

# The top k by the stored score, read in index order (the range index on churn_score), never a scan.
CHURN_TOP = """
MATCH (u:User) WHERE u.churn_score >= 0.0 AND u.churn_days >= $min_days
RETURN u.id AS user_id, u.churn_score AS score, u.churn_reasons AS reasons, u.churn_silent_days AS silent_days,
       u.churn_gap_days AS typical_gap_days, u.churn_version AS version, u.churn_at AS scored_at
ORDER BY u.churn_score DESC LIMIT $k
"""

CHURN_SCORED = "MATCH (u:User) WHERE u.churn_score >= 0.0 RETURN u.id AS id LIMIT 1"


# --- Churn history, page by page (app/churn.py) ------------------------------------------------------
# The users after `after` in id order (the uniqueness constraint's index), `users` of them, with each
# edge's first and last times: one bounded read transaction a page, as a writer's would be.
CHURN_HISTORY_PAGE = """
MATCH (u:User) WHERE u.id > $after
WITH u ORDER BY u.id LIMIT $users
OPTIONAL MATCH (u)-[r:INTERACTED]->(i:Item)
RETURN u.id AS user, collect(CASE WHEN r IS NOT NULL THEN [i.id, r.first_ts, r.last_ts] END) AS edges
ORDER BY user
"""
