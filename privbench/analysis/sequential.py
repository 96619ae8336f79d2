"""Sequential seeds (`--seeds auto`): add seeds until a verdict is resolved, keeping the overall
false-verdict rate at alpha.

A verdict ("better" / "worse" than the reference at matched accuracy) is looked at after n0 seeds,
then again after every added seed up to a cap. Testing at 5% at every look calls a true gain of 0
"better" or "worse" more often than 5% of the time (for looks at 3, 4 and 5 seeds about 9% with a
known sd, 10% with the sd estimated from the seeds), so
each look k gets its own, stricter nominal two-sided level alpha_k from a group-sequential design.

The rule (default `rule="pocock"`): Pocock's (1977) group-sequential test, a boundary z_k = c
that is the same at every look, with c solved so that P(|Z_k| >= c at some look | gain 0) = alpha.
The looks' statistics Z_k are those of a mean over n_k seeds, so they are jointly normal with
information fractions t_k = n_k / cap and corr(Z_i, Z_j) = sqrt(t_i / t_j), i <= j; the exit
probabilities are computed by the numerical integration of Armitage, McPherson & Rowe (1969)
(the recursion of Jennison & Turnbull 2000, ch. 19), exact to about 1e-6, for the actual t_k
(looks at 3, 4, 5 seeds are not equally spaced). For equally spaced looks c is Pocock's constant:
2.178 for two looks, 2.289 for three, 2.361 for four at alpha 0.05.

Why Pocock: with a cap of a few seeds the early looks have 2 or 3 degrees of freedom, so a
boundary that is strict early (O'Brien & Fleming 1979) makes stopping at n0 practically impossible
and `--seeds auto` would nearly always run to the cap; Pocock spends alpha evenly, so a large gain
is called at the first look, and the normal-scale design reads at one level at every look (97.4%
CIs for looks at 3, 4 and 5 seeds).
Also available: `"obf"`, O'Brien & Fleming's boundary c / sqrt(t_k); `"ld-pocock"` and `"ld-obf"`,
the Lan & DeMets (1983) alpha-spending functions alpha * ln(1 + (e - 1) t) and
2 - 2 Phi(z_{1-alpha/2} / sqrt(t)), which stay valid when looks happen at other seed counts than
planned (a failed training); `"bonferroni"` (alpha / K per look: valid whatever the correlation,
conservative); `"unadjusted"` (alpha at every look: does NOT control the error, for comparison).

Few seeds, unknown sd. The boundaries above are for normal statistics with a known variance.
With the per-seed sd estimated from the n_k seeds, testing each look at its nominal level with
Student t on n_k - 1 degrees of freedom (the "significance level approach", Pocock 1977;
Jennison & Turnbull 2000, section 3.8) lets about 5.7% through at looks of 3, 4, 5 seeds (the
looks share their sd estimates). So the t boundaries are calibrated: under a gain of 0 the joint
law of the looks' t statistics does not depend on the sd, and a fixed-seed simulation of 400,000
runs sets each look's t boundary so that it spends what the normal design spends at that look
(`Look.t`, `Look.t_alpha`; overall rate 0.050 +- 0.0004 on independent simulations).

References: S. J. Pocock (1977), Group sequential methods in the design and analysis of clinical
trials, Biometrika 64, 191-199. P. C. O'Brien & T. R. Fleming (1979), A multiple testing
procedure for clinical trials, Biometrics 35, 549-556. K. K. G. Lan & D. L. DeMets (1983),
Discrete sequential boundaries for clinical trials, Biometrika 70, 659-663. P. Armitage,
C. K. McPherson & B. C. Rowe (1969), Repeated significance tests on accumulating data, JRSS A
132, 235-244. C. Jennison & B. W. Turnbull (2000), Group Sequential Methods with Applications to
Clinical Trials, Chapman & Hall.

Pure functions: numpy and scipy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from numbers import Integral

import numpy as np
from scipy import optimize
from scipy import stats as sps

from privbench.errors import UserError
from privbench.util.stats import seeds_needed

ALPHA = 0.05  # two-sided, overall
POWER = 0.8
RULES = ("pocock", "obf", "ld-pocock", "ld-obf", "bonferroni", "unadjusted")
VERDICTS = ("better", "worse", "indistinguishable", "continue")
_Z_INF = 40.0  # a boundary nothing crosses (a look that spends no alpha)


@dataclass(frozen=True)
class Look:
    """One planned look: after `n` seeds (the k-th of the plan, 1-based), at information fraction
    `info` = n / cap.

    Normal scale (known variance, or a normal-like interval such as the bootstrap's): `z`, the
    two-sided boundary; `alpha`, its nominal two-sided level 2 (1 - Phi(z)); `spent`, the
    false-verdict probability used up to and including this look. Student t scale (the sd
    estimated from the n seeds): `t`, the boundary on n - 1 degrees of freedom, calibrated so that
    each look spends what the normal design spends at it (inf with one seed: no verdict);
    `t_alpha`, its nominal two-sided level."""

    k: int
    n: int
    info: float
    z: float
    alpha: float
    spent: float
    t: float
    t_alpha: float
    final: bool

    @property
    def level(self) -> float:
        """Confidence level of a normal-scale interval at this look (0.974 for Pocock at 3, 4, 5 seeds)."""
        return 1.0 - self.alpha

    @property
    def t_level(self) -> float:
        """Confidence level of a Student-t interval on n - 1 degrees of freedom at this look."""
        return 1.0 - self.t_alpha

    def t_bound(self, dof: int | None = None) -> float:
        """The Student t boundary: `t` on n - 1 degrees of freedom, else the quantile of the same
        nominal level `t_alpha` on `dof` degrees of freedom (a Welch dof, say); inf below 1."""
        if dof is None or dof == self.n - 1:
            return self.t
        return float(sps.t.isf(self.t_alpha / 2, dof)) if dof >= 1 else math.inf


def plan_looks(n_start: int, cap: int, alpha: float = ALPHA, rule: str = "pocock") -> list[Look]:
    """The looks n = n_start, n_start + 1, ..., cap with their boundaries under `rule` (see the
    module docstring), for an overall two-sided false-verdict rate `alpha`."""
    if not all(isinstance(v, Integral) and not isinstance(v, bool) for v in (n_start, cap)) or not 1 <= n_start <= cap:
        raise UserError(f"sequential seeds need whole numbers 1 <= start <= cap, got start {n_start} and cap {cap}")
    if cap > 100 or cap - n_start >= 50:  # the numerical integration's grid and cost are sized for this
        raise UserError(f"sequential seeds plan at most 50 looks up to a cap of 100 seeds, got {n_start}..{cap}")
    if not 0 < alpha < 1:
        raise UserError(f"alpha must lie in (0, 1), got {alpha}")
    if rule not in RULES:
        raise UserError(f"unknown sequential rule {rule!r} (known: {', '.join(RULES)})")
    return list(_plan(int(n_start), int(cap), float(alpha), rule))


@lru_cache(maxsize=64)
def _plan(n_start: int, cap: int, alpha: float, rule: str) -> tuple[Look, ...]:
    ns = np.arange(n_start, cap + 1)
    info = ns / cap
    z = _boundaries(info, alpha, rule)
    spent = np.cumsum(_exit_probs(info, z))
    if rule in ("unadjusted", "bonferroni"):  # fixed per-look levels: the same levels on the t scale
        t_alpha = 2 * sps.norm.sf(z)
        t = np.array([sps.t.isf(a / 2, n - 1) if n >= 2 else math.inf for a, n in zip(t_alpha, ns)])
    else:
        t = _t_bounds(ns, spent)
        t_alpha = np.array([2 * sps.t.sf(b, n - 1) if n >= 2 else 0.0 for b, n in zip(t, ns)])
    return tuple(
        Look(
            k + 1,
            int(n),
            float(ti),
            float(c),
            float(2 * sps.norm.sf(c)),
            float(s),
            float(tb),
            float(ta),
            k == len(ns) - 1,
        )
        for k, (n, ti, c, s, tb, ta) in enumerate(zip(ns, info, z, spent, t, t_alpha))
    )


_MC_PATHS = 400_000
_MC_SEED = 20_231_977  # fixed: the same plan gives the same boundaries on every machine


def _t_bounds(ns: np.ndarray, spent: np.ndarray) -> np.ndarray:
    """Student t boundaries |T_k| >= b_k that spend, look by look, the cumulative alpha `spent` of
    the normal design. Under a gain of 0 the t statistics' joint law does not depend on the sd,
    so a simulation of standard normal seeds calibrates them: the first usable look exactly (the
    t quantile), later ones as quantiles of |T_k| among the simulated runs still open (Monte Carlo
    error about 0.0004 on the overall rate). What a one-seed look cannot spend carries forward."""
    rng = np.random.default_rng(_MC_SEED)
    total = sq = np.zeros(_MC_PATHS)
    open_ = np.ones(_MC_PATHS, dtype=bool)
    used, seen, out = 0.0, 0, np.full(len(ns), math.inf)
    for i, (n, cum) in enumerate(zip(ns, spent)):
        while seen < n:  # one seed at a time: memory stays O(paths) whatever the cap
            x = rng.standard_normal(_MC_PATHS)
            total, sq, seen = total + x, sq + x * x, seen + 1
        inc = cum - used
        if n < 2 or inc <= 0:
            continue
        mean = total / n
        t = np.abs(mean) / np.sqrt(np.maximum(sq - n * mean * mean, 1e-300) / ((n - 1) * n))
        if used == 0:
            out[i] = sps.t.isf(inc / 2, n - 1)
        else:
            k = int(round(inc * _MC_PATHS))
            live = np.sort(t[open_])[::-1]
            if k < 1:
                continue
            out[i] = live[k - 1] if k >= len(live) else 0.5 * (live[k - 1] + live[k])
        hit = open_ & (t > out[i])
        used += hit.sum() / _MC_PATHS
        open_ &= ~hit
    return out


def _boundaries(info: np.ndarray, alpha: float, rule: str) -> np.ndarray:
    """Two-sided normal boundaries z_k of the looks at information fractions `info` (last = 1)."""
    k = len(info)
    z_fixed = float(sps.norm.isf(alpha / 2))
    if rule == "unadjusted" or k == 1:
        return np.full(k, z_fixed)
    z_bonf = float(sps.norm.isf(alpha / (2 * k)))
    if rule == "bonferroni":
        return np.full(k, z_bonf)
    if rule in ("pocock", "obf"):
        shape = np.ones(k) if rule == "pocock" else 1 / np.sqrt(info)
        # alpha is reached between the unadjusted constant (too liberal) and Bonferroni's (too strict).
        c = optimize.brentq(lambda c: _exit_probs(info, c * shape).sum() - alpha, z_fixed, z_bonf + 0.5, xtol=1e-10)
        return c * shape
    spend = _spending(rule, alpha)
    cum = np.array([spend(t) for t in info])
    cum[-1] = alpha  # the last look spends what is left, whatever the rounding
    inc = np.diff(cum, prepend=0.0)
    z = np.empty(k)
    z[0] = sps.norm.isf(inc[0] / 2) if inc[0] > 0 else _Z_INF
    state = _start(info[0], z[0])
    for i in range(1, k):
        sd = math.sqrt(info[i] - info[i - 1])
        if inc[i] <= 1e-15:
            z[i] = _Z_INF
        else:
            root = math.sqrt(info[i])
            z[i] = optimize.brentq(
                lambda c, st=state, sd=sd, r=root, e=inc[i]: _exit_next(st, sd, c * r) - e, 1e-6, _Z_INF, xtol=1e-10
            )
        state = _advance(state, sd, z[i] * math.sqrt(info[i]))
    return z


def _spending(rule: str, alpha: float):
    """Lan & DeMets' alpha-spending function of `rule`: cumulative alpha at information t."""
    if rule == "ld-pocock":
        return lambda t: alpha * math.log(1 + (math.e - 1) * t)
    z = float(sps.norm.isf(alpha / 2))
    return lambda t: 2 * float(sps.norm.sf(z / math.sqrt(t)))


# The recursion works on the score S_k = Z_k sqrt(t_k): independent normal increments of variance
# t_k - t_{k-1} under gain 0; it keeps the density of S_k on the continuation region |S_k| < b_k.
_State = tuple[np.ndarray, np.ndarray, np.ndarray]  # grid, Simpson weights, density on the grid


def _grid(b: float) -> tuple[np.ndarray, np.ndarray]:
    """Simpson nodes and weights on [-b, b]: about 40 nodes per unit of S, odd count."""
    m = max(201, 2 * int(40 * b) + 1)
    s = np.linspace(-b, b, m)
    w = np.ones(m)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    return s, w * (s[1] - s[0]) / 3


def _start(t1: float, z1: float) -> _State:
    s, w = _grid(min(z1, 12.0) * math.sqrt(t1))
    return s, w, sps.norm.pdf(s, scale=math.sqrt(t1))


def _exit_next(state: _State, sd: float, b: float) -> float:
    """P(no exit so far, |S| >= b at the next look), the increment's sd `sd`."""
    s, w, f = state
    tail = sps.norm.sf((b - s) / sd) + sps.norm.cdf((-b - s) / sd)
    return float(np.dot(w * f, tail))


def _advance(state: _State, sd: float, b: float) -> _State:
    """The density after the next look, on that look's continuation region |S| < b."""
    s, w, f = state
    s_new, w_new = _grid(min(b, abs(s[-1]) + 12.0 * sd))
    # Kernel spacing: the grid must resolve a normal of sd `sd`; refine when increments are tiny.
    if (s_new[1] - s_new[0]) > sd / 4:
        m = 2 * int(2 * s_new[-1] / (sd / 8)) + 1
        s_new = np.linspace(s_new[0], s_new[-1], m)
        w_new = np.ones(m)
        w_new[1:-1:2], w_new[2:-1:2] = 4.0, 2.0
        w_new *= (s_new[1] - s_new[0]) / 3
    d = (s_new[:, None] - s[None, :]) / sd
    kernel = np.exp(-0.5 * d * d) / (sd * math.sqrt(2 * math.pi))  # the normal density, without scipy's overhead
    return s_new, w_new, kernel @ (w * f)


def _exit_probs(info: np.ndarray, z: np.ndarray) -> np.ndarray:
    """P(the first crossing |Z_k| >= z_k happens at look k) under a true gain of 0, per look."""
    out = np.empty(len(info))
    out[0] = 2 * sps.norm.sf(z[0])
    state = _start(info[0], z[0])
    for i in range(1, len(info)):
        sd, b = math.sqrt(info[i] - info[i - 1]), z[i] * math.sqrt(info[i])
        out[i] = _exit_next(state, sd, b)
        if i < len(info) - 1:
            state = _advance(state, sd, b)
    return out


def rescale_ci(
    look: Look, gain: float, lo: float, hi: float, *, level: float = 0.95, dof: int | None = None
) -> tuple[float, float]:
    """An interval (lo, hi) of the gain at confidence `level` (normal-like, e.g. the bootstrap's
    percentile CI) widened about `gain` to this look's level: each side times q / z_{(1+level)/2},
    q the look's normal boundary, or its Student t boundary on `dof` degrees of freedom when given
    (recommended: dof = seeds - 1, which also widens a bootstrap interval that is too narrow at few
    seeds). Keeps the interval's asymmetry."""
    if not 0 < level < 1:
        raise UserError(f"a confidence level lies in (0, 1), got {level}")
    scale = (look.z if dof is None else look.t_bound(dof)) / float(sps.norm.isf((1 - level) / 2))
    return gain - (gain - lo) * scale, gain + (hi - gain) * scale


def decide(look: Look, gain: float, lo: float, hi: float, *, level: float = 0.95, dof: int | None = None) -> str:
    """The verdict at `look` from a gain and its CI at `level` (see `rescale_ci`): "better" when
    the rescaled interval lies above 0, "worse" below 0, else "continue" (add a seed), or
    "indistinguishable" at the final look. A NaN interval resolves nothing."""
    a, b = rescale_ci(look, gain, lo, hi, level=level, dof=dof)
    if a > 0:
        return "better"
    if b < 0:
        return "worse"
    return "indistinguishable" if look.final else "continue"


def decide_t(look: Look, mean: float, sd: float) -> str:
    """The verdict at `look` from per-seed values of the gain over look.n seeds (their mean and
    sample sd): a one-sample t test at the look's nominal level on n - 1 degrees of freedom."""
    t = _t_stat(np.float64(mean), np.float64(sd), look.n)
    bound = look.t
    if t > bound:
        return "better"
    if t < -bound:
        return "worse"
    return "indistinguishable" if look.final else "continue"


def _t_stat(mean: np.ndarray, sd: np.ndarray, n: int) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):  # sd 0: +-inf, or NaN for a mean of 0
        return mean / (sd / math.sqrt(n)) if n >= 2 else np.full(np.shape(mean), np.nan)


def sequential_t(values: np.ndarray, looks: list[Look]) -> tuple[np.ndarray, np.ndarray]:
    """Run the sequential procedure on per-seed values [..., N] (N >= the last look's n; seed i is
    the i-th value), vectorised over the leading axes: at each look the first n values are judged
    by `decide_t`; the first resolved look ends the run. Returns (verdict strings, seeds used)."""
    values = np.asarray(values, dtype=float)
    if values.shape[-1] < looks[-1].n:
        raise UserError(f"{values.shape[-1]} values per run, the last look needs {looks[-1].n}")
    shape = values.shape[:-1]
    verdict = np.full(shape, "indistinguishable", dtype="<U17")
    used = np.full(shape, looks[-1].n)
    open_ = np.ones(shape, dtype=bool)
    for look in looks:
        x = values[..., : look.n]
        t = _t_stat(x.mean(axis=-1), x.std(axis=-1, ddof=1) if look.n >= 2 else np.zeros(shape), look.n)
        bound = look.t
        for word, hit in (("better", t > bound), ("worse", t < -bound)):
            now = open_ & hit
            verdict[now], used[now] = word, look.n
            open_ &= ~now
    return verdict, used


def seeds_to_resolve(
    gain: float, sd: float | None, alpha: float = ALPHA, power: float = POWER, paired: bool = False, most: int = 1000
) -> int | None:
    """Fewest seeds per configuration whose minimum detectable difference is at most |gain|: how
    many seeds resolve a gain of the size observed, given the per-seed sd (privbench.util.stats.
    seeds_needed). The sign of the gain does not matter, and a gain of 0 gives None rather than an
    error. None when the sd is unknown or more than `most` seeds would be needed. To plan with the
    sequential correction pass the last look's nominal level: alpha=plan_looks(...)[-1].alpha."""
    if sd is None or not math.isfinite(sd) or not math.isfinite(gain):
        return None
    if sd < 0 or not 0 < alpha < 1 or not 0 < power < 1:
        raise UserError(f"seeds_to_resolve needs sd >= 0, alpha and power in (0, 1); got {sd}, {alpha}, {power}")
    if gain == 0:
        return None
    return seeds_needed(sd, abs(gain), paired=paired, most=most, alpha=alpha, power=power)
