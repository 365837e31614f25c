"""Read an event file into a time-ordered stream, through the loaders and the ingest pipeline's own
validation, cleaning and weights (nothing is written)."""
from __future__ import annotations

import logging
from collections import Counter
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from app.config import Config
from app.embeddings.models import weight_scale
from app.ingest import loaders, pipeline
from graph_models.stream import Stream, encode, start_of_test

log = logging.getLogger(__name__)


class EventLog(NamedTuple):
    """The kept events as a Stream (weights scaled near 1), their raw form in the same order, and counts."""

    stream: Stream
    raw: list[dict]
    counts: Counter
    scale: float
    ref_ms: int


def batches(path, fmt: str, user_col=None, item_col=None, ts_col=None, ts_unit="ms", weight_col=None,
            type_col=None):
    """The loader's raw batches for `fmt` ("online-retail" or "csv")."""
    if fmt == "online-retail":
        return loaders.online_retail_batches(path)
    return loaders.csv_batches(path, user_col, item_col, ts_col, type_col=type_col, weight_col=weight_col,
                               ts_unit=ts_unit)


def read(cfg: Config, source, train_fraction: float = 0.8) -> EventLog:
    """Every event the ingest path would keep, once per event id, sorted by time.

    Weights are the stored ones (type weight x quantity or the explicit weight, times the decay
    factor) multiplied by the scale of a version trained at the end of the first `train_fraction`,
    as the service does: rankings do not depend on it, it keeps numbers near 1.
    """
    counts, seen, kept = Counter(), set(), []
    for batch in tqdm(source, desc="read events", unit=" batches"):
        report, events = pipeline.prepare(cfg, batch.events)
        raw = {e["event_id"]: e for e in batch.events}
        counts.update({**report.counts(), **batch.extra, "rows": batch.rows})
        for ev in events:
            if ev["id"] in seen:
                counts["duplicates"] += 1
                continue
            seen.add(ev["id"])
            kept.append((ev, raw[ev["id"]]))
    if not kept:
        raise ValueError("no event survived validation and cleaning")
    counts["accepted"] = len(kept)
    ts = np.fromiter((ev["ts"] for ev, _ in kept), dtype=np.int64, count=len(kept))
    stream = encode([ev["u"] for ev, _ in kept], [ev["i"] for ev, _ in kept], ts,
                    [ev["w"] for ev, _ in kept])
    order = np.argsort(ts, kind="stable")  # the order `encode` uses
    start = start_of_test(stream, train_fraction)
    ref = int(stream.ts[max(start - 1, 0)])
    scale = weight_scale({"ref_ms": ref, "decay_anchor_ms": cfg.decay_anchor_ms,
                          "half_life_days": cfg.half_life_days})
    log.info("read %d events: %s", len(kept), dict(counts))
    return EventLog(stream._replace(w=stream.w * scale), [kept[k][1] for k in order], counts, scale, ref)
