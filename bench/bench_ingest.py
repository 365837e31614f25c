"""Ingest throughput in one run: bare-driver ceiling, REST via `interest-graph serve`, bulk loader (Online Retail twice).

Run with the test server up: `make bench`, or
`NEO4J_URI=bolt://127.0.0.1:7688 NEO4J_HTTP_PORT=7475 IG_HOME=var/test
.venv/bin/python -m bench.bench_ingest`. It wipes that server's database.
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from app import neo4j_local
from app.config import ROOT, load_config
from app.db import get_driver
from app.ingest import loaders
from support.graph import wipe
from support.servers import free_port, wait_ready

CEILING = ("UNWIND $rows AS r MERGE (u:User {id:r.u}) MERGE (i:Item {id:r.i}) "
           "MERGE (u)-[e:INTERACTED]->(i) SET e.w = coalesce(e.w,0) + r.w")
GRAPH = ("MATCH (u:User) WITH count(u) AS users MATCH (i:Item) WITH users, count(i) AS items "
         "MATCH ()-[r:INTERACTED]->() RETURN users, items, count(r) AS edges")
T0 = 1_600_000_000_000


def synthetic(n: int, seed: int, users: int = 20_000, items: int = 4_000, prefix: str = "s") -> list[dict]:
    """Events with skewed item popularity, like a shop's: a few items get most traffic."""
    rng = random.Random(seed)
    types = ["view"] * 6 + ["click"] * 2 + ["cart", "purchase"]
    return [{"event_id": f"{prefix}{seed}-{k}", "user_id": f"u{rng.randrange(users)}",
             "item_id": f"i{min(int(rng.paretovariate(1.2)) - 1, items - 1)}", "type": rng.choice(types),
             "ts": T0 + rng.randrange(10 ** 10), "quantity": 1} for k in range(n)]


def server_cpu(cfg) -> float:
    """CPU seconds used so far by the local Neo4j server (0 when it is not a local process)."""
    try:
        fields = open(f"/proc/{neo4j_local.status(cfg)['pid']}/stat").read().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def python_cpu(server: int | None = None) -> float:
    """CPU seconds of this process, plus the `server` process and its children (the server's workers) if given."""
    total = time.process_time()
    for pid in os.listdir("/proc") if server else ():
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if pid.isdigit() and server in (int(pid), int(fields[1])):
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def cpu_cost(cfg, run):
    """Run `run()`; return its result and the CPU seconds spent by Neo4j and by Python meanwhile.

    Wall-clock rates move with whatever else the machine runs; CPU per event moves much less.
    """
    neo, py = server_cpu(cfg), python_cpu()
    result = run()
    return result, server_cpu(cfg) - neo, python_cpu() - py


def per_event(neo: float, py: float, events: int) -> str:
    """CPU seconds as microseconds per event."""
    return f"CPU/event: Neo4j {1e6 * neo / events:.0f} us, Python {1e6 * py / events:.0f} us"


def graph_counts(driver, database: str) -> dict:
    with driver.session(database=database) as s:
        return s.run(GRAPH).single().data()


def ceiling(driver, database: str, events: list[dict], batch: int = 5000) -> float:
    """(a) The bare UNWIND/MERGE loop, one event a row, one thread: events/s."""
    rows = [{"u": e["user_id"], "i": e["item_id"], "w": 1.0} for e in events]
    start = time.perf_counter()
    with driver.session(database=database) as s:
        for j in range(0, len(rows), batch):
            s.execute_write(lambda tx, part=rows[j:j + batch]: tx.run(CEILING, rows=part).consume())
    return len(rows) / (time.perf_counter() - start)


# `serve` keeps authentication on: the benchmarks post with a service token of their own. Their
# readers send none, so reads are opened explicitly (bench_bounds measures with a read token).
SERVICE_TOKEN = os.environ.setdefault("IG_SERVICE_TOKEN", "bench-service-token")
SERVICE = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
os.environ.setdefault("IG_OPEN_READS", "on")


def rest(events: list[dict], clients: int, batch: int) -> tuple[float, dict, float]:
    """(b) `interest-graph serve` as a subprocess, `clients` threads posting batches.

    Returns events/s, the summed replies and the CPU seconds of the clients and the server (not its start-up).
    """
    port = free_port()
    env = {**os.environ, "IG_PORT": str(port)}
    server = subprocess.Popen([sys.executable, "-m", "app", "serve"], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        batches = [events[j:j + batch] for j in range(0, len(events), batch)]
        totals = {"accepted": 0, "duplicates": 0, "resent": 0}

        def worker(share):
            with requests.Session() as session:
                for part in share:
                    # A 503 (the commit did not land within the API's wait) is resent, as the API
                    # asks; ids make the resend safe, so its events may come back as duplicates.
                    while (reply := session.post(f"{url}/v1/events", json=part, headers=SERVICE,
                                                 timeout=300)).status_code == 503:
                        totals["resent"] += 1
                        time.sleep(float(reply.headers.get("Retry-After", 1)))
                    reply.raise_for_status()
                    body = reply.json()
                    totals["accepted"] += body["accepted"]
                    totals["duplicates"] += body["duplicates"]
        start, cpu = time.perf_counter(), python_cpu(server.pid)
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(worker, [batches[c::clients] for c in range(clients)]))
        return len(events) / (time.perf_counter() - start), totals, python_cpu(server.pid) - cpu
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a worker stuck in shutdown must not lose the run's figures
            server.kill()
            server.wait()


def bulk(driver, cfg, path) -> tuple[float, dict]:
    """(c) The Online Retail loader: events (rows with a customer) per second, and its counts."""
    start = time.perf_counter()
    totals = loaders.load(driver, cfg, loaders.online_retail_batches(path), label="bench")
    elapsed = time.perf_counter() - start
    events = totals["rows"] - totals.get("missing_user", 0)
    return events / elapsed, dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="synthetic events for (a) and (b)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2000, help="events per REST request")
    parser.add_argument("--data", default=str(ROOT / "data/online_retail/online_retail.csv.gz"))
    parser.add_argument("--skip", default="", help="comma list of parts to skip: ceiling,rest,bulk")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    cfg = load_config()
    driver, db = get_driver(cfg), cfg.neo4j_database
    events = synthetic(args.events, seed=1)
    # Other work on the machine moves every figure; the load average says how quiet the run was.
    print("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()), flush=True)
    results = {}
    if "ceiling" not in skip:
        wipe(driver, db)
        results["ceiling"], neo, py = cpu_cost(cfg, lambda: ceiling(driver, db, events))
        print(f"(a) ceiling, bare UNWIND MERGE, batches of 5,000: {results['ceiling']:,.0f} events/s  "
              f"{per_event(neo, py, len(events))}", flush=True)
    if "rest" not in skip:
        wipe(driver, db)
        (results["rest"], totals, py), neo, _ = cpu_cost(cfg, lambda: rest(events, args.clients, args.batch))
        print(f"(b) REST, {args.clients} clients x {args.batch:,}-event batches: "
              f"{results['rest']:,.0f} events/s  {per_event(neo, py, len(events))} (server and clients)  "
              f"{totals}", flush=True)
    if "bulk" not in skip:
        wipe(driver, db)
        (results["bulk"], first), neo, py = cpu_cost(cfg, lambda: bulk(driver, cfg, args.data))
        graph = graph_counts(driver, db)
        print(f"(c) bulk, Online Retail: {results['bulk']:,.0f} events/s  "
              f"{per_event(neo, py, first['rows'] - first.get('missing_user', 0))}  {first}  graph {graph}",
              flush=True)
        rate2, second = bulk(driver, cfg, args.data)
        same = {k: v for k, v in first.items() if k not in ("accepted", "duplicates")} == \
            {k: v for k, v in second.items() if k not in ("accepted", "duplicates")} and \
            second["duplicates"] == first["accepted"] + first["duplicates"] and graph_counts(driver, db) == graph
        print(f"    second load: {rate2:,.0f} events/s  {second}  identical graph and counts: {same}")
    if "ceiling" in results:
        for part in ("rest", "bulk"):
            if part in results:
                print(f"{part}/ceiling = {results[part] / results['ceiling']:.2f}")
    print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
