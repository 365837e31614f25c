"""Pure tests of item content features and the learned content map (no Neo4j, no Flask)."""
import numpy as np
import scipy.sparse as sp
import torch

from graph_models import ModelConfig
from graph_models.checkpoint import load_checkpoint, save_checkpoint
from graph_models.coldstart import ColdConfig, ContentPart, choose_and_train, hide_items, recall_among, tables
from graph_models.content import ContentEncoder, item_text
from graph_models.train import build

torch.set_num_threads(2)

KINDS = ("heart t-light holder", "cake stand tier", "jumbo bag retrospot", "enamel mug kitchen")
COLOURS = ("red", "pink", "blue", "white", "green", "ivory")


def catalogue():
    """24 items, four kinds of six colours; the kind is the category and sets the price."""
    items = []
    for k, kind in enumerate(KINDS):
        for colour in COLOURS:
            items.append({"title": f"{colour} {kind}", "category": kind.split()[-1], "price": 2.0 * 4 ** k})
    return items


def shoppers(n_users=80, seed=0):
    """Each shopper buys 3-5 items of one kind (and now and then one other item)."""
    rng = np.random.default_rng(seed)
    rows, cols = [], []
    for u in range(n_users):
        kind = u % len(KINDS)
        own = rng.choice(len(COLOURS), size=rng.integers(3, 6), replace=False) + kind * len(COLOURS)
        extra = rng.integers(0, len(KINDS) * len(COLOURS), size=int(rng.random() < 0.3))
        for i in [*own, *extra]:
            rows.append(u)
            cols.append(int(i))
    m = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_users, len(KINDS) * len(COLOURS)))
    m.sum_duplicates()
    return m


def features(items, encoder=None):
    texts = [item_text(it["title"]) for it in items]
    cats, prices = [it["category"] for it in items], [it["price"] for it in items]
    enc = encoder or ContentEncoder.fit(texts, cats, prices, text_dim=8)
    return enc, enc.transform(texts, cats, prices)


def test_features_are_deterministic_and_keep_their_parts():
    items = catalogue()
    enc, f = features(items)
    assert f.shape == (24, enc.dim) and f.dtype == np.float32
    again = ContentEncoder.from_state(enc.to_state())
    texts = [item_text(it["title"]) for it in items]
    assert np.array_equal(again.transform(texts, [it["category"] for it in items], [it["price"] for it in items]), f)
    text = f[:, :enc.components.shape[0]]
    assert np.allclose((text * text).sum(1), 1.0, atol=1e-5)
    # an unknown category is all zero; a missing price is its own flag; a price picks one bucket
    row = enc.transform(["red mug"], ["teapot"], [None])[0]
    cat = slice(enc.components.shape[0], enc.components.shape[0] + len(enc.categories))
    assert row[cat].sum() == 0 and row[-1] == 1.0 and row[cat.stop:-1].sum() == 0
    priced = enc.transform(["red mug"], ["kitchen"], [3.0])[0]
    assert priced[cat].sum() == 1.0 and priced[cat.stop:].sum() == 1.0 and priced[-1] == 0.0


def test_character_ngrams_make_short_titles_alike():
    enc, _ = features(catalogue())
    v = enc.text_vectors(["red heart t-light holders", "red heart t-light holder", "blue jumbo bag"])
    assert v[0] @ v[1] > v[0] @ v[2]


def test_attributes_enter_the_text_in_a_fixed_order():
    assert item_text("Mug", None, {"b": "2", "a": "1"}) == item_text("Mug", None, {"a": "1", "b": "2"}) == "mug a 1 b 2"


def test_the_learned_map_ranks_hidden_items_of_the_shoppers_kind_first(tmp_path):
    items, graph = catalogue(), shoppers()
    enc, feats = features(items)
    fit_g, hidden, truth = hide_items(graph, 0.25, seed=3)
    cfg = ModelConfig(dim=8, sharp_dim=4, degree=1)
    model = build(fit_g, cfg)
    ccfg = ColdConfig(neighbours=5, epochs=15, batch_users=40, patience=15)
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(tmp_path / "runs")
    net, report = choose_and_train(lambda g: build(g, cfg), fit_g, feats, ccfg, grid=({},), share=0.25,
                                   progress=False, writer=writer)
    writer.close()
    assert list((tmp_path / "runs").glob("events.out.tfevents.*"))  # the curves, as `train` writes its own
    assert report["trials"] and report["chosen"]["neighbours"] == 5
    losses = [r["loss"] for r in report["history"][1:]]
    assert losses[-1] < losses[0]  # gradient steps lowered the stated loss
    p, x, q = tables(model, fit_g)
    known = np.flatnonzero(np.asarray(fit_g.sum(axis=0)).ravel() > 0)
    _, q_hat = net.rows(feats[hidden], feats[known], x[known], q[known])
    learned = recall_among(p, q_hat, truth, k=3)["recall@3"]
    rng = np.random.default_rng(0)
    chance = recall_among(p, rng.normal(size=q_hat.shape), truth, k=3)["recall@3"]
    assert learned > chance + 0.2
    # saved with the version: the same rows after a round trip
    model.content = ContentPart(enc, net, ccfg, known, feats[known])
    save_checkpoint(tmp_path / "m.pt", model, cfg, {"item_ids": []})
    loaded, _, _ = load_checkpoint(tmp_path / "m.pt")
    x1, q1, a1 = model.content.rows(items[:3], x, q)
    x2, q2, a2 = loaded.content.rows(items[:3], x, q)
    assert np.array_equal(q1, q2) and np.array_equal(x1, x2) and q1.shape == (3, model.out_dim)
    assert (a1 != a2).nnz == 0 and loaded.content.mixes and np.allclose(q1, a1 @ q)
    # a version saved before the mix keeps scoring such items by their rows
    state = model.content.to_state()
    state["config"] = {k: v for k, v in state["config"].items() if k != "score"}
    assert not ContentPart.from_state(state).mixes
    # a new row is a convex mix of known rows: attention weights are non-negative and sum to 1
    a = net.attention(torch.as_tensor(feats[hidden]), torch.as_tensor(feats[known])).detach().numpy()
    assert (a >= 0).all() and np.allclose(a.sum(1), 1.0, atol=1e-5) and ((a > 0).sum(1) <= 5).all()


def test_the_baselines_rank_by_what_they_claim():
    from graph_models.coldeval import Content, category, category_popularity, content_knn
    assert category("WHITE HANGING HEART T-LIGHT HOLDER") == "holder" and category("") is None
    items = catalogue()
    content = Content([it["title"].upper() for it in items], [it["price"] for it in items], np.arange(18))
    graph = sp.csr_matrix(([1.0, 1.0], ([0, 1], [0, 6])), shape=(2, 24))  # a red holder; a red cake stand
    knn = content_knn(graph, content.tfidf())(np.array([0, 1])).numpy()
    assert knn[0, 1:6].min() > knn[0, 6:].max()  # other holders first for the holder's shopper
    pop = category_popularity(graph, content.cats)(np.array([1])).numpy()[0]
    assert pop[7:12].min() > pop[12:].max()  # other tiers (cake stands) first for the cake stand's shopper


def test_a_version_gets_a_content_part_only_from_enough_described_items():
    from graph_models.coldstart import fit_content
    cfg = ModelConfig(dim=8, sharp_dim=4, degree=1)
    graph = shoppers()
    part, report = fit_content(lambda g: build(g, cfg), graph, [{"title": None}] * 24)
    assert part is None and "skipped" in report
    items = catalogue() * 3  # 72 described items, the last 48 without edges
    graph = sp.hstack([graph, sp.csr_matrix((graph.shape[0], 48))]).tocsr()
    part, report = fit_content(lambda g: build(g, cfg), graph, items,
                               ColdConfig(neighbours=5, epochs=3, batch_users=40), progress=False, grid=({},))
    assert part is not None and list(part.known) == list(range(24)) and part.known_feats.shape[0] == 24


def _without_last(n):
    """The shoppers' graph with its last n items' edges removed."""
    g = shoppers()
    return sp.hstack([g[:, :-n], sp.csr_matrix((g.shape[0], n))]).tocsr()


def _mixing_scorer(mcfg, graph, cold, a, biases=True):
    """A version built on `graph` whose items `cold` (no edges) are scored by the attention `a` (rows:
    cold items, columns: the graph's items) of full scores, with item biases when asked."""
    from graph_models.train import Scorer
    model = build(graph, mcfg)
    if biases:
        model.bias.copy_(torch.linspace(-0.3, 0.2, model.num_items))
    _, x, q = tables(model, graph)
    return model, Scorer(model, graph, content=(cold, a @ x, a @ q, a))


def test_an_item_without_a_row_scores_the_mix_of_its_neighbours_full_scores():
    """With the filter, EASE and biases, a mixed item's score (as served) is the attention mix of the
    shopper's final scores of the items it attends to: it takes their scale, and it ranks among them."""
    from graph_models.train import Scorer
    graph = _without_last(4)  # four items without edges: the new ones
    mcfg = ModelConfig(dim=8, sharp_dim=4, degree=1, search_trials=0, bias_temperature=0.5, ease_lambda=10.0,
                       ease_weight=0.5, lin_weights="log1p")
    cold = np.arange(20, 24)
    rng = np.random.default_rng(1)
    dense = np.zeros((4, 24))
    for r in range(4):
        near = rng.choice(20, size=3, replace=False)
        dense[r, near] = rng.dirichlet(np.ones(3))
    a = sp.csr_matrix(dense)
    model, mixed = _mixing_scorer(mcfg, graph, cold, a)
    users = np.arange(12)
    full = Scorer(model, graph)(users).numpy().astype(np.float64)  # the known items' final scores
    got = mixed(users).numpy().astype(np.float64)
    assert np.allclose(got[:, :20], full[:, :20], atol=1e-5)  # a known item's score is what it was
    assert np.allclose(got[:, cold], full[:, :20] @ dense[:, :20].T, atol=1e-5)
    # by rows alone, the same items score p_u . q_hat only: a different ranking of them
    _, x, q = tables(model, graph)
    rows = Scorer(model, graph, content=(cold, a @ x, a @ q, None))(users).numpy()
    assert not np.allclose(rows[:, cold], got[:, cold], atol=1e-3)


def test_a_mixed_item_is_a_candidate_of_the_shoppers_whose_reach_holds_its_neighbours():
    """Served from an item table, an item without a row is ranked for a shopper when one of the items it
    attends to is among the shopper's candidates (graph_models.candidates.with_attending), else not."""
    graph = _without_last(4)
    mcfg = ModelConfig(dim=8, sharp_dim=4, degree=1, search_trials=0, lin_topk=2)
    dense = np.zeros((1, 24))
    dense[0, [0, 1]] = 0.5  # like two heart holders, which only the holders' rows reach
    model, mixed = _mixing_scorer(mcfg, graph, np.array([20]), sp.csr_matrix(dense), biases=False)
    s = mixed(np.arange(80)).numpy()
    reach = (sp.csr_matrix(graph > 0, dtype=np.float32) @ mixed.reach).toarray() > 0
    assert reach[:, 20].any() and not reach[:, 20].all()
    narrow = np.isfinite(s).sum(axis=1) < 24  # ranked over its candidates, not every item
    assert (np.isfinite(s[:, 20]) == (reach[:, 20] | ~narrow)).all()
