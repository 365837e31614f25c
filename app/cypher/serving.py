"""Cypher of the answers given while the API's copy has no model: trending items."""

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
