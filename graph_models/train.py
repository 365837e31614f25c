"""Training InterestSAGE: learn the spectral responses on hidden items, with a softmax over all items."""
import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .baselines import popularity_scorer
from .evaluation import evaluate
from .model import InterestSAGE
from .spectral import degrees, item_basis, linear_filter, normalised
from .split import holdout


def build(graph_csr, cfg, like=None):
    """A model whose basis comes from `graph_csr`; learned responses copied from `like` if given."""
    basis, s2 = item_basis(graph_csr, cfg.dim, cfg.seed, cfg.svd_iters)
    if basis.shape[1] < cfg.dim:  # a small graph: zero columns keep the embedding size fixed
        pad = cfg.dim - basis.shape[1]
        basis, s2 = np.pad(basis, ((0, 0), (0, pad))), np.pad(s2, (0, pad))
    model = InterestSAGE(basis, s2, degrees(graph_csr)[1], cfg)
    if like is not None:
        model.load_state_dict({k: v for k, v in like.state_dict().items()
                               if k in ("low", "sharp", "log_scale")}, strict=False)
    return model.eval()


class Scorer:
    """Scores of users over all items of a graph: p_u . q_j + lin(u, j), the ranking the service serves."""

    def __init__(self, model, graph_csr):
        self.model, self.graph, self.rt = model, graph_csr.astype(np.float64).tocsr(), normalised(graph_csr)
        with torch.no_grad():
            x = model.item_input(torch.arange(model.num_items)).float().numpy()
        self.q = model.item_embedding(torch.arange(model.num_items)).float()
        self.p = torch.from_numpy(np.asarray(self.graph @ x, dtype=np.float32))

    def __call__(self, users):
        users = np.asarray(users)
        lin = torch.from_numpy(linear_filter(self.graph[users], self.rt).astype(np.float32))
        return self.p[torch.as_tensor(users)] @ self.q.T + lin


class _Responses:
    """Training-time scores of a model on a fixed graph: user projections precomputed, responses free."""

    def __init__(self, model, fit_csr):
        m, x = model, fit_csr.astype(np.float64).tocsr()
        v = m.basis.numpy()
        self.model, self.x, self.rt, self.ks = m, x, normalised(x), m.sharp_dim
        self.p_low = torch.from_numpy(np.asarray(x @ (v * m.in_scale.numpy()[:, None]), dtype=np.float32))
        self.p_sharp = torch.from_numpy(np.asarray(x @ v[:, :self.ks], dtype=np.float32))
        self.q_low = (m.basis * m.out_scale.unsqueeze(-1)).float()
        self.q_sharp = m.basis[:, :self.ks].float()
        self.s2 = m.s2.float()
        self.cache = {}  # user -> its (constant) linear filter row, for users scored every epoch

    def remember(self, users):
        """Keep the linear filter rows of `users` (the early-stopping users, scored every epoch)."""
        for s in range(0, len(users), 1024):
            b = users[s:s + 1024]
            for u, row in zip(b, torch.from_numpy(linear_filter(self.x[b], self.rt).astype(np.float32))):
                self.cache[int(u)] = row

    def __call__(self, users):
        """Scores [len(users), n_items] as a differentiable function of the responses."""
        m, u = self.model, torch.as_tensor(users)
        h = m.response(m.low.float(), self.s2)
        g = m.response(m.sharp.float(), self.s2[:self.ks])
        if all(int(x) in self.cache for x in users):
            lin = torch.stack([self.cache[int(x)] for x in users])
        else:
            lin = torch.from_numpy(linear_filter(self.x[users], self.rt).astype(np.float32))
        return (self.p_low[u] * h) @ self.q_low.T + (self.p_sharp[u] * g) @ self.q_sharp.T + lin


def _tensorboard(log_dir):
    """A SummaryWriter if TensorBoard is installed and a directory given, else None."""
    if not log_dir:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir)


def _loss(scores, x_rows, targets, scale):
    """Mean over users of -mean log softmax of their hidden items, their known items masked."""
    r, c = x_rows.nonzero()
    known = torch.zeros(scores.shape, dtype=torch.bool)
    known[torch.as_tensor(r, dtype=torch.int64), torch.as_tensor(c, dtype=torch.int64)] = True
    logp = F.log_softmax((scores * scale).masked_fill(known, float("-inf")), dim=1)
    tr = torch.as_tensor([k for k, t in enumerate(targets) for _ in t])
    tc = torch.as_tensor([i for t in targets for i in t])
    per = torch.zeros(len(targets)).index_add_(0, tr, logp[tr, tc])
    return -(per / torch.as_tensor([len(t) for t in targets], dtype=torch.float32)).mean()


def train(model, fit_csr, targets, cfg, progress=True, log_dir=None, users_per_epoch=4096):
    """Learn the model's responses so that each user's hidden `targets` rank first (fit_csr as input).

    Target users are split: `1 - check_share` for gradient steps (a seeded sample of
    `users_per_epoch` of them each epoch), the rest for early stopping on Recall@k; the best
    responses are restored. Training never sees the evaluation's test set.
    """
    rng = np.random.default_rng(cfg.seed)
    users = rng.permutation(np.array(sorted(u for u, t in targets.items() if t), dtype=np.int64))
    n_check = max(1, int(len(users) * cfg.check_share))
    check, tune = np.sort(users[:n_check]), users[n_check:]
    scores = _Responses(model, fit_csr)
    scores.remember(check)
    params = [model.low, model.sharp, model.log_scale]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    writer, key = _tensorboard(log_dir), f"recall@{cfg.k}"
    check_truth = {int(u): targets[int(u)] for u in check}

    def validate():
        with torch.no_grad():
            return evaluate(scores, check_truth, scores.x, cfg.k, batch_size=cfg.batch_size)

    start = time.time()
    ndcg = f"ndcg@{cfg.k}"

    def rank(r):  # Recall@k first, NDCG@k to break ties
        return (r[key], r[ndcg])

    row = {"epoch": 0, "loss": None, "seconds": 0.0, **validate()}
    history, best, best_state, bad = [row], rank(row), copy.deepcopy(model.state_dict()), 0
    _log(writer, row, cfg.lr, progress)
    for epoch in range(1, cfg.epochs + 1):
        if cfg.max_minutes and time.time() - start > cfg.max_minutes * 60:
            break
        sample = rng.permutation(tune)[:users_per_epoch]
        total, steps = 0.0, 0
        batches = range(0, len(sample), cfg.batch_size)
        for s in tqdm(batches, desc=f"epoch {epoch}", disable=not progress, leave=False):
            b = np.sort(sample[s:s + cfg.batch_size])
            loss = _loss(scores(b), scores.x[b], [sorted(targets[int(u)]) for u in b],
                         torch.exp(model.log_scale.float()))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        row = {"epoch": epoch, "loss": total / max(steps, 1), "seconds": time.time() - start, **validate()}
        history.append(row)
        _log(writer, row, cfg.lr, progress)
        if rank(row) > best:
            best, best_state, bad = rank(row), copy.deepcopy(model.state_dict()), 0
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    model.load_state_dict(best_state)
    if writer is not None:
        writer.close()
    best_row = max(history, key=rank)
    popularity = evaluate(popularity_scorer(fit_csr), check_truth, scores.x, cfg.k)
    return {"metrics": best_row, "history": history, "epochs": len(history) - 1, "popularity": popularity,
            "seconds": time.time() - start, "check_users": int(n_check), "tune_users": int(len(tune))}


def _log(writer, row, lr, progress):
    if writer is not None:
        for name, value in row.items():
            if name != "epoch" and isinstance(value, float):
                writer.add_scalar(name, value, row["epoch"])
        writer.add_scalar("lr", lr, row["epoch"])
    if progress:
        tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


def fit(train_csr, cfg, progress=True, log_dir=None):
    """The whole recipe: hide `cfg.holdout` of each user's items, learn the responses on them with a
    basis of the rest, then rebuild the basis on the whole graph with the learned responses."""
    fit_csr, hidden = holdout(train_csr, cfg.holdout, cfg.seed)
    t0 = time.time()
    first = build(fit_csr, cfg)
    result = train(first, fit_csr, hidden, cfg, progress=progress, log_dir=log_dir)
    model = build(train_csr, cfg, like=first)
    result["basis_seconds"] = time.time() - t0 - result["seconds"]
    return model, result

