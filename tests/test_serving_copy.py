"""The API's in-process graph copy: moved run by run through the serving log, it equals a copy read
whole, through new users and items, returns, erasures, item updates and compactions."""
from __future__ import annotations

import random
import time

import numpy as np
import pytest
import requests

from app import cypher
from app.embeddings import models
from app.embeddings.refresh import refresh
from app.embeddings.training import train_and_publish
from app.ingest import pipeline, writer
from app.serving import delta, graph
from app.worker import Worker
from support.ranking import offline_answers
from tests.conftest import wipe
from tests.test_serving import assert_ranking

NOW = 1_767_225_600_000  # 2026-01-01
SLACK = 0.5  # seconds over a bound allowed for a loaded 2-core test machine


def _events(rng, n, users, items, prefix):
    return [{"event_id": f"{prefix}{k}", "user_id": f"u{rng.randrange(users)}", "item_id": f"i{rng.randrange(items)}",
             "type": rng.choice(["view", "cart", "purchase", "purchase", "return"]), "quantity": 1,
             "ts": NOW - rng.randrange(30 * 86_400_000)} for k in range(n)]


def _head(driver, cfg):
    with driver.session(database=cfg.neo4j_database) as s:
        r = s.run(cypher.SERVING_STATE).single()
    return r["epoch"], r["seq"]


def _run_refresh(driver, cfg):
    with Worker(cfg).holding() as holder:
        return refresh(driver, cfg, models.current(driver, cfg), owner=holder.owner)


def _edges(st: graph.State) -> dict:
    """{(user, item): weight} of a state's current rows, by id."""
    users = {row: u for u, row in st.users.items() if row < st.n_users}
    kept = (st.base_csr.multiply(st.keep[:, None].astype(float)) + st.over_csr).tocoo()
    return {(users[r], st.items.ids[c]): w for r, c, w in zip(kept.row, kept.col, kept.data) if w != 0}


def _row(st: graph.State, user: str) -> dict:
    """{item: raw weight} of every edge of a user's row in a state."""
    cols, w, _ = st.row(user)
    return {st.items.ids[c]: x for c, x in zip(cols, w)}


def _positive(st: graph.State, user: str) -> tuple:
    """A user's positive edges in a state: the columns and raw weights the vector and the filter read."""
    cols, w, _ = st.row(user)
    return cols[w > 0], w[w > 0]


def _by_id(st: graph.State, values) -> dict:
    return {i: v for i, v in zip(st.items.ids[:st.n_items], values)}


@pytest.fixture(scope="module")
def trained(cfg, driver):
    wipe(driver, cfg.neo4j_database)
    pipeline.ingest(driver, cfg, _events(random.Random(3), 1200, 200, 40, "a"))
    with Worker(cfg).holding() as holder:
        train_and_publish(driver, cfg, progress=False, owner=holder.owner, epochs=1)
    return models.current(driver, cfg)


@pytest.mark.parametrize("table_mb", [256, 0], ids=["explain-table", "no-table"])
def test_copy_moved_run_by_run_equals_the_copy_read_whole(cfg, driver, trained, monkeypatch, base_url, table_mb):
    monkeypatch.setattr(delta, "COMPACT_MIN", 8)  # fold the overlay into the base now and then
    copy = graph.Copy(driver, cfg.neo4j_database, secret=cfg.erasure_secret, wait=30, max_age=0, table_mb=table_mb)
    assert (copy.current().table is not None) == (table_mb > 0)
    loads = []
    monkeypatch.setattr(graph, "_load", lambda tx, mb, real=graph._load: loads.append(1) or real(tx, mb))
    rng = random.Random(7)
    overlay_sizes = []
    overlaid = False  # whether explain's parts were checked on a row of the overlay
    for step in range(6):
        events = _events(rng, 8, 210, 43, f"s{table_mb}.{step}-")  # new users and items among them
        pipeline.ingest(driver, cfg, events)
        if step == 2:
            writer.delete_user(driver, cfg.neo4j_database, "u4", secret=cfg.erasure_secret)
        if step == 4:
            writer.upsert_items(driver, cfg.neo4j_database, [{"id": "i1", "props": {"category": "new", "price": 3.5}}])
        assert _run_refresh(driver, cfg)["mode"] == "incremental"
        moved = copy.current()
        assert not loads  # applied from the log, not read whole
        overlay_sizes.append(len(moved.overlay))
        whole = graph.Copy(driver, cfg.neo4j_database, secret=cfg.erasure_secret, table_mb=table_mb).current()
        loads.clear()
        assert moved.seq == whole.seq and moved.lm.version == whole.lm.version
        assert _edges(moved) == pytest.approx(_edges(whole), rel=1e-15)
        for name in ("di", "price"):
            a = {k: v for k, v in _by_id(moved, getattr(moved, name) if name == "di" else moved.items.price).items()}
            b = _by_id(whole, getattr(whole, name) if name == "di" else whole.items.price)
            assert set(a) >= set(b)
            assert all(np.isclose(a[k], b[k], rtol=1e-12, atol=0) or (np.isnan(a[k]) and np.isnan(b[k])) for k in b)
        assert _by_id(moved, moved.items.embedded) == _by_id(whole, whole.items.embedded)
        # Same scores, item by item, for every user of the whole copy.
        for u in list(whole.users)[::5]:
            a_cols, a_w, _ = whole.row(u)
            b_cols, b_w, _ = moved.row(u)
            assert _row(whole, u) == pytest.approx(_row(moved, u), rel=1e-15)
            p = np.random.default_rng(1).normal(size=trained.tables[1].shape[1])
            sa, sb = _by_id(whole, whole.scores(p, a_cols, a_w)), _by_id(moved, moved.scores(p, b_cols, b_w))
            assert all(np.isclose(sb[k], v, rtol=1e-10, atol=1e-12) for k, v in sa.items())
            # explain's parts (through the overlay when the user's row is in it) match item by item
            pos_a, pos_b = a_w > 0, b_w > 0
            if pos_a.any():
                targets = [whole.items.ids[j] for j in range(0, whole.n_items, 7)]
                pa = whole.parts(a_cols[pos_a], a_w[pos_a], np.asarray([whole.items.index[i] for i in targets]))
                pb = moved.parts(b_cols[pos_b], b_w[pos_b], np.asarray([moved.items.index[i] for i in targets]))
                order_a = np.argsort([whole.items.ids[c] for c in a_cols[pos_a]])
                order_b = np.argsort([moved.items.ids[c] for c in b_cols[pos_b]])
                assert np.allclose(pa[order_a], pb[order_b], rtol=1e-10, atol=1e-12 * np.abs(pa).max())
                overlaid |= moved.users[u] in moved.overlay
    assert any(b < a for a, b in zip(overlay_sizes, overlay_sizes[1:])), overlay_sizes  # a compaction ran
    assert overlaid
    assert ("u4", "i0") not in _edges(moved) and not any(u == "u4" for u, _ in _edges(moved))
    assert _by_id(moved, moved.items.category)["i1"] == "new"
    # The API answers on its own copy, at the latest run: the top of the copy read whole.
    user = next(u for u in whole.users if whole.du[whole.users[u]] > 0)
    answer = requests.get(f"{base_url}/v1/users/{user}/recommendations", params={"k": 5}, timeout=30).json()
    with driver.session(database=cfg.neo4j_database) as s:
        stored = s.run("MATCH (u:User {id: $id}) RETURN u.embedding AS e, u.ig_norm AS n", id=user).single()
    p = np.asarray(stored["e"][:-1]) * stored["n"]  # the stored vector: the sum over the copy's row equals it
    cols, a = _positive(whole, user)
    assert np.allclose(whole.vector(cols, a), p, rtol=1e-12, atol=1e-12 * np.abs(p).max())
    scores = whole.scores(p, cols, a)
    top = whole.top(scores, whole.mask(None, None, whole.row(user)[0]), 5)
    assert [r["item_id"] for r in answer["results"]] == [r["item_id"] for r in top]
    assert [r["score"] for r in answer["results"]] == pytest.approx([r["score"] for r in top], rel=1e-12)


def test_a_copy_synced_right_after_each_run_never_reads_everything_again(cfg, driver, trained, monkeypatch):
    """Runs commit while the copy follows them as closely as it can (a request sees a run's number and
    syncs at once): every run is applied from the log, none makes the copy read the graph whole."""
    import threading
    copy = graph.Copy(driver, cfg.neo4j_database, secret=cfg.erasure_secret, wait=30, max_age=0)
    copy.current()
    loads = []
    monkeypatch.setattr(graph, "_load", lambda tx, mb, real=graph._load: loads.append(1) or real(tx, mb))
    done = threading.Event()

    def runs():
        rng = random.Random(11)
        with Worker(cfg).holding() as holder:
            for step in range(25):
                pipeline.ingest(driver, cfg, _events(rng, 10, 200, 40, f"sync{step}-"))
                refresh(driver, cfg, models.current(driver, cfg), owner=holder.owner)
        done.set()
    thread = threading.Thread(target=runs)
    thread.start()
    seen = set()
    while not done.is_set():
        epoch, seq = _head(driver, cfg)
        if seq not in seen:
            seen.add(seq)
            assert copy.current().seq >= seq
    thread.join()
    assert len(seen) > 10 and not loads


def test_a_first_event_personalises_the_next_answer_before_any_refresh(cfg, driver, trained, base_url):
    pipeline.ingest(driver, cfg, [{"event_id": "first-1", "user_id": "newcomer", "item_id": "i3", "type": "purchase",
                                   "ts": NOW}])
    before = requests.get(f"{base_url}/v1/users/newcomer/recommendations", params={"k": 5}, timeout=30).json()
    assert before["source"] == "personal" and before["refreshed_at"] is None and before["version"] == trained.version
    assert "i3" not in [r["item_id"] for r in before["results"]] and len(before["results"]) == 5
    _run_refresh(driver, cfg)
    after = requests.get(f"{base_url}/v1/users/newcomer/recommendations", params={"k": 5}, timeout=30).json()
    assert after["source"] == "personal" and after["refreshed_at"] is not None
    # The vector summed from the live edges is the one the run stored.
    st = graph.Copy(driver, cfg.neo4j_database, secret=cfg.erasure_secret).current()
    with driver.session(database=cfg.neo4j_database) as s:
        stored = s.run("MATCH (u:User {id: 'newcomer'}) RETURN u.embedding AS e, u.ig_norm AS n").single()
    p = np.asarray(stored["e"][:-1]) * stored["n"]
    assert np.allclose(st.vector(*_positive(st, "newcomer")), p, rtol=1e-12, atol=1e-12 * np.abs(p).max())


def test_requests_read_only_memory_and_a_write_shows_within_polls_before_any_run(cfg, driver, trained, monkeypatch):
    """The service's timing: no Neo4j round trip for a request on a copy younger than `poll`, and a
    new shopper's first event in the copy after a background sync or two, with no refresh run."""
    copy = graph.Copy(driver, cfg.neo4j_database, secret=cfg.erasure_secret, wait=5, poll=0.5, max_age=60)
    first = copy.current()
    reads = []
    monkeypatch.setattr(copy, "_read", lambda *a, real=copy._read: reads.append(1) or real(*a))
    assert copy.current() is first and not reads
    pipeline.ingest(driver, cfg, [{"event_id": "poll-1", "user_id": "poller", "item_id": "i5", "type": "purchase",
                                   "ts": NOW}])
    started, deadline = time.monotonic(), time.monotonic() + 10
    while not len(copy.current().row("poller")[0]) and time.monotonic() < deadline:
        time.sleep(0.01)
    st = copy.current()
    assert [st.items.ids[c] for c in st.row("poller")[0]] == ["i5"] and st.seq == first.seq  # before any run
    assert 1 <= len(reads) <= 2 + (time.monotonic() - started) / 0.5  # one sync per `poll` at most
    # A known shopper's new and changed edges are patched in edge by edge: the row read whole agrees.
    user = next(u for u in first.users if len(first.row(u)[0]) >= 2)
    item = first.items.ids[first.row(user)[0][0]]
    pipeline.ingest(driver, cfg, [{"event_id": "poll-2", "user_id": user, "item_id": item, "type": "purchase", "ts": NOW},
                                  {"event_id": "poll-3", "user_id": user, "item_id": "i-new", "type": "cart", "ts": NOW}])
    deadline = time.monotonic() + 10
    while "i-new" not in _row(copy.current(), user) and time.monotonic() < deadline:
        time.sleep(0.01)
    moved, whole = copy.current(), graph.Copy(driver, cfg.neo4j_database, secret=cfg.erasure_secret).current()
    assert moved.seq == first.seq and _row(moved, user) == pytest.approx(_row(whole, user), rel=1e-15)
    assert _row(moved, user)[item] != _row(first, user)[item]
    a, b = _by_id(moved, moved.di), _by_id(whole, whole.di)
    assert all(np.isclose(a[k], b[k], rtol=1e-12, atol=0) for k in b)


def test_with_neo4j_away_a_request_answers_from_the_copy_at_once(cfg, driver, trained, monkeypatch):
    """A sync that fails (Neo4j down) ends a request's wait: it answers from the copy it has, not after
    `wait`, and not with an error."""
    from neo4j.exceptions import ServiceUnavailable
    copy = graph.Copy(driver, cfg.neo4j_database, secret=cfg.erasure_secret, wait=20, poll=0.0, max_age=0.0)
    first = copy.current()

    def away(*_):
        raise ServiceUnavailable("down")
    monkeypatch.setattr(copy, "_read", away)
    started = time.monotonic()
    assert copy.current() is first
    assert time.monotonic() - started < 2.0


def test_a_request_behind_the_log_waits_at_most_the_bound_then_the_copy_catches_up(cfg, driver, trained):
    copy = graph.Copy(driver, cfg.neo4j_database, secret=cfg.erasure_secret, wait=0.0, max_age=0)
    first = copy.current()
    pipeline.ingest(driver, cfg, [{"event_id": "bound-1", "user_id": "u7", "item_id": "i9", "type": "cart",
                                   "ts": NOW}])
    _run_refresh(driver, cfg)
    epoch, seq = _head(driver, cfg)
    assert copy.current().seq in (first.seq, seq)  # no wait: as it was, or already synced
    deadline = time.monotonic() + 30
    while copy.state.seq < seq and time.monotonic() < deadline:
        time.sleep(0.05)
    assert copy.state.seq == seq


def publish_retail_version(driver, cfg, item_bias: float, trend_weight: float, halflife: float = 3.0, topk: int = 0):
    """A current version with the filter Online Retail's stream chose (log(1 + w) graph, binary user row),
    with item biases of every size and sign (whatever training's check kept) when `item_bias`, and the
    live trend at `trend_weight`; returned loaded."""
    import copy

    import torch

    from app.embeddings.training import publish
    settings = {"trend_halflife": halflife, "trend_weight": trend_weight} if trend_weight else {}
    with Worker(cfg).holding() as holder:
        train_and_publish(driver, cfg, progress=False, owner=holder.owner, epochs=1, lin_weights="log1p",
                          lin_user_weights="binary", alpha=0.001, bias_temperature=item_bias, lin_topk=topk,
                          **settings)
        lm = models.current(driver, cfg)
        if item_bias:
            model = copy.deepcopy(lm.model)
            model.bias = torch.from_numpy(np.random.default_rng(0).normal(0.0, 0.3, model.num_items))
            publish(driver, cfg, lm.mcfg, model, {"ref_ms": lm.meta["ref_ms"], "item_ids": lm.meta["item_ids"]},
                    holder.owner, "biased version")
    lm = models.current(driver, cfg)
    assert lm.mcfg.lin_weights == "log1p" and lm.mcfg.lin_user_weights == "binary"
    assert lm.model.biased == (item_bias > 0) and (lm.model.bias.abs().max() > 0) == (item_bias > 0)
    assert lm.mcfg.trend_weight == trend_weight
    return lm


@pytest.mark.parametrize("item_bias,trend_weight,topk", [(0.0, 0.0, 0), (0.2, 0.0, 0), (0.2, 0.4, 0), (0.2, 0.0, 4),
                                                         (0.0, 0.0, 4)])
def test_log1p_filter_is_served_as_the_offline_scorer_ranks(cfg, driver, trained, base_url, item_bias, trend_weight,
                                                            topk, monkeypatch):
    """A version trained with the filter Online Retail's stream chose, without and with item biases, and
    with the live trend next to them: the REST answers equal the offline Scorer's on the graph in Neo4j,
    also after new events the copy patched in edge by edge. Served from an item table (`topk`), only the
    candidates its rows reach are ranked, as offline; the table is rebuilt with the base (here at every
    sync: TABLE_MAX_AGE_S 0), so that it equals the one built offline from the graph."""
    if topk:
        monkeypatch.setattr(delta, "TABLE_MAX_AGE_S", 0.0)
    lm = publish_retail_version(driver, cfg, item_bias, trend_weight, topk=topk)
    assert lm.mcfg.lin_topk == topk
    rng = random.Random(11)
    for step in range(2):
        if step:  # new shoppers, items and first edges, not yet refreshed: the copy patches them in
            events = _events(rng, 40, 230, 45, "t")
            for e in events[:20]:
                e["ts"] = NOW + rng.randrange(86_400_000)  # a burst of new adopters, a day later
            pipeline.ingest(driver, cfg, events)
        for user, ids, scores in offline_answers(driver, cfg, lm, 15, 5):
            answer = requests.get(f"{base_url}/v1/users/{user}/recommendations", params={"k": 5}, timeout=30).json()
            assert answer["version"] == lm.version
            assert_ranking(answer["results"], ids, scores)


def test_a_request_during_the_first_load_gets_503_at_once_and_readyz_says_why(cfg, driver, trained, base_url,
                                                                              monkeypatch):
    """While a process's copy loads (held here until released), a request is answered 503 with Retry-After
    within the start wait instead of waiting for the load, /readyz says why; once loaded, both answer."""
    import threading
    release, load = threading.Event(), graph._load

    def held(tx, table_mb):
        release.wait(30)
        return load(tx, table_mb)
    monkeypatch.setattr(graph, "_load", held)
    monkeypatch.setattr(graph, "_copies", {})  # a fresh copy, as in a process just started
    try:
        started = time.monotonic()
        reply = requests.get(f"{base_url}/v1/users/nobody/recommendations", params={"k": 3}, timeout=30)
        assert reply.status_code == 503 and time.monotonic() - started < 2.0 + SLACK
        assert "loading" in reply.json()["error"]["message"] and int(reply.headers["Retry-After"]) >= 1
        ready = requests.get(f"{base_url}/readyz", timeout=30)
        assert ready.status_code == 503 and "loading" in ready.json()["error"]["message"]
    finally:
        release.set()
    deadline = time.monotonic() + 30
    while requests.get(f"{base_url}/readyz", timeout=30).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert requests.get(f"{base_url}/readyz", timeout=30).status_code == 200
    assert requests.get(f"{base_url}/v1/users/nobody/recommendations", params={"k": 3}, timeout=30).status_code == 200


def test_a_reload_while_serving_answers_from_the_state_it_has(cfg, driver, trained, monkeypatch):
    """While a sync runs long (a reload of the whole graph, held here), the request that started it waits
    at most the sync wait and later ones not at all: they answer from the state the copy has."""
    import threading
    copy = graph.Copy(driver, cfg.neo4j_database, wait=0.2, poll=0.0, max_age=0.0, secret=cfg.erasure_secret)
    loaded = copy.current()
    assert loaded is not None
    release, advance = threading.Event(), graph._advance

    def held(*args):
        release.wait(30)
        return advance(*args)
    monkeypatch.setattr(graph, "_advance", held)
    try:
        started = time.monotonic()
        assert copy.current() is loaded and time.monotonic() - started < 0.2 + SLACK
        for _ in range(5):
            started = time.monotonic()
            assert copy.current() is loaded and time.monotonic() - started < 0.05 + SLACK / 5
    finally:
        release.set()


def test_a_full_run_or_a_wiped_graph_is_read_whole(cfg, driver, trained, monkeypatch):
    """(Wipes the graph: last.)"""
    copy = graph.Copy(driver, cfg.neo4j_database, secret=cfg.erasure_secret, wait=30, max_age=0)
    before = copy.current()
    with Worker(cfg).holding() as holder:
        refresh(driver, cfg, trained, full=True, owner=holder.owner)
    loads = []
    monkeypatch.setattr(graph, "_load", lambda tx, mb, real=graph._load: loads.append(1) or real(tx, mb))
    after = copy.current()
    assert loads and after.seq == before.seq + 1
    wipe(driver, cfg.neo4j_database)
    assert copy.current() is None  # no model left: the API answers trending items, and 404 for items
