"""Backfills on Apache Spark: the Python loaders' own batches, prepared in parallel, written by user.

The file is cut into the same batches as `interest-graph load` (row number // chunk size), so that
validation, cleaning (whose bot rule looks at one batch) and weights are the Python loaders' own
code, run on the executors. Prepared events are then partitioned by user, so no two partitions
write the same user's edges, sorted, and written by the official driver from inside each partition:
every slice is one transaction that claims its event ids and folds its events into one row per
edge (`writer.write_batches`), so a rerun, or a run after one killed midway, counts each event once.
With `--to kafka` each slice is appended to the event log instead, and `consume` folds it the same way.
The Neo4j Connector for Apache Spark would do the writing, but its artifacts are not served by the
package registry this project can reach.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections import Counter

import pandas as pd

from app.config import Config
from app.ingest import loaders, writer

log = logging.getLogger(__name__)


def _batch(rows: list, columns: list[str], source: str, options: dict) -> loaders.Batch:
    """The loader's Batch of one chunk: (row number, row) pairs -> a DataFrame indexed like pandas'."""
    rows = sorted(rows)
    frame = pd.DataFrame([r for _, r in rows], columns=columns, index=[n for n, _ in rows])
    if source == "online-retail":
        return loaders.online_retail_batch(frame)
    frame = frame.astype(object).where(frame.notna(), "").astype(str)  # the csv loader reads text, "" if empty
    return loaders.csv_batch(frame, **options)


def _prepare(cfg: Config, columns: list[str], source: str, options: dict):
    """Executor side: a chunk -> ("event", user, event) / ("item", id, (chunk, row)) / ("count", name, n)."""
    def run(chunk):
        number, rows = chunk
        batch = _batch(list(rows), columns, source, options)
        events, report, items = loaders.prepare(cfg, batch)
        for ev in events:
            yield "event", ev["u"], ev
        for k, row in enumerate(items):
            for name, value in row["props"].items():
                yield "item", (row["id"], name), ((number, k), value)
        counts = Counter({**report.counts(), **batch.extra, "rows": batch.rows})
        counts.pop("accepted", None)
        for name, n in counts.items():
            yield "count", name, n
    return run


def _write(cfg: Config, slice_size: int, to: str):
    """Executor side: write one partition's events (sorted by user, item) in slices, into Neo4j or (`to`
    "kafka") the event log, whose consumer drops the duplicates; yield counts."""
    def run(events):
        accepted = seen = 0
        write = _writer(cfg, to)
        events = sorted(events, key=lambda e: (e["u"], e["i"], e["id"]))
        for k in range(0, len(events), slice_size):
            part = events[k:k + slice_size]
            accepted += write(part, {})
            seen += len(part)
        yield {"accepted": accepted, "duplicates": seen - accepted}
    return run


def _writer(cfg: Config, to: str):
    """write(events, counts) -> events newly accepted: a transaction in Neo4j, or an append to the log."""
    if to == "kafka":
        from app.ingest import log as event_log

        def append(events, counts):
            event_log.event_log(cfg).append(events, counts, cfg.kafka_wait)
            return len(events)
        return append
    from app.db import get_driver
    driver = get_driver(cfg)
    return lambda events, counts: writer.write_batches(driver, cfg.neo4j_database, [(events, counts)],
                                                       secret=cfg.erasure_secret)[0]


def session(master: str):
    """A Spark session whose Python workers run this interpreter (and so this installation)."""
    from pyspark.sql import SparkSession
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # workers otherwise run `python3` on PATH
    return (SparkSession.builder.master(master).appName("interest-graph load")
            .config("spark.ui.enabled", "false")
            .config("spark.sql.session.timeZone", "UTC")
            .getOrCreate())


def stop(spark) -> None:
    """Stop the session and the JVM behind it, closing every py4j connection now.

    `SparkSession.stop` leaves the gateway and its connections open for the next session; their
    finalisers then close them at interpreter exit and log it to streams that may be gone by then.
    """
    from pyspark import SparkContext
    spark.stop()
    with SparkContext._lock:
        gateway, SparkContext._gateway, SparkContext._jvm = SparkContext._gateway, None, None
    if gateway is None:
        return
    gateway.shutdown()
    proc = getattr(gateway, "proc", None)
    if proc is not None:  # the JVM exits once its stdin closes (pyspark's launch_gateway)
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a JVM that will not stop must not fail a finished load
            proc.kill()


def load(cfg: Config, path: str, source: str = "csv", fmt: str = "csv", options: dict | None = None,
         master: str = "local[2]", chunk_size: int = 5000, slice_size: int = 5000,
         partitions: int | None = None, to: str = "neo4j") -> Counter:
    """Load `path` (csv or parquet) with Spark; return the same totals as `loaders.load` (`to` "kafka":
    the events go to the event log, item metadata still to Neo4j)."""
    spark = session(master)
    try:
        reader = spark.read.option("header", True).option("inferSchema", False)
        if fmt == "parquet":
            frame = reader.parquet(path)
            frame = frame.select([frame[c].cast("string").alias(c) for c in frame.columns])
        else:
            frame = reader.option("multiLine", False).option("escape", '"').csv(path)
        columns = frame.columns
        if source == "csv":
            missing = [c for k, c in (options or {}).items() if k.endswith("_col") and c and c not in columns]
            if missing:
                raise ValueError(f"column {missing[0]!r} not in {path} (columns: {', '.join(columns)})")
        n = partitions or spark.sparkContext.defaultParallelism
        rows = frame.rdd.map(tuple).zipWithIndex().map(lambda r: (r[1] // chunk_size, (r[1], r[0])))
        prepared = rows.groupByKey(n).flatMap(_prepare(cfg, columns, source, options or {})).cache()
        totals = Counter(dict(prepared.filter(lambda x: x[0] == "count")
                              .map(lambda x: (x[1], x[2])).reduceByKey(lambda a, b: a + b).collect()))
        # Each item property as the latest kept row that has it (file order) sets it: what the
        # Python loader's successive `SET i += props` leave.
        props = (prepared.filter(lambda x: x[0] == "item").map(lambda x: (x[1], x[2]))
                 .reduceByKey(lambda a, b: max(a, b, key=lambda t: t[0])).collect())
        written = (prepared.filter(lambda x: x[0] == "event").map(lambda x: (x[1], x[2]))
                   .partitionBy(n).values().mapPartitions(_write(cfg, slice_size, to)).collect())
        prepared.unpersist()
    finally:
        stop(spark)
    from app.db import get_driver
    driver = get_driver(cfg)
    for part in written:
        totals.update(part)
    # Counts the writes did not record themselves (rejections, cleaning reasons, in-batch duplicates).
    extra = {k: v for k, v in totals.items() if k not in ("accepted", "rows") and v}
    extra["duplicates"] = extra.get("duplicates", 0) - sum(p["duplicates"] for p in written)
    _writer(cfg, to)([], {k: v for k, v in extra.items() if v})
    items: dict[str, dict] = {}
    for (item, name), (_, value) in props:
        items.setdefault(item, {})[name] = value
    rows = [{"id": item, "props": items[item]} for item in sorted(items)]
    for k in range(0, len(rows), 5000):
        writer.upsert_items(driver, cfg.neo4j_database, rows[k:k + 5000])
    log.info("spark load of %s: %s", path, dict(totals))
    return totals
