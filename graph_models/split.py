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
