"""Item content features and edge aggregation weights, as the model expects them."""
from __future__ import annotations

import re

import numpy as np
import torch

from app.config import Config
from graph_models import agg_weight, hash_bucket

_WORD = re.compile(r"[a-z0-9]+")
DAY_MS = 86_400_000.0


def item_features(items: list[dict], buckets: tuple[int, int]) -> dict:
    """Hashed category, title tokens and price of items (dicts with category/title/price)."""
    cat_buckets, tok_buckets = buckets
    category = [hash_bucket(it["category"], cat_buckets) if it.get("category") else -1 for it in items]
    tokens = [[hash_bucket(w, tok_buckets) for w in _WORD.findall((it.get("title") or "").lower())]
              for it in items]
    price = [float(it["price"]) if it.get("price") is not None else 0.0 for it in items]
    return {"category": torch.tensor(category, dtype=torch.int64),
            "price": torch.tensor(price, dtype=torch.float64), "tokens": tokens}


def omega(w, ref_ms: int, cfg: Config) -> np.ndarray:
    """Aggregation weight of stored edge weights, decayed to the model's reference time.

    Stored weights are relative to the fixed anchor A; multiplying by 2^-((R - A) / half-life)
    gives weights decayed to R, identical for every edge of one model version.
    """
    w = np.asarray([0.0 if x is None else x for x in np.atleast_1d(w)], dtype=np.float64)
    half_lives = (ref_ms - cfg.decay_anchor_ms) / (cfg.half_life_days * DAY_MS)
    return agg_weight(w * np.exp2(-half_lives))
