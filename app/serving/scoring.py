"""What a state of the serving copy answers: scores, the item table's candidates, the exact top k under
the filters, and the parts of a score that `explain` shows."""
from __future__ import annotations

import math
from functools import cached_property

import numpy as np
import scipy.sparse as sp

from app.embeddings.models import HEAD
from app.serving.matrices import best, filter_weights, grown, inverse, largest, lookup, merged, summed
from graph_models.bias import prior, with_bias
from graph_models.candidates import top_bias


# Float32 rounding's share of |p| |q_j| that a bound on p . q_j leaves room for (80 terms: about 5e-6).
ROUNDING = 1e-4
# Candidates from which bounding their scores first costs less than reading every row (docs/benchmarks.md).
BOUND_FROM = 1024


class Scoring:
    """The ranking algebra of a State (app/serving/state.py), which holds the arrays it reads.

    A score is `p_u . q_j + lin(u, j)` (graph_models/model.py), `lin` as two sparse products over the
    copy's edges or, for a version served from an item table, the table rows of the shopper's items,
    after which only the items they reach are ranked (`ranked`). An item without a trained row of a
    version that mixes (`Items.mix`) also takes the attention mix of its neighbours' filter and EASE
    terms and biases, so that its score is the mix of the shopper's scores of those items plus what its
    own edges add (graph_models.train.Scorer).
    """

    @cached_property
    def _inv_du(self) -> np.ndarray:
        return inverse(self.du)

    @cached_property
    def _bias(self) -> np.ndarray | None:
        """The version's item biases plus the live trend's prior (graph_models.bias), None without biases."""
        if self.lm.bias is None:
            return None
        top = self.tn.max(initial=0.0)
        own = prior(self.lm.mcfg, self.n_items, self.tn / top if top > 0 else self.tn)
        out = self.lm.bias[self.items.rows] + own
        mix = self.items.mix
        if mix is not None:  # a mixing item's bias: its neighbours' (with their trend), and its own trend
            out[mix.cols] = mix.of(out) + own[mix.cols]
        return out

    @cached_property
    def _inv_sqrt_di(self) -> np.ndarray:
        return inverse(np.sqrt(self.di))

    @cached_property
    def _target_di(self) -> np.ndarray:
        """d_j^-beta, the filter's factor of the target item (GF-CF: beta = 1/2)."""
        beta = getattr(self.lm.mcfg, "lin_beta", 0.5)
        return self._inv_sqrt_di if beta == 0.5 else inverse(self.di ** beta)

    def lin(self, cols: np.ndarray, a: np.ndarray) -> np.ndarray:
        """The graph filter of a row with stored weights `a` on item columns `cols`: f(a s) D_I^-1/2 R^T D_U^-1
        R D_I^-1/2, R the copy's f(w s) (`filter_weights`)."""
        if self.nbr is not None:
            out = np.zeros(self.n_items)
            cand, vals = self._reach(cols, a)
            out[cand] = vals
            return out
        isd = self._inv_sqrt_di
        y = np.zeros(self.n_items)
        y[cols] = filter_weights(self.lm)[1](a * self.lm.scale) * isd[cols]
        # Two full sparse products: cheaper than selecting the columns and rows a heavy row reaches.
        z = self.base_csr @ y
        if self.overlay:
            z = z * self.keep + self.over_csr @ y
        w = z * self._inv_du
        t = self.base_t @ (w * self.keep if self.overlay else w)
        if self.overlay:
            t += self.over_t @ w
        return t * self._target_di

    def _reach(self, cols: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The item table's filter of a row (as `lin`): the items its rows reach (sorted) and their values."""
        inside = cols < self.nbr.shape[0]  # items new since the table was built have no row yet
        f = filter_weights(self.lm)[1](a[inside] * self.lm.scale)
        at, lengths = self._entries(cols[inside])
        targets, w = self.nbr.indices[at], self.nbr.data[at] * np.repeat(f, lengths)
        n = self.nbr.shape[0]
        # A wide reach is summed over the whole catalogue, a narrow one sorted (docs/benchmarks.md, the read path).
        cand, vals = summed(targets, w, n, 32 * len(at) > n)
        return cand.astype(np.int64), vals if self.nbr_tilt is None else vals * self.nbr_tilt[cand]

    def _entries(self, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions in the item table of rows `c`'s entries, row after row, and each row's length."""
        ptr = self.nbr.indptr
        lengths = ptr[c + 1] - ptr[c]
        return np.repeat(ptr[c] - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum()), lengths

    def _mixed_reach(self, cand: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The reach `cand` (sorted) with its filter values `vals`, and the mixing items that attend to one of
        them (graph_models.candidates.with_attending), each mixing item's value plus the mix of its
        neighbours' (0 outside the reach): work bounded by the reach's attending items x their neighbours."""
        mix = self.items.mix
        if mix is None or not len(cand):
            return cand, vals
        by = mix.by_item[cand]
        pos = np.unique(by.indices)  # rows of the mixing items that attend to the reach
        if not len(pos):
            return cand, vals
        cand, vals = merged(cand, vals, mix.cols[pos])
        m = mix.a[pos]
        at, hit = lookup(cand, m.indices)
        got = np.where(hit, vals[at], 0.0) * m.data
        rows = np.repeat(np.arange(len(pos)), np.diff(m.indptr))
        vals = vals.copy()
        vals[np.searchsorted(cand, mix.cols[pos])] += np.bincount(rows, weights=got, minlength=len(pos))
        return cand, vals

    @cached_property
    def _top_bias(self) -> np.ndarray:
        """The items of highest bias, which every shopper's candidates include (graph_models.candidates)."""
        return top_bias(self._bias)

    def _candidates(self, cols: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """A table-served row's candidates (sorted) and their filter values, None when every item is scored
        (no table, or EASE, which reads every item)."""
        if self.nbr is None or self.lm.ease is not None:
            return None
        return merged(*self._mixed_reach(*self._reach(cols, a)), self._top_bias)

    def ranked(self, p: np.ndarray, cols: np.ndarray, a: np.ndarray, k: int,
               admit) -> tuple[np.ndarray, np.ndarray]:
        """The k best items that `admit(columns)` (a mask of them) lets through, best first, and their scores:
        a table-served row's candidates only, unless fewer than k of them are new to it or admitted
        (graph_models.candidates: the offline ranking's rule), else every admitted item."""
        found = self._candidates(cols, a)
        if found is None:
            idx = np.flatnonzero(admit(np.arange(self.n_items)))
            s = self.scores(p, cols, a)[idx]
        else:
            cand, lin = found
            lin = self.lm.mcfg.lin_weight * lin
            ok = admit(cand)
            if ok.sum() >= k and len(cand) - lookup(cand, cols)[1].sum() >= self.lm.mcfg.k:
                idx, s = self._bounded(p, cand, lin, ok, k)
            else:  # only the admitted items' rows are read: a selective filter costs what it admits
                top = largest(self._low(p, cand) + lin) if self._bias is not None else 1.0
                idx = np.flatnonzero(admit(np.arange(self.n_items)))
                at, hit = lookup(cand, idx)
                s = self._low(p, idx)
                s[hit] += lin[at[hit]]
                if self._bias is not None:
                    s = s / top + self._bias[idx]
        chosen = best(s, k)
        return idx[chosen], s[chosen]

    def _bounded(self, p: np.ndarray, cand: np.ndarray, lin: np.ndarray, ok: np.ndarray,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
        """The admitted (`ok`) candidates that may be among the k best and their scores, as scoring every
        candidate would give them (to float32's last bit): p . q_j is read only where its bound (q's first columns exactly, the rest
        by its norm) leaves the item a chance, and with biases where it may be the largest magnitude."""
        exact = lambda at: self._low(p, cand[at]) + lin[at]  # noqa: E731
        biased = self._bias is not None
        bias = self._bias[cand] if biased else np.zeros(len(cand))
        if len(cand) < BOUND_FROM:
            s = exact(slice(None))
            return cand[ok], s[ok] / (largest(s) if biased else 1.0) + bias[ok]
        tail, whole = np.linalg.norm(p[HEAD:]), ROUNDING * np.linalg.norm(p)
        w = np.zeros((HEAD + 2, 2), dtype=np.float32)
        w[:HEAD] = p[:HEAD, None]
        w[HEAD:] = [[-tail, tail], [-whole, whole]]
        lo, hi = (np.take(self.lm.q_bound, self.items.rows[cand], axis=0) @ w).T
        lo, hi = lo + lin, hi + lin
        own = np.flatnonzero(self.items.content.at[cand] >= 0) if len(self.items.content.cols) else []
        if len(own):  # rows from content are not the version's: read, not bounded
            lo[own] = hi[own] = exact(own)
        top = 1.0
        if biased:  # the divisor is the largest magnitude of every candidate's score
            mag = np.maximum(np.abs(lo), np.abs(hi))
            first = int(np.argmax(mag))
            top = largest(exact(np.flatnonzero(mag >= min(mag[first], abs(exact([first])[0])))))
            lo, hi = lo / top + bias, hi / top + bias
        admitted = np.flatnonzero(ok)
        first = admitted[np.argpartition(-lo[admitted], k - 1)[:k]]
        floor = (exact(first) / top + bias[first]).min()
        at = admitted[hi[admitted] >= floor]
        return cand[at], exact(at) / top + bias[at]

    def _low(self, p: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """p . q_j of items `cand`: their rows gathered, or (for many) every row's product, which is then cheaper."""
        rows, q = self.items.rows[cand], self.lm.q32
        if 4 * len(cand) > len(q):
            return self.items.content.low(p, (q @ p.astype(np.float32))[rows].astype(np.float64), cand)
        # `take` gathers rows in half the time of fancy indexing (a memory-bound copy either way)
        return self.items.content.low(p, (np.take(q, rows, axis=0) @ p.astype(np.float32)).astype(np.float64), cand)

    def work(self, user_ids: list[str]) -> int:
        """Entries recommending to `user_ids` reads: per user, every edge of the copy (the exact filter's two
        sparse products), or their items' rows of the item table."""
        if self.nbr is None:
            return len(user_ids) * (self.base_csr.nnz + self.over_csr.nnz)
        return sum(len(self.row(u)[0]) for u in user_ids) * self.lm.mcfg.lin_topk

    def vector(self, cols: np.ndarray, a: np.ndarray) -> np.ndarray:
        """p_u of a row of positive raw weights `a` on `cols`: the sum of w * scale * x_i the refresh stores
        (app/embeddings/refresh.py)."""
        x = self.lm.tables[0]
        return (a * self.lm.scale) @ self.x_rows(cols) if len(cols) else np.zeros(x.shape[1])

    def x_rows(self, cols: np.ndarray) -> np.ndarray:
        """x of item columns `cols`: the table's rows, or their content's."""
        return self.items.content.x_rows(cols, self.lm.tables[0][self.items.rows[cols]])

    def scores(self, p: np.ndarray, cols: np.ndarray, a: np.ndarray) -> np.ndarray:
        """Every item's score for a shopper with model-space vector `p` and raw edge weights `a` on `cols`
        (with item biases: divided by the largest magnitude, plus the bias, as graph_models.bias.with_bias)."""
        s = self._unbiased(p, cols, a)
        if self._bias is None:
            return s
        found = self._candidates(cols, a)
        if found is None:
            return with_bias(s[None, :], self._bias)[0].numpy()
        return s / largest(s[found[0]]) + self._bias

    def _unbiased(self, p: np.ndarray, cols: np.ndarray, a: np.ndarray) -> np.ndarray:
        """`scores` before item biases: p . q_j plus the version's filter and EASE terms."""
        s = self.items.content.low(p, (self.lm.q32 @ p.astype(np.float32))[self.items.rows].astype(np.float64))
        mcfg, other = self.lm.mcfg, np.zeros(self.n_items)
        if mcfg.lin_weight:
            other += mcfg.lin_weight * self.lin(cols, a)
        if self.lm.ease is not None:
            other += mcfg.ease_weight * self.lm.ease[self.items.rows[cols[a > 0]]].sum(axis=0)[self.items.rows]
        mix = self.items.mix
        if mix is not None:  # the mixing items' neighbours' terms (their p . q_j is in p . q_hat already)
            other[mix.cols] += mix.of(other)
        return s + other

    def parts(self, cols: np.ndarray, a: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Each own item's part of each target's score (rows: `cols`, columns: `targets`), as docs/cypher.md splits it;
        with item biases, divided as `scores` divides, so that the parts and `bias(targets)` add up to the score."""
        q = self.lm.tables[1]
        s = self.lm.scale
        qt = self.items.content.q_rows(targets, q[self.items.rows[targets]])
        inner = (a * s)[:, None] * (self.x_rows(cols) @ qt.T) + self._other_parts(cols, a, targets)
        mix = self.items.mix
        at = None if mix is None else np.searchsorted(mix.cols, targets)
        hit = np.zeros(len(targets), dtype=bool) if at is None else \
            mix.cols[np.minimum(at, len(mix.cols) - 1)] == targets
        if hit.any():  # a mixing target: the mix of each own item's parts of its neighbours' terms
            m = mix.a[at[hit]]
            near = np.unique(m.indices)
            inner[:, hit] += self._other_parts(cols, a, near) @ m[:, near].T.toarray()
        if self._bias is None:
            return inner
        p, found = self.vector(cols, a), self._candidates(cols, a)
        if found is None:
            return inner / largest(self._unbiased(p, cols, a))
        cand, lin = found  # the candidates' scores alone, as `ranked` divides them
        return inner / largest(self._low(p, cand) + self.lm.mcfg.lin_weight * lin)

    def _other_parts(self, cols: np.ndarray, a: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Each own item's part of each target's filter and EASE terms (rows: `cols`, columns: `targets`)."""
        mcfg, rows, out = self.lm.mcfg, self.items.rows, np.zeros((len(cols), len(targets)))
        if mcfg.lin_weight:
            fa = filter_weights(self.lm)[1](a * self.lm.scale) * mcfg.lin_weight
            out += fa[:, None] * self._filter_block(cols, targets)
        if self.lm.ease is not None:
            out += mcfg.ease_weight * (a > 0)[:, None] * self.lm.ease[np.ix_(rows[cols], rows[targets])]
        return out

    def bias(self, targets: np.ndarray) -> np.ndarray | None:
        """Each target's bias (the version's, plus the live trend's prior): its score's part that no own
        item has (None without biases)."""
        return None if self._bias is None else self._bias[targets]

    def _filter_block(self, cols: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """What one unit of filter weight on each of `cols` adds to each target's filter score: the item
        table's entries, or d_i^-1/2 C[i, j] d_j^-beta of the current rows."""
        if self.nbr is None:
            return self._inv_sqrt_di[cols][:, None] * self._co(cols, targets) * self._target_di[targets][None, :]
        out = np.zeros((len(cols), len(targets)))
        own = np.flatnonzero(cols < self.nbr.shape[0])
        at, lengths = self._entries(cols[own])
        # each entry's column among the targets (sorted once), if it is one
        order = np.argsort(targets, kind="stable")
        pos, hit = lookup(targets[order], self.nbr.indices[at])
        out[np.repeat(own, lengths)[hit], order[pos[hit]]] = self.nbr.data[at][hit]
        return out if self.nbr_tilt is None else out * grown(self.nbr_tilt, self.n_items, 0.0)[targets][None, :]

    def _co(self, cols: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """C[cols, targets] of the current rows, C[i, j] = sum_u R[u, i] R[u, j] / d_u."""
        if self.table is None:
            # The targets' columns dense (users x targets) under the own items' rows of R^T: cheaper
            # than a sparse-sparse product (docs/benchmarks.md).
            w = np.ascontiguousarray((self._rows_t(targets).toarray() * self._inv_du).T)
            return self._rows_t(cols) @ w
        n = len(self.table)  # items added since the table was built have no base edges: zeros
        ci, ti = cols < n, targets < n
        co = np.zeros((len(cols), len(targets)))
        co[np.ix_(ci, ti)] = self.table[targets[ti]][:, cols[ci]].T  # symmetric: whole rows, then a gather
        if self.fix is not None:
            co += self.fix[cols] @ (self.fix[targets].toarray() * self.fix_sign).T
        return co

    def _rows_t(self, items: np.ndarray) -> sp.csr_matrix:
        """The current rows `items` of R^T (len(items) x users)."""
        if not self.overlay:
            return self.base_t[items]
        return self.base_t[items] @ sp.diags(self.keep.astype(np.float64)) + self.over_t[items]

    def mask(self, category: str | None, max_price: float | None, seen: np.ndarray | None = None,
             embedded: bool = True, at: np.ndarray | None = None) -> np.ndarray:
        """Items admitted by the filters, without the `seen` columns: of every item, or of columns `at` (sorted)."""
        items, sel = self.items, slice(None) if at is None else at
        ok = items.embedded[sel].copy() if embedded else np.ones(self.n_items if at is None else len(at), dtype=bool)
        if category is not None:
            ok &= items.category[sel] == category
        if max_price is not None:
            with np.errstate(invalid="ignore"):
                ok &= items.price[sel] <= max_price
        if seen is not None and len(seen):
            if at is None:
                ok[seen] = False
            else:
                pos, hit = lookup(at, seen)
                ok[pos[hit]] = False
        return ok

    def top(self, scores: np.ndarray, ok: np.ndarray, k: int) -> list[dict]:
        """The k best admitted items, best first, as answer rows."""
        idx = np.flatnonzero(ok)
        idx = idx[best(scores[idx], k)]
        return self.answer(idx, scores[idx])

    def answer(self, idx: np.ndarray, scores: np.ndarray) -> list[dict]:
        """Answer rows of item columns `idx` scored `scores`, in that order."""
        items = self.items
        price = items.price[idx]
        return [{"item_id": items.ids[j], "score": s, "title": t, "category": c, "price": None if math.isnan(p) else p}
                for j, s, t, c, p in zip(idx.tolist(), scores.tolist(), items.title[idx].tolist(),
                                         items.category[idx].tolist(), price.tolist())]

