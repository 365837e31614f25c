"""Incremental refresh against the real server: exactness against a full recompute, run by run."""
from __future__ import annotations

import dataclasses
import random
import time

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import cypher
from app.config import load_config
from app.embeddings import full, models, store
from app.embeddings.refresh import DEGREE_DELAY_MS, RunSize, degree_plan, refresh, take
from app.embeddings.training import train_and_publish
from app.ingest import pipeline, writer
from app.worker import Worker
from support.graph import wipe
from support.refresh import TYPES, events, max_error

SEED_NOW = 1_767_225_600_000  # 2026-01-01: the seed graph is the same in every example
_seq = iter(range(10**9))


@pytest.fixture(scope="module")
def trained(cfg, driver):
    """A small graph with a trained current model and every node embedded."""
    wipe(driver, cfg.neo4j_database)
    clean_db = driver
    rng = random.Random(7)
    pipeline.ingest(clean_db, cfg, events(rng, 600, 60, 40))
    # i40-i59 are put without edges: the version has no trained row for them, and its content part
    # (the default, learned) gives them rows from their metadata
    writer.upsert_items(clean_db, cfg.neo4j_database, [
        {"id": f"i{k}", "props": {"title": f"mug {k % 3}", "category": f"c{k % 4}", "price": 1.0 + k}}
        for k in range(60)])
    with Worker(cfg).holding() as holder:
        result = train_and_publish(clean_db, cfg, progress=False, owner=holder.owner, epochs=1)
    return models.load(result["checkpoint"], result["version"])


def make_current(cfg, driver, lm) -> None:
    """Put `lm` back as the current model, every node embedded by it (after a test switched versions)."""
    with Worker(cfg).holding() as holder:
        full.embed_full(driver, cfg, lm, owner=holder.owner, publish=True)


@pytest.fixture(scope="module")
def exact_cfg(cfg):
    """Never fall back to a full recompute, so every run exercises the delta path."""
    return load_config(full_share=10.0)


writes = [
    st.tuples(st.just("events"), st.integers(1, 6), st.integers(0, 10**6)),
    st.tuples(st.just("cancel"), st.integers(0, 70), st.integers(0, 10**6)),
    # trained items, items without a trained row (i40-i49 have metadata in the seed) and brand-new ones
    st.tuples(st.just("item"), st.integers(36, 55), st.integers(0, 10**6)),
    st.tuples(st.just("delete"), st.integers(0, 70), st.integers(0, 10**6)),
    st.tuples(st.just("recreate"), st.integers(0, 70), st.integers(0, 10**6)),
]
# A full run with writes committed in the middle of it: after its export or before its edge marks.
op = st.one_of(*writes, st.tuples(st.just("refresh"), st.just(0), st.integers(0, 1)),
               st.tuples(st.just("full"), st.sampled_from(["export", "marks"]),
                         st.lists(st.one_of(*writes), max_size=3)))
TOLERANCE = 1e-9  # the path is float64 end to end; measured differences are ~1e-15


def reset(driver, cfg, lm, owner: str) -> None:
    """The same small seed graph, embedded by `lm`, for every example: examples are independent."""
    with driver.session(database=cfg.neo4j_database) as s:
        s.run("MATCH (n) WHERE n:User OR n:Item OR n:Event OR n:_IngestStats "
              "CALL { WITH n DETACH DELETE n } IN TRANSACTIONS OF 10000 ROWS").consume()
    pipeline.ingest(driver, cfg, events(random.Random(7), 300, 60, 40, now=SEED_NOW))
    # and shoppers of items without a trained row, whose vectors hold those items' rows from content
    pipeline.ingest(driver, cfg, [{**e, "item_id": f"i4{e['item_id'][1:]}"}
                                  for e in events(random.Random(8), 30, 60, 10, now=SEED_NOW)])
    writer.upsert_items(driver, cfg.neo4j_database, [
        {"id": f"i{k}", "props": {"title": f"mug {k % 3}", "category": f"c{k % 4}"}} for k in range(40, 50)])
    refresh(driver, cfg, lm, full=True, owner=owner)


def cancel(driver, cfg, user: str, item: str, rng: random.Random) -> None:
    """Purchases, then returns that take the edge's weight back to exactly zero or below."""
    now = int(time.time() * 1000)
    batch = [{"event_id": f"c{next(_seq)}", "user_id": user, "item_id": item, "type": "purchase", "quantity": 1,
              "ts": now} for _ in range(rng.randint(1, 3))]
    batch += [{**e, "event_id": f"c{next(_seq)}", "type": "return"} for e in batch]
    pipeline.ingest(driver, cfg, batch)


def recreate(driver, cfg, user: str, rng: random.Random) -> None:
    """Erase a user, then bring the id back with an event on some of its items (after the erasure, so
    they count): the new node and edges start again at revision 1, as the old ones often were."""
    with driver.session(database=cfg.neo4j_database) as s:
        had = [r["i"] for r in s.run("MATCH (:User {id: $u})-->(i:Item) RETURN i.id AS i ORDER BY i", u=user)]
    writer.delete_user(driver, cfg.neo4j_database, user, secret=cfg.erasure_secret)
    items = rng.sample(had, rng.randint(1, len(had))) if had else [f"i{rng.randrange(50)}"]
    pipeline.ingest(driver, cfg, [{"event_id": f"re{next(_seq)}", "user_id": user, "item_id": i,
                                   "type": rng.choice(TYPES[:4]), "quantity": rng.randint(1, 3),
                                   "ts": int(time.time() * 1000) + 1000} for i in items])


def apply_write(driver, cfg, kind: str, n: int, seed: int) -> None:
    """One write of the exactness test's ops."""
    rng = random.Random(seed)
    if kind == "events":  # ids beyond the seed graph are brand-new users and items
        pipeline.ingest(driver, cfg, events(rng, n, 75, 50))
    elif kind == "cancel":
        cancel(driver, cfg, f"u{n}", f"i{rng.randrange(50)}", rng)
    elif kind == "item":
        writer.upsert_items(driver, cfg.neo4j_database, [
            {"id": f"i{n}", "props": {"title": f"mug {rng.randrange(9)}", "category": f"c{rng.randrange(6)}",
                                      "price": rng.random() * 50}}])
    elif kind == "delete":
        writer.delete_user(driver, cfg.neo4j_database, f"u{n}", secret=cfg.erasure_secret)
    else:
        recreate(driver, cfg, f"u{n}", rng)


def full_run_with_writes(driver, cfg, lm, owner: str, when: str, during: list) -> None:
    """A full run, with the writes `during` (callables) committed after its export (`when` "export") or
    before it marks the edges ("marks"), as concurrent clients would."""
    export, mark_edges = store.export, store.mark_edges

    def write_all():
        while during:
            during.pop(0)()

    def export_then_write(*args, **kwargs):
        snap = export(*args, **kwargs)
        write_all()
        return snap

    def write_then_mark(tx, rows):
        write_all()
        mark_edges(tx, rows)
    with pytest.MonkeyPatch.context() as patch:
        if when == "export":
            patch.setattr(store, "export", export_then_write)
        else:
            patch.setattr(store, "mark_edges", write_then_mark)
        assert full.embed_full(driver, cfg, lm, owner=owner)["mode"] == "full"
    write_all()  # a graph without edges to mark


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(op, min_size=1, max_size=6))
def test_incremental_equals_full_recompute(trained, exact_cfg, driver, lease, ops):
    """New users and items, repeats, returns that cancel purchases, metadata changes, erasures and ids
    erased then created again, with refreshes in between, some capped to a few users, and full runs
    with such writes committed in their middle: every stored value equals a full recompute. Items
    without a trained row take rows from their content, so metadata puts and changes move them and
    their shoppers' vectors. Each example starts from the same freshly embedded graph, so examples are
    independent and shrinking is meaningful."""
    assert trained.model.content is not None  # the version gives rows from content
    reset(driver, exact_cfg, trained, lease.owner)
    capped = dataclasses.replace(exact_cfg, refresh_max_users=3)
    for kind, n, seed in ops:
        if kind == "refresh":  # uncapped or capped (a few users, the rest left for later runs), alternately
            refresh(driver, capped if seed % 2 else exact_cfg, trained, owner=lease.owner)
        elif kind == "full":
            full_run_with_writes(driver, exact_cfg, trained, lease.owner, n,
                                 [lambda w=w: apply_write(driver, exact_cfg, *w) for w in seed])
        else:
            apply_write(driver, exact_cfg, kind, n, seed)
    while (run := refresh(driver, capped, trained, owner=lease.owner))["mode"] != "noop":
        assert run["mode"] == "incremental"
    assert max_error(driver, exact_cfg, trained) < TOLERANCE


@pytest.mark.parametrize("when", ["export", "marks"])
def test_a_user_erased_and_created_again_during_a_full_run_gets_its_own_vector(trained, exact_cfg, driver, lease,
                                                                               base_url, when):
    """Revisions restart at 1 on a node created again: a full run that exported an erased user must
    not write that user's vector on the new one of the same id, nor mark the new one's edges seen
    (its one edge has the old one's item and revision). The next run embeds the new user from its own
    edge: what /interests reads adds up to 1."""
    user = f"again-{next(_seq)}"
    first = {"event_id": f"{user}-1", "user_id": user, "item_id": "i3", "type": "view", "ts": int(time.time() * 1000)}
    pipeline.ingest(driver, exact_cfg, [first])
    refresh(driver, exact_cfg, trained, owner=lease.owner)
    again = {**first, "event_id": f"{user}-2", "type": "purchase", "quantity": 3, "ts": int(time.time() * 1000) + 1000}

    def erase_and_create_again():
        writer.delete_user(driver, exact_cfg.neo4j_database, user, secret=exact_cfg.erasure_secret)
        assert pipeline.ingest(driver, exact_cfg, [again]).accepted == 1
    full_run_with_writes(driver, exact_cfg, trained, lease.owner, when, [erase_and_create_again])
    refresh(driver, exact_cfg, trained, owner=lease.owner)
    assert max_error(driver, exact_cfg, trained) < TOLERANCE
    shares = requests.get(f"{base_url}/v1/users/{user}/interests", timeout=30).json()["items"]
    assert [s["item_id"] for s in shares] == ["i3"] and shares[0]["weight"] == pytest.approx(1.0, abs=1e-5)


def test_weights_that_cancel_leave_exactly_zero(trained, exact_cfg, driver, lease):
    """Purchases then returns across runs: degrees are summed again, not kept by differences, so a
    node whose weights all cancel has degree exactly 0 (and a user no vector), like a full recompute."""
    reset(driver, exact_cfg, trained, lease.owner)
    now = int(time.time() * 1000)
    for k, (kind, qty) in enumerate([("purchase", 1), ("purchase", 2), ("return", 1), ("return", 2)]):
        pipeline.ingest(driver, exact_cfg, [{"event_id": f"cz-{now}-{k}", "user_id": "zero-user",
                                             "item_id": "zero-item", "type": kind, "quantity": qty, "ts": now}])
        refresh(driver, exact_cfg, trained, owner=lease.owner)
    with driver.session(database=exact_cfg.neo4j_database) as s:
        row = s.run("MATCH (u:User {id: 'zero-user'})-[r]->(i:Item {id: 'zero-item'}) "
                    "RETURN r.w AS w, u.ig_deg AS ud, i.ig_deg AS d, u.embedding AS e").single()
    assert row["w"] <= 0 and row["ud"] == 0.0 and row["d"] == 0.0 and row["e"] is None
    assert max_error(driver, exact_cfg, trained) < TOLERANCE


def test_vectors_depend_on_the_version_not_on_the_process_settings(trained, exact_cfg, driver, lease):
    """A worker started with another half-life or decay anchor computes the same vectors for a version:
    the weights' scale is the version's (kept in its checkpoint), not the process's."""
    reset(driver, exact_cfg, trained, lease.owner)
    other = load_config(full_share=10.0, half_life_days=3.0, decay_anchor="2020-01-01T00:00:00Z")
    pipeline.ingest(driver, exact_cfg, events(random.Random(5), 40, 75, 50))
    assert refresh(driver, other, trained, owner=lease.owner)["mode"] == "incremental"
    assert trained.meta["half_life_days"] == exact_cfg.half_life_days != other.half_life_days
    assert max_error(driver, exact_cfg, trained) < TOLERANCE


def test_incremental_touches_only_the_affected_nodes(trained, exact_cfg, driver, lease):
    refresh(driver, exact_cfg, trained, owner=lease.owner)
    pipeline.ingest(driver, exact_cfg, [{"event_id": f"solo-{time.time()}", "user_id": "solo-user",
                                         "item_id": "i1", "type": "view", "ts": int(time.time() * 1000)}])
    run = refresh(driver, exact_cfg, trained, owner=lease.owner)
    assert run["mode"] == "incremental" and run["changed_edges"] == 1
    with driver.session(database=exact_cfg.neo4j_database) as s:
        total = store.node_count(s)
        has = s.run("MATCH (u:User {id: 'solo-user'}) RETURN u.embedding_version AS v").single()["v"]
    assert has == trained.version  # the brand-new user is embedded without retraining
    assert run["users"] == 1 and run["items"] == 1 and run["users"] + run["items"] < total
    assert max_error(driver, exact_cfg, trained) < TOLERANCE


@pytest.mark.parametrize("query", ["PENDING_USERS", "CHANGED_ITEMS", "OLDEST_PENDING"])
def test_change_queries_seek_the_unseen_index(cfg, driver, query):
    """A label or relationship scan here would make every run's cost grow with the graph; a seek on
    `changed_at` would need a clock margin and miss a change committed later than it."""
    def leaves(op):
        kids = op.get("children", [])
        return [x for c in kids for x in leaves(c)] if kids else [op]
    with driver.session(database=cfg.neo4j_database) as s:
        plan = s.run("EXPLAIN " + getattr(cypher, query)).consume().plan
    ops = [op for op in leaves(plan) if not op["operatorType"].startswith("Argument")]  # rows found already
    assert all("IndexSeek" in op["operatorType"] for op in ops), [op["operatorType"] for op in ops]
    assert all("ig_unseen" in op["args"]["Details"] for op in ops), [op["args"]["Details"] for op in ops]


def test_capped_runs_take_new_users_first_and_end_exact(trained, exact_cfg, driver, lease):
    """A run takes at most `refresh_max_users` changed users (a quarter the longest waiting, the rest
    brand-new ones) and leaves the others flagged; the runs that follow end equal to a full recompute."""
    reset(driver, exact_cfg, trained, lease.owner)
    capped = load_config(refresh_max_users=4, full_share=0.01)  # capped runs never turn full
    old = events(random.Random(11), 30, 60, 40, now=SEED_NOW + 1)  # seed users, older changes
    pipeline.ingest(driver, capped, old)
    now = int(time.time() * 1000)
    pipeline.ingest(driver, capped, [{"event_id": f"cap-new-{now}-{k}", "user_id": f"cap-new-{k}",
                                      "item_id": "i1", "type": "view", "ts": now} for k in range(3)])
    first = refresh(driver, capped, trained, owner=lease.owner)
    waiting = first["users"] + first["users_left"]
    assert first["mode"] == "incremental" and first["users"] == 4 and waiting > 10
    with driver.session(database=capped.neo4j_database) as s:
        embedded = s.run("MATCH (u:User) WHERE u.id STARTS WITH 'cap-new-' AND u.embedding IS NOT NULL "
                         "RETURN count(u) AS n").single()["n"]
        stale = store.refresh_state(s)["deg_stale"]
    assert embedded == 3 and first["degrees"] == 0 and stale  # the items' degrees left for a later run
    runs, last = 1, first
    while (run := refresh(driver, capped, trained, owner=lease.owner))["mode"] != "noop":
        runs, last = runs + 1, run
    assert runs == -(-waiting // 4) and last["degrees"] > 0
    with driver.session(database=capped.neo4j_database) as s:
        assert store.refresh_state(s)["deg_stale"] == []
    assert max_error(driver, capped, trained) < TOLERANCE


def test_a_capped_run_takes_the_newest_new_users_and_a_quarter_of_the_longest_waiting():
    """Right after a flood of new shoppers the newest is not queued behind it, and the oldest changes
    (known users' too) keep their share of every run, so no user waits for ever."""
    oldest = [f"old{k}" for k in range(4)] + [f"flood{k}" for k in range(20)]
    newest = [f"flood{k}" for k in reversed(range(20))]
    ids, left = take(24, oldest[:8], newest[:8], 8)
    assert ids == ["old0", "old1"] + [f"flood{k}" for k in range(19, 13, -1)] and left == 16
    assert take(24, oldest[:1], newest[:1], 1) == (["old0"], 23)  # a run of one still drains the old end
    assert take(24, oldest, [], 0) == (oldest, 0)


def test_while_users_wait_degrees_are_summed_at_most_every_delay_and_by_the_run_that_leaves_none():
    """Summing every touched item's edges in every run of a flood cost more than the users' vectors:
    a run that leaves users waiting adds its items to the stale ones, unless they have waited the delay."""
    fresh = {"deg_stale": [], "deg_stale_since": None}
    assert degree_plan(fresh, ["i2", "i1"], 1000, left=5) == ([], ["i1", "i2"], 1000)
    stale = {"deg_stale": ["i1", "i2"], "deg_stale_since": 1000}
    assert degree_plan(stale, ["i3"], 1000 + DEGREE_DELAY_MS - 1, left=5) == ([], ["i1", "i2", "i3"], 1000)
    assert degree_plan(stale, ["i3"], 1000 + DEGREE_DELAY_MS, left=5) == (["i1", "i2", "i3"], [], None)
    assert degree_plan(stale, [], 1001, left=0) == (["i1", "i2"], [], None)
    assert degree_plan(fresh, ["i1"], 1000, left=0) == (["i1"], [], None)


def test_while_users_wait_a_run_takes_what_the_last_runs_pace_fits_in_the_target():
    """A slow run (a busy machine) makes the next ones smaller, down to a quarter of the cap; fast ones
    grow them back to the cap; a run that left nobody waiting, or the target off, changes nothing."""
    cfg, size = load_config(refresh_max_users=1000, refresh_target_seconds=0.5), RunSize()
    assert size.limit(cfg) == 1000
    assert size.update(cfg, {"users": 1000, "users_left": 9000}, 2.0) == 500  # fits 250: half way there
    assert size.update(cfg, {"users": 500, "users_left": 8500}, 1.0) == 353
    assert size.update(cfg, {"users": 353, "users_left": 8000}, 5.0) == 250  # never below a quarter
    assert size.update(cfg, {"users": 40, "users_left": 0}, 5.0) == 250
    assert size.update(cfg, {"users": 250, "users_left": 7000}, 0.05) == 790
    assert size.update(cfg, {"users": 790, "users_left": 6000}, 0.1) == 1000  # never above the cap
    off = load_config(refresh_max_users=1000, refresh_target_seconds=0)
    assert size.update(off, {"users": 1000, "users_left": 9000}, 9.0) == 1000


def test_large_change_falls_back_to_full_with_reason(trained, cfg, driver, lease):
    small = load_config(full_share=0.01, refresh_max_users=0)
    pipeline.ingest(driver, small, events(random.Random(3), 20, 60, 40))
    run = refresh(driver, small, trained, owner=lease.owner)
    assert run["mode"] == "full" and "affected set" in run["reason"]
    assert max_error(driver, small, trained) < TOLERANCE


# --- the lease fences every writer of embeddings (issue 11, defect 2) ----------
