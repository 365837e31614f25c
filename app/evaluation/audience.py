"""The audience the API serves (app/serving/audience.py), scored for `evaluate audience`: the fitted model
as a version and the history before the cut as the API's copy of the graph, item by item."""
from __future__ import annotations

import copy

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from app.embeddings.models import LoadedModel
from app.serving import audience
from app.serving.state import Index, Rows, State, built


def copy_of(model, past: sp.csr_matrix) -> State:
    """The API's copy of `past` (users x items, weights as stored) under `model` as a version (scale 1)."""
    model = copy.deepcopy(model).double().eval()
    model.ease = model.ease.float()  # as app.embeddings.models.load serves it
    n_users, n_items = past.shape
    ids = [str(j) for j in range(n_items)]
    lm = LoadedModel("evaluation", model, model.cfg, {"ref_ms": 0, "decay_anchor_ms": 0, "half_life_days": 1.0,
                                                     "item_ids": ids}, {i: j for j, i in enumerate(ids)})
    past = past.tocsr()
    rows = Rows(past.indptr.astype(np.int64), past.indices.astype(np.int64), past.data.astype(np.float64),
                      np.zeros(past.nnz))
    users = Index(str(u) for u in range(n_users))
    items = [{"id": i, "title": None, "category": None, "price": None, "version": lm.version} for i in ids]
    return built("evaluation", 0, 0, lm, users, np.full(n_users, None, dtype=object), rows, items, {}, 0)


def served(model, limit: int):
    """A scorer for graph_models.audienceeval.run: each item's served audience of every candidate (at most
    `limit`), with and without its past buyers; users outside it rank last, tied."""
    def make(past: sp.csr_matrix) -> dict:
        st = copy_of(model, past)

        def columns(include_known: bool):
            def each(items):
                for j in tqdm(items, desc=f"served audiences ({'all' if include_known else 'new'})", leave=False):
                    users, scores = audience.audience(st, int(j), limit, include_known, limit)
                    col = np.full(st.n_users, -np.inf)
                    col[users] = scores
                    yield col
            return each
        return {"all": columns(True), "new": columns(False)}
    return make
