"""Interaction arrays -> DGL heterograph, and the weighted neighbour aggregation."""
import dgl
import dgl.ops
import numpy as np
import torch

USER, ITEM = "user", "item"
UI, IU = ("user", "ui", "item"), ("item", "iu", "user")
# Which relation feeds each destination node type.
INCOMING = {ITEM: UI, USER: IU}


def agg_weight(w):
    """Aggregation weight log1p(max(w, 0)) of raw edge weights; keeps numpy/torch type."""
    if isinstance(w, torch.Tensor):
        return torch.log1p(torch.clamp(w, min=0))
    return np.log1p(np.maximum(np.asarray(w, dtype=np.float64), 0.0))


def build_graph(user_idx, item_idx, weight, num_users, num_items):
    """Bipartite user<->item heterograph with edata 'w' = agg_weight(weight) on both directions."""
    u = torch.as_tensor(np.asarray(user_idx), dtype=torch.int64)
    i = torch.as_tensor(np.asarray(item_idx), dtype=torch.int64)
    w = torch.as_tensor(np.asarray(agg_weight(np.asarray(weight))), dtype=torch.float32)
    g = dgl.heterograph(
        {UI: (u, i), IU: (i, u)},
        num_nodes_dict={USER: int(num_users), ITEM: int(num_items)},
    )
    # Edge k of 'ui' and edge k of 'iu' are the same interaction: training relies on
    # this to exclude a target edge in both directions by one id.
    g.edges[UI].data["w"] = w
    g.edges[IU].data["w"] = w.clone()
    return g


def graph_from_csr(csr, weight=None):
    """Heterograph from a scipy users x items matrix (weights from its data unless given)."""
    coo = csr.tocoo()
    w = coo.data if weight is None else weight
    return build_graph(coo.row, coo.col, w, csr.shape[0], csr.shape[1])


def weighted_sum(g, dst_type, h_src):
    """Return (sum_u w*h_src[u], sum_u w) per destination node of the relation into dst_type.

    Works on full heterographs and on sampled blocks alike, so training and
    inference aggregate identically.
    """
    rel = g[INCOMING[dst_type]]
    w = rel.edata["w"].to(h_src.dtype).unsqueeze(-1)
    agg = dgl.ops.u_mul_e_sum(rel, h_src, w)
    deg = dgl.ops.copy_e_sum(rel, w).squeeze(-1)
    return agg, deg


def normalise_mean(agg, deg):
    """Weighted mean agg/deg, defined as 0 where the weight sum is 0."""
    safe = torch.where(deg > 0, deg, torch.ones_like(deg))
    return torch.where((deg > 0).unsqueeze(-1), agg / safe.unsqueeze(-1), torch.zeros_like(agg))


def graph_to_csr(g):
    """Users x items scipy CSR of the 'ui' edges (value 1), e.g. the items to exclude."""
    import scipy.sparse as sp

    u, i = g.edges(etype=UI)
    data = np.ones(len(u), dtype=np.float32)
    shape = (g.num_nodes(USER), g.num_nodes(ITEM))
    return sp.csr_matrix((data, (u.numpy(), i.numpy())), shape=shape)
