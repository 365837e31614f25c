"""Items without a trained row, served from their content over real HTTP against the real server: an
item put with metadata and no edges is embedded by the next refresh run, found among the similar items
of a content-alike item, ranked as the offline Scorer ranks it, and embedded again when its metadata
changes."""
from __future__ import annotations

import copy
import random
import time
from dataclasses import replace

import numpy as np
import pytest
import requests

from app.embeddings import models, store
from app.embeddings.refresh import refresh
from app.embeddings.training import train_and_publish, weights
from app.ingest import pipeline
from app.worker import Worker
from graph_models.train import Scorer
from support.refresh import max_error
from tests.conftest import SERVICE, wipe
from tests.test_serving import assert_ranking

KINDS = ("heart holder", "cake stand", "jumbo bag", "enamel mug")
PER_KIND, USERS = 15, 80
NOW = 1_767_225_600_000  # 2026-01-01
TOLERANCE = 1e-9


def _item(k: int) -> dict:
    kind = KINDS[k % len(KINDS)]
    return {"item_id": f"i{k}", "title": f"{kind} colour {k}", "category": kind.split()[-1], "price": 2.0 + k % 4}


def _events(rng: random.Random) -> list[dict]:
    """Each shopper buys within one kind, so that items of a kind are alike by co-purchases too."""
    out = []
    for u in range(USERS):
        kind = u % len(KINDS)
        for n in range(6):
            k = kind + len(KINDS) * rng.randrange(PER_KIND)
            out.append({"event_id": f"c{u}-{n}", "user_id": f"u{u}", "item_id": f"i{k}", "type": "purchase",
                        "quantity": 1, "ts": NOW - rng.randrange(30 * 86_400_000)})
    return out


def get(base_url, path: str, **params) -> dict:
    """A GET answer's JSON, asked again while the serving copy (re)loads (503 with Retry-After)."""
    for _ in range(60):
        reply = requests.get(f"{base_url}{path}", params=params, timeout=30)
        if reply.status_code != 503:
            assert reply.status_code == 200, reply.text
            return reply.json()
        time.sleep(float(reply.headers.get("Retry-After", 1)))
    raise AssertionError(f"{path} still loading")


def put(base_url, items):
    return requests.put(f"{base_url}/v1/items", json=items, headers=SERVICE, timeout=10)


def run_refresh(driver, cfg):
    with Worker(cfg).holding() as holder:
        return refresh(driver, cfg, models.current(driver, cfg), owner=holder.owner)


@pytest.fixture(scope="module")
def trained(cfg, driver, base_url):
    """Four kinds of items bought within their kind, with metadata, and a version trained on them (its
    content part the default, learned)."""
    wipe(driver, cfg.neo4j_database)
    pipeline.ingest(driver, cfg, _events(random.Random(5)))
    assert put(base_url, [_item(k) for k in range(len(KINDS) * PER_KIND)]).status_code == 200
    with Worker(cfg).holding() as holder:
        result = train_and_publish(driver, cfg, progress=False, owner=holder.owner, epochs=1)
    lm = models.load(result["checkpoint"], result["version"])
    assert lm.model.content is not None
    return lm


def stored(driver, cfg, item_id: str) -> dict:
    with driver.session(database=cfg.neo4j_database) as s:
        return s.run("MATCH (n {id: $id}) RETURN properties(n) AS p", id=item_id).single()["p"]


def test_an_item_put_without_edges_is_embedded_by_the_next_run_and_found_similar(trained, cfg, driver, base_url):
    new = {"item_id": "new-stand", "title": "cake stand colour 99", "category": "stand", "price": 3.0}
    assert put(base_url, [new]).status_code == 200
    assert stored(driver, cfg, "new-stand").get("embedding_version") is None
    assert run_refresh(driver, cfg)["mode"] == "incremental"
    props = stored(driver, cfg, "new-stand")
    assert props["embedding_version"] == trained.version and props["ig_xnorm"] > 0
    assert max_error(driver, cfg, trained) < TOLERANCE
    # among the similar items of a cake stand, above every item of another kind; next to nothing for a bag
    stand = get(base_url, "/v1/items/i1/similar", k=30)["results"]
    at = [r["item_id"] for r in stand].index("new-stand")
    assert all(r["category"] == "stand" for r in stand[:at]) and stand[at]["score"] > 0, stand
    bag = get(base_url, "/v1/items/i2/similar", k=30)["results"]
    score = {r["item_id"]: r["score"] for r in bag}.get("new-stand", 0.0)
    assert score < 0.05 * stand[at]["score"], bag
    # its audience: the cake stands' shoppers (u1, u5, ...), through the stored vectors and the index
    audience = [r["user_id"] for r in get(base_url, "/v1/items/new-stand/audience", k=10)["results"]]
    assert len(audience) == 10 and sum(int(u[1:]) % len(KINDS) == 1 for u in audience) >= 8, audience
    # and its own similar items are cake stands
    own = get(base_url, "/v1/items/new-stand/similar", k=10)
    assert all(r["category"] == "stand" for r in own["results"]), own


def offline(cfg, driver, lm, users: list[str], model=None, mix: bool = True) -> dict:
    """The offline Scorer's scores of `users` (by `model`, the version's by default), with the rows from
    content of the items that take them, scored by the mix of full scores (or, without `mix`, by rows)."""
    with driver.session(database=cfg.neo4j_database) as s:
        snap = s.execute_read(lambda tx: store.export(tx))
    # column k is the version's item k: the version's items in its order, new ones after them
    known = {i: k for k, i in enumerate(lm.meta["item_ids"])}
    perm = sorted(range(len(snap.items)), key=lambda j: known.get(snap.items[j]["id"], len(known) + j))
    items = [snap.items[j] for j in perm]
    graph = weights(snap, lm.meta)[:, perm]
    content = lm.cold(items)
    assert (content.a is not None) == lm.mixes
    rows = [snap.user_ids.index(u) for u in users]
    scores = Scorer(model or lm.model, graph, content=content if mix else content._replace(a=None))(rows)
    scores = scores.numpy().astype(np.float64)
    return {"items": items, "scores": scores, "seen": [set(graph[r].indices) for r in rows], "cold": content[0]}


def test_a_shopper_of_new_items_only_gets_a_vector_and_rest_equals_the_offline_ranking(trained, cfg, driver,
                                                                                        base_url):
    new = [{"item_id": "new-bag", "title": "jumbo bag colour 98", "category": "bag"},
           {"item_id": "new-mug", "title": "enamel mug colour 97", "category": "mug"}]
    assert put(base_url, new).status_code == 200
    pipeline.ingest(driver, cfg, [
        {"event_id": "n1", "user_id": "newcomer", "item_id": "new-bag", "type": "purchase", "ts": NOW},
        {"event_id": "n2", "user_id": "u3", "item_id": "new-mug", "type": "purchase", "ts": NOW}])
    run_refresh(driver, cfg)
    user = stored(driver, cfg, "newcomer")
    assert user["embedding_version"] == trained.version and user["ig_norm"] > 0  # not a zero vector
    assert max_error(driver, cfg, trained) < TOLERANCE
    users = ["newcomer", "u3", "u1", "u2"]
    want = offline(cfg, driver, trained, users)
    assert {want["items"][c]["id"] for c in want["cold"]} >= {"new-bag", "new-mug"}
    for n, u in enumerate(users):
        answer = get(base_url, f"/v1/users/{u}/recommendations", k=10)
        assert answer["source"] == "personal"
        s = want["scores"][n].copy()
        s[list(want["seen"][n])] = -np.inf
        order = np.argsort(-s, kind="stable")[:10]
        assert_ranking(answer["results"], [want["items"][j]["id"] for j in order], s[order])
    # the newcomer's bag is like the other bags: they are what it is recommended
    answer = get(base_url, "/v1/users/newcomer/recommendations", k=5, explain="true")
    assert all(r["category"] == "bag" for r in answer["results"]), answer
    assert all(b["from_content"] for r in answer["results"] for b in r["because"])
    for r in answer["results"]:  # one own item: its part is the whole score (no biases in this version)
        assert r["because"][0]["contribution"] == pytest.approx(r["score"] - r.get("bias", 0.0), rel=1e-6)
    # a new item recommended is said to be scored from its content
    mugs = get(base_url, "/v1/users/u7/recommendations", k=20, explain="true")["results"]
    flagged = {r["item_id"]: r["from_content"] for r in mugs}
    assert flagged.get("new-mug") is True and "reason" in next(r for r in mugs if r["item_id"] == "new-mug")
    assert not any(v for i, v in flagged.items() if i != "new-mug" and not i.startswith("new-"))


def test_the_cypher_recipe_scores_a_new_item_by_its_rows_and_the_api_by_the_mix(trained, cfg, driver, base_url):
    """docs/cypher.md: the recipe scores an item without a trained row by its stored vector (its rows)
    plus its own filter, in GF-CF's form; the API, which mixes, scores it otherwise."""
    from tests.test_cypher_docs import bind, recipes
    _, params, query = next(r for r in recipes() if r[0] == "Recommendations for a shopper")
    gfcf = copy.deepcopy(trained.model)
    gfcf.cfg = replace(trained.mcfg, lin_weights="raw", lin_user_weights=None, lin_beta=0.5, lin_weight=1.0,
                       ease_weight=0.0, bias_temperature=0.0, trend_weight=0.0)
    users = ["u1", "u5", "u3"]  # cake stands' shoppers (new-stand: no edge) and new-mug's
    rows = offline(cfg, driver, trained, users, model=gfcf, mix=False)
    ids = [it["id"] for it in rows["items"]]
    differs = 0
    for n, user in enumerate(users):
        with driver.session(database=cfg.neo4j_database) as s:
            recipe = {r["item_id"]: r["score"] for r in s.run(query, **{**bind(s, params), "user_id": user, "k": 100})}
        api = {r["item_id"]: r["score"] for r in get(base_url, f"/v1/users/{user}/recommendations", k=100)["results"]}
        for item in ("new-stand", "new-mug"):
            if item in recipe:
                assert recipe[item] == pytest.approx(rows["scores"][n][ids.index(item)], rel=1e-4, abs=1e-6)
                differs += abs(recipe[item] - api[item]) > 1e-4 * max(abs(api[item]), 1e-6)
    assert differs


def test_a_metadata_change_embeds_the_item_and_its_shoppers_again(trained, cfg, driver, base_url):
    before, shopper = stored(driver, cfg, "new-bag"), stored(driver, cfg, "newcomer")
    changed = {"item_id": "new-bag", "title": "heart holder colour 98", "category": "holder"}
    assert put(base_url, [changed]).status_code == 200
    run = run_refresh(driver, cfg)
    assert run["mode"] == "incremental" and run["users"] >= 1
    after = stored(driver, cfg, "new-bag")
    assert after["embedding"] != before["embedding"]
    assert stored(driver, cfg, "newcomer")["embedding"] != shopper["embedding"]
    assert max_error(driver, cfg, trained) < TOLERANCE
    answer = get(base_url, "/v1/users/newcomer/recommendations", k=5)
    assert all(r["category"] == "holder" for r in answer["results"]), answer


@pytest.mark.parametrize("item,field", [
    ({"title": "x" * 100_000}, "title"), ({"title": 12}, "title"), ({"price": "cheap"}, "price"),
    ({"price": -1}, "price"), ({"category": ["stand"]}, "category"), ({"attributes": ["a", "b"]}, "attributes"),
    ({"attributes": {"size": {"w": 3}}}, "attributes.size"),
])
def test_bad_metadata_is_rejected_naming_the_field(trained, base_url, item, field):
    reply = put(base_url, [{"item_id": "bad-item", **item}])
    assert 400 <= reply.status_code < 500 and reply.json()["error"]["field"] == field, reply.text


class _Version:
    """A stand-in for LoadedModel.cold: items with a title take the row [len(title), 1]."""

    @staticmethod
    def cold(metas):
        pos = np.array([k for k, m in enumerate(metas) if m.get("title")], dtype=np.int64)
        rows = np.array([[len(metas[k]["title"]), 1.0] for k in pos]).reshape(len(pos), 2)
        return pos, rows, 2 * rows, None  # by rows (no attention)


def test_the_copys_rows_from_content_follow_what_each_sync_reads():
    from app.serving.content import ContentRows
    rows = ContentRows.empty(0, 2).updated(_Version, [{"id": "a", "title": "ab"}, {"id": "b"}], [0, 1], 3)
    assert rows.at.tolist() == [0, -1, -1] and rows.cols.tolist() == [0]
    rows = rows.updated(_Version, [{"id": "c", "title": "abcd"}], [2], 4)  # a new item, the first kept
    assert rows.at.tolist() == [0, -1, 1, -1] and rows.x[:, 0].tolist() == [2, 4]
    rows = rows.updated(_Version, [{"id": "a"}, {"id": "b", "title": "x"}], [0, 1], 4)  # a lost, b gained
    assert rows.at.tolist() == [-1, 1, 0, -1] and rows.x[:, 0].tolist() == [4, 1]
    table = np.zeros((4, 2))
    assert rows.x_rows(np.array([1, 3]), table[[1, 3]]).tolist() == [[1, 1], [0, 0]]
    p = np.array([1.0, 0.0])
    assert rows.low(p, np.zeros(4)).tolist() == [0, 2, 8, 0]
    assert rows.low(p, np.zeros(2), np.array([2, 3])).tolist() == [8, 0]
