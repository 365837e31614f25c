"""What the served ranking must equal: the offline Scorer's answers on the graph in Neo4j, and the
comparison of a served answer with them."""
from __future__ import annotations

import numpy as np

from app.embeddings import store
from app.embeddings.training import weights
from graph_models.bias import trend
from graph_models.train import Scorer


def offline_answers(driver, cfg, lm, every: int, k: int, users: list[str] | None = None
                    ) -> list[tuple[str, list[str], np.ndarray]]:
    """(user, the top k item ids without the user's items, their scores) by the offline Scorer on the
    graph in Neo4j, for every `every`-th user with a positive edge (of `users`, if given); the trend (if the version reads one)
    as training computes it, of the graph's positive edges."""
    with driver.session(database=cfg.neo4j_database) as s:
        snap = s.execute_read(lambda tx: store.export(tx, times=True))
        own = {}
        for r in s.run("MATCH (u:User)-->(i:Item) RETURN u.id AS u, collect(i.id) AS items"):
            own[r["u"]] = set(r["items"])
    # The Scorer reads column k as the version's item k: the version's items in its order, new ones
    # after them (an export lists items in store order, which a reused node id changes).
    known = {i: k for k, i in enumerate(lm.meta["item_ids"])}
    perm = sorted(range(len(snap.items)), key=lambda j: known.get(snap.items[j]["id"], len(known) + j))
    items = [snap.items[j]["id"] for j in perm]
    graph_csr = weights(snap, lm.meta)[:, perm]
    item_rows = {it: j for j, it in enumerate(items)}
    cols = np.array([item_rows[i] for i in snap.edges_i])
    pos = np.asarray(snap.w) > 0
    t = trend(cols[pos], np.asarray(snap.first)[pos], len(items), lm.mcfg.trend_halflife) \
        if lm.mcfg.reads_trend else None
    rows = [u for u in range(len(snap.user_ids))
            if graph_csr[u].nnz and (users is None or snap.user_ids[u] in users)][::every]
    out = []
    for row, u in zip(Scorer(lm.model, graph_csr, trend=t)(rows).numpy().astype(np.float64), rows):
        user = snap.user_ids[u]
        order = [j for j in np.argsort(-row, kind="stable") if items[j] not in own[user]][:k]
        out.append((user, [items[j] for j in order], row[order]))
    return out


def mismatch(got: list[dict], ids: list[str], scores) -> str | None:
    """How a served answer differs from the expected ranking, None if it does not: the same ids in the
    same order, except that items whose expected scores tie may swap (equal to the precision of the
    offline Scorer, which sums in float32) and the last tied run may hold other items of that score,
    and scores that agree to it."""
    scores = np.asarray(scores, dtype=np.float64)
    tie = 16 * np.finfo(np.float32).eps * np.abs(scores).max(initial=0.0)
    served = [r["item_id"] for r in got]
    if len(served) != len(ids):
        return f"{len(served)} items served, {len(ids)} expected: {served} != {ids}"
    if not np.allclose([r["score"] for r in got], scores, rtol=1e-4, atol=1e-3 * abs(scores[0])):
        return f"scores {[r['score'] for r in got]} != {scores.tolist()}"
    start = 0
    for end in range(1, len(ids) + 1):  # each run of tied expected scores holds the same ids
        if end == len(ids) or scores[end - 1] - scores[end] > tie:
            # The last run may be cut by k out of more tied items: any of them may fill it (their
            # scores were checked above).
            if end < len(ids) and sorted(served[start:end]) != sorted(ids[start:end]):
                return f"served {served}, expected {ids} (scores {scores.tolist()})"
            start = end
    return None
