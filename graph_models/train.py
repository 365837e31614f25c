"""Training InterestSAGE: fit the spectral responses on hidden items, choose by a top-k metric."""
import copy
import time
from dataclasses import replace

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from .baselines import popularity_scorer
from .bias import fit_bias, prior, with_bias
from .candidates import pattern, restricted, with_attending
from .ease import content_gram, ease_matrix, gram
from .evaluation import evaluate
from .graph import graph_from_csr
from .model import InterestSAGE
from .spectral import LinearFilter, degrees, item_basis, table_topk
from .split import holdout


def build(graph_csr, cfg, like=None, basis=None, content=None):
    """A model whose basis comes from `graph_csr` (or is `basis`, a pair (V, s^2) of it with at least
    cfg.rank columns); learned responses copied from `like` if given; EASE's matrix fitted when the
    settings use it, with the items' feature rows `content` in its Gram when cfg.ease_content > 0."""
    rank = min(cfg.rank or cfg.dim, cfg.dim)
    basis, s2 = basis or item_basis(graph_csr, rank, cfg.seed, cfg.svd_iters)
    basis, s2 = basis[:, :rank], s2[:rank]
    if basis.shape[1] < cfg.dim:  # a smaller rank or graph: zero columns keep the embedding size fixed
        pad = cfg.dim - basis.shape[1]
        basis, s2 = np.pad(basis, ((0, 0), (0, pad))), np.pad(s2, (0, pad))
    model = InterestSAGE(basis, s2, degrees(graph_csr)[1], cfg)
    if cfg.ease_weight > 0:
        g = gram(graph_csr)
        if cfg.ease_content > 0:
            if content is None:
                raise ValueError("the settings weigh the items' content in EASE, and no content was given")
            g += cfg.ease_content * content_gram(content, graph_csr)
        model.ease = torch.from_numpy(ease_matrix(g, cfg.ease_lambda))
    if like is not None:
        model.load_state_dict({k: v for k, v in like.state_dict().items()
                               if k in ("low", "sharp") or (k == "bias" and v.shape == model.bias.shape)},
                              strict=False)
    return model.eval()


class Scorer:
    """Scores of users over all items of a graph: p_u . q_j + lin(u, j), the ranking the service serves
    (with item biases: `bias.with_bias` of it, the biases plus the live trend's prior, `trend` being
    `bias.trend` of the graph's positive edges when the model reads one). With the filter served from
    an item table, only each user's candidates are ranked (graph_models.candidates), unless `candidates`
    is False (every item's score, as biases are fitted on). `content` = (columns, x, q, a): the rows from
    content of the items that take them (`LoadedModel.cold`), in place of their table rows, and their
    attention `a` over the version's rows (None: scored by those rows alone); with it, such an item's
    score also mixes its neighbours' other terms (`mix`)."""

    def __init__(self, model, graph_csr, biased: bool | None = None, trend=None, candidates: bool = True,
                 content=None):
        self.graph = graph_csr.astype(np.float64).tocsr()
        self.lin = LinearFilter.of(graph_csr, model.cfg)  # normalised from the graph as given, as before
        cols, xc, qc, a = content if content is not None else (np.zeros(0, dtype=np.int64), None, None, None)
        rows = np.arange(self.graph.shape[1])
        rows[cols] = model.num_items  # the zero row, then the content rows added
        # the DGL path the service's full recompute takes
        out = model.inference(graph_from_csr(self.graph), rows if len(cols) else None)
        p, q = out["user"].numpy(), out["item"].numpy()
        if len(cols):
            p = p + np.asarray(self.graph[:, cols] @ xc)
            q[cols] = qc
        self.p = torch.from_numpy(np.asarray(p, dtype=np.float32))
        self.q = torch.from_numpy(np.asarray(q, dtype=np.float32))
        n = self.graph.shape[1]
        self.mix = None if a is None or not len(cols) else (torch.as_tensor(cols), _columns(a, n))
        self.bias = None
        if model.biased if biased is None else biased:
            b = np.zeros(n)
            b[:min(n, model.num_items)] = model.bias.numpy()[:n]
            extra = prior(model.cfg, n, trend)
            self.bias = b + extra
            if self.mix is not None:  # a mixed item's bias: its neighbours' (their trend's too), and its own trend
                self.bias[cols] = self.mix[1] @ self.bias + extra[cols]

        self.lin_weight = getattr(model.cfg, "lin_weight", 1.0)
        self.ease, self.ease_weight = (model.ease.float(), model.cfg.ease_weight) if model.eased else (None, 0.0)
        # Served from an item table (and no EASE, which reads every item): only the candidates are ranked.
        self.reach = pattern(self.lin.sim) if self.lin.sim is not None and self.ease is None and candidates else None
        if self.reach is not None and self.mix is not None:
            self.reach = with_attending(self.reach, cols, self.mix[1])
        self.k = model.cfg.k

    def __call__(self, users):
        users = np.asarray(users)
        s = self.p[torch.as_tensor(users)] @ self.q.T
        other = None
        if self.lin_weight:
            other = self.lin_weight * torch.from_numpy(self.lin(self.graph[users]).astype(np.float32))
        if self.ease is not None:
            e = self.ease_weight * ease_scores(self.graph[users], self.ease)
            other = e if other is None else other + e
        if other is not None:
            s += other
            if self.mix is not None:
                s[:, self.mix[0]] += torch.from_numpy(np.asarray(self.mix[1] @ other.numpy().T, dtype=np.float32).T)
        if self.reach is not None:
            return restricted(s, self.graph[users], self.reach, self.bias, self.k)
        return s if self.bias is None else with_bias(s, self.bias)


def _columns(a, n: int) -> sp.csr_matrix:
    """`a` (CSR over a version's table rows, which are the graph's first columns) as n graph columns."""
    a = sp.csr_matrix(a)
    if a.shape[1] > n:
        a = a[:, :n]
    return sp.csr_matrix((a.data, a.indices, a.indptr), shape=(a.shape[0], n))


def ease_scores(rows, ease) -> torch.Tensor:
    """EASE's scores of users' rows (users x graph items CSR) from a version's matrix (items new since: 0)."""
    n = min(rows.shape[1], ease.shape[0])
    x = torch.from_numpy(np.asarray((rows[:, :n] > 0).todense(), dtype=np.float32))
    out = torch.zeros(rows.shape[0], rows.shape[1])
    out[:, :n] = x @ ease[:n, :n]
    return out


class _Responses:
    """Training-time scores of a model on a fixed graph, as a function of its response coefficients.

    Every score is linear in the coefficients: lin + sum_p low[p] A_p + sum_p sharp[p] B_p, with
    A_p = (P_low * s^p) Q_low^T for the users' fixed projections P. `freeze(users)` keeps those
    matrices for a group scored many times, so a trial costs a weighted sum instead of matmuls.
    """

    def __init__(self, model, fit_csr):
        m, x = model, fit_csr.astype(np.float64).tocsr()
        v = m.basis.numpy()
        self.model, self.x, self.lin, self.ks = m, x, LinearFilter.of(x, m.cfg), m.sharp_dim
        self.p_low = torch.from_numpy(np.asarray(x @ (v * m.in_scale.numpy()[:, None]), dtype=np.float32))
        self.p_sharp = torch.from_numpy(np.asarray(x @ v[:, :self.ks], dtype=np.float32))
        self.q_low = (m.basis * m.out_scale.unsqueeze(-1)).float()
        self.q_sharp = m.basis[:, :self.ks].float()
        self.s2 = m.s2.float()
        self.rows, self.parts = {}, None  # frozen users -> row of the kept matrices

    def _parts(self, users):
        """[lin, A_0.., B_0..] of `users`: the matrices every score is a combination of."""
        u = torch.as_tensor(users)
        lin = torch.from_numpy(self.lin(self.x[users]).astype(np.float32))
        low = [(self.p_low[u] * self.s2 ** p) @ self.q_low.T for p in range(len(self.model.low))]
        sharp = [(self.p_sharp[u] * self.s2[:self.ks] ** p) @ self.q_sharp.T for p in range(len(self.model.sharp))]
        return [lin, *low, *sharp]

    def freeze(self, users):
        """Keep the score matrices of `users` (the fitting sample, scored for every trial)."""
        self.rows = {int(x): k for k, x in enumerate(users)}
        parts = [self._parts(users[s:s + 512]) for s in range(0, len(users), 512)]
        self.parts = [torch.cat([p[j] for p in parts]) for j in range(len(parts[0]))]

    def __call__(self, users):
        """Scores [len(users), n_items] under the model's current coefficients."""
        coef = [1.0, *self.model.low.tolist(), *self.model.sharp.tolist()]
        if self.parts is not None and all(int(x) in self.rows for x in users):
            idx = torch.as_tensor([self.rows[int(x)] for x in users])
            out = self.parts[0][idx].clone()
            for c, part in zip(coef[1:], self.parts[1:]):
                out.add_(part[idx], alpha=c)
            return out
        return sum(c * part for c, part in zip(coef, self._parts(users)))


def _tensorboard(log_dir):
    """A SummaryWriter if TensorBoard is installed and a directory given, else None."""
    if not log_dir:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir)


def train(model, fit_csr, targets, cfg, progress=True, log_dir=None):
    """Fit the model's responses so that each user's hidden `targets` rank in the top k (fit_csr as input).

    The responses are a handful of polynomial coefficients, and the goal is a top-k metric, which a
    softmax likelihood does not follow (measured on Gowalla: the loss fell while Recall@20 fell too).
    So each epoch is one round of coordinate search: every coefficient is moved by +-step and kept
    where Recall@k (then NDCG@k) of a fixed sample of target users improves; the step halves after a
    round without a move. Another set of target users decides early stopping and the best epoch.
    Deterministic from cfg.seed; training never sees the evaluation's test set.
    """
    rng = np.random.default_rng(cfg.seed)
    users = rng.permutation(np.array(sorted(u for u, t in targets.items() if t), dtype=np.int64))
    n_check = max(1, int(len(users) * cfg.check_share))
    check = np.sort(users[:n_check][:cfg.sample_users])
    tune = np.sort(users[n_check:][:cfg.sample_users])
    scores = _Responses(model, fit_csr)
    scores.freeze(tune)
    key, ndcg = f"recall@{cfg.k}", f"ndcg@{cfg.k}"

    def measure(group):
        with torch.no_grad():
            m = evaluate(scores, {int(u): targets[int(u)] for u in group}, scores.x, cfg.k, batch_size=cfg.batch_size)
        return (m[key], m[ndcg]), m

    writer, step, start = _tensorboard(log_dir), cfg.step, time.time()
    fit_now, _ = measure(tune)
    best, row = measure(check)
    row = {"epoch": 0, "tune_recall": fit_now[0], "step": step, "seconds": 0.0, **row}
    history, best_state, bad = [row], copy.deepcopy(model.state_dict()), 0
    _log(writer, row, progress)
    coefs = [(model.low, p) for p in range(len(model.low))] + [(model.sharp, p) for p in range(len(model.sharp))]
    for epoch in range(1, cfg.epochs + 1):
        if cfg.max_minutes and time.time() - start > cfg.max_minutes * 60:
            break
        moved = False
        for param, p in tqdm(coefs, desc=f"epoch {epoch}", disable=not progress, leave=False):
            for delta in (step, -step):
                with torch.no_grad():
                    param[p] += delta
                trial, _ = measure(tune)
                if trial > fit_now:
                    fit_now, moved = trial, True
                    break
                with torch.no_grad():
                    param[p] -= delta
        if not moved:
            step /= 2
        score, metrics = measure(check)
        row = {"epoch": epoch, "tune_recall": fit_now[0], "step": step, "seconds": time.time() - start, **metrics}
        history.append(row)
        _log(writer, row, progress)
        if score > best:
            best, best_state, bad = score, copy.deepcopy(model.state_dict()), 0
        else:
            bad += 1
            if bad >= cfg.patience or step < cfg.min_step:
                break
    model.load_state_dict(best_state)
    if writer is not None:
        writer.close()
    best_row = max(history, key=lambda r: (r[key], r[ndcg]))
    popularity = evaluate(popularity_scorer(fit_csr), {int(u): targets[int(u)] for u in check}, scores.x, cfg.k)
    return {"metrics": best_row, "history": history, "epochs": len(history) - 1, "popularity": popularity,
            "seconds": time.time() - start, "check_users": int(len(check)), "tune_users": int(len(tune))}


def _log(writer, row, progress):
    if writer is not None:
        for name, value in row.items():
            if name != "epoch" and isinstance(value, float):
                writer.add_scalar(name, value, row["epoch"])
    if progress:
        tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


def fit_checked_bias(model, fit_csr, targets, cfg, trend=None) -> dict:
    """Item biases for `model`, kept only if they rank better: fitted on half the target users, they
    must raise Recall@k (then NDCG@k) of the other half over the ranking without them (with the
    trend's prior alone, if any: `trend` of `fit_csr`); if so they are fitted again on all targets,
    else left at zero."""
    base = Scorer(model, fit_csr, biased=False, candidates=False)
    extra = prior(cfg, fit_csr.shape[1], trend)
    users = np.random.default_rng(cfg.seed).permutation(np.array(sorted(u for u, t in targets.items() if t)))
    half = len(users) // 2
    fit_on = {int(u): targets[int(u)] for u in users[:half]}
    check = {int(u): targets[int(u)] for u in users[half:][:cfg.sample_users]}
    b = fit_bias(base, fit_csr, fit_on, cfg, extra=extra)
    key = (f"recall@{cfg.k}", f"ndcg@{cfg.k}")
    with torch.no_grad():
        with_b = evaluate(lambda u: with_bias(base(u), b + extra), check, fit_csr, cfg.k)
        without = evaluate(lambda u: with_bias(base(u), extra) if extra.any() else base(u), check, fit_csr, cfg.k)
    kept = bool(check) and tuple(with_b[m] for m in key) > tuple(without[m] for m in key)
    b = fit_bias(base, fit_csr, targets, cfg, extra=extra) if kept else np.zeros(fit_csr.shape[1])
    model.bias = torch.from_numpy(np.pad(b, (0, max(0, model.num_items - len(b))))[:model.num_items])
    return {"kept": kept, "check_with": with_b, "check_without": without}


BIAS_TEMPERATURES = (0.1, 0.3)  # item-bias temperatures tried after the settings search


def fit(train_csr, cfg, progress=True, log_dir=None, split=None, trend=None, fixed=None, budget_s=None,
        content=None):
    """The whole recipe: hide `cfg.holdout` of each user's items (or use `split`, a pair (graph
    without the targets, targets), e.g. a time-ordered one), choose the settings on them
    (`search.search`, unless cfg.search_trials is 0: then the responses are fitted by `train`), then
    rebuild the basis (and EASE) on the whole graph under the chosen settings. Item biases are tried
    when `fixed` does not set them: each temperature of BIAS_TEMPERATURES (or the fixed one) is kept
    only if it passes `fit_checked_bias`'s check, the best on it wins; `trend` is the trend of the
    graph without the targets, for a model that reads one. `budget_s` bounds the search's seconds (and
    searched biases are not tried past it). `content`, the items' feature rows (columns of `train_csr`),
    lets the search weigh them in EASE (None: a shop without content, EASE on the edges alone)."""
    from .search import search
    cfg = replace(cfg, lin_topk=table_topk(train_csr.nnz, train_csr.shape[1], cfg))
    fit_csr, hidden = split or holdout(train_csr, cfg.holdout, cfg.seed)
    fixed = dict(fixed or {})
    t0 = time.time()
    if cfg.search_trials > 0:
        writer = _tensorboard(log_dir)
        basis = item_basis(fit_csr, cfg.dim, cfg.seed, cfg.svd_iters)

        def log(row):
            _log(writer, {"epoch": row["trial"], **{k: v for k, v in row.items() if k != "trial"}}, False)
        cfg, found = search(fit_csr, hidden, cfg, fixed, budget_s, progress, log, basis, content)
        if writer is not None:
            writer.close()
        first = build(fit_csr, cfg, basis=basis, content=content)
        users = {u for u in hidden if hidden[u]}
        check = {int(u): hidden[int(u)] for u in sorted(users)[:cfg.search_users]}
        result = {"metrics": found["validation"], "history": found["trials"], "epochs": 0, "search": found,
                  "popularity": evaluate(popularity_scorer(fit_csr), check, fit_csr, cfg.k),
                  "seconds": time.time() - t0}
    else:
        first = build(fit_csr, cfg, content=content)
        result = train(first, fit_csr, hidden, cfg, progress=progress, log_dir=log_dir)
    deadline = None if budget_s is None else t0 + budget_s
    cfg, result["bias"] = _choose_bias(first, fit_csr, hidden, cfg, fixed, trend, deadline)
    first.cfg = cfg
    model = build(train_csr, cfg, like=first, content=content)
    result["config"] = cfg
    result["basis_seconds"] = time.time() - t0 - result["seconds"]
    return model, result


def _choose_bias(first, fit_csr, hidden, cfg, fixed, trend, deadline=None):
    """(settings with the item-bias temperature that passed its check best, or none; the checks).
    Temperatures that are searched, not fixed, are tried only while time is left before `deadline`."""
    if "bias_temperature" in fixed:
        temps = [fixed["bias_temperature"]]
    else:
        temps = list(BIAS_TEMPERATURES) if cfg.search_trials > 0 else [cfg.bias_temperature]
    best, biases, checks, key = None, {}, {}, (f"recall@{cfg.k}", f"ndcg@{cfg.k}")
    for t in (t for t in temps if t and t > 0):
        if deadline is not None and time.time() > deadline and "bias_temperature" not in fixed:
            checks[str(t)] = {"kept": False, "skipped": "the training budget ran out"}
            continue
        first.cfg = replace(cfg, bias_temperature=t)
        checks[str(t)] = fit_checked_bias(first, fit_csr, hidden, first.cfg, trend)
        biases[str(t)] = first.bias.clone()
        if checks[str(t)]["kept"] and (best is None or tuple(checks[str(t)]["check_with"][m] for m in key)
                                       > tuple(checks[best]["check_with"][m] for m in key)):
            best = str(t)
    if best is None:
        first.bias.zero_()
        if "bias_temperature" in fixed or cfg.search_trials <= 0:  # biased, at zero until a fine-tune moves them
            return replace(cfg, bias_temperature=temps[0]), checks
        # the trend is a part of the biases: without them it is not read either
        return replace(cfg, bias_temperature=0.0, trend_weight=0.0), checks
    first.bias.copy_(biases[best])
    return replace(cfg, bias_temperature=float(best)), checks
