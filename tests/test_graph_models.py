"""Pure tests of graph_models: tiny graphs, no Neo4j, no Flask."""
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from graph_models import ModelConfig, bias, build_graph
from graph_models.baselines import itemknn_scorer, popularity_scorer
from graph_models.checkpoint import load_checkpoint, save_checkpoint
from graph_models.evaluation import evaluate, ndcg_at_k, recall_at_k
from graph_models.graph import graph_from_csr
from graph_models.candidates import pattern, restricted
from graph_models.spectral import LinearFilter, inv_sqrt, item_basis, item_table, linear_filter, normalised
from graph_models.train import Scorer, build, fit, train

torch.set_num_threads(2)


def matrix():
    """4 users x 5 items with unequal weights; item 4 has no edge."""
    dense = np.array([[1.0, 2.0, 0, 0, 0], [0, 1.0, 3.0, 0, 0], [1.0, 0, 1.0, 0.5, 0], [0, 0, 2.0, 1.0, 0]])
    return sp.csr_matrix(dense), dense


def test_normalised_and_linear_filter_match_the_dense_formula():
    csr, r = matrix()
    du, di = r.sum(1), r.sum(0)
    rt = np.diag(inv_sqrt(du)) @ r @ np.diag(inv_sqrt(di))
    assert np.allclose(normalised(csr).toarray(), rt)
    assert inv_sqrt(np.array([0.0, 4.0])).tolist() == [0.0, 0.5]  # no division by a zero degree
    assert np.allclose(linear_filter(csr[[0, 2]], normalised(csr)), r[[0, 2]] @ rt.T @ rt)


def test_item_basis_is_the_top_singular_subspace_and_repeatable():
    csr, r = matrix()
    v, s2 = item_basis(csr, 2, seed=5)
    exact = np.linalg.svd(normalised(csr).toarray(), compute_uv=False) ** 2
    assert v.shape == (5, 2) and np.allclose(s2, exact[:2]) and s2[0] >= s2[1]
    assert np.allclose(v.T @ v, np.eye(2), atol=1e-8)
    v2, _ = item_basis(csr, 2, seed=5)
    assert np.array_equal(v, v2)


def small_model(**kw):
    csr, r = matrix()
    cfg = ModelConfig(dim=3, sharp_dim=2, degree=2, **kw)
    return build(csr, cfg), csr, r


def test_item_vectors_by_hand():
    model, csr, r = small_model()
    with torch.no_grad():
        model.low.copy_(torch.tensor([0.3, 0.1, -0.2], dtype=torch.float64))
        model.sharp.copy_(torch.tensor([0.0, 0.5, 0.25], dtype=torch.float64))
    v, s, d = model.basis.numpy(), model.s2.numpy(), r.sum(0)
    h, g = 0.3 + 0.1 * s - 0.2 * s ** 2, 0.5 * s[:2] + 0.25 * s[:2] ** 2
    with torch.no_grad():
        x = model.item_input(torch.tensor([1, -1, 9])).numpy()
        q = model.item_embedding(torch.tensor([1, -1])).numpy()
    assert np.allclose(x[0], np.concatenate([v[1] / math.sqrt(d[1]) * h, v[1, :2] * g]))
    assert not x[1].any() and not x[2].any() and not q[1].any()  # items outside the version: zero
    assert np.allclose(q[0], np.concatenate([v[1] * math.sqrt(d[1]), v[1, :2]]))
    assert model.out_dim == 5


def test_users_are_the_weighted_sum_of_their_items_inputs():
    model, csr, r = small_model()
    out = model.inference(graph_from_csr(csr))
    with torch.no_grad():
        x = model.item_input(torch.arange(5)).numpy()
    assert np.allclose(out["user"].numpy(), r @ x)
    # A user is a function of its edges only: the same edges give the same vector in another graph.
    g = build_graph([0, 0], [0, 1], [1.0, 2.0], 1, 5)
    assert np.allclose(model.inference(g)["user"].numpy()[0], out["user"].numpy()[0])


def test_untrained_model_scores_like_gf_cf_truncated():
    model, csr, r = small_model(alpha=0.3)
    v, d = model.basis.numpy(), r.sum(0)
    rt = normalised(csr).toarray()
    dis = inv_sqrt(d)
    expected = r @ rt.T @ rt + 0.3 * r @ np.diag(dis) @ v @ v.T @ np.diag(np.sqrt(d))
    assert np.allclose(Scorer(model, csr)([0, 1, 2, 3]).numpy(), expected, atol=1e-5)


def _pruned(s, k):
    """Each row i of `s` keeping its k largest positive entries off the diagonal (ties to the lower column)."""
    out = np.zeros_like(s)
    for i in range(s.shape[0]):
        row = s[i].copy()
        row[i] = 0.0
        for j in sorted(range(len(row)), key=lambda j: (-np.float32(row[j]), j))[:k]:
            if row[j] > 0:
                out[i, j] = np.float32(row[j])
    return out


@pytest.mark.parametrize("k", [1, 3, 50])
def test_item_table_in_blocks_equals_the_pruned_product(k):
    """The table built a few rows at a time is each row's k nearest items of R~^T R~, whatever the blocks."""
    rng = np.random.default_rng(k)
    dense = (rng.random((60, 25)) < 0.2) * rng.integers(1, 4, (60, 25))
    rt = normalised(sp.csr_matrix(dense.astype(float)))
    expected = _pruned((rt.T @ rt).toarray(), k)
    for entries in (1, 30, 10**9):
        got = item_table(rt, k, block_entries=entries)
        assert got.dtype == np.float32 and np.allclose(got.toarray(), expected, rtol=1e-6)
    assert (np.diff(item_table(rt, k).indptr) <= k).all()


def test_table_served_scores_rank_only_the_rows_reach():
    """With a table, a user's items outside its rows' reach (and the top biases) get -inf; biases are divided
    by the largest candidate magnitude; a user with fewer than k new candidates keeps every item."""
    s = torch.tensor([[4.0, 1.0, 2.0, 8.0], [1.0, 2.0, 3.0, 4.0]])
    rows = sp.csr_matrix(np.array([[1.0, 0, 0, 0], [0, 0, 0, 1.0]]))
    table = sp.csr_matrix(np.array([[0, 1.0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1.0, 0]]))
    out = restricted(s, rows, pattern(table), None, k=1)
    assert out[0].tolist() == [-np.inf, 1.0, -np.inf, -np.inf] and out[1].tolist() == [-np.inf, -np.inf, 3.0, -np.inf]
    biased = restricted(s, rows, pattern(table), np.array([0.0, 0.0, 0.0, 0.5]), k=1, n_bias=1)
    assert torch.allclose(biased[0], torch.tensor([-np.inf, 1.0 / 8.0, -np.inf, 1.0 + 0.5]))  # item 3: top bias
    assert torch.isfinite(restricted(s, rows, pattern(table), None, k=2)).all()  # one new candidate < k = 2


@pytest.mark.parametrize("how", ["raw", "log1p", "binary"])
@pytest.mark.parametrize("topk", [0, 1, 2])
def test_linear_filter_options_match_the_dense_formula(how, topk):
    """lin reads f(w) for the user's row and the graph (degrees included); topk keeps j's nearest items."""
    csr, r = matrix()
    rf = {"raw": r, "log1p": np.log1p(r), "binary": (r > 0).astype(float)}[how]
    rt = np.diag(inv_sqrt(rf.sum(1))) @ rf @ np.diag(inv_sqrt(rf.sum(0)))
    sim = rt.T @ rt if not topk else _pruned(rt.T @ rt, topk)
    got = LinearFilter(csr, how, topk)(csr[[0, 2, 3]])
    assert np.allclose(got, rf[[0, 2, 3]] @ sim)
    if how == "raw" and not topk:  # the default is GF-CF's filter, bit for bit
        assert np.array_equal(got, linear_filter(csr[[0, 2, 3]], normalised(csr)))
    # the user's own row may read other weights than the graph: 1 per edge here
    binary_rows = LinearFilter(csr, how, topk, user_weights="binary")(csr[[0, 2, 3]])
    assert np.allclose(binary_rows, (r[[0, 2, 3]] > 0) @ sim)


def test_scorer_serves_the_models_linear_filter_and_the_default_is_unchanged():
    model, csr, r = small_model(alpha=0.3)
    assert (model.cfg.lin_weights, model.cfg.lin_topk) == ("raw", 0)  # the Gowalla settings
    users = [0, 1, 2, 3]
    with torch.no_grad():
        out = model.inference(graph_from_csr(csr))
        spectral = (out["user"] @ out["item"].T).numpy()
    default = Scorer(model, csr)(users).numpy()
    assert np.allclose(default, spectral + linear_filter(csr, normalised(csr)), atol=1e-5)
    tuned, _, _ = small_model(alpha=0.3, lin_weights="binary", lin_topk=2)
    b = (r > 0).astype(float)
    rt = np.diag(inv_sqrt(b.sum(1))) @ b @ np.diag(inv_sqrt(b.sum(0)))
    assert np.allclose(Scorer(tuned, csr)(users).numpy(), spectral + b @ _pruned(rt.T @ rt, 2), atol=1e-5)
    with pytest.raises(ValueError):
        LinearFilter(csr, "square")
    with pytest.raises(ValueError):
        LinearFilter(csr, user_weights="square")


def test_small_graphs_keep_the_embedding_size():
    csr, _ = matrix()
    model = build(csr, ModelConfig(dim=16, sharp_dim=4))
    assert model.basis.shape == (5, 16) and model.out_dim == 20
    assert not model.basis[:, 4:].any()  # rank 4 at most (4 users): the rest is zero padding


def test_metrics_hand_cases():
    topk = np.array([[1, 2, 3], [4, 5, 6]])
    truth = [{1, 3, 9}, {7}]
    assert math.isclose(recall_at_k(topk, truth, 3), (2 / 3 + 0) / 2)
    dcg = 1 + 1 / math.log2(4)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert math.isclose(ndcg_at_k(topk, truth, 3), (dcg / idcg) / 2, rel_tol=1e-9)
    assert math.isclose(ndcg_at_k(np.array([[7, 1]]), [{7}], 2), 1.0)


def test_evaluate_excludes_training_items_and_baselines():
    dense = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 1, 0]], dtype=np.float32)
    train_csr = sp.csr_matrix(dense)
    truth = {0: {2}, 1: {0}}
    pop = evaluate(popularity_scorer(train_csr), truth, train_csr, k=1)
    assert pop["recall@1"] == 1.0 and pop["users"] == 2  # item 1 is excluded for both
    knn = evaluate(itemknn_scorer(train_csr, k=3, shrink=0.0), truth, train_csr, k=1)
    assert 0.0 <= knn["recall@1"] <= 1.0


def planted(n_comm=4, users=30, items=15, per_user=8, p_in=0.9, seed=0):
    """Users and items in communities; edges mostly within; 2 held-out edges per user."""
    rng = np.random.default_rng(seed)
    rows, cols, test = [], [], {}
    for c in range(n_comm):
        for k in range(users):
            u = c * users + k
            own = c * items + rng.choice(items, per_user, replace=False)
            other = rng.choice(n_comm * items, per_user, replace=False)
            picks = np.where(rng.random(per_user) < p_in, own, other)
            picks = list(dict.fromkeys(picks.tolist()))
            rows += [u] * (len(picks) - 2)
            cols += picks[2:]
            test[u] = set(picks[:2]) - set(picks[2:])
    csr = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_comm * users, n_comm * items))
    return csr, test


def test_training_learns_responses_and_restores_the_best():
    csr, test = planted()
    cfg = ModelConfig(dim=16, sharp_dim=8, epochs=6, batch_size=64, max_minutes=None, k=10, seed=1, search_trials=0)
    model, out = fit(csr, cfg, progress=False)
    hist = out["history"]
    assert hist[0]["epoch"] == 0 and len(hist) >= 2
    assert out["metrics"] == max(hist, key=lambda h: (h["recall@10"], h["ndcg@10"]))
    fitted = [h["tune_recall"] for h in hist]
    assert fitted == sorted(fitted) and fitted[-1] > fitted[0]  # each round keeps only improvements
    assert not torch.equal(model.low.detach(), torch.tensor([0.3, 0, 0, 0], dtype=torch.float64))
    res = evaluate(Scorer(model, csr), test, csr, k=10)
    assert res["recall@10"] > 3 * 10 / (csr.shape[1] - 6), res  # far above random
    model2, out2 = fit(csr, cfg, progress=False)  # stopped by epochs: bit-for-bit repeatable
    assert torch.equal(model.low, model2.low) and torch.equal(model.sharp, model2.sharp)
    assert [h["recall@10"] for h in out["history"]] == [h["recall@10"] for h in out2["history"]]


def test_training_writes_tensorboard_logs(tmp_path):
    csr, test = planted(users=10)
    model = build(csr, ModelConfig(dim=8, sharp_dim=4))
    train(model, csr, test, ModelConfig(dim=8, sharp_dim=4, epochs=1, batch_size=32, check_share=0.5), progress=False,
          log_dir=str(tmp_path))
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_checkpoint_round_trip(tmp_path):
    model, csr, _ = small_model()
    with torch.no_grad():
        model.low.add_(0.05)
    meta = {"version": "v1", "item_ids": ["a", "b", "c", "d", "e"], "metrics": {"recall@20": 0.1}}
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, model.cfg, meta)
    loaded, cfg, meta2 = load_checkpoint(path)
    assert cfg == model.cfg and meta2 == meta
    g = graph_from_csr(csr)
    a, b = model.inference(g), loaded.inference(g)
    assert torch.equal(a["user"], b["user"]) and torch.equal(a["item"], b["item"])
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "bad.pt", model, model.cfg, {"x": object()})


def test_item_biases_learn_what_new_adopters_pick_and_are_served_by_the_scorer(tmp_path):
    """Fitted biases rise for the items the targets took up, the loss falls, and the Scorer ranks by
    s / max|s| + b; a version without biases scores as before and old checkpoints load."""
    rng = np.random.default_rng(0)
    dense = (rng.random((60, 12)) < 0.3).astype(float)
    dense[np.arange(60), np.arange(60) % 10] = 1.0
    csr = sp.csr_matrix(dense)
    cfg = ModelConfig(dim=6, sharp_dim=2, bias_temperature=0.2, bias_steps=100, bias_lr=1.0)
    model = build(csr, cfg)
    targets = {u: {10 + u % 2} for u in range(40) if not dense[u, 10 + u % 2]}  # items 10, 11 taken up
    score = Scorer(model, csr, biased=False)

    def loss(b):
        s = bias.with_bias(score(np.array(sorted(targets))), b).numpy() / cfg.bias_temperature
        s[dense[sorted(targets)] > 0] = -np.inf
        logz = np.log(np.exp(s - s.max(axis=1, keepdims=True)).sum(axis=1)) + s.max(axis=1)
        return float(np.mean([logz[k] - s[k, next(iter(targets[u]))] for k, u in enumerate(sorted(targets))]))

    b = bias.fit_bias(score, csr, targets, cfg)
    assert b[10] > 0 and b[11] > 0 and b[10] > b[:10].max() and loss(b) < loss(np.zeros(12)) - 0.5
    again = bias.fit_bias(score, csr, targets, cfg, start=b, steps=0)
    assert np.array_equal(again, b)  # zero steps from a start keep it
    model.bias = torch.from_numpy(b)
    users = np.arange(5)
    s = score(users)
    top = s.abs().amax(dim=1, keepdim=True)
    assert torch.allclose(Scorer(model, csr)(users), s / top + torch.from_numpy(b).float(), atol=1e-6)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, cfg, {"item_ids": []})
    assert torch.equal(load_checkpoint(path)[0].bias, model.bias)
    blob = torch.load(path, weights_only=True)
    del blob["state_dict"]["bias"]
    blob["config"]["bias_temperature"] = 0.0
    torch.save(blob, path)
    old = load_checkpoint(path)[0]
    assert not old.biased and not old.bias.any()
    assert torch.equal(Scorer(old, csr)(users), score(users))


def test_training_keeps_item_biases_only_where_they_rank_better():
    """Targets that the graph already ranks first leave nothing for biases to add: refused (zero);
    targets that all shoppers share, against the graph, are what biases are for: kept."""
    from graph_models.train import fit_checked_bias
    rng = np.random.default_rng(0)
    dense = (rng.random((80, 12)) < 0.3).astype(float)
    dense[np.arange(80), np.arange(80) % 10] = 1.0
    csr = sp.csr_matrix(dense)
    cfg = ModelConfig(dim=6, sharp_dim=2, bias_temperature=0.2, bias_steps=100, sample_users=100, k=3)
    model = build(csr, cfg)
    ranked = Scorer(model, csr, biased=False)(np.arange(80)).numpy()
    ranked[dense > 0] = -np.inf
    own_best = {u: {int(np.argmax(ranked[u]))} for u in range(80)}
    refused = fit_checked_bias(model, csr, own_best, cfg)
    assert not refused["kept"] and not model.bias.any()
    shared = {u: {10 + (u % 4 == 0)} for u in range(80) if not dense[u, 10 + (u % 4 == 0)]}
    kept = fit_checked_bias(model, csr, shared, cfg)
    assert kept["kept"] and model.bias[10] > 0
    assert kept["check_with"]["recall@3"] > kept["check_without"]["recall@3"]


def test_the_live_trend_counts_new_adopters_by_recency_and_is_added_by_the_scorer():
    """trend: new adopters decayed by the age of their first edge, 1 for the top item, the same whenever
    computed; a trend-reading model adds weight x trend to its biases, and cannot score without one."""
    day = bias.DAY_MS
    items = np.array([0, 0, 1, 2, 2, 2])
    first = np.array([10, 10, 10, 0, 0, 0]) * day  # two new adopters of 0 today; three of 2 ten days ago
    t = bias.trend(items, first, 4, halflife_days=5.0)
    assert t == pytest.approx([1.0, 0.5, 3 / 2 * 0.25, 0.0])
    assert bias.trend(items, first + 400 * day, 4, 5.0) == pytest.approx(t, rel=1e-12)  # later: the same
    assert not bias.trend(items[:0], first[:0], 4, 5.0).any()
    csr, _ = matrix()
    cfg = ModelConfig(dim=3, sharp_dim=1, bias_temperature=0.2, trend_halflife=5.0, trend_weight=0.4)
    model = build(csr, cfg)
    model.bias = torch.tensor([0.1, -0.2, 0.0, 0.3, 0.0], dtype=torch.float64)
    t5 = bias.trend(items, first, 5, 5.0)
    users = np.arange(4)
    expected = bias.with_bias(Scorer(model, csr, biased=False)(users), model.bias.numpy() + 0.4 * t5)
    assert torch.allclose(Scorer(model, csr, trend=t5)(users), expected)
    with pytest.raises(ValueError, match="trend"):
        Scorer(model, csr)
