"""Kafka in front of ingest, on the real broker: the log's effect equals a direct load, exactly once."""
from __future__ import annotations

import dataclasses
import os
import random
import signal
import threading
import subprocess
import sys
import time
import uuid

import pytest
import requests
from confluent_kafka import Consumer, Producer
from click.testing import CliRunner
from confluent_kafka.admin import AdminClient

from app import kafka_local
from app.cli import main as cli
from app.config import ROOT
from app.ingest import log, pipeline, writer
from app.ingest.consume import Folder
from tests.conftest import SERVICE, HeldItem

T0 = 1_600_000_000_000  # 2020-09-13, inside the decay range
TYPES = ["view", "click", "cart", "purchase", "return"]


@pytest.fixture(scope="session")
def broker(cfg):
    """The test broker, started when it is not running (`make test` starts it first)."""
    kafka_local.start(cfg)
    return cfg


@pytest.fixture
def kcfg(broker, clean_db):
    """The test Config on a topic and consumer group of this test only, in front of an empty graph."""
    name = uuid.uuid4().hex[:10]
    # The broker's least session timeout: a killed consumer's partitions move to the next one soonest.
    config = dataclasses.replace(broker, kafka_topic=f"events-{name}", kafka_group=f"fold-{name}",
                                 kafka_partitions=3, kafka_session_timeout=6.0)
    yield config
    # Topics left behind would make every later start of the broker load them.
    AdminClient({"bootstrap.servers": config.kafka_bootstrap}).delete_topics(
        [config.kafka_topic, log.dead_topic(config)], operation_timeout=10)


def stream(n: int = 600, seed: int = 3) -> list[list[dict]]:
    """A skewed Online-Retail-like stream in batches of 100: a few hot items, shuffled timestamps, returns,
    and every tenth batch resent (a client's retry)."""
    rng = random.Random(seed)
    events = [{"event_id": f"k{k}", "user_id": f"u{rng.randrange(25)}",
               "item_id": f"i{min(int(rng.paretovariate(1.2)), 30)}", "type": rng.choice(TYPES),
               "ts": T0 + rng.randrange(10 ** 10), "quantity": rng.randint(1, 4)} for k in range(n)]
    batches = [events[j:j + 100] for j in range(0, n, 100)]
    return batches + batches[::3]


def edges(driver, cfg) -> dict:
    """Every INTERACTED edge's properties, without the per-transaction bookkeeping."""
    with driver.session(database=cfg.neo4j_database) as s:
        rows = s.run("MATCH (u:User)-[r:INTERACTED]->(i:Item) RETURN u.id AS u, i.id AS i, properties(r) AS p")
        return {(r["u"], r["i"]): {k: v for k, v in r["p"].items() if k not in ("changed_at", "rev", "ig_unseen")}
                for r in rows}


def assert_same_edges(a: dict, b: dict) -> None:
    """Identical edges; the float weight sum may differ in its last bits with addition order."""
    assert a.keys() == b.keys()
    for key in a:
        pa, pb = dict(a[key]), dict(b[key])
        assert pa.pop("w") == pytest.approx(pb.pop("w"), rel=1e-12, abs=1e-12), key
        assert pa == pb, key


def direct_load(cfg, driver, batches) -> tuple[dict, dict]:
    """The edges and counters of a direct load of `batches`; the graph is emptied again after."""
    from bench.bench_ingest import wipe
    for batch in batches:
        pipeline.ingest(driver, cfg, batch)
    result = edges(driver, cfg), writer.read_stats(driver, cfg.neo4j_database)
    wipe(driver, cfg.neo4j_database)
    return result


def fold_all(cfg, driver, group: str | None = None, timeout: float = 60) -> Folder:
    """Fold the topic until the group has nothing left to read; the Folder (closed) for its totals."""
    folder = Folder(cfg, driver, group)
    lag_cfg = dataclasses.replace(cfg, kafka_group=group or cfg.kafka_group)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if folder.step(0.5) == 0 and log.lag(lag_cfg)["messages"] == 0:
                return folder
        raise AssertionError(f"the log was not folded within {timeout} s: {log.lag(lag_cfg)}")
    finally:
        folder.close()


def test_folding_the_log_equals_a_direct_load(kcfg, clean_db):
    batches = stream()
    expected, counters = direct_load(kcfg, clean_db, batches)
    for batch in batches:
        pipeline.enqueue(kcfg, batch, wait=30)
    assert log.lag(kcfg)["messages"] == sum(len(b) for b in batches)
    folder = fold_all(kcfg, clean_db)
    assert_same_edges(edges(clean_db, kcfg), expected)
    # Weights, counts, quantities, first and last times, and the counters: accepted once, resends duplicates.
    assert writer.read_stats(clean_db, kcfg.neo4j_database) == counters
    assert folder.totals["accepted"] == counters["accepted"] == 600


def _blocked(driver, cfg) -> bool:
    with driver.session(database=cfg.neo4j_database) as s:
        return bool(s.run("SHOW TRANSACTIONS YIELD status WHERE status STARTS WITH 'Blocked' RETURN count(*) AS n")
                    .single()["n"])


def test_kill_9_mid_batch_and_a_replay_from_offset_0_add_each_event_once(kcfg, clean_db):
    batches = stream(seed=5)
    expected, counters = direct_load(kcfg, clean_db, batches)
    for batch in batches:
        pipeline.enqueue(kcfg, batch, wait=30)
    hot = HeldItem(clean_db, kcfg, "i1")  # the hottest item: the consumer's batch waits on its lock
    env = {**os.environ, "IG_KAFKA_TOPIC": kcfg.kafka_topic, "IG_KAFKA_GROUP": kcfg.kafka_group,
           "IG_KAFKA_PARTITIONS": "3", "IG_KAFKA_SESSION_TIMEOUT": "6", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "app", "consume"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not _blocked(clean_db, kcfg):
            assert time.monotonic() < deadline and proc.poll() is None, "the consumer never reached Neo4j"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        hot.release()
        proc.kill()
    assert log.lag(kcfg)["messages"] == sum(len(b) for b in batches)  # nothing was committed
    fold_all(kcfg, clean_db)
    assert_same_edges(edges(clean_db, kcfg), expected)
    assert writer.read_stats(clean_db, kcfg.neo4j_database)["accepted"] == counters["accepted"]
    folded = edges(clean_db, kcfg)
    replay = fold_all(kcfg, clean_db, group=f"{kcfg.kafka_group}-replay")  # a new group reads from offset 0
    assert replay.totals["messages"] == sum(len(b) for b in batches) and replay.totals["accepted"] == 0
    assert edges(clean_db, kcfg) == folded


def test_an_erased_user_stays_erased_after_a_replay_from_offset_0(kcfg, clean_db):
    def events(user, first, n):
        return [{"event_id": f"{user}-{k}", "user_id": user, "item_id": f"i{k % 3}", "type": "purchase",
                 "ts": T0 + k * 60_000} for k in range(first, first + n)]
    pipeline.enqueue(kcfg, events("gone", 0, 5) + events("kept", 0, 5), wait=30)
    fold_all(kcfg, clean_db)
    kept = {k: v for k, v in edges(clean_db, kcfg).items()}
    # Events of the user still in the log, unread, when the erasure commits.
    pipeline.enqueue(kcfg, events("gone", 5, 5), wait=30)
    writer.delete_user(clean_db, kcfg.neo4j_database, "gone", secret=kcfg.erasure_secret)
    fold_all(kcfg, clean_db)
    fold_all(kcfg, clean_db, group=f"{kcfg.kafka_group}-replay")
    after = edges(clean_db, kcfg)
    assert not any(u == "gone" for u, _ in after)
    assert after == {k: v for k, v in kept.items() if k[0] == "kept"}


def test_a_poison_message_goes_to_the_dead_letters_and_the_partition_moves_on(kcfg, clean_db):
    log.ensure_topics(kcfg)
    producer = Producer({"bootstrap.servers": kcfg.kafka_bootstrap, "enable.idempotence": True})
    for value in (b"{not json", b'{"id": "x", "u": "u1"}'):
        producer.produce(kcfg.kafka_topic, value, b"u1", partition=0)
    producer.flush(10)
    pipeline.enqueue(kcfg, [{"event_id": "after", "user_id": "u1", "item_id": "i1", "type": "view", "ts": T0}],
                     wait=30)
    folder = fold_all(kcfg, clean_db)
    assert (folder.totals["dead"], folder.totals["accepted"]) == (2, 1)
    assert list(edges(clean_db, kcfg)) == [("u1", "i1")]
    dead = _read_all(kcfg, log.dead_topic(kcfg), 2)
    reasons = [dict(m.headers())["reason"].decode() for m in dead]
    assert reasons[0].startswith("not JSON") and reasons[1].startswith("field i:")
    assert dead[0].value() == b"{not json" and dict(dead[0].headers())["source"].startswith(
        f"{kcfg.kafka_topic}/0/".encode())


def _read_all(cfg, topic: str, n: int, timeout: float = 30) -> list:
    """The first `n` messages of `topic`, read by a group of their own."""
    reader = Consumer({"bootstrap.servers": cfg.kafka_bootstrap, "group.id": uuid.uuid4().hex,
                       "auto.offset.reset": "earliest", "enable.auto.commit": False})
    reader.subscribe([topic])
    out, deadline = [], time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out += [m for m in reader.consume(n - len(out), 0.5) if m.error() is None]
    reader.close()
    return out


def test_api_in_kafka_mode_over_http(kcfg, clean_db, serve):
    base = serve(dataclasses.replace(kcfg, ingest="kafka"))
    good = [{"event_id": f"h{k}", "user_id": f"u{k % 3}", "item_id": f"i{k % 4}", "type": "cart",
             "ts": T0 + k * 60_000} for k in range(30)]
    first = requests.post(f"{base}/v1/events", json=good[:20], headers=SERVICE, timeout=30)
    assert first.status_code == 200 and first.json()["accepted"] == 20
    bad = requests.post(f"{base}/v1/events", json=[*good[20:], {**good[0], "event_id": "h99", "ts": "soon"}],
                        headers=SERVICE, timeout=30)
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "ts" and bad.json()["accepted"] == 10
    assert requests.post(f"{base}/v1/events", data=b"[", headers=SERVICE, timeout=30).status_code == 400
    assert requests.post(f"{base}/v1/events", json=good[:1], timeout=30).status_code == 401
    stats = requests.get(f"{base}/v1/stats", timeout=30).json()
    assert stats["ingest"] == "kafka" and stats["log"]["messages"] == 30
    assert stats["accepted"] == 0  # nothing is in Neo4j before the consumer folds it
    assert "ig_kafka_lag_messages{" in requests.get(f"{base}/metrics", timeout=30).text
    # One user's events sit in one partition, in the order they were accepted.
    messages = _read_all(kcfg, kcfg.kafka_topic, 30)
    by_user = {}
    for m in sorted(messages, key=lambda m: (m.partition(), m.offset())):
        if m.key():
            by_user.setdefault(m.key(), []).append((m.partition(), log.decode(m.value())[0]["id"]))
    for user, seen in by_user.items():
        assert len({p for p, _ in seen}) == 1, user
        ids = [i for _, i in seen]
        assert ids == sorted(ids, key=lambda i: int(i[1:])), user
    fold_all(kcfg, clean_db)
    stats = requests.get(f"{base}/v1/stats", timeout=30).json()
    assert (stats["accepted"], stats["rejected"], stats["log"]["messages"]) == (30, 1, 0)


def test_with_neo4j_away_the_api_accepts_into_kafka_and_the_consumer_waits(kcfg, clean_db, serve):
    away = dataclasses.replace(kcfg, ingest="kafka", neo4j_uri="bolt://127.0.0.1:9")  # nothing listens there
    base = serve(away)
    batch = [{"event_id": f"a{k}", "user_id": f"u{k % 4}", "item_id": f"i{k % 5}", "type": "view",
              "ts": T0 + k * 60_000} for k in range(40)]
    reply = requests.post(f"{base}/v1/events", json=batch, headers=SERVICE, timeout=30)
    assert reply.status_code == 200 and reply.json()["accepted"] == 40
    from app.db import get_driver
    folder = Folder(kcfg, get_driver(away))
    done = []
    thread = threading.Thread(target=lambda: done.append(folder.step(5)), daemon=True)
    thread.start()
    try:
        time.sleep(3)
        assert not done and edges(clean_db, kcfg) == {}  # the batch waits for Neo4j, its offsets uncommitted
    finally:
        folder.driver = clean_db  # Neo4j is back
        thread.join(60)
        folder.close()
    assert done == [40] and len(edges(clean_db, kcfg)) == 20 and log.lag(kcfg)["messages"] == 0


@pytest.mark.slow
def test_neo4j_down_for_30_s_while_events_keep_arriving(kcfg, clean_db, serve):
    """For 30 s the API (its Neo4j unreachable) accepts a batch a second into Kafka, a client resending
    some, while a consumer waits on the same outage without folding or committing anything; when Neo4j
    is back, the folded graph equals a direct load of the same events, each counted once."""
    batches = [[{"event_id": f"d{n}-{k}", "user_id": f"u{(n + k) % 7}", "item_id": f"i{k % 9}",
                 "type": TYPES[(n * k) % len(TYPES)], "ts": T0 + (n * 20 + k) * 60_000} for k in range(20)]
               for n in range(30)]
    expected, counters = direct_load(kcfg, clean_db, batches)
    away = dataclasses.replace(kcfg, ingest="kafka", neo4j_uri="bolt://127.0.0.1:9")  # nothing listens there
    base = serve(away)
    from app.db import get_driver
    folder = Folder(kcfg, get_driver(away))
    folded, stop_folding = [], threading.Event()

    def fold():
        while not stop_folding.is_set():
            folded.append(folder.step(1.0))
    thread = threading.Thread(target=fold, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        for n, batch in enumerate(batches):
            time.sleep(max(0.0, started + n - time.monotonic()))
            for _ in range(1 + (n % 5 == 0)):  # every fifth batch sent twice: a client's retry
                reply = requests.post(f"{base}/v1/events", json=batch, headers=SERVICE, timeout=30)
                assert reply.status_code == 200 and reply.json()["accepted"] == 20, reply.text
        assert time.monotonic() - started >= 29
        assert edges(clean_db, kcfg) == {} and log.lag(kcfg)["messages"] == 20 * (30 + 6)
    finally:
        folder.driver = clean_db  # Neo4j is back
        stop_folding.set()
        thread.join(120)
        folder.close()
    fold_all(kcfg, clean_db)
    assert_same_edges(edges(clean_db, kcfg), expected)
    assert writer.read_stats(clean_db, kcfg.neo4j_database) == {**counters, "duplicates": counters.get("duplicates", 0) + 120}


def _backfill_csv(tmp_path):
    """A small CSV of 300 events (some of an unknown type) and the loader flags that read it."""
    rng = random.Random(9)
    lines = ["user,item,ts,kind"] + [f"u{rng.randrange(12)},i{rng.randrange(8)},{T0 + k * 60_000},"
                                     f"{rng.choice(['view', 'cart', 'purchase', 'zap'])}" for k in range(300)]
    path = tmp_path / "events.csv"
    path.write_text("\n".join(lines) + "\n")
    return path, ["--user-col", "user", "--item-col", "item", "--ts-col", "ts", "--type-col", "kind",
                  "--chunk-size", "70"]


def test_a_csv_backfill_through_the_log_equals_a_direct_load(kcfg, clean_db, tmp_path):
    path, flags = _backfill_csv(tmp_path)
    args = ["load", "csv", str(path), *flags]
    env = {"IG_KAFKA_TOPIC": kcfg.kafka_topic, "IG_KAFKA_GROUP": kcfg.kafka_group}
    direct = CliRunner().invoke(cli, args, env=env)
    assert direct.exit_code == 0, direct.output
    expected, counters = edges(clean_db, kcfg), writer.read_stats(clean_db, kcfg.neo4j_database)
    from bench.bench_ingest import wipe
    wipe(clean_db, kcfg.neo4j_database)
    logged = CliRunner().invoke(cli, [*args, "--to", "kafka"], env=env)
    assert logged.exit_code == 0, logged.output
    assert edges(clean_db, kcfg) == {}
    fold_all(kcfg, clean_db)
    assert_same_edges(edges(clean_db, kcfg), expected)
    assert writer.read_stats(clean_db, kcfg.neo4j_database) == counters  # unknown_type drops counted once


def test_a_spark_backfill_through_the_log_equals_a_direct_load(kcfg, clean_db, tmp_path):
    """`load spark --to kafka`: the executors append to the log; folded, it equals the Python loader's
    direct load of the same file, edges and counters (the unknown types counted once)."""
    path, args = _backfill_csv(tmp_path)
    env = {"IG_KAFKA_TOPIC": kcfg.kafka_topic, "IG_KAFKA_GROUP": kcfg.kafka_group}
    direct = CliRunner().invoke(cli, ["load", "csv", str(path), *args], env=env)
    assert direct.exit_code == 0, direct.output
    expected, counters = edges(clean_db, kcfg), writer.read_stats(clean_db, kcfg.neo4j_database)
    from bench.bench_ingest import wipe
    wipe(clean_db, kcfg.neo4j_database)
    logged = CliRunner().invoke(cli, ["load", "spark", "--input", str(path), *args, "--master", "local[1]",
                                      "--to", "kafka"], env=env)
    assert logged.exit_code == 0, logged.output
    assert edges(clean_db, kcfg) == {}
    fold_all(kcfg, clean_db)
    assert_same_edges(edges(clean_db, kcfg), expected)
    assert writer.read_stats(clean_db, kcfg.neo4j_database) == counters


@pytest.mark.slow
def test_a_broker_restart_loses_nothing_and_adds_nothing_twice(kcfg, clean_db, serve):
    batches = stream(n=300, seed=11)
    expected, counters = direct_load(kcfg, clean_db, batches)
    base = serve(dataclasses.replace(kcfg, ingest="kafka", kafka_wait=2.0))

    def post(batch):
        return requests.post(f"{base}/v1/events", json=batch, headers=SERVICE, timeout=30)
    assert all(post(b).status_code == 200 for b in batches[:2])
    kafka_local.stop(kcfg)
    try:
        down = post(batches[2])
        assert down.status_code == 503 and down.headers["Retry-After"]  # a client resends it later
    finally:
        kafka_local.start(kcfg)
    for batch in batches[2:]:  # as a client does: resend after a 503 (the producer reconnects in a few s)
        deadline = time.monotonic() + 60
        while (reply := post(batch)).status_code == 503 and time.monotonic() < deadline:
            time.sleep(float(reply.headers["Retry-After"]))
        assert reply.status_code == 200
    fold_all(kcfg, clean_db)
    assert_same_edges(edges(clean_db, kcfg), expected)
    assert writer.read_stats(clean_db, kcfg.neo4j_database)["accepted"] == counters["accepted"]
