"""Every recipe of docs/cypher.md runs on the real server, its `:param` lines turned into parameters."""
from __future__ import annotations

import random
import re

import pytest
import requests

from app.config import ROOT
from app.embeddings.training import train_and_publish
from app.ingest import pipeline, writer
from app.worker import Worker
from tests.conftest import wipe

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


def bind(session, params: list[tuple[str, str]]) -> dict:
    """Evaluate each `:param name => expression` as Neo4j Browser does (a Cypher expression, in order)."""
    values = {}
    for name, expression in params:
        values[name] = session.run(f"RETURN {expression} AS v", **values).single()["v"]
    return values


@pytest.fixture(scope="module")
def demo_ids(cfg, driver):
    """A small graph using the document's ids (shopper 17850, item 85123A), trained and embedded."""
    wipe(driver, cfg.neo4j_database)
    rng = random.Random(3)
    items = ["85123A", "71053"] + [f"i{k}" for k in range(30)]
    users = ["17850"] + [f"c{k}" for k in range(40)]
    now = 1_767_225_600_000
    events = [{"event_id": f"d{k}", "user_id": rng.choice(users), "item_id": rng.choice(items),
               "type": rng.choice(["view", "cart", "purchase"]), "ts": now - rng.randrange(90 * 86_400_000)}
              for k in range(500)]
    events += [{"event_id": f"x{k}", "user_id": "17850", "item_id": item, "type": "purchase", "ts": now}
               for k, item in enumerate(items[:4])]
    pipeline.ingest(driver, cfg, events)
    writer.upsert_items(driver, cfg.neo4j_database, [{"id": i, "props": {"title": f"title {i}", "price": 2.5}}
                                                     for i in items])
    with Worker(cfg).holding() as holder:
        train_and_publish(driver, cfg, progress=False, owner=holder.owner, epochs=1)


def test_document_has_the_recipes():
    headings = [h for h, _, _ in recipes()]
    for wanted in ("current model", "Recommendations", "Similar", "audience", "subgraph", "churn", "last hour"):
        assert any(wanted.lower() in h.lower() for h in headings), wanted


@pytest.mark.parametrize("recipe", recipes(), ids=lambda r: r[0])
def test_recipe_runs_and_answers(cfg, driver, demo_ids, recipe):
    heading, params, query = recipe
    with driver.session(database=cfg.neo4j_database) as s:
        rows = s.run(query, **bind(s, params)).data()
    assert rows, heading
    if "last hour" in heading and "edges_changed" in rows[0]:
        assert rows[0]["edges_changed"] > 0


@pytest.mark.parametrize("heading,path,key", [
    ("Recommendations for a shopper", "/v1/users/17850/recommendations", "user_id"),
    ("Similar items", "/v1/items/85123A/similar", "item_id")])
def test_scoring_recipes_give_the_apis_answer(cfg, driver, demo_ids, base_url, heading, path, key):
    _, params, query = next(r for r in recipes() if r[0] == heading)
    with driver.session(database=cfg.neo4j_database) as s:
        values = bind(s, params)
        rows = s.run(query, **values).data()
    api = requests.get(f"{base_url}{path}", params={"k": values["k"]}, timeout=30).json()["results"]
    assert [r["item_id"] for r in rows] == [r["item_id"] for r in api]
    # The API scores in float64 on its copy of the graph; Neo4j's cosine works in float32.
    assert [r["score"] for r in rows] == pytest.approx([r["score"] for r in api], rel=1e-5)
