"""Ingest's loaders and writers against the real server: CSV and Online Retail loads, concurrent direct writers,
the group writer and erasure races."""
from __future__ import annotations

import gzip
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from click.testing import CliRunner

from app.cli import main as cli
from app.config import ROOT
from app.ingest import group, writer
from tests.test_ingest import T0, count, edges, ev, post


def _cli(*args):
    result = CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return {line.split(":")[0].strip(): int(line.split(":")[1].replace(",", ""))
            for line in result.stdout.splitlines() if ":" in line}


def test_csv_loader_is_rerunnable(cfg, clean_db, tmp_path):
    rng = random.Random(3)
    lines = ["who,what,when,kind,score"] + [
        f"u{rng.randrange(20)},i{rng.randrange(30)},{T0 + rng.randrange(10 ** 9)},"
        f"{rng.choice(['view', 'cart', 'purchase', 'bogus'])},{rng.choice(['', '2.5'])}" for _ in range(3000)]
    path = tmp_path / "interactions.csv"
    path.write_text("\n".join(lines) + "\n")
    args = ("load", "csv", path, "--user-col", "who", "--item-col", "what", "--ts-col", "when",
            "--type-col", "kind", "--weight-col", "score", "--chunk-size", 700)
    first = _cli(*args)
    graph = edges(clean_db, cfg)
    second = _cli(*args)
    assert first["rows"] == second["rows"] == 3000
    assert first["accepted"] + first["duplicates"] + first["dropped unknown_type"] == 3000
    assert second["accepted"] == 0 and second["duplicates"] == first["accepted"] + first["duplicates"]
    assert second["dropped unknown_type"] == first["dropped unknown_type"] > 0
    assert edges(clean_db, cfg) == graph
    assert sum(p.get("n_cart", 0) + p.get("n_view", 0) + p.get("n_purchase", 0) for p in graph.values()) \
        == first["accepted"]


def test_online_retail_slice_loaded_twice_gives_identical_counts(cfg, clean_db, tmp_path):
    path = tmp_path / "slice.csv.gz"
    with gzip.open(ROOT / "data/online_retail/online_retail.csv.gz", "rt") as src, gzip.open(path, "wt") as dst:
        for _, line in zip(range(20_001), src):
            dst.write(line)
    first = _cli("load", "online-retail", path)
    graph = edges(clean_db, cfg)
    nodes = count(clean_db, cfg, "MATCH (n) WHERE n:User OR n:Item RETURN count(n)")
    second = _cli("load", "online-retail", path)
    assert first["rows"] == second["rows"] == 20_000
    assert second["accepted"] == 0 and second["duplicates"] == first["accepted"] + first["duplicates"]
    assert {k: v for k, v in first.items() if k.startswith("dropped")} == \
        {k: v for k, v in second.items() if k.startswith("dropped")}
    assert first["dropped missing_user"] > 0
    assert edges(clean_db, cfg) == graph
    assert count(clean_db, cfg, "MATCH (n) WHERE n:User OR n:Item RETURN count(n)") == nodes
    returns = count(clean_db, cfg, "MATCH ()-[r:INTERACTED]->() RETURN sum(coalesce(r.n_return, 0))")
    titled = count(clean_db, cfg, "MATCH (i:Item) WHERE i.title IS NOT NULL RETURN count(i)")
    assert returns > 0 and titled > 0
    assert count(clean_db, cfg, "MATCH (u:User) WHERE u.id CONTAINS '.' RETURN count(u)") == 0


def test_demo_loads_only_into_an_empty_graph(cfg, clean_db, base_url):
    post(base_url, [ev(1)])
    result = CliRunner().invoke(cli, ["load", "demo"], catch_exceptions=False)
    assert result.exit_code == 0 and "already loaded" in result.output


# --- write path: lost claim races, group commit ------------------------------------

def weighed(k, user=None, item=None, type="view"):
    """A kept event in the form the writer stores (what `pipeline.weigh` returns)."""
    return {"id": f"e{k}", "u": user or f"u{k % 5}", "i": item or f"i{k % 4}", "ts": T0 + k, "type": type,
            "w": 1.0, "qty": 0.0}


def test_concurrent_direct_writers_claim_each_event_once(cfg, clean_db):
    # Separate transactions per call (no group writer): they race on the same event ids.
    events = [weighed(k) for k in range(400)]

    def client(seed):
        mine = random.Random(seed).sample(events, 300)
        return [writer.write_events(clean_db, cfg.neo4j_database, mine[j:j + 50], {},
                                    secret=cfg.erasure_secret) for j in range(0, 300, 50)]

    with ThreadPoolExecutor(8) as pool:
        accepted = [n for calls in pool.map(client, range(8)) for n in calls]
    assert sum(accepted) == 400
    assert count(clean_db, cfg, "MATCH (e:Event) RETURN count(e)") == 400
    assert count(clean_db, cfg, "MATCH ()-[r:INTERACTED]->() RETURN sum(r.n_view)") == 400
    stored = writer.read_stats(clean_db, cfg.neo4j_database)
    assert (stored["accepted"], stored["duplicates"]) == (400, 8 * 300 - 400)


def test_batches_in_one_transaction_keep_their_own_counts(cfg, clean_db):
    first, second = [weighed(k) for k in range(10)], [weighed(k) for k in range(5, 15)]
    accepted = writer.write_batches(clean_db, cfg.neo4j_database,
                                    [(first, {"duplicates": 2}), (second, {"rejected": 1}), ([], {"bot": 3})],
                                    secret=cfg.erasure_secret)
    assert accepted == [10, 5, 0]  # the earlier batch wins the ids both hold
    assert count(clean_db, cfg, "MATCH ()-[r:INTERACTED]->() RETURN sum(r.n_view)") == 15
    assert count(clean_db, cfg, "MATCH ()-[r:INTERACTED]->() RETURN collect(DISTINCT r.rev)") == [1]
    assert writer.read_stats(clean_db, cfg.neo4j_database) == {"accepted": 15, "duplicates": 7, "rejected": 1,
                                                                "bot": 3}


def test_group_writer_answers_each_caller_exactly(cfg, clean_db):
    events = [weighed(k) for k in range(600)]
    shared = group.GroupWriter(clean_db, cfg.neo4j_database, secret=cfg.erasure_secret)

    def client(seed):
        mine = random.Random(seed).sample(events, 450)
        return [(len(mine[j:j + 30]), shared.write(mine[j:j + 30], {})) for j in range(0, 450, 30)]

    with ThreadPoolExecutor(8) as pool:
        calls = [c for batch in pool.map(client, range(8)) for c in batch]
    assert sum(n for _, n in calls) == 600 and all(0 <= n <= size for size, n in calls)
    assert count(clean_db, cfg, "MATCH (e:Event) RETURN count(e)") == 600
    assert count(clean_db, cfg, "MATCH ()-[r:INTERACTED]->() RETURN sum(r.n_view)") == 600
    stored = writer.read_stats(clean_db, cfg.neo4j_database)
    assert (stored["accepted"], stored["duplicates"]) == (600, 8 * 450 - 600)


def test_group_writer_reports_a_failed_transaction_to_its_callers(cfg, clean_db):
    broken = group.GroupWriter(clean_db, "no-such-database", secret=cfg.erasure_secret)
    with pytest.raises(Exception, match="(?i)database"):
        broken.write([weighed(1)], {})
    assert count(clean_db, cfg, "MATCH (n) WHERE NOT n:_Migration RETURN count(n)") == 0


@pytest.mark.parametrize("cause, retried", [("transient", True), ("client", False)])
def test_group_writer_retries_a_deadlock_reported_on_a_failed_result(cfg, clean_db, monkeypatch, cause, retried):
    """Under bursts a deadlock can reach the writer as ResultFailedError (from the TransientError),
    which the driver does not retry: the group writer does, and the batch lands once; a failed
    result caused by the batch itself is not retried."""
    from neo4j.exceptions import ClientError, ResultFailedError, TransientError
    real, calls = writer.write_batches, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            try:
                raise (TransientError if cause == "transient" else ClientError)("deadlock detected")
            except Exception as exc:
                raise ResultFailedError(None, "result failed") from exc
        return real(*args, **kwargs)
    monkeypatch.setattr(writer, "write_batches", flaky)
    shared = group.GroupWriter(clean_db, cfg.neo4j_database, secret=cfg.erasure_secret)
    if retried:
        assert shared.write([weighed(k) for k in range(5)], {}, timeout=30) == 5
        assert count(clean_db, cfg, "MATCH ()-[r:INTERACTED]->() RETURN sum(r.n_view)") == 5
    else:
        with pytest.raises(ResultFailedError):
            shared.write([weighed(1)], {}, timeout=30)
    assert len(calls) == (2 if retried else 1)


def test_ingest_racing_an_erasure_of_its_user_is_retried(cfg, clean_db):
    """An erasure that commits while an ingest of the same user waits for its lock fails that ingest
    with EntityNotFound (the driver does not retry it): the writer runs it again, so the event lands
    once, on a new user node, and nothing answers 500."""
    from app import cypher
    from app.ingest import pipeline
    now = int(time.time() * 1000)
    ev = {"user_id": "victim", "type": "view", "ts": now}
    pipeline.ingest(clean_db, cfg, [{**ev, "event_id": "race-0", "item_id": "i1"}])
    out = {}
    with clean_db.session(database=cfg.neo4j_database) as s:
        tx = s.begin_transaction()
        tx.run(cypher.USER_DELETE, id="victim").consume()  # holds the user's lock, uncommitted

        def ingest():
            try:
                out["report"] = pipeline.ingest(clean_db, cfg, [{**ev, "event_id": "race-1", "item_id": "i2"}])
            except Exception as exc:  # noqa: BLE001 - the assertion below names it
                out["error"] = exc
        thread = threading.Thread(target=ingest)
        thread.start()
        time.sleep(1.0)  # the ingest now waits for the erasure's lock
        tx.commit()
        thread.join(timeout=60)
    assert "error" not in out, out
    assert out["report"].accepted == 1
    with clean_db.session(database=cfg.neo4j_database) as s:
        items = s.run("MATCH (:User {id: 'victim'})-[:INTERACTED]->(i) RETURN collect(i.id) AS ids").single()["ids"]
        events = s.run("MATCH (e:Event) WHERE e.id STARTS WITH 'race-' RETURN count(e) AS n").single()["n"]
    assert items == ["i2"] and events == 2
