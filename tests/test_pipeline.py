"""Demo data in the real Neo4j: load, train, embed --full, then serve from the vector indexes."""
from __future__ import annotations

import gzip
import itertools
import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import requests

from app import cypher
from app.config import ROOT
from app.embeddings import models
from support.ranking import offline_answers
from tests.conftest import wipe
from tests.test_serving import assert_ranking
from tests.test_serving_copy import publish_retail_version

DEMO = ROOT / "data" / "online_retail" / "online_retail.csv.gz"


def cli(*args: str) -> str:
    """Run `interest-graph ARGS` and return its stdout (failing the test on a non-zero exit)."""
    done = subprocess.run([sys.executable, "-m", "app", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def demo(cfg, driver, tmp_path_factory):
    """The first 15,000 lines of the demo data, loaded, trained on and embedded via the CLI."""
    wipe(driver, cfg.neo4j_database)
    part = tmp_path_factory.mktemp("demo") / "online_retail_part.csv.gz"
    with gzip.open(DEMO, "rt", encoding="latin-1") as src, gzip.open(part, "wt", encoding="latin-1") as dst:
        dst.writelines(itertools.islice(src, 15_000))
    cli("load", "online-retail", str(part))
    trained = cli("train", "--epochs", "1")
    version = json.JSONDecoder().raw_decode(trained[trained.index("{"):])[0]["version"]
    assert "chosen settings:" in trained and "held-out" in trained and "Recall@20" in trained and "popularity" in trained
    cli("embed", "--full")
    return version


def test_every_node_has_a_current_embedding(cfg, driver, demo):
    with driver.session(database=cfg.neo4j_database) as s:
        rows = s.run("MATCH (n) WHERE n:User OR n:Item RETURN labels(n)[0] AS label, "
                     "size(n.embedding) AS dim, n.embedding_version AS version, "
                     "n.embedding_updated_at IS NOT NULL AS stamped, n.ig_deg AS deg").data()
        model = s.run("MATCH (m:Model {current: true}) RETURN m.version AS v, m.metrics AS metrics").single()
    assert {r["label"] for r in rows} == {"User", "Item"} and len(rows) > 100
    assert all(r["version"] == demo and r["stamped"] for r in rows)
    # Every item has a vector; a user has one unless none of its weights is positive (only returns).
    assert all(r["dim"] == cfg.vector_dim or (r["label"] == "User" and r["dim"] is None and r["deg"] == 0)
               for r in rows)
    assert model["v"] == demo and "recall@20" in json.loads(model["metrics"])


def test_vector_index_returns_neighbours(cfg, driver, demo):
    with driver.session(database=cfg.neo4j_database) as s:
        rows = s.run("MATCH (i:Item) WITH i LIMIT 1 "
                     "CALL db.index.vector.queryNodes('item_embedding', 5, i.embedding) YIELD node, score "
                     "RETURN node.id AS id, score").data()
    scores = [r["score"] for r in rows]
    assert len(rows) == 5 and scores == sorted(scores, reverse=True) and 0 < scores[-1] <= 1


def _a_buyer(cfg, driver) -> tuple[str, set[str]]:
    with driver.session(database=cfg.neo4j_database) as s:
        row = s.run("MATCH (u:User)-[:INTERACTED]->(i:Item) WITH u, collect(i.id) AS items "
                    "ORDER BY size(items) DESC LIMIT 1 RETURN u.id AS u, items").single()
    return row["u"], set(row["items"])


def test_recommendations_over_http(cfg, driver, demo, base_url):
    user, bought = _a_buyer(cfg, driver)
    answer = requests.get(f"{base_url}/v1/users/{user}/recommendations", params={"k": 10}, timeout=30).json()
    items = [r["item_id"] for r in answer["results"]]
    assert answer["version"] == demo and len(items) == 10
    assert not set(items) & bought  # nothing the user already has
    assert [r["score"] for r in answer["results"]] == sorted((r["score"] for r in answer["results"]), reverse=True)


def test_rest_ranking_equals_the_offline_evaluation(cfg, driver, demo, base_url):
    """What is evaluated is what is served: the API's top k is the offline Scorer's top k, items without a
    trained row (only returns when the version was trained) scored from their content as the version says."""
    lm = models.current(driver, cfg)
    answers = offline_answers(driver, cfg, lm, every=40, k=10)
    assert len(answers) >= 10 and lm.model.content is not None
    for user, ids, scores in answers:
        got = requests.get(f"{base_url}/v1/users/{user}/recommendations", params={"k": 10}, timeout=30).json()["results"]
        assert_ranking(got, ids, scores)


def test_similar_items_and_audience_over_http(cfg, driver, demo, base_url):
    _, bought = _a_buyer(cfg, driver)
    item = sorted(bought)[0]
    similar = requests.get(f"{base_url}/v1/items/{item}/similar", params={"k": 5}, timeout=30).json()
    assert len(similar["results"]) == 5 and item not in {r["item_id"] for r in similar["results"]}
    audience = requests.get(f"{base_url}/v1/items/{item}/audience", params={"k": 5}, timeout=30).json()
    assert len(audience["results"]) == 5
    bad = requests.get(f"{base_url}/v1/items/{item}/audience", params={"k": 0}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "k"
    unknown = requests.get(f"{base_url}/v1/items/no-such-item/similar", timeout=30)
    assert unknown.status_code == 404


DAY_MS = 86_400_000


def expected_drift(cfg, driver, users: list[str]) -> tuple[dict, list[str]]:
    """Each user's drift as CHURN_RISK defines it, computed here from the raw graph: 1 - the cosine
    similarity between the user's vector and the summed vectors of the 200 items with most edges in the data's
    last 30 days (ties by id), all of the current model version (None if the user's is not); and the
    ids of those items."""
    with driver.session(database=cfg.neo4j_database) as s:
        version = s.run("MATCH (m:Model {current: true}) RETURN m.version AS v").single()["v"]
        edges = s.run("MATCH (:User)-[r:INTERACTED]->(i:Item) RETURN i.id AS i, r.last_ts AS ts").data()
        items = {r["id"]: r for r in s.run("MATCH (i:Item) RETURN i.id AS id, i.embedding AS e, "
                                           "i.embedding_version AS v").data()}
        vecs = {r["id"]: r for r in s.run("MATCH (u:User) WHERE u.id IN $ids RETURN u.id AS id, "
                                          "u.embedding AS e, u.embedding_version AS v", ids=users).data()}
    now = max(e["ts"] for e in edges)
    buyers = Counter(e["i"] for e in edges if e["ts"] >= now - 30 * DAY_MS
                     and items[e["i"]]["e"] is not None and items[e["i"]]["v"] == version)
    top = sorted(buyers, key=lambda i: (-buyers[i], i))[:200]
    total = np.sum([items[i]["e"] for i in top], axis=0)
    out = {}
    for u in users:
        e, v = vecs[u]["e"], vecs[u]["v"]
        cos = np.dot(e, total) / (np.linalg.norm(e) * np.linalg.norm(total)) if e is not None else 0.0
        # Neo4j's vector.similarity.cosine is (1 + cos) / 2, so drift is in [0, 1].
        out[u] = None if e is None or v != version or not top else float(1 - (1 + cos) / 2)
    return out, top


def churn(base_url, k=5) -> list[dict]:
    return requests.get(f"{base_url}/v1/users/churn-risk", params={"k": k}, timeout=60).json()["results"]


def assert_drifts(rows: list[dict], expected: dict) -> None:
    for r in rows:
        want = expected[r["user_id"]]
        assert (r["drift"] is None) == (want is None), (r, want)
        assert want is None or abs(r["drift"] - want) <= 1e-4, (r, want)  # the API rounds to 4 places


def test_churn_risk_over_http(cfg, driver, demo, base_url):
    rows = churn(base_url)
    assert rows and rows == sorted(rows, key=lambda r: r["risk"], reverse=True)
    assert all(r["silent_days"] >= 0 and r["typical_gap_days"] >= 0 for r in rows)
    expected, _ = expected_drift(cfg, driver, [r["user_id"] for r in rows])
    assert all(v is not None for v in expected.values())  # every user is embedded by the current model
    assert_drifts(rows, expected)


def test_churn_risk_uses_only_the_current_model_version(cfg, driver, demo, base_url):
    """Mid-retrain, some vectors are of another version: drift ignores them (and is null for a user
    whose own vector is of another version), as every other serving query does."""
    users = [r["user_id"] for r in churn(base_url)]
    _, top = expected_drift(cfg, driver, users)
    other = "SET n.embedding_version = 'another-version', n.embedding = [x IN n.embedding | -x]"
    undo = "SET n.embedding_version = $v, n.embedding = [x IN n.embedding | -x]"
    with driver.session(database=cfg.neo4j_database) as s:
        s.run(f"MATCH (n:Item) WHERE n.id IN $ids {other}", ids=top[:3]).consume()
        s.run(f"MATCH (n:User {{id: $id}}) {other}", id=users[0]).consume()
    try:
        rows = churn(base_url)
        expected, _ = expected_drift(cfg, driver, users)
        assert expected[users[0]] is None and sum(v is not None for v in expected.values()) == len(users) - 1
        assert_drifts(rows, expected)
    finally:
        with driver.session(database=cfg.neo4j_database) as s:
            s.run(f"MATCH (n:Item) WHERE n.id IN $ids {undo}", ids=top[:3], v=demo).consume()
            s.run(f"MATCH (n:User {{id: $id}}) {undo}", id=users[0], v=demo).consume()



@pytest.fixture(scope="module")
def retail_version(cfg, driver, demo):
    """Online Retail's recommended filter and item biases with the README's live trend, trained on the
    demo (it changes the current model: the tests that use it come last)."""
    return publish_retail_version(driver, cfg, item_bias=0.2, trend_weight=0.2)


def test_biases_and_the_trend_on_the_demos_dates_are_served_as_scored(cfg, driver, retail_version, base_url):
    """On the demo's December 2010 events served today, the REST answers are the offline Scorer's, the
    trend anchored at the data's last event as training anchors it (anchored at today, 2^(-age /
    half-life) is 0 for every item); explain's parts and the item's bias add up to each score."""
    lm = retail_version
    answers = {user: (ids, scores) for user, ids, scores in offline_answers(driver, cfg, lm, 1, 5)}
    with driver.session(database=cfg.neo4j_database) as s:  # `because` shows all of a few items' parts
        few = s.run("MATCH (u:User)-[a:INTERACTED]->() WHERE a.w > 0 WITH u, count(a) AS n WHERE n <= 3 "
                    "RETURN collect(u.id)[..8] AS ids").single()["ids"]
    assert few
    for user in sorted(answers)[::40] + few:
        answer = requests.get(f"{base_url}/v1/users/{user}/recommendations", params={"k": 5, "explain": "true"},
                              timeout=30).json()
        assert answer["version"] == lm.version
        assert_ranking(answer["results"], *answers[user])
        for r in answer["results"]:
            assert r["bias"] is not None
            if user in few:
                size = sum(abs(b["contribution"]) for b in r["because"]) + abs(r["bias"])
                assert sum(b["contribution"] for b in r["because"]) + r["bias"] == pytest.approx(
                    r["score"], abs=1e-6 * size)


def test_trending_answers_rank_by_decayed_popularity_under_any_filter_weights(cfg, driver, retail_version, base_url):
    """A shopper without a vector gets the items TRENDING_ITEMS ranks (decayed popularity: the raw
    weights), not the log(1 + w) degrees the version's graph filter reads."""
    answer = requests.get(f"{base_url}/v1/users/nobody/recommendations", params={"k": 10}, timeout=30).json()
    with driver.session(database=cfg.neo4j_database) as s:
        want = s.run(cypher.TRENDING_ITEMS, k=10, user_id="nobody", category=None, max_price=None,
                     exclude_seen=True).data()
    assert answer["source"] == "trending" and models.current(driver, cfg).version == retail_version.version
    assert_ranking(answer["results"], [r["item_id"] for r in want], [r["score"] for r in want])
