"""Names and packing of the per-node refresh state stored next to each embedding.

For an L-layer model a node keeps its layer inputs h_0..h_{L-1} (h_0 only for items: users share
one learned input), its neighbour sums a_1..a_L (items no a_1 when L > 1: it is deg times that
shared input) and its weight sum deg. With these, a change is
applied as deltas to the sums instead of re-reading whole neighbourhoods.

Vectors of the state are stored as little-endian float64 bytes, not as float lists: Neo4j reads a
byte array 2-3x and writes it 5x faster than the same floats as a list (measured on 3,000 nodes with
four 64-d vectors each), and nobody queries them. Only `embedding` (indexed) stays a float list.
"""
from __future__ import annotations

import numpy as np

USER, ITEM = "user", "item"


def h_key(layer: int) -> str:
    """Property holding the node's layer-`layer` vector."""
    return f"ig_h{layer}"


def a_key(layer: int) -> str:
    """Property holding the node's weighted neighbour sum at layer `layer`."""
    return f"ig_a{layer}"


DEG = "ig_deg"


def first_h(ntype: str) -> int:
    """Lowest stored h layer: users' h_0 is the shared model input, not stored."""
    return 0 if ntype == ITEM else 1


def pack(vec) -> bytes:
    """A state vector as stored: float64 bytes."""
    return np.asarray(vec, dtype="<f8").tobytes()


def unpack(raw) -> np.ndarray | None:
    """A stored state vector as a writable float64 array (None if unset; float lists of earlier versions too)."""
    if raw is None:
        return None
    return (np.frombuffer(raw, dtype="<f8").copy() if isinstance(raw, (bytes, bytearray))
            else np.asarray(raw, dtype=np.float64))


def node_props(out: dict, ntype: str, ids: list[str], layers: int) -> list[dict]:
    """Rows `{id, props}` from a full inference result, for the write-back."""
    cols = {h_key(l): [pack(v) for v in out["h"][l][ntype].numpy()] for l in range(first_h(ntype), layers)}
    # Items keep no layer-1 sum in a deeper model: it is always deg * (the users' shared input).
    first_a = 2 if ntype == ITEM and layers > 1 else 1
    cols.update({a_key(l): [pack(v) for v in out["agg"][l][ntype].numpy()] for l in range(first_a, layers + 1)})
    cols[DEG] = np.asarray(out["deg"][ntype].numpy(), dtype=np.float64).tolist()
    cols["embedding"] = out["emb"][ntype].numpy().tolist()
    return [{"id": node_id, "props": {k: v[n] for k, v in cols.items()}} for n, node_id in enumerate(ids)]
