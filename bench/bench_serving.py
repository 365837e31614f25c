"""Recommendation latency under load: vegeta (open loop, loopback) against `interest-graph serve`, next
to the bare Neo4j vector query measured in the same run.

Run with the test server up: `make bench`, or
`NEO4J_URI=bolt://127.0.0.1:7688 NEO4J_HTTP_PORT=7475 IG_HOME=var/test
.venv/bin/python -m bench.bench_serving`. It wipes that server's database, loads the demo data
(Online Retail, the file `make run` serves), trains one epoch at the real embedding sizes and embeds
every node (`--scale N`: imports bench_scale's power-law graph of N edges and embeds it under an
untrained first version instead; `make bench-scale` serves 10k, 1M and 10M edges), then measures:
- sequentially (one request at a time, warm): the bare vector query (`queryNodes`, k = 20, from the
  user's stored vector) for every shopper of the mix, the full recommendation query through the
  driver and the REST answer for the first `--slow` of them;
- under load: vegeta at each rate for `--seconds`, for k = 20 personal recommendations plain, with
  `explain=true`, and with a price filter; p50 / p99 and the rate achieved. Vegeta sends at the
  offered rate whatever the answers' latency (open loop), and times each request from when it was
  due, so a stalled server shows in the percentiles rather than lowering the rate;
- each variant and rate `--repeats` times (3), with the median and worst p99 over them: the host's
  speed moves between runs;
- the highest rate of the ladder held (achieved >= 95% of offered, no failures) with p99 <= 50 ms;
- sequentially again, the audience of the 20 most popular items (k = 100) and the churn list (k = 1,000).
Shoppers are drawn from those with a vector, with probability proportional to their number of
events (active shoppers ask more often).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import psutil
import requests

from app import cypher
from app.config import ROOT, load_config
from app.db import get_driver
from support.graph import wipe
from support.recipes import bind, recipe
from support.servers import free_port, wait_ready

DEMO = ROOT / "data" / "online_retail" / "online_retail.csv.gz"
BARE_VECTOR = """
MATCH (u:User {id: $user_id})
CALL db.index.vector.queryNodes('item_embedding', 20, u.embedding) YIELD node, score
RETURN node.id AS item_id, score
"""
SHOPPERS = """
MATCH (u:User)-[r:INTERACTED]->() WHERE u.embedding IS NOT NULL
RETURN u.id AS id, sum(coalesce(r.n_view, 0) + coalesce(r.n_click, 0) + coalesce(r.n_cart, 0)
                       + coalesce(r.n_purchase, 0)) AS events
"""
VARIANTS = {"plain": "", "explain": "&explain=true", "max_price=5": "&max_price=5"}
AUTH: dict[str, str] = {}  # the read token's header, unless reads are open (set in main)


def cli(*args: str) -> str:
    """Run `interest-graph ARGS` (this checkout's code) and return its stdout."""
    done = subprocess.run([sys.executable, "-m", "app", *args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return done.stdout


def percentiles(seconds: list[float]) -> tuple[float, float]:
    """p50 and p99 in ms."""
    return float(np.percentile(seconds, 50) * 1000), float(np.percentile(seconds, 99) * 1000)


def _timed(run, users: list[str]) -> list[float]:
    times = []
    for u in users:
        t = time.perf_counter()
        run(u)
        times.append(time.perf_counter() - t)
    return times


def sequential(driver, cfg, url: str, users: list[str], slow: int):
    """Warm, one at a time: the bare vector query over all `users`, the recommendation query via the
    driver and REST over the first `slow` of them; yields (name, p50, p99, count)."""
    with driver.session(database=cfg.neo4j_database) as s:
        vector = lambda u: s.run(BARE_VECTOR, user_id=u).data()  # noqa: E731
        params, query = recipe("Recommendations for a shopper")
        values = bind(s, params)
        recommend = lambda u: s.run(query, **{**values, "user_id": u, "k": 20, "n": 90}).data()  # noqa: E731
        _timed(vector, users[:50])  # warm-up
        yield ("bare vector query (driver)", *percentiles(_timed(vector, users)), len(users))
        recommend(users[0])
        yield ("recommendation query (driver)", *percentiles(_timed(recommend, users[:slow])), slow)
    with requests.Session() as http:
        http.headers.update(AUTH)
        for variant, query in VARIANTS.items():
            def get(u, query=query):
                http.get(f"{url}/v1/users/{u}/recommendations?k=20{query}", timeout=120).raise_for_status()
            yield (f"REST {variant}", *percentiles(_timed(get, users[:slow])), slow)


def other_reads(url: str, items: list[str], repeats: int = 20):
    """Warm, one at a time over REST: an item's audience (k = 100) for each of `items`, and the churn list
    (k = 1,000, from the stored scores); yields (name, p50, p99, count, statuses)."""
    with requests.Session() as http:
        http.headers.update(AUTH)
        for name, paths in (("REST audience k=100", [f"/v1/items/{quote(i)}/audience?k=100" for i in items]),
                            ("REST churn-risk k=1000", ["/v1/users/churn-risk?k=1000"] * repeats)):
            statuses = set()
            http.get(f"{url}{paths[0]}", timeout=120)  # warm
            times = _timed(lambda path: statuses.add(http.get(f"{url}{path}", timeout=120).status_code), paths)
            yield (name, *percentiles(times), len(paths), sorted(statuses))


def warm(url: str, users: list[str], requests_: int = 64) -> None:
    """Concurrent requests until every server worker has loaded its copy of the graph."""
    from concurrent.futures import ThreadPoolExecutor
    with requests.Session() as http, ThreadPoolExecutor(16) as pool:
        http.headers.update(AUTH)
        list(pool.map(lambda u: http.get(f"{url}/v1/users/{u}/recommendations?k=20", timeout=120),
                      users[:requests_]))


def settle(url: str, user: str, limit_ms: float = 20.0, timeout: float = 60.0) -> None:
    """Wait until the server has drained what an overloaded run queued (a probe answers fast again)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = time.monotonic()
        requests.get(f"{url}/v1/users/{user}/recommendations?k=20", headers=AUTH, timeout=120)
        if (time.monotonic() - t) * 1000 < limit_ms:
            return
        time.sleep(1.0)


def vegeta_binary() -> str:
    """The vegeta binary (`make bench` builds it into the virtualenv)."""
    found = shutil.which("vegeta") or shutil.which("vegeta", path=str(Path(sys.executable).parent))
    if not found:
        raise SystemExit("vegeta not found: `make bench` installs it (go install github.com/tsenart/vegeta/v12)")
    return found


def _cpu(server: psutil.Process) -> dict[int, float]:
    """CPU seconds so far of each of the server's worker processes."""
    out = {}
    for proc in server.children(recursive=True):
        try:
            t = proc.cpu_times()
            out[proc.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return out


def vegeta(url: str, users: list[str], query: str, rate: int, seconds: int, workdir: str,
           server: psutil.Process) -> dict:
    """One open-loop vegeta run at `rate` requests/s over shoppers drawn from `users`: p50, p99 (ms),
    achieved rate, failures; and what to read them against: the workers' CPU per request (ms), the
    busiest worker's share of it (a client's connections stay with the worker that accepted them) and
    the share of the machine's CPU time the host stole."""
    rng = random.Random(rate)
    targets = os.path.join(workdir, "targets.txt")
    with open(targets, "w") as fh:
        for user in rng.choices(users, k=rate * seconds):
            fh.write(f"GET {url}/v1/users/{quote(user, safe='')}/recommendations?k=20{query}\n")
            fh.writelines(f"{name}: {value}\n" for name, value in AUTH.items())
            fh.write("\n")
    binary = vegeta_binary()
    cpu0, host0 = _cpu(server), psutil.cpu_times()
    attack = subprocess.Popen([binary, "attack", f"-rate={rate}/s", f"-duration={seconds}s", f"-targets={targets}",
                               "-timeout=60s"], stdout=subprocess.PIPE)
    report = subprocess.run([binary, "report", "-type=json"], stdin=attack.stdout, capture_output=True, check=True)
    attack.wait()
    used = {pid: t - cpu0.get(pid, 0.0) for pid, t in _cpu(server).items()}
    host1 = psutil.cpu_times()
    r = json.loads(report.stdout)
    latencies = r["latencies"]
    total = sum(used.values())
    return {"p50": latencies["50th"] / 1e6, "p99": latencies["99th"] / 1e6, "rps": r["throughput"],
            "failures": r["requests"] - round(r["success"] * r["requests"]), "requests": r["requests"],
            "cpu_ms": 1000 * total / max(r["requests"], 1), "busiest": max(used.values(), default=0) / (total or 1),
            "steal": (host1.steal - host0.steal) / (_all(host1) - _all(host0) or 1)}


def rss_mb(server: subprocess.Popen) -> list[int]:
    """Resident MB of each of the server's worker processes."""
    return [round(p.memory_info().rss / 1e6) for p in psutil.Process(server.pid).children(recursive=True)]


def _all(t) -> float:
    """All of the machine's CPU time in psutil's times (Linux; guest time is inside user time)."""
    return t.user + t.nice + t.system + t.idle + t.iowait + t.irq + t.softirq + t.steal


def _row(r: dict) -> str:
    return (f"{r['rps']:9.1f} {r['p50']:7.1f} {r['p99']:7.1f} {r['failures']:6d} {r['cpu_ms']:7.2f} "
            f"{100 * r['busiest']:7.0f}% {100 * r['steal']:5.1f}%")


def ladder(url: str, probe_user: str, run, rates: str) -> int | None:
    """The highest of `rates` (ascending) held: achieved >= 95% of offered, no failures, p99 <= 50 ms."""
    held = None
    for rate in map(int, rates.split(",")):
        settle(url, probe_user)
        r = run(rate)
        ok = r["rps"] >= 0.95 * rate and r["failures"] == 0 and r["p99"] <= 50
        print(f"  ladder plain {rate:8d} {_row(r)}  {'held' if ok else 'not held'}", flush=True)
        if not ok:
            break
        held = rate
    return held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="100,200,400", help="offered requests/s, comma-separated")
    parser.add_argument("--ladder", default="100,200,300,400,500,600,800", help="rates tried for the highest held")
    parser.add_argument("--seconds", type=int, default=20, help="length of each run under load")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each variant and rate (the host's speed moves between runs): each run's p99 and the median")
    parser.add_argument("--sample", type=int, default=500, help="shoppers in the mix")
    parser.add_argument("--slow", type=int, default=20, help="shoppers timed one by one for the full answer")
    parser.add_argument("--skip-load", action="store_true", help="reuse the graph and model already there")
    parser.add_argument("--scale", type=int, default=0,
                        help="serve bench_scale's power-law graph of this many edges (built and embedded "
                             "first) instead of the demo data")
    parser.add_argument("--skip-sequential", action="store_true", help="only the bare vector query, then the load")
    parser.add_argument("--ready-seconds", type=float, default=60.0,
                        help="how long `serve` may take to load its copies (/readyz 200) before the runs")
    args = parser.parse_args()
    cfg = load_config()
    driver = get_driver(cfg)
    if args.scale and not args.skip_load:
        from bench.bench_scale import embedded_graph, power_law_pairs
        cli("migrate")
        built, embedded = embedded_graph(load_config(tx_timeout=1800.0), power_law_pairs(args.scale, 7))
        print(f"bench_scale's graph of {args.scale:,} edges: imported in {built:.0f}s, first version and "
              f"full embedding {embedded:.0f}s", flush=True)
    elif not args.skip_load:
        cli("migrate")  # the vector indexes at this process's embedding size (the tests' is smaller)
        wipe(driver, cfg.neo4j_database)
        t = time.monotonic()
        cli("load", "online-retail", str(DEMO))
        cli("train", "--epochs", "1")
        cli("embed", "--full")
        print(f"loaded, trained and embedded the demo data in {time.monotonic() - t:.0f}s", flush=True)
        with driver.session(database=cfg.neo4j_database) as s:
            s.run("CALL db.awaitIndexes(600)").consume()  # else index population runs during the first runs
    with driver.session(database=cfg.neo4j_database) as s:
        shoppers = s.run(SHOPPERS).data()
        items = [r["id"] for r in s.run("MATCH (i:Item) WHERE i.ig_deg > 0 RETURN i.id AS id ORDER BY i.ig_deg DESC "
                                        "LIMIT 20")]
        counts = s.run(cypher.NODE_COUNT).single()
        edges = s.run(cypher.INTERACTED_EDGE_COUNT).single()["n"]
    rng = random.Random(1)
    users = rng.choices([r["id"] for r in shoppers], weights=[r["events"] for r in shoppers], k=args.sample)
    print(f"graph: {counts['users']} users, {counts['items']} items, {edges} edges; "
          f"load average {os.getloadavg()}", flush=True)

    # Reads as a client makes them in production: with the read token (one made up for the run if none is set).
    token = None if cfg.open_reads else (cfg.read_token or cfg.admin_token or secrets.token_urlsafe(24))
    AUTH.update({"Authorization": f"Bearer {token}"} if token else {})
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "app", "serve"], cwd=ROOT,
                              env={**os.environ, "IG_PORT": str(port), **({"IG_READ_TOKEN": token} if token else {})},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        for _ in range(8):  # several in a row: each worker process loads its own copy
            wait_ready(url, tries=int(2 * args.ready_seconds))
        print(f"serve ready (/readyz 200, eight times in a row) {time.monotonic() - started:.1f} s after start",
              flush=True)
        warm(url, users)
        print(f"API worker processes' resident memory: {rss_mb(server)} MB", flush=True)
        print("\nsequential, warm                       p50 ms   p99 ms  requests")
        for name, p50, p99, count in sequential(driver, cfg, url, users, args.slow if not args.skip_sequential else 0):
            print(f"  {name:36s} {p50:8.1f} {p99:8.1f} {count:9d}", flush=True)
            if args.skip_sequential:
                break
        with tempfile.TemporaryDirectory() as workdir:
            def run(query, rate):
                return vegeta(url, users, query, rate, args.seconds, workdir, psutil.Process(server.pid))
            print("\nunder load from vegeta (open loop), loopback, k = 20; API CPU per request, the busiest"
                  " worker's share of it, CPU stolen by the host")
            print(f"  {'variant':12s} {'offered':>8s} {'achieved':>9s} {'p50 ms':>7s} {'p99 ms':>7s} {'failed':>6s}"
                  f" {'cpu ms':>7s} {'busiest':>8s} {'steal':>6s}")
            held = ladder(url, users[0], lambda rate: run("", rate), args.ladder)
            for variant, query in VARIANTS.items():
                for rate in map(int, args.rates.split(",")):
                    runs = []
                    for _ in range(args.repeats):
                        settle(url, users[0])
                        runs.append(run(query, rate))
                        print(f"  {variant:12s} {rate:8d} {_row(runs[-1])}", flush=True)
                    if len(runs) > 1:
                        p99 = sorted(r["p99"] for r in runs)
                        print(f"  {variant:12s} {rate:8d} median p99 {float(np.median(p99)):.1f} ms, worst {p99[-1]:.1f} "
                              f"({sum(x <= 25 for x in p99)} of {len(p99)} runs <= 25 ms)", flush=True)
            print(f"\nhighest rate held with p99 <= 50 ms: {held or 'none of the ladder'} requests/s")
            print(f"API worker processes' resident memory after the runs: {rss_mb(server)} MB", flush=True)
        print("\nother reads, sequential, warm          p50 ms   p99 ms  requests  statuses")
        for name, p50, p99, count, statuses in other_reads(url, items):
            print(f"  {name:36s} {p50:8.1f} {p99:8.1f} {count:9d}  {statuses}", flush=True)
    finally:
        server.terminate()
        try:
            server.wait(timeout=120)  # the server lets in-flight requests finish
        except subprocess.TimeoutExpired:
            server.kill()
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
