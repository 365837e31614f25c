"""The stored churn scores' top list, kept in each API process and served in slices until the next run."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

from app import cypher


@dataclass
class _Top:
    stamp: str
    checked: float
    rows: list[dict]


# (driver, database, min_days) -> the kept list; min_days is a request parameter, so at most KEYS lists
# are kept (the least recently checked goes first): memory stays bounded whatever callers ask.
_kept: dict[tuple, _Top] = {}
KEYS = 16
_lock = threading.Lock()


def top(driver, session, database: str, k: int, min_days: int, max_k: int, check_s: float) -> list[dict] | None:
    """The stored top k (k <= `max_k`), most at risk first, or None before a scoring run has stored a score.

    The top `max_k` of the current run is read once and kept; a request at least `check_s` seconds after
    the last check reads the run's stamp (CHURN_STAMP) and reloads only when it changed, so an answer is
    at most `check_s` seconds behind the run that last finished (or an erasure).
    """
    key = (id(driver), database, min_days)
    now = time.monotonic()
    kept = _kept.get(key)
    if kept is not None and now - kept.checked < check_s:
        return kept.rows[:k] or None
    with _lock:  # one reader checks and reloads; the others then find it fresh
        kept = _kept.get(key)
        if kept is not None and now - kept.checked < check_s:
            return kept.rows[:k] or None
        stamp = session.execute_read(lambda tx: tx.run(cypher.CHURN_STAMP).single()["stamp"])
        if stamp is None:
            return None
        if kept is None or kept.stamp != stamp:
            kept = _Top(stamp, now, _read(session, max_k, min_days))
            while key not in _kept and len(_kept) >= KEYS:
                del _kept[min(_kept, key=lambda other: _kept[other].checked)]
            _kept[key] = kept
        kept.checked = now
        return kept.rows[:k] or None  # a run that scored nobody: as before any run


def _read(session, max_k: int, min_days: int) -> list[dict]:
    """The stored top `max_k` as the API answers them (reasons decoded once, here)."""
    rows = session.execute_read(lambda tx: [dict(r) for r in tx.run(cypher.CHURN_TOP, k=max_k, min_days=min_days)])
    return [{"user_id": r["user_id"], "score": r["score"], "risk": r["score"], "silent_days": r["silent_days"],
             "typical_gap_days": r["typical_gap_days"],
             "reasons": {"contributions": json.loads(r["reasons"]), "version": r["version"],
                         "scored_at": r["scored_at"]}}
            for r in rows]


def forget() -> None:
    """Drop every kept list (a wiped graph in tests and benchmarks: no check interval to wait out)."""
    with _lock:
        _kept.clear()
