"""Cypher of the schema's migrations, the health check, and the worker's lease and jobs."""

# --- migrations -------------------------------------------------------------
MIGRATIONS_APPLIED = """
MATCH (m:_Migration)
RETURN m.version AS version, m.checksum AS checksum, toString(m.applied_at) AS applied_at
ORDER BY version
"""

MIGRATION_RECORD = """
CREATE (:_Migration {version: $version, description: $description, checksum: $checksum,
                     file: $file, applied_at: datetime()})
"""

# The vector indexes' size, and their rebuild at another one (V006's statements, with the old vectors).
VECTOR_INDEX_SIZES = """
SHOW VECTOR INDEXES YIELD name, options
WHERE name IN ['user_embedding', 'item_embedding']
RETURN name, options.indexConfig['vector.dimensions'] AS dim
"""

VECTOR_INDEX_REBUILD = [
    "DROP INDEX user_embedding IF EXISTS",
    "DROP INDEX item_embedding IF EXISTS",
    "MATCH (n:User|Item) WHERE n.embedding IS NOT NULL "
    "CALL { WITH n REMOVE n.embedding, n.embedding_version } IN TRANSACTIONS OF 10000 ROWS",
    """CREATE VECTOR INDEX user_embedding IF NOT EXISTS FOR (u:User) ON (u.embedding)
OPTIONS {indexConfig: {`vector.dimensions`: $embed_dim, `vector.similarity_function`: 'cosine',
                       `vector.hnsw.m`: 16, `vector.hnsw.ef_construction`: 32}}""",
    """CREATE VECTOR INDEX item_embedding IF NOT EXISTS FOR (i:Item) ON (i.embedding)
OPTIONS {indexConfig: {`vector.dimensions`: $embed_dim, `vector.similarity_function`: 'cosine',
                       `vector.hnsw.m`: 16, `vector.hnsw.ef_construction`: 32}}""",
]

# --- health -----------------------------------------------------------------
PING = "RETURN 1 AS ok"

# --- worker: lease and jobs -------------------------------------------------
# `lease_owner` is the fencing token every write of embeddings checks (LEASE_HELD). Whoever takes
# the lease from someone else (or from nobody) writes the fresh token `$fresh`: a token never comes
# back, so a run begun under an earlier tenure stays fenced out even when its process gets the lease
# again. Our own token is kept while nobody else took the lease, lapsed or not. Each statement
# locks the node before reading the lease (`_lock`), so a takeover and a fenced write are ordered.
LEASE_ACQUIRE = """
MERGE (s:_Refresh {key: 'main'})
SET s._lock = true
REMOVE s._lock
WITH s, timestamp() AS now
WHERE s.lease_owner IS NULL OR s.lease_owner = $owner OR s.lease_until < now
SET s.lease_owner = CASE WHEN s.lease_owner = $owner THEN $owner ELSE $fresh END, s.lease_until = now + $ttl_ms
RETURN s.lease_owner AS owner
"""

# The first statement of every fenced transaction: it holds the lock until commit, so the lease
# cannot change hands while the transaction's writes are pending.
LEASE_HELD = """
MATCH (s:_Refresh {key: 'main'})
SET s._lock = true
REMOVE s._lock
RETURN s.lease_owner = $owner AS held
"""

LEASE_RELEASE = """
MATCH (s:_Refresh {key: 'main'}) WHERE s.lease_owner = $owner
SET s.lease_until = 0
"""

# A read (it runs on every /metrics scrape): before the first run every field is null.
REFRESH_STATUS = """
OPTIONAL MATCH (s:_Refresh {key: 'main'})
RETURN s.watermark AS watermark, s.recent AS recent, s.lease_owner AS lease_owner,
       s.lease_until AS lease_until, timestamp() AS now
"""

JOB_CREATE = """
CREATE (j:Job {id: $id, kind: $kind, params: $params, state: 'queued', progress: 0.0,
               created_at: timestamp()})
RETURN j {.*} AS job
"""

JOB_GET = "MATCH (j:Job {id: $id}) RETURN j {.*} AS job"

# Only the lease holder claims or finishes jobs, and only the owner a job runs under finishes it:
# a worker that lost the lease mid-job leaves the job to its successor (requeued or already done).
# Both lock the lease node first, like LEASE_HELD.
JOB_NEXT = """
MATCH (s:_Refresh {key: 'main'})
SET s._lock = true
REMOVE s._lock
WITH s WHERE s.lease_owner = $owner
MATCH (j:Job {state: 'queued'})
WITH j ORDER BY j.created_at LIMIT 1
SET j.state = 'running', j.started_at = timestamp(), j.owner = $owner, j.attempts = coalesce(j.attempts, 0) + 1
RETURN j {.*} AS job
"""

JOB_FINISH = """
MATCH (s:_Refresh {key: 'main'})
SET s._lock = true
REMOVE s._lock
WITH s WHERE s.lease_owner = $owner
MATCH (j:Job {id: $id, state: 'running', owner: $owner})
SET j.state = $state, j.finished_at = timestamp(), j.result = $result, j.error = $error,
    j.progress = CASE $state WHEN 'succeeded' THEN 1.0 ELSE j.progress END
RETURN count(j) AS finished
"""

# Jobs left running by a worker that died go back to the queue when a new worker takes the lease.
JOB_REQUEUE_ORPHANS = """
MATCH (j:Job {state: 'running'}) WHERE j.owner <> $owner
SET j.state = 'queued', j.owner = null
RETURN count(j) AS requeued
"""
