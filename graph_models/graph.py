"""Interaction arrays -> DGL heterograph, and the weighted neighbour aggregation."""
import dgl
import dgl.ops
import numpy as np
import torch

USER, ITEM = "user", "item"
UI, IU = ("user", "ui", "item"), ("item", "iu", "user")
# Which relation feeds each destination node type.
INCOMING = {ITEM: UI, USER: IU}


def build_graph(user_idx, item_idx, weight, num_users, num_items):
    """Bipartite user<->item heterograph with edata 'w' = `weight` (float64) on both directions."""
    u = torch.as_tensor(np.asarray(user_idx), dtype=torch.int64)
    i = torch.as_tensor(np.asarray(item_idx), dtype=torch.int64)
    w = torch.as_tensor(np.asarray(weight, dtype=np.float64))
    g = dgl.heterograph({UI: (u, i), IU: (i, u)}, num_nodes_dict={USER: int(num_users), ITEM: int(num_items)})
    g.edges[UI].data["w"] = w
    g.edges[IU].data["w"] = w.clone()
    return g


def graph_from_csr(csr):
    """Heterograph of a scipy users x items weight matrix."""
    coo = csr.tocoo()
    return build_graph(coo.row, coo.col, coo.data, csr.shape[0], csr.shape[1])


def weighted_sum(g, dst_type, h_src):
    """Return (sum_u w*h_src[u], sum_u w) per destination node of the relation into dst_type."""
    rel = g[INCOMING[dst_type]]
    w = rel.edata["w"].to(h_src.dtype).unsqueeze(-1)
    agg = dgl.ops.u_mul_e_sum(rel, h_src, w)
    deg = dgl.ops.copy_e_sum(rel, w).squeeze(-1)
    return agg, deg
