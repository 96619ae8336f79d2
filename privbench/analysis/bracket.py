"""A reference that brackets every defense: plan the reference strengths to add so that each
defense's accuracy lies inside the reference family's accuracy range, where it gets a
matched-accuracy verdict instead of "extrapolation only".

Inputs are plain numbers. The reference is a list of (strength, accuracy) rows, several seeds
per strength allowed; a strength's point is the mean of its finite accuracies, as a
configuration's point is in the frontier. Accuracies are fractions (0.912). A defense is
*bracketed* when min <= accuracy <= max over the reference's points (the frontier's test for
"not extrapolated", with the same 1e-12 tolerance).

The rule for the next strength (one round, `plan` / `next_strengths`):
- Side. A defense above the range needs a more accurate reference point: a smaller strength when
  accuracy falls as the knob rises (`Knob.falls`, true for noise and dropout), else a larger one;
  below the range, the other way.
- Fewest strengths: one per side and round, aimed at that side's most extreme defense; a point
  past it brackets the others on its side too. With one strength left in the cap, the side with
  more defenses (then the larger gap) gets it.
- Where. Accuracy is taken as linear in the knob's scale (`Knob.scale`: log(s - lo) for noise,
  logit of the rate for a rate in (lo, hi), or linear) through the two strengths at that end of
  the swept range, and the line is solved for the aim: the target pushed past by
  max(0.5 point, the standard error of one strength's mean from the seeds' spread, half the
  distance from the end's accuracy to the target). The half distance is there because accuracy
  against log noise is concave (flat near the knob-off ceiling, steeper at large noise): a secant
  falls short toward the ceiling, and the margin makes one point usually enough.
- Noisy curves. When the line's slope has the wrong sign, or its two points differ by less than
  the standard error of a difference of two means, the line is noise: the strength steps
  geometrically instead (`Knob.step`: twice or half the distance to lo on a log knob, the odds
  times or over two on a logit knob, halfway to the bound on a linear one).
- Limits. A step moves at most a decade on a log or logit knob (odds times 10) and at most 90%
  of the way to a bound on a linear one; a strength stays strictly inside (lo, hi). Strengths are
  rounded to 3 significant digits, so a proposal is canonical and its configuration hash stable
  (0.283, not 0.2828427...). A strength already among the points or already added is never
  proposed again (one more geometric step instead).
- Cap. `cap` counts the strengths added over all rounds (each trained with the caller's seeds).
  Once it is spent a defense still outside is "could not bracket", with the strength the line
  puts at its accuracy. A defense whose side ends at the knob's bound, already swept (above the
  best accuracy with noise 0, the knob off, among the points), cannot be bracketed at all: by
  default it is reported so; `on_impossible="raise"` makes it a UserError.

Why logit for a rate: near 0 it acts as a log scale (where sweeps of a dropout rate sit), its
steps stay inside (0, 1) without clamping, and it treats a rate and its complement alike.

`bracket` drives the rounds: propose, train (the caller's function), repeat until every defense
is bracketed or the cap is spent. Pure functions: numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from typing import Literal

import numpy as np

from privbench.errors import UserError

Scale = Literal["log", "logit", "linear"]
STATUSES = ("bracketed", "train", "could not bracket")
CAP = 3
MIN_MARGIN = 0.005  # half a point of accuracy
TOL = 1e-12  # as the frontier's extrapolation test
_DECADE = math.log(10.0)


@dataclass(frozen=True)
class Knob:
    """The reference's knob: its name (for messages), valid range (lo, hi), the scale accuracy is
    interpolated on, whether accuracy falls as the knob rises, and `start`, the strength to try
    above lo when every reference point sits at lo (the knob off) and nothing else gives a scale.
    A strength equal to lo is allowed among the points and means "off"; proposals lie strictly
    inside (lo, hi)."""

    name: str = "noise"
    lo: float = 0.0
    hi: float = math.inf
    scale: Scale = "log"
    falls: bool = True
    start: float | None = None

    def __post_init__(self) -> None:
        if self.scale not in ("log", "logit", "linear"):
            raise UserError(f"knob {self.name}: unknown scale {self.scale!r} (log, logit or linear)")
        if not (math.isfinite(self.lo) and self.lo < self.hi):
            raise UserError(f"knob {self.name}: its range needs a finite lo below hi, got ({self.lo}, {self.hi})")
        if self.scale in ("logit", "linear") and not math.isfinite(self.hi):
            raise UserError(f"knob {self.name}: a {self.scale} scale needs a finite hi, got {self.hi}")
        if self.start is not None and not self.lo < self.start < self.hi:
            raise UserError(f"knob {self.name}: start {self.start} lies outside ({self.lo}, {self.hi})")

    def to_x(self, s: float) -> float:
        """The strength on the interpolation scale (-inf / inf at the bounds of log and logit)."""
        if self.scale == "linear":
            return s
        u = s - self.lo if self.scale == "log" else (s - self.lo) / (self.hi - self.lo)
        if u <= 0:
            return -math.inf
        if self.scale == "log":
            return math.log(u)
        return math.inf if u >= 1 else math.log(u / (1 - u))

    def from_x(self, x: float) -> float:
        if self.scale == "linear":
            return x
        if self.scale == "log":
            return self.lo + math.exp(x)
        return self.lo + (self.hi - self.lo) / (1 + math.exp(-x))

    def step(self, s: float, direction: int) -> float:
        """One geometric step from s, up (+1) or down (-1), strictly inside (lo, hi)."""
        if self.scale == "linear":
            return (s + (self.hi if direction > 0 else self.lo)) / 2
        x = self.to_x(s)
        if not math.isfinite(x):  # at a bound: nothing to double
            raise UserError(f"knob {self.name}: no geometric step from its bound {s:g}")
        return self.from_x(x + direction * math.log(2.0))


NOISE = Knob("noise", 0.0, math.inf, "log", falls=True, start=0.1)
DROPOUT = Knob("rate", 0.0, 1.0, "logit", falls=True, start=0.1)


@dataclass(frozen=True)
class Target:
    """One defense in a plan. status: "bracketed", "train" (`strength` is proposed this round to
    bracket it) or "could not bracket" (`message` says why). `needed`: for a defense outside the
    range, the strength the reference's local line puts at its accuracy (None without a usable
    line or beyond the knob's range)."""

    name: str
    accuracy: float
    status: str
    strength: float | None = None
    needed: float | None = None
    message: str = ""


@dataclass(frozen=True)
class Plan:
    """One round: the strengths to train (at most one per side), every defense's status, and the
    reference's accuracy range [low, high] over its points' means."""

    strengths: list[float]
    targets: dict[str, Target]
    low: float
    high: float


@dataclass
class BracketResult:
    """What `bracket` did: `added`, the strengths added over all rounds (those passed in first);
    `points`, every reference row (given and trained); `targets`, each defense's final status
    ("bracketed" or "could not bracket"); `rounds`, the training rounds run."""

    added: list[float]
    points: list[Sequence[float]]
    targets: dict[str, Target]
    rounds: int
    low: float = math.nan
    high: float = math.nan
    failures: list[str] = field(default_factory=list)

    @property
    def all_bracketed(self) -> bool:
        return all(t.status == "bracketed" for t in self.targets.values())


@dataclass(frozen=True)
class _Ref:
    strengths: np.ndarray  # sorted, distinct
    means: np.ndarray
    se: float  # standard error of one strength's mean accuracy (0 without replicate seeds)

    @property
    def low(self) -> float:
        return float(self.means.min())

    @property
    def high(self) -> float:
        return float(self.means.max())


def _reference(points: Iterable[Sequence[float]], knob: Knob) -> _Ref:
    """Mean accuracy per strength and the pooled standard error of such a mean."""
    try:
        rows = np.asarray([(float(s), float(a)) for s, a in points], dtype=float).reshape(-1, 2)
    except (TypeError, ValueError):
        raise UserError("reference points must be (strength, accuracy) pairs of numbers") from None
    rows = rows[np.isfinite(rows[:, 1])]  # a failed run has no accuracy
    if not len(rows):
        raise UserError("the reference has no point with an accuracy: at least one is needed")
    s, a = rows[:, 0], rows[:, 1]
    bad = ~np.isfinite(s) | (s < knob.lo) | (s > knob.hi)
    if bad.any():
        raise UserError(f"reference {knob.name} {s[bad][0]:g} lies outside the knob's range [{knob.lo:g}, {knob.hi:g}]")
    _check_accuracy(a, "reference accuracy")
    strengths, inv = np.unique(s, return_inverse=True)
    n = np.bincount(inv)
    means = np.bincount(inv, weights=a) / n
    ss = np.bincount(inv, weights=(a - means[inv]) ** 2)
    dof = (n - 1).sum()
    se = math.sqrt(ss.sum() / dof / float(np.median(n))) if dof > 0 else 0.0
    return _Ref(strengths, means, se)


def _check_accuracy(values: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        raise UserError(f"{what} {values[bad][0]:g} is not a fraction in [0, 1] (write 0.912, not 91.2)")


def _pct(a: float) -> str:
    return f"{100 * a:.1f}%"


def _canon(s: float, knob: Knob) -> float:
    """s at 3 significant digits; more where 3 would land on a bound of the knob."""
    for digits in range(3, 18):
        r = float(f"{s:.{digits}g}")
        if knob.lo < r < knob.hi:
            return r
    return s


class _Planner:
    """The rule of the module docstring on one reference and knob."""

    def __init__(self, ref: _Ref, knob: Knob, margin: float | None) -> None:
        self.ref, self.knob, self.margin = ref, knob, margin

    def direction(self, target: float) -> int:
        """0 inside the range, else +1 (a larger strength is needed) or -1 (a smaller one)."""
        if self.ref.low - TOL <= target <= self.ref.high + TOL:
            return 0
        more_accurate = target > self.ref.high
        return -1 if more_accurate == self.knob.falls else 1

    def end(self, direction: int) -> int:
        return len(self.ref.strengths) - 1 if direction > 0 else 0

    def at_bound(self, direction: int) -> bool:
        s = self.ref.strengths[self.end(direction)]
        return s >= self.knob.hi if direction > 0 else s <= self.knob.lo

    def line(self, direction: int, aim: float) -> float | None:
        """x on the knob's scale where the line through the two outermost strengths (finite on the
        scale) reaches `aim`; None when there is no such line or it is noise."""
        xs = np.array([self.knob.to_x(float(s)) for s in self.ref.strengths])
        ok = np.flatnonzero(np.isfinite(xs))
        if len(ok) < 2:
            return None
        i, j = (ok[-2], ok[-1]) if direction > 0 else (ok[1], ok[0])  # j: the outermost
        da, dx = self.ref.means[j] - self.ref.means[i], xs[j] - xs[i]
        slope = da / dx
        right_sign = slope < 0 if self.knob.falls else slope > 0
        if not right_sign or abs(da) <= math.sqrt(2) * self.ref.se:  # flat, or within the seeds' noise
            return None
        return float(xs[j] + (aim - self.ref.means[j]) / slope)

    def needed(self, target: float, direction: int) -> float | None:
        """The strength the local line puts at `target` (3 digits); None without one."""
        x = self.line(direction, target)
        if x is None:
            return None
        s = self.knob.from_x(x)
        return _canon(s, self.knob) if self.knob.lo < s < self.knob.hi else None

    def propose(self, target: float, direction: int, taken: set[float]) -> float:
        """The next strength for a side whose most extreme defense is at `target`."""
        knob, j = self.knob, self.end(direction)
        end_s, end_a = float(self.ref.strengths[j]), float(self.ref.means[j])
        margin = self.margin if self.margin is not None else max(MIN_MARGIN, self.ref.se, 0.5 * abs(target - end_a))
        aim = target + (margin if target > self.ref.high else -margin)
        x = self.line(direction, aim)
        if end_s <= knob.lo:  # direction +1 from the knob-off value: nothing positive to scale from
            if knob.start is None:
                raise UserError(
                    f"every reference point has {knob.name} {knob.lo:g} (off): give the knob a start "
                    "strength to step from"
                )
            s = knob.start
        elif x is None:
            s = knob.step(end_s, direction)
        elif knob.scale == "linear":
            bound = knob.hi if direction > 0 else knob.lo
            s = end_s + direction * min(direction * (x - end_s), 0.9 * abs(bound - end_s))
        else:
            x_end = knob.to_x(end_s)
            s = knob.from_x(x_end + direction * min(direction * (x - x_end), _DECADE))
        for _ in range(64):
            c = _canon(s, knob)
            if c not in taken and direction * (c - end_s) > 0:
                return c
            s = knob.step(c, direction)  # taken or rounded back onto the swept range: one step further
        raise UserError(f"no new {knob.name} found beyond {end_s:g}")  # a range exhausted at 3 digits

    def extreme(self, direction: int) -> tuple[float, float]:
        """(accuracy, strength) of the reference's point nearest the defenses of a side."""
        above = direction == (-1 if self.knob.falls else 1)
        i = int(np.argmax(self.ref.means) if above else np.argmin(self.ref.means))
        return float(self.ref.means[i]), float(self.ref.strengths[i])

    def cap_message(self, name: str, target: float, direction: int, cap: int) -> str:
        acc, s = self.extreme(direction)
        need = self.needed(target, direction)
        k = self.knob.name
        tail = (
            f"about {k} {need:.3g} would be needed"
            if need is not None
            else f"its accuracy shows no usable trend with {k} there, so no {k} can be estimated"
        )
        return (
            f"could not bracket {name} ({_pct(target)}) within {cap} added point{'s' if cap != 1 else ''}: "
            f"the reference reached {_pct(acc)} at {k} {s:.3g}; {tail}"
        )

    def bound_message(self, name: str, target: float, direction: int) -> str:
        acc, s = self.extreme(direction)
        k, bound = self.knob.name, self.knob.hi if direction > 0 else self.knob.lo
        which = "best" if target > self.ref.high else "lowest"
        return (
            f"could not bracket {name} ({_pct(target)}): the reference's {which} accuracy is {_pct(acc)} (at {k} "
            f"{s:.3g}), and {k} cannot go {'above' if direction > 0 else 'below'} {bound:g}, which is already "
            "swept"
        )


def plan(
    points: Iterable[Sequence[float]],
    targets: Mapping[str, float],
    knob: Knob = NOISE,
    cap: int = CAP,
    added: Sequence[float] = (),
    *,
    margin: float | None = None,
    on_impossible: Literal["report", "raise"] = "report",
) -> Plan:
    """One round: every defense's status and the strengths to train next (see the module
    docstring). `points`: the reference's (strength, accuracy) rows, rows of added strengths
    included; `targets`: defense name -> mean accuracy; `added`: the strengths already added in
    earlier rounds (they count toward `cap` and are never proposed again); `margin`: a fixed
    overshoot in accuracy instead of the automatic one."""
    if not isinstance(cap, Integral) or isinstance(cap, bool) or cap < 0:
        raise UserError(f"the cap of added reference points must be a whole number >= 0, got {cap!r}")
    if margin is not None and not (math.isfinite(margin) and margin >= 0):
        raise UserError(f"margin must be a number >= 0, got {margin}")
    if on_impossible not in ("report", "raise"):
        raise UserError(f"on_impossible is 'report' or 'raise', got {on_impossible!r}")
    ref = _reference(points, knob)
    accs = {str(k): float(v) for k, v in targets.items()}
    _check_accuracy(np.array(list(accs.values()), dtype=float), "defense accuracy")
    p = _Planner(ref, knob, margin)
    out: dict[str, Target] = {}
    sides: dict[int, list[str]] = {1: [], -1: []}
    for name, a in accs.items():
        d = p.direction(a)
        if d == 0:
            out[name] = Target(name, a, "bracketed")
        elif p.at_bound(d):
            msg = p.bound_message(name, a, d)
            if on_impossible == "raise":
                raise UserError(msg)
            out[name] = Target(name, a, "could not bracket", message=msg)
        else:
            sides[d].append(name)

    def gap(d: int) -> float:
        return max(max(accs[n] - ref.high, ref.low - accs[n]) for n in sides[d])

    left = int(cap) - len(set(added))
    order = sorted((d for d in sides if sides[d]), key=lambda d: (-len(sides[d]), -gap(d), d))
    taken = {float(s) for s in ref.strengths} | {_canon(float(s), knob) for s in ref.strengths}
    taken |= {float(s) for s in added} | {_canon(float(s), knob) for s in added if knob.lo < s < knob.hi}
    strengths = []
    for rank, d in enumerate(order):
        names = sides[d]
        if rank >= left:
            for n in names:
                out[n] = Target(
                    n,
                    accs[n],
                    "could not bracket",
                    needed=p.needed(accs[n], d),
                    message=p.cap_message(n, accs[n], d, cap),
                )
            continue
        extreme = max(names, key=lambda n: abs(accs[n] - (ref.high if accs[n] > ref.high else ref.low)))
        s = p.propose(accs[extreme], d, taken)
        taken.add(s)
        strengths.append(s)
        for n in names:
            out[n] = Target(n, accs[n], "train", strength=s, needed=p.needed(accs[n], d))
    return Plan(strengths, {n: out[n] for n in accs}, ref.low, ref.high)


def next_strengths(
    points: Iterable[Sequence[float]],
    targets: Mapping[str, float],
    knob: Knob = NOISE,
    cap: int = CAP,
    added: Sequence[float] = (),
    *,
    margin: float | None = None,
) -> list[float]:
    """The strengths to train in the next round (empty when every defense is bracketed, the cap
    is spent or the rest cannot be bracketed); `plan` has the arguments and the per-defense story."""
    return plan(points, targets, knob, cap, added, margin=margin).strengths


def bracket(
    train_fn: Callable[[list[float]], Iterable[Sequence[float]]],
    points: Iterable[Sequence[float]],
    targets: Mapping[str, float],
    knob: Knob = NOISE,
    cap: int = CAP,
    added: Sequence[float] = (),
    *,
    margin: float | None = None,
    on_impossible: Literal["report", "raise"] = "report",
) -> BracketResult:
    """Add reference points until every defense is bracketed or `cap` strengths were added.

    Each round calls `train_fn(strengths)`, which trains the reference at those strengths (with the
    run's seeds) and returns their (strength, accuracy) rows, one per seed; a strength whose
    trainings all failed may return no row (it still counts toward the cap). Returns the added
    strengths, every reference row, each defense's final status and the failures' messages."""
    rows = list(points)  # `plan` checks every row, trained ones included
    done = [float(s) for s in added]
    rounds = 0
    while True:
        step = plan(rows, targets, knob, cap, done, margin=margin, on_impossible=on_impossible)
        if not step.strengths:
            break
        rows += list(train_fn(list(step.strengths)))
        rounds += 1
        done += step.strengths
    failures = [t.message for t in step.targets.values() if t.status == "could not bracket"]
    return BracketResult(done, rows, step.targets, rounds, step.low, step.high, failures)
