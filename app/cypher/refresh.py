"""Cypher of the refresh: change detection, the L-hop pull and the refresh's own state."""

# --- refresh: change detection and the L-hop pull ---------------------------
# Edges, users and items are tracked alike: every writer bumps `rev` and sets `ig_unseen`; the
# refresh records the revision its stored state accounts for in `ig_rev` and removes `ig_unseen`
# once nothing newer committed (MARK_*). A change is found however late it commits after its
# `changed_at` (no clock, no margin). Each query must seek the `ig_unseen` index (V005), which holds
# only what is not yet reflected: a scan makes every run O(graph). The planner scans edges unless
# told, and may scan even this small index under an aggregation, hence the SEEK hints.
# The changed users a run may take, without reading the whole backlog (a flood leaves tens of
# thousands waiting): the `$oldest` users with the longest waiting changes of their edges and of their
# own nodes (each with its oldest such change; the caller merges the two), and the `$newest` last users
# without a vector yet, newest first, each read in the order of a (flag, change time) index (V012) and
# cut there. A user node is flagged only when created (INGEST_WRITE), with an edge, so how many wait is
# counted over the edges' flags alone, from the index (counting the nodes' flags too cost several times more).
PENDING_USERS = """
CALL {
  MATCH ()-[r:INTERACTED]->() USING INDEX SEEK r:INTERACTED(ig_unseen, changed_at)
  WHERE r.ig_unseen = true AND r.changed_at > 0
  WITH r ORDER BY r.ig_unseen, r.changed_at
  WITH r WHERE r.rev - coalesce(r.ig_rev, -1) > 0
  WITH DISTINCT startNode(r) AS u LIMIT $oldest
  CALL {
    WITH u
    MATCH (u)-[r:INTERACTED]->() WHERE coalesce(r.ig_unseen, false) AND r.rev - coalesce(r.ig_rev, -1) > 0
    RETURN min(r.changed_at) AS at
  }
  RETURN collect([u.id, at]) AS edges
}
CALL {
  MATCH (n:User) USING INDEX SEEK n:User(ig_unseen, changed_at)
  WHERE n.ig_unseen = true AND n.changed_at > 0
  WITH n ORDER BY n.ig_unseen, n.changed_at
  WITH n WHERE n.rev - coalesce(n.ig_rev, 0) > 0 LIMIT $oldest
  RETURN collect([n.id, n.changed_at]) AS nodes
}
CALL {
  MATCH (n:User) USING INDEX SEEK n:User(ig_unseen, changed_at)
  WHERE n.ig_unseen = true AND n.changed_at > 0
  WITH n ORDER BY n.ig_unseen DESC, n.changed_at DESC
  WITH n WHERE n.ig_rev IS NULL AND n.rev > 0 LIMIT $newest
  RETURN collect(n.id) AS newest
}
CALL {
  MATCH (u:User)-[r:INTERACTED]->() USING INDEX SEEK r:INTERACTED(ig_unseen) WHERE r.ig_unseen = true
  RETURN count(DISTINCT u) AS waiting
}
RETURN waiting, edges, nodes, newest
"""

# The changes of the given users, one record per user (the driver's per-record cost dominated): its
# changed edges as [item, rev, element id], and whether the user node itself is flagged (`changed`,
# with its revision). Found by id and expanded from the user: the planner may otherwise seek the flag's
# index, whose size is the backlog's, once per user (a hint for the user, a flag test it cannot seek
# for the edges: the backlog times the users read in index rows, seconds a run after a flood).
CHANGES_OF = """
UNWIND $ids AS id
MATCH (u:User {id: id}) USING INDEX u:User(id)
OPTIONAL MATCH (u)-[r:INTERACTED]->(i:Item) WHERE coalesce(r.ig_unseen, false) AND r.rev - coalesce(r.ig_rev, -1) > 0
WITH u, collect(CASE WHEN r IS NOT NULL THEN [i.id, r.rev, elementId(r)] END) AS edges
RETURN u.id AS id, u.rev AS rev, coalesce(u.nonce, '') AS nonce,
       u.ig_unseen = true AND u.rev - coalesce(u.ig_rev, 0) > 0 AS changed, edges
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
       s.full_version AS full_version, coalesce(s.full_publish, false) AS full_publish,
       coalesce(s.deg_stale, []) AS deg_stale, s.deg_stale_since AS deg_stale_since
"""

# Written after LEASE_HELD in the same transaction (fenced). `full_run` names the run, so that only
# that run's last transaction clears the flag.
REFRESH_FULL_PENDING = """
MATCH (s:_Refresh {key: 'main'}) WHERE s.lease_owner = $owner
SET s.full_pending = true, s.full_run = $run_id, s.full_version = $version, s.full_publish = $publish
"""

# Fenced by the lease: a worker that lost it cannot move the watermark (the transaction is rolled back).
# Only the full run that raised `full_pending` ($full_run) lowers it; an incremental run passes null.
# `deg_stale`: the items whose degrees runs left to sum again later, since `deg_stale_since` (ms).
REFRESH_ADVANCE = """
MATCH (s:_Refresh {key: 'main'}) WHERE s.lease_owner = $owner
SET s.watermark = $watermark, s.last_run = $run, s.deg_stale = $deg_stale, s.deg_stale_since = $deg_stale_since,
    s.full_pending = CASE WHEN s.full_run = $full_run THEN false ELSE s.full_pending END,
    s.recent = ([$run] + coalesce(s.recent, []))[0..20]
RETURN count(s) AS updated
"""


# --- items' rows from their content (app/embeddings/refresh.py) ----------------------------------------

# What an item's content row is computed from (LoadedModel.cold): the same fields the export reads.
CONTENT_ITEMS = """
UNWIND $ids AS id
MATCH (i:Item {id: id})
RETURN i.id AS id, i.title AS title, i.category AS category, i.price AS price
"""

# The users of items whose rows come from their content: a change of that content moves their vectors.
CONTENT_ITEM_USERS = """
UNWIND $ids AS id
MATCH (:Item {id: id})<-[:INTERACTED]-(u:User)
RETURN collect(DISTINCT u.id) AS users
"""
