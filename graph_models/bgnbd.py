"""BG/NBD (Fader, Hardie & Lee, Marketing Science 2005): maximum likelihood with scipy, P(alive)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import gammaln


def summary(days: pd.DataFrame, cut: pd.Timestamp) -> pd.DataFrame:
    """Per user, from its active days before `cut`: x repeat days, t_x last minus first, T cut minus first (weeks)."""
    g = days.groupby("user")["day"]
    first, last = g.min(), g.max()
    return pd.DataFrame({"x": (g.size() - 1).astype(float),
                         "t_x": (last - first).dt.days / 7.0,
                         "T": (cut - first).dt.days / 7.0})


def log_likelihood(params, x, t_x, T) -> np.ndarray:
    """Each customer's log-likelihood under (r, alpha, a, b) (the paper's equation 6)."""
    r, alpha, a, b = params
    a1 = gammaln(r + x) - gammaln(r) + r * np.log(alpha)
    a2 = gammaln(a + b) + gammaln(b + x) - gammaln(b) - gammaln(a + b + x)
    a3 = -(r + x) * np.log(alpha + T)
    with np.errstate(divide="ignore", invalid="ignore"):
        a4 = np.where(x > 0, np.log(a) - np.log(np.maximum(b + x - 1, 1e-300)) - (r + x) * np.log(alpha + t_x),
                      -np.inf)
    return a1 + a2 + np.logaddexp(a3, a4)


class BgNbd:
    """BG/NBD with parameters (r, alpha, a, b) fitted by maximum likelihood on log-parameters."""

    def __init__(self, penalizer: float = 0.0):
        self.penalizer = penalizer
        self.params = None

    def fit(self, x, t_x, T) -> "BgNbd":
        """Fit on arrays of repeat counts, recencies and ages (same time unit); returns self."""
        x, t_x, T = (np.asarray(v, dtype=float) for v in (x, t_x, T))

        def loss(logp):
            return -log_likelihood(np.exp(logp), x, t_x, T).mean() + self.penalizer * np.sum(np.exp(logp) ** 2)

        # Another start only when the first stalls on a bound: the surface is flat along a -> 0, b -> inf
        # (no dropout), where one start can stop early.
        best = None
        for start in ([0.0, 0.0, 0.0, 0.0], [-1.0, 1.0, -1.0, 1.0], [0.0, 2.0, 0.5, 0.5]):
            res = minimize(loss, np.array(start), method="L-BFGS-B", bounds=[(-8, 8)] * 4)
            if best is None or res.fun < best.fun:
                best = res
            if best.success and np.all(np.abs(best.x) < 7.9):
                break
        self.params = tuple(float(v) for v in np.exp(best.x))
        self.loss = float(best.fun)
        return self

    def p_alive(self, x, t_x, T) -> np.ndarray:
        """P(still active at T | x, t_x, T) in [0, 1]; 1 for customers without a repeat."""
        r, alpha, a, b = self.params
        x, t_x, T = (np.asarray(v, dtype=float) for v in (x, t_x, T))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            odds = np.where(x > 0, a / np.maximum(b + x - 1, 1e-300)
                            * np.exp((r + x) * (np.log(alpha + T) - np.log(alpha + t_x))), 0.0)
        return 1.0 / (1.0 + odds)

    def p_silent(self, x, t_x, T, t) -> np.ndarray:
        """P(no purchase in (T, T + t]): dead, or alive with a Poisson-gamma rate that gives none."""
        r, alpha, _, _ = self.params
        alive = self.p_alive(x, t_x, T)
        x, T = np.asarray(x, dtype=float), np.asarray(T, dtype=float)
        # while alive, dropout happens only just after a purchase, so none can happen in a silent window
        return (1 - alive) + alive * np.exp((r + x) * (np.log(alpha + T) - np.log(alpha + T + t)))


def simulate(params, n, T, seed=0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, t_x, T) of `n` customers drawn from BG/NBD with `params`, each observed for T: for tests."""
    r, alpha, a, b = params
    rng = np.random.default_rng(seed)
    lam, p = rng.gamma(r, 1.0 / alpha, n), rng.beta(a, b, n)
    xs, txs = np.zeros(n), np.zeros(n)
    for c in range(n):
        t = 0.0
        while True:
            t += rng.exponential(1.0 / lam[c])
            if t > T:
                break
            xs[c] += 1
            txs[c] = t
            if rng.random() < p[c]:
                break
    return xs, txs, np.full(n, float(T))
