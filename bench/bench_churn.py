"""Churn risk from stored scores and audiences: latency through the API on bench_scale's power-law graphs.

For each size (N edges, N/10 users, N/50 items, an untrained first version, every node embedded): a
churn score written for every user with the churn job's own statement (bench_scale's graph has one
timestamp, so there is no history to train on: the scores are seeded random numbers; what is
measured is the read), then `--repeat` requests each of `GET /v1/users/churn-risk?k=1000` and
`GET /v1/items/<item>/audience?k=500` (two items: a popular one and one from the middle of the edge list;
scored on the API's copy of the graph, which is loaded first) over real HTTP after one warm-up: p50,
p99, max.

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
from app.serving import graph
from bench.bench_scale import embedded_graph, power_law_pairs


def latencies(url: str, repeat: int, **kwargs) -> dict:
    """p50 / p99 / max milliseconds of `repeat` GETs after one warm-up, and the statuses seen."""
    requests.get(url, timeout=120, **kwargs)
    times, statuses = [], set()
    for _ in range(repeat):
        started = time.perf_counter()
        statuses.add(requests.get(url, timeout=120, **kwargs).status_code)
        times.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": round(float(np.percentile(times, 50)), 1), "p99_ms": round(float(np.percentile(times, 99)), 1),
            "max_ms": round(max(times), 1), "status": sorted(statuses)}


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
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,1000000")
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--reuse", action="store_true", help="measure the graph and scores of the last run again")
    args = parser.parse_args()
    build_cfg = load_config(tx_timeout=1800.0)
    for size in (int(x) for x in args.sizes.split(",") if x):
        pairs = power_law_pairs(size, args.seed)
        users = sorted({u for u, _ in pairs})
        driver = get_driver(build_cfg)
        built = embedded = written = 0.0
        if not args.reuse:
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
        figures = {
            f"churn risk k={cfg.churn_max_k}": latencies(f"{url}/v1/users/churn-risk?k={cfg.churn_max_k}",
                                                         args.repeat, **auth),
            "churn risk k=50": latencies(f"{url}/v1/users/churn-risk?k=50", args.repeat, **auth),
            f"audience k={k}": latencies(f"{url}/v1/items/{pairs[0][1]}/audience?k={k}", args.repeat, **auth),
            f"audience k={k} (another item)": latencies(f"{url}/v1/items/{pairs[len(pairs) // 2][1]}/audience?k={k}",
                                                        args.repeat, **auth),
        }
        server.shutdown()
        print(f"\n{size:,} edges, {len(users):,} users, {size // 50:,} items: import {built:.0f} s, "
              f"first version and full embedding {embedded:.0f} s, scores written {written:.1f} s, "
              f"API copy loaded {loaded:.1f} s; audiences score at most {cfg.audience_candidates} candidates")
        for name, f in figures.items():
            print(f"  {name:24s} p50 {f['p50_ms']:8.1f} ms  p99 {f['p99_ms']:8.1f} ms  max {f['max_ms']:8.1f} ms  "
                  f"HTTP {f['status']}", flush=True)
        del pairs, users


if __name__ == "__main__":
    main()
