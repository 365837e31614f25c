"""The learned content map: an item's content features to its rows (x, q) of a version's item table.

An item the version has no row for (added since, or never bought) is embedded by this map, so users
rank it by `p_u . q_hat` and a shopper of such items aggregates `x_hat` into `p_u`, the same GraphSAGE
sum layer as for known items. Trained by gradient descent (Adam) with the loss

    L = mean_u [ -1/|N(u)| sum_{j in N(u)} log softmax_j( s * cos(p_u, q_hat) ) ]  (over the known items)
        + mse_weight * mean_j ( |q_hat_j - q_j|^2 + |x_hat_j - x_j|^2 ) / mean_j |q_j|^2

so the first term ranks an item's shoppers' interests towards it from its content alone (items enter
only through their content, as DropoutNet trains with the collaborative input dropped), and the second
keeps the rows on the scale of the version's own rows, so that a new item competes with known ones.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class ColdConfig:
    """Settings of the content map and its training (chosen on validation items by `choose`)."""

    hidden: int = 256
    dropout: float = 0.1
    lr: float = 3e-3
    weight_decay: float = 1e-5
    mse_weight: float = 0.1
    epochs: int = 60
    batch_users: int = 512
    patience: int = 6
    seed: int = 0
    k: int = 20

    def to_dict(self):
        """Plain JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        """Config from a dict, ignoring unknown keys."""
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class ContentMap(nn.Module):
    """Features -> (x_hat, q_hat): one hidden layer shared by two linear heads."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 256, dropout: float = 0.1):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.to_x = nn.Linear(hidden, out_dim)
        self.to_q = nn.Linear(hidden, out_dim)
        self.log_scale = nn.Parameter(torch.tensor(np.log(10.0)))  # the softmax's inverse temperature

    def forward(self, feats):
        """(x_hat, q_hat) of items' feature rows."""
        h = self.body(feats)
        return self.to_x(h), self.to_q(h)

    @torch.no_grad()
    def rows(self, feats) -> tuple[np.ndarray, np.ndarray]:
        """(x_hat, q_hat) as float64 arrays, in eval mode (deterministic)."""
        was = self.training
        self.eval()
        x, q = self(torch.as_tensor(np.asarray(feats), dtype=self.to_q.weight.dtype))
        self.train(was)
        return x.double().numpy(), q.double().numpy()


def _unit(m: torch.Tensor) -> torch.Tensor:
    return m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)


def recall_among(p, q_cold, truth, exclude=None, k=20):
    """Recall@k and NDCG@k of users `truth` (user row -> set of cold columns) ranking only the cold items
    by p_u . q_cold_j (`exclude`: users x cold CSR never recommended)."""
    from .evaluation import evaluate
    p, q = torch.as_tensor(p, dtype=torch.float32), torch.as_tensor(q_cold, dtype=torch.float32)
    pad = max(0, k - q.shape[0])  # fewer candidates than k: never-chosen columns keep the metric's k

    def scores(u):
        s = p[torch.as_tensor(u)] @ q.T
        return torch.cat([s, torch.full((s.shape[0], pad), -torch.inf)], dim=1) if pad else s
    if pad and exclude is not None:
        exclude = sp.hstack([exclude, sp.csr_matrix((exclude.shape[0], pad))]).tocsr()
    return evaluate(scores, truth, exclude, k)


def train_map(p, x, q, feats, graph, cfg: ColdConfig, val=None, progress=True, writer=None, tag=""):
    """Train a ContentMap on the known items: p users x D (their interests), x and q items x D (the
    version's rows), feats items x F, graph users x items (positive edges); `val` = (p_val, feats of
    validation items, truth user -> set of their columns) picks the best epoch (Recall@k among them).
    Returns (map at its best epoch, history)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    p = _unit(torch.as_tensor(p, dtype=torch.float32))
    x, q = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(q, dtype=torch.float32)
    f = torch.as_tensor(feats, dtype=torch.float32)
    pos = sp.csr_matrix(graph > 0, dtype=np.float32)
    users = np.flatnonzero(np.diff(pos.indptr) > 0)
    scale_q = float((q * q).sum(1).mean()) or 1.0
    scale_x = float((x * x).sum(1).mean()) or 1.0
    net = ContentMap(f.shape[1], q.shape[1], cfg.hidden, cfg.dropout)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history, best, best_state, bad, t0 = [], None, None, 0, time.time()
    for epoch in tqdm(range(1, cfg.epochs + 1), desc=f"content map{tag}", disable=not progress, leave=False):
        net.train()
        total, order = 0.0, rng.permutation(users)
        for s in range(0, len(order), cfg.batch_users):
            batch = order[s:s + cfg.batch_users]
            xh, qh = net(f)
            logits = net.log_scale.exp() * (p[torch.as_tensor(batch)] @ _unit(qh).T)
            target = torch.from_numpy(np.asarray(pos[batch].todense()))
            target = target / target.sum(1, keepdim=True)
            rank_loss = -(target * torch.log_softmax(logits, dim=1)).sum(1).mean()
            mse = ((qh - q) ** 2).sum(1).mean() / scale_q + ((xh - x) ** 2).sum(1).mean() / scale_x
            loss = rank_loss + cfg.mse_weight * mse
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss) * len(batch)
        row = {"epoch": epoch, "loss": total / max(len(users), 1), "rank_loss": float(rank_loss),
               "mse": float(mse), "seconds": time.time() - t0}
        if val is not None:
            _, q_val = net.rows(val[1])
            m = recall_among(val[0], q_val, val[2], k=cfg.k)
            row.update({f"val_recall@{cfg.k}": m[f"recall@{cfg.k}"], f"val_ndcg@{cfg.k}": m[f"ndcg@{cfg.k}"]})
            score = (row[f"val_recall@{cfg.k}"], row[f"val_ndcg@{cfg.k}"])
            if best is None or score > best:
                best, best_state, bad = score, copy.deepcopy(net.state_dict()), 0
            else:
                bad += 1
        history.append(row)
        if writer is not None:
            for name, value in row.items():
                if name != "epoch":
                    writer.add_scalar(f"content_map{tag}/{name}", value, epoch)
        if val is not None and bad >= cfg.patience:
            break
    if best_state is not None:
        net.load_state_dict(best_state)
    return net.eval(), history


def best_epoch(history, k=20) -> int:
    """The epoch with the best validation Recall@k (then NDCG@k)."""
    return max(history, key=lambda r: (r[f"val_recall@{k}"], r[f"val_ndcg@{k}"]))["epoch"]


def hide_items(graph, share, seed=0):
    """(graph without a seeded `share` of the items that have edges, those items' columns, truth user ->
    set of positions in that column list)."""
    g = sp.csr_matrix(graph)
    has = np.flatnonzero(np.asarray((g > 0).sum(axis=0)).ravel() > 0)
    rng = np.random.default_rng(seed)
    hidden = np.sort(rng.choice(has, size=max(1, int(round(len(has) * share))), replace=False))
    keep = np.ones(g.shape[1], dtype=bool)
    keep[hidden] = False
    fit = sp.csr_matrix(g @ sp.diags(keep.astype(g.dtype)))
    fit.eliminate_zeros()
    sub = sp.csr_matrix(g[:, hidden] > 0)
    truth = {}
    # a shopper with no other item has no interests to rank by: nothing to measure
    for u in np.flatnonzero((np.diff(sub.indptr) > 0) & (np.diff(fit.indptr) > 0)):
        truth[int(u)] = set(map(int, sub.indices[sub.indptr[u]:sub.indptr[u + 1]]))
    return fit, hidden, truth


def tables(model, graph):
    """(p, x, q) of a version on `graph`: its users' interests and its item rows, float32 arrays."""
    from .graph import graph_from_csr
    out = model.inference(graph_from_csr(sp.csr_matrix(graph, dtype=np.float64)))
    rows = torch.arange(graph.shape[1])
    with torch.no_grad():
        x, q = model.item_input(rows), model.item_embedding(rows)
    return out["user"].float().numpy(), x.float().numpy(), q.float().numpy()


GRID = ({"mse_weight": 0.03}, {"mse_weight": 0.3}, {"mse_weight": 0.3, "weight_decay": 1e-3})


def choose_and_train(build, model, graph, feats, cfg: ColdConfig | None = None, grid=GRID, share=0.2,
                     progress=True, writer=None):
    """What a version's content map is: hide a seeded `share` of the items that have edges, build the
    version (`build(graph)`) without them, train a map per setting of `grid` on the rest and keep the
    one whose hidden items rank best (Recall@k among them, at its best epoch); then train it again, for
    that many epochs, on `model`, the version built on all of `graph`. Returns (map, report)."""
    cfg = cfg or ColdConfig()
    fit_g, hidden, truth = hide_items(graph, share, cfg.seed + 1)
    p, x, q = tables(build(fit_g), fit_g)
    warm = np.flatnonzero(np.asarray((fit_g > 0).sum(axis=0)).ravel() > 0)
    trials = []
    for n, change in enumerate(grid):
        c = ColdConfig(**{**cfg.to_dict(), **change})
        _, hist = train_map(p, x[warm], q[warm], feats[warm], fit_g[:, warm], c, val=(p, feats[hidden], truth),
                            progress=progress, writer=writer, tag=f"/trial{n}")
        e = best_epoch(hist, c.k)
        trials.append({**change, "epoch": e, **{k: v for k, v in hist[e - 1].items() if k.startswith("val_")}})
    key = (f"val_recall@{cfg.k}", f"val_ndcg@{cfg.k}")
    chosen = max(range(len(trials)), key=lambda t: tuple(trials[t][m] for m in key))
    final = ColdConfig(**{**cfg.to_dict(), **grid[chosen], "epochs": trials[chosen]["epoch"]})
    p, x, q = tables(model, graph)
    warm = np.flatnonzero(np.asarray((graph > 0).sum(axis=0)).ravel() > 0)
    net, hist = train_map(p, x[warm], q[warm], feats[warm], graph[:, warm], final, progress=progress,
                          writer=writer, tag="/final")
    return net, {"trials": trials, "chosen": final.to_dict(), "history": hist,
                        "validation_items": int(len(hidden)), "validation_users": len(truth)}


class ContentPart:
    """What a version keeps of content: the fitted encoder and the trained map, with the map's settings."""

    def __init__(self, encoder, net: ContentMap, cfg: ColdConfig):
        self.encoder, self.net, self.cfg = encoder, net.eval(), cfg

    def features(self, items) -> np.ndarray:
        """Feature rows of item dicts (title, description, attributes, category, price; any may be missing)."""
        from .content import item_text
        texts = [item_text(it.get("title"), it.get("description"), it.get("attributes")) for it in items]
        return self.encoder.transform(texts, [it.get("category") for it in items], [it.get("price") for it in items])

    def rows(self, items) -> tuple[np.ndarray, np.ndarray]:
        """(x_hat, q_hat) of item dicts, float64: their rows of the version's item table."""
        return self.net.rows(self.features(items))

    def to_state(self) -> dict:
        """Tensors and plain values for a checkpoint."""
        return {"encoder": self.encoder.to_state(), "map": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
                "config": self.cfg.to_dict(), "in_dim": int(self.net.body[0].in_features),
                "out_dim": int(self.net.to_q.out_features)}

    @classmethod
    def from_state(cls, state: dict) -> "ContentPart":
        """The part `to_state` saved."""
        from .content import ContentEncoder
        cfg = ColdConfig.from_dict(state["config"])
        net = ContentMap(state["in_dim"], state["out_dim"], cfg.hidden, cfg.dropout)
        net.load_state_dict(state["map"])
        return cls(ContentEncoder.from_state(state["encoder"]), net, cfg)
