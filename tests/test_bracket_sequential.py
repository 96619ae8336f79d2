"""Bracketing references and sequential seeds, on synthetic data with known answers."""

import importlib
import math

import numpy as np
import pytest
from scipy import stats as sps

from privbench.analysis import bracket as br
from privbench.analysis import sequential as sq
from privbench.errors import UserError


def curve(noise: float) -> float:
    """A noise-only reference with a known shape: 95% at noise 0, 4 points lost per doubling of 1 + noise / 0.1."""
    return (95 - 4 * math.log2(1 + noise / 0.1)) / 100


def inverse(acc: float) -> float:
    """The noise at which `curve` reaches acc."""
    return 0.1 * (2 ** ((95 - 100 * acc) / 4) - 1)


SWEEP = (0.025, 0.05, 0.1, 0.2, 0.4)  # accuracy 93.7% .. 85.7%
REF = [(s, curve(s)) for s in SWEEP]


class Trainer:
    """train_fn for `bracket`: the curve at each strength (optionally several noisy seeds); records calls."""

    def __init__(self, f=curve, seeds=1, sd=0.0, seed=0):
        self.f, self.seeds, self.sd, self.calls = f, seeds, sd, []
        self.rng = np.random.default_rng(seed)

    def __call__(self, strengths):
        self.calls.append(list(strengths))
        return [(s, self.f(s) + self.rng.normal(0, self.sd)) for s in strengths for _ in range(self.seeds)]


def inside(result, acc):
    return result.low <= acc <= result.high


# ---------------------------------------------------------------- bracket


def test_targets_outside_get_bracketed_in_one_round():
    targets = {"below": 0.80, "far-below": 0.76, "above": 0.94, "inside": 0.90}
    step = br.plan(REF, targets)
    assert step.targets["inside"].status == "bracketed"
    assert len(step.strengths) == 2  # one per side, however many defenses share it
    assert step.targets["below"].strength == step.targets["far-below"].strength > max(SWEEP)
    assert step.targets["above"].strength < min(SWEEP)  # more accuracy needs less noise
    train = Trainer()
    result = br.bracket(train, REF, targets)
    assert result.rounds == 1 and train.calls == [step.strengths] and result.added == step.strengths
    assert result.all_bracketed and not result.failures
    assert all(inside(result, a) for a in targets.values())


def test_needed_strength_is_the_extrapolated_answer():
    step = br.plan(REF, {"d": 0.80})
    # The secant through noise 0.2 and 0.4 is a little flatter than the curve beyond: 1.53 against the true 1.25.
    assert step.targets["d"].needed == pytest.approx(inverse(0.80), rel=0.3)


def test_already_bracketed_costs_nothing():
    train = Trainer()
    result = br.bracket(train, REF, {"a": 0.90, "b": curve(0.4), "c": curve(0.025)})
    assert train.calls == [] and result.added == [] and result.rounds == 0 and result.all_bracketed
    assert br.next_strengths(REF, {"a": 0.90}) == []
    assert br.next_strengths(REF, {}) == []


def test_cap_is_respected_and_the_failure_names_the_needed_strength():
    train = Trainer()
    result = br.bracket(train, REF, {"gmm-cem": 0.50}, cap=2)
    assert len(result.added) == 2 and sum(len(c) for c in train.calls) == 2
    t = result.targets["gmm-cem"]
    assert t.status == "could not bracket" and t.needed is not None
    assert t.needed == pytest.approx(inverse(0.50), rel=0.5)  # 243 on the true curve
    low_s = min(result.points, key=lambda p: p[1])[0]
    assert result.failures == [
        f"could not bracket gmm-cem (50.0%) within 2 added points: the reference reached {100 * result.low:.1f}% at "
        f"noise {low_s:.3g}; about noise {t.needed:.3g} would be needed"
    ]


def test_cap_zero_trains_nothing():
    train = Trainer()
    result = br.bracket(train, REF, {"x": 0.80, "y": 0.90}, cap=0)
    assert train.calls == [] and result.targets["y"].status == "bracketed"
    assert result.targets["x"].status == "could not bracket" and "within 0 added points" in result.failures[0]


def test_several_rounds_until_bracketed_with_noisy_seeds():
    rng = np.random.default_rng(1)
    ref = [(s, curve(s) + rng.normal(0, 0.01)) for s in (0.0, *SWEEP) for _ in range(3)]
    train = Trainer(seeds=3, sd=0.01, seed=2)
    result = br.bracket(train, ref, {"a": 0.72, "b": 0.79}, cap=3)
    assert result.all_bracketed and 1 <= result.rounds <= 3 and len(result.added) <= 3
    assert all(len(c) == 1 for c in train.calls)  # both defenses sit on one side: one strength a round


def test_one_strength_left_goes_to_the_side_with_more_defenses():
    result = br.bracket(Trainer(), REF, {"a": 0.80, "b": 0.82, "c": 0.945}, cap=1)
    assert len(result.added) == 1 and result.added[0] > max(SWEEP)
    assert result.targets["a"].status == result.targets["b"].status == "bracketed"
    assert result.targets["c"].status == "could not bracket" and "within 1 added point:" in result.failures[0]


def test_strengths_are_canonical_and_never_repeated():
    step = br.plan(REF, {"lo": 0.79, "hi": 0.945})
    for s in step.strengths:
        assert float(f"{s:.3g}") == s
    again = br.next_strengths(REF, {"lo": 0.79, "hi": 0.945}, added=step.strengths, cap=5)
    assert not set(again) & set(step.strengths)  # a strength trained without a result is not retried
    # A proposal that rounds back onto a swept strength (here the end, 0.4) takes one more geometric step.
    assert br.next_strengths(REF, {"t": curve(0.4) - 1e-9}, margin=0.0) == [0.8]
    assert br.next_strengths([(0.1, 0.9), (0.2, 0.86), (0.40001, 0.85)], {"t": 0.85 - 1e-9}, margin=0.0) == [0.8]


def test_wrong_or_flat_slope_steps_geometrically():
    assert br.next_strengths([(0.1, 0.90), (0.2, 0.86), (0.4, 0.87)], {"t": 0.84}) == [0.8]  # rises at the end
    flat = [(0.1, 0.90), (0.1, 0.94), (0.2, 0.915), (0.2, 0.925), (0.4, 0.91), (0.4, 0.93)]  # within seed noise
    assert br.next_strengths(flat, {"t": 0.85}) == [0.8]
    assert br.next_strengths([(0.2, 0.90)], {"t": 0.95}) == [0.1]  # one point: halve
    assert br.next_strengths([(0.0, 0.95)], {"t": 0.90}) == [br.NOISE.start]  # only the knob off: start


def test_knob_end_is_reported_or_raised():
    ref = [(0.0, 0.916), (0.025, 0.922), (0.05, 0.920), (0.1, 0.896)]  # docs/frontier.md's reference
    result = br.bracket(Trainer(), ref, {"gmm-cem": 0.928})
    assert result.added == [] and result.targets["gmm-cem"].status == "could not bracket"
    assert result.failures == [
        "could not bracket gmm-cem (92.8%): the reference's best accuracy is 92.2% (at noise "
        "0.025), and noise cannot go below 0, which is already swept"
    ]
    with pytest.raises(UserError, match="cannot go below 0"):
        br.plan(ref, {"gmm-cem": 0.928}, on_impossible="raise")


def test_rate_knob_on_logit_scale():
    def f(r):
        return 0.95 - 0.3 * r * r

    ref = [(r, f(r)) for r in (0.1, 0.2, 0.3)]
    result = br.bracket(Trainer(f), ref, {"t": 0.70}, knob=br.DROPOUT)
    assert result.all_bracketed and all(0.3 < s < 1 for s in result.added)
    linear = br.bracket(Trainer(f), ref, {"t": 0.70}, knob=br.Knob("rate", 0.0, 1.0, "linear"))
    assert linear.all_bracketed and all(0.3 < s < 1 for s in linear.added)


def test_a_failed_training_still_counts():
    result = br.bracket(lambda strengths: [], REF, {"t": 0.80}, cap=3)
    assert len(result.added) == 3 and len(set(result.added)) == 3
    assert result.targets["t"].status == "could not bracket"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"cap": -1}, "cap"),
        ({"points": []}, "at least one"),
        ({"points": [(0.1, math.nan)]}, "at least one"),
        ({"points": [(0.1, 91.2)]}, "fraction"),
        ({"targets": {"x": 91.2}}, "fraction"),
        ({"points": [(-0.1, 0.9)]}, "outside"),
        ({"points": [(1.5, 0.9)], "knob": br.DROPOUT}, "outside"),
    ],
)
def test_validation(kwargs, match):
    args = {"points": REF, "targets": {"x": 0.8}} | kwargs
    with pytest.raises(UserError, match=match):
        br.plan(**args)


def test_knob_validation():
    with pytest.raises(UserError, match="lo below hi"):
        br.Knob("rate", 1.0, 0.0)
    with pytest.raises(UserError, match="finite hi"):
        br.Knob("rate", 0.0, math.inf, "logit")


# ---------------------------------------------------------------- sequential


@pytest.mark.parametrize("k, c", [(2, 2.178), (3, 2.289), (4, 2.361), (5, 2.413), (10, 2.555)])
def test_pocock_constants(k, c):
    looks = sq.plan_looks(1, k)  # looks at 1..k seeds: equally spaced
    assert [round(look.z, 3) for look in looks] == [c] * k
    assert looks[-1].spent == pytest.approx(0.05, abs=1e-6) and looks[-1].final


def test_obrien_fleming_boundaries():
    assert [round(look.z, 3) for look in sq.plan_looks(1, 2, rule="obf")] == [2.797, 1.977]
    assert round(sq.plan_looks(1, 3, rule="obf")[-1].z, 3) == 2.004  # C_B(3) = 2.004 (Jennison & Turnbull, table 2.3)


def test_lan_demets_spending():
    z1 = sps.norm.isf(0.05 * math.log(1 + (math.e - 1) * 0.5) / 2)  # Pocock-type spending at t = 1/2
    assert [round(look.z, 3) for look in sq.plan_looks(1, 2, rule="ld-pocock")] == [round(z1, 3), 2.201]
    looks = sq.plan_looks(3, 5, rule="ld-obf")
    for look in looks:  # each look spends exactly the spending function's alpha(n / cap)
        assert look.spent == pytest.approx(2 * sps.norm.sf(1.959964 / math.sqrt(look.info)), abs=1e-6)
    assert looks[0].z == pytest.approx(1.959964 / math.sqrt(0.6), abs=1e-5)


def test_simple_rules():
    assert [look.z for look in sq.plan_looks(3, 5, rule="bonferroni")] == pytest.approx([sps.norm.isf(0.05 / 6)] * 3)
    unadjusted = sq.plan_looks(1, 2, rule="unadjusted")
    assert unadjusted[0].z == pytest.approx(1.959964) and unadjusted[-1].spent == pytest.approx(0.083, abs=5e-4)


def test_false_verdict_rate_under_the_null():
    rng = np.random.default_rng(12345)
    values = rng.normal(0.0, 0.02, (4000, 10))  # per-seed gains, true gain 0
    limit = 0.05 + 3 * math.sqrt(0.05 * 0.95 / 4000)
    for start, cap in ((3, 5), (2, 10)):
        for rule in ("pocock", "obf"):
            verdict, _ = sq.sequential_t(values[:, :cap], sq.plan_looks(start, cap, rule=rule))
            assert np.mean(verdict != "indistinguishable") <= limit, (start, cap, rule)
        naive, _ = sq.sequential_t(values[:, :cap], sq.plan_looks(start, cap, rule="unadjusted"))
        assert np.mean(naive != "indistinguishable") > limit  # 5% at every look is not 5% overall


def test_a_real_gain_stops_early():
    rng = np.random.default_rng(7)
    looks = sq.plan_looks(3, 5)
    gains = rng.normal(0.025, 0.01, (4000, 5))  # a gain 2.5 times the per-seed sd
    verdict, used = sq.sequential_t(gains, looks)
    assert np.mean(verdict == "better") > 0.85
    assert np.mean((verdict == "better") & (used < 5)) > 0.6 and used.mean() < 4.2
    assert np.mean(sq.sequential_t(-gains, looks)[0] == "worse") == np.mean(verdict == "better")


def test_decide_t_matches_the_vectorised_run():
    rng = np.random.default_rng(3)
    looks = sq.plan_looks(3, 5)
    values = rng.normal(0.02, 0.02, (200, 5))
    verdict, used = sq.sequential_t(values, looks)
    for row, v, n in zip(values, verdict, used):
        for look in looks:
            word = sq.decide_t(look, row[: look.n].mean(), row[: look.n].std(ddof=1))
            if word != "continue":
                break
        assert (word, look.n) == (v, n)


def test_decide_rescales_a_95_interval():
    looks = sq.plan_looks(3, 5)
    first, last = looks[0], looks[-1]
    scale = first.z / 1.959964
    assert sq.rescale_ci(first, 0.05, 0.01, 0.08) == pytest.approx((0.05 - 0.04 * scale, 0.05 + 0.03 * scale))
    assert sq.decide(first, 0.05, 0.01, 0.09) == "better"  # 0.05 - 0.04 * 1.134 > 0
    assert sq.decide(first, 0.05, 0.005, 0.09) == "continue"
    assert sq.decide(last, 0.05, 0.005, 0.09) == "indistinguishable"
    assert sq.decide(first, -0.05, -0.09, -0.01) == "worse"
    assert sq.decide(first, 0.05, 0.01, 0.09, dof=2) == "continue"  # t on 2 dof: far wider
    assert sq.decide(first, math.nan, math.nan, math.nan) == "continue"


def test_student_t_calibration():
    looks = sq.plan_looks(3, 5)
    assert looks[0].t == pytest.approx(sps.t.isf(looks[0].spent / 2, 2))  # the first look exactly
    assert all(look.t_alpha < look.alpha for look in looks[1:])  # shared sd estimates: stricter than nominal
    assert looks[1].t_bound(10) == pytest.approx(sps.t.isf(looks[1].t_alpha / 2, 10))


def test_seeds_to_resolve_by_hand():
    # paired, sd 1, gain 2: n = 4 gives (3.182 + 0.978) / 2 = 2.08 > 2; n = 5 gives (2.776 + 0.941) / sqrt(5) = 1.66
    assert sq.seeds_to_resolve(2.0, 1.0, paired=True) == 5
    # two configurations: n = 5 gives (2.306 + 0.889) sqrt(2/5) = 2.02 > 2; n = 6 gives (2.228 + 0.879) / sqrt(3) = 1.79
    assert sq.seeds_to_resolve(2.0, 1.0) == sq.seeds_to_resolve(-2.0, 1.0) == 6
    assert sq.seeds_to_resolve(0.0, 1.0) is None and sq.seeds_to_resolve(1e-3, 1.0) is None
    assert sq.seeds_to_resolve(0.02, None) is None and sq.seeds_to_resolve(0.02, math.nan) is None


def test_seeds_to_resolve_agrees_with_the_project_formula():
    for name in ("privbench.util.stats", "privbench.stats"):  # where the project keeps it
        try:
            stats = importlib.import_module(name)
            break
        except ImportError:
            continue
    else:
        pytest.skip("the project's stats module moved")
    for sd, gain, paired in ((1.0, 2.0, True), (1.0, 2.0, False), (0.013, 0.02, True), (0.9, 0.3, False)):
        assert sq.seeds_to_resolve(gain, sd, paired=paired) == stats.seeds_needed(sd, gain, paired=paired)


def test_plan_validation():
    for args in ((0, 5), (4, 3), (3, 200), (1, 60), (2.0, 5)):
        with pytest.raises(UserError):
            sq.plan_looks(*args)
    with pytest.raises(UserError, match="unknown sequential rule"):
        sq.plan_looks(3, 5, rule="haybittle")
