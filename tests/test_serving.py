"""Serving over real HTTP against the real server: personal and trending answers, filters, explain, batch."""
from __future__ import annotations

import random
from datetime import datetime

import numpy as np
import pytest
import requests

from app.embeddings import models, store
from app.embeddings.training import train_and_publish, weights
from app.ingest import pipeline, writer
from app.worker import Worker
from graph_models.train import Scorer
from support.ranking import mismatch
from support.recipes import recipe
from tests.conftest import wipe

USERS, ITEMS = 60, 40
NOW = 1_767_225_600_000  # 2026-01-01


def _events(rng, n):
    return [{"event_id": f"s{k}", "user_id": f"u{rng.randrange(USERS)}", "item_id": f"i{rng.randrange(ITEMS)}",
             "type": rng.choice(["view", "click", "cart", "purchase"]), "quantity": rng.randint(1, 3),
             "ts": NOW - rng.randrange(60 * 86_400_000)} for k in range(n)]


@pytest.fixture(scope="module")
def served(cfg, driver):
    """A small graph with titles, categories and prices, a trained current model, every node embedded;
    plus a shopper `returner` whose only edge is a return (no vector)."""
    wipe(driver, cfg.neo4j_database)
    pipeline.ingest(driver, cfg, _events(random.Random(13), 450))
    writer.upsert_items(driver, cfg.neo4j_database, [
        {"id": f"i{k}", "props": {"title": f"thing {k}", "category": f"c{k % 4}", "price": 1.0 + k}}
        for k in range(ITEMS)])
    with Worker(cfg).holding() as holder:
        result = train_and_publish(driver, cfg, progress=False, owner=holder.owner, epochs=1)
    pipeline.ingest(driver, cfg, [{"event_id": "r1", "user_id": "returner", "item_id": "i0", "type": "return",
                                   "ts": NOW}])
    with Worker(cfg).holding() as holder:
        from app.embeddings.refresh import refresh
        refresh(driver, cfg, models.current(driver, cfg), owner=holder.owner)
    return result["version"]


@pytest.fixture(scope="module")
def offline(cfg, driver, served):
    """The offline Scorer's scores of every user over every item, with the ids and item metadata."""
    lm = models.current(driver, cfg)
    with driver.session(database=cfg.neo4j_database) as s:
        snap = s.execute_read(lambda tx: store.export(tx))
    graph = weights(snap, lm.meta)
    users = [k for k, u in enumerate(snap.user_ids) if u != "returner"]
    scores = Scorer(lm.model, graph)(users).numpy().astype(np.float64)
    return {"users": [snap.user_ids[k] for k in users], "scores": scores, "items": snap.items,
            "seen": [set(graph[k].indices) for k in users]}


def get(base_url, path, **params):
    return requests.get(f"{base_url}{path}", params=params, timeout=30)


def expected_top(offline, user, k, category=None, max_price=None, exclude_seen=True):
    row = offline["users"].index(user)
    scores = offline["scores"][row].copy()
    for j, item in enumerate(offline["items"]):
        if (category is not None and item["category"] != category) or \
                (max_price is not None and item["price"] > max_price) or (exclude_seen and j in offline["seen"][row]):
            scores[j] = -np.inf
    order = [j for j in np.argsort(-scores, kind="stable") if np.isfinite(scores[j])][:k]
    return [offline["items"][j]["id"] for j in order], scores[order]


def assert_ranking(got: list[dict], ids: list[str], scores) -> None:
    """A served answer is the expected ranking (support.ranking.mismatch)."""
    problem = mismatch(got, ids, scores)
    assert problem is None, problem


@pytest.mark.parametrize("params", [{}, {"category": "c1"}, {"max_price": 12}, {"category": "c2", "max_price": 30},
                                    {"exclude_seen": "false"}, {"exclude_seen": "false", "category": "c3"}])
def test_personal_recommendations_with_filters_are_the_exact_top_k(served, offline, base_url, params):
    """Filters and exclusion are applied before the cut: k items whenever k qualify, the exact top k."""
    k, full = 4, 0
    for user in offline["users"][::12]:
        answer = get(base_url, f"/v1/users/{user}/recommendations", k=k, **params).json()
        assert answer["user_id"] == user and answer["source"] == "personal" and answer["version"] == served
        assert datetime.fromisoformat(answer["refreshed_at"].replace("Z", "+00:00"))
        ids, scores = expected_top(offline, user, k, params.get("category"), params.get("max_price"),
                                   params.get("exclude_seen") != "false")
        full += len(ids) == k
        assert_ranking(answer["results"], ids, scores)  # as many as qualify, up to k
        for r in answer["results"]:
            assert r["title"].startswith("thing") and "because" not in r
            assert params.get("category") in (None, r["category"])
            assert r["price"] <= params.get("max_price", np.inf)
    assert full >= 3  # most users have k qualifying items


def test_explain_gives_the_users_own_items_whose_parts_add_up_to_the_score(cfg, driver, served, offline, base_url):
    user = offline["users"][3]
    answer = get(base_url, f"/v1/users/{user}/recommendations", k=5, explain="true").json()
    row = offline["users"].index(user)
    own = {offline["items"][j]["id"] for j in offline["seen"][row]}
    for r in answer["results"]:
        because = r["because"]
        assert 1 <= len(because) <= 3 and {b["item_id"] for b in because} <= own
        assert [b["contribution"] for b in because] == sorted((b["contribution"] for b in because), reverse=True)
        assert all(b["weight"] > 0 and b["title"].startswith("thing") for b in because)
    _, query = recipe("Why an item is recommended")  # docs/cypher.md: every part, not only the top three
    with driver.session(database=cfg.neo4j_database) as s:
        parts = {x["item_id"]: x["because"] for x in s.run(query, user_id=user, top=1000,
                                                            item_ids=[r["item_id"] for r in answer["results"]])}
    for r in answer["results"]:
        assert len(parts[r["item_id"]]) == len(own)
        # Neo4j's vector.similarity.cosine works in float32: parts agree to ~1e-7 of their size.
        size = sum(abs(p["contribution"]) for p in parts[r["item_id"]])
        assert sum(p["contribution"] for p in parts[r["item_id"]]) == pytest.approx(r["score"], abs=1e-5 * size)
        assert [b["item_id"] for b in r["because"]] == [p["item_id"] for p in parts[r["item_id"]][:3]]


def test_unknown_user_gets_trending_items(cfg, driver, served, base_url):
    with driver.session(database=cfg.neo4j_database) as s:
        degrees = {r["id"]: r for r in s.run("MATCH (i:Item) RETURN i.id AS id, i.ig_deg AS deg, "
                                             "i.category AS category, i.price AS price").data()}
    ranked = sorted(degrees.values(), key=lambda r: -r["deg"])
    answer = get(base_url, "/v1/users/nobody/recommendations", k=5).json()
    assert answer["source"] == "trending" and answer["user_id"] == "nobody" and answer["refreshed_at"] is None
    assert [r["item_id"] for r in answer["results"]] == [r["id"] for r in ranked[:5]]
    assert answer["results"][0]["score"] == 1.0
    assert [r["score"] for r in answer["results"]] == pytest.approx([r["deg"] / ranked[0]["deg"] for r in ranked[:5]])
    filtered = get(base_url, "/v1/users/nobody/recommendations", k=5, category="c1", max_price=30).json()
    want = [r["id"] for r in ranked if r["category"] == "c1" and r["price"] <= 30][:5]
    assert len(want) == 5 and [r["item_id"] for r in filtered["results"]] == want


def test_user_without_a_vector_gets_trending_without_their_items(served, base_url):
    answer = get(base_url, "/v1/users/returner/recommendations", k=ITEMS).json()
    assert answer["source"] == "trending"
    assert "i0" not in {r["item_id"] for r in answer["results"]}
    kept = get(base_url, "/v1/users/returner/recommendations", k=ITEMS, exclude_seen="false").json()
    assert len(kept["results"]) == len(answer["results"]) + 1


def test_batch_equals_the_single_user_answers(served, offline, base_url):
    users = offline["users"][:3] + ["nobody"]
    body = {"user_ids": users, "k": 4, "category": "c0", "explain": True}
    answer = requests.post(f"{base_url}/v1/recommendations", json=body, timeout=30)
    assert answer.status_code == 200
    results = answer.json()["results"]
    assert list(results) == users
    for user in users:
        single = get(base_url, f"/v1/users/{user}/recommendations", k=4, category="c0", explain="true").json()
        single.pop("user_id")
        assert results[user] == single


@pytest.mark.parametrize("body,field", [
    ({"user_ids": []}, "user_ids"), ({"user_ids": "u1"}, "user_ids"), ({"user_ids": ["u1"] * 101}, "user_ids"),
    ({"user_ids": ["u1"], "k": 0}, "k"), ({"user_ids": ["u1"], "max_price": -2}, "max_price"),
    ({"user_ids": ["u1"], "colour": "red"}, "colour"), ({}, "user_ids")])
def test_batch_bad_bodies_are_400_naming_the_field(served, base_url, body, field):
    answer = requests.post(f"{base_url}/v1/recommendations", json=body, timeout=30)
    assert answer.status_code == 400 and answer.json()["error"]["field"] == field, answer.text


def test_batch_body_that_is_not_json_is_400(served, base_url):
    answer = requests.post(f"{base_url}/v1/recommendations", data="{not json",
                           headers={"Content-Type": "application/json"}, timeout=30)
    assert answer.status_code == 400 and answer.json()["error"]["status"] == 400


def test_similar_items_with_a_filter(served, base_url):
    full = get(base_url, "/v1/items/i5/similar", k=ITEMS).json()["results"]
    answer = get(base_url, "/v1/items/i5/similar", k=5, category="c2", max_price=35).json()
    want = [r["item_id"] for r in full if r["category"] == "c2" and r["price"] <= 35][:5]
    assert len(want) == 5 and [r["item_id"] for r in answer["results"]] == want
    assert all(r["title"] and r["price"] is not None for r in answer["results"])


def test_unknown_items_are_404(served, base_url):
    for path in ("/v1/items/nothing/similar", "/v1/items/nothing/audience"):
        answer = get(base_url, path)
        assert answer.status_code == 404 and answer.json()["error"]["field"] == "item_id"


def test_audience_excludes_known_users_unless_asked(cfg, driver, served, base_url):
    with driver.session(database=cfg.neo4j_database) as s:
        known = {r["u"] for r in s.run("MATCH (u:User)-[:INTERACTED]->(:Item {id: 'i7'}) RETURN u.id AS u")}
    without = get(base_url, "/v1/items/i7/audience", k=USERS).json()["results"]
    with_known = get(base_url, "/v1/items/i7/audience", k=USERS, include_known="true").json()["results"]
    assert without and not {r["user_id"] for r in without} & known
    assert {r["user_id"] for r in with_known} & known


def test_interests_shares_add_up_and_unknown_is_404(cfg, driver, served, offline, base_url):
    user = offline["users"][5]
    answer = get(base_url, f"/v1/users/{user}/interests", k=100).json()
    assert answer["version"] == served and answer["refreshed_at"] and answer["history"] == []
    weights = [r["weight"] for r in answer["items"]]
    assert weights == sorted(weights, reverse=True) and sum(weights) == pytest.approx(1.0, abs=1e-5)
    row = offline["users"].index(user)
    assert {r["item_id"] for r in answer["items"]} == {offline["items"][j]["id"] for j in offline["seen"][row]}
    by_category = {}
    for r in answer["items"]:
        by_category[r["category"]] = by_category.get(r["category"], 0.0) + r["weight"]
    assert {c["category"]: c["weight"] for c in answer["categories"]} == pytest.approx(by_category)
    top = get(base_url, f"/v1/users/{user}/interests", k=2).json()
    assert top["items"] == answer["items"][:2] and len(top["categories"]) == 2
    assert get(base_url, "/v1/users/nobody/interests").status_code == 404
    plain = get(base_url, "/v1/users/returner/interests").json()  # no positive weight, no vector
    assert plain["version"] is None and plain["items"] == [] and plain["history"] == []


def _vector(driver, cfg, user):
    with driver.session(database=cfg.neo4j_database) as s:
        return np.asarray(s.run("MATCH (u:User {id: $id}) RETURN u.embedding AS e", id=user).single()["e"])


def test_interest_history_records_each_move_bounded(cfg, driver, served, base_url):
    """Each refresh that moves the vector appends its cosine distance; only the last few are kept.
    (Changes the graph: keep this test and those after it last.)"""
    from app.config import load_config
    from app.embeddings.refresh import refresh
    short = load_config(interest_history=2, full_share=10.0)
    lm = models.current(driver, cfg)
    rng = random.Random(5)
    moves = []
    for step in range(3):
        before = _vector(driver, cfg, "u9")
        pipeline.ingest(driver, cfg, [{"event_id": f"h{step}", "user_id": "u9", "item_id": f"i{rng.randrange(ITEMS)}",
                                       "type": "purchase", "quantity": 3, "ts": NOW + step}])
        with Worker(cfg).holding() as holder:
            assert refresh(driver, short, lm, owner=holder.owner)["mode"] == "incremental"
        after = _vector(driver, cfg, "u9")
        moves.append(1 - float(before @ after / np.linalg.norm(before) / np.linalg.norm(after)))
    history = get(base_url, "/v1/users/u9/interests").json()["history"]
    assert len(history) == 2 and [h["drift"] for h in history] == pytest.approx(moves[1:], abs=1e-6)
    stamps = [datetime.fromisoformat(h["at"]) for h in history]
    assert stamps == sorted(stamps)


def test_churn_risk_with_reasons(served, base_url):
    answer = get(base_url, "/v1/users/churn-risk", k=USERS).json()["results"]
    assert answer and [r["score"] for r in answer] == sorted((r["score"] for r in answer), reverse=True)
    for r in answer:
        why = r["reasons"]
        assert why["overdue"] == r["score"] and why["silent_days"] >= 0 and why["typical_gap_days"] >= 0
        assert why["frequency_trend"] == (None if not why["previous_items"] else
                                          round((why["recent_items"] - why["previous_items"]) / why["previous_items"], 3))
        assert 0 <= why["drift_from_demand"] <= 1
    moved = next(r for r in answer if r["user_id"] == "u9")["reasons"]
    assert moved["refreshes"] == 2 and moved["vector_moved"] > 0
    assert get(base_url, "/v1/users/churn-risk", k=0).status_code == 400
