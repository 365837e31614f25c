"""The Cypher recipes of docs/cypher.md, read as Neo4j Browser runs them: the tests' and benchmarks' fixtures."""
from __future__ import annotations

import re

from app.config import ROOT

DOC = ROOT / "docs" / "cypher.md"
BLOCK = re.compile(r"```cypher\n(.*?)```", re.S)
PARAM = re.compile(r"^:param\s+(\w+)\s*=>\s*(.+?);?\s*$")


def recipes() -> list[tuple[str, list[tuple[str, str]], str]]:
    """(heading, [(name, Cypher expression)], query) for each cypher block of the document."""
    text = DOC.read_text()
    out = []
    for match in BLOCK.finditer(text):
        heading = re.findall(r"^## (.+)$", text[:match.start()], re.M)[-1]
        params, query = [], []
        for line in match.group(1).splitlines():
            found = PARAM.match(line)
            if found:
                params.append(found.groups())
            elif line.startswith(":"):
                raise AssertionError(f"unsupported Browser command in {heading!r}: {line}")
            else:
                query.append(line)
        out.append((heading, params, "\n".join(query)))
    return out


def recipe(heading: str) -> tuple[list[tuple[str, str]], str]:
    """The `:param` lines and the query of the recipe under `heading`."""
    _, params, query = next(r for r in recipes() if r[0] == heading)
    return params, query


def bind(session, params: list[tuple[str, str]]) -> dict:
    """Evaluate each `:param name => expression` as Neo4j Browser does (a Cypher expression, in order)."""
    values = {}
    for name, expression in params:
        values[name] = session.run(f"RETURN {expression} AS v", **values).single()["v"]
    return values
