"""InterestSAGE: a one-layer GraphSAGE over spectral item features, next to a linear graph filter."""
import torch
from torch import nn

from .config import ModelConfig
from .graph import USER, weighted_sum
from .spectral import inv_sqrt

__all__ = ["InterestSAGE", "ModelConfig"]


class InterestSAGE(nn.Module):
    """Users aggregate their items' inputs (no per-user parameters); items are fixed spectral vectors.

    The score of user u for item j is `p_u . q_j + c lin(u, j) [+ e ease(u, j)]`:
    - `p_u = sum_i w_ui x_i`, a GraphSAGE layer with a sum aggregator over the items u touched;
    - `x_i` and `q_j` are the item's rows of the top singular vectors V of the version's normalised
      graph in two blocks: a degree-normalised one (x = d^-1/2 V h(s), q = d^1/2 V) and a raw one
      (x = V g(s), q = V), where s are the squared singular values and h, g learned polynomials;
    - `lin` is the linear graph filter of `spectral.LinearFilter`, computed from the live graph, with
      weight c = cfg.lin_weight;
    - `ease` (with cfg.ease_weight = e > 0) is EASE's closed form fitted on the version's graph (and,
      with cfg.ease_content > 0, on its items' content too), read through the shopper's binary row of
      live edges.
    The settings (sizes, weights, exponents) are chosen per data set by `graph_models.search`.
    With item biases on (`biased`), the ranking is `s_u / max |s_u| + b_j` (`bias.with_bias`).
    Initialised at h = alpha, g = 0, the score is GF-CF (Shen et al., CIKM 2021) truncated to `dim`.
    """

    def __init__(self, basis, s2, item_deg, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("basis", torch.as_tensor(basis, dtype=torch.float64))
        self.register_buffer("s2", torch.as_tensor(s2, dtype=torch.float64))
        deg = torch.as_tensor(item_deg, dtype=torch.float64)
        self.register_buffer("in_scale", torch.as_tensor(inv_sqrt(deg.numpy())))
        self.register_buffer("out_scale", torch.sqrt(torch.clamp(deg, min=0)))
        self.sharp_dim = min(cfg.sharp_dim, self.basis.shape[1])
        low = torch.zeros(cfg.degree + 1, dtype=torch.float64)
        low[0] = cfg.alpha
        self.low = nn.Parameter(low)
        sharp = torch.zeros(cfg.degree + 1, dtype=torch.float64)
        sharp[0] = getattr(cfg, "sharp_alpha", 0.0)
        self.sharp = nn.Parameter(sharp)
        self.register_buffer("bias", torch.zeros(self.basis.shape[0], dtype=torch.float64))
        # EASE's item x item matrix over the version's rows (graph_models.ease), empty when the score has none.
        self.register_buffer("ease", torch.zeros(0, 0, dtype=torch.float32))
        # The version's content encoder and learned map (coldstart.ContentPart), None for a version without.
        self.content = None

    @property
    def num_items(self) -> int:
        """Items of the version (rows of the basis)."""
        return self.basis.shape[0]

    @property
    def out_dim(self) -> int:
        """Length of user and item embeddings."""
        return self.basis.shape[1] + self.sharp_dim

    @property
    def biased(self) -> bool:
        """Whether scores are normalised per user and item biases added (`graph_models.bias`)."""
        return getattr(self.cfg, "bias_temperature", 0.0) > 0

    @property
    def eased(self) -> bool:
        """Whether the score adds `ease_weight` x EASE's scores (binary row times the version's matrix)."""
        return getattr(self.cfg, "ease_weight", 0.0) > 0 and self.ease.numel() > 0

    @staticmethod
    def response(coef, s):
        """Polynomial sum_p coef[p] s^p, elementwise."""
        return sum(c * s ** p for p, c in enumerate(coef))

    def _rows(self, rows):
        """Basis rows of item `rows`, zero for -1 or rows outside the version (items new since)."""
        rows = torch.as_tensor(rows, dtype=torch.int64)
        ok = (rows >= 0) & (rows < self.num_items)
        safe = torch.where(ok, rows, torch.zeros_like(rows))
        return safe, ok.to(self.basis.dtype).unsqueeze(-1)

    def item_input(self, rows):
        """x_i: what one unit of a user's weight on item i adds to the user's embedding."""
        safe, ok = self._rows(rows)
        v = self.basis[safe] * ok
        low = v * self.in_scale[safe].unsqueeze(-1) * self.response(self.low, self.s2)
        sharp = v[:, :self.sharp_dim] * self.response(self.sharp, self.s2[:self.sharp_dim])
        return torch.cat([low, sharp], dim=1)

    def item_embedding(self, rows):
        """q_j: the item's embedding (fixed for the version)."""
        safe, ok = self._rows(rows)
        v = self.basis[safe] * ok
        return torch.cat([v * self.out_scale[safe].unsqueeze(-1), v[:, :self.sharp_dim]], dim=1)

    def user_embedding(self, g, item_rows=None):
        """p_u for every user of graph `g`: the weighted sum of their items' inputs (DGL)."""
        n = g.num_nodes("item")
        rows = torch.arange(n) if item_rows is None else torch.as_tensor(item_rows, dtype=torch.int64)
        agg, _ = weighted_sum(g, USER, self.item_input(rows))
        return agg

    @torch.no_grad()
    def inference(self, g, item_rows=None):
        """User and item embeddings of graph `g` (item node k is version row item_rows[k])."""
        n = g.num_nodes("item")
        rows = torch.arange(n) if item_rows is None else torch.as_tensor(item_rows, dtype=torch.int64)
        return {"user": self.user_embedding(g, rows), "item": self.item_embedding(rows)}
