// The refresh picks the users a run takes in the order of their changes: the longest waiting first,
// the newest new ones first. With the change time after the flag, an index seek reads the flagged
// entries in that order and stops after what one run may take, instead of reading the whole backlog.
CREATE INDEX interacted_unseen_at IF NOT EXISTS FOR ()-[r:INTERACTED]-() ON (r.ig_unseen, r.changed_at);
CREATE INDEX user_unseen_at IF NOT EXISTS FOR (u:User) ON (u.ig_unseen, u.changed_at);
