"""Every recipe of docs/cypher.md runs on the real server, its `:param` lines turned into parameters."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import requests

from app import cypher
from app.embeddings.training import train_and_publish
from app.ingest import pipeline, writer
from app.worker import Worker
from support.recipes import bind, recipe, recipes
from tests.conftest import wipe


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


def _api(base_url: str, path: str, **params) -> list[dict]:
    return requests.get(f"{base_url}{path}", params=params, timeout=30).json()["results"]


def _current_model(rows, values, s, base_url):
    """The current version, just embedded whole: nothing pending, the last run a full one."""
    (row,) = rows
    assert row["model"] == s.run("MATCH (m:Model {current: true}) RETURN m.version AS v").single()["v"]
    assert row["users_pending"] == 0 and row["edges_pending"] == 0
    assert json.loads(row["last_run"])["mode"] in ("full", "incremental")
    assert row["stale"] == (row["seconds_since_refresh"] * 1000 > values["stale_after_ms"])


def _trending(rows, values, s, base_url):
    """What the API gives a visitor it does not know, in order."""
    api = _api(base_url, "/v1/users/nobody/recommendations", k=values["k"])
    assert [r["item_id"] for r in rows] == [r["item_id"] for r in api]
    assert [r["popularity"] / rows[0]["popularity"] for r in rows] == pytest.approx([r["score"] for r in api])


def _audience(rows, values, s, base_url):
    """The vector part of an audience: the cosines of the stored vectors, computed here from them, in
    order, without the item's buyers (the index's 3 k nearest hold every user of this small graph); the
    API ranks by the full score (tests/test_audience_serving.py)."""
    item = s.run("MATCH (i:Item {id: $i}) RETURN i.embedding AS e, i.embedding_version AS v", i=values["item_id"]).single()
    q = np.asarray(item["e"])
    cosines = sorted(((float(np.asarray(r["e"]) @ q / np.linalg.norm(r["e"]) / np.linalg.norm(q)), r["u"]) for r in s.run(
        "MATCH (u:User) WHERE u.embedding_version = $v AND NOT EXISTS { (u)-[:INTERACTED]->(:Item {id: $i}) } "
        "RETURN u.id AS u, u.embedding AS e", v=item["v"], i=values["item_id"])), reverse=True)[:values["k"]]
    assert rows and [r["user_id"] for r in rows] == [u for _, u in cosines]
    assert [r["cosine"] for r in rows] == pytest.approx([c for c, _ in cosines], abs=1e-5)
    api = _api(base_url, f"/v1/items/{values['item_id']}/audience", k=values["k"])
    assert len(api) == len(rows) and not {r["user_id"] for r in api} & {
        x["u"] for x in s.run("MATCH (u:User)-[:INTERACTED]->(:Item {id: $i}) RETURN u.id AS u", i=values["item_id"])}


def _subgraph(rows, values, s, base_url):
    """The shopper's strongest items (at most `items`), each with at most `others` other shoppers of it."""
    own = {r["p"].nodes[1]["id"] for r in rows}
    assert {r["p"].nodes[0]["id"] for r in rows} == {values["user_id"]} and 0 < len(own) <= values["items"]
    positive = {x["i"] for x in s.run("MATCH (:User {id: $u})-[r:INTERACTED]->(i:Item) WHERE r.w > 0 "
                                      "RETURN i.id AS i", u=values["user_id"])}
    assert own <= positive and len(own) == min(values["items"], len(positive))
    per_item = {}
    for r in rows:
        item, other = r["q"].nodes[0]["id"], r["q"].nodes[1]["id"]
        assert item == r["p"].nodes[1]["id"] and other != values["user_id"]
        per_item.setdefault(item, set()).add(other)
    assert all(len(v) <= values["others"] for v in per_item.values())


def _churn(rows, values, s, base_url):
    """The API's churn list: the same users, the same overdue scores (ties in any order)."""
    api = _api(base_url, "/v1/users/churn-risk", k=values["k"], min_events=values["min_events"])
    assert [r["overdue"] for r in rows] == [r["score"] for r in api]
    last = rows[-1]["overdue"]
    assert {r["user_id"] for r in rows if r["overdue"] > last} == {r["user_id"] for r in api if r["score"] > last}


def _last_hour(rows, values, s, base_url):
    """Counted again from every edge (or listed from every item) of the graph."""
    if "edges_changed" in rows[0]:
        edges = s.run("MATCH (u:User)-[r:INTERACTED]->(i:Item) RETURN u.id AS u, i.id AS i, r.changed_at AS at, "
                      "coalesce(r.ig_unseen, false) AS unseen").data()
        recent = [e for e in edges if e["at"] >= values["since"]]
        (row,) = rows
        assert row["edges_changed"] == len(recent) > 0 and row["not_refreshed_yet"] == sum(e["unseen"] for e in recent)
        assert row["shoppers"] == len({e["u"] for e in recent}) and row["items"] == len({e["i"] for e in recent})
    else:
        n = s.run("MATCH (i:Item) WHERE i.changed_at >= $since RETURN count(i) AS n", since=values["since"]).single()["n"]
        assert len(rows) == min(25, n) > 0
        stamps = [r["changed_at"] for r in rows]
        assert stamps == sorted(stamps, reverse=True)


def _stored_churn(rows, values, s, base_url):
    """The API's churn list read from the stored scores: the same users, scores and reasons, in order."""
    api = _api(base_url, "/v1/users/churn-risk", k=values["k"], min_events=values["min_days"])
    assert [(r["user_id"], r["churn_risk"]) for r in rows] == [(r["user_id"], r["score"]) for r in api]
    assert [json.loads(r["reasons"]) for r in rows] == [r["reasons"]["contributions"] for r in api]


def _store_churn_scores(s) -> None:
    """Scores as the churn job writes them (its statement), for the users of the graph."""
    users = [r["id"] for r in s.run("MATCH (u:User) RETURN u.id AS id ORDER BY id")]
    rng = random.Random(5)
    rows = [{"user": u, "score": round(rng.random(), 6), "days": rng.randint(2, 6), "silent_days": 3.0,
             "gap_days": 2.0, "reasons": json.dumps({"recency_days": {"value": 3.0, "contribution": 0.5}})}
            for u in users]
    s.run(cypher.CHURN_WRITE_SCORES, rows=rows, version="churn-test", at="2026-01-01T00:00:00+00:00").consume()


CHECKS = {"current model": _current_model, "Trending": _trending, "audience": _audience, "subgraph": _subgraph,
          "stored churn": _stored_churn, "churn": _churn, "last hour": _last_hour}


@pytest.mark.parametrize("recipe", recipes(), ids=lambda r: r[0])
def test_recipe_runs_and_answers(cfg, driver, demo_ids, base_url, recipe):
    """Each recipe's rows say what its section says (the scoring ones: next test)."""
    heading, params, query = recipe
    stored = "stored churn" in heading.lower()
    with driver.session(database=cfg.neo4j_database) as s:
        if stored:
            _store_churn_scores(s)
        try:
            values = bind(s, params)
            rows = s.run(query, **values).data() if "subgraph" not in heading else list(s.run(query, **values))
            assert rows, heading
            check = next((f for key, f in CHECKS.items() if key.lower() in heading.lower()), None)
            if check is not None:
                check(rows, values, s, base_url)
        finally:
            if stored:  # the other recipes read the graph without stored scores
                s.run(cypher.CHURN_CLEAR, at="", version=None).consume()


@pytest.mark.parametrize("heading,path,key", [
    ("Recommendations for a shopper", "/v1/users/17850/recommendations", "user_id"),
    ("Similar items", "/v1/items/85123A/similar", "item_id")])
def test_scoring_recipes_give_the_apis_answer(cfg, driver, demo_ids, base_url, heading, path, key):
    params, query = recipe(heading)
    with driver.session(database=cfg.neo4j_database) as s:
        values = bind(s, params)
        rows = s.run(query, **values).data()
    api = requests.get(f"{base_url}{path}", params={"k": values["k"]}, timeout=30).json()["results"]
    assert [r["item_id"] for r in rows] == [r["item_id"] for r in api]
    # The API scores in float64 on its copy of the graph; Neo4j's cosine works in float32.
    assert [r["score"] for r in rows] == pytest.approx([r["score"] for r in api], rel=1e-5)
