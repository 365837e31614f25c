"""Recommendation latency under load: locust (headless, loopback) against `interest-graph serve`, next to
the bare Neo4j vector query measured in the same run.

Run with the test server up: `make bench`, or
`NEO4J_URI=bolt://127.0.0.1:7688 NEO4J_HTTP_PORT=7475 IG_HOME=var/test
.venv/bin/python -m bench.bench_serving`. It wipes that server's database, loads the demo data
(Online Retail, the file `make run` serves), trains one epoch at the real embedding sizes and embeds
every node, then measures:
- sequentially (one request at a time, warm): the bare vector query (`queryNodes`, k = 20, from the
  user's stored vector) for every shopper of the mix, the full recommendation query through the
  driver and the REST answer for the first `--slow` of them;
- under load: locust at each rate for `--seconds`, for k = 20 personal recommendations plain, with
  `explain=true`, and with a price filter; p50 / p99 and the rate achieved;
- the highest rate of the ladder held (achieved >= 95% of offered, no failures) with p99 <= 50 ms.
Shoppers are drawn from those with a vector, with probability proportional to their number of
events (active shoppers ask more often).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

from app import cypher
from app.config import ROOT, load_config
from app.db import get_driver
from bench.bench_ingest import free_port, wait_ready, wipe

DEMO = ROOT / "data" / "online_retail" / "online_retail.csv.gz"
BARE_VECTOR = """
MATCH (u:User {id: $user_id})
CALL db.index.vector.queryNodes('item_embedding', 20, u.embedding) YIELD node, score
RETURN node.id AS item_id, score
"""
SHOPPERS = """
MATCH (u:User)-[r:INTERACTED]->() WHERE u.embedding IS NOT NULL
RETURN u.id AS id, sum(coalesce(r.n_view, 0) + coalesce(r.n_click, 0) + coalesce(r.n_cart, 0)
                       + coalesce(r.n_purchase, 0)) AS events
"""
VARIANTS = {"plain": "", "explain": "&explain=true", "max_price=5": "&max_price=5"}


def cli(*args: str) -> str:
    """Run `interest-graph ARGS` (this checkout's code) and return its stdout."""
    done = subprocess.run([sys.executable, "-m", "app", *args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return done.stdout


def percentiles(seconds: list[float]) -> tuple[float, float]:
    """p50 and p99 in ms."""
    return float(np.percentile(seconds, 50) * 1000), float(np.percentile(seconds, 99) * 1000)


def _timed(run, users: list[str]) -> list[float]:
    times = []
    for u in users:
        t = time.perf_counter()
        run(u)
        times.append(time.perf_counter() - t)
    return times


def sequential(driver, cfg, url: str, users: list[str], slow: int):
    """Warm, one at a time: the bare vector query over all `users`, the recommendation query via the
    driver and REST over the first `slow` of them; yields (name, p50, p99, count)."""
    with driver.session(database=cfg.neo4j_database) as s:
        vector = lambda u: s.run(BARE_VECTOR, user_id=u).data()  # noqa: E731
        recommend = lambda u: s.run(cypher.RECOMMEND_ITEMS, user_id=u, k=20, n=90, category=None,  # noqa: E731
                                    max_price=None, exclude_seen=True).data()
        _timed(vector, users[:50])  # warm-up
        yield ("bare vector query (driver)", *percentiles(_timed(vector, users)), len(users))
        recommend(users[0])
        yield ("recommendation query (driver)", *percentiles(_timed(recommend, users[:slow])), slow)
    with requests.Session() as http:
        for variant, query in VARIANTS.items():
            def get(u, query=query):
                http.get(f"{url}/v1/users/{u}/recommendations?k=20{query}", timeout=120).raise_for_status()
            yield (f"REST {variant}", *percentiles(_timed(get, users[:slow])), slow)


def warm(url: str, users: list[str], requests_: int = 64) -> None:
    """Concurrent requests until every gunicorn worker has loaded its copy of the graph."""
    from concurrent.futures import ThreadPoolExecutor
    with requests.Session() as http, ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda u: http.get(f"{url}/v1/users/{u}/recommendations?k=20", timeout=120),
                      users[:requests_]))


def settle(url: str, user: str, limit_ms: float = 20.0, timeout: float = 60.0) -> None:
    """Wait until the server has drained what an overloaded run queued (a probe answers fast again)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = time.monotonic()
        requests.get(f"{url}/v1/users/{user}/recommendations?k=20", timeout=120)
        if (time.monotonic() - t) * 1000 < limit_ms:
            return
        time.sleep(1.0)


def open_loop(url: str, users: list[str], query: str, rate: int, seconds: int) -> dict:
    """The same offered load from plain threads (one keep-alive connection and a random phase each,
    rate / 2 of them at 2 requests/s): the server's latency without the load generator's own."""
    import threading
    per_user, latencies, failures, lock = 2.0, [], [0], threading.Lock()
    end = time.monotonic() + seconds

    def shopper(seed: int) -> None:
        rng = random.Random(seed)
        with requests.Session() as http:
            time.sleep(rng.random() / per_user)
            while time.monotonic() < end:
                started = time.monotonic()
                try:
                    ok = http.get(f"{url}/v1/users/{rng.choice(users)}/recommendations?k=20{query}",
                                  timeout=60).ok
                except requests.RequestException:
                    ok = False
                took = time.monotonic() - started
                with lock:
                    latencies.append(took)
                    failures[0] += not ok
                time.sleep(max(0.0, 1 / per_user - took))
    threads = [threading.Thread(target=shopper, args=(k,)) for k in range(max(1, int(rate / per_user)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    p50, p99 = percentiles(latencies) if latencies else (float("inf"), float("inf"))
    return {"p50": p50, "p99": p99, "rps": len(latencies) / seconds, "failures": failures[0]}


def locust(url: str, users_file: str, query: str, rate: int, seconds: int, workdir: str) -> dict:
    """One headless locust run at `rate` requests/s: p50, p99 (ms), achieved rate, failures."""
    per_user = 2.0
    users = max(1, int(rate / per_user))
    prefix = os.path.join(workdir, f"run{rate}{abs(hash(query))}")
    env = {**os.environ, "IG_BENCH_USERS": users_file, "IG_BENCH_QUERY": query, "IG_BENCH_USER_RPS": str(per_user)}
    subprocess.run([sys.executable, "-m", "locust", "-f", str(ROOT / "bench" / "locustfile.py"), "--headless",
                    "-u", str(users), "-r", str(users), "--run-time", f"{seconds}s", "--host", url,
                    "--csv", prefix, "--only-summary", "--loglevel", "WARNING"],
                   env=env, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(f"{prefix}_stats.csv") as fh:
        row = next((r for r in csv.DictReader(fh) if r["Name"] == "recommendations"), None)
    if row is None:  # not one answer within the run: every request was still queued or running
        return {"p50": float("inf"), "p99": float("inf"), "rps": 0.0, "failures": 0, "requests": 0}
    return {"p50": float(row["50%"]), "p99": float(row["99%"]), "rps": float(row["Requests/s"]),
            "failures": int(row["Failure Count"]), "requests": int(row["Request Count"])}


def ladder(url: str, probe_user: str, run, rates: str) -> int | None:
    """The highest of `rates` (ascending) held: achieved >= 95% of offered, no failures, p99 <= 50 ms."""
    held = None
    for rate in map(int, rates.split(",")):
        settle(url, probe_user)
        r = run(rate)
        ok = r["rps"] >= 0.95 * rate and r["failures"] == 0 and r["p99"] <= 50
        print(f"  ladder plain {rate:8d} {r['rps']:9.1f} {r['p50']:7.0f} {r['p99']:7.0f} "
              f"{r['failures']:6d}  {'held' if ok else 'not held'}", flush=True)
        if not ok:
            break
        held = rate
    return held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="100,200,400", help="offered requests/s, comma-separated")
    parser.add_argument("--ladder", default="25,50,100,200,300,400", help="rates tried for the highest held")
    parser.add_argument("--seconds", type=int, default=20, help="length of each locust run")
    parser.add_argument("--sample", type=int, default=500, help="shoppers in the mix")
    parser.add_argument("--slow", type=int, default=20, help="shoppers timed one by one for the full answer")
    parser.add_argument("--skip-load", action="store_true", help="reuse the graph and model already there")
    parser.add_argument("--skip-sequential", action="store_true", help="only the bare vector query, then the load")
    args = parser.parse_args()
    cfg = load_config()
    driver = get_driver(cfg)
    if not args.skip_load:
        cli("migrate")  # the vector indexes at this process's embedding size (the tests' is smaller)
        wipe(driver, cfg.neo4j_database)
        t = time.monotonic()
        cli("load", "online-retail", str(DEMO))
        cli("train", "--epochs", "1")
        cli("embed", "--full")
        print(f"loaded, trained and embedded the demo data in {time.monotonic() - t:.0f}s", flush=True)
    with driver.session(database=cfg.neo4j_database) as s:
        shoppers = s.run(SHOPPERS).data()
        counts = s.run(cypher.NODE_COUNT).single()
        edges = s.run(cypher.INTERACTED_EDGE_COUNT).single()["n"]
    rng = random.Random(1)
    users = rng.choices([r["id"] for r in shoppers], weights=[r["events"] for r in shoppers], k=args.sample)
    print(f"graph: {counts['users']} users, {counts['items']} items, {edges} edges; "
          f"load average {os.getloadavg()}", flush=True)

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "app", "serve"], cwd=ROOT,
                              env={**os.environ, "IG_PORT": str(port)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        warm(url, users)
        print("\nsequential, warm                       p50 ms   p99 ms  requests")
        for name, p50, p99, count in sequential(driver, cfg, url, users, args.slow if not args.skip_sequential else 0):
            print(f"  {name:36s} {p50:8.1f} {p99:8.1f} {count:9d}", flush=True)
            if args.skip_sequential:
                break
        with tempfile.TemporaryDirectory() as workdir:
            users_file = os.path.join(workdir, "users.json")
            Path(users_file).write_text(json.dumps(users))
            generators = {
                "locust": lambda query, rate: locust(url, users_file, query, rate, args.seconds, workdir),
                "plain threads (no load generator's own latency)":
                    lambda query, rate: open_loop(url, users, query, rate, args.seconds)}
            held = {}
            for name, run in generators.items():
                print(f"\nunder load from {name}, loopback, k = 20")
                print(f"  {'variant':12s} {'offered':>8s} {'achieved':>9s} {'p50 ms':>7s} {'p99 ms':>7s} {'failed':>6s}")
                held[name] = ladder(url, users[0], lambda rate: run("", rate), args.ladder)
                for variant, query in VARIANTS.items():
                    for rate in map(int, args.rates.split(",")):
                        settle(url, users[0])
                        r = run(query, rate)
                        print(f"  {variant:12s} {rate:8d} {r['rps']:9.1f} {r['p50']:7.0f} {r['p99']:7.0f} "
                              f"{r['failures']:6d}", flush=True)
            print("\nhighest rate held with p99 <= 50 ms: " + ", ".join(
                f"{name.split(' (')[0]} {rate or 'none of the ladder'}" for name, rate in held.items()) + " requests/s")
    finally:
        server.terminate()
        try:
            server.wait(timeout=120)  # gunicorn lets in-flight requests finish
        except subprocess.TimeoutExpired:
            server.kill()
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
