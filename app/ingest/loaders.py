"""Bulk loaders: CSV files streamed in chunks through the same `pipeline.ingest` as the API."""
from __future__ import annotations

import hashlib
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import pandas as pd
from tqdm import tqdm

from app.config import Config
from app.ingest import group, pipeline, writer
from app.ingest import log as event_log
from app.runtime import freeze_heap

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """Raw events, optional item metadata aligned with them, and counts of rows dropped before ingest."""

    events: list[dict]
    items: list[dict | None] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    rows: int = 0


def _ms(series: pd.Series) -> list[int]:
    """Naive or aware date-time text -> epoch milliseconds (naive taken as UTC)."""
    stamps = pd.to_datetime(series, utc=True)
    return ((stamps - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)).tolist()


def _text_ms(series: pd.Series) -> list[int | None]:
    """ISO 8601 text -> epoch ms (naive taken as UTC, as Online Retail's dates); None where not a date."""
    stamps = pd.to_datetime(series.str.strip().where(~series.str.strip().str.lstrip("-").str.isdigit()),
                            utc=True, errors="coerce", format="ISO8601")
    ms = (stamps - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)
    return [None if pd.isna(v) else int(v) for v in ms]


ONLINE_RETAIL_TYPES = {"InvoiceNo": str, "StockCode": str, "Description": str, "CustomerID": str}


def online_retail_batch(chunk: pd.DataFrame) -> Batch:
    """UCI Online Retail rows (indexed by their row number in the file) -> purchase / return events
    plus item titles and prices."""
    rows = len(chunk)
    missing = chunk["CustomerID"].isna()
    chunk = chunk[~missing]
    invoice, stock = chunk["InvoiceNo"].str.strip(), chunk["StockCode"].str.strip()
    cancelled = invoice.str.startswith("C")
    # The file writes ids as floats ("17850.0"); the customer is "17850".
    users = chunk["CustomerID"].str.strip().str.replace(r"\.0$", "", regex=True)
    # Cancellations carry negative quantities: they become returns of |quantity| units.
    quantity = pd.to_numeric(chunk["Quantity"]).astype(float)
    quantity = quantity.where(~cancelled, -quantity)
    price = pd.to_numeric(chunk["UnitPrice"]).astype(float)
    events = [{"event_id": f"or:{inv}:{sc}:{line}", "user_id": u, "item_id": sc,
               "type": "return" if c else "purchase", "ts": ts, "quantity": q, "price": p}
              for inv, sc, line, u, c, ts, q, p in zip(
                  invoice, stock, chunk.index, users, cancelled, _ms(chunk["InvoiceDate"]), quantity, price)]
    items = [{"id": sc, "props": {k: v for k, v in (("title", d), ("price", p))
                                  if isinstance(v, str) or (isinstance(v, float) and v > 0)}}
             for sc, d, p in zip(stock, chunk["Description"].str.strip(), price)]
    return Batch(events, items, {"missing_user": int(missing.sum())} if missing.any() else {}, rows)


def online_retail_batches(path, chunk_size: int = 5000) -> Iterator[Batch]:
    """The Online Retail file in batches of `chunk_size` rows."""
    for chunk in pd.read_csv(path, dtype=ONLINE_RETAIL_TYPES, chunksize=chunk_size):
        yield online_retail_batch(chunk)


def csv_batch(chunk: pd.DataFrame, user_col: str, item_col: str, ts_col: str, type_col: str | None = None,
              weight_col: str | None = None, event_id_col: str | None = None, default_type: str = "view",
              ts_unit: str = "ms", source: str = "") -> Batch:
    """Text rows of any interaction table -> events; without an id column the id is a hash of the row.

    Timestamps are epoch numbers (`ts_unit`) or ISO 8601 text; text without an offset is taken as UTC."""
    for col in filter(None, (user_col, item_col, ts_col, type_col, weight_col, event_id_col)):
        if col not in chunk.columns:
            raise ValueError(f"column {col!r} not in {source} (columns: {', '.join(chunk.columns)})")
    events = []
    for rec, parsed in zip(chunk.to_dict("records"), _text_ms(chunk[ts_col])):
        ts = rec[ts_col].strip()
        if ts.lstrip("-").isdigit():
            ts = int(ts) * (1000 if ts_unit == "s" else 1)
        elif parsed is not None:
            ts = parsed
        ev = {"user_id": rec[user_col], "item_id": rec[item_col], "ts": ts,
              "type": rec[type_col].strip() if type_col else default_type}
        if weight_col and rec[weight_col].strip():
            ev["weight"] = rec[weight_col]
        ev["event_id"] = rec[event_id_col] if event_id_col else "csv:" + hashlib.sha1(
            "\x1f".join(str(ev.get(k, "")) for k in ("user_id", "item_id", "ts", "type", "weight"))
            .encode()).hexdigest()[:24]
        events.append(ev)
    return Batch(events, [], {}, len(chunk))


def csv_batches(path, user_col: str, item_col: str, ts_col: str, type_col: str | None = None,
                weight_col: str | None = None, event_id_col: str | None = None, default_type: str = "view",
                ts_unit: str = "ms", chunk_size: int = 5000) -> Iterator[Batch]:
    """Any interaction CSV, in batches of `chunk_size` rows."""
    for chunk in pd.read_csv(path, dtype=str, keep_default_na=False, chunksize=chunk_size):
        yield csv_batch(chunk, user_col, item_col, ts_col, type_col, weight_col, event_id_col, default_type,
                        ts_unit, source=str(path))


def prepare(cfg: Config, batch: Batch) -> tuple[list[dict], pipeline.Report, list[dict]]:
    """A batch's events to write, its report, and the metadata of items whose events were kept
    (the latest row per item)."""
    report, events = pipeline.prepare(cfg, batch.events)
    dropped = {r["index"] for r in report.rejected} | {q["index"] for q in report.quarantined}
    latest = {row["id"]: row for k, row in enumerate(batch.items) if row and k not in dropped}
    return events, report, list(latest.values())


def _ingest_batch(driver, cfg: Config, batch: Batch, to: str = "neo4j") -> tuple[Counter, list[dict]]:
    """Ingest one batch (`to="kafka"`: append it to the event log, which `consume` folds); return its
    counts and the metadata of the items whose events were kept."""
    events, report, items = prepare(cfg, batch)
    counts = {k: v for k, v in report.counts().items() if k != "accepted"}
    if to == "kafka":
        event_log.event_log(cfg).append(events, {k: v for k, v in {**counts, **batch.extra}.items() if v},
                                        cfg.kafka_wait)
        report.accepted = len(events)
        return Counter({**report.counts(), **batch.extra, "rows": batch.rows}), items
    report.accepted = group.write_events(driver, cfg.neo4j_database, events, {**counts, **batch.extra},
                                         secret=cfg.erasure_secret)
    report.duplicates += len(events) - report.accepted
    return Counter({**report.counts(), **batch.extra, "rows": batch.rows}), items


def load(driver, cfg: Config, batches: Iterable[Batch], workers: int = 2, label: str = "load",
         to: str = "neo4j") -> Counter:
    """Run batches through ingest with a few concurrent writers (edges do not depend on their order);
    item metadata is written in file order, so the last row of an item sets each of its properties.
    `to="kafka"`: the events go to the event log instead (item metadata still goes to Neo4j)."""
    totals, upserted = Counter(), {}

    def finish(future) -> None:
        done, items = future.result()
        # Online Retail repeats an item's title and price on every line that sells it: skip repeats.
        fresh = [row for row in items if upserted.get(row["id"]) != row["props"]]
        if fresh:
            writer.upsert_items(driver, cfg.neo4j_database, fresh)
            upserted.update((row["id"], row["props"]) for row in fresh)
        totals.update(done)
        bar.update(done["rows"])

    freeze_heap()  # a load allocates millions of short-lived objects
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(unit=" rows", desc=label) as bar:
        pending = []
        for batch in batches:
            pending.append(pool.submit(_ingest_batch, driver, cfg, batch, to))
            # Keep a bounded queue so a huge file never sits in memory at once.
            while len(pending) > 2 * workers:
                finish(pending.pop(0))
        for future in pending:
            finish(future)
    log.info("%s: %s", label, dict(totals))
    return totals
