"""Exact binomial statistics of attack rates (issue 29: every rate carries n and its bound).

An attack that succeeds on k of n trials has the rate r = k / n and

    interval95 = the two-sided exact (Clopper-Pearson) 95% interval
                 [B(0.025; k, n - k + 1), B(0.975; k + 1, n - k)]
    upper95    = the one-sided exact 95% upper bound B(0.95; k + 1, n - k)   (1 when k = n)

where B(q; a, b) is the q-quantile of the Beta(a, b) distribution. Unlike a bootstrap, these do
not collapse to [0, 0] at k = 0: 0 of 16 has upper95 = 1 - 0.05^(1/16) = 0.171. A gate on a
rate compares upper95 with its threshold, so a rate can pass a threshold t only with at least
`min_trials(t)` trials (149 for t = 0.02).
"""
from __future__ import annotations

import math

from scipy.stats import beta

CONFIDENCE = 0.95


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The two-sided exact interval of a binomial proportion k / n."""
    _check(k, n)
    a = (1.0 - confidence) / 2.0
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1.0 - a, k + 1, n - k))
    return lo, hi


def upper_bound(k: int, n: int, confidence: float = CONFIDENCE) -> float:
    """The one-sided exact upper confidence bound of k / n."""
    _check(k, n)
    return 1.0 if k == n else float(beta.ppf(confidence, k + 1, n - k))


def min_trials(threshold: float, confidence: float = CONFIDENCE) -> int:
    """The fewest trials whose upper bound at zero successes is <= threshold:
    1 - (1 - confidence)^(1/n) <= t  <=>  n >= log(1 - confidence) / log(1 - t)."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"a rate threshold must lie in (0, 1), got {threshold}")
    return math.ceil(math.log(1.0 - confidence) / math.log(1.0 - threshold) - 1e-9)


def rate_record(hits: int, n: int, **extra) -> dict:
    """One attack's result as reports, certificates and gates carry it:
    {"rate", "n", "hits", "upper95", "interval95", **extra}; rate and bounds are None at n = 0
    (nothing was tried: a gate on it fails closed)."""
    if n == 0:
        return {"rate": None, "n": 0, "hits": 0, "upper95": None, "interval95": None, **extra}
    lo, hi = clopper_pearson(hits, n)
    return {"rate": hits / n, "n": n, "hits": hits, "upper95": upper_bound(hits, n), "interval95": [lo, hi], **extra}


def _check(k: int, n: int) -> None:
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
