"""Cypher of the served answers: recommendations, explanations, trending, similar items, audiences."""

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
  %(targets)s
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

# lin's last step, from the weighted users v to their items j, and the nearest items with lin 0: the second
# candidate set of both recommendations and similar items.
_TARGETS = """MATCH (v)-[c:INTERACTED]->(j:Item) WHERE c.w > 0 AND j.ig_deg > 0
  WITH m, j, sum(z * c.w * m.scale) AS t
  RETURN j, t / sqrt(j.ig_deg * m.scale) AS lin
  UNION
  WITH nearest
  UNWIND nearest AS j
  RETURN j, 0.0 AS lin"""

RECOMMEND_ITEMS = _RECOMMEND % {"nearest": _BY_INDEX, "targets": _TARGETS}
RECOMMEND_ITEMS_SCAN = _RECOMMEND % {"nearest": _ADMITTED, "targets": _TARGETS}

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
  %(targets)s
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

SIMILAR_ITEMS = _SIMILAR % {"nearest": _SIMILAR_BY_INDEX, "targets": _TARGETS}
SIMILAR_ITEMS_SCAN = _SIMILAR % {"nearest": _ADMITTED, "targets": _TARGETS}

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

ITEM_EMBEDDED = "MATCH (n:Item {id: $id}) WHERE n.embedding IS NOT NULL RETURN n.id AS id"
