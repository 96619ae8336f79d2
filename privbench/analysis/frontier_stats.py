"""The numerical core of privbench.analysis.frontier: Pareto fronts, frontier curves, the hierarchical
bootstrap and the defense capability score, vectorised over bootstrap resamples.

Everything here works in *leakage* units: the privacy metric oriented so that lower is better
for the client (SSIM, PSNR, sem_acc as they are; LPIPS and MSE negated). Arrays carry the
resamples on the leading axis and a configuration's points on the last one; NaN marks a
missing point. docs/frontier.md defines every quantity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

Z = np.float64


@dataclass(frozen=True)
class Seed:
    """One run (seed) of a configuration, as the bootstrap needs it.

    values: [n_images, n_attacks] per-image privacy metric of each attack of the configuration
    on the same test images (a column of NaN where this run lacks the attack; one row holding
    the run's means when no per-image file could be read). images: the test image indices of
    the rows (runs on the same indices share their image draws), None for that one row of means.
    acc: test accuracy; acc_n: the number of test outcomes it is drawn from (0: not resampled)."""

    values: np.ndarray
    acc: float
    acc_n: int
    images: bytes | None = None
    seed: int | None = None  # the training seed: runs of one seed are resampled together


@dataclass(frozen=True)
class Cell:
    """One run of a configuration: what `compare` needs to resample it. `per_image`: per entry of
    `attacks`, its (image indices, values) (privbench.store.rows.per_image), None where the
    folder has none; None for all when they were not read."""

    path: str
    seed: int
    acc: float
    acc_n: int  # test outcomes accuracy is drawn from: the test image count, else test_groups; 0 unknown
    attacks: tuple[tuple[str, str, float], ...]  # (attack, attack folder, run mean)
    per_image: tuple[tuple[np.ndarray, np.ndarray] | None, ...] | None = field(default=None, compare=False)


def load_seeds(cells: tuple[Cell, ...], metric: str, attacks: list[str], notes: list[str]) -> list[Seed]:
    """Per run, the per-image values of every attack of the configuration, as the cells carry them
    (one row of run means where an attack has none: that run is then resampled over seeds only)."""
    out = []
    for cell in cells:
        have = {a: m for a, _, m in cell.attacks}
        got = {a: v for (a, _, _), v in zip(cell.attacks, cell.per_image or ())}
        joint = joint_images([got.get(a) for a in attacks if a in have])
        if joint is None:
            notes.append(
                f"{Path(cell.path).name}: no per-image {metric} for every attack; its run means are "
                "resampled over seeds only"
            )
            images, joint_values = None, np.array([[have[a] for a in attacks if a in have]], dtype=float)
        else:
            images, joint_values = joint[0].tobytes(), joint[1]
        values = np.full((joint_values.shape[0], len(attacks)), np.nan)
        values[:, [i for i, a in enumerate(attacks) if a in have]] = joint_values
        out.append(Seed(values, cell.acc, cell.acc_n, images, cell.seed))
    return out


def joint_images(per_attack: list[tuple[np.ndarray, np.ndarray] | None]) -> tuple[np.ndarray, np.ndarray] | None:
    """(image indices, [n_images, n_attacks] values): the attacks' values on the test images all
    of them scored (finite), sorted by index; None when an attack has no per-image values or
    none are common."""
    if not per_attack or any(p is None for p in per_attack):
        return None
    common = per_attack[0][0]
    for idx, vals in per_attack:
        common = np.intersect1d(common, idx[np.isfinite(vals)])
    if not len(common):
        return None
    cols = []
    for idx, vals in per_attack:
        order = np.argsort(idx, kind="stable")
        cols.append(vals[order][np.searchsorted(idx[order], common)])
    return common, np.stack(cols, axis=1)


def image_counts(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[R, n]: how often each of n test images is drawn in each resample (n draws with replacement)."""
    idx = rng.integers(0, n, size=(resamples, n)) + (np.arange(resamples) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=resamples * n).reshape(resamples, n).astype(Z)


def paired_picks(per_config: list[list[Seed]], resamples: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The seed draws [R, S] of each configuration (indices into its runs), one draw shared by all
    configurations trained on the same seeds. A seed fixes the initialisation and batch order of
    every configuration, so resampling seeds jointly keeps what they share out of a difference
    (docs/precision.md measured a weak share for accuracy: correlation about 0.28 over 15 seeds).
    Runs without distinct seed numbers are drawn on their own."""
    shared: dict[tuple[int, ...], np.ndarray] = {}
    out = []
    for seeds in per_config:
        ids = [sd.seed for sd in seeds]
        if None in ids or len(set(ids)) < len(ids):
            out.append(rng.integers(0, len(seeds), size=(resamples, len(seeds))))
            continue
        key = tuple(sorted(ids))
        if key not in shared:
            shared[key] = rng.integers(0, len(key), size=(resamples, len(key)))
        where = np.array([ids.index(s) for s in key])  # position in the sorted seeds -> this run's index
        out.append(where[shared[key]])
    return out


def draw(
    seeds: list[Seed],
    counts: dict[bytes | None, np.ndarray],
    resamples: int,
    rng: np.random.Generator,
    higher: bool,
    picks: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Hierarchical bootstrap of one configuration: (accuracy [R], worst-case metric [R]).

    Per resample r: each run's attacks are averaged over the test images drawn in r
    (`counts[seed.images]` [R, n], one draw per image set, shared by every run on those images
    and by all attacks of a run); then len(seeds) runs are drawn with replacement, each attack is
    averaged over the drawn runs that have it, and the worst case over attacks is taken (max if
    `higher`, else min). Accuracy per drawn run is Binomial(acc_n, acc) / acc_n, averaged.
    `picks` [R, S]: the runs drawn (from `paired_picks`); None draws them here."""
    s, a = len(seeds), seeds[0].values.shape[1]
    per_seed = np.empty((resamples, s, a), dtype=Z)
    present = np.zeros((s, a), dtype=bool)
    for i, sd in enumerate(seeds):
        present[i] = np.isfinite(sd.values).all(axis=0)
        c = counts.get(sd.images) if sd.images is not None else None
        if c is None:
            c = np.ones((resamples, 1)) if sd.images is None else image_counts(len(sd.values), resamples, rng)
        per_seed[:, i] = c @ np.where(present[i], sd.values, 0.0) / len(sd.values)
    picks = rng.integers(0, s, size=(resamples, s)) if picks is None else picks
    means = np.take_along_axis(per_seed, picks[:, :, None], axis=1)  # [R, S, A]
    has = present[picks]
    k = has.sum(axis=1)
    per_attack = np.where(has, means, 0.0).sum(axis=1) / np.maximum(k, 1)
    per_attack = np.where(k > 0, per_attack, -np.inf if higher else np.inf)
    worst = per_attack.max(axis=1) if higher else per_attack.min(axis=1)
    worst = np.where(np.isfinite(worst), worst, np.nan)
    acc = np.array([sd.acc for sd in seeds], dtype=Z)[picks]
    acc_n = np.array([sd.acc_n for sd in seeds])[picks]
    drawn = rng.binomial(np.maximum(acc_n, 1), acc) / np.maximum(acc_n, 1)
    return np.where(acc_n > 0, drawn, acc).mean(axis=1), worst


def pareto_mask(acc: np.ndarray, leak: np.ndarray) -> np.ndarray:
    """True where no other point of the same row has accuracy >= and leakage <=, one of them
    strictly (higher accuracy and lower leakage are better). NaN points are never on it."""
    a, lk = acc[..., :, None], leak[..., :, None]
    b, lb = acc[..., None, :], leak[..., None, :]
    dominated = ((b >= a) & (lb <= lk) & ((b > a) | (lb < lk))).any(axis=-1)
    return ~dominated & np.isfinite(acc) & np.isfinite(leak)


def curve_at(acc: np.ndarray, leak: np.ndarray, mask: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The frontier curve of points (acc, leak) [.., K] whose Pareto points are `mask`, at
    accuracies q [.., Q]: linear between consecutive Pareto points; flat at the Pareto point of
    lowest accuracy (the least leakage) below it, flat at the most accurate one above it (what
    may be reached with at least that accuracy). Rows without a Pareto point give NaN."""
    fa = np.where(mask, acc, np.nan)[..., None, :]  # [.., 1, K]
    qq = q[..., :, None]  # [.., Q, 1]
    below = np.where(fa <= qq, fa, -np.inf)
    above = np.where(fa >= qq, fa, np.inf)
    il, iu = below.argmax(axis=-1), above.argmin(axis=-1)  # [.., Q]
    has_l, has_u = np.isfinite(below.max(axis=-1)), np.isfinite(above.min(axis=-1))
    lk = np.broadcast_to(leak[..., None, :], below.shape)
    ak = np.broadcast_to(acc[..., None, :], below.shape)
    a_l, l_l = np.take_along_axis(ak, il[..., None], -1)[..., 0], np.take_along_axis(lk, il[..., None], -1)[..., 0]
    a_u, l_u = np.take_along_axis(ak, iu[..., None], -1)[..., 0], np.take_along_axis(lk, iu[..., None], -1)[..., 0]
    width = a_u - a_l
    t = np.divide(q - a_l, width, out=np.zeros_like(width, dtype=Z), where=width > 0)
    out = np.where(has_l & has_u, l_l + t * (l_u - l_l), np.where(has_l, l_l, l_u))
    return np.where(has_l | has_u, out, np.nan)


def mean_gap(acc_f: np.ndarray, leak_f: np.ndarray, acc_g: np.ndarray, leak_g: np.ndarray) -> np.ndarray:
    """Per row, the mean of curve_g - curve_f over the accuracy range both families span
    (integral / width; each curve lives on [min, max] of its points' accuracy): positive when f
    leaks less. NaN where the common range is empty or a single accuracy."""
    mask_f, mask_g = pareto_mask(acc_f, leak_f), pareto_mask(acc_g, leak_g)
    lo = np.maximum(np.nanmin(acc_f, axis=-1), np.nanmin(acc_g, axis=-1))
    hi = np.minimum(np.nanmax(acc_f, axis=-1), np.nanmax(acc_g, axis=-1))
    ok = hi > lo
    knots = np.concatenate([acc_f, acc_g, lo[..., None], hi[..., None]], axis=-1)
    knots = np.sort(np.clip(np.where(np.isfinite(knots), knots, lo[..., None]), lo[..., None], hi[..., None]), -1)
    gap = curve_at(acc_g, leak_g, mask_g, knots) - curve_at(acc_f, leak_f, mask_f, knots)
    area = (0.5 * (gap[..., 1:] + gap[..., :-1]) * np.diff(knots, axis=-1)).sum(axis=-1)
    return np.where(ok, area / np.where(ok, hi - lo, 1.0), np.nan)


def dcs(
    acc: np.ndarray, leak: np.ndarray, acc_ideal: np.ndarray, leak_ideal: float, leak_open: np.ndarray, chance: float
) -> np.ndarray:
    """VFLAIR-style defense capability score of points, 1 / (1 + sqrt((a^2 + p^2) / 2)), with
    a = accuracy lost below `acc_ideal` as a share of (acc_ideal - chance) and p = leakage above
    `leak_ideal` (the mean image) as a share of (leak_open - leak_ideal), both clipped at 0."""
    with np.errstate(divide="ignore", invalid="ignore"):  # a resample where the corner is degenerate: NaN
        a = np.maximum(acc_ideal - acc, 0.0) / np.where(acc_ideal > chance, acc_ideal - chance, np.nan)
        p = np.maximum(leak - leak_ideal, 0.0) / np.where(leak_open > leak_ideal, leak_open - leak_ideal, np.nan)
    return 1.0 / (1.0 + np.sqrt(0.5 * a**2 + 0.5 * p**2))


def interval(samples: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Percentile 95% interval over the finite resamples (NaN where fewer than half are finite)."""
    finite = np.isfinite(samples).sum(axis=axis)
    enough = finite >= 0.5 * samples.shape[axis]
    if not np.any(enough):
        nan = np.full(np.shape(finite), np.nan)
        return nan, nan
    with np.errstate(all="ignore"):
        lo, hi = np.nanpercentile(np.where(np.isfinite(samples), samples, np.nan), [2.5, 97.5], axis=axis)
    return np.where(enough, lo, np.nan), np.where(enough, hi, np.nan)


# Two-sided alpha 0.05, power 0.8: a true gain this many standard errors from 0 is found 80% of
# the time; a 95% CI is 2 * 1.96 standard errors wide (normal approximation of the bootstrap).
_MDD_PER_CI_WIDTH = (1.959964 + 0.841621) / (2 * 1.959964)


def detectable_gain(lo: float, hi: float) -> float:
    """The smallest true gain that a comparison with this 95% CI would call better or worse with
    power 0.8 (two-sided, alpha 0.05): 2.80 standard errors, the standard error read off the CI."""
    return _MDD_PER_CI_WIDTH * (hi - lo)
