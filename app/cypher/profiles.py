"""Cypher of a user's profile: interests, churn risk and the stored churn scores."""

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

# Every edge's first and last event time: the history the churn model reads (two events per edge),
# page by page: the users after `after` in id order (the uniqueness constraint's index), `users` of
# them, each with its edges: one bounded read transaction a page.
CHURN_HISTORY_PAGE = """
MATCH (u:User) WHERE u.id > $after
WITH u ORDER BY u.id LIMIT $users
OPTIONAL MATCH (u)-[r:INTERACTED]->(i:Item)
RETURN u.id AS user, collect(CASE WHEN r IS NOT NULL THEN [i.id, r.first_ts, r.last_ts] END) AS edges
ORDER BY user
"""

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

# The run's end: older scores go, and the run's stamp (one node, CHURN_STAMP) changes in the same
# transaction, so a process that sees the new stamp reads only this run's scores.
CHURN_CLEAR = """
CALL {
  MATCH (u:User) WHERE u.churn_score IS NOT NULL AND u.churn_at <> $at
  REMOVE u.churn_score, u.churn_reasons, u.churn_days, u.churn_silent_days, u.churn_gap_days, u.churn_version,
         u.churn_at
}
MERGE (r:ChurnRun {id: 'current'})
SET r.at = $at, r.version = $version, r.erased = 0
"""

# What identifies the stored scores: the last run's time and the erasures of scored users since (an
# erasure changes the stamp, so no process keeps serving an erased user). Null before the first run.
CHURN_STAMP = """
OPTIONAL MATCH (r:ChurnRun {id: 'current'})
RETURN CASE WHEN r IS NULL THEN null ELSE r.at + '/' + toString(r.erased) END AS stamp
"""

# The top k by the stored score, read in index order (the range index on churn_score), never a scan.
CHURN_TOP = """
MATCH (u:User) WHERE u.churn_score >= 0.0 AND u.churn_days >= $min_days
RETURN u.id AS user_id, u.churn_score AS score, u.churn_reasons AS reasons, u.churn_silent_days AS silent_days,
       u.churn_gap_days AS typical_gap_days, u.churn_version AS version, u.churn_at AS scored_at
ORDER BY u.churn_score DESC LIMIT $k
"""

CHURN_SCORED = "MATCH (u:User) WHERE u.churn_score >= 0.0 RETURN u.id AS id LIMIT 1"
