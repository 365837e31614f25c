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
from app.ingest import pipeline, writer
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


def online_retail_batches(path, chunk_size: int = 5000) -> Iterator[Batch]:
    """UCI Online Retail rows -> purchase / return events plus item titles and prices."""
    dtypes = {"InvoiceNo": str, "StockCode": str, "Description": str, "CustomerID": str}
    for chunk in pd.read_csv(path, dtype=dtypes, chunksize=chunk_size):
        rows = len(chunk)
        missing = chunk["CustomerID"].isna()
        chunk = chunk[~missing]
        invoice, stock = chunk["InvoiceNo"].str.strip(), chunk["StockCode"].str.strip()
        cancelled = invoice.str.startswith("C")
        # The file writes ids as floats ("17850.0"); the customer is "17850".
        users = chunk["CustomerID"].str.strip().str.replace(r"\.0$", "", regex=True)
        # Cancellations carry negative quantities: they become returns of |quantity| units.
        quantity = chunk["Quantity"].where(~cancelled, -chunk["Quantity"]).astype(float)
        events = [{"event_id": f"or:{inv}:{sc}:{line}", "user_id": u, "item_id": sc,
                   "type": "return" if c else "purchase", "ts": ts, "quantity": q, "price": p}
                  for inv, sc, line, u, c, ts, q, p in zip(
                      invoice, stock, chunk.index, users, cancelled, _ms(chunk["InvoiceDate"]),
                      quantity, chunk["UnitPrice"].astype(float))]
        items = [{"id": sc, "props": {k: v for k, v in (("title", d), ("price", p))
                                      if isinstance(v, str) or (isinstance(v, float) and v > 0)}}
                 for sc, d, p in zip(stock, chunk["Description"].str.strip(), chunk["UnitPrice"].astype(float))]
        yield Batch(events, items, {"missing_user": int(missing.sum())} if missing.any() else {}, rows)


def csv_batches(path, user_col: str, item_col: str, ts_col: str, type_col: str | None = None,
                weight_col: str | None = None, event_id_col: str | None = None, default_type: str = "view",
                ts_unit: str = "ms", chunk_size: int = 5000) -> Iterator[Batch]:
    """Any interaction CSV -> events; without an id column the id is a hash of the row's content.

    Timestamps are epoch numbers (`ts_unit`) or ISO 8601 text; text without an offset is taken as UTC."""
    for chunk in pd.read_csv(path, dtype=str, keep_default_na=False, chunksize=chunk_size):
        for col in filter(None, (user_col, item_col, ts_col, type_col, weight_col, event_id_col)):
            if col not in chunk.columns:
                raise ValueError(f"column {col!r} not in {path} (columns: {', '.join(chunk.columns)})")
        events = []
        stamps = _text_ms(chunk[ts_col])
        for rec, parsed in zip(chunk.to_dict("records"), stamps):
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
        yield Batch(events, [], {}, len(chunk))


def _ingest_batch(driver, cfg: Config, batch: Batch, upserted: dict) -> Counter:
    """Ingest one batch, then upsert metadata of the items whose events were kept.

    `upserted` holds the metadata this load already wrote per item: rows repeating it are skipped,
    as Online Retail repeats an item's title and price on every line that sells it.
    """
    report = pipeline.ingest(driver, cfg, batch.events, batch.extra)
    if batch.items:
        dropped = {r["index"] for r in report.rejected} | {q["index"] for q in report.quarantined}
        latest = {row["id"]: row for k, row in enumerate(batch.items) if row and k not in dropped}
        fresh = [row for row in latest.values() if upserted.get(row["id"]) != row["props"]]
        if fresh:
            writer.upsert_items(driver, cfg.neo4j_database, fresh)
            upserted.update((row["id"], row["props"]) for row in fresh)
    return Counter({**report.counts(), **batch.extra, "rows": batch.rows})


def load(driver, cfg: Config, batches: Iterable[Batch], workers: int = 2, label: str = "load") -> Counter:
    """Run batches through ingest with a few concurrent writers (results do not depend on order)."""
    totals, upserted = Counter(), {}
    freeze_heap()  # a load allocates millions of short-lived objects
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(unit=" rows", desc=label) as bar:
        pending = []
        for batch in batches:
            pending.append(pool.submit(_ingest_batch, driver, cfg, batch, upserted))
            # Keep a bounded queue so a huge file never sits in memory at once.
            while len(pending) > 2 * workers:
                done = pending.pop(0).result()
                totals.update(done)
                bar.update(done["rows"])
        for future in pending:
            done = future.result()
            totals.update(done)
            bar.update(done["rows"])
    log.info("%s: %s", label, dict(totals))
    return totals
