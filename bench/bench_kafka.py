"""Kafka in front of ingest, side by side in one run: the bare UNWIND MERGE ceiling, REST straight into
Neo4j, REST into Kafka, the log folded into Neo4j by 1 and 2 `consume` processes, and the fold's two
statements (claiming event ids, writing edges) alone: where its Neo4j CPU goes.

Run with the test servers up: `make bench`, or
`NEO4J_URI=bolt://127.0.0.1:7688 NEO4J_HTTP_PORT=7475 IG_HOME=var/test IG_KAFKA_BOOTSTRAP=127.0.0.1:9094
IG_KAFKA_CONTROLLER_PORT=9095 .venv/bin/python -m bench.bench_kafka`. It wipes that server's database.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import time
import uuid

from app import cypher, kafka_local
from app.config import ROOT, load_config
from app.db import get_driver
from app.ingest import log, pipeline, writer
from bench.bench_ingest import ceiling, cpu_cost, per_event, rest, synthetic, wipe


def proc_cpu(pid: int) -> float:
    """CPU seconds used so far by one process."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fold(cfg, consumers: int, events: int, timeout: float = 900) -> tuple[float, float]:
    """`consumers` processes of `interest-graph consume` in a new group fold the whole topic: events/s
    from their start until the group's lag is 0, and the consumers' CPU seconds (start-up included)."""
    group = f"bench-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "IG_KAFKA_TOPIC": cfg.kafka_topic, "IG_KAFKA_GROUP": group}
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "app", "consume"], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=open(cfg.home / f"{group}-{n}.log", "w"))
             for n in range(consumers)]
    lag_cfg = dataclasses.replace(cfg, kafka_group=group)
    try:
        while time.perf_counter() - start < timeout:
            time.sleep(0.2)
            lag = log.lag(lag_cfg)["messages"]
            if lag == 0 and time.perf_counter() - start > 1:
                return events / (time.perf_counter() - start), sum(proc_cpu(p.pid) for p in procs)
        raise RuntimeError(f"the topic was not folded within {timeout} s")
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:  # its log (under IG_HOME) says where it hung
                print(f"consumer {proc.pid} did not leave within 60 s of SIGINT: killed", flush=True)
                proc.kill()


def breakdown(cfg, driver, db, raw: list[dict], batch: int) -> dict[str, float]:
    """(e) The fold's two statements alone, each on an emptied graph, in the consumer's batches: Neo4j
    CPU seconds of claiming the event ids, and of writing the pre-aggregated edges."""
    events = pipeline.prepare(cfg, raw)[1]
    parts = [events[j:j + batch] for j in range(0, len(events), batch)]

    def run(statement, params):
        with driver.session(database=db) as session:
            for part in parts:
                session.execute_write(lambda tx, p=params(part): tx.run(statement, **p).consume())
    rows = {}
    for name, statement, params in (
            ("claim", cypher.INGEST_CLAIM_EVENTS, lambda part: {"ids": sorted({e["id"] for e in part})}),
            ("write", cypher.INGEST_WRITE, lambda part: {
                "rows": (agg := writer.aggregate(part)), "items": sorted({r["i"] for r in agg}), "shard": 0,
                "counts": {}})):
        wipe(driver, db)
        rows[name] = cpu_cost(cfg, lambda st=statement, pa=params: run(st, pa))[1]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="synthetic (skewed) events")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2000, help="events per REST request")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: ceiling,direct,fold2,breakdown")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    cfg = load_config()
    kafka_local.start(cfg)
    cfg = dataclasses.replace(cfg, kafka_topic=f"bench-{uuid.uuid4().hex[:8]}")
    os.environ["IG_KAFKA_TOPIC"] = cfg.kafka_topic  # the API subprocess produces into this run's topic
    log.ensure_topics(cfg)
    driver, db = get_driver(cfg), cfg.neo4j_database
    events = synthetic(args.events, seed=1)
    n = len(events)
    print("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()), flush=True)
    results, neo_cpu = {}, {}
    if "ceiling" not in skip:
        # A fresh server compiles its query plans and JIT first: warm it up so the ceiling is not inflated.
        wipe(driver, db)
        ceiling(driver, db, events[: n // 4])
        wipe(driver, db)
        results["ceiling"], neo_cpu["ceiling"], py = cpu_cost(cfg, lambda: ceiling(driver, db, events))
        print(f"(a) ceiling, bare UNWIND MERGE, batches of 5,000: {results['ceiling']:,.0f} events/s  "
              f"{per_event(neo_cpu['ceiling'], py, n)}", flush=True)
    if "direct" not in skip:
        wipe(driver, db)
        os.environ["IG_INGEST"] = "direct"
        (results["direct"], totals, py), neo_cpu["direct"], _ = cpu_cost(
            cfg, lambda: rest(events, args.clients, args.batch))
        print(f"(b) REST into Neo4j (IG_INGEST=direct), {args.clients} clients x {args.batch:,}: "
              f"{results['direct']:,.0f} events/s  {per_event(neo_cpu['direct'], py, n)}  {totals}", flush=True)
    wipe(driver, db)
    os.environ["IG_INGEST"] = "kafka"
    (results["kafka"], totals, py), neo, _ = cpu_cost(cfg, lambda: rest(events, args.clients, args.batch))
    os.environ["IG_INGEST"] = "direct"
    print(f"(c) REST into Kafka (IG_INGEST=kafka), {args.clients} clients x {args.batch:,}: "
          f"{results['kafka']:,.0f} events/s  {per_event(neo, py, n)}  {totals}", flush=True)
    for consumers in (1, 2):
        if consumers == 2 and "fold2" in skip:
            continue
        wipe(driver, db)
        key = f"fold{consumers}"
        (results[key], py), neo_cpu[key], _ = cpu_cost(cfg, lambda c=consumers: fold(cfg, c, n))
        print(f"(d) folded into Neo4j by {consumers} consumer(s): {results[key]:,.0f} events/s  "
              f"{per_event(neo_cpu[key], py, n)} (consumers)", flush=True)
    if "breakdown" not in skip:
        for name, seconds in breakdown(cfg, driver, db, events, cfg.consume_batch).items():
            neo_cpu[name] = seconds
            print(f"(e) the fold's {name} statement alone: Neo4j {1e6 * seconds / n:.0f} us/event", flush=True)
    if "ceiling" in neo_cpu:
        for key in ("direct", "fold1", "fold2", "claim", "write"):
            if key in neo_cpu:
                print(f"Neo4j CPU per event, {key}/ceiling = {neo_cpu[key] / neo_cpu['ceiling']:.2f}x")
    print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
