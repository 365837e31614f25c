"""Pure tests of the baselines and the Online Retail time split: small hand-checkable data, no Neo4j."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from graph_models.baselines import (gfcf_scorer, itemknn_scorer, itemknn_similarity,
                                    top_right_singular_vectors, tune_itemknn)
from graph_models.evaluation import evaluate
from graph_models.retail import load_time_split

torch.set_num_threads(2)
# ../shared/data from the project root, as the data README says.
RETAIL = Path(__file__).resolve().parents[2] / "shared/data/online_retail/online_retail.csv.gz"


def small_matrix():
    """5 users x 6 items with weights, an empty user (row 4) and an unseen item (column 5)."""
    return np.array([[1, 1, 0, 0, 0, 0],
                     [0, 2, 1, 0, 1, 0],
                     [1, 0, 0, 3, 1, 0],
                     [0, 1, 1, 1, 0, 0],
                     [0, 0, 0, 0, 0, 0]], dtype=np.float64)


def dense_gfcf(r, alpha, k):
    """GF-CF by its dense formula: R Ñ + alpha R D^-1/2 V_k V_kᵀ D^1/2, with Ñ = R̃ᵀR̃."""
    du, di = r.sum(1), r.sum(0)
    inv = lambda d: np.where(d > 0, 1 / np.sqrt(np.where(d > 0, d, 1)), 0.0)  # noqa: E731
    rt = np.diag(inv(du)) @ r @ np.diag(inv(di))
    _, s, vt = np.linalg.svd(rt)
    v = vt[np.argsort(-s)[:k]].T
    return r @ rt.T @ rt + alpha * r @ np.diag(inv(di)) @ v @ v.T @ np.diag(np.sqrt(di))


def test_gfcf_linear_part_matches_dense_formula():
    r = small_matrix()
    got = gfcf_scorer(sp.csr_matrix(r), alpha=0.0)(np.arange(5)).numpy()
    assert np.isfinite(got).all()
    assert np.allclose(got, dense_gfcf(r, 0.0, 0), atol=1e-6)
    assert np.all(got[4] == 0) and np.all(got[:, 5] == 0)


@pytest.mark.parametrize("k", [2, 5])  # 2: PROPACK; 5 = min(shape): the dense path
def test_gfcf_with_ideal_filter_matches_dense_formula(k):
    r = small_matrix()
    got = gfcf_scorer(sp.csr_matrix(r), alpha=0.3, k=k)(np.arange(5)).numpy()
    assert np.allclose(got, dense_gfcf(r, 0.3, k), atol=1e-5)


def test_singular_vectors_are_repeatable_and_leave_the_rng_alone():
    rng = np.random.default_rng(1)
    m = sp.random(40, 30, density=0.2, random_state=rng, format="csr")
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    for solver in ("propack", "lowrank"):
        a = top_right_singular_vectors(m, 4, seed=7, solver=solver)
        b = top_right_singular_vectors(m, 4, seed=7, solver=solver)
        assert torch.equal(a, b)
    assert torch.equal(torch.rand(1), before)


def test_itemknn_keeps_top_k_of_dense_cosine():
    rng = np.random.default_rng(0)
    x = (rng.random((30, 12)) < 0.3).astype(np.float32)
    co, norms = x.T @ x, np.sqrt(x.sum(0))
    dense = co / (norms[:, None] * norms[None, :] + 5.0)
    np.fill_diagonal(dense, 0)
    full = itemknn_similarity(sp.csr_matrix(x), k=11, shrink=5.0).toarray()
    assert np.allclose(full, dense, atol=1e-6)
    top2 = itemknn_similarity(sp.csr_matrix(x), k=2, shrink=5.0).toarray()
    assert ((top2 > 0).sum(0) <= 2).all()
    for j in range(12):  # each column keeps values no smaller than any it dropped
        kept = top2[:, j] > 0
        assert not kept.any() or dense[kept, j].min() >= dense[~kept, j].max() - 1e-7


def planted():
    """Shrink decides: the shopper's item A has a rare one-off co-buy R and a popular true partner P.

    Items: A=0, P=1, R=2, fillers 3.. Without shrink cos(A,R) = 1/sqrt(15) beats
    cos(A,P) = 8/sqrt(15*100); with shrink 10 P wins. Validation users hold A, want P.
    """
    rows = [[0, 1]] * 8 + [[0, 2], [0]] + [[1, 3 + j] for j in range(92)] + [[0]] * 5
    fit = sp.lil_matrix((len(rows), 95), dtype=np.float32)
    for u, items in enumerate(rows):
        fit[u, items] = 1.0
    val = {u: {1} for u in range(len(rows) - 5, len(rows))}
    return fit.tocsr(), val


def test_tune_itemknn_picks_the_planted_shrink():
    fit, val = planted()
    res = tune_itemknn(fit, val, ks=(1, 50), shrinks=(0, 10), k=1)
    assert (res["k"], res["shrink"]) == (1, 10.0)  # k ties; the first of equal recalls wins
    by = {(g["k"], g["shrink"]): g["recall@1"] for g in res["grid"]}
    assert by == {(1, 0.0): 0.0, (50, 0.0): 0.0, (1, 10.0): 1.0, (50, 10.0): 1.0}
    assert res["users"] == 5 and res["user_selection"] == "all"


def test_tune_itemknn_grid_equals_separate_runs_and_picks_its_best():
    rng = np.random.default_rng(3)
    x = sp.csr_matrix((rng.random((60, 25)) < 0.2).astype(np.float32))
    from graph_models.split import holdout
    fit, val = holdout(x, 0.3, 0)
    res = tune_itemknn(fit, val, ks=(2, 5, 24), shrinks=(0, 3), k=5)
    for g in res["grid"]:
        alone = evaluate(itemknn_scorer(fit, k=g["k"], shrink=g["shrink"]), val, fit, 5)
        assert g["recall@5"] == pytest.approx(alone["recall@5"])
        assert g["ndcg@5"] == pytest.approx(alone["ndcg@5"])
    best = max(res["grid"], key=lambda g: g["recall@5"])
    assert (res["k"], res["shrink"]) == (best["k"], best["shrink"])
    sample = tune_itemknn(fit, val, ks=(5,), shrinks=(0,), k=5, users=10)
    again = tune_itemknn(fit, val, ks=(5,), shrinks=(0,), k=5, users=10)
    assert sample["users"] == 10 and sample["user_selection"].startswith("seeded")
    assert sample["grid"][0]["recall@5"] == again["grid"][0]["recall@5"]


RETAIL_ROWS = """InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country
1,A,ITEM A,1,2011-01-01 10:00:00,1.0,1.0,UK
2,B,ITEM B,2,2011-01-02 10:00:00,2.0,2.0,UK
3,A,item a,1,2011-01-03 10:00:00,3.0,1.0,UK
C4,A,ITEM A,-1,2011-01-03 11:00:00,1.0,1.0,UK
5,B,ITEM B,1,2011-01-04 10:00:00,0.0,1.0,UK
6,C,ITEM C,1,2011-01-04 12:00:00,1.0,,UK
7,B,ITEM B,1,2011-01-05 10:00:00,2.0,1.0,UK
7,C,ITEM C,1,2011-01-05 10:00:00,5.0,1.0,UK
8,A,ITEM A,1,2011-01-06 10:00:00,1.0,2.0,UK
9,A,ITEM A,1,2011-01-07 10:00:00,1.0,1.0,UK
10,D,ITEM D,1,2011-01-08 10:00:00,1.0,1.0,UK
11,B,ITEM B,1,2011-01-09 10:00:00,2.0,3.0,UK
"""


def test_retail_split_by_hand(tmp_path):
    """9 clean rows; the 50% row is invoice 7's second line, so all of invoice 7 is test."""
    path = tmp_path / "retail.csv"
    path.write_text(RETAIL_ROWS)
    s = load_time_split(str(path), train_fraction=0.5, val_fraction=0.5)
    assert list(s.user_ids) == [1, 2] and list(s.item_ids) == ["A", "B"]
    assert s.train.toarray().tolist() == [[2, 0], [0, 1]]  # weights count purchase lines
    assert s.truth == {0: {1}, 1: {0}}  # u1's repeat of A, unknown item C/D, user 3: not evaluated
    assert s.cutoff == pd.Timestamp("2011-01-05 10:00:00")
    assert list(s.description) == ["ITEM A", "ITEM B"] and list(s.unit_price) == [2.0, 2.0]
    assert s.fit.toarray().tolist() == [[1, 0], [0, 0]] and s.val == {}
    assert s.val_cutoff == pd.Timestamp("2011-01-02 10:00:00")


@pytest.mark.skipif(not RETAIL.exists(), reason="shared Online Retail copy not present")
def test_retail_split_is_time_ordered_and_new_items_only():
    s = load_time_split(str(RETAIL))
    for u, items in s.truth.items():  # no test item the user had in train
        assert not items & set(s.train.indices[s.train.indptr[u]:s.train.indptr[u + 1]])
    for u, items in s.val.items():
        assert not items & set(s.fit.indices[s.fit.indptr[u]:s.fit.indptr[u + 1]])
    # Independent recount from the raw file: every counted train line precedes every test line.
    df = pd.read_csv(RETAIL, dtype={"CustomerID": str, "InvoiceNo": str, "StockCode": str})
    df = df[df.CustomerID.notna() & (df.Quantity > 0) & (df.UnitPrice > 0)
            & ~df.InvoiceNo.str.startswith("C")]
    ts = pd.to_datetime(df.InvoiceDate)
    before, after = df[ts < s.cutoff], df[ts >= s.cutoff]
    assert pd.to_datetime(before.InvoiceDate).max() < pd.to_datetime(after.InvoiceDate).min()
    assert s.train.sum() == len(before) and s.train.shape == (
        before.CustomerID.nunique(), before.StockCode.nunique())
    assert 0.79 < len(before) / len(df) <= 0.8
    assert s.fit.sum() < s.train.sum() and s.val_cutoff < s.cutoff
