// Ingest counters: one node per shard. Without a constraint, two transactions creating the same
// shard at once made two nodes, and every later MERGE matched both and counted twice. Existing
// duplicates are folded into one node (their sum is what the stats reported), then the constraint
// makes MERGE lock the shard instead.
MATCH (s:_IngestStats)
WITH s.shard AS shard, collect(s) AS nodes WHERE size(nodes) > 1
WITH head(nodes) AS keep, tail(nodes) AS rest
UNWIND rest AS dup
WITH keep, dup
FOREACH (k IN [x IN keys(dup) WHERE x <> 'shard'] | SET keep[k] = coalesce(keep[k], 0) + dup[k])
DETACH DELETE dup;
CREATE CONSTRAINT ingest_stats_shard IF NOT EXISTS FOR (s:_IngestStats) REQUIRE s.shard IS UNIQUE;
