"""Cypher of the serving log and the reads that keep the API's in-process copy in sync."""

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
