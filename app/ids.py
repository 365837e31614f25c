"""How raw user ids map to the ids stored in the graph (optional keyed pseudonymisation)."""
from __future__ import annotations

import hashlib
import hmac

from app.config import Config


def user_key(cfg: Config, raw_id: str) -> str:
    """The stored id of a user: HMAC-SHA256 hex of the raw id when IG_ID_HMAC_KEY is set, else the raw id."""
    if not cfg.id_hmac_key:
        return raw_id
    return hmac.new(cfg.id_hmac_key.encode(), str(raw_id).encode(), hashlib.sha256).hexdigest()


def user_keys(cfg: Config, raw_ids) -> dict[str, str]:
    """`user_key` for many ids at once (each distinct id hashed once)."""
    return {raw: user_key(cfg, raw) for raw in set(raw_ids)}


def erasure_key(secret: str, key: str) -> str:
    """What an erasure keeps of a stored user key: its HMAC-SHA256 hex under IG_ERASURE_SECRET."""
    # Keyed: a plain hash of a short customer number is reversed by hashing every number.
    if not secret:
        raise ValueError("an erasure needs IG_ERASURE_SECRET")
    return hmac.new(secret.encode(), key.encode(), hashlib.sha256).hexdigest()
