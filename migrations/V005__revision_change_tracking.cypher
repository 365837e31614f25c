// Change tracking by revision, one mechanism for edges, users and items: every writer bumps `rev`
// and sets `ig_unseen`; the refresh records in `ig_rev` the revision it accounts for and removes
// `ig_unseen` once nothing newer committed. The change queries seek these indexes, which hold only
// what is not yet reflected, so a change is found however late it commits after its timestamp.
CREATE INDEX user_unseen IF NOT EXISTS FOR (u:User) ON (u.ig_unseen);
CREATE INDEX item_unseen IF NOT EXISTS FOR (i:Item) ON (i.ig_unseen);
CREATE INDEX interacted_unseen IF NOT EXISTS FOR ()-[r:INTERACTED]-() ON (r.ig_unseen);
// Existing nodes get revision 1, seen if their last change was (the timestamp scheme's `ig_seen`).
MATCH (n) WHERE (n:User OR n:Item) AND n.rev IS NULL
CALL {
  WITH n
  SET n.rev = 1, n.ig_rev = CASE WHEN n.changed_at <= coalesce(n.ig_seen, -1) THEN 1 ELSE 0 END
  REMOVE n.ig_seen
  WITH n WHERE n.ig_rev = 0
  SET n.ig_unseen = true
} IN TRANSACTIONS OF 10000 ROWS;
// Edges already carry revisions: flag those not yet reflected.
MATCH ()-[r:INTERACTED]->() WHERE r.rev - coalesce(r.ig_rev, -1) > 0 AND r.ig_unseen IS NULL
CALL {
  WITH r
  SET r.ig_unseen = true
} IN TRANSACTIONS OF 10000 ROWS;
