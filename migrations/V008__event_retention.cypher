// Deduplication keeps an event id for a retention window (IG_DEDUP_RETENTION_DAYS): `at` is when
// the id was claimed, and the worker deletes ids older than the window in bounded batches.
CREATE INDEX event_at IF NOT EXISTS FOR (e:Event) ON (e.at);
// An erased user leaves a one-way hash of their key and the erasure time, so that an event from
// before the erasure, retried after its id expired, never brings them back.
CREATE CONSTRAINT erased_key IF NOT EXISTS FOR (x:_Erased) REQUIRE x.key IS UNIQUE;
// Ids claimed before this migration start their window now.
MATCH (e:Event) WHERE e.at IS NULL
CALL { WITH e SET e.at = timestamp() } IN TRANSACTIONS OF 10000 ROWS;
