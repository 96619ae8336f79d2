"""Frontiers and matched-accuracy verdicts on synthetic run folders with known answers."""

import json
import math
import shutil
import stat
import zlib

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli

from privbench.analysis import frontier
from privbench.analysis import frontier_stats as fs
from privbench.engine.config import TrainConfig
from privbench.errors import UserError
from privbench.report import blocks
from privbench.report.plot_frontier import frontier_figure, plot_frontier
from privbench.store.rows import collect, per_image, run_info, run_infos
from privbench.util.storage import current_umask

ACCS = (0.80, 0.85, 0.90)  # the reference sweep: SSIM = 2 * accuracy - 1.2, i.e. 0.40, 0.50, 0.60
SHIFT = 0.05
UNDEFENDED = (0.95, 0.80)
BASELINE = 0.10
RESAMPLES = 300


def points_of(folder, privacy_metric: str = "ssim"):
    """frontier.points over every run in `folder`, with the run facts and per-image values the store reads."""
    long = collect([folder])
    return frontier.points(long, privacy_metric, infos=run_infos(long), per_image=per_image(long, privacy_metric))


def ref_ssim(acc):
    return 2 * acc - 1.2


def write_cell(
    root,
    *,
    defense="none",
    bottleneck=8,
    noise=0.025,
    options=None,
    seed=0,
    acc=0.85,
    attacks=None,
    n=256,
    sd=0.05,
    preset="quick",
    per_image=True,
    acc_n=2000,
):
    """A fake run folder whose attacks' per-image SSIM has exactly the given means."""
    options = options or {}
    cfg = TrainConfig(
        defense=defense,
        bottleneck=bottleneck,
        noise=noise,
        seed=seed,
        epochs=1,
        progress=False,
        defense_options=options,
        preset=preset,
    )
    run = root / f"{defense}-{cfg.hash()}"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"train": cfg.to_dict(), "defense_options": options}))
    (run / "metrics.json").write_text(json.dumps({"test_accuracy": acc, "num_classes": 10, "test_groups": acc_n}))
    rng = np.random.default_rng(zlib.crc32(run.name.encode()))
    for name, mean in (attacks or {"decoder": 0.5}).items():
        values = rng.normal(0, sd, n)
        values = values - values.mean() + mean
        folder = run / "attacks" / f"{name}-{seed:06d}abcdef"
        folder.mkdir(parents=True)
        stat_ = {"mean": float(values.mean()), "ci95": 1.96 * sd / math.sqrt(n), "n": n}
        mse = {"mean": float((1 - values).mean() / 10), "ci95": 0.001, "n": n}  # MSE = (1 - SSIM) / 10
        (folder / "metrics.json").write_text(
            json.dumps(
                {
                    "attack": name,
                    "options": {},
                    "attacker_data": "train",
                    "eval_images": n,
                    "metrics": {"ssim": stat_, "mse": mse, "lpips": {"missing": "offline"}},
                    "baseline": {"ssim": {"mean": BASELINE, "ci95": 0.01, "n": n}},
                }
            )
        )
        if per_image:
            rows = [f"{i},{float(v)!r},20.0,{float(1 - v) / 10!r}," for i, v in enumerate(values)]
            lines = ["index,ssim,psnr,mse,lpips", *rows]
            (folder / "per_image.csv").write_text("\n".join(lines) + "\n")
    return run


def write_family(root, defense, accs, ssims, *, seeds=3, knob="lam", noise=0.025, **kw):
    """One configuration per (accuracy, SSIM); seeds spread +-0.01 around both (means exact)."""
    for i, (acc, ssim) in enumerate(zip(accs, ssims)):
        options = {} if knob == "noise" else {knob: [4.0, 16.0, 64.0, 256.0][i]}
        for s, off in zip(range(seeds), (0.0, -0.01, 0.01)):
            write_cell(
                root,
                defense=defense,
                noise=[0.1, 0.05, 0.025, 0.0125][i] if knob == "noise" else noise,
                options=options,
                seed=s,
                acc=acc + off,
                attacks={"decoder": ssim + off, "optimization": ssim - 0.1},
                **kw,
            )


def write_undefended(root, acc=UNDEFENDED[0], ssim=UNDEFENDED[1], *, spread=0.01, optimization=True, **kw):
    """The undefended model (none, no bottleneck, noise 0) at three seeds spread +-`spread` around
    (acc, decoder SSIM); the optimization attack 0.1 below the decoder unless `optimization` is off."""
    for s, off in zip(range(3), (0.0, -spread, spread)):
        attacks = {"decoder": ssim + off} | ({"optimization": ssim - 0.1} if optimization else {})
        write_cell(root, defense="none", bottleneck=None, noise=0.0, seed=s, acc=acc + off, attacks=attacks, **kw)


def write_world(root, **kw):
    write_family(root, "none", ACCS, [ref_ssim(a) for a in ACCS], knob="noise", **kw)  # the reference
    write_family(root, "gmm-cem", ACCS, [ref_ssim(a) - SHIFT for a in ACCS], **kw)  # below: better
    write_family(root, "slot-cem", ACCS, [ref_ssim(a) for a in ACCS], **kw)  # a copy: indistinguishable
    write_family(root, "dropout", ACCS, [ref_ssim(a) + SHIFT for a in ACCS], knob="rate", **kw)  # above: worse
    # outside the range on both sides, the upper point by more than the accuracies resolve (0.035)
    write_family(root, "topk", (0.70, 0.99), (0.2, 0.5), knob="ratio", **kw)
    write_undefended(root, optimization=False, **kw)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_world(root)
    pts = points_of(root)
    return root, pts, frontier.compare(pts, resamples=RESAMPLES)


def fam(cmp, name):
    return cmp.families.set_index("family").loc[name]


def test_points_families_strengths_and_worst_case(world):
    _, pts, _ = world
    assert set(pts.family) == {"none", "gmm-cem", "slot-cem", "dropout", "topk", "undefended"}
    none = pts[pts.family == "none"].sort_values("accuracy_mean")
    assert list(none.strength) == ["noise=0.1", "noise=0.05", "noise=0.025"] and set(none.knob) == {"noise"}
    assert list(pts[pts.family == "gmm-cem"].strength) == ["lam=4", "lam=16", "lam=64"]
    assert list(none.privacy_mean) == pytest.approx([0.40, 0.50, 0.60])
    assert set(pts.privacy_attack) == {"decoder"}  # optimization is 0.1 lower: decoder is the worst case
    assert (none.n_seeds == 3).all() and (none.n_images == 256).all()
    sd = np.std([-0.01, 0.0, 0.01], ddof=1)
    assert none.privacy_ci95.iloc[0] == pytest.approx(4.302652729749464 * sd / math.sqrt(3))
    assert pts.set_index("family").loc["undefended", "strength"] == "undefended"
    assert pts.on_frontier[pts.family != "undefended"].all()


def test_known_shift_is_better_with_the_shift_in_its_ci(world):
    _, _, cmp = world
    row = fam(cmp, "gmm-cem")
    assert row.verdict == "better" and row.n_in_range == 3
    assert row.mean_gain == pytest.approx(SHIFT)
    assert row.gain_lo < SHIFT < row.gain_hi and row.gain_lo > 0
    assert row.area == pytest.approx(SHIFT) and row.area_lo < SHIFT < row.area_hi
    pts = cmp.points[cmp.points.family == "gmm-cem"]
    assert list(pts.gain) == pytest.approx([SHIFT] * 3) and not pts.extrapolated.any()


def test_copy_is_indistinguishable_and_shift_up_is_worse(world):
    _, _, cmp = world
    copy = fam(cmp, "slot-cem")
    assert copy.verdict == "indistinguishable" and copy.mean_gain == pytest.approx(0.0, abs=1e-12)
    assert copy.gain_lo < 0 < copy.gain_hi
    worse = fam(cmp, "dropout")
    assert worse.verdict == "worse" and worse.mean_gain == pytest.approx(-SHIFT) and worse.gain_hi < 0
    assert fam(cmp, "none").verdict == "reference"


def test_points_outside_the_reference_range_are_extrapolated(world):
    _, _, cmp = world
    topk = cmp.points[cmp.points.family == "topk"]
    assert topk.extrapolated.all() and topk.gain.isna().all() and topk.gain_lo.isna().all()
    assert topk.ref_value.isna().all()
    row = fam(cmp, "topk")
    assert row.verdict == "extrapolation only" and row.n_in_range == 0 and math.isnan(row.mean_gain)
    line = next(v for v in frontier.verdict_lines(cmp) if v.startswith("topk:"))
    # the reference runs from its least accurate point to the undefended model (95%)
    assert "no verdict: no none point at its accuracy" in line and "none spans 80.0-95.0%" in line
    assert "the reference was not swept" in line


def test_the_reference_ends_at_the_undefended_model(tmp_path):
    """A defense between the reference's most accurate point (90%, 0.60) and the undefended model
    (95%, 0.80) is judged against the line between them: at 92% that line is at 0.68."""
    write_family(tmp_path, "none", ACCS, [ref_ssim(a) for a in ACCS], knob="noise")
    write_family(tmp_path, "gmm-cem", (0.92,), (0.63,))
    write_undefended(tmp_path)
    pts = points_of(tmp_path)
    cmp = frontier.compare(pts, resamples=RESAMPLES)
    point = cmp.points.set_index("family").loc["gmm-cem"]
    assert point.ref_value == pytest.approx(0.60 + 0.02 / 0.05 * 0.20) and point.gain == pytest.approx(0.05)
    assert point.via_undefended and not point.extrapolated and point.gain_lo < 0.05 < point.gain_hi
    row = fam(cmp, "gmm-cem")
    assert row.verdict == "better" and (row.ref_acc_max, row.ref_own_max) == pytest.approx((0.95, 0.90))
    line = frontier.verdict_lines(cmp)[0]
    assert line.startswith("gmm-cem: leaks less than none at the same accuracy (gain 0.050 SSIM")
    assert "1 above every none point (90.0%), judged against the line to the undefended model (95.0%)" in line
    # The frontier plot draws that stretch of the reference, dashed, from (90, 0.60) to (95, 0.80).
    ax = frontier_figure(cmp).axes[0]
    dashed = [ln for ln in ax.lines if ln.get_linestyle() == "--" and ln.get_color() == "black"]
    assert [list(ln.get_xdata()) for ln in dashed] == [pytest.approx([90.0, 95.0])]
    # The README's verdict block (privbench report) says the same from verdicts.csv.
    (tmp_path / "out").mkdir()
    cmp.families.to_csv(tmp_path / "out" / "verdicts.csv", index=False)
    block = blocks.regenerate("<!-- privbench: verdicts out -->\n<!-- privbench: end -->", tmp_path)
    assert "1 of 1 points at matched accuracy (1 on the line from none's best point to the undefended model)" in block
    # Without the undefended end the same point lies outside the reference's range.
    off = frontier.compare(pts, resamples=RESAMPLES, undefended_end=False, top_resolution=False)
    assert off.points.set_index("family").loc["gmm-cem"].extrapolated
    assert fam(off, "gmm-cem").verdict == "extrapolation only"
    assert "the reference was not swept high enough" in frontier.verdict_lines(off)[0]


def test_a_point_above_the_top_by_less_than_the_accuracies_resolve_is_compared_with_the_top(tmp_path):
    """No undefended model here. The reference's top is (90%, 0.60), its accuracy CI over three
    seeds +-0.025 (sd 0.01, t 4.30), as is the defense's: a defense at 92% is 2 points above it,
    within sqrt(2) x 0.025 = 0.035, so it is compared with the top's 0.60; one at 96% is not."""
    write_family(tmp_path, "none", ACCS, [ref_ssim(a) for a in ACCS], knob="noise")
    write_family(tmp_path, "gmm-cem", (0.92,), (0.55,))
    write_family(tmp_path, "slot-cem", (0.96,), (0.55,))
    pts = points_of(tmp_path)
    cmp = frontier.compare(pts, resamples=RESAMPLES)
    near, far = (cmp.points.set_index("family").loc[f] for f in ("gmm-cem", "slot-cem"))
    assert near.at_top and not near.extrapolated and near.ref_value == pytest.approx(0.60)
    assert near.gain == pytest.approx(0.05) and fam(cmp, "gmm-cem").verdict == "better"
    assert far.extrapolated and not far.at_top and fam(cmp, "slot-cem").verdict == "extrapolation only"
    line = next(v for v in frontier.verdict_lines(cmp) if v.startswith("gmm-cem"))
    assert "1 above the reference's most accurate point (90.0%) by less than the accuracies resolve" in line
    (tmp_path / "out").mkdir()
    cmp.families.to_csv(tmp_path / "out" / "verdicts.csv", index=False)
    block = blocks.regenerate("<!-- privbench: verdicts out -->\n<!-- privbench: end -->", tmp_path)
    assert "(1 compared with none's most accurate point, within the accuracies' resolution)" in block
    off = frontier.compare(pts, resamples=RESAMPLES, top_resolution=False)
    assert fam(off, "gmm-cem").verdict == "extrapolation only"


@pytest.mark.parametrize("undefended", [0.95, 0.88])  # above the reference's top (90%), or below it
def test_a_defense_more_accurate_than_the_undefended_model_gets_no_verdict(tmp_path, undefended):
    write_family(tmp_path, "none", ACCS, [ref_ssim(a) for a in ACCS], knob="noise")
    write_family(tmp_path, "gmm-cem", (0.98,), (0.50,))
    write_undefended(tmp_path, undefended, spread=0.0)
    cmp = frontier.compare(points_of(tmp_path), resamples=RESAMPLES)
    assert fam(cmp, "gmm-cem").verdict == "extrapolation only"
    line = frontier.verdict_lines(cmp)[0]
    assert line.startswith(
        f"gmm-cem: no verdict: more accurate than the undefended model (98.0% against {100 * undefended:.1f}%) "
        "and every none point (up to 90.0%)"
    )
    # the dominance clause still applies: 0.500 is below the 90% point's 0.600, not the 85% point's 0.500
    # and the undefended model, less accurate than the defense too, leaks more (0.800)
    assert (
        "; it leaks less than the most accurate none point (90.0%, 0.600) and the undefended model "
        f"({100 * undefended:.1f}%, 0.800) against its 0.500, each less accurate than it"
    ) in line


def test_verdict_lines(world):
    _, _, cmp = world
    lines = frontier.verdict_lines(cmp)
    assert len(lines) == 4  # one per family but the reference
    gmm = next(v for v in lines if v.startswith("gmm-cem:"))
    assert gmm.startswith("gmm-cem: leaks less than none at the same accuracy (gain 0.050 SSIM, 95% CI 0.")
    assert gmm.endswith("[3 of 3 points at matched accuracy]")
    assert any(v.startswith("dropout: leaks more than none at the same accuracy") for v in lines)
    copy = next(v for v in lines if v.startswith("slot-cem: no difference from none that these seeds can resolve"))
    row = fam(cmp, "slot-cem")  # power 0.8, alpha 0.05: 2.80 standard errors, the CI being 3.92 of them
    assert f"could detect is {2.801585 / 3.919928 * (row.gain_hi - row.gain_lo):.3f}" in copy
    assert "detectable" not in gmm
    # the undefended model was scored by the decoder only: the worst cases cover different attack sets
    assert any(
        "not all scored by the same attacks (configurations per attack, of 15: decoder: 15, optimization: 14)" in n
        for n in cmp.notes
    )


def test_interpolation_against_hand_computation():
    acc = np.array([[0.80, 0.85, 0.90, 0.83]])
    leak = np.array([[0.40, 0.50, 0.60, 0.55]])  # 0.83 is dominated by 0.85: skipped
    mask = fs.pareto_mask(acc, leak)
    assert mask.tolist() == [[True, True, True, False]]
    q = np.array([[0.80, 0.825, 0.87, 0.90, 0.95, 0.70]])
    # linear between Pareto points; flat above the most accurate and below the least leaky point
    assert fs.curve_at(acc, leak, mask, q)[0] == pytest.approx([0.40, 0.45, 0.54, 0.60, 0.60, 0.40])
    # a dominated point of lower accuracy: the curve is flat down to it (0.45 reached with more accuracy)
    acc2, leak2 = np.array([[0.75, 0.80, 0.90]]), np.array([[0.45, 0.40, 0.60]])
    assert fs.curve_at(acc2, leak2, fs.pareto_mask(acc2, leak2), np.array([[0.77]]))[0] == pytest.approx([0.40])


def test_interpolated_gain_of_a_point_between_reference_points(tmp_path):
    write_family(tmp_path, "none", ACCS, [ref_ssim(a) for a in ACCS], knob="noise", seeds=1)
    write_family(tmp_path, "gmm-cem", (0.825,), (0.42,), seeds=1)
    cmp = frontier.compare(points_of(tmp_path), resamples=50)
    row = cmp.points[cmp.points.family == "gmm-cem"].iloc[0]
    assert row.ref_value == pytest.approx(0.45) and row.gain == pytest.approx(0.03)
    assert fam(cmp, "gmm-cem").n_points == 1 and math.isnan(fam(cmp, "gmm-cem").area)  # one point: no area


def test_area_and_dcs_against_hand_computation():
    ref_a, ref_l = np.array([[0.80, 0.85, 0.90]]), np.array([[0.40, 0.50, 0.60]])
    fam_a, fam_l = np.array([[0.80, 0.90]]), np.array([[0.35, 0.60]])
    # gap 0.05 at 0.80, 0.025 at 0.85, 0 at 0.90: trapezoids 0.001875 + 0.000625 over a width of 0.1
    assert fs.mean_gap(fam_a, fam_l, ref_a, ref_l)[0] == pytest.approx(0.025)
    # common range only: a family on [0.85, 0.95] (0.40 + 2 * (acc - 0.85)) against the reference on
    # [0.85, 0.90] (0.50 + 2 * (acc - 0.85)): a gap of 0.1 throughout; beyond 0.90 nothing counts
    assert fs.mean_gap(np.array([[0.85, 0.95]]), np.array([[0.40, 0.60]]), ref_a, ref_l)[0] == pytest.approx(0.1)
    # ... and a family point past the common range bends nothing inside it: (0.85, 0.40), (0.95, 0.45)
    assert fs.mean_gap(np.array([[0.85, 0.95]]), np.array([[0.40, 0.45]]), ref_a, ref_l)[0] == pytest.approx(0.1375)
    a, p = (0.95 - 0.85) / (0.95 - 0.1), (0.45 - 0.1) / (0.80 - 0.1)
    want = 1 / (1 + math.sqrt(0.5 * a**2 + 0.5 * p**2))
    assert fs.dcs(np.array(0.85), np.array(0.45), 0.95, 0.1, 0.80, 0.1) == pytest.approx(want)
    assert fs.dcs(np.array(0.97), np.array(0.05), 0.95, 0.1, 0.80, 0.1) == pytest.approx(1.0)  # clipped at 0
    assert fs.dcs(np.array(0.95), np.array(0.80), 0.95, 0.1, 0.80, 0.1) == pytest.approx(1 / (1 + math.sqrt(0.5)))


def test_family_dcs_in_compare(world):
    _, pts, cmp = world
    g = pts[pts.family == "gmm-cem"]
    und_acc, und_ssim = UNDEFENDED
    a = (und_acc - g.accuracy_mean) / (und_acc - 0.1)
    p = (g.privacy_mean - BASELINE) / (und_ssim - BASELINE)
    want = float(np.mean(1 / (1 + np.sqrt(0.5 * a**2 + 0.5 * p**2))))
    row = fam(cmp, "gmm-cem")
    assert row.dcs == pytest.approx(want) and row.dcs_lo < want < row.dcs_hi
    assert fam(cmp, "gmm-cem").dcs > fam(cmp, "none").dcs > fam(cmp, "dropout").dcs


def test_bootstrap_draw_is_hierarchical_and_binomial():
    rng = np.random.default_rng(0)
    two = np.arange(2).tobytes()
    counts = {two: fs.image_counts(2, 4000, rng)}
    assert (counts[two].sum(axis=1) == 2).all()
    one = [fs.Seed(np.array([[0.0, 1.0], [1.0, 0.0]]), 0.5, 0, two)]  # two anti-correlated attacks
    acc, worst = fs.draw(one, counts, 4000, rng, higher=True)
    assert (acc == 0.5).all()  # acc_n 0: not resampled
    # the same images for both attacks: the max of the two means is 0.5 (one of each) or 1.0 (one image twice)
    assert set(np.round(worst, 6)) == {0.5, 1.0} and np.mean(worst == 1.0) == pytest.approx(0.5, abs=0.05)
    # runs on the same images share the draw: two copies of a run give the same resampled means
    _, copy = fs.draw(one * 2, counts, 4000, np.random.default_rng(1), higher=True)
    assert list(copy) == list(worst)
    three = np.arange(3).tobytes()
    seeds = [fs.Seed(np.full((3, 1), v), 0.8, 100, three) for v in (0.0, 1.0)]
    acc, worst = fs.draw(seeds, {}, 4000, rng, higher=False)  # seeds resampled: 0, 0.5 or 1
    assert np.mean(worst) == pytest.approx(0.5, abs=0.03) and set(np.round(worst, 6)) <= {0.0, 0.5, 1.0}
    assert np.std(acc) == pytest.approx(math.sqrt(0.8 * 0.2 / 100 / 2), rel=0.1)  # Binomial, mean of 2 draws
    means = [fs.Seed(np.array([[0.3, 0.7]]), 0.9, 0)]  # no per-image file: the run means, fixed
    assert set(fs.draw(means, {}, 100, rng, higher=True)[1]) == {0.7}


def test_bad_input_errors(tmp_path):
    write_family(tmp_path, "none", ACCS[:1], [0.4], knob="noise", seeds=1)
    write_family(tmp_path, "gmm-cem", ACCS[:2], [0.4, 0.5], seeds=1)
    pts = points_of(tmp_path)
    with pytest.raises(
        UserError,
        match=r"reference family 'slot-cem' is not in the results for "
        r"embedded/vgg11/quick \(families there: gmm-cem, none\)",
    ):
        frontier.compare(pts, reference="slot-cem")
    with pytest.raises(
        UserError,
        match=r"reference family 'none' has 1 point \(noise=0.1\) in "
        r"embedded/vgg11/quick: a frontier needs at least two",
    ):
        frontier.compare(pts)
    with pytest.raises(UserError, match=r"no cell has privacy metric 'lpips' \(the attacks here report: ssim, mse\)"):
        points_of(tmp_path, "lpips")
    with pytest.raises(UserError, match="unknown privacy metric 'fid'"):
        points_of(tmp_path, "fid")
    assert "\n" not in str(pytest.raises(UserError, frontier.compare, pts).value)


def test_mixed_presets_are_split(tmp_path):
    for preset, shift in (("quick", SHIFT), ("paper", -SHIFT)):
        write_family(tmp_path, "none", ACCS, [ref_ssim(a) for a in ACCS], knob="noise", seeds=1, preset=preset)
        write_family(tmp_path, "gmm-cem", ACCS, [ref_ssim(a) - shift for a in ACCS], seeds=1, preset=preset)
    cmp = frontier.compare(points_of(tmp_path), resamples=100)
    gmm = cmp.families[cmp.families.family == "gmm-cem"].set_index("preset")
    assert gmm.loc["quick", "mean_gain"] == pytest.approx(SHIFT) and gmm.loc["paper", "mean_gain"] == pytest.approx(
        -SHIFT
    )
    assert set(cmp.points.group) == {"embedded/vgg11/quick", "embedded/vgg11/paper"}
    lines = frontier.verdict_lines(cmp)
    assert len(lines) == 2 and {line.split("]")[0] for line in lines} == {
        "[embedded/vgg11/quick",
        "[embedded/vgg11/paper",
    }


def test_family_split_names_the_difference_and_stacks_name_the_part(tmp_path):
    for i, lam in enumerate((4.0, 16.0)):
        for noise in (0.025, 0.1):
            write_cell(tmp_path, defense="gmm-cem", noise=noise, options={"lam": lam}, acc=0.8 + 0.05 * i)
        write_cell(tmp_path, defense="dropout+gmm-cem", options={"gmm-cem": {"lam": lam}}, acc=0.8 + 0.05 * i)
    pts = points_of(tmp_path)
    assert set(pts.family) == {"gmm-cem [noise=0.025]", "gmm-cem [noise=0.1]", "dropout + gmm-cem"}
    assert set(pts[pts.family == "gmm-cem [noise=0.1]"].strength) == {"lam=4", "lam=16"}
    assert set(pts[pts.family == "dropout + gmm-cem"].strength) == {"gmm-cem.lam=4", "gmm-cem.lam=16"}


def test_saturation_checks_are_not_cells(tmp_path):
    run = write_cell(tmp_path, attacks={"decoder": 0.5})
    check = run / "attacks" / "decoder-check"
    check.mkdir()
    (check / "metrics.json").write_text(
        json.dumps(
            {
                "attack": "decoder",
                "options": {},
                "attacker_data": "train",
                "eval_images": 256,
                "saturation_check_of": "x",
                "metrics": {"ssim": {"mean": 0.99, "ci95": 0.01, "n": 256}},
            }
        )
    )
    (check / "per_image.csv").write_text("index,ssim\n0,0.99\n")
    (row,) = points_of(tmp_path).itertuples()
    assert row.privacy_mean == pytest.approx(0.5) and [a for a, _, _ in row.cells[0].attacks] == ["decoder"]


def test_missing_per_image_falls_back_to_seeds_with_a_note(tmp_path):
    write_family(tmp_path, "none", ACCS, [ref_ssim(a) for a in ACCS], knob="noise", per_image=False)
    write_family(tmp_path, "gmm-cem", ACCS, [ref_ssim(a) - SHIFT for a in ACCS])
    cmp = frontier.compare(points_of(tmp_path), resamples=100)
    assert fam(cmp, "gmm-cem").mean_gain == pytest.approx(SHIFT)
    assert any("resampled over seeds only" in n for n in cmp.notes)
    assert any("DCS not computed: no undefended run" in n for n in cmp.notes)


def test_lower_is_leakier_metric_inverts_the_direction(world):
    root, _, _ = world
    pts = points_of(root, "mse")  # MSE = (1 - SSIM) / 10: lower is leakier
    none = pts[pts.family == "none"].sort_values("accuracy_mean")
    assert list(none.privacy_mean) == pytest.approx([0.06, 0.05, 0.04]) and set(pts.privacy_attack) == {"decoder"}
    cmp = frontier.compare(pts, resamples=100)
    row = fam(cmp, "gmm-cem")  # leaks less: its MSE is 0.005 higher, a positive gain in MSE units
    assert row.verdict == "better" and row.mean_gain == pytest.approx(SHIFT / 10)
    assert fam(cmp, "dropout").verdict == "worse"
    assert "(gain 0.0050 MSE, 95% CI" in next(v for v in frontier.verdict_lines(cmp) if v.startswith("gmm-cem"))


def test_plot_writes_png_and_pdf(world, tmp_path):
    _, _, cmp = world
    paths = plot_frontier(cmp, tmp_path / "out" / "frontier")
    assert [p.name for p in paths] == ["frontier.png", "frontier.pdf"]
    for p in paths:
        assert p.stat().st_size > 1000
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~current_umask()
    assert paths[0].read_bytes()[:4] == b"\x89PNG" and paths[1].read_bytes()[:4] == b"%PDF"


def test_comparison_frames_are_plain(world):
    _, _, cmp = world
    assert "cells" not in cmp.points
    assert isinstance(cmp.families, pd.DataFrame) and len(cmp.families) == 5
    cmp.points.to_csv()  # nothing unprintable left in it


def test_configurations_of_the_same_seeds_are_resampled_together():
    # B = A + 0.05 at every seed, with a large seed-to-seed spread: drawn together, every resample
    # sees the 0.05; drawn apart (another seed set), the spread leaks into the difference.
    from privbench.analysis.frontier_stats import Seed, draw, paired_picks

    rng = np.random.default_rng(0)
    base = [0.3, 0.5, 0.7]
    a = [Seed(np.array([[v]]), 0.9, 0, None, s) for s, v in zip((0, 1, 2), base)]
    b = [Seed(np.array([[v + 0.05]]), 0.9, 0, None, s) for s, v in zip((2, 0, 1), base[2:] + base[:2])]  # other order
    c = [Seed(np.array([[v + 0.05]]), 0.9, 0, None, s) for s, v in zip((0, 1, 3), base)]
    pa, pb, pc = paired_picks([a, b, c], 200, rng)
    wa, wb, wc = (draw(x, {}, 200, rng, True, p)[1] for x, p in ((a, pa), (b, pb), (c, pc)))
    assert np.allclose(wb - wa, 0.05)
    assert np.std(wc - wa) > 0.05
    same = [Seed(np.array([[v]]), 0.9, 0, None, None) for v in base]  # no seed numbers: drawn alone
    assert paired_picks([same, same], 50, rng)[0].shape == (50, 3)


def test_points_are_a_function_of_rows_and_run_facts(tmp_path):
    """With the run facts passed in (store.rows.run_info), the analysis reads no file: the same
    points come out after the run folders are gone."""
    write_world(tmp_path / "w")
    long = collect([tmp_path / "w"])
    infos = {p: run_info(p) for p in dict.fromkeys(long.path)}
    expected = frontier.points(long, infos=infos).drop(columns=["cells"])
    shutil.rmtree(tmp_path / "w")
    got = frontier.points(long, infos=infos).drop(columns=["cells"])
    pd.testing.assert_frame_equal(got, expected)
    with pytest.raises(ValueError, match="no run facts for .*pass infos=privbench.store.rows.run_infos"):
        frontier.points(long, infos={})


def test_compare_resamples_the_per_image_values_it_is_given_and_reads_no_file(tmp_path):
    """The store reads per_image.csv (store.rows.per_image); compare resamples what the points
    carry: the same numbers after the run folders are gone, and without per_image every run falls
    back to its run means with the note a run without per_image.csv gets."""
    write_world(tmp_path / "w")
    long = collect([tmp_path / "w"])
    infos, images = run_infos(long), per_image(long, "ssim")
    assert len(images) == long[long.metric == "ssim"].attack_dir.ne("").sum()
    assert all(v is not None and len(v[0]) == 256 for v in images.values())
    pts = frontier.points(long, infos=infos, per_image=images)
    before = frontier.compare(pts, resamples=RESAMPLES)
    assert not any("resampled over seeds only" in n for n in before.notes)
    shutil.rmtree(tmp_path / "w")
    after = frontier.compare(pts, resamples=RESAMPLES)
    pd.testing.assert_frame_equal(after.points, before.points, check_exact=True)
    pd.testing.assert_frame_equal(after.families, before.families, check_exact=True)
    assert after.notes == before.notes
    means_only = frontier.compare(frontier.points(long, infos=infos), resamples=RESAMPLES)
    assert sum("resampled over seeds only" in n for n in means_only.notes) == long.path.nunique()
    assert fam(means_only, "gmm-cem").mean_gain == pytest.approx(fam(before, "gmm-cem").mean_gain)


def test_table_and_plot_frontier_from_the_command_line(world, tmp_path, capsys):
    """`privbench table --layout frontier` and `plot --frontier` read the rows and the run facts
    through the store and print the verdicts the analysis gives."""
    root, _, cmp = world
    code, out, err = run_cli(["table", str(root), "--layout", "frontier", "--reference", "none"], capsys)
    assert code == 0, err
    assert "gmm-cem" in out and "dropout" in out
    assert "leaks less" in out or "better" in out
    png = tmp_path / "frontier.png"
    code, out, err = run_cli(["plot", str(root), "--frontier", "--out", str(png), "--reference", "none"], capsys)
    assert code == 0, err
    assert png.stat().st_size > 0


def test_a_defense_beyond_the_reference_is_said_to_dominate_the_points_it_beats(tmp_path):
    """More accurate than every reference point: no matched-accuracy verdict, but the line names
    the most accurate reference points it also leaks less than (here 0.60 and 0.50, not 0.40)."""
    write_family(tmp_path, "none", ACCS, [ref_ssim(a) for a in ACCS], knob="noise")
    write_family(tmp_path, "gmm-cem", (0.95,), (0.45,))
    (line,) = [
        v
        for v in frontier.verdict_lines(frontier.compare(points_of(tmp_path), resamples=50))
        if v.startswith("gmm-cem")
    ]
    assert line.startswith("gmm-cem: no verdict: no none point at its accuracy (95.0%")
    assert line.endswith(
        "it leaks less than the 2 most accurate none points (85.0-90.0%, 0.500-0.600) against its "
        "0.450, each less accurate than it: a dominance, not a gain at matched accuracy"
    )
