"""The serving copy's rows from content: items without a trained row scored by their metadata's rows
and, for a version that mixes, by the attention mix of the shopper's scores of the items they attend to."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

# Imported with the app, not by the first load of the copy: scikit-learn's import alone took a second
# on a busy host, and requests wait for that load (IG_SERVING_START_WAIT).
import graph_models.content  # noqa: F401


@dataclass(frozen=True)
class ContentRows:
    """Per item column, its row here (-1: the item keeps its table row), those rows (x, q), and for a
    version that mixes, each row's attention over the version's table rows (`a`; None otherwise)."""

    at: np.ndarray
    x: np.ndarray
    q: np.ndarray
    q32: np.ndarray
    cols: np.ndarray  # the item columns with a row here
    a: sp.csr_matrix | None = None

    @classmethod
    def empty(cls, n: int, d: int) -> "ContentRows":
        """No item with rows from content, over n items of embedding size d."""
        return cls.of(np.full(n, -1, dtype=np.int64), np.zeros((0, d)), np.zeros((0, d)))

    @classmethod
    def of(cls, at: np.ndarray, x: np.ndarray, q: np.ndarray, a: sp.csr_matrix | None = None) -> "ContentRows":
        """Rows `x`, `q` (and attention `a`) of the columns `at` points from."""
        return cls(at, x, q, q.astype(np.float32), np.flatnonzero(at >= 0), a)

    def updated(self, lm, metas: list[dict], cols: list[int], n: int) -> "ContentRows":
        """These rows with the items `metas` (SERVING_ITEMS records, at item columns `cols`) read again
        (LoadedModel.cold decides which take rows from content), grown to n items; rows no item points
        to any more are dropped."""
        at = np.full(n, -1, dtype=np.int64)
        at[:len(self.at)] = self.at
        at[np.asarray(cols, dtype=np.int64)] = -1
        pos, x, q, a = lm.cold(metas)
        keep = np.flatnonzero(at >= 0)
        old = at[keep]
        at[keep] = np.arange(len(keep))
        at[np.asarray(cols, dtype=np.int64)[pos]] = len(keep) + np.arange(len(pos))
        if a is not None:  # a version's rows all mix or none do
            a = sp.csr_matrix(sp.vstack([self.a[old] if self.a is not None else sp.csr_matrix((0, a.shape[1])), a]))
        return ContentRows.of(at, np.vstack([self.x[old], x]), np.vstack([self.q[old], q]), a)

    def attention(self, rows: np.ndarray, n: int) -> tuple[np.ndarray, sp.csr_matrix] | None:
        """(the item columns that mix, their attention over item columns: len x n CSR), for items whose
        table rows are `rows` (per column); None when nothing mixes. A table row no column holds is left out."""
        if self.a is None or not len(self.cols):
            return None
        col_of = np.full(self.a.shape[1], -1, dtype=np.int64)
        inside = rows < self.a.shape[1]
        col_of[rows[inside]] = np.flatnonzero(inside)
        m = self.a[self.at[self.cols]].tocoo()
        c = col_of[m.col]
        ok = c >= 0
        return self.cols, sp.csr_matrix((m.data[ok], (m.row[ok], c[ok])), shape=(len(self.cols), n))

    def x_rows(self, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """`rows` (the table's x rows of item columns `cols`) with content rows where items have them."""
        return self._patched(cols, rows, self.x)

    def q_rows(self, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """As `x_rows`, for q."""
        return self._patched(cols, rows, self.q)

    def _patched(self, cols, rows, table):
        if not len(self.cols):
            return rows
        at = self.at[cols]
        on = at >= 0
        if on.any():
            rows = np.array(rows, dtype=np.float64)
            rows[on] = table[at[on]]
        return rows

    def low(self, p: np.ndarray, s: np.ndarray, cols: np.ndarray | None = None) -> np.ndarray:
        """`s` (p . q_j of item columns `cols`, None: every item) with the content rows' products, in
        float32 as the table's (the offline Scorer's precision)."""
        if not len(self.cols):
            return s
        at = self.at if cols is None else self.at[cols]
        on = np.flatnonzero(at >= 0)
        if len(on):
            s[on] = (self.q32[at[on]] @ p.astype(np.float32)).astype(np.float64)
        return s
