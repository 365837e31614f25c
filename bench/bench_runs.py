"""Where a refresh run's time goes in a backlog of new shoppers: each run's phases and CPU.

`--users` new shoppers (one event each) are ingested with no worker, then `--runs` capped runs
(`IG_REFRESH_MAX_USERS`) are made in this process under the lease; for each: its phases (the run
record's `phases`), wall time, this process's CPU and the local Neo4j server's. The rest of the backlog
is then drained. With a server up (not wiped, the current model used):
`NEO4J_URI=bolt://127.0.0.1:7688 NEO4J_HTTP_PORT=7475 IG_HOME=var/test .venv/bin/python -m bench.bench_runs`.
"""
from __future__ import annotations

import argparse
import os
import random
import time
import uuid

from app.config import load_config
from app.db import get_driver
from app.embeddings import models
from app.embeddings.refresh import refresh
from app.ingest import pipeline
from app.worker import Worker
from bench.bench_freshness import event
from bench.bench_ingest import server_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=8)
    args = parser.parse_args()
    cfg = load_config()
    driver = get_driver(cfg)
    lm = models.current(driver, cfg)
    if lm is None:
        raise SystemExit("no current model: train one first")
    rng, tag = random.Random(7), f"runs-{uuid.uuid4().hex[:6]}-"
    evs = [event(f"{tag}{k}", rng) for k in range(args.users)]
    for j in range(0, len(evs), 5000):
        pipeline.ingest(driver, cfg, evs[j:j + 5000])
    print("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()), flush=True)
    with Worker(cfg).holding() as holder:
        for k in range(args.runs):
            cpu, neo, started = time.process_time(), server_cpu(cfg), time.perf_counter()
            run = refresh(driver, cfg, lm, owner=holder.owner)
            wall, cpu, neo = time.perf_counter() - started, time.process_time() - cpu, server_cpu(cfg) - neo
            phases = ", ".join(f"{p} {s:.3f}" for p, s in run.get("phases", {}).items())
            print(f"run {k}: {run.get('users', 0)} users ({run.get('users_left', 0)} wait) in {wall:.3f} s; "
                  f"CPU {cpu:.3f} s, Neo4j {neo:.2f} s; {phases}", flush=True)
        while refresh(driver, cfg, lm, owner=holder.owner).get("users_left"):
            pass
    print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
