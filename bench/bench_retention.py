"""Ingest state over a long stream: event ids expire after the retention window, so the store stays flat.

A stream of unique events over a fixed population of shoppers and items (edges saturate early, so
what grows is deduplication state) goes through the ingest pipeline in four phases of equal
length, each several windows long, with a (shortened) retention window and the worker's purge every
third of it:
1. warm-up: edges saturate and the window fills;
2. and 3. with the purge: the store should not grow;
4. the same stream with the purge off: what keeping every id costs.
The database starts from empty store files (a wipe would leave the files a previous graph grew),
and the store is measured after a server restart (which checkpoints, so the files hold every record).

`make bench` runs it on the test server; alone:
`NEO4J_URI=bolt://127.0.0.1:7688 NEO4J_HTTP_PORT=7475 IG_HOME=var/test .venv/bin/python -m bench.bench_retention`.
It deletes that server's database files and restarts the server.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

from tqdm.auto import tqdm

from app import cypher, migrate, neo4j_local
from app.config import load_config
from app.db import get_driver
from app.ingest import pipeline, writer
from bench.bench_ingest import synthetic


def fresh_database(cfg) -> None:
    """Empty store files: stop the server, delete the database and its transaction logs, start, migrate."""
    neo4j_local.stop(cfg)
    data = Path(cfg.home) / "neo4j" / "data"
    for folder in (data / "databases" / cfg.neo4j_database, data / "transactions" / cfg.neo4j_database):
        shutil.rmtree(folder, ignore_errors=True)
    neo4j_local.start(cfg)
    migrate.migrate(get_driver(cfg), cfg.neo4j_database, {"embed_dim": cfg.vector_dim})


def store_bytes(cfg) -> int:
    """Bytes of the database's store files after a restart (transaction logs excluded: they rotate)."""
    neo4j_local.stop(cfg)
    neo4j_local.start(cfg)
    root = Path(cfg.home) / "neo4j" / "data" / "databases" / cfg.neo4j_database
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def event_ids(driver, database: str) -> int:
    with driver.session(database=database) as s:
        return s.run(cypher.EVENT_ID_COUNT).single()["n"]


def edge_count(driver, database: str) -> int:
    with driver.session(database=database) as s:
        return s.run(cypher.INTERACTED_EDGE_COUNT).single()["n"]


def stream(driver, cfg, seconds: float, batch: int, first_seed: int, purge: bool, label: str) -> tuple[int, int]:
    """Ingest unique events for `seconds`, purging every third of the window if `purge`; (events, seed)."""
    start = last_purge = time.time()
    seed, total = first_seed, 0
    with tqdm(total=int(seconds), unit="s", desc=label, leave=False) as bar:
        while time.time() - start < seconds:
            seed += 1
            pipeline.ingest(driver, cfg, synthetic(batch, seed, users=5_000, items=1_000, prefix="r"))
            total += batch
            if purge and time.time() - last_purge >= cfg.dedup_retention_days * 86_400 / 3:
                writer.purge_event_ids(driver, cfg.neo4j_database, cfg.dedup_retention_days, cfg.purge_batch,
                                       max_batches=100)
                last_purge = time.time()
            bar.update(int(time.time() - start) - bar.n)
    return total, seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase-seconds", type=float, default=100.0)
    parser.add_argument("--window-seconds", type=float, default=25.0)
    parser.add_argument("--batch", type=int, default=5000)
    args = parser.parse_args()
    cfg = dataclasses.replace(load_config(), dedup_retention_days=args.window_seconds / 86_400)
    fresh_database(cfg)
    driver = get_driver(cfg)
    print(f"retention window {args.window_seconds:.0f} s (purge every {args.window_seconds / 3:.0f} s), "
          f"phases of {args.phase_seconds:.0f} s, batches of {args.batch} unique events, 5,000 users x 1,000 items")
    print(f"{'after':<22} {'events':>10} {'edges':>9} {'live ids':>10} {'store MB':>9}")
    rows, seed = [("start", 0, 0, store_bytes(cfg))], 0
    for label, purge in (("warm-up (purging)", True), ("purging", True), ("purging again", True),
                         ("purge off", False)):
        n, seed = stream(driver, cfg, args.phase_seconds, args.batch, seed, purge, label)
        rows.append((label, n, event_ids(driver, cfg.neo4j_database), store_bytes(cfg)))
        print(f"{label:<22} {n:10,d} {edge_count(driver, cfg.neo4j_database):9,d} {rows[-1][2]:10,d} "
              f"{rows[-1][3] / 1e6:9.1f}")
    (_, _, _, warm), (_, n2, _, _), (_, n3, _, kept), (_, n4, _, grown) = rows[1:]
    with_purge, without = (kept - warm) / (n2 + n3) * 1e6, (grown - kept) / n4 * 1e6
    print(f"\nstore growth per million events: with the purge {with_purge / 1e6:+.1f} MB, "
          f"keeping every id {without / 1e6:+.1f} MB")


if __name__ == "__main__":
    main()
