"""Churn risk from stored scores and audiences: latency through the API on bench_scale's power-law graphs.

For each size (N edges, N/10 users, N/50 items, an untrained first version, every node embedded): a
churn score written for every user with the churn job's own statement (bench_scale's graph has one
timestamp, so there is no history to train on: the scores are seeded random numbers; what is
measured is the read), then `--repeat` requests each of `GET /v1/users/churn-risk?k=1000` and
`GET /v1/items/<item>/audience?k=500` (two items: a popular one and one from the middle of the edge list;
scored on the API's copy of the graph, which is loaded first) over real HTTP after one warm-up: p50,
p99, max. Churn risk is also timed as the first request after a new scoring run (`--repeat`/10 times,
this process's kept list dropped before each: it reads the stamp and the stored top k). With
`--scores-only`, N/10 users without edges (what the churn read touches) and no audience.

`NEO4J_URI=bolt://127.0.0.1:7688 NEO4J_HTTP_PORT=7475 IG_HOME=var/test IG_EMBED_DIM=32 IG_SHARP_DIM=8
.venv/bin/python -m bench.bench_churn --sizes 10000,1000000` (the dimensions are the server's vector
index's). It wipes that server's database.
"""
from __future__ import annotations

import argparse
import json
import random
import threading
import time

import numpy as np
import requests
from tqdm.auto import tqdm
from werkzeug.serving import make_server

from app import churn, create_app, cypher
from app.config import load_config
from app.db import get_driver
from app.serving import churntop, graph
from bench.bench_scale import embedded_graph, power_law_pairs
from support.graph import wipe


def latencies(url: str, repeat: int, **kwargs) -> dict:
    """p50 / p99 / max milliseconds of `repeat` GETs after one warm-up, the statuses seen and the rows
    of the warm-up's answer."""
    rows = len(requests.get(url, timeout=120, **kwargs).json().get("results") or [])
    times, statuses = [], set()
    for _ in range(repeat):
        started = time.perf_counter()
        statuses.add(requests.get(url, timeout=120, **kwargs).status_code)
        times.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": round(float(np.percentile(times, 50)), 1), "p99_ms": round(float(np.percentile(times, 99)), 1),
            "max_ms": round(max(times), 1), "status": sorted(statuses), "rows": rows}


def ready(url: str, timeout: float = 1800.0) -> float:
    """Seconds until the API's copy of the graph has loaded (/readyz 200): audiences are scored on it."""
    started = time.perf_counter()
    while requests.get(f"{url}/readyz", timeout=60).status_code != 200:
        if time.perf_counter() - started > timeout:
            raise RuntimeError("the API's copy of the graph did not load")
        time.sleep(0.5)
    return time.perf_counter() - started


def store_scores(driver, cfg, users: list[str], seed: int) -> float:
    """Seconds to write a score for every user in the job's batches (CHURN_WRITE_SCORES)."""
    rng = random.Random(seed)
    reasons = json.dumps({"recency_days": {"value": 30.0, "contribution": 0.8}})
    started = time.perf_counter()
    with driver.session(database=cfg.neo4j_database) as s:
        for at in tqdm(range(0, len(users), churn.BATCH), desc="scores", unit=" batches"):
            rows = [{"user": u, "score": rng.random(), "reasons": reasons, "days": rng.randint(2, 20),
                     "silent_days": 30.0, "gap_days": 7.0} for u in users[at:at + churn.BATCH]]
            s.execute_write(lambda tx: tx.run(cypher.CHURN_WRITE_SCORES, rows=rows, version="bench",
                                              at="bench").consume())
        # the run's end, as the job ends it: the stamp the API's kept list is checked against
        s.execute_write(lambda tx: tx.run(cypher.CHURN_CLEAR, at="bench", version="bench").consume())
    return time.perf_counter() - started


def bare_users(driver, cfg, users: list[str]) -> float:
    """Seconds to create `users` without edges (--scores-only: the churn read touches only users)."""
    started = time.perf_counter()
    with driver.session(database=cfg.neo4j_database) as s:
        for at in range(0, len(users), 10_000):
            s.execute_write(lambda tx: tx.run("UNWIND $ids AS id MERGE (:User {id: id})",
                                              ids=users[at:at + 10_000]).consume())
    return time.perf_counter() - started


def reloads(url: str, repeat: int, **kwargs) -> dict:
    """p50 / p99 / max milliseconds of the first request after a new run (the kept list dropped before each)."""
    times = []
    for _ in range(repeat):
        churntop.forget()
        started = time.perf_counter()
        assert requests.get(url, timeout=120, **kwargs).status_code == 200
        times.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": round(float(np.percentile(times, 50)), 1), "p99_ms": round(float(np.percentile(times, 99)), 1),
            "max_ms": round(max(times), 1), "status": [200], "rows": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,1000000")
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--reuse", action="store_true", help="measure the graph and scores of the last run again")
    parser.add_argument("--scores-only", action="store_true",
                        help="N/10 users without edges, each with a score: churn risk only, no audience")
    args = parser.parse_args()
    build_cfg = load_config(tx_timeout=1800.0)
    for size in (int(x) for x in args.sizes.split(",") if x):
        pairs = [] if args.scores_only else power_law_pairs(size, args.seed)
        users = [f"u{n}" for n in range(size // 10)] if args.scores_only else sorted({u for u, _ in pairs})
        driver = get_driver(build_cfg)
        built = embedded = written = 0.0
        if not args.reuse:
            if args.scores_only:
                wipe(driver, build_cfg.neo4j_database)
                built = bare_users(driver, build_cfg, users)
            else:
                built, embedded = embedded_graph(build_cfg, pairs)
            written = store_scores(driver, build_cfg, users, args.seed)
        cfg = load_config(read_token="bench-read-token", open_reads=False, serving_max_age=3600.0,
                          serving_poll=3600.0)
        # The process's copy of the graph is shared by apps on one driver, and it is not synced here
        # (IG_SERVING_MAX_AGE 3600): each size loads its own.
        graph._copies.clear()
        server = make_server("127.0.0.1", 0, create_app(cfg), threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_port}"
        auth = {"headers": {"Authorization": "Bearer bench-read-token"}}
        loaded = ready(url)
        k = cfg.audience_max_k
        churn_url = f"{url}/v1/users/churn-risk?k={cfg.churn_max_k}"
        figures = {
            f"churn risk k={cfg.churn_max_k}": latencies(churn_url, args.repeat, **auth),
            "churn risk k=50": latencies(f"{url}/v1/users/churn-risk?k=50", args.repeat, **auth),
            f"churn risk k={cfg.churn_max_k}, new run": reloads(churn_url, max(1, args.repeat // 10), **auth),
        }
        if pairs:
            figures[f"audience k={k}"] = latencies(f"{url}/v1/items/{pairs[0][1]}/audience?k={k}", args.repeat, **auth)
            figures[f"audience k={k} (another item)"] = latencies(
                f"{url}/v1/items/{pairs[len(pairs) // 2][1]}/audience?k={k}", args.repeat, **auth)
        server.shutdown()
        graph_size = f"{len(users):,} users, no edges" if args.scores_only else \
            f"{size:,} edges, {len(users):,} users, {size // 50:,} items"
        print(f"\n{graph_size}: import {built:.0f} s, "
              f"first version and full embedding {embedded:.0f} s, scores written {written:.1f} s, "
              f"API copy loaded {loaded:.1f} s; audiences score at most {cfg.audience_candidates} candidates")
        for name, f in figures.items():
            print(f"  {name:24s} p50 {f['p50_ms']:8.1f} ms  p99 {f['p99_ms']:8.1f} ms  max {f['max_ms']:8.1f} ms  "
                  f"HTTP {f['status']}, {f['rows']} rows", flush=True)
        del pairs, users


if __name__ == "__main__":
    main()
