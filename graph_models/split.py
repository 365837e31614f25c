"""Per-user hold-out of training interactions, for early stopping on any dataset."""
import numpy as np
import scipy.sparse as sp


def holdout(train_csr, fraction, seed):
    """Split each user's training items into (fit_csr, validation dict); users keep >= 1 item."""
    rng = np.random.default_rng(seed)
    keep = np.ones(train_csr.nnz, dtype=bool)
    val = {}
    for u in range(train_csr.shape[0]):
        lo, hi = train_csr.indptr[u], train_csr.indptr[u + 1]
        n_val = int(round((hi - lo) * fraction)) if hi - lo > 1 else 0
        if n_val:
            pos = lo + rng.choice(hi - lo, size=n_val, replace=False)
            keep[pos] = False
            val[u] = set(int(i) for i in train_csr.indices[pos])
    coo = train_csr.tocoo()
    fit = sp.csr_matrix((coo.data[keep], (coo.row[keep], coo.col[keep])), shape=train_csr.shape)
    return fit, val


def latest_holdout(train_csr, first_csr, fraction):
    """Hold out the latest `fraction` of edges by first time (`first_csr`, same pattern, any unit):
    (fit_csr, {user: items}) for users who keep an older edge, as a time-ordered split does."""
    coo = train_csr.tocoo()
    first = np.asarray(first_csr[coo.row, coo.col]).ravel()
    cut = np.quantile(first, 1.0 - fraction) if len(first) else 0
    late = first >= cut
    if late.all():  # one timestamp for everything: nothing is later than the rest
        late[:] = False
    fit = sp.csr_matrix((coo.data[~late], (coo.row[~late], coo.col[~late])), shape=train_csr.shape)
    kept = np.diff(fit.indptr) > 0
    val: dict = {}
    for u, i in zip(coo.row[late], coo.col[late]):
        if kept[u]:
            val.setdefault(int(u), set()).add(int(i))
    return fit, val


def user_latest_holdout(train_csr, first_csr, fraction):
    """Hold out each user's latest `fraction` of edges by first time (`first_csr`, same pattern; ties
    by item column), rounded, for users with at least two edges, who keep at least one: (fit_csr,
    {user: items}), the per-user time-ordered split of a log whose shoppers come and go."""
    coo = sp.csr_matrix(train_csr).tocoo()
    first = np.asarray(sp.csr_matrix(first_csr)[coo.row, coo.col]).ravel()
    order = np.lexsort((coo.col, first, coo.row))  # by user, then time, then item
    row, col = coo.row[order], coo.col[order]
    count = np.bincount(row, minlength=train_csr.shape[0])
    n_val = np.minimum(np.rint(count * fraction).astype(np.int64), np.maximum(count - 1, 0))
    end = np.cumsum(count)
    rank_from_end = end[row] - np.arange(len(row))  # 1 for a user's latest edge
    late = rank_from_end <= n_val[row]
    keep = np.ones(len(row), dtype=bool)
    keep[order[late]] = False
    fit = sp.csr_matrix((coo.data[keep], (coo.row[keep], coo.col[keep])), shape=train_csr.shape)
    val: dict = {}
    for u, i in zip(row[late], col[late]):
        val.setdefault(int(u), set()).add(int(i))
    return fit, val
