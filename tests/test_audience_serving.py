"""The served audience (app/serving/audience.py) scores each user as their recommendations do."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from app.embeddings.models import LoadedModel
from app.serving import audience
from app.serving.matrices import overlay_matrices
from app.serving.state import Index, Rows, State, built
from graph_models import ModelConfig
from graph_models.train import build

N_USERS, N_ITEMS = 60, 40


def _state(topk: int, biased: bool, eased: bool) -> State:
    """A copy of a small random graph (a few negative edges) under a version with the given parts."""
    rng = np.random.default_rng(3)
    dense = (rng.random((N_USERS, N_ITEMS)) < 0.15) * rng.integers(1, 4, (N_USERS, N_ITEMS)).astype(float)
    dense[rng.random((N_USERS, N_ITEMS)) < 0.02] = -1.0
    dense[:, 0] = 0.0
    dense[:5, 0] = 2.0  # item 0: five buyers
    csr = sp.csr_matrix(np.maximum(dense, 0))
    cfg = ModelConfig(dim=8, sharp_dim=4, search_trials=0, lin_topk=topk, bias_temperature=0.5 if biased else 0.0,
                      ease_lambda=10.0 if eased else 0.0, ease_weight=0.3 if eased else 0.0, lin_weight=0.7)
    model = build(csr, cfg).double().eval()
    if biased:
        model.bias = torch.from_numpy(rng.normal(0, 0.1, N_ITEMS))
    model.ease = model.ease.float()
    lm = LoadedModel(f"t-{topk}-{biased}-{eased}", model, cfg, {"ref_ms": 0, "decay_anchor_ms": 0, "half_life_days": 1.0,
                     "item_ids": [f"i{j}" for j in range(N_ITEMS)]}, {f"i{j}": j for j in range(N_ITEMS)})
    full = sp.csr_matrix(dense)
    rows = Rows(full.indptr.astype(np.int64), full.indices.astype(np.int64), full.data, np.zeros(full.nnz))
    index = Index(f"u{u}" for u in range(N_USERS))
    items = [{"id": f"i{j}", "title": None, "category": None, "price": None, "version": lm.version}
             for j in range(N_ITEMS)]
    return built("t", 0, 0, lm, index, np.full(N_USERS, None, dtype=object), rows, items, {}, 0)


@pytest.mark.parametrize("topk,biased,eased", [(0, False, False), (0, True, True), (10, False, False),
                                               (10, True, False)])
def test_each_user_scores_as_their_recommendations_do(topk, biased, eased):
    st = _state(topk, biased, eased)
    for j in (0, 7, 23):
        users, got = audience.audience(st, j, N_USERS, include_known=True, limit=N_USERS)
        assert len(users) == len(set(users.tolist())) and list(got) == sorted(got, reverse=True)
        for u, s in zip(users.tolist(), got.tolist()):
            cols, w = audience._row(st, u)
            want = st.scores(st.vector(cols, w), cols, w)[j]
            assert s == pytest.approx(want, rel=1e-5, abs=1e-7), (j, u)  # the API sums p . q in float32


def test_known_users_leave_unless_asked_and_candidates_are_bounded():
    st = _state(0, False, False)
    known = set(range(5)) | {u for u in range(N_USERS) if st.row(f"u{u}")[1][st.row(f"u{u}")[0] == 0].size}
    users, _ = audience.audience(st, 0, N_USERS, include_known=False, limit=N_USERS)
    assert users.size and not set(users.tolist()) & known
    every, _ = audience.audience(st, 0, N_USERS, include_known=True, limit=N_USERS)
    assert known <= set(every.tolist())
    for j in range(N_ITEMS):  # a return (negative weight) counts as having the item too
        had = {u for u in range(N_USERS) if j in st.row(f"u{u}")[0].tolist()}
        assert not set(audience.audience(st, j, N_USERS, include_known=False, limit=N_USERS)[0].tolist()) & had
    few, _ = audience.audience(st, 0, N_USERS, include_known=True, limit=12)
    assert len(few) == 12
    # the buyers of the item come first among the candidates (graph), the rest by p . q_j
    assert set(range(5)) <= set(audience._candidates(st, 0, audience._vector_part(st, 0), 12, None).tolist())


def test_an_overlay_row_is_read_as_it_is_now():
    st = _state(0, False, False)
    cols, w = np.asarray([0, 3], dtype=np.int64), np.asarray([5.0, 1.0])
    r = st.users["u40"]
    overlay = {r: (cols, w, np.zeros(2))}
    over_csr, over_t = overlay_matrices(overlay, st.n_users, st.n_items, st.lm)
    keep = st.keep.copy()
    keep[r] = False
    from dataclasses import replace
    st = replace(st, overlay=overlay, over_csr=over_csr, over_t=over_t, keep=keep)
    users, got = audience.audience(st, 3, N_USERS, include_known=True, limit=N_USERS)
    at = users.tolist().index(r)
    assert got[at] == pytest.approx(st.scores(st.vector(cols, w), cols, w)[3], rel=1e-5)
