"""InterestSAGE: an inductive weighted-mean GraphSAGE over the user-item graph."""
import dgl
import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .features import select_features, token_bag
from .graph import ITEM, USER, normalise_mean, weighted_sum

__all__ = ["InterestSAGE", "ModelConfig"]
OTHER = {USER: ITEM, ITEM: USER}


class InterestSAGE(nn.Module):
    """GraphSAGE with learned item inputs and no per-user parameters."""

    def __init__(self, num_items: int, cfg: ModelConfig):
        super().__init__()
        # Initialise from cfg.seed without disturbing the caller's global RNG,
        # so the same config always yields the same starting weights.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self._build(num_items, cfg)

    def _build(self, num_items, cfg):
        self.num_items, self.cfg, d = int(num_items), cfg, cfg.dim
        # Row 0 is the "unseen item" vector, kept at zero by padding_idx.
        self.item_id = nn.Embedding(self.num_items + 1, d, padding_idx=0)
        nn.init.normal_(self.item_id.weight, std=0.1)
        with torch.no_grad():
            self.item_id.weight[0].zero_()
        self.category = nn.Embedding(cfg.category_buckets + 1, d, padding_idx=0)
        self.tokens = nn.EmbeddingBag(cfg.token_buckets, d, mode="mean")
        self.price = nn.Linear(1, d)
        nn.init.normal_(self.category.weight, std=0.01)
        nn.init.normal_(self.tokens.weight, std=0.01)
        # Users are represented by their neighbourhood, so a single shared input.
        self.user_vec = nn.Parameter(torch.zeros(1, d))
        self.self_lin = nn.ModuleList()
        self.neigh_lin = nn.ModuleList()
        for _ in range(cfg.layers):
            self.self_lin.append(nn.ModuleDict({t: nn.Linear(d, d) for t in (USER, ITEM)}))
            self.neigh_lin.append(
                nn.ModuleDict({t: nn.Linear(d, d, bias=False) for t in (USER, ITEM)}))
        self.drop = nn.Dropout(cfg.dropout)

    @property
    def dtype(self):
        """Floating dtype of the parameters (float64 after .double())."""
        return self.item_id.weight.dtype

    def item_input(self, item_rows, category=None, price=None, tokens=None):
        """Layer-0 item vectors: id embedding (zero for row -1) plus content features."""
        rows = torch.as_tensor(item_rows, dtype=torch.int64)
        rows = torch.where((rows >= 0) & (rows < self.num_items), rows, torch.full_like(rows, -1))
        h = self.item_id(rows + 1)
        if not self.cfg.use_features:
            return h
        if category is not None:
            cat = torch.as_tensor(category, dtype=torch.int64)
            cat = torch.where(cat >= 0, cat % self.cfg.category_buckets + 1, torch.zeros_like(cat))
            h = h + self.category(cat)
        if price is not None:
            p = torch.nan_to_num(torch.as_tensor(price, dtype=h.dtype), nan=0.0)
            h = h + self.price(torch.log1p(torch.clamp(p, min=0)).unsqueeze(-1))
        if tokens is not None:
            flat, offsets = token_bag(tokens)
            h = h + self.tokens(flat % self.cfg.token_buckets, offsets)
        return h

    def user_input(self, n):
        """Layer-0 user vectors: one shared learned vector repeated n times."""
        return self.user_vec.expand(int(n), -1)

    def combine(self, layer, ntype, h_self, m):
        """Layer `layer` (1..L) output of `ntype` nodes from own and neighbour-mean vectors."""
        h = self.self_lin[layer - 1][ntype](h_self) + self.neigh_lin[layer - 1][ntype](m)
        return F.leaky_relu(h, 0.2) if layer < self.cfg.layers else h

    def final(self, h):
        """Output embedding: L2-normalised, so serving by cosine equals the training score."""
        return F.normalize(h, dim=-1)

    def forward(self, blocks, item_feats=None, rows=None):
        """Embeddings of the seed nodes of sampled `blocks` (dict ntype -> tensor)."""
        src_items = blocks[0].srcnodes[ITEM].data[dgl.NID]
        item_rows = src_items if rows is None else torch.as_tensor(rows)[src_items]
        h = {
            USER: self.user_input(blocks[0].num_src_nodes(USER)),
            ITEM: self.item_input(item_rows, **select_features(item_feats, src_items)),
        }
        for layer, block in enumerate(blocks, 1):
            new = {}
            for t in (USER, ITEM):
                agg, deg = weighted_sum(block, t, self.drop(h[OTHER[t]]))
                n_dst = block.num_dst_nodes(t)
                new[t] = self.combine(layer, t, h[t][:n_dst], normalise_mean(agg, deg))
            h = new
        return {t: self.final(v) for t, v in h.items()}

    @torch.no_grad()
    def inference(self, g, item_feats=None, batch_size=65536):
        """Layer-wise full-neighbourhood embeddings with every intermediate the service stores."""
        feats = dict(item_feats or {})
        n_items = g.num_nodes(ITEM)
        rows = feats.pop("rows", None)
        rows = torch.arange(n_items) if rows is None else torch.as_tensor(rows, dtype=torch.int64)
        chunks = []
        for s in range(0, n_items, batch_size):
            idx = torch.arange(s, min(s + batch_size, n_items))
            chunks.append(self.item_input(rows[idx], **select_features(feats, idx)))
        empty = torch.zeros(0, self.cfg.dim, dtype=self.dtype)
        h0 = {USER: self.user_input(g.num_nodes(USER)).clone(),
              ITEM: torch.cat(chunks) if chunks else empty}
        hs, aggs, deg = [h0], [None], {}
        for layer in range(1, self.cfg.layers + 1):
            h_new, agg_l = {}, {}
            for t in (USER, ITEM):
                agg, deg[t] = weighted_sum(g, t, hs[-1][OTHER[t]])
                m = normalise_mean(agg, deg[t])
                # Row-wise combine in chunks keeps peak memory flat on large graphs.
                h_new[t] = torch.cat([
                    self.combine(layer, t, hs[-1][t][s:s + batch_size], m[s:s + batch_size])
                    for s in range(0, max(m.shape[0], 1), batch_size)
                ])[: m.shape[0]]
                agg_l[t] = agg
            hs.append(h_new)
            aggs.append(agg_l)
        emb = {t: self.final(hs[-1][t]) for t in (USER, ITEM)}
        return {"h": hs, "agg": aggs, "deg": deg, "emb": emb}
