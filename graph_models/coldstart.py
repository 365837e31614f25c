"""The learned content map: an item's content features to its rows (x, q) of a version's item table.

An item the version has no row for (added since, or never bought) gets the rows of the known items
its content is like, weighted by a learned attention:

    a_ji = softmax over j's `neighbours` nearest known items i of  tau * cos(A c_j, A c_i)
    q_hat_j = sum_i a_ji q_i,   x_hat_j = sum_i a_ji x_i

and a shopper of such items aggregates `x_hat` into `p_u`, the same GraphSAGE sum layer as for known
items: a GraphSAGE layer over a content-similarity graph from the new item to known ones. Users rank
it by `p_u . q_hat_j` (score "rows") or, by default, by the same attention's mix of their full scores
of those items, `sum_i a_ji s(u, i)` (score "mix": train.Scorer). A (features x features, starting at
the identity) and tau are trained by gradient descent (Adam) on items hidden from a version built
without them (DropoutNet's idea: the collaborative rows of the trained-on items are dropped, so
content alone must carry them) with a softmax loss over the hidden training items H, by rows or by
the mix (s a learned scale, f the version's full scores):

    L = mean_u [ -1/|H(u)| sum_{j in H(u)} log softmax_{j in H}( s * p_u/|p_u| . q_hat_j ) ]
    L = mean_u [ -1/|H(u)| sum_{j in H(u)} log softmax_{j in H}( s * sum_i a_ji f(u, i) / max_i |f(u, i)| ) ]

A and tau act on features, not on a version's rows, so the map trained on the version built without
the hidden items serves the version built on all of them.
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

from .bias import graph_trend


@dataclass
class ColdConfig:
    """Settings of the content map and its training (chosen on validation items by `choose_and_train`)."""

    neighbours: int = 50
    lr: float = 3e-2
    weight_decay: float = 0.0
    epochs: int = 25
    batch_users: int = 1024
    patience: int = 3
    seed: int = 0
    k: int = 20
    # How the version scores an item without a trained row: "mix", the attention mix of the shopper's
    # full scores of the known items it attends to; "rows", p_u . q_hat_j (the low-rank part alone).
    score: str = "mix"
    # What the map is trained to rank by: "rows" (p_u . q_hat_j) or "mix" (the mix of full scores).
    loss: str = "rows"
    sample_users: int = 20_000  # users with hidden items trained and validated on, at most

    def to_dict(self):
        """Plain JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        """Config from a dict, ignoring unknown keys."""
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _unit(m: torch.Tensor) -> torch.Tensor:
    return m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)


class ContentMap(nn.Module):
    """Attention from items' features to known items' features; their rows, mixed, are the new rows."""

    def __init__(self, in_dim: int, neighbours: int = 50):
        super().__init__()
        self.neighbours = neighbours
        self.proj = nn.Parameter(torch.eye(in_dim))
        self.log_tau = nn.Parameter(torch.tensor(float(np.log(10.0))))
        self.log_scale = nn.Parameter(torch.tensor(float(np.log(10.0))))  # of the training softmax only

    def attention(self, feats, known_feats):
        """a: items x known items, each row a softmax over its `neighbours` most alike known items."""
        proj, tau = self.proj.to(feats.dtype), self.log_tau.to(feats.dtype).exp()
        e, k = _unit(feats @ proj), _unit(known_feats @ proj)
        sim = tau * (e @ k.T)
        n = min(self.neighbours, sim.shape[1])
        top = torch.topk(sim.detach(), n, dim=1).indices
        out = torch.zeros_like(sim)
        return out.scatter(1, top, torch.softmax(sim.gather(1, top), dim=1))

    def forward(self, feats, known_feats, x, q):
        """(x_hat, q_hat) of items' feature rows from the known items' features and rows."""
        a = self.attention(feats, known_feats)
        return a @ x, a @ q

    @torch.no_grad()
    def rows(self, feats, known_feats, x, q) -> tuple[np.ndarray, np.ndarray]:
        """(x_hat, q_hat) as float64 arrays."""
        t = lambda m: torch.as_tensor(np.asarray(m), dtype=torch.float64)  # noqa: E731
        a = self.attention(t(feats), t(known_feats))
        return (a @ t(x)).numpy(), (a @ t(q)).numpy()


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


def train_map(p, x, q, known_feats, feats, truth, cfg: ColdConfig, val=None, progress=True, writer=None, tag="",
              full=None):
    """Train a ContentMap: p users x D (interests on a version without the items `feats`), x and q the
    version's rows of its known items (features `known_feats`), `truth` user -> set of positions in
    `feats` (the hidden items the user has); `val` = (features, truth) of other hidden items picks the
    best epoch (Recall@k among them, scored as cfg.score says). `full` = (user rows, their full scores
    of the known items: `full_scores`), every user of `truth` and `val`, is what the mix reads, for
    cfg.loss or cfg.score "mix". Returns (map at its best epoch, history)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    pu = _unit(torch.as_tensor(p, dtype=torch.float32))
    if full is not None:  # (user rows, their scores), each over its largest: one scale fits every user
        at = np.full(len(p), -1, dtype=np.int64)
        at[full[0]] = np.arange(len(full[0]))
        full = torch.as_tensor(full[1], dtype=torch.float32)
        full = full / full.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    x, q = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(q, dtype=torch.float32)
    kf, f = torch.as_tensor(known_feats, dtype=torch.float32), torch.as_tensor(feats, dtype=torch.float32)
    users = np.array(sorted(truth), dtype=np.int64)
    target = np.zeros((len(users), f.shape[0]), dtype=np.float32)
    for r, u in enumerate(users):
        target[r, list(truth[int(u)])] = 1.0
    target = torch.from_numpy(target / target.sum(1, keepdims=True))
    net = ContentMap(f.shape[1], cfg.neighbours)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history, best, best_state, bad, t0 = [], None, None, 0, time.time()

    def validate(row):
        if val is None:
            return
        if cfg.score == "mix" and full is not None:
            with torch.no_grad():
                a = net.attention(torch.as_tensor(val[0], dtype=torch.float64), kf.double()).float()
            m = recall_among(full, a, {int(at[u]): t for u, t in val[1].items()}, k=cfg.k)
        else:
            _, q_val = net.rows(val[0], kf, x, q)
            m = recall_among(p, q_val, val[1], k=cfg.k)
        row.update({f"val_recall@{cfg.k}": m[f"recall@{cfg.k}"], f"val_ndcg@{cfg.k}": m[f"ndcg@{cfg.k}"]})

    first = {"epoch": 0, "loss": float("nan"), "seconds": 0.0}
    validate(first)
    history.append(first)
    if val is not None:
        best, best_state = (first[f"val_recall@{cfg.k}"], first[f"val_ndcg@{cfg.k}"]), copy.deepcopy(net.state_dict())
    for epoch in tqdm(range(1, cfg.epochs + 1), desc=f"content map{tag}", disable=not progress, leave=False):
        total, order = 0.0, rng.permutation(len(users))
        for s in range(0, len(order), cfg.batch_users):
            rows = torch.as_tensor(order[s:s + cfg.batch_users])
            who = torch.as_tensor(users)[rows]
            if cfg.loss == "mix":
                logits = net.log_scale.exp() * (full[torch.as_tensor(at[who.numpy()])] @ net.attention(f, kf).T)
            else:
                _, qh = net(f, kf, x, q)
                logits = net.log_scale.exp() * (pu[who] @ _unit(qh).T)
            loss = -(target[rows] * torch.log_softmax(logits, dim=1)).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss) * len(rows)
        row = {"epoch": epoch, "loss": total / max(len(users), 1), "tau": float(net.log_tau.exp()),
               "seconds": time.time() - t0}
        validate(row)
        if val is not None:
            score = (row[f"val_recall@{cfg.k}"], row[f"val_ndcg@{cfg.k}"])
            if score > best:
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


def attention_matrix(net, feats, known_feats, known_cols, width: int) -> sp.csr_matrix:
    """The attention of items with feature rows `feats` over known items (features `known_feats`, at
    columns `known_cols` of a `width`-column table), as a CSR matrix (float64, each row summing to 1)."""
    with torch.no_grad():
        a = net.attention(torch.as_tensor(np.asarray(feats), dtype=torch.float64),
                          torch.as_tensor(np.asarray(known_feats), dtype=torch.float64)).numpy()
    a = sp.csr_matrix(a)
    cols = np.asarray(known_cols, dtype=np.int64)
    return sp.csr_matrix((a.data, cols[a.indices], a.indptr), shape=(a.shape[0], width))


def mix_validation(build, fit_g, net, feats_known, feats_val, known, val_cols, truth, k=20, item_trend=None):
    """Recall@k and NDCG@k among the validation items (columns `val_cols` of fit_g, `truth` user ->
    positions in them) when the version built on `fit_g` (`build(fit_g)`) scores them by the attention
    mix of the shopper's full scores (train.Scorer with a mixing content part, as served)."""
    from .evaluation import evaluate
    from .train import Scorer
    model = build(fit_g)
    a = attention_matrix(net, feats_val, feats_known, known, fit_g.shape[1])
    rows = np.arange(model.num_items + 1)
    with torch.no_grad():
        x, q = model.item_input(torch.as_tensor(rows)).numpy(), model.item_embedding(torch.as_tensor(rows)).numpy()
    content = (np.asarray(val_cols), a @ x[:fit_g.shape[1]], a @ q[:fit_g.shape[1]], a)
    scorer, cols = Scorer(model, fit_g, content=content, trend=item_trend), torch.as_tensor(np.asarray(val_cols))
    return evaluate(lambda users: scorer(users)[:, cols], truth, None, k)


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


def full_scores(model, graph, known, users, batch: int = 1024, item_trend=None) -> np.ndarray:
    """The full scores (train.Scorer, every item scored; `item_trend` that of `graph` when the model reads
    one) of user rows `users` for the `known` items, float32: what the mix reads."""
    from .train import Scorer
    scorer = Scorer(model, graph, candidates=False, trend=item_trend)
    out = [np.zeros((0, len(known)), dtype=np.float32)]
    with torch.no_grad():
        for start in range(0, len(users), batch):
            out.append(scorer(users[start:start + batch])[:, known].numpy().astype(np.float32))
    return np.vstack(out)


def tables(model, graph):
    """(p, x, q) of a version on `graph`: its users' interests and its item rows, float32 arrays."""
    from .graph import graph_from_csr
    out = model.inference(graph_from_csr(sp.csr_matrix(graph, dtype=np.float64)))
    rows = torch.arange(graph.shape[1])
    with torch.no_grad():
        x, q = model.item_input(rows), model.item_embedding(rows)
    return out["user"].float().numpy(), x.float().numpy(), q.float().numpy()


# Tried on the validation items: trained to rank by rows or by the mix; one K keeps `train` within minutes.
GRID = ({"neighbours": 50, "loss": "rows"}, {"neighbours": 50, "loss": "mix"})


def _positions(truth, cols):
    """truth restricted to `cols` (positions into the hidden list), renumbered 0..len(cols)-1."""
    pos = {int(c): n for n, c in enumerate(cols)}
    out = {u: {pos[i] for i in t if i in pos} for u, t in truth.items()}
    return {u: t for u, t in out.items() if t}


def choose_and_train(build, graph, feats, cfg: ColdConfig | None = None, grid=GRID, share=0.2, progress=True,
                     writer=None, mix_check=False, first=None):
    """A version's content map: hide a seeded `share` of the items that have edges, build the version
    without them (`build(graph)`), train a map per setting of `grid` on half of the hidden items and keep
    the one under which the other half ranks best (Recall@k among them, at its best epoch; epoch 0 is the
    untrained attention, A = I). The map acts on features, so it serves the version built on the whole
    graph as it is; `first` (the edges' first times) gives the trend a version may read. Returns (map, report)."""
    cfg = cfg or ColdConfig()
    fit_g, hidden, truth = hide_items(graph, share, cfg.seed + 1)
    version = build(fit_g)
    fit_trend = graph_trend(version.cfg, fit_g, first)  # of the fit graph alone: the hidden items' own is unseen
    p, x, q = tables(version, fit_g)
    known = np.flatnonzero(np.asarray((fit_g > 0).sum(axis=0)).ravel() > 0)
    if len(truth) > cfg.sample_users:  # the mix keeps users x known items of scores: a bounded sample
        keep = np.random.default_rng(cfg.seed).choice(sorted(truth), cfg.sample_users, replace=False)
        truth = {int(u): truth[int(u)] for u in keep}
    uses_mix = cfg.score == "mix" or any(c.get("loss") == "mix" for c in grid)
    who = np.array(sorted(truth), dtype=np.int64)
    full = (who, full_scores(version, fit_g, known, who, item_trend=fit_trend)) if uses_mix else None
    half = np.random.default_rng(cfg.seed).permutation(len(hidden))
    on, off = np.sort(half[: len(half) // 2]), np.sort(half[len(half) // 2:])
    truth_on, truth_off = _positions(truth, on), _positions(truth, off)
    trials, nets = [], []
    for n, change in enumerate(grid):
        c = ColdConfig(**{**cfg.to_dict(), **change})
        net, hist = train_map(p, x[known], q[known], feats[known], feats[hidden[on]], truth_on, c,
                              val=(feats[hidden[off]], truth_off), progress=progress, writer=writer, tag=f"/trial{n}",
                              full=full)
        key = (f"val_recall@{c.k}", f"val_ndcg@{c.k}")
        best = max(hist, key=lambda r: tuple(r[m] for m in key))
        trials.append({**change, "epoch": best["epoch"], **{m: best[m] for m in key},
                       "untrained": {m: hist[0][m] for m in key}})
        nets.append((net, c, hist))
    key = (f"val_recall@{cfg.k}", f"val_ndcg@{cfg.k}")
    chosen = max(range(len(trials)), key=lambda t: tuple(trials[t][m] for m in key))
    net, c, hist = nets[chosen]
    # the validation items scored as served (train.Scorer's mix) under this map and the untrained one
    mix = {}
    if mix_check:
        for name, m in (("trained", net), ("untrained", ContentMap(feats.shape[1], c.neighbours))):
            r = mix_validation(build, fit_g, m, feats[known], feats[hidden[off]], known, hidden[off], truth_off, c.k,
                               item_trend=fit_trend)
            mix[name] = {f"val_recall@{c.k}": r[f"recall@{c.k}"], f"val_ndcg@{c.k}": r[f"ndcg@{c.k}"]}
    return net, {"trials": trials, "chosen": c.to_dict(), "epoch": trials[chosen]["epoch"], "history": hist,
                 "mix": mix, "validation_items": int(len(hidden)), "train_users": len(truth_on),
                 "validation_users": len(truth_off)}


class ContentPart:
    """What a version keeps of content: the fitted encoder, the trained map with its settings, and the
    feature rows of the version's known items (rows `known` of its table) the map attends to."""

    def __init__(self, encoder, net: ContentMap, cfg: ColdConfig, known: np.ndarray, known_feats: np.ndarray):
        self.encoder, self.net, self.cfg = encoder, net.eval(), cfg
        self.known, self.known_feats = np.asarray(known, dtype=np.int64), np.asarray(known_feats, dtype=np.float32)

    def features(self, items) -> np.ndarray:
        """Feature rows of item dicts (title, description, attributes, category, price; any may be missing)."""
        from .content import item_text
        texts = [item_text(it.get("title"), it.get("description"), it.get("attributes")) for it in items]
        return self.encoder.transform(texts, [it.get("category") for it in items], [it.get("price") for it in items])

    @property
    def mixes(self) -> bool:
        """Whether the version scores items without a trained row by the mix of full scores (else by rows)."""
        return self.cfg.score == "mix"

    def attention(self, items, width: int, batch: int = 1024) -> sp.csr_matrix:
        """Each item dict's attention over the version's known rows, as a CSR matrix over its `width` table
        rows; in batches, so that the attention over known items stays small however many items come."""
        parts = [sp.csr_matrix((0, width))]
        for start in range(0, len(items), batch):
            parts.append(attention_matrix(self.net, self.features(items[start:start + batch]), self.known_feats,
                                          self.known, width))
        return sp.csr_matrix(sp.vstack(parts))

    def rows(self, items, x, q) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
        """(x_hat, q_hat, a) of item dicts: their rows (float64) mixed from the version's table (x, q: all
        its rows) by their attention `a` over those rows."""
        a = self.attention(items, x.shape[0])
        return np.asarray(a @ x), np.asarray(a @ q), a

    def to_state(self) -> dict:
        """Tensors and plain values for a checkpoint."""
        net = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
        return {"encoder": self.encoder.to_state(), "map": net,
                "config": self.cfg.to_dict(), "in_dim": int(self.net.proj.shape[0]),
                "known": torch.from_numpy(self.known), "known_feats": torch.from_numpy(self.known_feats)}

    @classmethod
    def from_state(cls, state: dict) -> "ContentPart":
        """The part `to_state` saved."""
        from .content import ContentEncoder
        # a version saved before the mix scored such items by their rows
        cfg = ColdConfig.from_dict({"score": "rows", **state["config"]})
        net = ContentMap(state["in_dim"], cfg.neighbours)
        net.load_state_dict(state["map"])
        return cls(ContentEncoder.from_state(state["encoder"]), net, cfg, np.asarray(state["known"]),
                   np.asarray(state["known_feats"]))


MIN_DESCRIBED = 50  # items with text below which a version gets no content part: too little to learn from


def describe(items, seed: int = 0):
    """(the ContentEncoder fitted on item dicts' metadata, their feature rows), or (None, the reason)
    when fewer than MIN_DESCRIBED items have any text."""
    from .content import ContentEncoder, item_text
    texts = [item_text(it.get("title"), it.get("description"), it.get("attributes")) for it in items]
    described = sum(bool(t) for t in texts)
    if described < MIN_DESCRIBED:
        return None, f"{described} items with text (fewer than {MIN_DESCRIBED})"
    encoder = ContentEncoder.fit(texts, [it.get("category") for it in items], [it.get("price") for it in items],
                                 seed=seed)
    return encoder, encoder.transform(texts, [it.get("category") for it in items], [it.get("price") for it in items])


def fit_content(build, graph, items, cfg: ColdConfig | None = None, progress=True, writer=None, grid=GRID,
                train: bool = True, first=None, described=None):
    """A version's ContentPart from its items' metadata (dicts in graph column order) and its graph,
    `build(graph)` making the version from a graph; (None, reason) when fewer than MIN_DESCRIBED items
    have any text (`described`: `describe(items)` if already made). Without `train`, the map stays
    untrained (A = I, tau = 10): content-kNN, each new item the softmax mix of the rows of its K most
    alike known items. Returns (part, report)."""
    cfg = cfg or ColdConfig()
    encoder, feats = described or describe(items, cfg.seed)
    if encoder is None:
        return None, {"skipped": feats}
    if train:
        net, report = choose_and_train(build, graph, feats, cfg, grid, progress=progress, writer=writer, first=first)
    else:
        net, report = ContentMap(encoder.dim, cfg.neighbours), {"map": "content-kNN", "chosen": cfg.to_dict()}
    known = np.flatnonzero(np.asarray((graph > 0).sum(axis=0)).ravel() > 0)
    return ContentPart(encoder, net, ColdConfig.from_dict(report["chosen"]), known, feats[known]), report
