"""Incremental refresh against full recompute on Gowalla graphs of ~10k/100k/1M edges, and freshness under a stream.

Run with the test server up: `make bench`, or
`NEO4J_URI=bolt://127.0.0.1:7688 NEO4J_HTTP_PORT=7475 IG_HOME=var/test
.venv/bin/python -m bench.bench_refresh`. It wipes that server's database.

A graph of N edges is the first N distinct (user, item) pairs of Gowalla in user order (each
user's train items, then its test items). It is written by the bench-only SETUP_* statements,
which set what the ingest path sets (no Event nodes: nothing here is retried); every measured
change goes through `pipeline.ingest` or the REST API.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import subprocess
import sys
import threading
import time

import numpy as np
import requests

from app import cypher
from app.config import ROOT, load_config
from app.db import get_driver
from app.embeddings import models
from app.embeddings.full import embed_full
from app.embeddings.refresh import refresh
from app.embeddings.training import train_and_publish
from app.ingest import decay, pipeline
from app.worker import Worker
from bench.bench_ingest import SERVICE, graph_counts
from support.graph import wipe
from support.recipes import bind, recipe
from support.servers import free_port, wait_ready

DATA = ROOT.parent / "shared" / "data" / "gowalla"  # read in place, never copied
DAY_MS = 86_400_000
# The graph is history: written a day ago (`changed_at = $ts`), as if loaded then and already
# refreshed (no `ig_unseen` flag: the first full run reflects it anyway).
SETUP_USERS = "UNWIND $ids AS id CREATE (:User {id: id, changed_at: $ts})"
SETUP_ITEMS = "UNWIND $ids AS id CREATE (:Item {id: id, changed_at: $ts})"
# One `view` event per edge at `ts`, exactly as INGEST_WRITE would leave it then.
SETUP_EDGES = """
UNWIND $rows AS row
MATCH (u:User {id: row[0]}) MATCH (i:Item {id: row[1]})
CREATE (u)-[:INTERACTED {w: $w, qty: 0.0, first_ts: $ts, last_ts: $ts, n_view: 1,
                         changed_at: $ts, rev: 1}]->(i)
"""
# The sampled event's edge: its revision and the revision the stored state reflects (the user's
# embedding and degree and the item's degree are written in the run that records it).
PROBE = """
UNWIND $rows AS row
MATCH (u:User {id: row.u})-[r:INTERACTED]->(:Item {id: row.i})
RETURN row.k AS k, r.rev AS rev, r.ig_rev AS ig_rev
"""
RECENT_RUNS = "MATCH (s:_Refresh {key: 'main'}) RETURN s.recent AS recent"
WORKER_ACTIVE = "OPTIONAL MATCH (s:_Refresh {key: 'main'}) RETURN coalesce(s.lease_until, 0) > timestamp() AS active"


def gowalla_pairs() -> list[tuple[str, str]]:
    """Distinct (user, item) pairs of the whole split in user order, train items before test items."""
    per_user: dict[str, list[str]] = {}
    for name in ("train.txt.gz", "test.txt.gz"):
        with gzip.open(DATA / name, "rt") as fh:
            for line in fh:
                parts = line.split()
                if parts:
                    per_user.setdefault(f"g{parts[0]}", []).extend(f"p{x}" for x in parts[1:])
    pairs = []
    for user in sorted(per_user, key=lambda u: int(u[1:])):
        pairs.extend((user, item) for item in dict.fromkeys(per_user[user]))
    return pairs


def test_pairs() -> list[tuple[str, str]]:
    """The Gowalla test interactions, the source of the streamed events."""
    with gzip.open(DATA / "test.txt.gz", "rt") as fh:
        return [(f"g{p[0]}", f"p{x}") for p in map(str.split, fh) if p for x in p[1:]]


def build(driver, cfg, pairs: list[tuple[str, str]], batch: int = 10_000) -> float:
    """Wipe, then write the graph of `pairs` directly; seconds taken."""
    started = time.perf_counter()
    db = cfg.neo4j_database
    wipe(driver, db)
    ts = int(time.time() * 1000) - DAY_MS
    w = decay.factor(cfg, ts)
    users, items = sorted({u for u, _ in pairs}), sorted({i for _, i in pairs})
    with driver.session(database=db) as s:
        for query, ids in ((SETUP_USERS, users), (SETUP_ITEMS, items)):
            for j in range(0, len(ids), batch):
                s.execute_write(lambda tx, part=ids[j:j + batch]: tx.run(query, ids=part, ts=ts).consume())
        rows = [list(p) for p in pairs]
        for j in range(0, len(rows), batch):
            s.execute_write(lambda tx, part=rows[j:j + batch]: tx.run(SETUP_EDGES, rows=part, w=w, ts=ts).consume())
    return time.perf_counter() - started


_seq = iter(range(10**12))


def events(pairs_or_users, n: int, rng: random.Random, items: list[str] | None = None) -> list[dict]:
    """`n` view events now: (user, item) from `pairs_or_users`, or a user from it and an item from `items`."""
    now = int(time.time() * 1000)
    out = []
    for k in range(n):
        if items is None:
            user, item = rng.choice(pairs_or_users)
        else:
            user, item = pairs_or_users[k % len(pairs_or_users)], rng.choice(items)
        out.append({"event_id": f"b{next(_seq)}-{rng.random():.12f}", "user_id": user, "item_id": item,
                    "type": "view", "ts": now})
    return out


def ingest(driver, cfg, evs: list[dict], batch: int = 5000) -> None:
    """Commit events through the real ingest path."""
    for j in range(0, len(evs), batch):
        pipeline.ingest(driver, cfg, evs[j:j + batch])


def timed_refresh(driver, cfg, lm, owner: str) -> dict:
    """One incremental run over the pending changes, timed (everything it reaches is then exact)."""
    started = time.perf_counter()
    run = refresh(driver, cfg, lm, owner=owner)
    run["wall"] = time.perf_counter() - started
    return run


def recommend_latency(driver, cfg, users: list[str], rng, n: int = 30, k: int = 20) -> dict:
    """Seconds of docs/cypher.md's recommendation recipe (graph filter over the live graph + index), p50 and max."""
    times = []
    params, query = recipe("Recommendations for a shopper")
    with driver.session(database=cfg.neo4j_database) as s:
        values = bind(s, params)
        for user in rng.sample(users, min(n, len(users))):
            started = time.perf_counter()
            s.run(query, **{**values, "user_id": user, "k": k, "n": 2 * k + 50}).consume()
            times.append(time.perf_counter() - started)
    return {"p50": float(np.percentile(times, 50)), "max": max(times)}


def measure_size(driver, cfg, pairs, rng, owner: str, build_s: float, recommend: bool = True) -> dict:
    """Full recompute, refresh after 1% of users changed, refresh after 1,000 events, on the graph of
    `pairs` (built, in `build_s`); as lease holder `owner`."""
    row = {"edges": len(pairs), "build_s": build_s}
    row.update(graph_counts(driver, cfg.neo4j_database))
    published = train_and_publish(driver, cfg, progress=False, train_model=False, owner=owner)
    lm = models.load(published["checkpoint"], published["version"])
    started = time.perf_counter()
    row["full"] = embed_full(driver, cfg, lm, owner=owner)
    row["full_s"] = time.perf_counter() - started
    users = sorted({u for u, _ in pairs})
    edge_items = [i for _, i in pairs]  # drawn in proportion to popularity
    ingest(driver, cfg, events(users[:1], 1, rng, edge_items))  # warm-up (first torch calls), not timed
    refresh(driver, cfg, lm, owner=owner)
    sample = rng.sample(users, max(1, round(0.01 * len(users))))
    ingest(driver, cfg, events(sample, len(sample), rng, edge_items))
    row["pct"] = timed_refresh(driver, cfg, lm, owner)
    ingest(driver, cfg, events([rng.choice(users) for _ in range(1000)], 1000, rng, edge_items))
    row["k1000"] = timed_refresh(driver, cfg, lm, owner)
    if recommend:
        row["recommend"] = recommend_latency(driver, cfg, users, rng)
    return row


def stream(driver, cfg, seconds: float, rate: int, batch: int, interval: float, rng) -> dict:
    """Events through `serve` at `rate`/s with one `worker`; latency from POST reply to a visible embedding."""
    port = free_port()
    env = {**os.environ, "IG_PORT": str(port), "IG_REFRESH_INTERVAL": str(interval)}
    worker_log = open(cfg.home / "bench_refresh_worker.log", "w")  # the worker's runs and failures
    procs = [subprocess.Popen([sys.executable, "-m", "app", cmd], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=worker_log if cmd == "worker" else subprocess.DEVNULL)
             for cmd in ("serve", "worker")]
    url = f"http://127.0.0.1:{port}"
    source, samples, lock, done = test_pairs(), [], threading.Lock(), threading.Event()
    try:
        wait_ready(url)
        with driver.session(database=cfg.neo4j_database) as s:  # steady state: the worker holds the lease
            deadline = time.time() + 60
            while not s.run(WORKER_ACTIVE).single()["active"] and time.time() < deadline:
                time.sleep(0.1)

        def poll():
            with driver.session(database=cfg.neo4j_database) as s:
                while True:
                    with lock:
                        pending = [x for x in samples if "seen" not in x]
                    if not pending:
                        if done.is_set():
                            return
                        time.sleep(0.05)
                        continue
                    rows = [{"k": n, "u": x["u"], "i": x["i"]} for n, x in enumerate(pending)]
                    now = time.time()
                    for r in s.run(PROBE, rows=rows):
                        x = pending[r["k"]]
                        x.setdefault("rev", r["rev"])
                        if (r["ig_rev"] or -1) >= x["rev"]:
                            x["seen"] = now
                    if done.is_set() and time.time() > done.deadline:
                        return
                    time.sleep(0.05)
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        sent, started = 0, time.perf_counter()
        with requests.Session() as http:
            for k in range(int(seconds * rate / batch)):
                delay = started + k * batch / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                part = events(source, batch, rng)
                reply = http.post(f"{url}/v1/events", json=part, headers=SERVICE, timeout=60)
                reply.raise_for_status()
                committed = time.time()
                sent += len(part)
                with lock:  # one sampled event a batch
                    samples.append({"u": part[0]["user_id"], "i": part[0]["item_id"], "at": committed})
        elapsed = time.perf_counter() - started
        done.deadline = time.time() + 60  # the poller gives up on samples still stale by then
        done.set()
        poller.join()
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=60)
        worker_log.close()
    with driver.session(database=cfg.neo4j_database) as s:
        recent = [json.loads(r) for r in s.run(RECENT_RUNS).single()["recent"] or []]
    out = {"recent": [(r["mode"], r.get("users"), r["seconds"]) for r in recent], "sent": sent,
           "rate": sent / elapsed, "samples": len(samples)}
    lat = np.array([x["seen"] - x["at"] for x in samples if "seen" in x])
    out["user"] = {"missed": len(samples) - len(lat),
                   "p50": float(np.percentile(lat, 50)) if len(lat) else float("inf"),
                   "p99": float(np.percentile(lat, 99)) if len(lat) else float("inf")}
    return out


def report(rows: list[dict]) -> None:
    """The table of parts 1 and 2."""
    print("run = one incremental run, after which every stored value it reaches is exact; share = stored "
          "embeddings and degrees it rewrites (changed users, their items' degrees) / all nodes")
    print(f"{'edges':>9} {'users':>6} {'items':>6} | {'full s':>7} | 1% of users: {'run s':>7} {'ratio':>6} "
          f"{'share':>6} | 1,000 events: {'run s':>7} {'ratio':>6} {'share':>6}")
    for r in rows:
        f, nodes = r["full_s"], r["users"] + r["items"]
        cells = [f"{x['wall']:>7.3f} {x['wall'] / f:>6.3f} {(x['users'] + x['items']) / nodes:>6.3f}"
                 for x in (r["pct"], r["k1000"])]
        print(f"{r['edges']:>9,} {r['users']:>6,} {r['items']:>6,} | {f:>7.2f} | {'':>12} {cells[0]} | {'':>13} {cells[1]}")
    k = [r["k1000"]["wall"] for r in rows]
    print(f"1,000 events: largest / smallest graph = {k[-1] / k[0]:.2f}x "
          f"(full: {rows[-1]['full_s'] / rows[0]['full_s']:.1f}x)")
    for r in rows:
        print(f"recommendations (k=20, one Cypher query) on {r['edges']:,} edges: p50 {r['recommend']['p50']:.3f}s "
              f"max {r['recommend']['max']:.3f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="edge counts (capped at the 1,027,370 pairs)")
    parser.add_argument("--stream-seconds", type=float, default=300.0)
    parser.add_argument("--rate", type=int, default=1000, help="streamed events per second")
    parser.add_argument("--batch", type=int, default=100, help="events per POST")
    parser.add_argument("--interval", type=float, default=1.0, help="worker IG_REFRESH_INTERVAL (s)")
    parser.add_argument("--stream-base", type=int, default=100_000, help="edges of the stream's base graph")
    parser.add_argument("--quick", action="store_true", help="sizes 10k,100k and a 30 s stream")
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.stream_seconds = "10000,100000", min(args.stream_seconds, 30.0)
    cfg = load_config(full_share=10.0, refresh_max_users=0)  # parts 1 and 2: one incremental run over all changes
    driver, rng = get_driver(cfg), random.Random(args.seed)
    pairs = gowalla_pairs()
    rows = []
    for size in (int(x) for x in args.sizes.split(",") if x):
        built = build(driver, cfg, pairs[:size])  # the wipe takes the lease node with it: build first
        with Worker(cfg).holding() as holder:  # every writer of embeddings holds the lease
            rows.append(measure_size(driver, cfg, pairs[:size], rng, holder.owner, built))
        r = rows[-1]
        print(f"{r['edges']:,} edges: build {r['build_s']:.1f}s, full {r['full_s']:.2f}s {r['full']}, "
              f"1% {r['pct']}, 1000 {r['k1000']}", flush=True)
    if rows:
        report(rows)
    if args.stream_seconds > 0:
        build(driver, cfg, pairs[:args.stream_base])
        with Worker(cfg).holding() as holder:  # released before the stream's worker starts
            train_and_publish(driver, cfg, progress=False, train_model=False, owner=holder.owner)
        s = stream(driver, cfg, args.stream_seconds, args.rate, args.batch, args.interval, rng)
        print(f"stream {args.stream_seconds:.0f}s on {args.stream_base:,} edges: {s['rate']:,.0f} events/s sent, "
              f"{s['samples']} sampled; user's embedding p50 {s['user']['p50']:.2f}s p99 {s['user']['p99']:.2f}s "
              f"({s['user']['missed']} not within 60 s)\nlast worker runs (mode, users, s): {s['recent']}",
              flush=True)


if __name__ == "__main__":
    main()
