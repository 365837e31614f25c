"""What each per-request bound costs at its limit (docs/reliability.md, "Bounds"), on synthetic power-law
graphs built as bench_scale builds them (N/10 users, N/50 items, an untrained first version, every
node embedded), through the API over real HTTP with reads timed by `IG_NEO4J_TIMEOUT`.

For each size: churn risk at its largest k, audience at the largest k, one recommendation with
`explain=true` without the item-item table at k = 20 and at the largest k the explain bound allows,
and a batch of the most users at k = 20 (its rate-limit cost is one request per user). Each figure
is the median of `--repeat` requests after one warm-up; a 503 (the read timed out) is reported as such.

`NEO4J_URI=bolt://127.0.0.1:7688 NEO4J_HTTP_PORT=7475 IG_HOME=var/test .venv/bin/python -m
bench.bench_bounds --sizes 100000,1000000`. It wipes that server's database.
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time

import requests
from neo4j import Query
from neo4j.exceptions import Neo4jError
from werkzeug.serving import make_server

from app import create_app, cypher
from app.config import load_config
from app.db import get_driver
from bench.bench_scale import embedded_graph, power_law_pairs
from support.servers import wait_ready


def timed_get(url: str, repeat: int, method: str = "GET", **kwargs) -> tuple[float, int]:
    """Median seconds of `repeat` requests after a warm-up, and the last status."""
    call = getattr(requests, method.lower())
    call(url, timeout=120, **kwargs)
    times, status = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        status = call(url, timeout=120, **kwargs).status_code
        times.append(time.perf_counter() - started)
    return statistics.median(times), status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--reuse", action="store_true", help="measure the graph built by the last run again")
    args = parser.parse_args()
    build_cfg = load_config(tx_timeout=1800.0)
    for size in (int(x) for x in args.sizes.split(",") if x):
        pairs = power_law_pairs(size, args.seed)
        users = sorted({u for u, _ in pairs})
        driver = get_driver(build_cfg)
        built = embedded = 0.0
        if not args.reuse:
            built, embedded = embedded_graph(build_cfg, pairs)
        # Served as in production (reads need the read token; no rate limit here), without the table.
        # The copy is loaded once and not synced meanwhile: the figures are the requests' own work.
        cfg = load_config(explain_table_mb=0, read_token="bench-read-token", open_reads=False,
                          churn_max_edges=max(size, load_config().churn_max_edges), serving_max_age=3600.0,
                          serving_poll=3600.0)
        server = make_server("127.0.0.1", 0, create_app(cfg), threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_port}"
        auth = {"headers": {"Authorization": "Bearer bench-read-token"}}
        started = time.perf_counter()
        wait_ready(url, tries=3600)  # the copy loads in the background; requests meanwhile get 503
        loaded = time.perf_counter() - started
        most = min(cfg.max_k, int(cfg.explain_max_mb * 2**20 // (8 * len(users))))
        item = pairs[0][1]
        figures = {
            f"churn risk k={cfg.churn_max_k}": timed_get(f"{url}/v1/users/churn-risk?k={cfg.churn_max_k}", args.repeat, **auth),
            f"audience k={cfg.max_k}": timed_get(f"{url}/v1/items/{item}/audience?k={cfg.max_k}", args.repeat, **auth),
            "recommendation k=20": timed_get(f"{url}/v1/users/{users[1]}/recommendations?k=20", args.repeat, **auth),
            "explain k=20": timed_get(f"{url}/v1/users/{users[1]}/recommendations?k=20&explain=true", args.repeat, **auth),
            f"explain k={most} (the largest allowed)": timed_get(
                f"{url}/v1/users/{users[1]}/recommendations?k={most}&explain=true", args.repeat, **auth),
            f"batch of {cfg.max_batch_users} users k=20": timed_get(
                f"{url}/v1/recommendations", args.repeat, method="POST",
                json={"user_ids": users[2:2 + cfg.max_batch_users], "k": 20}, **auth),
        }
        server.shutdown()
        with driver.session(database=cfg.neo4j_database) as session:  # the scan's own time, up to 300 s
            began, status = time.perf_counter(), None
            try:
                session.run(Query(cypher.CHURN_RISK, timeout=300), k=cfg.churn_max_k, min_events=3).consume()
            except Neo4jError:
                status = "timed out"
            figures["churn risk scan alone"] = (time.perf_counter() - began, status)
        print(f"\n{size:,} edges, {len(users):,} users, {size // 50:,} items: import {built:.0f} s, "
              f"first version and full embedding {embedded:.0f} s, API copy load {loaded:.1f} s; "
              f"explain without the table reads k x {len(users):,} x 8 bytes (k <= {most})")
        for name, (seconds, status) in figures.items():
            print(f"  {name:40s} {seconds * 1000:9.1f} ms" + (f"  ({status if isinstance(status, str) else f'HTTP {status}'})" if status else ""), flush=True)
        del pairs, users


if __name__ == "__main__":
    main()
