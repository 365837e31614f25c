"""The first pipeline step: drop (quarantine) implausible events, never silently, with a reason each.

Rules, checked in this order (an event gets the first reason that applies):
- `unknown_type`: `type` is not a key of Config.type_weights (IG_TYPE_WEIGHTS).
- `non_positive_quantity`: a purchase or return with quantity <= 0 (its weight would flip sign).
- `quantity_outlier` / `price_outlier`: quantity above Config.max_quantity or price above Config.max_price.
- `future_ts`: ts later than now + Config.max_future_seconds.
- `bot`: a user with more than Config.bot_events_per_minute events whose timestamps fit in one
  60-second window of the same batch; all of that user's events in the batch are dropped. The rule
  looks at one batch (an API request, a loader chunk) so it needs no state and stays retry-safe.
"""
from __future__ import annotations

from collections import defaultdict

from app.config import Config

REASONS = ("unknown_type", "non_positive_quantity", "quantity_outlier", "price_outlier", "future_ts", "bot")
QUANTITY_TYPES = frozenset({"purchase", "return"})
WINDOW_MS = 60_000


def _reason(cfg: Config, ev, latest_ms: int) -> str | None:
    if ev.type not in cfg.type_weights:
        return "unknown_type"
    if ev.quantity is not None and ev.quantity <= 0 and ev.type in QUANTITY_TYPES:
        return "non_positive_quantity"
    if ev.quantity is not None and abs(ev.quantity) > cfg.max_quantity:
        return "quantity_outlier"
    if ev.price is not None and ev.price > cfg.max_price:
        return "price_outlier"
    if ev.ts > latest_ms:
        return "future_ts"
    return None


def _bots(cfg: Config, events: list) -> set[str]:
    """Users with more than the allowed events inside any 60-second window (two-pointer sweep)."""
    per_user = defaultdict(list)
    for _, ev in events:
        per_user[ev.user_id].append(ev.ts)
    limit = cfg.bot_events_per_minute
    bots = set()
    for user, stamps in per_user.items():
        if len(stamps) <= limit:
            continue
        stamps.sort()
        start = 0
        for end, ts in enumerate(stamps):
            while ts - stamps[start] >= WINDOW_MS:
                start += 1
            if end - start + 1 > limit:
                bots.add(user)
                break
    return bots


def clean(cfg: Config, events: list, now_ms: int) -> tuple[list, list[dict]]:
    """Split (index, event) pairs into kept ones and quarantined {"index", "reason", "error"} entries."""
    latest = now_ms + int(cfg.max_future_seconds * 1000)
    kept, quarantined = [], []
    for index, ev in events:
        reason = _reason(cfg, ev, latest)
        if reason:
            quarantined.append({"index": index, "reason": reason, "error": _explain(cfg, reason, ev)})
        else:
            kept.append((index, ev))
    bots = _bots(cfg, kept)
    if bots:
        for index, ev in kept:
            if ev.user_id in bots:
                quarantined.append({"index": index, "reason": "bot", "error": _explain(cfg, "bot", ev)})
        kept = [(index, ev) for index, ev in kept if ev.user_id not in bots]
        quarantined.sort(key=lambda q: q["index"])
    return kept, quarantined


def _explain(cfg: Config, reason: str, ev) -> str:
    """A human-readable reason for the report."""
    if reason == "unknown_type":
        return f"type {ev.type!r} is not one of {sorted(cfg.type_weights)}"
    if reason == "non_positive_quantity":
        return f"{ev.type} with quantity {ev.quantity:g} (must be > 0)"
    if reason == "quantity_outlier":
        return f"quantity {ev.quantity:g} above the cap {cfg.max_quantity:g}"
    if reason == "price_outlier":
        return f"price {ev.price:g} above the cap {cfg.max_price:g}"
    if reason == "future_ts":
        return f"ts more than {cfg.max_future_seconds:g} s in the future"
    return f"user sent more than {cfg.bot_events_per_minute:g} events within one minute"
