"""The serving copy's rows from content: items without a trained row scored by their metadata's rows."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Imported with the app, not by the first load of the copy: scikit-learn's import alone took a second
# on a busy host, and requests wait for that load (IG_SERVING_START_WAIT).
import graph_models.content  # noqa: F401


@dataclass(frozen=True)
class ContentRows:
    """Per item column, its row here (-1: the item keeps its table row), and those rows (x, q)."""

    at: np.ndarray
    x: np.ndarray
    q: np.ndarray
    q32: np.ndarray
    cols: np.ndarray  # the item columns with a row here

    @classmethod
    def empty(cls, n: int, d: int) -> "ContentRows":
        """No item with rows from content, over n items of embedding size d."""
        return cls.of(np.full(n, -1, dtype=np.int64), np.zeros((0, d)), np.zeros((0, d)))

    @classmethod
    def of(cls, at: np.ndarray, x: np.ndarray, q: np.ndarray) -> "ContentRows":
        """Rows `x`, `q` of the columns `at` points from."""
        return cls(at, x, q, q.astype(np.float32), np.flatnonzero(at >= 0))

    def updated(self, lm, metas: list[dict], cols: list[int], n: int) -> "ContentRows":
        """These rows with the items `metas` (SERVING_ITEMS records, at item columns `cols`) read again
        (LoadedModel.cold decides which take rows from content), grown to n items; rows no item points
        to any more are dropped."""
        at = np.full(n, -1, dtype=np.int64)
        at[:len(self.at)] = self.at
        at[np.asarray(cols, dtype=np.int64)] = -1
        pos, x, q = lm.cold(metas)
        keep = np.flatnonzero(at >= 0)
        old = at[keep]
        at[keep] = np.arange(len(keep))
        at[np.asarray(cols, dtype=np.int64)[pos]] = len(keep) + np.arange(len(pos))
        return ContentRows.of(at, np.vstack([self.x[old], x]), np.vstack([self.q[old], q]))

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
