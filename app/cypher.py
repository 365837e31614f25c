"""Every Cypher statement the service runs, as named, parameterised constants."""

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

# --- health -----------------------------------------------------------------
PING = "RETURN 1 AS ok"
