"""What a node stores next to its embedding, as written by both the full and the incremental refresh.

Serving ranks by inner product (`p_u . q_j`) but Neo4j's vector index ranks by cosine, so vectors are
stored in the standard reduction of inner-product search to cosine search (Bachrach et al., RecSys 2014):
- an item stores `[q_j, sqrt(M^2 - |q_j|^2)] / M`, M the largest item norm of the version: every item
  vector has length 1, so cosine with a query is the inner product with it, divided by M;
- a user stores `[p_u, 0] / |p_u|` and `ig_norm = |p_u|`, so `p_u . q_j = cos * ig_norm * M`, and
  the index's cosine order is exactly the inner-product order.
Items also store `ig_x = [x_i, 0] / |x_i|` and `ig_xnorm` (what item i adds to a user who has it), for
"similar items". `ig_deg` is the node's sum of positive raw edge weights, which the graph filter reads.
"""
from __future__ import annotations

import numpy as np

USER, ITEM = "user", "item"


def unit_rows(vectors: np.ndarray) -> tuple[list, np.ndarray]:
    """Rows as `[v, 0] / |v|` lists (None for a zero row) and their norms."""
    v = np.asarray(vectors, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", v, v)) if len(v) else np.zeros(0)
    out = []
    for row, n in zip(v, norms):
        out.append(None if n == 0 else (np.append(row, 0.0) / n).tolist())
    return out, norms


def item_vectors(q: np.ndarray, m: float) -> list[list[float]]:
    """Items' stored embeddings `[q, sqrt(M^2 - |q|^2)] / M` (unit length)."""
    q = np.asarray(q, dtype=np.float64)
    sq = np.einsum("ij,ij->i", q, q) if len(q) else np.zeros(0)
    extra = np.sqrt(np.maximum(m * m - sq, 0.0))
    return (np.hstack([q, extra[:, None]]) / m).tolist() if len(q) else []


def user_props(p: np.ndarray, deg: np.ndarray) -> list[dict]:
    """Stored properties of users from their embeddings p_u and degrees."""
    vecs, norms = unit_rows(p)
    return [{"embedding": v, "ig_norm": float(n), "ig_deg": float(d)} for v, n, d in zip(vecs, norms, deg)]


def item_props(q: np.ndarray, x: np.ndarray, m: float, deg: np.ndarray | None) -> list[dict]:
    """Stored properties of items from q_j, x_i, the version's M and (if known here) degrees."""
    xs, xnorms = unit_rows(x)
    rows = [{"embedding": e, "ig_x": xv, "ig_xnorm": float(xn)}
            for e, xv, xn in zip(item_vectors(q, m), xs, xnorms)]
    if deg is not None:
        for row, d in zip(rows, deg):
            row["ig_deg"] = float(d)
    return rows
