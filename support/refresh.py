"""Random events, and the refresh checked: stored values against a full recompute, the lease's holder."""
from __future__ import annotations

import random
import time

import numpy as np

from app.embeddings import full, store
from app.status import status

TYPES = ["view", "click", "cart", "purchase", "return"]
_seq = iter(range(10**9))


def events(rng: random.Random, n: int, users: int, items: int, now: int | None = None) -> list[dict]:
    """Random valid events over `users` x `items` ids."""
    now = now or int(time.time() * 1000)
    return [{"event_id": f"e{next(_seq)}-{rng.random()}", "user_id": f"u{rng.randrange(users)}",
             "item_id": f"i{rng.randrange(items)}", "type": rng.choice(TYPES), "quantity": rng.randint(1, 3),
             "ts": now - rng.randrange(30 * 86_400_000)} for _ in range(n)]


def max_error(driver, cfg, lm) -> float:
    """Largest difference between what is stored and a full recompute, over every stored value.

    Vectors are unit length (compared absolutely); norms and degrees are compared relative to their
    size (degrees carry the decay anchor's scale). inf if any value is missing or of another version.
    """
    with driver.session(database=cfg.neo4j_database) as s:
        snap = s.execute_read(lambda tx: store.export(tx))
        stored = {(r["l"], r["id"]): r["p"] for r in s.run(
            "MATCH (n:User|Item) RETURN labels(n)[0] AS l, n.id AS id, properties(n) AS p")}
    worst = 0.0
    for label, ntype in (("User", "user"), ("Item", "item")):
        out = full.compute(lm, snap)
        for node_id, expected in zip(out[ntype][0], full.props_of(out, ntype)):
            got = stored.get((label, node_id))
            if got is None or got.get("embedding_version") != lm.version:
                return float("inf")
            for key, want in expected.items():
                have = got.get(key)
                if want is None or have is None:
                    if want is not have:
                        return float("inf")
                elif isinstance(want, list):
                    worst = max(worst, float(np.abs(np.asarray(have) - np.asarray(want)).max()))
                else:
                    worst = max(worst, abs(have - want) / max(abs(want), 1e-300))
    return worst


def worker_owner(driver, cfg) -> str | None:
    """The process holding the worker lease (None when it is free)."""
    return status(driver, cfg)["worker"]["owner"]
