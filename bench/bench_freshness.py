"""Event-to-refreshed-embedding freshness, direct and through Kafka, side by side in one run.

Against `serve` and `worker` subprocesses (and one `consume` with `IG_INGEST=kafka`), on a seeded graph:
- steady streams at 1,000 and 5,000 events/s from known shoppers: from each sampled event's 2xx (one a
  batch, on an item new to the shop, so that its edge exists only once the event is folded) to the run
  that records its edge's revision (the user's embedding written);
- a flood: `--flood-clients` posting for `--flood-seconds` events of brand-new shoppers as fast as the
  direct path folds them into Neo4j (through Kafka: paced at the rate the direct flood reached), then 10 new
  shoppers one after another: from their event's 2xx to their stored embedding, and to the API's first
  personal answer; and the oldest change's wait (age of the oldest unreflected change) meanwhile;
- through Kafka: the consumer lag after a `--burst-seconds` burst at the REST acceptance rate, and its drain;
- users refreshed per second: a backlog of new shoppers drained by a `worker` started on it.

`make bench`, or with the test servers up `NEO4J_URI=bolt://127.0.0.1:7688 NEO4J_HTTP_PORT=7475
IG_HOME=var/test IG_KAFKA_BOOTSTRAP=127.0.0.1:9094 IG_KAFKA_CONTROLLER_PORT=9095
.venv/bin/python -m bench.bench_freshness`. It wipes that server's database.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
import threading
import time
import uuid

import numpy as np
import requests

from app import cypher, kafka_local
from app.config import load_config
from app.db import get_driver
from app.ingest import log, pipeline
from bench.bench_ingest import SERVICE, server_cpu
from bench.bench_kafka import proc_cpu
from bench.bench_soak import match_index_dims
from support.refresh import worker_owner
from support.servers import free_port, spawn, stop, wait_for, wait_ready
from support.soak import seed

USERS, ITEMS = 3000, 800  # the seeded graph's shoppers (the steady streams' users) and items
EDGE_SEEN = """
UNWIND $rows AS row
MATCH (:User {id: row.u})-[r:INTERACTED]->(:Item {id: row.i})
RETURN row.k AS k, r.rev AS rev, r.ig_rev AS ig_rev
"""
EMBEDDED = "OPTIONAL MATCH (u:User {id: $id}) RETURN u IS NOT NULL AS folded, u.embedding_version IS NOT NULL AS done"
_seq = iter(range(10**12))


def event(user: str, rng: random.Random, kind: str = "view") -> dict:
    """One event of `user` now, on a seeded item."""
    return {"event_id": f"f{next(_seq)}-{rng.random():.9f}", "user_id": user, "item_id": f"i{rng.randrange(ITEMS)}",
            "type": kind, "ts": int(time.time() * 1000)}


def pct(values: list[float]) -> dict:
    """p50, p99 (the nearest value at or above each rank) and max in seconds; a value not measured (inf:
    not within its timeout) counts as missed and ranks last."""
    a = np.asarray(values, dtype=float)
    if not len(a):
        return {"n": 0, "missed": 0, "p50": np.inf, "p99": np.inf, "max": np.inf}
    p50, p99 = np.percentile(np.nan_to_num(a, posinf=1e300), [50, 99], method="higher")
    return {"n": len(a), "missed": int((~np.isfinite(a)).sum()), "p50": p50 if p50 < 1e300 else np.inf,
            "p99": p99 if p99 < 1e300 else np.inf, "max": float(a.max())}


class Oldest:
    """Samples, in the background, how long the oldest change not yet reflected has waited (OLDEST_PENDING)."""

    def __init__(self, driver, cfg):
        self.driver, self.cfg, self.worst, self.stop = driver, cfg, 0.0, threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        with self.driver.session(database=self.cfg.neo4j_database) as s:
            while not self.stop.wait(0.5):
                rec = s.run(cypher.OLDEST_PENDING).single()
                now = s.run(cypher.SERVER_TIME).single()["now"]
                if rec["oldest"] is not None:
                    self.worst = max(self.worst, (now - rec["oldest"]) / 1000)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *_):
        self.stop.set()
        self.thread.join()


def drained(driver, cfg) -> bool:
    """Whether every change is reflected."""
    with driver.session(database=cfg.neo4j_database) as s:
        return s.run(cypher.OLDEST_PENDING).single()["oldest"] is None


def steady(url: str, driver, cfg, rate: int, seconds: float, tag: str, batch: int = 100) -> dict:
    """`rate` events/s from known shoppers; per sampled event (one a batch), from its 2xx to the run that
    records its edge's revision (the user's embedding written), polled while the stream goes on."""
    rng, samples, done = random.Random(rate), [], threading.Event()

    def poll() -> None:
        with driver.session(database=cfg.neo4j_database) as s:
            while True:
                pending = [x for x in list(samples) if "seen" not in x]
                if done.is_set() and (not pending or time.time() > done.deadline):
                    return
                now = time.time()
                for r in s.run(EDGE_SEEN, rows=[{"k": n, "u": x["u"], "i": x["i"]} for n, x in enumerate(pending)]):
                    x = pending[r["k"]]
                    if (r["ig_rev"] or -1) >= r["rev"]:
                        x["seen"] = now
                time.sleep(0.05)
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    started = time.perf_counter()
    with requests.Session() as http:
        for k in range(int(seconds * rate / batch)):
            delay = started + k * batch / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            part = [event(f"u{rng.randrange(USERS)}", rng) for _ in range(batch)]
            # the sample's item is new, so its edge does not exist before the event is folded (through Kafka
            # the 2xx comes first): its first revision is the event's
            part[0]["item_id"] = f"new-{tag}-{rate}-{k}"
            http.post(f"{url}/v1/events", json=part, headers=SERVICE, timeout=60).raise_for_status()
            samples.append({"u": part[0]["user_id"], "i": part[0]["item_id"], "at": time.time()})
    sent = len(samples) * batch / (time.perf_counter() - started)
    done.deadline = time.time() + 60  # samples still stale by then count as missed
    done.set()
    poller.join()
    return {"sent_per_s": sent, **pct([x["seen"] - x["at"] if "seen" in x else np.inf for x in samples])}


def flood(url: str, prefix: str, clients: int, seconds: float, batch: int, new_users: int,
          rate: float | None = None) -> float:
    """`clients` posting events of `new_users` brand-new shoppers for `seconds` (paced at `rate` in all if
    given, else as fast as they are accepted); events/s accepted."""
    accepted, lock = [0], threading.Lock()
    end = time.perf_counter() + seconds

    def client(n: int) -> None:
        rng, sent, started = random.Random(n), 0, time.perf_counter()
        with requests.Session() as http:
            while time.perf_counter() < end:
                if rate:
                    delay = started + sent / (rate / clients) - time.perf_counter()
                    if delay > 0:
                        time.sleep(min(delay, end - time.perf_counter()))
                        continue
                part = [event(f"{prefix}{rng.randrange(new_users)}", rng) for _ in range(batch)]
                reply = http.post(f"{url}/v1/events", json=part, headers=SERVICE, timeout=120)
                if reply.status_code == 200:
                    sent += len(part)
                    with lock:
                        accepted[0] += len(part)
    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return accepted[0] / (time.perf_counter() - started)


def probes(url: str, driver, cfg, prefix: str, n: int = 10, timeout: float = 300.0) -> dict:
    """`n` new shoppers one after another: one purchase each, then from its 2xx until their embedding is
    stored, until the API's answer for them is personal, and from their event's fold into Neo4j (the
    2xx itself on the direct path) until their embedding is stored. The API is asked from its own
    thread, so that a slow answer does not delay seeing the stored embedding."""
    rng, out = random.Random(42), {"stored": [], "personal": [], "after_fold": []}

    def personal(http: requests.Session, user: str, posted: float, got: dict) -> None:
        while "personal" not in got and time.monotonic() - posted < timeout:
            reply = http.get(f"{url}/v1/users/{user}/recommendations", params={"k": 20}, timeout=60)
            if reply.status_code == 200 and reply.json().get("source") != "trending":
                got["personal"] = time.monotonic() - posted
            time.sleep(0.05)
    with requests.Session() as http, driver.session(database=cfg.neo4j_database) as s:
        for k in range(n):
            user = f"{prefix}{k}"
            http.post(f"{url}/v1/events", json=[event(user, rng, "purchase")], headers=SERVICE,
                      timeout=60).raise_for_status()
            posted, got = time.monotonic(), {}
            asking = threading.Thread(target=personal, args=(http, user, posted, got))
            asking.start()
            while "stored" not in got and time.monotonic() - posted < timeout:
                rec = s.run(EMBEDDED, id=user).single()
                if rec["folded"]:
                    got.setdefault("folded", time.monotonic() - posted)
                if rec["done"]:
                    got["stored"] = time.monotonic() - posted
                time.sleep(0.05)
            asking.join()
            for key in ("stored", "personal"):
                out[key].append(got.get(key, np.inf))
            out["after_fold"].append(got.get("stored", np.inf) - got.get("folded", 0.0))
    return {key: pct(values) for key, values in out.items()}


def capacity(driver, cfg, users: int, logs) -> dict:
    """Users refreshed per second: `users` new shoppers ingested (one event each) with no worker running,
    then a `worker` started: from its taking the lease until nothing waits; CPU seconds of it and Neo4j."""
    rng = random.Random(7)
    evs = [event(f"cap{k}", rng) for k in range(users)]
    for j in range(0, len(evs), 5000):
        pipeline.ingest(driver, cfg, evs[j:j + 5000])
    worker = spawn(["worker"], dict(os.environ), logs / "capacity-worker.log")
    try:
        wait_for(lambda: f":{worker.pid}:" in (worker_owner(driver, cfg) or ""), timeout=120, step=0.05)
        cpu0, neo0, started = proc_cpu(worker.pid), server_cpu(cfg), time.perf_counter()
        wait_for(lambda: drained(driver, cfg), timeout=900, step=0.1)
        wall = time.perf_counter() - started
        cpu, neo = proc_cpu(worker.pid) - cpu0, server_cpu(cfg) - neo0
    finally:
        stop(worker)
    return {"users": users, "seconds": wall, "per_s": users / wall, "cpu_s": cpu, "neo4j_cpu_s": neo}


class Servers:
    """`serve` and `worker` (and with Kafka one `consume`) as subprocesses, stopped on exit."""

    def __init__(self, cfg, driver, mode: str, logs):
        self.cfg, self.driver, self.mode, self.procs = cfg, driver, mode, []
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, "IG_PORT": str(port), "IG_HOST": "127.0.0.1", "IG_INGEST": mode}
        self.logs = logs

    def __enter__(self):
        names = ["serve", "worker"] + (["consume"] if self.mode == "kafka" else [])
        self.procs = [spawn([name], self.env, self.logs / f"{self.mode}-{name}.log") for name in names]
        wait_ready(self.url)
        worker = self.procs[1].pid
        wait_for(lambda: f":{worker}:" in (worker_owner(self.driver, self.cfg) or ""), timeout=120, step=0.2)
        return self

    def __exit__(self, *_):
        for proc in reversed(self.procs):
            stop(proc)


def flood_case(srv: Servers, driver, cfg, args, rate: float | None) -> dict:
    """A flood of new shoppers, then the 10 probes; the oldest change's wait until all is reflected."""
    prefix = f"{srv.mode[0]}n"
    with Oldest(driver, cfg) as oldest:
        accepted = flood(srv.url, prefix, args.flood_clients, args.flood_seconds, args.flood_batch,
                         args.new_users, rate)
        ended = time.perf_counter()
        out = {"accepted_per_s": accepted}
        if srv.mode == "kafka":
            out["lag_at_end"] = log.lag(dataclasses.replace(cfg, kafka_group=srv.env["IG_KAFKA_GROUP"]))["messages"]
            out["folded_per_s"] = accepted - out["lag_at_end"] / args.flood_seconds  # by the consumer meanwhile
        out.update(probes(srv.url, driver, cfg, f"{srv.mode[0]}probe"))
        wait_for(lambda: drained(driver, cfg), timeout=600, step=0.5)
        out["drained_s"] = time.perf_counter() - ended
    out["oldest_wait_s"] = oldest.worst
    return out


def burst_case(srv: Servers, cfg, args) -> dict:
    """Through Kafka: a burst at the REST acceptance rate, the group's lag at its end, and how long the
    consumer takes to fold it (the refresh behind it is not waited for: the capacity says how long)."""
    group = dataclasses.replace(cfg, kafka_group=srv.env["IG_KAFKA_GROUP"])
    accepted = flood(srv.url, "bn", args.flood_clients, args.burst_seconds, 2000, args.new_users)
    ended = time.perf_counter()
    lag = log.lag(group)["messages"]
    wait_for(lambda: log.lag(group)["messages"] == 0, timeout=1800, step=0.5)
    return {"accepted_per_s": accepted, "lag": lag, "fold_drain_s": time.perf_counter() - ended}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steady-seconds", type=float, default=20.0)
    parser.add_argument("--rates", default="1000,5000")
    parser.add_argument("--flood-seconds", type=float, default=20.0)
    parser.add_argument("--flood-clients", type=int, default=4)
    parser.add_argument("--flood-batch", type=int, default=500)
    parser.add_argument("--new-users", type=int, default=20_000, help="distinct new shoppers of a flood")
    parser.add_argument("--flood-rate", type=float, default=0.0,
                        help="events/s of every flood (0: the direct path as fast as it takes them, Kafka at that rate)")
    parser.add_argument("--burst-seconds", type=float, default=60.0, help="the Kafka lag burst (0: skip)")
    parser.add_argument("--capacity-users", type=int, default=20_000)
    parser.add_argument("--skip", default="", help="comma list of parts to skip: direct,kafka,flood,capacity")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    match_index_dims()
    cfg = load_config()
    driver = get_driver(cfg)
    logs = cfg.home / "bench_freshness"
    logs.mkdir(parents=True, exist_ok=True)
    print("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()), flush=True)
    seed(driver, cfg, 30_000, USERS, ITEMS)
    rates = [int(r) for r in args.rates.split(",") if r]
    results: dict[str, dict] = {}
    direct_rate = None
    for mode in ("direct", "kafka"):
        if mode == "kafka" and "capacity" not in skip:  # on the drained graph, before the burst's backlog
            results["capacity"] = r = capacity(driver, cfg, args.capacity_users, logs)
            print(f"capacity: {r}", flush=True)
        if mode in skip:
            continue
        if mode == "kafka":
            kafka_local.start(cfg)
            topic, group = f"fresh-{uuid.uuid4().hex[:8]}", f"fresh-{uuid.uuid4().hex[:8]}"
            os.environ.update(IG_KAFKA_TOPIC=topic, IG_KAFKA_GROUP=group)
            cfg = dataclasses.replace(cfg, kafka_topic=topic)
            log.ensure_topics(cfg)
        with Servers(cfg, driver, mode, logs) as srv:
            for rate in rates:
                results[f"{mode} {rate:,}/s"] = r = steady(srv.url, driver, cfg, rate, args.steady_seconds, mode)
                print(f"{mode} steady {rate}/s: {r}", flush=True)
            if "flood" not in skip:
                results[f"{mode} flood"] = r = flood_case(srv, driver, cfg, args, args.flood_rate or direct_rate)
                print(f"{mode} flood: {r}", flush=True)
                direct_rate = direct_rate or r["accepted_per_s"]
            if mode == "kafka" and args.burst_seconds > 0:
                results["kafka burst"] = r = burst_case(srv, cfg, args)
                print(f"kafka burst {args.burst_seconds:.0f}s: {r}", flush=True)
    report(results, cfg)
    print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


def report(results: dict, cfg) -> None:
    """The side-by-side table: seconds p50 / p99 (max) per case."""
    def cell(p):
        missed = f", {p['missed']} missed" if p["missed"] else ""
        return f"{p['p50']:.2f} / {p['p99']:.2f} ({p['max']:.2f}{missed})"
    print(f"\nrefresh: IG_REFRESH_MAX_USERS={cfg.refresh_max_users}, IG_REFRESH_INTERVAL={cfg.refresh_interval:g}")
    print(f"{'case':<22} {'events/s':>9} | {'embedding stored: p50 / p99 (max) s':<36} | "
          f"{'of which after the fold':<24} | {'personal answer s':<24} | oldest wait s, drained s")
    for name, r in results.items():
        if name.endswith("/s"):
            print(f"{name:<22} {r['sent_per_s']:>9,.0f} | {cell(r):<36} | {'':<24} | {'':<24} |")
        elif name.endswith("flood"):
            lag = (f"; lag at its end {r['lag_at_end']:,} (folded {r['folded_per_s']:,.0f}/s)"
                   if "lag_at_end" in r else "")
            print(f"{name + ', 10 probes':<22} {r['accepted_per_s']:>9,.0f} | {cell(r['stored']):<36} | "
                  f"{cell(r['after_fold']):<24} | {cell(r['personal']):<24} | "
                  f"{r['oldest_wait_s']:.1f}, {r['drained_s']:.1f}{lag}")
    if "kafka burst" in results:
        r = results["kafka burst"]
        print(f"kafka burst: {r['accepted_per_s']:,.0f} events/s accepted; lag at its end {r['lag']:,} messages, "
              f"folded {r['fold_drain_s']:.1f} s after it")
    if "capacity" in results:
        r = results["capacity"]
        print(f"users refreshed per second by the worker: {r['per_s']:,.0f} ({r['users']:,} new shoppers in "
              f"{r['seconds']:.1f} s; CPU: worker {r['cpu_s']:.1f} s, Neo4j {r['neo4j_cpu_s']:.1f} s)")


if __name__ == "__main__":
    main()
