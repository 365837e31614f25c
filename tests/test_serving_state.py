"""The serving copy's algebra and `apply(state, delta)` on small hand-made graphs, without Neo4j: scores
equal the offline Scorer's, explain's parts add up to the score, filters admit what they say, and a
state moved by a delta equals the state built whole from the same graph, the old state left as it was."""
from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from app.embeddings.models import LoadedModel
from app.serving import delta as delta_module
from app.serving import scoring
from app.serving.delta import Delta, apply
from app.serving.matrices import summed
from app.serving.state import Index, Rows, built
from graph_models import ModelConfig
from graph_models.train import Scorer, build

NOW = 1_767_225_600_000
DAY = 86_400_000
USERS, ITEMS = [f"u{k}" for k in range(7)], [f"i{j}" for j in range(9)]
# Bias, trend and EASE terms on; and an item table of 3 items a row (only the candidates ranked).
SETTINGS = {
    "plain": {},
    "biased": {"bias_temperature": 1.0, "trend_halflife": 7.0, "trend_weight": 0.5, "ease_lambda": 1.0,
               "ease_weight": 0.3, "lin_weights": "log1p"},
    "table": {"lin_topk": 3, "lin_beta": 0.3},
}


def _graph(seed: int = 0) -> dict:
    """(user, item) -> (raw weight, first time): each user with 2-5 items, a few weights negative."""
    rng = np.random.default_rng(seed)
    edges = {}
    for u in USERS:
        for j in rng.choice(len(ITEMS), rng.integers(2, 6), replace=False):
            edges[(u, ITEMS[j])] = (float(rng.choice([-0.5, 1.0, 2.0, 3.5])), float(NOW - rng.integers(0, 30) * DAY))
    return edges


def _model(name: str, edges: dict) -> LoadedModel:
    """A version trained on `edges` (positive weights) with the settings `name`, stored weight scale 1."""
    mcfg = ModelConfig(dim=4, sharp_dim=2, search_trials=0, **SETTINGS[name])
    r = [USERS.index(u) for (u, _), (w, _) in edges.items() if w > 0]
    c = [ITEMS.index(i) for (_, i), (w, _) in edges.items() if w > 0]
    w = [w for w, _ in edges.values() if w > 0]
    model = build(sp.csr_matrix((w, (r, c)), shape=(len(USERS), len(ITEMS))), mcfg).double().eval()
    model.bias.copy_(torch.linspace(-0.2, 0.3, len(ITEMS), dtype=torch.float64))
    meta = {"ref_ms": 0, "decay_anchor_ms": 0, "half_life_days": 1.0, "item_ids": ITEMS}
    return LoadedModel(f"v-{name}", model, mcfg, meta, {i: j for j, i in enumerate(ITEMS)})


def _meta(lm, ids) -> list[dict]:
    """SERVING_ITEMS records of `ids`: items of the version embedded, others not; prices 1, 2, ..."""
    return [{"id": i, "title": f"t{i}", "category": "even" if int(i[1:]) % 2 == 0 else "odd",
             "price": float(int(i[1:]) + 1), "version": lm.version if i in ITEMS else None} for i in ids]


def _whole(lm, edges: dict, item_ids: list, table_mb: float = 256):
    """The state built whole from `edges`, every user of them in id order, items in the order given."""
    users = sorted({u for u, _ in edges})
    item_index = {i: j for j, i in enumerate(item_ids)}
    ptr, cols, w, first = [0], [], [], []
    for u in users:
        for (v, i), (x, f) in sorted(edges.items()):
            if v == u:
                cols.append(item_index[i])
                w.append(x)
                first.append(f)
        ptr.append(len(cols))
    rows = Rows(np.asarray(ptr), np.asarray(cols, dtype=np.int64), np.asarray(w), np.asarray(first))
    return built("e", 1, NOW, lm, Index(users), np.full(len(users), None, dtype=object), rows,
                 _meta(lm, item_ids), item_index, table_mb)


def _scores(st, user: str) -> dict:
    """Every item's score for `user` on `st`, by item id (empty for a user without a vector)."""
    cols, w, _ = st.row(user)
    pos = w > 0
    p = st.vector(cols[pos], w[pos])
    if not p.any():
        return {}
    return dict(zip(st.items.ids, st.scores(p, cols[pos], w[pos])))


def _edges_of(st) -> dict:
    """(user, item) -> raw weight of every edge of `st`, as its rows read."""
    out = {}
    for u in st.users:
        cols, w, _ = st.row(u)
        out.update({(u, st.items.ids[c]): x for c, x in zip(cols.tolist(), w.tolist())})
    return out


def _assert_same(moved, whole) -> None:
    """The same graph, degrees and answers, compared by ids."""
    assert _edges_of(moved) == pytest.approx(_edges_of(whole))
    by_item = lambda st, a: dict(zip(st.items.ids, a))  # noqa: E731
    for name in ("di", "dn", "dr"):
        assert by_item(moved, getattr(moved, name)) == pytest.approx(by_item(whole, getattr(whole, name)), abs=1e-12)
    if whole.tn.max(initial=0) > 0:
        assert by_item(moved, moved.tn / moved.tn.max()) == pytest.approx(by_item(whole, whole.tn / whole.tn.max()))
    for u in whole.users:
        assert _scores(moved, u) == pytest.approx(_scores(whole, u), abs=1e-5)
    assert {i: moved.items.title[j] for i, j in moved.items.index.items()} == \
        {i: whole.items.title[j] for i, j in whole.items.index.items()}


def _snapshot(st) -> dict:
    """What a state holds, deep-copied, to check that it was left as it was."""
    return {"users": dict(st.users), "index": dict(st.items.index), "ids": list(st.items.ids),
            "edges": _edges_of(st), "arrays": {k: copy.deepcopy(getattr(st, k)) for k in ("du", "di", "dn", "dr", "tn")},
            "n": (st.n_users, st.n_items, st.seq), "overlay": set(st.overlay)}


def _assert_unchanged(st, before: dict) -> None:
    after = _snapshot(st)
    for key in ("users", "index", "ids", "edges", "n", "overlay"):
        assert after[key] == before[key], key
    for k, a in before["arrays"].items():
        np.testing.assert_array_equal(after["arrays"][k], a)


@pytest.mark.parametrize("name", ["plain", "biased"])
def test_scores_equal_the_offline_scorer(name):
    edges = {e: v for e, v in _graph().items() if v[0] > 0}
    lm = _model(name, edges)
    st = _whole(lm, edges, ITEMS)
    r = [USERS.index(u) for u, _ in edges]
    c = [ITEMS.index(i) for _, i in edges]
    csr = sp.csr_matrix(([w for w, _ in edges.values()], (r, c)), shape=(len(USERS), len(ITEMS)))
    trend = st.tn / st.tn.max() if lm.mcfg.reads_trend else None
    offline = Scorer(lm.model, csr, trend=trend)(np.arange(len(USERS))).numpy()
    for k, u in enumerate(USERS):
        np.testing.assert_allclose([_scores(st, u)[i] for i in ITEMS], offline[k], atol=1e-5)


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("table_mb", [256, 0], ids=["explain-table", "no-table"])
def test_explain_parts_add_up_to_the_score(name, table_mb):
    edges = _graph(1)
    lm = _model(name, edges)
    st = _whole(lm, edges, ITEMS, table_mb)
    assert (st.table is not None) == (table_mb > 0)
    for u in USERS:
        cols, w, _ = st.row(u)
        pos = w > 0
        cols, a = cols[pos], w[pos]
        p = st.vector(cols, a)
        targets = np.arange(st.n_items)
        s = st.scores(p, cols, a)
        found = st._candidates(cols, a)
        if found is not None:  # a table-served row: its parts add up at its candidates
            targets = found[0]
        total = st.parts(cols, a, targets).sum(axis=0) + (st.bias(targets) if st.bias(targets) is not None else 0)
        np.testing.assert_allclose(total, s[targets], atol=1e-5)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_ranked_is_the_top_k_of_the_admitted_scores(name):
    edges = _graph(2)
    lm = _model(name, edges)
    st = _whole(lm, edges, ITEMS)
    for u in USERS:
        cols, w, _ = st.row(u)
        pos = w > 0
        cols, a = cols[pos], w[pos]
        p = st.vector(cols, a)
        for category, max_price in ((None, None), ("even", None), (None, 4.0), ("odd", 6.0)):
            admit = lambda at: st.mask(category, max_price, cols, at=at)  # noqa: E731
            idx, scores = st.ranked(p, cols, a, 3, admit)
            assert list(scores) == sorted(scores, reverse=True)
            assert all(admit(idx))
            found = st._candidates(cols, a)
            pool = np.flatnonzero(admit(np.arange(st.n_items)))
            if found is not None and len(np.intersect1d(found[0], pool)) >= 3:
                pool = np.intersect1d(found[0], pool)  # what the table's candidates offer
            best = np.sort(st.scores(p, cols, a)[pool])[::-1][:len(idx)]
            # p . q_j in float32: a few gathered rows and the whole product may differ in the last bit
            np.testing.assert_allclose(scores, best, rtol=1e-6, atol=1e-9)


def test_mask_admits_what_the_filters_say():
    edges = _graph(3)
    lm = _model("plain", edges)
    st = _whole(lm, edges, ITEMS + ["i9"])  # i9: not embedded by the version
    everything = np.arange(st.n_items)
    assert st.items.ids[-1] == "i9" and not st.items.embedded[-1]
    assert list(np.flatnonzero(st.mask(None, None))) == list(range(9))
    assert st.mask(None, None, embedded=False).all()
    assert [st.items.ids[j] for j in np.flatnonzero(st.mask("even", 5.0))] == ["i0", "i2", "i4"]
    seen = np.asarray([0, 2])
    np.testing.assert_array_equal(st.mask("even", 5.0, seen), st.mask("even", 5.0, seen, at=everything))
    assert [st.items.ids[j] for j in np.flatnonzero(st.mask("even", 5.0, seen))] == ["i4"]
    top = st.top(np.arange(st.n_items, dtype=float), st.mask(None, 3.0), 5)
    assert [r["item_id"] for r in top] == ["i2", "i1", "i0"] and top[0]["price"] == 3.0


def _moved(edges: dict) -> tuple[dict, dict, list]:
    """The rows a delta over `edges` reads, and the graph and items it leads to: u0's row read again (one edge gone, one new on the
    new item i9), a pending edge of u1 patched, a new user u9, u2 erased, i3 renamed, and the new items."""
    after = dict(edges)
    u0 = {i: v for (u, i), v in edges.items() if u == "u0"}
    gone_item = sorted(u0)[0]
    del after[("u0", gone_item)]
    after[("u0", "i9")] = (2.0, float(NOW))
    u0_row = {i: v for (u, i), v in sorted(after.items()) if u == "u0"}
    after[("u1", "i8")] = (1.5, float(NOW - DAY))
    after[("u9", "i1")] = (1.0, float(NOW))
    after[("u9", "i10")] = (3.0, float(NOW))
    after = {e: v for e, v in after.items() if e[0] != "u2"}
    rows = {"u0": (list(u0_row), [w for w, _ in u0_row.values()], [f for _, f in u0_row.values()], "2026-01-01"),
            "u9": (["i1", "i10"], [1.0, 3.0], [float(NOW)] * 2, None)}
    item_ids = ITEMS + ["i9", "i10"]
    return after, rows, item_ids


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("content", [False, True], ids=["", "mix"])
def test_apply_equals_the_state_built_whole_and_leaves_the_old_one(name, content, monkeypatch):
    edges = _graph(4)
    lm = _model(name, edges)
    if content:  # the new items i9, i10 (and the version's items without an edge) mix their neighbours' scores
        lm = _with_content(lm, edges)
    st = _whole(lm, edges, ITEMS)
    before = _snapshot(st)
    after, rows, item_ids = _moved(edges)
    d = Delta(2, NOW + 1000, rows, ["u0", "u2", "u9"], ["i3"], patches={"u1": {"i8": (1.5, float(NOW - DAY))}},
              erasures=frozenset({("k2", NOW)}), gone=frozenset({"u2"}), pending={("e", "u1", "i8"): 1})
    d = replace(d, items=_meta(lm, sorted({"i3"} | set(d.new_items(st.items.index)))))
    assert d.new_items(st.items.index) == ["i9", "i10"]
    moved = apply(st, d)
    _assert_unchanged(st, before)
    assert "u2" in st.users and "u2" not in moved.users and len(moved.users) == len(st.users)  # u9 came
    assert moved.seq == 2 and moved.server_ms == NOW + 1000 and moved.pending == d.pending
    assert moved.items.ids == item_ids and moved.refreshed[moved.users["u0"]] == "2026-01-01"
    whole = _whole(lm, after, item_ids)
    if name != "table":  # the item table is rebuilt with the base only: compared after a compaction below
        _assert_same(moved, whole)
    monkeypatch.setattr(delta_module, "COMPACT_MIN", 0)
    monkeypatch.setattr(delta_module, "COMPACT_SHARE", 0.0)
    folded = apply(moved, Delta(2, NOW + 2000))  # empty: the state as it is, compacted now
    assert not folded.overlay and moved.overlay and folded.users == moved.users
    _assert_same(folded, whole)


def test_an_empty_delta_leaves_the_state_as_it_is():
    edges = _graph(5)
    st = _whole(_model("plain", edges), edges, ITEMS)
    assert apply(st, Delta(st.seq, NOW + 5)) is st


def test_a_user_erased_and_back_gets_a_new_row():
    edges = _graph(6)
    lm = _model("plain", edges)
    st = _whole(lm, edges, ITEMS)
    gone = apply(st, Delta(2, NOW, {}, ["u3"], gone=frozenset({"u3"})))
    assert "u3" not in gone.users and gone.n_users == st.n_users and len(gone.row("u3")[0]) == 0
    back = apply(gone, Delta(3, NOW, {"u3": (["i0"], [1.0], [float(NOW)], None)}, ["u3"], items=_meta(lm, [])))
    assert back.users["u3"] == st.n_users and back.n_users == st.n_users + 1
    assert [back.items.ids[c] for c in back.row("u3")[0]] == ["i0"] and st.users["u3"] == 3


def test_index_is_never_changed_in_place():
    a = Index(["x", "y", "x", "z"])
    assert dict(a) == {"x": 0, "y": 1, "z": 2} and a.rows == 3
    b = a.with_ids(["w", "y"])
    c = b.without(["x", "w"])
    d = c.with_ids(["x"])
    assert dict(a) == {"x": 0, "y": 1, "z": 2}
    assert dict(b) == {"x": 0, "y": 1, "z": 2, "w": 3}
    assert dict(c) == {"y": 1, "z": 2} and "x" not in c and c.get("x") is None and len(c) == 2
    assert dict(d) == {"y": 1, "z": 2, "x": 4} and d.rows == 5
    flat = d.flat()
    assert dict(flat) == dict(d) and flat.rows == 5 and dict(c) == {"y": 1, "z": 2}


NEW = ["n0", "n1", "n2"]  # items put since the version: titles, no trained row


def _with_content(lm: LoadedModel, edges: dict) -> LoadedModel:
    """`lm` with a content part that mixes: content-kNN's attention (3 neighbours) over the version's
    items with a positive edge, an encoder fitted on their titles, categories and prices."""
    from graph_models.coldstart import ColdConfig, ContentMap, ContentPart
    from graph_models.content import ContentEncoder
    meta = _meta(lm, ITEMS)
    texts, cats, prices = [m["title"] for m in meta], [m["category"] for m in meta], [m["price"] for m in meta]
    enc = ContentEncoder.fit(texts, cats, prices, text_dim=4)
    known = np.asarray(sorted({ITEMS.index(i) for (_, i), (w, _) in edges.items() if w > 0}))
    feats = enc.transform(texts, cats, prices)
    lm.model.content = ContentPart(enc, ContentMap(enc.dim, 3), ColdConfig(neighbours=3), known, feats[known])
    return LoadedModel(lm.version, lm.model, lm.mcfg, lm.meta, lm.item_rows)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_items_without_a_row_score_the_mix_as_the_offline_scorer(name):
    """A version that mixes: new items (one bought since) score as the offline Scorer scores them, are
    candidates where it ranks them, their explain parts add up, and their audience scores are the same."""
    from app.serving import audience
    edges = {e: v for e, v in _graph(5).items() if v[0] > 0}
    lm = _with_content(_model(name, edges), edges)
    live = {**edges, ("u3", "n0"): (2.0, float(NOW))}
    item_ids = ITEMS + NEW
    st = _whole(lm, live, item_ids)
    # the new items, and the version's items without an edge when it was built
    mixing = {st.items.ids[c] for c in st.items.mix.cols}
    assert mixing == set(NEW) | {i for i in ITEMS if not any(j == i for _, j in edges)}
    csr = sp.csr_matrix(([w for w, _ in live.values()], ([USERS.index(u) for u, _ in live],
                                                          [item_ids.index(i) for _, i in live])),
                        shape=(len(USERS), len(item_ids)))
    trend = st.tn / st.tn.max() if lm.mcfg.reads_trend else None
    scorer = Scorer(lm.model, csr, trend=trend, content=lm.cold(_meta(lm, item_ids)))
    offline = scorer(np.arange(len(USERS))).numpy()
    rows = Scorer(lm.model, csr, trend=trend, content=lm.cold(_meta(lm, item_ids))._replace(a=None))
    assert not np.allclose(rows(np.arange(len(USERS))).numpy()[:, 9:], offline[:, 9:], atol=1e-3)
    for k, u in enumerate(USERS):
        cols, w, _ = st.row(u)
        cols, a = cols[w > 0], w[w > 0]
        p = st.vector(cols, a)
        s = st.scores(p, cols, a)
        ok = np.isfinite(offline[k])
        np.testing.assert_allclose(s[ok], offline[k][ok], atol=1e-5)
        found = st._candidates(cols, a)
        if not ok.all():  # ranked over its candidates, the mixing items among them as offline
            assert sorted(found[0].tolist()) == np.flatnonzero(ok).tolist()
        targets = np.arange(st.n_items) if ok.all() else found[0]
        bias = st.bias(targets)
        total = st.parts(cols, a, targets).sum(axis=0) + (bias if bias is not None else 0)
        np.testing.assert_allclose(total, s[targets], atol=1e-5)
    for j in st.items.mix.cols:
        users = np.arange(st.n_users)
        want = [_scores(st, u).get(st.items.ids[j]) for u in USERS]
        got = audience.scores(st, int(j), users)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)  # p . q in float32 in the ranking


def test_a_version_without_content_has_nothing_that_mixes():
    """Gowalla's case (no item text): no content part, so no item takes rows from content or mixes, and
    the offline Scorer and the copy score what they scored without one."""
    from graph_models.coldstart import fit_content
    edges = {e: v for e, v in _graph(6).items() if v[0] > 0}
    lm = _model("table", edges)
    r = [USERS.index(u) for u, _ in edges]
    csr = sp.csr_matrix(([w for w, _ in edges.values()], (r, [ITEMS.index(i) for _, i in edges])),
                        shape=(len(USERS), len(ITEMS)))
    part, report = fit_content(lambda g: build(g, lm.mcfg), csr, [{"title": None}] * len(ITEMS))
    assert part is None and "skipped" in report and lm.model.content is None
    cold = lm.cold(_meta(lm, ITEMS + NEW))
    assert not len(cold.pos) and cold.a is None and not lm.mixes
    users = np.arange(len(USERS))
    with_content = Scorer(lm.model, csr, content=cold)
    assert with_content.mix is None
    assert torch.equal(with_content(users), Scorer(lm.model, csr)(users))
    st = _whole(lm, edges, ITEMS + NEW)
    assert st.items.mix is None and not len(st.items.content.cols)


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "sorted"])
def test_a_reach_is_summed_in_the_rows_order_either_way(dense):
    """An item table's reach summed over the catalogue or by sorting its entries: the items it reaches,
    sorted, and each one's entries added in the rows' order (the same floats as one by one)."""
    rng = np.random.default_rng(3)
    keys = np.concatenate([np.sort(rng.choice(1000, 40, replace=False)) for _ in range(12)]).astype(np.int32)
    values = rng.random(len(keys))
    one_by_one = {}
    for key, value in zip(keys.tolist(), values.tolist()):
        one_by_one[key] = one_by_one.get(key, 0.0) + value
    found, sums = summed(keys, values, 1000, dense)
    assert found.tolist() == sorted(one_by_one)
    assert sums.tolist() == [one_by_one[key] for key in sorted(one_by_one)]


@pytest.mark.parametrize("biased", [False, True], ids=["plain", "biased"])
def test_bounded_ranking_reads_few_rows_and_ranks_as_reading_all(biased, monkeypatch):
    """Many candidates: bounding p . q_j first reads a fraction of their rows and gives the ranking and
    scores that reading every row gives, with filters and with item biases (whose divisor is the largest
    magnitude of every candidate's score)."""
    rng = np.random.default_rng(5)
    n_users, n_items = 300, 2000
    users = rng.integers(n_users, size=12000)
    items = np.minimum((rng.pareto(1.2, size=12000) * 50).astype(np.int64), n_items - 1)
    csr = sp.csr_matrix((np.ones(len(users)), (users, items)), shape=(n_users, n_items))
    csr.data[:] = 1.0
    mcfg = ModelConfig(dim=16, sharp_dim=4, search_trials=0, lin_topk=200,
                       **({"bias_temperature": 1.0} if biased else {}))
    model = build(csr, mcfg).double().eval()
    if biased:
        model.bias.copy_(torch.from_numpy(rng.normal(0, 0.2, n_items)))
    ids = [f"i{j}" for j in range(n_items)]
    lm = LoadedModel("v-bounded", model, mcfg, {"ref_ms": 0, "decay_anchor_ms": 0, "half_life_days": 1.0,
                                                "item_ids": ids}, {i: j for j, i in enumerate(ids)})
    coo = csr.tocoo()
    order = np.lexsort((coo.col, coo.row))
    rows = Rows(np.searchsorted(coo.row[order], np.arange(n_users + 1)), coo.col[order].astype(np.int64),
                coo.data[order], np.full(len(order), float(NOW)))
    item_rows = [{"id": i, "title": None, "category": "even" if j % 2 == 0 else "odd", "price": float(j % 30),
                  "version": lm.version} for j, i in enumerate(ids)]
    st = built("e", 1, NOW, lm, Index(f"u{u}" for u in range(n_users)), np.full(n_users, None, dtype=object),
               rows, item_rows, {}, 0)
    read = []
    low = type(st)._low
    monkeypatch.setattr(type(st), "_low", lambda self, p, cand: read.append(len(cand)) or low(self, p, cand))
    checked = 0
    for u in range(n_users):
        cols, a, _ = st.row(f"u{u}")
        if not len(cols):
            continue
        p = st.vector(cols, a)
        for category, max_price in ((None, None), ("even", None), (None, 10.0)):
            admit = lambda at: st.mask(category, max_price, cols, at=at)  # noqa: E731
            monkeypatch.setattr(scoring, "BOUND_FROM", 0)
            read.clear()
            idx, s = st.ranked(p, cols, a, 20, admit)
            bounded_reads = sum(read)
            monkeypatch.setattr(scoring, "BOUND_FROM", 10**9)
            read.clear()
            all_idx, all_s = st.ranked(p, cols, a, 20, admit)
            assert idx.tolist() == all_idx.tolist()
            np.testing.assert_allclose(s, all_s, rtol=1e-6, atol=1e-9)
            if len(st._candidates(cols, a)[0]) > 500:
                assert bounded_reads < sum(read) / 2
                checked += 1
    assert checked > 50
