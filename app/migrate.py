"""Versioned, checksummed Cypher migrations (`migrations/V001__name.cypher`)."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from app import cypher
from app.config import MIGRATIONS_DIR

_NAME = re.compile(r"^V(\d{3,})__(\w+)\.cypher$")


class MigrationError(RuntimeError):
    """A migration file is malformed, changed after being applied, or failed."""


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    path: Path

    @property
    def checksum(self) -> str:
        """SHA-256 of the file's bytes: any edit after applying it is detected."""
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def statements(self) -> list[str]:
        """Split the file on `;` line ends, dropping `//` comment lines."""
        lines = [ln for ln in self.path.read_text().splitlines() if not ln.strip().startswith("//")]
        return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """All migration files in version order."""
    found = []
    for path in sorted(directory.glob("*.cypher")):
        match = _NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: name must look like V001__description.cypher")
        found.append(Migration(int(match[1]), match[2].replace("_", " "), path))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migration files share a version number")
    return found


def _applied(session) -> dict[int, dict]:
    rows = session.run(cypher.MIGRATIONS_APPLIED).data()
    return {row["version"]: row for row in rows}


def info(driver, database: str, directory: Path = MIGRATIONS_DIR) -> list[dict]:
    """Each migration with its state: applied, pending or changed."""
    with driver.session(database=database) as session:
        applied = _applied(session)
    out = []
    for m in discover(directory):
        row = applied.get(m.version)
        state = "pending" if row is None else ("applied" if row["checksum"] == m.checksum else "changed")
        out.append({"version": m.version, "description": m.description, "file": m.path.name,
                    "state": state, "applied_at": row and row["applied_at"]})
    return out


def validate(driver, database: str, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Raise on a changed applied file; return the pending migrations."""
    states = info(driver, database, directory)
    changed = [s["file"] for s in states if s["state"] == "changed"]
    if changed:
        raise MigrationError(f"applied migration {', '.join(changed)} was modified after it was "
                             "applied; restore it and add a new migration instead")
    pending = {s["version"] for s in states if s["state"] == "pending"}
    return [m for m in discover(directory) if m.version in pending]


def fit_vector_indexes(driver, database: str, dim: int) -> bool:
    """Rebuild the vector indexes if their size is not `dim` (IG_EMBED_DIM or IG_SHARP_DIM changed).

    Stored vectors of another size would be left out of the index without an error, so the old
    vectors go with it; the next training re-embeds every node. True if anything was rebuilt.
    """
    with driver.session(database=database) as session:
        sizes = {r["name"]: r["dim"] for r in session.run(cypher.VECTOR_INDEX_SIZES)}
        if not sizes or all(size == dim for size in sizes.values()):
            return False
        for statement in cypher.VECTOR_INDEX_REBUILD:
            session.run(statement, embed_dim=dim).consume()
    return True


def migrate(driver, database: str, params: dict, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Apply pending migrations in order (with config `params`), then size the vector indexes to
    `params["embed_dim"]`; return the migrations applied."""
    done = []
    for m in validate(driver, database, directory):
        with driver.session(database=database) as session:
            # Schema statements cannot share a transaction with data writes, so each runs alone.
            for statement in m.statements():
                try:
                    session.run(statement, params).consume()
                except Exception as exc:  # noqa: BLE001 - report which file broke
                    raise MigrationError(f"{m.path.name} failed: {exc}") from exc
            session.run(cypher.MIGRATION_RECORD, version=m.version, description=m.description,
                        checksum=m.checksum, file=m.path.name).consume()
        done.append(m)
    fit_vector_indexes(driver, database, params["embed_dim"])
    return done
