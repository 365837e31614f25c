"""Exactness soak for minutes: every writer at once against `serve` and `worker`, then drain and compare
every stored value with a full recompute (the harness of support/soak.py, cycled).

Run with the test server up: `make bench`, or
`NEO4J_URI=bolt://127.0.0.1:7688 NEO4J_HTTP_PORT=7475 IG_HOME=var/test
.venv/bin/python -m bench.bench_soak [--seconds 300]`. It wipes that server's database. Exits 1 if a
stored value differs from the full recompute by more than 1e-9, an answer mixed versions, or any
other promise of the soak broke (see `support.soak_check.problems`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from app.config import load_config
from app.db import get_driver
from support.refresh import worker_owner
from support.servers import free_port, spawn, stop, wait_for, wait_ready
from support import settings
from support.soak import SUBPROCESS_ENV, Soak, seed
from support.soak_check import TOLERANCE, problems

# The soaks run under the suite's settings (its test server, tokens, small vectors, every answer
# synced first): the settings their figures in docs/ were measured under.
settings.apply()

INDEX_DIM = "SHOW VECTOR INDEXES YIELD name, options WHERE name = 'item_embedding' RETURN options AS o"


def match_index_dims() -> None:
    """Size the embeddings for the server's vector index (made by whichever `migrate` ran first):
    vectors of another length would not be indexed and every recommendation would fail."""
    cfg = load_config()
    with get_driver(cfg).session(database=cfg.neo4j_database) as s:
        record = s.run(INDEX_DIM).single()
    if record is None:
        sys.exit("error: no item_embedding index: run `interest-graph migrate` first")
    dim = record["o"]["indexConfig"]["vector.dimensions"]
    sharp = (dim - 1) // 5  # IG_EMBED_DIM : IG_SHARP_DIM = 4 : 1, as both the defaults and the tests
    os.environ["IG_EMBED_DIM"], os.environ["IG_SHARP_DIM"] = str(dim - 1 - sharp), str(sharp)
    if load_config().vector_dim != dim:
        sys.exit(f"error: cannot size embeddings for the {dim}-dimensional index")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="load at least this long (whole cycles)")
    parser.add_argument("--gap", type=float, default=10.0, help="seconds of ingest only between cycles")
    parser.add_argument("--events", type=int, default=3000, help="events of the seed graph")
    parser.add_argument("--users", type=int, default=300, help="users of the seed graph")
    parser.add_argument("--items", type=int, default=200, help="items of the seed graph")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("IG_ADMIN_TOKEN", "bench-admin-token")
    match_index_dims()
    cfg = load_config()
    driver = get_driver(cfg)
    logs = cfg.home / "bench_soak"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    seeded = seed(driver, cfg, args.events, args.users, args.items)  # waits for any earlier lease to lapse
    port = free_port()
    env = {**os.environ, **SUBPROCESS_ENV, "IG_PORT": str(port)}
    url = f"http://127.0.0.1:{port}"
    serve, worker = spawn(["serve"], env, logs / "serve.log"), spawn(["worker"], env, logs / "worker.log")
    try:
        wait_ready(url)
        wait_for(lambda: f":{worker.pid}:" in (worker_owner(driver, cfg) or ""), timeout=60, step=0.2)
        soak = Soak(url, driver, cfg, env, logs, seeded, users=args.users, items=args.items, seed=args.seed)
        report = soak.run(args.seconds, gap=args.gap)
    finally:
        stop(worker)
        stop(serve)
    found = problems(report)
    if found:  # everything measured, for the diagnosis
        print(json.dumps(report, indent=1, default=str))
    print(f"soak {report['load_seconds']:.0f}s of load (+{report['drain_seconds']}s drain, "
          f"{time.monotonic() - started:.0f}s in all; logs in {logs}):\n"
          f"  events {report['events']:,} accepted in {report['batches']:,} batches ({report['resent']} resent as "
          f"duplicates), {report['item_updates']} item updates, {report['erasures']} erasures "
          f"(+{report['recreated_in_full_runs']} erased and created again during full runs)\n"
          f"  runs {report['runs']}, jobs {report['jobs']} ({report['cli']} from the CLI)\n"
          f"  answers {report['answers']:,} {report['answer_statuses']}, empty without a version "
          f"{report['empty_answers']}\n"
          f"  versions seen {report['versions_seen']} ({report['models']} model versions made)\n"
          f"  worst difference from a full recompute {report['worst']:.3g} (bound {TOLERANCE:g})")
    for line in found:
        print(f"FAIL: {line}")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
