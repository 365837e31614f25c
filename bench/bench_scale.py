"""The refresh as the graph grows: 1,000 events on synthetic power-law graphs of 10k, 1M and 10M edges.

A graph of N edges has N/10 users and N/50 items (at least 500); each edge's user is uniform and
its item follows a power law (Pareto, shape 1.2), as a shop's popularity does. It is written with
`neo4j-admin database import full` (server stopped; the same properties as bench_refresh's bench-only
statements, no Event nodes), then migrated, a first model version is published with
its untrained responses (the refresh's cost does not depend on them), and then, as in bench_refresh:
a full recompute, an incremental run after 1% of the users changed, and one after 1,000 events.
The store size (after a restart, so the files hold every record) and the server's resident memory
are read for each graph. Embeddings are 64 + 16 components (`make bench-scale` sets them) so a 10M
graph fits a 6 GB page cache; the refresh's cost scales with the dimension alike at every size.

`make bench-scale`; alone: `NEO4J_URI=bolt://127.0.0.1:7688 NEO4J_HTTP_PORT=7475 IG_HOME=var/test
IG_EMBED_DIM=64 IG_SHARP_DIM=16 .venv/bin/python -m bench.bench_scale`. It wipes that server's database.
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np

from app import migrate, neo4j_local
from app.config import load_config
from app.db import get_driver
from app.embeddings.training import train_and_publish
from app.ingest import decay
from app.worker import Worker
from bench.bench_refresh import DAY_MS, measure_size


def power_law_pairs(m: int, seed: int) -> list[tuple[str, str]]:
    """`m` distinct (user, item) pairs: uniform users, Pareto-distributed items."""
    users, items, _ = power_law_keys(m, seed)
    return [(f"u{u}", f"i{i}") for u, i in zip(users.tolist(), items.tolist())]


def power_law_keys(m: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """`power_law_pairs` as (user numbers, item numbers, items in the catalogue)."""
    rng = np.random.default_rng(seed)
    users, items = max(1, m // 10), max(500, m // 50)
    keys = np.empty(0, dtype=np.int64)
    while len(keys) < m:
        n = int(1.3 * (m - len(keys))) + 1000
        u = rng.integers(users, size=n, dtype=np.int64)
        i = np.minimum((rng.pareto(1.2, size=n) * items / 20).astype(np.int64), items - 1)
        keys = np.unique(np.concatenate([keys, u * items + i]))
    keys = rng.permutation(keys)[:m]
    return keys // items, keys % items, items


def import_graph(cfg, pairs: list[tuple[str, str]]) -> float:
    """Replace the database with the graph of `pairs` by a bulk import, restart and migrate; seconds."""
    started = time.perf_counter()
    # History written a day ago, as bench_refresh's build does, and already reflected (`ig_rev` =
    # `rev`), so the migrations run after the import flag nothing as changed.
    ts = int(time.time() * 1000) - DAY_MS
    w = decay.factor(cfg, ts)
    folder = Path(cfg.home) / "scale-import"
    folder.mkdir(parents=True, exist_ok=True)
    files = {name: folder / f"{name}.csv" for name in ("users", "items", "edges")}
    for name, header, ids in (("users", "id:ID(User)", {u for u, _ in pairs}),
                              ("items", "id:ID(Item)", {i for _, i in pairs})):
        with open(files[name], "w", newline="") as fh:
            fh.write(f"{header},changed_at:long,rev:long,ig_rev:long\n")
            fh.writelines(f"{x},{ts},1,1\n" for x in sorted(ids))
    with open(files["edges"], "w", newline="") as fh:
        fh.write(":START_ID(User),:END_ID(Item),w:double,qty:double,first_ts:long,last_ts:long,"
                 "n_view:long,changed_at:long,rev:long,ig_rev:long\n")
        tail = f",{w!r},0.0,{ts},{ts},1,{ts},1,1\n"
        fh.writelines(f"{u},{i}{tail}" for u, i in pairs)
    neo4j_local.stop(cfg)
    neo4j_local.import_full(cfg, {"User": files["users"], "Item": files["items"]},
                            {"INTERACTED": files["edges"]})
    neo4j_local.start(cfg)
    migrate.migrate(get_driver(cfg), cfg.neo4j_database, {"embed_dim": cfg.vector_dim})
    for path in files.values():
        path.unlink()
    return time.perf_counter() - started


def embedded_graph(cfg, pairs: list[tuple[str, str]]) -> tuple[float, float]:
    """The graph of `pairs` imported (`import_graph`) and a first, untrained version published, which
    embeds every node under it: the seconds of each step."""
    built = import_graph(cfg, pairs)
    started = time.perf_counter()
    with Worker(cfg).holding() as holder:
        train_and_publish(get_driver(cfg), cfg, progress=False, train_model=False, owner=holder.owner)
    return built, time.perf_counter() - started


def store_mb(cfg) -> float:
    """MB of the database's store files, after a restart flushed every page."""
    neo4j_local.stop(cfg)
    neo4j_local.start(cfg)
    root = Path(cfg.home) / "neo4j" / "data" / "databases" / cfg.neo4j_database
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 1e6


def server_rss_mb(cfg) -> float:
    """Resident memory of the local Neo4j server process, MB."""
    for line in open(f"/proc/{neo4j_local.status(cfg)['pid']}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1e3
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,1000000,10000000")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    # One uncapped incremental run for each measured change; the 10M graph's export outlives the
    # default transaction timeout and its 4.1 GB store wants the page cache to match.
    cfg = load_config(full_share=10.0, refresh_max_users=0, tx_timeout=1800.0,
                      neo4j_heap="4g", neo4j_pagecache="6g")
    rng = random.Random(args.seed)
    rows = []
    for size in (int(x) for x in args.sizes.split(",") if x):
        pairs = power_law_pairs(size, args.seed)
        built = import_graph(cfg, pairs)
        with Worker(cfg).holding() as holder:
            row = measure_size(get_driver(cfg), cfg, pairs, rng, holder.owner, built, recommend=False)
        row["rss_mb"] = server_rss_mb(cfg)
        row["store_mb"] = store_mb(cfg)
        rows.append(row)
        print(f"{size:,} edges: build {built:.0f}s, full {row['full_s']:.1f}s, 1% users {row['pct']['wall']:.2f}s, "
              f"1000 events {row['k1000']['wall']:.2f}s, store {row['store_mb']:.0f} MB, "
              f"Neo4j RSS {row['rss_mb']:.0f} MB", flush=True)
        del pairs
    base = rows[0]
    print(f"\n{'edges':>11} {'users':>9} {'items':>7} {'full s':>8} {'1000 ev s':>9} {'vs smallest':>11} "
          f"{'full vs smallest':>16} {'store MB/M edges':>16}")
    for r in rows:
        print(f"{r['edges']:11,d} {r['users']:9,d} {r['items']:7,d} {r['full_s']:8.1f} {r['k1000']['wall']:9.2f} "
              f"{r['k1000']['wall'] / base['k1000']['wall']:10.2f}x {r['full_s'] / base['full_s']:15.1f}x "
              f"{r['store_mb'] / (r['edges'] / 1e6):16.0f}")


if __name__ == "__main__":
    main()
