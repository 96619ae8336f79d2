"""Privacy-utility frontiers: does a defense leak less than the reference at matched accuracy?

`points` turns long-form rows (privbench.store.rows.collect) into one point per configuration
(accuracy; worst-case privacy metric over attacks) and sorts configurations into families (a
defense on one bottleneck, swept over its strength knob). `compare` interpolates the reference
family's frontier at every other point's accuracy, takes the privacy gain, bootstraps its 95%
CI over seeds and test images, and gives each family a verdict, the mean gain between the two
frontiers (area / accuracy range) and a VFLAIR-style defense capability score (DCS).
`verdict_lines` words the verdicts. docs/frontier.md defines every quantity and its direction.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd

from privbench.analysis import frontier_stats as fs
from privbench.errors import UserError
from privbench.plugin import stack
from privbench.store.rows import ATTACKER_HIGHER, METRIC_DIGITS, METRIC_LABEL, METRICS
from privbench.util import stats

GROUP = ("dataset", "model", "preset")  # never averaged together: each is analysed on its own
UNDEFENDED = "undefended"
REFERENCE = "reference"
VERDICTS = ("better", "worse", "indistinguishable", "extrapolation only")
# TrainConfig identity fields that are the family's name, not something that may differ inside it.


@dataclass
class Comparison:
    """What `compare` found. `points`: one row per configuration (the columns of `points()` plus
    ref_value, gain, gain_lo, gain_hi, extrapolated); `families`: one row per family and group
    (verdict, mean gain and CI, area and CI, DCS and CI, ...); `notes`: caveats met on the way."""

    metric: str
    reference: str
    points: pd.DataFrame
    families: pd.DataFrame
    resamples: int
    seed: int
    notes: list[str] = field(default_factory=list)


def leak_sign(metric: str) -> float:
    """+1 where a higher metric means a better reconstruction (more leakage), else -1."""
    return 1.0 if ATTACKER_HIGHER[metric] else -1.0


def metric_unit(metric: str) -> str:
    """How a difference in `metric` is written: 'SSIM', 'dB PSNR', 'MSE'."""
    return ("dB " if metric == "psnr" else "") + METRIC_LABEL[metric]


def group_name(dataset: str, model: str, preset: str) -> str:
    return f"{dataset}/{model}/{preset}"


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else json.dumps(value) if not isinstance(value, str) else value


@lru_cache(maxsize=256)
def _plugin_knob(spec: str, options: str) -> str | None:
    """The strength knob a defense names (privbench.plugin.stack.knob), None without one or unknown."""
    try:
        return stack.knob(spec)
    except Exception:  # an uninstalled plugin: the data decide
        return None


def points(
    rows: pd.DataFrame,
    privacy_metric: str = "ssim",
    *,
    infos: Mapping[str, dict[str, Any]],
    per_image: Mapping[tuple[str, str], tuple[np.ndarray, np.ndarray] | None] | None = None,
) -> pd.DataFrame:
    """One row per configuration (over seeds) that an attack scored with `privacy_metric`.

    Columns: dataset, model, preset, group, family, family_key, defense, bottleneck, noise,
    knob, knob_value, strength, options, config, accuracy_mean, accuracy_ci95, privacy_mean,
    privacy_ci95, privacy_attack (the worst case over attacks and the attack that reached it),
    baseline_mean (the mean image), num_classes, n_seeds, n_images, on_frontier, metric, cells.
    CIs: Student t over seeds, or over test images with one seed (as in the tables). The
    undefended model is family 'undefended'. `cells` holds what `compare` resamples. `infos`
    maps each run path to what a row does not hold (options in force, the settings that may
    differ inside a family, accuracy's sample size): privbench.store.rows.run_infos(rows).
    `per_image` maps each attack folder, by the rows' (path, attack_dir), to its per-image
    (image indices, values) of `privacy_metric`: privbench.store.rows.per_image(rows,
    privacy_metric); `compare` resamples test images with them. Without it every run is
    represented by its run means, resampled over seeds only, as a run without per-image values
    is (`compare` notes it). Nothing here reads a file."""
    if privacy_metric not in METRICS:
        raise UserError(f"unknown privacy metric {privacy_metric!r} (known: {', '.join(METRICS)})")
    sign = leak_sign(privacy_metric)
    attacked = rows[~rows.attack.isin(["", "baseline"]) & rows.attack.notna() & rows.value.notna()]
    scored = attacked[attacked.metric == privacy_metric]
    if scored.empty:
        have = [m for m in METRICS if (attacked.metric == m).any()]
        raise UserError(
            f"no cell has privacy metric {privacy_metric!r} (the attacks here report: {', '.join(have) or 'nothing'})"
        )
    paths = list(dict.fromkeys(scored.path))
    missing = [p for p in paths if p not in infos]
    if missing:
        raise ValueError(f"no run facts for {missing[0]}: pass infos=privbench.store.rows.run_infos(rows)")
    infos = {p: infos[p] for p in paths}
    run_level = rows[rows.path.isin(infos)]
    acc = run_level[run_level.metric == "accuracy"].drop_duplicates("path").set_index("path")
    acc_value, acc_ci, seeds = acc.value.to_dict(), acc.ci95.to_dict(), acc.seed.to_dict()
    base = run_level[(run_level.attack == "baseline") & (run_level.metric == privacy_metric)]
    base = base.groupby("path").value.first().to_dict()
    # config -> attack -> path -> (value, ci95 over images, n images, attack folder): one pass over the rows
    cells: dict[str, dict[str, dict[str, tuple]]] = {}
    first: dict[str, Any] = {}
    for r in scored.itertuples(index=False):
        first.setdefault(r.config, r)
        cells.setdefault(r.config, {}).setdefault(r.attack, {}).setdefault(r.path, (r.value, r.ci95, r.n, r.attack_dir))
    recs = []
    for config, by_attack in cells.items():
        f = first[config]
        runs = list(dict.fromkeys(p for v in by_attack.values() for p in v))
        means = {a: stats.mean(x[0] for x in v.values()) for a, v in by_attack.items()}
        worst = (max if sign > 0 else min)(means, key=means.get)
        wv = by_attack[worst]
        ci = stats.t_ci95(x[0] for x in wv.values()) if len(wv) > 1 else _num(next(iter(wv.values()))[1])
        accs = [float(acc_value.get(p, math.nan)) for p in runs]
        info = infos[runs[0]]
        n_img = [_num(x[2]) for x in wv.values() if not math.isnan(_num(x[2]))]
        run_cells = []
        for p, a in zip(runs, accs):
            have = tuple((at, str(v[p][3]), float(v[p][0])) for at, v in by_attack.items() if p in v)
            images = None if per_image is None else tuple(per_image.get((p, d)) for _, d, _ in have)
            run_cells.append(fs.Cell(p, int(seeds.get(p, -1)), a, infos[p]["acc_n"], have, images))
        recs.append(
            {
                **{k: getattr(f, k) for k in GROUP},
                "group": group_name(*(getattr(f, k) for k in GROUP)),
                "defense": f.defense,
                "spec": info["spec"],
                "settings": info["settings"],
                "opts": info["options"],
                "bottleneck": int(f.bottleneck) if pd.notna(f.bottleneck) and f.bottleneck else 0,
                "noise": float(f.noise),
                "options": f.options if isinstance(f.options, str) else "",
                "config": config,
                "accuracy_mean": stats.mean(accs),
                "accuracy_ci95": stats.t_ci95(accs) if len(runs) > 1 else _num(acc_ci.get(runs[0])),
                "privacy_mean": means[worst],
                "privacy_ci95": ci,
                "privacy_attack": worst,
                "baseline_mean": stats.mean(base.get(p, math.nan) for p in runs),
                "num_classes": f.num_classes,
                "n_seeds": len(runs),
                "n_images": int(min(n_img)) if n_img else None,
                "metric": privacy_metric,
                "cells": tuple(run_cells),
            }
        )
    out = pd.DataFrame(recs)
    out = pd.concat([_families(grp) for _, grp in out.groupby("group", sort=False)], ignore_index=True)
    out["on_frontier"] = False
    for _, fam in out[out.family != UNDEFENDED].groupby(["group", "family"], sort=False):
        mask = fs.pareto_mask(fam.accuracy_mean.to_numpy(float), sign * fam.privacy_mean.to_numpy(float))
        out.loc[fam.index, "on_frontier"] = mask
    out = out.sort_values(["group", "family", "knob_value", "strength"], kind="stable").reset_index(drop=True)
    front = [
        "dataset",
        "model",
        "preset",
        "group",
        "family",
        "family_key",
        "defense",
        "bottleneck",
        "noise",
        "knob",
        "knob_value",
        "strength",
        "options",
    ]
    return out[front + [c for c in out.columns if c not in front and c not in ("spec", "settings", "opts")]]


def _num(value: Any) -> float:
    """A float; NaN for None or anything that is not a number."""
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan


def _families(grp: pd.DataFrame) -> pd.DataFrame:
    """Family, family_key, knob, knob_value and strength of one group's configurations."""
    grp = grp.copy()
    grp[["family", "family_key", "knob", "strength"]] = ""
    grp["knob_value"] = math.nan
    und = (grp.spec == "none") & (grp.bottleneck == 0) & (grp.noise == 0)
    grp.loc[und, ["family", "family_key", "strength"]] = [UNDEFENDED, UNDEFENDED, "undefended"]
    rest = grp[~und]
    bottlenecks = rest.groupby("defense").bottleneck.nunique()
    for (defense, bn), fam in rest.groupby(["defense", "bottleneck"], sort=False):
        channel = f"C{bn}" if bn else "no-bottleneck"
        settings = list(fam.settings)
        keys = sorted({k for s in settings for k in s})
        vary = [k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1]
        plugin = _plugin_knob(fam.spec.iloc[0], json.dumps(fam.opts.iloc[0], sort_keys=True))
        if len(vary) == 1:
            knob = vary[0]
        elif plugin in vary or (not vary and plugin):
            knob = plugin
        else:
            knob = "noise" if "noise" in vary or not vary else vary[0]
        split = [k for k in vary if k != knob]
        for idx, s in zip(fam.index, settings):
            tag = ", ".join(f"{k}={_fmt(s.get(k))}" for k in split)
            short = defense if bottlenecks[defense] == 1 else f"{defense}@{channel}"
            grp.loc[idx, "family"] = short + (f" [{tag}]" if tag else "")
            grp.loc[idx, "family_key"] = f"{defense}@{channel}" + (f" [{tag}]" if tag else "")
            value = s.get(knob)
            grp.loc[idx, "knob"] = knob
            grp.loc[idx, "knob_value"] = (
                float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
            )
            grp.loc[idx, "strength"] = f"{knob}={_fmt(value)}"
    return grp


def _resolve(grp: pd.DataFrame, reference: str) -> tuple[str | None, str | None]:
    """(reference family of a group, None) or (None, why not)."""
    fams = grp[grp.family != UNDEFENDED]
    names = list(dict.fromkeys(fams.family))
    found = [f for f in names if reference in (f, fams[fams.family == f].family_key.iloc[0])]
    if not found:  # a defense name ('none', 'dropout+gmm-cem'): its families
        bare = reference.replace(" ", "")
        found = [f for f in names if fams[fams.family == f].defense.iloc[0].replace(" ", "") == bare]
    group = grp.group.iloc[0]
    if not found:
        return None, (
            f"reference family {reference!r} is not in the results for {group} "
            f"(families there: {', '.join(names) or 'none'})"
        )
    ref = max(found, key=lambda f: (fams.family == f).sum())  # the sweep, where one defense has several
    rows = fams[fams.family == ref]
    if len(rows) < 2:
        return None, (
            f"reference family {ref!r} has {len(rows)} point ({rows.strength.iloc[0]}) in {group}: a "
            "frontier needs at least two; sweep its strength"
        )
    return ref, None


def reference_family(points: pd.DataFrame, reference: str) -> str:
    """The family of `points` that `reference` names (a family, its key, or a defense whose
    sweep it is), as `compare` resolves it; UserError where it has no frontier."""
    family, why = _resolve(points, reference)
    if family is None:
        raise UserError(why)
    return family


def compare(
    points: pd.DataFrame,
    reference: str = "none",
    resamples: int = 1000,
    seed: int = 0,
    *,
    undefended_end: bool = True,
    top_resolution: bool = True,
) -> Comparison:
    """Every family of `points` against the reference family's frontier at matched accuracy.

    Per point: ref_value (the reference's Pareto frontier, linear between its points, at the
    point's accuracy), gain = reference leakage - the point's leakage in metric units (> 0: the
    point leaks less), a 95% CI from a hierarchical bootstrap (seeds, then test images jointly
    over a run's attacks; accuracy Binomial), and `extrapolated` (accuracy outside the
    reference's range: gain NaN). Per family: mean_gain over its in-range points with CI, the
    verdict (better / worse / indistinguishable by that CI, or 'extrapolation only'), area (the
    mean gap between the two frontiers over their common accuracy range) and DCS, with CIs.

    `undefended_end`: where the undefended model is more accurate than every reference point,
    the reference's frontier ends at it (a client can always drop the defense, and serving the
    two at random reaches every point of the line between them); points between the two are
    judged against that line and flagged `via_undefended`.

    `top_resolution`: a point above the reference's most accurate point by less than the 95% CI of
    the two accuracies' difference (sqrt(ci_point^2 + ci_top^2)) is at that accuracy as far as
    the runs can tell: it is compared with the top point's leakage (the curve held flat there)
    and flagged `at_top` instead of extrapolated."""
    if points.empty or "cells" not in points:
        raise UserError("nothing to compare: pass the frame frontier.points() returns")
    metric, sign = points.metric.iloc[0], leak_sign(points.metric.iloc[0])
    rng = np.random.default_rng(seed)
    notes: list[str] = []
    resolved = {g: _resolve(grp, reference) for g, grp in points.groupby("group", sort=False)}
    if all(r is None for r, _ in resolved.values()):
        raise UserError(next(why for _, why in resolved.values()))
    notes += [why for r, why in resolved.values() if r is None]
    pts, fams = [], []
    for group, grp in points.groupby("group", sort=False):
        grp = grp.reset_index(drop=True).copy()
        grp[["ref_value", "gain", "gain_lo", "gain_hi"]] = math.nan
        grp["extrapolated"] = grp["via_undefended"] = grp["at_top"] = False
        ref = resolved[group][0]
        if ref is None:
            pts.append(grp)
            continue
        _note_attack_sets(grp, notes)
        per_config = []
        for cells in grp.cells:
            attacks = list(dict.fromkeys(a for c in cells for a, _, _ in c.attacks))
            per_config.append(fs.load_seeds(cells, metric, attacks, notes))
        # One image draw per resample and image set, shared by every run evaluated on those images.
        sets = dict.fromkeys(sd.images for seeds in per_config for sd in seeds if sd.images is not None)
        counts = {k: fs.image_counts(len(np.frombuffer(k, dtype=np.int64)), resamples, rng) for k in sets}
        picks = fs.paired_picks(per_config, resamples, rng)  # configurations of one seed drawn together
        draws = [fs.draw(seeds, counts, resamples, rng, sign > 0, p) for seeds, p in zip(per_config, picks)]
        acc_b = np.stack([d[0] for d in draws], axis=1)  # [R, C]
        leak_b = sign * np.stack([d[1] for d in draws], axis=1)
        acc_o, leak_o = grp.accuracy_mean.to_numpy(float), sign * grp.privacy_mean.to_numpy(float)
        r = (grp.family == ref).to_numpy()
        own_hi = acc_o[r].max()  # the reference family's own most accurate point
        und_all = (grp.family == UNDEFENDED).to_numpy()
        und = und_all & (acc_o > own_hi)
        if undefended_end and und.any():
            r = r | (und & (acc_o == acc_o[und].max()))
        ra, rl, rab, rlb = acc_o[None, r], leak_o[None, r], acc_b[:, r], leak_b[:, r]
        lo, hi = ra.min(), ra.max()
        o = ~r
        ref_o = fs.curve_at(ra, rl, fs.pareto_mask(ra, rl), acc_o[None, o])[0]
        gain_b = fs.curve_at(rab, rlb, fs.pareto_mask(rab, rlb), acc_b[:, o]) - leak_b[:, o]
        out = (acc_o[o] < lo - 1e-12) | (acc_o[o] > hi + 1e-12)
        if top_resolution:  # above the top by less than the accuracies can resolve: at the top
            ci = np.nan_to_num(grp.accuracy_ci95.to_numpy(float))
            top = np.flatnonzero(r)[np.argmax(acc_o[r])]
            at_top = (acc_o[o] > hi + 1e-12) & (acc_o[o] - hi <= np.sqrt(ci[o] ** 2 + ci[top] ** 2))
            out &= ~at_top
            grp.loc[o, "at_top"] = at_top
        g_lo, g_hi = fs.interval(gain_b)
        grp.loc[o, "extrapolated"] = out
        grp.loc[o, "via_undefended"] = ~out & (acc_o[o] > own_hi + 1e-12) & (acc_o[o] <= hi + 1e-12)
        grp.loc[o, "ref_value"] = np.where(out, np.nan, sign * ref_o)
        grp.loc[o, "gain"] = np.where(out, np.nan, ref_o - leak_o[o])
        grp.loc[o, "gain_lo"], grp.loc[o, "gain_hi"] = np.where(out, np.nan, g_lo), np.where(out, np.nan, g_hi)
        gain_b[:, out] = np.nan
        boot_gain = np.full((resamples, len(grp)), np.nan)
        boot_gain[:, o] = gain_b
        dcs_of = _dcs_setup(grp, acc_o, leak_o, acc_b, leak_b, sign, notes)
        for fam, members in grp[grp.family != UNDEFENDED].groupby("family", sort=False):
            m = members.index.to_numpy()
            row = {k: members[k].iloc[0] for k in (*GROUP, "group", "family", "family_key", "defense", "knob")}
            row |= {
                "reference": ref,
                "ref_acc_min": lo,
                "ref_acc_max": hi,
                "ref_own_max": own_hi,
                "undefended_acc": float(acc_o[und_all].max()) if und_all.any() else math.nan,
                "n_points": len(m),
                "n_via_undefended": int(grp.via_undefended.to_numpy()[m].sum()),
                "n_at_top": int(grp.at_top.to_numpy()[m].sum()),
            }
            row |= dcs_of(m)
            if fam == ref:
                fams.append(row | {"verdict": REFERENCE, "n_in_range": len(m)})
                continue
            inside = m[~grp.extrapolated.to_numpy()[m]]
            row["n_in_range"] = len(inside)
            mean = float(np.mean(grp.gain.to_numpy(float)[inside])) if len(inside) else math.nan
            b_lo, b_hi = fs.interval(boot_gain[:, inside].mean(axis=1)) if len(inside) else (math.nan, math.nan)
            row |= {
                "mean_gain": mean,
                "gain_lo": float(b_lo),
                "gain_hi": float(b_hi),
                "verdict": _verdict(len(inside), float(b_lo), float(b_hi)),
            }
            area_o = fs.mean_gap(acc_o[None, m], leak_o[None, m], ra, rl)[0]
            a_lo, a_hi = fs.interval(fs.mean_gap(acc_b[:, m], leak_b[:, m], rab, rlb))
            row |= {
                "area": float(area_o),
                "area_lo": float(a_lo),
                "area_hi": float(a_hi),
                "area_from": max(lo, acc_o[m].min()),
                "area_to": min(hi, acc_o[m].max()),
            }
            fams.append(row)
        pts.append(grp)
    families = pd.DataFrame(fams)
    cols = [
        *GROUP,
        "group",
        "family",
        "family_key",
        "defense",
        "knob",
        "reference",
        "verdict",
        "n_points",
        "n_in_range",
        "mean_gain",
        "gain_lo",
        "gain_hi",
        "area",
        "area_lo",
        "area_hi",
        "area_from",
        "area_to",
        "dcs",
        "dcs_lo",
        "dcs_hi",
        "ref_acc_min",
        "ref_acc_max",
        "ref_own_max",
        "undefended_acc",
        "n_at_top",
        "n_via_undefended",
    ]
    families = families.reindex(columns=cols)
    table = pd.concat(pts, ignore_index=True).drop(columns=["cells"])
    return Comparison(metric, reference, table, families, resamples, seed, list(dict.fromkeys(notes)))


def _note_attack_sets(grp: pd.DataFrame, notes: list[str]) -> None:
    """A note when a group's configurations were not all scored by the same attacks: their
    worst cases are then maxima over different sets and do not compare like for like."""
    sets = [frozenset(a for c in cells for a, _, _ in c.attacks) for cells in grp.cells]
    if len(set(sets)) > 1:
        every = sorted(set().union(*sets))
        counts = ", ".join(f"{a}: {sum(a in s for s in sets)}" for a in every)
        notes.append(
            f"{grp.group.iloc[0]}: the configurations were not all scored by the same attacks "
            f"(configurations per attack, of {len(sets)}: {counts}); worst cases over different "
            "attack sets do not compare like for like"
        )


def _verdict(n_in_range: int, lo: float, hi: float) -> str:
    if not n_in_range:
        return "extrapolation only"
    return "better" if lo > 0 else "worse" if hi < 0 else "indistinguishable"


def _dcs_setup(
    grp: pd.DataFrame,
    acc_o: np.ndarray,
    leak_o: np.ndarray,
    acc_b: np.ndarray,
    leak_b: np.ndarray,
    sign: float,
    notes: list[str],
) -> Callable[[np.ndarray], dict[str, float]]:
    """A function: family member indices -> {dcs, dcs_lo, dcs_hi} for this group (NaN with a
    note where the undefended model, the mean-image baseline or the class count is missing)."""
    und = np.flatnonzero((grp.family == UNDEFENDED).to_numpy())
    base = sign * float(np.nanmean(grp.baseline_mean.to_numpy(float))) if grp.baseline_mean.notna().any() else None
    classes = grp.num_classes.dropna()
    why = (
        "no undefended run (none, no bottleneck, noise 0)"
        if not len(und)
        else "no mean-image baseline"
        if base is None
        else "no class count"
        if classes.empty
        else "the undefended model leaks no more than the mean image"
        if leak_o[und[0]] <= base
        else None
    )
    nan = {"dcs": math.nan, "dcs_lo": math.nan, "dcs_hi": math.nan}
    if why:
        notes.append(f"{grp.group.iloc[0]}: DCS not computed: {why}")
        return lambda m: nan
    u, chance = und[0], 1.0 / float(classes.iloc[0])

    def of(m: np.ndarray) -> dict[str, float]:
        obs = fs.dcs(acc_o[m], leak_o[m], acc_o[u], base, leak_o[u], chance).mean()
        boot = fs.dcs(acc_b[:, m], leak_b[:, m], acc_b[:, u : u + 1], base, leak_b[:, u : u + 1], chance)
        lo, hi = fs.interval(boot.mean(axis=1))
        return {"dcs": float(obs), "dcs_lo": float(lo), "dcs_hi": float(hi)}

    return of


def point_name(family: str, strength: Any) -> str:
    """How a configuration is named in messages: 'gmm-cem (lam=16)', or the family alone."""
    return f"{family} ({strength})" if isinstance(strength, str) and strength else str(family)


def verdict_lines(comparison: Comparison, bracket: Any = None) -> list[str]:
    """One line per defense family in words a newcomer reads without the docs, e.g.
    'gmm-cem: leaks less than none at the same accuracy (gain 0.041 SSIM, 95% CI 0.012..0.070) [...]'.
    `bracket` (privbench.analysis.bracket.BracketResult) adds why a defense stayed without
    reference points at its accuracy."""
    fams, pts = comparison.families, comparison.points
    d, unit = METRIC_DIGITS[comparison.metric], metric_unit(comparison.metric)
    several = fams.group.nunique() > 1
    why_not = {} if bracket is None else {t.name: t.message for t in bracket.targets.values() if t.message}
    lines = []
    for r in fams[fams.verdict != REFERENCE].itertuples():
        head = (f"[{r.group}] " if several else "") + f"{r.family}: "
        members = pts[(pts.group == r.group) & (pts.family == r.family)]
        acc = 100 * float(members.accuracy_mean.mean())
        if r.verdict == "extrapolation only":
            side = "low" if acc < 100 * r.ref_acc_min else "high"
            lowest = float(members.accuracy_mean.min())
            if lowest > r.ref_acc_max and lowest > r.undefended_acc:  # nothing reaches it, dropping the defense neither
                line = (
                    head + f"no verdict: more accurate than the undefended model ({acc:.1f}% against "
                    f"{100 * r.undefended_acc:.1f}%) and every {r.reference} point (up to "
                    f"{100 * r.ref_own_max:.1f}%)"
                )
            else:
                line = (
                    head + f"no verdict: no {r.reference} point at its accuracy ({acc:.1f}%; {r.reference} spans "
                    f"{100 * r.ref_acc_min:.1f}-{100 * r.ref_acc_max:.1f}%): the reference was not swept {side} "
                    "enough"
                )
            # privbench.job names a target as point_name does, with its config where two groups share it
            names = [
                n
                for m in members.itertuples()
                for n in (point_name(m.family, m.strength), f"{point_name(m.family, m.strength)} [{m.config}]")
            ]
            reasons = [why_not[n] for n in names if n in why_not]
            lines.append(line + (f" ({reasons[0]})" if reasons else "") + _dominance(members, pts, r, side, d))
            continue
        ci = f"95% CI {r.gain_lo:.{d}f}..{r.gain_hi:.{d}f}"
        gain = f"gain {r.mean_gain:.{d}f} {unit}, {ci}"  # > 0: leaks less, in the metric's units
        if r.verdict == "better":
            say = f"leaks less than {r.reference} at the same accuracy ({gain})"
        elif r.verdict == "worse":
            say = f"leaks more than {r.reference} at the same accuracy ({gain})"
        else:
            detect = fs.detectable_gain(r.gain_lo, r.gain_hi)
            say = (
                f"no difference from {r.reference} that these seeds can resolve: gain {r.mean_gain:.{d}f} {unit} "
                f"({ci}); the smallest gain they could detect is {detect:.{d}f}"
            )
            n_seeds = int(members.n_seeds.max())
            need = seeds_for_gain(r.mean_gain, r.gain_lo, r.gain_hi, n_seeds)
            if need is not None and need > n_seeds:
                say += f"; about {need} seeds per configuration would resolve a gain of {abs(r.mean_gain):.{d}f}"
        via = ""
        if r.n_via_undefended:  # judged on the line from the reference's top to the undefended model
            via = (
                f"; {r.n_via_undefended} above every {r.reference} point ({100 * r.ref_own_max:.1f}%), judged "
                f"against the line to the undefended model ({100 * r.ref_acc_max:.1f}%)"
            )
        if r.n_at_top:  # above the top by less than the accuracies resolve
            via += (
                f"; {r.n_at_top} above the reference's most accurate point ({100 * r.ref_acc_max:.1f}%) by less "
                "than the accuracies resolve, compared with that point"
            )
        lines.append(head + say + f" [{r.n_in_range} of {r.n_points} points at matched accuracy{via}]")
    return lines


def _dominance(members: pd.DataFrame, pts: pd.DataFrame, fam: Any, side: str, digits: int) -> str:
    """For a defense more accurate than every reference point: the most accurate reference points
    it also leaks less than, which says more than "no verdict" though it is not a gain at matched
    accuracy."""
    ref = pts[(pts.group == fam.group) & (pts.family == fam.reference)].sort_values("accuracy_mean", ascending=False)
    if side != "high" or ref.empty:
        return ""
    sign = leak_sign(str(members.metric.iloc[0]))
    own = float(members.privacy_mean.mean())
    k = 0
    while k < len(ref) and sign * (own - float(ref.privacy_mean.iloc[k])) < 0:
        k += 1
    if k == 0:
        return ""
    top = ref.iloc[:k]
    if k == 1:
        which = f"the most accurate {fam.reference} point"
        accs, leaks = f"{100 * top.accuracy_mean.iloc[0]:.1f}%", f"{top.privacy_mean.iloc[0]:.{digits}f}"
    else:
        which = f"all {k} {fam.reference} points" if k == len(ref) else f"the {k} most accurate {fam.reference} points"
        accs = f"{100 * top.accuracy_mean.min():.1f}-{100 * top.accuracy_mean.max():.1f}%"
        leaks = f"{top.privacy_mean.min():.{digits}f}-{top.privacy_mean.max():.{digits}f}"
    beaten = f"{which} ({accs}, {leaks})"
    und = pts[(pts.group == fam.group) & (pts.family == UNDEFENDED)]
    und = und[(und.accuracy_mean < members.accuracy_mean.min()) & (sign * (own - und.privacy_mean) < 0)]
    if len(und):  # the undefended model is less accurate too: the defense beats dropping it outright
        u = und.iloc[0]
        beaten += f" and the undefended model ({100 * u.accuracy_mean:.1f}%, {u.privacy_mean:.{digits}f})"
    return (
        f"; it leaks less than {beaten} against its {own:.{digits}f}, each less accurate than it: a dominance, "
        "not a gain at matched accuracy"
    )


def seeds_for_gain(gain: float, lo: float, hi: float, n_seeds: int) -> int | None:
    """Seeds per configuration that would resolve a gain of this size (two-sided 5%, power 0.8),
    from the per-seed spread the CI implies: sd = half width / 1.96 * sqrt(n). With one seed the
    CI covers test images only, so the figure is a lower bound."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or gain == 0:
        return None
    sd = (hi - lo) / (2 * 1.96) * math.sqrt(max(n_seeds, 1))
    return stats.seeds_needed(sd, abs(gain))
