"""Small statistics over seeds: mean, sample sd, Student-t interval, minimum detectable difference
and the seeds a difference needs.

Tables and bench scripts summarise a handful of seeds per configuration, where a normal
interval would be far too narrow, so every interval here is Student-t with n-1 degrees of
freedom. scipy gives exact t quantiles; without it a Cornish-Fisher expansion of the normal
quantile stands in (within 1% of the exact quantile from 3 degrees of freedom up).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from statistics import NormalDist
from typing import Any

ALPHA = 0.05  # two-sided
POWER = 0.8


def _finite(values: Iterable[float]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def mean(values: Iterable[float]) -> float:
    """Mean of the finite values; NaN when there are none."""
    vals = _finite(values)
    return math.fsum(vals) / len(vals) if vals else math.nan


def sd(values: Iterable[float]) -> float:
    """Sample standard deviation (n-1 in the denominator); NaN with fewer than two values."""
    vals = _finite(values)
    if len(vals) < 2:
        return math.nan
    m = math.fsum(vals) / len(vals)
    return math.sqrt(math.fsum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def _quantile(dist: str, p: float, dof: float, fallback: Callable[[float, float], float]) -> float:
    """scipy.stats' `dist` quantile with `dof` degrees of freedom; `fallback` without scipy."""
    if dof <= 0:
        return math.nan
    try:
        import scipy.stats

        return float(getattr(scipy.stats, dist).ppf(p, dof))
    except ImportError:
        return fallback(p, dof)


def t_quantile(p: float, dof: float) -> float:
    """The p quantile of Student's t with `dof` degrees of freedom."""
    return _quantile("t", p, dof, _t_quantile_approx)


def _t_quantile_approx(p: float, dof: float) -> float:
    """Cornish-Fisher expansion of t around the normal quantile (Abramowitz & Stegun 26.7.5)."""
    z = NormalDist().inv_cdf(p)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / dof + g2 / dof**2 + g3 / dof**3 + g4 / dof**4


def chi2_quantile(p: float, dof: float) -> float:
    """The p quantile of chi-square with `dof` degrees of freedom (scipy; else bisection on the
    series of the regularised lower incomplete gamma function, exact to about 1e-9)."""
    return _quantile("chi2", p, dof, _chi2_quantile_series)


def _chi2_cdf(x: float, dof: float) -> float:
    """P(dof/2, x/2) = (x/2)^a e^(-x/2) / Gamma(a + 1) * sum_n (x/2)^n / ((a+1)...(a+n))."""
    a, y = dof / 2, x / 2
    if y <= 0:
        return 0.0
    term = total = 1.0
    n = 0
    while term > 1e-16 * total:
        n += 1
        term *= y / (a + n)
        total += term
    return min(1.0, math.exp(a * math.log(y) - y - math.lgamma(a + 1)) * total)


def _chi2_quantile_series(p: float, dof: float) -> float:
    lo, hi = 0.0, dof + 20 * math.sqrt(2 * dof) + 20
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _chi2_cdf(mid, dof) < p else (lo, mid)
    return (lo + hi) / 2


def sd_ci95(values: Iterable[float]) -> tuple[float, float]:
    """95% interval of the population sd from the sample sd of normal values:
    s * sqrt((n-1) / chi2_{0.975}) .. s * sqrt((n-1) / chi2_{0.025}). Five seeds pin an sd down
    only to 0.60 .. 2.87 times the sample sd, ten to 0.69 .. 1.83; (NaN, NaN) below two values."""
    vals = _finite(values)
    if len(vals) < 2:
        return math.nan, math.nan
    s, dof = sd(vals), len(vals) - 1
    return (s * math.sqrt(dof / chi2_quantile(1 - ALPHA / 2, dof)), s * math.sqrt(dof / chi2_quantile(ALPHA / 2, dof)))


def t_ci95(values: Iterable[float]) -> float:
    """Half width of the Student-t 95% interval of the mean (n-1 dof); NaN with fewer than two."""
    vals = _finite(values)
    if len(vals) < 2:
        return math.nan
    return t_quantile(1 - ALPHA / 2, len(vals) - 1) * sd(vals) / math.sqrt(len(vals))


def sd_from_t_ci95(ci: float, n: int) -> float:
    """The sd over n values back from t_ci95's half width (tables keep the half width, not the sd)."""
    return ci * math.sqrt(n) / t_quantile(1 - ALPHA / 2, n - 1)


def welch_ci95(ci_a: float, n_a: int, ci_b: float, n_b: int) -> float:
    """Half width of the Welch 95% interval of mean_b - mean_a, from each mean's Student-t half
    width over n seeds (t_ci95); NaN unless both have two or more seeds."""
    if n_a < 2 or n_b < 2 or any(math.isnan(c) for c in (ci_a, ci_b)):
        return math.nan
    var = [sd_from_t_ci95(c, n) ** 2 / n for c, n in ((ci_a, n_a), (ci_b, n_b))]  # se^2 each
    se2 = var[0] + var[1]
    if se2 == 0:
        return 0.0
    dof = se2**2 / (var[0] ** 2 / (n_a - 1) + var[1] ** 2 / (n_b - 1))
    return t_quantile(1 - ALPHA / 2, dof) * math.sqrt(se2)


def min_detectable_difference(sd_value: float, n: int, *, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest true difference of two means, n seeds per arm and a common sd, that a two-sided
    two-sample t test at level `alpha` finds with probability `power`:
    (t_{1-alpha/2, 2n-2} + t_{power, 2n-2}) * sd * sqrt(2/n). NaN for n < 2 or an unknown sd."""
    if n < 2 or sd_value is None or math.isnan(sd_value):
        return math.nan
    dof = 2 * n - 2
    return (t_quantile(1 - alpha / 2, dof) + t_quantile(power, dof)) * sd_value * math.sqrt(2 / n)


def paired_min_detectable_difference(sd_diff: float, n: int, *, alpha: float = ALPHA, power: float = POWER) -> float:
    """The same for a paired design: n seeds run under both configurations, sd_diff the sd of the
    within-seed differences; a two-sided paired t test finds
    (t_{1-alpha/2, n-1} + t_{power, n-1}) * sd_diff / sqrt(n) with probability `power`."""
    if n < 2 or sd_diff is None or math.isnan(sd_diff):
        return math.nan
    return (t_quantile(1 - alpha / 2, n - 1) + t_quantile(power, n - 1)) * sd_diff / math.sqrt(n)


def seeds_needed(
    sd_value: float,
    difference: float,
    *,
    paired: bool = False,
    most: int = 1000,
    alpha: float = ALPHA,
    power: float = POWER,
) -> int | None:
    """Fewest seeds per arm whose MDD (paired: the paired MDD, sd_value the sd of the within-seed
    differences) is at most `difference`: how many seeds resolve a difference of that size.
    None when the sd is unknown or more than `most` seeds would be needed."""
    if difference <= 0:
        raise ValueError(f"difference must be positive, got {difference}")
    if sd_value is None or math.isnan(sd_value):
        return None
    mdd_of = paired_min_detectable_difference if paired else min_detectable_difference

    def mdd(sd_: float, n: int) -> float:
        return mdd_of(sd_, n, alpha=alpha, power=power)

    # The MDD falls with n: a bisection over [2, most] finds the first n at or under `difference`.
    if mdd(sd_value, most) > difference:
        return None
    lo, hi = 2, most
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if mdd(sd_value, mid) <= difference else (mid + 1, hi)
    return lo


def seed_tile_components(x: Sequence[Sequence[float]]) -> dict[str, float]:
    """Split the seed-to-seed variance of a test score into a model part and a test-set part.

    `x[s][g]` is the score (accuracy) of training seed s on test tile g. The per-seed score
    a_s = mean_g x[s][g] varies for two reasons: the whole model is better or worse (variance
    `model`), and each model gets its own tiles right or wrong (a seed x tile interaction,
    variance `interaction` per tile, averaged over G tiles). The two-way ANOVA without
    replication gives both: the residual mean square MS_e = sum (x - row - col + grand)^2 /
    ((S-1)(G-1)) estimates `interaction`, and var_s(a_s) = model + interaction / G. Returns
    {"total": var_s(a_s), "model": that minus MS_e / G (floored at 0), "interaction": MS_e,
    "tiles": G, "seeds": S}; sd_with(k) = sqrt(model + interaction / (k G)) is the seed sd
    with k times the test tiles. Needs S, G >= 2."""
    rows = [[float(v) for v in row] for row in x]
    s, g = len(rows), len(rows[0]) if rows else 0
    if s < 2 or g < 2 or any(len(r) != g for r in rows):
        raise ValueError("need a full seeds x tiles table with at least 2 of each")
    row_m = [sum(r) / g for r in rows]
    col_m = [sum(r[j] for r in rows) / s for j in range(g)]
    grand = sum(row_m) / s
    ms_e = sum((rows[i][j] - row_m[i] - col_m[j] + grand) ** 2 for i in range(s) for j in range(g))
    ms_e /= (s - 1) * (g - 1)
    total = sd(row_m) ** 2
    return {"total": total, "model": max(0.0, total - ms_e / g), "interaction": ms_e, "tiles": g, "seeds": s}


def mean_ci(values: list[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean, half width of the Student-t confidence interval, sample std (ddof 1), n.

    With fewer than two values the interval is undefined and reported as None.
    """
    n = len(values)
    if n == 0:
        return {"mean": None, "ci95": None, "std": None, "n": 0}
    mean = math.fsum(values) / n
    if n < 2:
        return {"mean": mean, "ci95": None, "std": None, "n": n}
    std = sd(values)
    half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return {"mean": mean, "ci95": half, "std": std, "n": n}


def grouped_mean_ci(values: list[float], groups: list[int] | None, confidence: float = 0.95) -> dict[str, Any]:
    """`mean_ci` for samples that come in groups (crops of one tile): the cluster-robust interval.

    Var(mean) = G/(G-1) * sum_g (S_g - mean * n_g)^2 / N^2 over the G groups (S_g: a group's sum,
    n_g: its size), with a Student t on G-1 degrees of freedom. With one image per group this is
    exactly `mean_ci`. `groups=None` means independent samples. Adds "groups": G.
    """
    if groups is None:
        return mean_ci(values, confidence) | {"groups": len(values)}
    if len(groups) != len(values):
        raise ValueError(f"{len(values)} values but {len(groups)} group ids")
    n = len(values)
    sums: dict[int, list[float]] = {}
    for v, g in zip(values, groups):
        sums.setdefault(int(g), []).append(v)
    out = mean_ci(values, confidence)
    n_groups = len(sums)
    out["groups"] = n_groups
    if n_groups < 2:
        out["ci95"] = None
        return out
    mean = out["mean"]
    dev = math.fsum((math.fsum(vs) - mean * len(vs)) ** 2 for vs in sums.values())
    se = math.sqrt(n_groups / (n_groups - 1) * dev) / n
    out["ci95"] = t_quantile(0.5 + confidence / 2, n_groups - 1) * se
    return out
