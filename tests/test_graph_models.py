"""Pure tests of graph_models: tiny graphs, no Neo4j, no Flask."""
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from graph_models import InterestSAGE, ModelConfig, agg_weight, build_graph, hash_bucket
from graph_models.baselines import itemknn_scorer, popularity_scorer
from graph_models.checkpoint import load_checkpoint, save_checkpoint
from graph_models.evaluation import embedding_scorer, evaluate, ndcg_at_k, recall_at_k
from graph_models.graph import normalise_mean
from graph_models.train import train

torch.set_num_threads(2)


def small_graph():
    """3 users x 3 items with raw weights including a negative and a large one."""
    u = np.array([0, 0, 1, 1, 2])
    i = np.array([0, 1, 1, 2, 2])
    w = np.array([1.0, 3.0, -2.0, 100.0, 0.5])
    return build_graph(u, i, w, 3, 3), (u, i, w)


def small_model(**kw):
    torch.manual_seed(0)
    return InterestSAGE(3, ModelConfig(dim=8, **kw)).eval()


def test_agg_weight_numpy_and_torch():
    w = np.array([-1.0, 0.0, 1.0, 1e6])
    expect = np.log1p(np.maximum(w, 0))
    assert np.allclose(agg_weight(w), expect)
    assert torch.allclose(agg_weight(torch.tensor(w)), torch.tensor(expect))


def test_build_graph_schema():
    g, (u, i, w) = small_graph()
    assert set(g.ntypes) == {"user", "item"}
    assert set(g.canonical_etypes) == {("user", "ui", "item"), ("item", "iu", "user")}
    for et in ("ui", "iu"):
        assert g.edges[et].data["w"].dtype == torch.float32
        expect = torch.tensor(agg_weight(w), dtype=torch.float32)
        assert torch.allclose(g.edges[et].data["w"], expect)


def test_inference_shapes_and_determinism():
    g, _ = small_graph()
    model = small_model()
    a, b = model.inference(g), model.inference(g)
    assert len(a["h"]) == 3 and a["agg"][0] is None and len(a["agg"]) == 3
    assert a["emb"]["user"].shape == (3, 8) and a["emb"]["item"].shape == (3, 8)
    assert torch.allclose(a["emb"]["item"].norm(dim=1), torch.ones(3))
    for t in ("user", "item"):
        assert torch.equal(a["emb"][t], b["emb"][t])
        for l in (1, 2):
            assert torch.equal(a["agg"][l][t], b["agg"][l][t])


def test_weighted_aggregation_by_hand():
    g, (u, i, w) = small_graph()
    model = small_model().double()
    out = model.inference(g)
    h0u, h0i = out["h"][0]["user"], out["h"][0]["item"]
    aw = agg_weight(w)
    # item 1 hears user 0 (w=3) and user 1 (w=-2 -> 0); user 1 hears items 1 (0) and 2 (100).
    exp_item1 = aw[1] * h0u[0] + aw[2] * h0u[1]
    assert torch.allclose(out["agg"][1]["item"][1], exp_item1)
    assert math.isclose(out["deg"]["item"][1].item(), aw[1] + aw[2], rel_tol=1e-6)
    exp_user1 = aw[2] * h0i[1] + aw[3] * h0i[2]
    assert torch.allclose(out["agg"][1]["user"][1], exp_user1)
    m = out["agg"][1]["user"] / out["deg"]["user"].unsqueeze(1)
    assert torch.allclose(out["h"][1]["user"], model.combine(1, "user", h0u, m))
    # Layer 2 of user 0 from layer-1 item vectors with weights log1p(1), log1p(3).
    h1i = out["h"][1]["item"]
    exp = (aw[0] * h1i[0] + aw[1] * h1i[1]) / (aw[0] + aw[1])
    assert torch.allclose(out["agg"][2]["user"][0] / out["deg"]["user"][0], exp)
    assert torch.allclose(out["emb"]["user"], model.final(out["h"][2]["user"]))


def test_zero_weight_neighbourhood_gives_zero_mean():
    agg = torch.ones(2, 3)
    deg = torch.tensor([0.0, 2.0])
    m = normalise_mean(agg, deg)
    assert torch.equal(m[0], torch.zeros(3)) and torch.allclose(m[1], torch.full((3,), 0.5))


def test_combine_on_subset_equals_full_rows():
    g, _ = small_graph()
    model = small_model().double()
    out = model.inference(g)
    rows = torch.tensor([2, 0])
    for layer in (1, 2):
        for t in ("user", "item"):
            deg = out["deg"][t][rows]
            m = normalise_mean(out["agg"][layer][t][rows], deg)
            sub = model.combine(layer, t, out["h"][layer - 1][t][rows], m)
            assert torch.equal(sub, out["h"][layer][t][rows])


def test_new_item_row_minus_one_is_finite_and_uses_features():
    model = small_model()
    feats = {"category": torch.tensor([hash_bucket("shoes", 1024)]), "price": torch.tensor([19.9]),
             "tokens": [[hash_bucket("red", 4096), hash_bucket("sneaker", 4096)]]}
    with torch.no_grad():
        bare = model.item_input(torch.tensor([-1]))
        rich = model.item_input(torch.tensor([-1]), **feats)
    assert torch.equal(bare, torch.zeros_like(bare))
    assert torch.isfinite(rich).all() and rich.abs().sum() > 0
    # A graph with a 4th item the model has never seen: its row defaults to -1.
    g = build_graph(np.array([0, 1]), np.array([3, 3]), np.array([1.0, 2.0]), 2, 4)
    emb = model.inference(g)["emb"]["item"]
    assert emb.shape == (4, 8) and torch.isfinite(emb).all()


def test_hash_bucket_is_stable():
    assert 0 <= hash_bucket("anything", 7) < 7
    import zlib
    assert hash_bucket("shoes", 1024) == zlib.crc32(b"shoes") % 1024


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
    scores = embedding_scorer(torch.eye(3, 4), torch.eye(4))
    assert scores([0, 2]).shape == (2, 4)


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
    return np.array(rows), np.array(cols), test, n_comm * users, n_comm * items


def test_training_recovers_planted_communities():
    u, i, test, nu, ni = planted()
    g = build_graph(u, i, np.ones(len(u)), nu, ni)
    cfg = ModelConfig(dim=16, epochs=8, batch_size=128, negatives=32, fanouts=[5, 10],
                      lr=0.01, max_minutes=None, k=10, seed=1)
    model = InterestSAGE(ni, cfg)
    exclude = sp.csr_matrix((np.ones(len(u)), (u, i)), shape=(nu, ni))
    out = train(g, model, cfg, val=(test, exclude), progress=False)
    assert out["epochs"] >= 1 and out["seconds"] > 0 and "recall@10" in out["metrics"]
    emb = model.inference(g)["emb"]
    res = evaluate(embedding_scorer(emb["user"], emb["item"]), test, exclude, k=10)
    random_recall = 10 / (ni - 6)
    assert res["recall@10"] > 3 * random_recall, res


def test_training_is_reproducible():
    u, i, test, nu, ni = planted(users=10)
    g = build_graph(u, i, np.ones(len(u)), nu, ni)
    cfg = ModelConfig(dim=8, epochs=2, batch_size=64, negatives=16, fanouts=[5, 5], seed=3)
    embs = []
    for _ in range(2):
        model = InterestSAGE(ni, cfg)
        train(g, model, cfg, progress=False)
        embs.append(model.inference(g)["emb"]["user"])
    assert torch.equal(embs[0], embs[1])


def test_checkpoint_round_trip(tmp_path):
    g, _ = small_graph()
    model = small_model(layers=2)
    meta = {"version": "v1", "item_ids": ["a", "b", "c"], "metrics": {"recall@20": 0.1},
            "trained_at": "2024-01-01T00:00:00Z"}
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, model.cfg, meta)
    loaded, cfg, meta2 = load_checkpoint(path)
    assert cfg == model.cfg and meta2 == meta
    a, b = model.inference(g)["emb"], loaded.inference(g)["emb"]
    assert torch.equal(a["user"], b["user"]) and torch.equal(a["item"], b["item"])
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "bad.pt", model, model.cfg, {"x": object()})


def test_full_neighbourhood_blocks_match_inference():
    from graph_models.sampler import NeighbourSampler

    g, _ = small_graph()
    model = small_model().double()
    seeds = {"user": torch.tensor([2, 0]), "item": torch.tensor([1])}
    blocks = NeighbourSampler(g, [0, 0]).sample_blocks(seeds)
    with torch.no_grad():
        out = model(blocks)
    full = model.inference(g)["emb"]
    assert torch.allclose(out["user"], full["user"][seeds["user"]])
    assert torch.allclose(out["item"], full["item"][seeds["item"]])
