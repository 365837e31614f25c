"""Ingest: events -> idempotent, order-independent weighted edges, over real HTTP on the real server."""
from __future__ import annotations

import math
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from app import create_app
from app.ids import erasure_key, user_key
from app.ingest import decay, writer
from tests.conftest import PRIVACY, SERVICE

T0 = 1_600_000_000_000  # 2020-09-13, inside the decay range


def ev(k, user=None, item=None, type="purchase", ts=None, **extra):
    """A valid event; `k` makes the id."""
    return {"event_id": f"e{k}", "user_id": user or f"u{k % 7}", "item_id": item or f"i{k % 11}",
            "type": type, "ts": T0 + k * 60_000 if ts is None else ts, **extra}


def post(base_url, events):
    return requests.post(f"{base_url}/v1/events", json=events, headers=SERVICE, timeout=60)


def edges(driver, cfg):
    """Every INTERACTED edge's properties, without the per-transaction bookkeeping."""
    with driver.session(database=cfg.neo4j_database) as s:
        rows = s.run("MATCH (u:User)-[r:INTERACTED]->(i:Item) RETURN u.id AS u, i.id AS i, properties(r) AS p")
        return {(r["u"], r["i"]): {k: v for k, v in r["p"].items() if k not in ("changed_at", "rev", "ig_unseen")}
                for r in rows}


def count(driver, cfg, query, **params):
    with driver.session(database=cfg.neo4j_database) as s:
        return s.run(query, **params).single()[0]


def stats(base_url):
    return requests.get(f"{base_url}/v1/stats", timeout=10).json()


# --- idempotency ----------------------------------------------------------------

def test_duplicate_within_a_batch_counts_once(cfg, clean_db, base_url):
    body = post(base_url, [ev(1), ev(2), ev(1), ev(1, type="view")]).json()
    assert (body["accepted"], body["duplicates"]) == (2, 2)
    assert count(clean_db, cfg, "MATCH (e:Event) RETURN count(e)") == 2
    assert sum(p.get("n_purchase", 0) for p in edges(clean_db, cfg).values()) == 2
    assert "n_view" not in str(edges(clean_db, cfg))  # first occurrence wins


def test_duplicate_across_batches_and_retries_counts_once(cfg, clean_db, base_url):
    first = post(base_url, [ev(k) for k in range(20)]).json()
    before = edges(clean_db, cfg)
    retry = post(base_url, [ev(k) for k in range(10, 30)]).json()
    assert (first["accepted"], retry["accepted"], retry["duplicates"]) == (20, 10, 10)
    after = edges(clean_db, cfg)
    assert sum(p["n_purchase"] for p in after.values()) == 30
    again = post(base_url, [ev(k) for k in range(30)]).json()
    assert (again["accepted"], again["duplicates"]) == (0, 30)
    assert edges(clean_db, cfg) == after and before != after
    assert stats(base_url)["accepted"] == 30 and stats(base_url)["duplicates"] == 40


def test_eight_concurrent_clients_with_overlapping_batches(cfg, clean_db, base_url):
    events = [ev(k, user=f"u{k % 5}", item=f"i{k % 4}", type=random.Random(k).choice(["view", "cart", "purchase"]))
              for k in range(600)]

    def client(seed):
        rng = random.Random(seed)
        mine = rng.sample(events, 450)  # each client sends 3/4 of the events, in its own order
        with requests.Session() as session:
            return [session.post(f"{base_url}/v1/events", json=mine[j:j + 150], headers=SERVICE, timeout=60).json()
                    for j in range(0, len(mine), 150)]

    with ThreadPoolExecutor(8) as pool:
        replies = [r for batch in pool.map(client, range(8)) for r in batch]
    assert sum(r["accepted"] for r in replies) == 600
    assert sum(r["duplicates"] for r in replies) == 8 * 450 - 600
    assert count(clean_db, cfg, "MATCH (e:Event) RETURN count(e)") == 600
    concurrent = edges(clean_db, cfg)
    assert sum(p.get(f"n_{t}", 0) for p in concurrent.values() for t in ("view", "cart", "purchase")) == 600
    clean_db.execute_query("MATCH (n) WHERE NOT n:_Migration DETACH DELETE n", database_=cfg.neo4j_database)
    post(base_url, events)
    assert_same_edges(edges(clean_db, cfg), concurrent)


def assert_same_edges(a, b):
    """Identical edges; the float weight sum may differ in its last bits with addition order."""
    assert a.keys() == b.keys()
    for key in a:
        pa, pb = dict(a[key]), dict(b[key])
        assert pa.pop("w") == pytest.approx(pb.pop("w"), rel=1e-12, abs=0), key
        assert pa == pb, key


def test_shuffled_replay_gives_identical_edges(cfg, clean_db, base_url):
    rng = random.Random(7)
    types = ["view", "click", "cart", "purchase", "return"]
    events = [ev(k, user=f"u{k % 3}", item=f"i{k % 4}", type=rng.choice(types), ts=T0 + rng.randrange(10 ** 10),
                 quantity=rng.randint(1, 5)) for k in range(300)]
    for j in range(0, 300, 100):
        post(base_url, events[j:j + 100])
    ordered = edges(clean_db, cfg)
    for seed in (1, 2):
        clean_db.execute_query("MATCH (n) WHERE NOT n:_Migration DETACH DELETE n", database_=cfg.neo4j_database)
        shuffled = events[:]
        random.Random(seed).shuffle(shuffled)
        for j in range(0, 300, 37):
            post(base_url, shuffled[j:j + 37])
        assert_same_edges(edges(clean_db, cfg), ordered)


# --- weights, decay, change tracking ----------------------------------------------

def test_edge_weight_counts_and_change_tracking(cfg, clean_db, base_url):
    day = 86_400_000
    post(base_url, [ev(1, "u", "i", "view", ts=T0), ev(2, "u", "i", "purchase", ts=T0 + day, quantity=2),
                    ev(3, "u", "i", "return", ts=T0 + 2 * day, quantity=1),
                    ev(4, "u", "i", "cart", ts=T0 + 3 * day, weight=0.5)])
    with clean_db.session(database=cfg.neo4j_database) as s:
        r = s.run("MATCH (:User {id:'u'})-[r:INTERACTED]->(:Item {id:'i'}) RETURN properties(r) AS p").single()["p"]
    f = lambda ts: 2 ** ((ts - cfg.decay_anchor_ms) / (cfg.half_life_days * day))  # noqa: E731
    expected = math.fsum([1 * f(T0), 5 * 2 * f(T0 + day), -5 * f(T0 + 2 * day), 0.5 * f(T0 + 3 * day)])
    assert r["w"] == pytest.approx(expected, rel=1e-12)
    assert (r["n_view"], r["n_purchase"], r["n_return"], r["n_cart"], r["qty"]) == (1, 1, 1, 1, 1.0)
    assert (r["first_ts"], r["last_ts"], r["rev"]) == (T0, T0 + 3 * day, 1)
    assert r["changed_at"] > 0
    post(base_url, [ev(5, "u", "i", "view", ts=T0 - day)])
    with clean_db.session(database=cfg.neo4j_database) as s:
        r2 = s.run("MATCH (:User)-[r:INTERACTED]->() RETURN properties(r) AS p").single()["p"]
        nodes = s.run("MATCH (n) WHERE n:User OR n:Item RETURN collect(n.changed_at) AS c").single()["c"]
    assert (r2["rev"], r2["first_ts"], r2["n_view"]) == (2, T0 - day, 2) and r2["changed_at"] >= r["changed_at"]
    assert len(nodes) == 2 and all(nodes)


def test_decay_config_out_of_float_range_is_refused(cfg):
    with pytest.raises(decay.DecayRangeError, match="half-lives"):
        decay.check_config(type(cfg)(**{**cfg.__dict__, "half_life_days": 0.01}))
    with pytest.raises(decay.DecayRangeError, match="IG_DECAY_ANCHOR"):
        create_app(type(cfg)(**{**cfg.__dict__, "decay_anchor": "yesterday"}))


# --- validation ---------------------------------------------------------------------

BAD = [
    ({"event_id": None}, "event_id"), ({"event_id": 5}, "event_id"), ({"user_id": ""}, "user_id"),
    ({"user_id": {"a": 1}}, "user_id"), ({"item_id": [1]}, "item_id"), ({"type": 3}, "type"),
    ({"ts": "yesterday"}, "ts"), ({"ts": "2020-01-01T00:00:00"}, "ts"), ({"ts": True}, "ts"),
    ({"ts": "2999-01-01T00:00:00Z"}, "ts"), ({"quantity": "lots"}, "quantity"), ({"price": -1}, "price"),
    ({"weight": "heavy"}, "weight"),
]


@pytest.mark.parametrize("change,field", BAD, ids=[f"{f}={c[f]!r}" for c, f in BAD])
def test_malformed_field_is_rejected_by_name(cfg, clean_db, base_url, change, field):
    reply = post(base_url, [ev(1), {**ev(2), **change}])
    body = reply.json()
    assert reply.status_code == 422 and field in body["error"]["message"]
    assert body["rejected"] == [{"index": 1, "field": field, "error": body["rejected"][0]["error"]}]
    assert body["accepted"] == 1  # the valid event is committed, the rejected one left no trace
    assert count(clean_db, cfg, "MATCH (e:Event) RETURN collect(e.id)") == ["e1"]


def test_missing_field_is_rejected(cfg, clean_db, base_url):
    reply = post(base_url, [{k: v for k, v in ev(1).items() if k != "ts"}])
    body = reply.json()
    assert reply.status_code == 422 and body["accepted"] == 0
    assert body["rejected"][0]["field"] == "ts" and "required" in body["rejected"][0]["error"]
    assert count(clean_db, cfg, "MATCH (n) WHERE NOT n:_Migration AND NOT n:_IngestStats RETURN count(n)") == 0


@pytest.mark.parametrize("data,status,words", [
    ("not json", 400, "not valid JSON"), ('{"event_id": "x"}', 400, "JSON array"), ("[]", 400, "empty batch"),
    ("null", 400, "JSON array"), ("[1, 2", 400, "not valid JSON")])
def test_bad_body_writes_nothing(cfg, clean_db, base_url, data, status, words):
    reply = requests.post(f"{base_url}/v1/events", data=data, headers={"Content-Type": "application/json", **SERVICE})
    assert reply.status_code == status and words in reply.json()["error"]["message"]
    assert count(clean_db, cfg, "MATCH (n) WHERE NOT n:_Migration RETURN count(n)") == 0


def test_oversized_batch_is_413_and_writes_nothing(cfg, clean_db, serve):
    url = serve(type(cfg)(**{**cfg.__dict__, "batch_limit": 5}))
    reply = post(url, [ev(k) for k in range(6)])
    assert reply.status_code == 413 and "limit of 5" in reply.json()["error"]["message"]
    assert count(clean_db, cfg, "MATCH (n) WHERE NOT n:_Migration RETURN count(n)") == 0
    assert post(url, [ev(k) for k in range(5)]).json()["accepted"] == 5


# --- cleaning -------------------------------------------------------------------

def test_each_cleaning_reason_is_reported_and_counted(cfg, clean_db, base_url):
    future = int(time.time() * 1000) + int(cfg.max_future_seconds * 1000) + 3_600_000
    bot = [ev(100 + k, user="bot", ts=T0 + k * 10) for k in range(int(cfg.bot_events_per_minute) + 1)]
    batch = [ev(1, type="teleport"), ev(2, quantity=0), ev(3, type="return", quantity=-2),
             ev(4, quantity=cfg.max_quantity + 1), ev(5, price=cfg.max_price + 1), ev(6, ts=future),
             ev(7)] + bot
    body = post(base_url, batch).json()
    reasons = [q["reason"] for q in body["quarantined"]]
    assert reasons[:6] == ["unknown_type", "non_positive_quantity", "non_positive_quantity",
                           "quantity_outlier", "price_outlier", "future_ts"]
    assert reasons[6:] == ["bot"] * len(bot)
    assert body["accepted"] == 1 and body["rejected"] == []
    dropped = stats(base_url)["dropped"]
    assert dropped == {"unknown_type": 1, "non_positive_quantity": 2, "quantity_outlier": 1, "price_outlier": 1,
                       "future_ts": 1, "bot": len(bot)}
    assert count(clean_db, cfg, "MATCH (u:User {id: 'bot'}) RETURN count(u)") == 0
    # A user at exactly the limit is not a bot.
    assert post(base_url, bot[1:]).json()["accepted"] == len(bot) - 1


def test_extra_type_from_config(cfg, clean_db, serve):
    url = serve(type(cfg)(**{**cfg.__dict__, "type_weights": {**cfg.type_weights, "wishlist": 2.0}}))
    assert post(url, [ev(1, "u", "i", "wishlist")]).json()["accepted"] == 1
    assert edges(clean_db, cfg)[("u", "i")]["n_wishlist"] == 1


# --- items, erasure, pseudonymisation --------------------------------------------

def test_item_upsert_stores_metadata_and_marks_only_real_changes(cfg, clean_db, base_url):
    put = lambda items: requests.put(f"{base_url}/v1/items", json=items, headers=SERVICE, timeout=10)  # noqa: E731
    assert put([{"item_id": "i1", "title": "Mug", "price": 3.5, "attributes": {"color": "red", "size": 2}},
                {"item_id": "i2", "category": "toys"}]).json() == {"upserted": 2, "changed": 2, "rejected": []}
    read = "MATCH (i:Item {id: 'i1'}) RETURN properties(i)"
    first = count(clean_db, cfg, read)
    assert (first["title"], first["price"], first["attr_color"], first["attr_size"]) == ("Mug", 3.5, "red", 2)
    assert first["rev"] == 1 and first["ig_unseen"]  # a new revision for the refresh job to find
    assert put([{"item_id": "i1", "title": "Mug", "price": 3.5}]).json()["changed"] == 0
    same = count(clean_db, cfg, read)
    assert (same["changed_at"], same["rev"]) == (first["changed_at"], 1)
    assert put([{"item_id": "i1", "price": 4.0}]).json()["changed"] == 1
    changed = count(clean_db, cfg, read)
    assert changed["rev"] == 2 and changed["changed_at"] >= first["changed_at"]
    bad = put([{"item_id": "i3", "attributes": {"nested": {"a": 1}}}, {"item_id": "i4", "price": "free"}])
    assert bad.status_code == 422 and [r["field"] for r in bad.json()["rejected"]] == ["attributes.nested", "price"]


def test_user_deletion_is_idempotent_and_leaves_no_trace(cfg, clean_db, base_url):
    post(base_url, [ev(1, "alice", "i1"), ev(2, "alice", "i2"), ev(3, "bob", "i1")])
    revs = "MATCH (i:Item) RETURN collect([i.id, i.rev]) AS revs"
    before = dict(count(clean_db, cfg, revs))
    for _ in range(2):
        assert requests.delete(f"{base_url}/v1/users/alice", headers=PRIVACY, timeout=10).status_code == 204
    assert count(clean_db, cfg, "MATCH (u:User {id: 'alice'}) RETURN count(u)") == 0
    assert list(edges(clean_db, cfg)) == [("bob", "i1")]
    # Each item alice touched lost an edge: one new revision each, for the refresh to rebuild it.
    assert dict(count(clean_db, cfg, revs)) == {item: rev + 1 for item, rev in before.items()}
    # Event nodes keep only their id and claim time: nothing that leads back to the user.
    assert sorted(count(clean_db, cfg, "MATCH (e:Event) UNWIND keys(e) AS k RETURN collect(DISTINCT k)")) == [
        "at", "id"]
    assert count(clean_db, cfg, "MATCH (e:Event)--() RETURN count(e)") == 0
    # A retried old event of the erased user does not bring them back.
    assert post(base_url, [ev(1, "alice", "i1")]).json()["duplicates"] == 1


def _age_event_ids(driver, cfg, days):
    """Pretend every event id was claimed `days` earlier."""
    count(driver, cfg, "MATCH (e:Event) SET e.at = e.at - $ms RETURN count(e)", ms=int(days * 86_400_000))


def test_event_ids_are_kept_for_the_retention_window_then_purged(cfg, clean_db, base_url):
    post(base_url, [ev(1, "alice", "i1"), ev(2, "bob", "i1")])
    purge = lambda: writer.purge_event_ids(clean_db, cfg.neo4j_database, 7, batch=1, max_batches=10)  # noqa: E731
    assert purge() == 0 and post(base_url, [ev(1, "alice", "i1")]).json()["duplicates"] == 1
    _age_event_ids(clean_db, cfg, 6.9)
    assert purge() == 0  # still inside the window: still a duplicate
    assert post(base_url, [ev(1, "alice", "i1")]).json()["duplicates"] == 1
    _age_event_ids(clean_db, cfg, 0.2)
    post(base_url, [ev(3, "carol", "i2")])  # a fresh id stays
    assert purge() == 2 and count(clean_db, cfg, "MATCH (e:Event) RETURN collect(e.id)") == ["e3"]
    # The contract: a duplicate older than the window is no longer recognised.
    assert post(base_url, [ev(1, "alice", "i1")]).json()["accepted"] == 1
    assert edges(clean_db, cfg)[("alice", "i1")]["n_purchase"] == 2


def test_an_erased_user_never_comes_back_through_an_expired_event(cfg, clean_db, base_url):
    post(base_url, [ev(1, "alice", "i1"), ev(2, "alice", "i2")])
    writer.delete_user(clean_db, cfg.neo4j_database, "alice", secret=cfg.erasure_secret)  # what DELETE /v1/users/alice does
    _age_event_ids(clean_db, cfg, 30)
    assert writer.purge_event_ids(clean_db, cfg.neo4j_database, 7, batch=1000, max_batches=1) == 2
    # Both ids expired, yet the events happened before the erasure: dropped, counted as duplicates.
    body = post(base_url, [ev(1, "alice", "i1"), ev(2, "alice", "i2"), ev(3, "bob", "i1")]).json()
    assert (body["accepted"], body["duplicates"]) == (1, 2)
    assert count(clean_db, cfg, "MATCH (u:User {id: 'alice'}) RETURN count(u)") == 0
    # The erasure keeps a keyed hash of the key only.
    assert count(clean_db, cfg, "MATCH (x:_Erased) RETURN collect(x.key)") == [erasure_key(cfg.erasure_secret, "alice")]
    # A shopper who comes back after the erasure is a new user.
    assert post(base_url, [ev(4, "alice", "i3", ts=int(time.time() * 1000))]).json()["accepted"] == 1
    assert set(edges(clean_db, cfg)) == {("alice", "i3"), ("bob", "i1")}


def test_hmac_mode_stores_keyed_hashes_and_accepts_raw_ids(cfg, clean_db, serve):
    keyed = type(cfg)(**{**cfg.__dict__, "id_hmac_key": "s3cret"})
    url = serve(keyed)
    post(url, [ev(1, "alice", "i1")])
    stored = count(clean_db, cfg, "MATCH (u:User) RETURN collect(u.id)")
    assert stored == [user_key(keyed, "alice")] and len(stored[0]) == 64 and "alice" not in stored[0]
    assert user_key(cfg, "alice") == "alice"
    assert requests.delete(f"{url}/v1/users/alice", headers=PRIVACY, timeout=10).status_code == 204
    assert count(clean_db, cfg, "MATCH (u:User) RETURN count(u)") == 0


# --- bulk loaders ----------------------------------------------------------------
