"""Item content as features: hashed character n-grams of the text, its category, its price bucket."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer

# Hashing keeps the vectorizer stateless (nothing to save but its settings); 2^14 buckets keep the
# SVD's components small enough to ship inside every checkpoint.
N_FEATURES = 2 ** 14
NGRAMS = (2, 4)


def item_text(title=None, description=None, attributes=None) -> str:
    """One string of an item's text fields (attributes as `key value` pairs, sorted by key)."""
    parts = [title or "", description or ""]
    for key in sorted(attributes or {}):
        parts.append(f"{key} {attributes[key]}")
    return " ".join(p for p in parts if p).lower()


def _hasher() -> HashingVectorizer:
    """Character n-grams within word boundaries: short product titles share few whole words."""
    return HashingVectorizer(analyzer="char_wb", ngram_range=NGRAMS, n_features=N_FEATURES,
                             alternate_sign=False, norm=None)


def _unit_rows(m: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (zero rows stay zero)."""
    n = np.sqrt((m * m).sum(axis=1, keepdims=True))
    return np.divide(m, n, out=np.zeros_like(m), where=n > 0)


@dataclass
class ContentEncoder:
    """Fitted once per model version; turns (text, category, price) into a fixed-length float32 row.

    Row = [unit text vector (TF-IDF of hashed n-grams through truncated SVD), category one-hot (the
    version's categories; others all zero), price bucket one-hot (log2 buckets between the fitted
    quantiles), a flag for a missing price].
    """

    idf: np.ndarray          # N_FEATURES
    components: np.ndarray   # text_dim x N_FEATURES (the SVD's rows)
    categories: list
    price_edges: np.ndarray  # log2 bucket edges

    @classmethod
    def fit(cls, texts, categories=None, prices=None, text_dim=256, min_items=3, seed=0) -> "ContentEncoder":
        """Fit on the items of a version: idf and SVD on their texts, the categories of at least
        `min_items` items (a rarer one says little a map can learn, and widens every row), their prices' range."""
        counts = _hasher().transform(list(texts))
        tfidf = TfidfTransformer(sublinear_tf=True).fit(counts)
        x = tfidf.transform(counts)
        k = int(max(1, min(text_dim, x.shape[0] - 1, N_FEATURES - 1)))
        svd = TruncatedSVD(n_components=k, random_state=seed).fit(x)
        counts = Counter(c for c in (categories if categories is not None else []) if c)
        cats = sorted(c for c, n in counts.items() if n >= min_items)
        p = np.asarray([v for v in (prices if prices is not None else []) if v is not None and v > 0], dtype=float)
        if len(p):
            lo, hi = np.floor(np.log2(np.quantile(p, 0.01))), np.ceil(np.log2(np.quantile(p, 0.99)))
            edges = np.arange(lo, hi + 1.0)
        else:
            edges = np.zeros(0)
        return cls(tfidf.idf_.astype(np.float32), svd.components_.astype(np.float32), cats, edges)

    @property
    def dim(self) -> int:
        """Length of a feature row."""
        return self.components.shape[0] + len(self.categories) + len(self.price_edges) + 2

    def text_vectors(self, texts) -> np.ndarray:
        """Unit text vectors (items x text_dim): TF-IDF with the fitted idf, L2-normalised, then the SVD."""
        x = _hasher().transform(list(texts)).astype(np.float32)
        x.data = np.log(x.data) + 1.0  # sublinear tf, as TfidfTransformer fitted it
        x = sp.csr_matrix(x @ sp.diags(self.idf))
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1))).ravel()
        x = sp.diags(np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)) @ x
        return _unit_rows(np.asarray(x @ self.components.T, dtype=np.float32))

    def transform(self, texts, categories=None, prices=None) -> np.ndarray:
        """Feature rows of items (float32, items x dim)."""
        texts = list(texts)
        n = len(texts)
        cat = np.zeros((n, len(self.categories)), dtype=np.float32)
        index = {c: k for k, c in enumerate(self.categories)}
        for row, c in enumerate(categories if categories is not None else [None] * n):
            if c in index:
                cat[row, index[c]] = 1.0
        price = np.zeros((n, len(self.price_edges) + 2), dtype=np.float32)
        for row, v in enumerate(prices if prices is not None else [None] * n):
            if v is None or not np.isfinite(v) or v <= 0:
                price[row, -1] = 1.0  # no price
            else:
                price[row, int(np.searchsorted(self.price_edges, np.log2(v)))] = 1.0
        return np.hstack([self.text_vectors(texts), cat, price])

    def to_state(self) -> dict:
        """Plain tensors and lists, for a checkpoint."""
        import torch
        return {"idf": torch.from_numpy(self.idf), "components": torch.from_numpy(self.components),
                "categories": list(self.categories), "price_edges": torch.from_numpy(self.price_edges)}

    @classmethod
    def from_state(cls, state: dict) -> "ContentEncoder":
        """The encoder `to_state` saved."""
        return cls(np.asarray(state["idf"], dtype=np.float32), np.asarray(state["components"], dtype=np.float32),
                   list(state["categories"]), np.asarray(state["price_edges"], dtype=np.float64))
