"""Names and packing of the per-node refresh state stored next to each embedding.

For an L-layer model a node keeps its layer inputs h_0..h_{L-1} (h_0 only for items: users share
one learned input), its neighbour sums a_1..a_L and its weight sum deg. With these, a change is
applied as deltas to the sums instead of re-reading whole neighbourhoods.
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


def node_props(out: dict, ntype: str, ids: list[str], layers: int) -> list[dict]:
    """Rows `{id, props}` from a full inference result, for the write-back."""
    cols = {h_key(l): out["h"][l][ntype].numpy().tolist() for l in range(first_h(ntype), layers)}
    cols.update({a_key(l): out["agg"][l][ntype].numpy().tolist() for l in range(1, layers + 1)})
    cols[DEG] = np.asarray(out["deg"][ntype].numpy(), dtype=np.float64).tolist()
    cols["embedding"] = out["emb"][ntype].numpy().tolist()
    return [{"id": node_id, "props": {k: v[n] for k, v in cols.items()}} for n, node_id in enumerate(ids)]
