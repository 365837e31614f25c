"""What a ranking served from an item table scores: the items the shopper's items' rows reach, plus the
items of highest bias.

With the filter held as an item table (spectral.item_table), an item outside those rows has no filter
score, so scoring the rows' items alone is what keeps a request's cost to the shopper's items x the
row length. Biases are divided by the largest magnitude among these candidates; a shopper with fewer
than k candidates new to them is ranked over every item instead.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

TOP_BIAS = 256  # items of highest bias every shopper's candidates include


def top_bias(bias, n: int = TOP_BIAS) -> np.ndarray:
    """The `n` items of highest bias (none without biases), lowest index first among ties."""
    if bias is None or not len(bias):
        return np.zeros(0, dtype=np.int64)
    b = np.asarray(bias, dtype=np.float64)
    n = min(n, len(b))
    return np.sort(np.argsort(-b, kind="stable")[:n])


def pattern(table):
    """The item table's entries as 1s (float32 CSR): what `restricted` reads."""
    return (table != 0).astype(np.float32)


def with_attending(reach_of, cols, a):
    """`reach_of` (items x items pattern) that also reaches, from every item it reaches, the items `cols`
    whose attention rows `a` (len(cols) x items) hold that item: an item without a trained row is a
    candidate when one of the known items it mixes is (coldstart: the full-score mix)."""
    m = sp.csr_matrix(a).tocoo()
    n = reach_of.shape[1]
    attends = sp.csr_matrix((np.ones(m.nnz, dtype=np.float32), (m.col, np.asarray(cols)[m.row])), shape=(n, n))
    return pattern(reach_of + reach_of @ attends)


def restricted(s, rows, reach_of, bias, k: int, n_bias: int = TOP_BIAS) -> torch.Tensor:
    """Scores `s` (users x items, before biases) of users with rows `rows` (users x items CSR): -inf
    outside each user's candidates (the items `reach_of`, an item table's `pattern`, has in their items'
    rows, and the n_bias of highest bias), divided by the largest candidate magnitude plus `bias` with biases."""
    s = torch.as_tensor(s)
    n = s.shape[1]
    reach = (rows > 0).astype(np.float32) @ reach_of
    cand = np.zeros(s.shape, dtype=bool)
    cand[:, :reach.shape[1]] = reach.toarray() > 0
    extra = top_bias(bias, n_bias)
    cand[:, extra[extra < n]] = True
    own = np.zeros(s.shape, dtype=bool)
    own[:, :rows.shape[1]] = rows.toarray() > 0
    wide = (cand & ~own).sum(axis=1) < k  # too few new candidates: every item
    mask = torch.from_numpy(cand)
    if bias is not None:
        top = torch.where(mask, s.abs(), torch.zeros_like(s)).amax(dim=1, keepdim=True)
        b = torch.zeros(n, dtype=s.dtype)
        b[:min(n, len(bias))] = torch.as_tensor(bias[:n], dtype=s.dtype)
        s = s / torch.where(top > 0, top, torch.ones_like(top)) + b
    mask |= torch.from_numpy(wide)[:, None]
    return torch.where(mask, s, torch.full_like(s, -torch.inf))
