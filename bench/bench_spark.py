"""Backfill throughput in one run: the Python loader against `load spark` at local[1] and local[2].

All three load the full UCI Online Retail file into an emptied database; the run also checks that
they leave the same edges, weights and item metadata. `make bench` runs it on the test server; alone:
`NEO4J_URI=bolt://127.0.0.1:7688 NEO4J_HTTP_PORT=7475 IG_HOME=var/test .venv/bin/python -m bench.bench_spark`.
It wipes that server's database.
"""
from __future__ import annotations

import argparse
import math
import time

from app.config import load_config
from app.db import get_driver
from app.ingest import loaders, spark
from support.graph import wipe

DATA = "../shared/data/online_retail/online_retail.csv.gz"
STATE = ("MATCH (u:User)-[r:INTERACTED]->(i:Item) RETURN u.id AS u, i.id AS i, r.w AS w, r.qty AS qty, "
         "r.first_ts AS first, r.last_ts AS last")
ITEMS = "MATCH (i:Item) RETURN i.id AS id, i.title AS title, i.price AS price"


def state(driver, database: str) -> tuple[dict, dict]:
    with driver.session(database=database) as s:
        edges = {(r["u"], r["i"]): r.data() for r in s.run(STATE)}
        return edges, {r["id"]: r.data() for r in s.run(ITEMS)}


def same(a: tuple[dict, dict], b: tuple[dict, dict]) -> bool:
    """Equal edges (weights to 1e-12: transactions add in another order) and item metadata."""
    return a[1] == b[1] and a[0].keys() == b[0].keys() and all(
        math.isclose(x["w"], b[0][k]["w"], rel_tol=1e-12, abs_tol=1e-12) and {**x, "w": 0} == {**b[0][k], "w": 0}
        for k, x in a[0].items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DATA)
    args = parser.parse_args()
    cfg = load_config()
    driver = get_driver(cfg)
    runs, reference = [], None
    for label in ("python loader (2 threads)", "spark local[1]", "spark local[2]"):
        wipe(driver, cfg.neo4j_database)
        start = time.perf_counter()
        if label.startswith("python"):
            totals = loaders.load(driver, cfg, loaders.online_retail_batches(args.data), label="python")
        else:
            totals = spark.load(cfg, args.data, "online-retail", master=label.split()[-1])
        seconds = time.perf_counter() - start
        result = state(driver, cfg.neo4j_database)
        reference = reference or result
        runs.append((label, totals["rows"], totals["accepted"], seconds, same(result, reference)))
    print(f"\n{'loader':<26} {'rows':>8} {'accepted':>9} {'seconds':>8} {'rows/s':>8} {'vs python':>9} same graph")
    for label, rows, accepted, seconds, equal in runs:
        print(f"{label:<26} {rows:8,d} {accepted:9,d} {seconds:8.1f} {rows / seconds:8,.0f} "
              f"{runs[0][3] / seconds:8.2f}x {'yes' if equal else 'NO'}")


if __name__ == "__main__":
    main()
