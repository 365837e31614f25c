"""Load soak: minutes of mixed ingest and recommendation traffic, with bursts, against `serve` and `worker`.

Loopback only, bounded in time (`--seconds`) and requests (`--max-requests`). Reports throughput, errors
(goal 0), p50/p99 latency of both paths, the freshness of brand-new shoppers (from the 2xx of their first
event to their first personal recommendations; goal p99 <= 3 s, also right after bursts), and the RSS of the API
(the server and its workers), the worker and Neo4j at start and end. It wipes the server's database.

`make bench`, or `NEO4J_URI=bolt://127.0.0.1:7688 NEO4J_HTTP_PORT=7475 IG_HOME=var/test
.venv/bin/python -m bench.bench_load [--seconds 600]`. Exits 1 on any error.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from collections import Counter

import numpy as np
import psutil
import requests

from app import neo4j_local
from app.config import load_config
from app.db import get_driver
from app.ingest import pipeline
from bench.bench_ingest import SERVICE
from bench.bench_soak import match_index_dims
from support.refresh import worker_owner
from support.servers import free_port, spawn, stop, wait_for, wait_ready
from support.soak import seed

AFTER_BURST = 10.0  # seconds after a burst ends during which a probe counts as "right after a burst"


def _ms(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    a = np.asarray(values) * 1000
    return {"n": len(values), "p50_ms": round(float(np.percentile(a, 50)), 1),
            "p99_ms": round(float(np.percentile(a, 99)), 1), "max_ms": round(float(a.max()), 1)}


def rss_mb(serve: psutil.Process, worker: psutil.Process, neo4j_pid: int) -> dict:
    """Resident memory (MB) of the API (master + workers), the worker and Neo4j."""
    def mb(procs):
        return round(sum(p.memory_info().rss for p in procs) / 2**20, 1)
    return {"api": mb([serve, *serve.children(recursive=True)]), "worker": mb([worker]),
            "neo4j": mb([psutil.Process(neo4j_pid)])}


def own_item(u: int, k: int, items: int) -> str:
    """User u's k-th fixed item (distinct for k < items: 97 is prime to the item counts used)."""
    return f"i{(31 * u + 97 * k) % items}"


class Load:
    """The traffic: steady ingest clients, periodic bursts, readers and new-shopper probes."""

    def __init__(self, url: str, args, users: int, items: int):
        self.url, self.args, self.users, self.items = url, args, users, items
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.latency = {"ingest": [], "read": []}
        self.statuses = {"ingest": Counter(), "read": Counter()}
        self.errors: list[str] = []
        self.events = 0
        self.requests = 0
        self.bursting = threading.Event()
        self.burst_ended = -1e9
        self.fresh = {"steady": [], "after_burst": []}
        self.seq = iter(range(10**12))

    def _count(self) -> bool:
        with self.lock:
            self.requests += 1
            if self.requests >= self.args.max_requests:
                self.stop.set()
        return not self.stop.is_set()

    def _batch(self, rng: random.Random, n: int) -> list[dict]:
        now = int(time.time() * 1000)
        out = []
        for _ in range(n):
            u = rng.randrange(self.users)
            out.append({"event_id": f"l{next(self.seq)}", "user_id": f"u{u}", "item_id": self.item(u, rng),
                        "type": rng.choice(["view", "click", "cart", "purchase"]), "ts": now})
        return out

    def item(self, u: int, rng: random.Random) -> str:
        """Any item, or with `--items-per-user N` one of user u's fixed N (so the stream adds no edges)."""
        n = self.args.items_per_user
        return own_item(u, rng.randrange(n), self.items) if n else f"i{rng.randrange(self.items)}"

    def _post(self, http: requests.Session, batch: list[dict]) -> requests.Response | None:
        started = time.monotonic()
        try:
            reply = http.post(f"{self.url}/v1/events", json=batch, headers=SERVICE, timeout=60)
        except requests.RequestException as exc:
            with self.lock:
                self.errors.append(f"POST: {type(exc).__name__}")
            return None
        with self.lock:
            self.latency["ingest"].append(time.monotonic() - started)
            self.statuses["ingest"][reply.status_code] += 1
            if reply.status_code == 200:
                self.events += reply.json()["accepted"]
            else:
                self.errors.append(f"POST {reply.status_code}: {reply.text[:200]}")
        return reply

    def _get(self, http: requests.Session, user: str) -> requests.Response | None:
        started = time.monotonic()
        try:
            reply = http.get(f"{self.url}/v1/users/{user}/recommendations", params={"k": 20}, timeout=60)
        except requests.RequestException as exc:
            with self.lock:
                self.errors.append(f"GET: {type(exc).__name__}")
            return None
        with self.lock:
            self.latency["read"].append(time.monotonic() - started)
            self.statuses["read"][reply.status_code] += 1
            if reply.status_code not in (200, 404):
                self.errors.append(f"GET {reply.status_code}: {reply.text[:200]}")
        return reply

    def steady(self, seed: int) -> None:
        rng = random.Random(seed)
        with requests.Session() as http:
            while self._count():
                self._post(http, self._batch(rng, self.args.batch))
                self.stop.wait(self.args.pause)

    def burst(self, seed: int) -> None:
        rng = random.Random(seed)
        with requests.Session() as http:
            while not self.stop.is_set():
                self.bursting.wait(1.0)
                while self.bursting.is_set() and self._count():
                    self._post(http, self._batch(rng, self.args.burst_batch))

    def reader(self, seed: int, known: list[str]) -> None:
        rng = random.Random(seed)
        with requests.Session() as http:
            while self._count():
                self._get(http, rng.choice(known))
                self.stop.wait(self.args.pause)

    def prober(self) -> None:
        """A brand-new shopper every few seconds: one event, then recommendations until they come."""
        rng = random.Random(99)
        with requests.Session() as http:
            while not self.stop.wait(self.args.probe_every):
                user = f"new{next(self.seq)}"
                event = [{"event_id": f"p-{user}", "user_id": user, "item_id": f"i{rng.randrange(self.items)}",
                          "type": "purchase", "ts": int(time.time() * 1000)}]
                reply = self._post(http, event)
                if reply is None or reply.status_code != 200:
                    continue
                posted = time.monotonic()
                kind = "after_burst" if self.bursting.is_set() or posted - self.burst_ended < AFTER_BURST \
                    else "steady"
                while time.monotonic() - posted < 60 and not self.stop.is_set():
                    got = self._get(http, user)
                    # Until its first refresh a new shopper is answered with trending items.
                    if got is not None and got.status_code == 200 and got.json().get("source") != "trending":
                        with self.lock:
                            self.fresh[kind].append(time.monotonic() - posted)
                        break
                    time.sleep(0.05)
                else:
                    if not self.stop.is_set():
                        with self.lock:
                            self.errors.append(f"new shopper {user} not recommended within 60 s")

    def scheduler(self) -> None:
        """Bursts: `burst_seconds` of full-speed ingest every `burst_every` seconds."""
        while not self.stop.wait(self.args.burst_every - self.args.burst_seconds):
            self.bursting.set()
            self.stop.wait(self.args.burst_seconds)
            self.bursting.clear()
            self.burst_ended = time.monotonic()

    def run(self, seconds: float, known: list[str]) -> float:
        a = self.args
        threads = [threading.Thread(target=self.steady, args=(k,)) for k in range(a.ingest_clients)]
        threads += [threading.Thread(target=self.burst, args=(100 + k,)) for k in range(a.burst_clients)]
        threads += [threading.Thread(target=self.reader, args=(200 + k, known)) for k in range(a.readers)]
        threads += [threading.Thread(target=self.prober), threading.Thread(target=self.scheduler)]
        started = time.monotonic()
        for t in threads:
            t.start()
        self.stop.wait(seconds)
        self.stop.set()
        self.bursting.clear()
        for t in threads:
            t.join(120)
        return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--max-requests", type=int, default=2_000_000)
    parser.add_argument("--users", type=int, default=3000, help="shoppers of the seed graph and the steady traffic")
    parser.add_argument("--items", type=int, default=800)
    parser.add_argument("--seed-events", type=int, default=30_000)
    parser.add_argument("--ingest-clients", type=int, default=2)
    parser.add_argument("--batch", type=int, default=20, help="events per steady ingest request")
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--pause", type=float, default=0.05, help="seconds between a steady client's requests")
    parser.add_argument("--burst-clients", type=int, default=4)
    parser.add_argument("--burst-batch", type=int, default=500)
    parser.add_argument("--burst-every", type=float, default=120.0)
    parser.add_argument("--burst-seconds", type=float, default=20.0)
    parser.add_argument("--probe-every", type=float, default=2.0)
    parser.add_argument("--items-per-user", type=int, default=0,
                        help="each shopper's events over N fixed items, all seeded first: a graph that stops "
                             "growing, so that RSS growth is not the data's (0: any item)")
    args = parser.parse_args()
    match_index_dims()
    cfg = load_config()
    driver = get_driver(cfg)
    logs = cfg.home / "bench_load"
    logs.mkdir(parents=True, exist_ok=True)
    print("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()), flush=True)
    seeded = seed(driver, cfg, args.seed_events, args.users, args.items)
    if args.items_per_user:  # every pair the stream will use exists before it starts
        pairs = [{"event_id": f"pair-{u}-{k}", "user_id": f"u{u}", "item_id": own_item(u, k, args.items),
                  "type": "view", "ts": int(time.time() * 1000)}
                 for u in range(args.users) for k in range(args.items_per_user)]
        for j in range(0, len(pairs), 5000):
            pipeline.ingest(driver, cfg, pairs[j:j + 5000])
    known = sorted({e["user_id"] for e in seeded})[::7]  # readers ask for shoppers embedded at the start
    port = free_port()
    env = {**os.environ, "IG_PORT": str(port), "IG_HOST": "127.0.0.1"}
    url = f"http://127.0.0.1:{port}"
    serve, worker = spawn(["serve"], env, logs / "serve.log"), spawn(["worker"], env, logs / "worker.log")
    try:
        wait_ready(url)
        wait_for(lambda: f":{worker.pid}:" in (worker_owner(driver, cfg) or ""), timeout=120, step=0.2)
        procs = (psutil.Process(serve.pid), psutil.Process(worker.pid), neo4j_local.status(cfg)["pid"])
        load = Load(url, args, args.users, args.items)
        for user in known[:20]:  # warm the serving path before RSS is taken
            requests.get(f"{url}/v1/users/{user}/recommendations", timeout=60)
        rss_start = rss_mb(*procs)
        elapsed = load.run(args.seconds, known)
        rss_end = rss_mb(*procs)
    finally:
        stop(worker)
        stop(serve)
    reads = sum(load.statuses["read"].values())
    report = {
        "seconds": round(elapsed, 1), "requests": load.requests,
        "events_accepted": load.events, "events_per_second": round(load.events / elapsed, 1),
        "reads_per_second": round(reads / elapsed, 1),
        "ingest": {**_ms(load.latency["ingest"]), "statuses": dict(load.statuses["ingest"])},
        "read": {**_ms(load.latency["read"]), "statuses": dict(load.statuses["read"])},
        "freshness": {kind: _ms(v) for kind, v in load.fresh.items()},
        "freshness_all": _ms(load.fresh["steady"] + load.fresh["after_burst"]),
        "errors": len(load.errors), "first_errors": load.errors[:10],
        "rss_mb": {"start": rss_start, "end": rss_end},
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }
    (logs / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    sys.exit(1 if load.errors else 0)


if __name__ == "__main__":
    main()
