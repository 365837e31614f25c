"""Cypher of the embeddings: the graph's export, the state write-back and the model versions."""

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
# than kept by differences, so weights that cancel leave exactly 0 and no float residue.
ITEM_DEGREES = """
UNWIND $ids AS id
MATCH (i:Item {id: id})
CALL {
  WITH i
  MATCH (i)<-[r:INTERACTED]-()
  RETURN sum(CASE WHEN r.w > 0 THEN r.w ELSE 0.0 END) AS d
}
SET i.ig_deg = d
"""

# The items of `$ids` the version has not embedded yet (brand-new ones), which the run then embeds.
ITEMS_UNEMBEDDED = """
UNWIND $ids AS id
MATCH (i:Item {id: id}) WHERE coalesce(i.embedding_version, '') <> $version
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
