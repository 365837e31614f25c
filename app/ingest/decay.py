"""Time decay against a fixed anchor: weight = base x 2^((ts - A) / half_life), a pure, order-free sum."""
from __future__ import annotations

import time
from functools import lru_cache

from app.config import Config

DAY_MS = 86_400_000
# 2^1023 is the largest float64 power of two; stay well inside so sums of many terms cannot overflow.
MAX_HALF_LIVES = 900.0


class DecayRangeError(ValueError):
    """The anchor and half-life put a timestamp outside the float64-safe range."""


@lru_cache(maxsize=8)
def _anchor_ms(anchor: str) -> int:
    # Config parses the anchor text on every access; this runs twice per event, so parse it once.
    return Config(decay_anchor=anchor).decay_anchor_ms


def half_lives(cfg: Config, ts_ms: int) -> float:
    """How many half-lives `ts_ms` lies after the anchor (negative before it)."""
    return (ts_ms - _anchor_ms(cfg.decay_anchor)) / (cfg.half_life_days * DAY_MS)


def in_range(cfg: Config, ts_ms: int) -> bool:
    """True when the decay factor of `ts_ms` is safely representable."""
    return abs(half_lives(cfg, ts_ms)) <= MAX_HALF_LIVES


def factor(cfg: Config, ts_ms: int) -> float:
    """2^((ts - A) / half_life): the growth factor that makes old events relatively lighter."""
    return 2.0 ** half_lives(cfg, ts_ms)


def check_config(cfg: Config) -> None:
    """Refuse a half-life / anchor pair under which events arriving now would overflow float64."""
    if cfg.half_life_days <= 0:
        raise DecayRangeError(f"IG_HALF_LIFE_DAYS must be positive, got {cfg.half_life_days}")
    try:
        cfg.decay_anchor_ms
    except ValueError as exc:
        raise DecayRangeError(f"IG_DECAY_ANCHOR={cfg.decay_anchor!r} is not an RFC 3339 time: {exc}") from exc
    latest = int((time.time() + cfg.max_future_seconds) * 1000)
    spent = half_lives(cfg, latest)
    if abs(spent) > MAX_HALF_LIVES:
        raise DecayRangeError(
            f"IG_DECAY_ANCHOR={cfg.decay_anchor} with IG_HALF_LIFE_DAYS={cfg.half_life_days:g} puts now "
            f"{spent:.0f} half-lives from the anchor; edge weights stay exact in float64 only up to "
            f"{MAX_HALF_LIVES:.0f}: move the anchor closer to today or lengthen the half-life")
