"""Demo data in the real Neo4j: load, train, embed --full, then serve from the vector indexes."""
from __future__ import annotations

import gzip
import itertools
import json
import subprocess
import sys

import pytest
import requests

from app.config import ROOT
from tests.conftest import wipe

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
    assert "held-out Recall@20" in trained and "popularity" in trained
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
    """What is evaluated is what is served: the API's top k is the offline Scorer's top k."""
    import numpy as np

    from app.embeddings import models, store
    from app.embeddings.training import weights
    from graph_models.train import Scorer
    lm = models.current(driver, cfg)
    with driver.session(database=cfg.neo4j_database) as s:
        snap = s.execute_read(lambda tx: store.export(tx))
    assert [it["id"] for it in snap.items] == lm.meta["item_ids"]  # no item is new since training
    graph = weights(snap, lm.meta)
    scorer = Scorer(lm.model, graph)
    active = np.flatnonzero(np.diff(graph.indptr))  # users with a positive weight have a vector
    users = active[:: max(1, len(active) // 12)][:12].tolist()
    scores = scorer(users).numpy()
    for row, u in zip(scores, users):
        row[graph[u].indices] = -np.inf  # the user's own items are never recommended
        expected = np.argsort(-row, kind="stable")[:10]
        got = requests.get(f"{base_url}/v1/users/{snap.user_ids[u]}/recommendations", params={"k": 10},
                           timeout=30).json()["results"]
        ids = [snap.items[j]["id"] for j in expected]
        assert [r["item_id"] for r in got] == ids or np.allclose(  # equal, or a near-tie swapped
            [r["score"] for r in got], row[expected], rtol=1e-4, atol=1e-6), (snap.user_ids[u], got, ids)
        assert np.allclose([r["score"] for r in got], row[expected], rtol=1e-4, atol=1e-6)


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


def test_churn_risk_over_http(demo, base_url):
    rows = requests.get(f"{base_url}/v1/users/churn-risk", params={"k": 5}, timeout=60).json()["results"]
    assert rows and rows == sorted(rows, key=lambda r: r["risk"], reverse=True)
    assert all(r["silent_days"] >= 0 and r["typical_gap_days"] >= 0 for r in rows)
