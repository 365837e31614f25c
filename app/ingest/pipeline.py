"""The one ingest path for the API and the loaders: validate -> dedupe -> clean -> weigh -> write."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from app.config import Config
from app.ids import user_keys
from app.ingest import cleaning, decay, group, log, schema


@dataclass
class Report:
    """What happened to a batch; `rejected` failed validation, `quarantined` failed cleaning."""

    accepted: int = 0
    duplicates: int = 0
    rejected: list[dict] = field(default_factory=list)
    quarantined: list[dict] = field(default_factory=list)

    def counts(self) -> dict:
        """Totals by outcome and by cleaning reason (what the loaders print)."""
        out = {"accepted": self.accepted, "duplicates": self.duplicates, "rejected": len(self.rejected)}
        for q in self.quarantined:
            out[q["reason"]] = out.get(q["reason"], 0) + 1
        return out


def weigh(cfg: Config, ev, user: str) -> dict:
    """The stored form of a kept event: its decayed weight relative to the fixed anchor."""
    quantity = ev.quantity if ev.quantity is not None else 1.0
    base = ev.weight if ev.weight is not None else cfg.type_weights[ev.type] * quantity
    signed_qty = 0.0 if ev.quantity is None else (-ev.quantity if ev.type == "return" else ev.quantity)
    return {"id": ev.event_id, "u": user, "i": ev.item_id, "ts": ev.ts, "type": ev.type,
            "w": base * decay.factor(cfg, ev.ts), "qty": signed_qty}


def prepare(cfg: Config, raw: list) -> tuple[Report, list[dict]]:
    """Validate, dedupe within the batch, clean and weigh raw event dicts: the report so far and the
    stored form of the kept events, nothing written (the stream evaluation replays exactly these)."""
    valid, rejected = schema.validate_events(raw, cfg)
    report = Report(rejected=rejected)
    seen, unique = set(), []
    for index, ev in valid:
        # First occurrence wins inside a batch; later copies are plain duplicates.
        if ev.event_id in seen:
            report.duplicates += 1
        else:
            seen.add(ev.event_id)
            unique.append((index, ev))
    kept, report.quarantined = cleaning.clean(cfg, unique, int(time.time() * 1000))
    keys = user_keys(cfg, (ev.user_id for _, ev in kept))
    return report, [weigh(cfg, ev, keys[ev.user_id]) for _, ev in kept]


def ingest(driver, cfg: Config, raw: list, extra_counts: dict | None = None, wait: float | None = None) -> Report:
    """Validate, clean and commit a batch of raw event dicts; each event id counts once (within the
    retention window). `wait`: at most this many seconds for the commit (TimeoutError after; the API
    answers 503)."""
    report, events = prepare(cfg, raw)
    counts = {k: v for k, v in report.counts().items() if k not in ("accepted",)}
    counts.update(extra_counts or {})
    report.accepted = group.write_events(driver, cfg.neo4j_database, events, counts, timeout=wait,
                                         tx_timeout=cfg.tx_timeout, secret=cfg.erasure_secret,
                                         max_queued=cfg.ingest_queue if wait is not None else None)
    report.duplicates += len(events) - report.accepted
    return report


def enqueue(cfg: Config, raw: list, wait: float) -> Report:
    """IG_INGEST=kafka: validate, clean and weigh as `ingest` does, then append the batch to the event log
    and return once the broker holds it (`interest-graph consume` claims the ids and writes the edges)."""
    report, events = prepare(cfg, raw)
    counts = {k: v for k, v in report.counts().items() if k != "accepted" and v}
    log.event_log(cfg).append(events, counts, wait)
    report.accepted = len(events)
    return report


def item_rows(items: list) -> list[dict]:
    """Item models -> {"id", "props"} rows; attributes become `attr_<name>` properties."""
    rows = []
    for _, item in items:
        props = {k: getattr(item, k) for k in ("title", "category", "price") if getattr(item, k) is not None}
        props.update({f"attr_{k}": v for k, v in (item.attributes or {}).items()})
        rows.append({"id": item.item_id, "props": props})
    return rows
