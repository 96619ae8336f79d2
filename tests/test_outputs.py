"""What a reader sees: table headers and captions, the baseline mark, LaTeX width, seed
statistics, the mixed-environment line, plot error bars and labels, the reconstruction grid,
and bench/defense_evidence.py. Run folders are written by hand; nothing is trained."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from privbench import api
from privbench.analysis import tables
from privbench.attack.images import GRID_TENSORS
from privbench.engine.config import TrainConfig
from privbench.report import plots, table_format
from privbench.store import rows
from privbench.util import stats

T975 = {2: 4.302652729749464, 4: 2.7764451051977987}  # Student t quantiles 0.975, by dof
T80_4 = 0.9409645929528873  # Student t quantile 0.8 with 4 dof


def write_run(
    root,
    *,
    defense="none",
    bottleneck=8,
    noise=0.025,
    seed=0,
    acc=0.8,
    attacks=None,
    dataset="embedded",
    prov=None,
    eval_images=64,
    baseline_ssim=0.3,
    options=None,
):
    """A fake run folder. `attacks` maps a folder stem -> {metric: mean}; `options` maps the same
    stem -> the attack's options. The stem before '#' is the attack's name."""
    cfg = TrainConfig(defense=defense, bottleneck=bottleneck, noise=noise, seed=seed, dataset=dataset, progress=False)
    run = root / f"{defense}-{cfg.hash()}"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"train": cfg.to_dict(), "defense_options": {}}))
    (run / "metrics.json").write_text(
        json.dumps(
            {
                "test_accuracy": acc,
                "num_classes": 10,
                "train_seconds": 1.0,
                "z_intra_class_var": 0.01,
                "z_total_var": 0.02,
                "history": [{"epoch": 1, "epoch_seconds": 2.0 if defense == "none" else 3.0}],
            }
        )
    )
    (run / "provenance.json").write_text(json.dumps(prov or {}))
    (run / "checkpoint.pt").write_bytes(b"")
    for i, (stem, values) in enumerate((attacks or {}).items()):
        name = stem.split("#")[0]
        folder = run / "attacks" / f"{name}-{i:04d}abcdef{seed:02d}"
        folder.mkdir(parents=True)
        metrics = {m: {"mean": v, "ci95": 0.01, "std": 0.05, "n": eval_images} for m, v in values.items()}
        baseline = {
            "ssim": {"mean": baseline_ssim, "ci95": 0.02, "n": eval_images},
            "psnr": {"mean": 12.0, "ci95": 0.2, "n": eval_images},
        }
        (folder / "metrics.json").write_text(
            json.dumps(
                {
                    "attack": name,
                    "options": (options or {}).get(stem, {}),
                    "attacker_data": "train",
                    "eval_images": eval_images,
                    "seed": 0,
                    "metrics": metrics,
                    "baseline": baseline,
                    "provenance": prov or {},
                }
            )
        )
    return run


def md_header_and_rows(md):
    lines = [line for line in md.splitlines() if line.startswith("|")]
    split = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return split[0], [dict(zip(split[0], row)) for row in split[2:]]


# ------------------------------------------------------------------------------- stats


def test_welch_interval_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    a, b = [0.60, 0.62, 0.59], [0.55, 0.56, 0.54, 0.57]
    ci = scipy_stats.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
    got = stats.welch_ci95(stats.t_ci95(a), len(a), stats.t_ci95(b), len(b))
    assert got == pytest.approx((ci.high - ci.low) / 2, rel=1e-9)
    assert math.isnan(stats.welch_ci95(0.01, 1, 0.01, 3))  # one seed: no interval


def test_stats_against_hand_computation():
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert stats.mean(values) == 3.0
    assert stats.sd(values) == pytest.approx(math.sqrt(2.5))  # squares 4+1+0+1+4 = 10, over n-1 = 4
    assert stats.t_ci95(values) == pytest.approx(T975[4] * math.sqrt(2.5) / math.sqrt(5))
    assert stats.t_ci95([0.5, 0.6, 0.7]) == pytest.approx(T975[2] * 0.1 / math.sqrt(3))
    assert math.isnan(stats.sd([1.0])) and math.isnan(stats.t_ci95([1.0])) and math.isnan(stats.mean([]))
    # n = 3 seeds per arm: 2n-2 = 4 dof; (2.776 + 0.941) * sd * sqrt(2/3)
    assert stats.min_detectable_difference(1.0, 3) == pytest.approx((T975[4] + T80_4) * math.sqrt(2 / 3))
    assert stats.min_detectable_difference(2.0, 3) == pytest.approx(2 * 3.0352, abs=1e-3)
    assert stats.min_detectable_difference(1.0, 5) < stats.min_detectable_difference(1.0, 3)
    assert math.isnan(stats.min_detectable_difference(1.0, 1))


def test_t_quantile_fallback_without_scipy_is_close():
    for dof in (3, 4, 8, 30):
        for p in (0.8, 0.975):
            assert stats._t_quantile_approx(p, dof) == pytest.approx(stats.t_quantile(p, dof), rel=0.01)


# ------------------------------------------------------------------------------ tables


@pytest.fixture
def seeds3(tmp_path):
    for seed, (s, a) in enumerate(zip([0.50, 0.60, 0.70], [0.80, 0.82, 0.87])):
        attacks = {"decoder": {"ssim": s, "psnr": 18.0}, "optimization": {"ssim": 0.25, "psnr": 11.0}}
        write_run(tmp_path, defense="gmm-cem", seed=seed, acc=a, attacks=attacks)
    return tmp_path


def test_headers_units_caption_and_seed_statistics(seeds3):
    table = api.results([seeds3])
    md = table_format.render(table, "md")
    header, rows = md_header_and_rows(md)
    assert {"decoder SSIM [0,1]", "decoder PSNR (dB)", "optimization SSIM [0,1]", "seeds", "accuracy (%)"} <= set(
        header
    )
    assert not any(any(ch.isdigit() for ch in h.replace("[0,1]", "")) for h in header)  # no folder hashes
    row = rows[0]
    assert row["seeds"] == "n=3"
    acc_ci = T975[2] * stats.sd([80, 82, 87]) / math.sqrt(3)
    assert row["accuracy (%)"] == f"83.0 ± {acc_ci:.1f}"  # mean and t interval over seeds
    assert row["decoder SSIM [0,1]"] == f"0.600 ± {T975[2] * 0.1 / math.sqrt(3):.3f}"
    caption = next(line for line in md.splitlines() if line.startswith("Table: "))
    for part in ("data set embedded", "quick preset", "attacker data: train", "64 evaluation images", "n=3"):
        assert part in caption
    assert "over seeds (Student t, n-1 dof)" in md


def test_dagger_marks_cells_at_or_below_the_mean_image(seeds3):
    md = table_format.render(api.results([seeds3]), "md")
    _, rows = md_header_and_rows(md)
    assert rows[0]["optimization SSIM [0,1]"].endswith("†")  # 0.25 <= 0.30
    assert rows[0]["optimization PSNR (dB)"].endswith("†")  # 11 dB <= 12 dB
    assert "†" not in rows[0]["decoder SSIM [0,1]"] and "†" not in rows[0]["mean-image SSIM [0,1]"]
    assert any(line.startswith("† no better than the mean training image") for line in md.splitlines())


def test_dagger_absent_when_every_attack_beats_the_baseline(tmp_path):
    write_run(tmp_path, attacks={"decoder": {"ssim": 0.6}}, baseline_ssim=0.3)
    md = table_format.render(api.results([tmp_path]), "md")
    assert "†" not in md


def test_two_variants_of_one_attack_are_named_by_the_option_that_differs(tmp_path):
    write_run(
        tmp_path,
        attacks={"decoder#a": {"ssim": 0.5}, "decoder#b": {"ssim": 0.6}},
        options={"decoder#a": {"blocks": 2, "lr": 0.003}, "decoder#b": {"blocks": 4, "lr": 0.003}},
    )
    table = api.results([tmp_path])
    header, rows = md_header_and_rows(table_format.render(table, "md"))
    assert "decoder (blocks=2) SSIM [0,1]" in header and "decoder (blocks=4) SSIM [0,1]" in header
    assert rows[0]["decoder (blocks=4) SSIM [0,1]"].startswith("0.600")
    assert table.worst_attack[0] == "decoder (blocks=4)"


def test_latex_splits_wide_tables_and_has_no_local_paths(seeds3):
    table = api.results([seeds3])
    table.loc[:, "notes"] = "lpips missing: weights not found at /home/someone/.cache/torch/hub/alexnet.pth"
    latex = table_format.render(table, "latex")
    tabulars = latex.split(r"\begin{tabular}")[1:]
    assert len(tabulars) > 1  # 11 display columns: one table per metric
    for t in tabulars:
        spec = t.split("}", 1)[0].strip("{")
        assert len(spec) <= 8
        body = [line for line in t.split(r"\end{tabular}")[0].splitlines() if line.endswith(r"\\")]
        assert all(line.count(" & ") == len(spec) - 1 for line in body)
    assert "/home" not in latex and "alexnet.pth" in latex
    assert latex.count(r"\caption{") == len(tabulars) and "quick preset" in latex
    assert r"$^\dagger$" in latex and "†" not in latex


def test_narrow_latex_stays_one_table(tmp_path):
    write_run(tmp_path, attacks={"decoder": {"ssim": 0.5}})
    latex = table_format.render(api.results([tmp_path]), "latex")
    assert latex.count(r"\begin{tabular}") == 1


def test_one_seed_keeps_the_interval_over_images(tmp_path):
    write_run(tmp_path, attacks={"decoder": {"ssim": 0.5}})
    md = table_format.render(api.results([tmp_path]), "md")
    _, rows = md_header_and_rows(md)
    assert rows[0]["seeds"] == "n=1" and rows[0]["decoder SSIM [0,1]"] == "0.500 ± 0.010"
    assert "over test images (one seed)" in md and "1 seed per configuration (n=1)" in md
    assert "Resolution" not in md  # one seed: no seed spread to resolve differences with


def test_resolution_line_pools_the_seed_sd_by_hand(tmp_path):
    # Two configurations over 3 seeds: accuracy sd 1 and 2 points; pooled sqrt((2*1 + 2*4) / 4).
    for seed, (a, b) in enumerate([(0.80, 0.80), (0.81, 0.82), (0.82, 0.84)]):
        write_run(tmp_path, seed=seed, acc=a, attacks={"decoder": {"ssim": 0.5}})
        write_run(tmp_path, seed=seed, acc=b, noise=0.1, attacks={"decoder": {"ssim": 0.5}})
    write_run(tmp_path, seed=0, acc=0.5, noise=0.2, attacks={"decoder": {"ssim": 0.5}})  # one seed: not pooled
    md = table_format.render(api.results([tmp_path]), "md")
    pooled = math.sqrt(2.5)
    mdd = (T975[4] + T80_4) * pooled * math.sqrt(2 / 3)  # 4.80 points
    assert (
        f"Resolution: at 3 seeds, accuracy differences under {mdd:.1f} points are not resolved (minimum "
        f"detectable difference, power 0.8, from the seed sd pooled over 2 configurations: {pooled:.2f} points"
    ) in md


ENV = {"torch_version": "2.4.0", "device_name": "x86_64", "deterministic": False}


@pytest.mark.parametrize(
    ("threads", "expected"),
    [((1, 2), "num_threads 1 vs 2"), ((2, 2), None), ((2, None), None)],
)
def test_mixed_environment_line_only_when_threads_differ(tmp_path, threads, expected):
    for seed, n in enumerate(threads):
        prov = ENV | ({} if n is None else {"num_threads": n})  # None: not recorded = unknown
        write_run(tmp_path, defense="gmm-cem", seed=seed, prov=prov, attacks={"decoder": {"ssim": 0.5}})
    write_run(tmp_path, defense="none", prov=ENV | {"num_threads": 4}, attacks={"decoder": {"ssim": 0.6}})
    table = api.results([tmp_path])
    note = table_format.environment_note(table)
    md = table_format.render(table, "md")
    lines = [line for line in md.splitlines() if "different environments" in line]
    if expected is None:
        assert note is None and not lines
    else:
        assert note == f"note: cells of gmm-cem@C8+0.025 come from different environments ({expected})"
        assert lines == [note]
        assert note in table_format.render(table, "latex").replace(r"\_", "_")


# ------------------------------------------------------------------------------- plots


def test_privacy_utility_plot_clips_bars_and_labels_panels(tmp_path):
    for seed, acc in enumerate([0.99, 0.90, 0.95]):  # accuracy CI over seeds would pass 100%
        write_run(tmp_path, defense="gmm-cem", seed=seed, acc=acc, attacks={"decoder": {"ssim": 0.98}})
    write_run(tmp_path, defense="gmm-cem", noise=0.1, attacks={"decoder": {"ssim": 0.995}})
    write_run(tmp_path, defense="none", attacks={"decoder": {"ssim": 0.6}})
    write_run(tmp_path, defense="none", dataset="cifar10", eval_images=32, attacks={"decoder": {"ssim": 0.5}})
    table = api.results([tmp_path])
    fig = plots.privacy_utility_figure(table)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 2  # one per data set and preset
    emb = next(ax for ax in panels if ax.get_title().startswith("embedded"))
    title = emb.get_title()
    assert "quick preset" in title and "noise std 0.025, 0.1" in title and "64 images" in title
    assert "1–3 seeds" in title
    assert "SSIM [0,1]" in emb.get_xlabel() and emb.get_ylabel() == "test accuracy (%)"
    labels = emb.get_legend_handles_labels()[1]
    assert sorted(labels) == ["gmm-cem", "none"]  # one entry per defense, three gmm-cem points
    x_ends, y_ends = [], []
    for container in emb.containers:  # an ErrorbarContainer's third part: the bars' LineCollections
        for bar in container.lines[2]:
            for (x0, y0), (x1, y1) in bar.get_segments():
                if y0 == y1:  # horizontal: an SSIM bar
                    x_ends += [x0, x1]
                else:
                    y_ends += [y0, y1]
    assert x_ends and max(x_ends) <= 1.0 and max(x_ends) == pytest.approx(1.0)  # 0.995 ± 0.01 cut at 1
    assert y_ends and max(y_ends) <= 100.0 and max(y_ends) == pytest.approx(100.0)
    plots.privacy_utility_plot(table, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_reconstruction_grid_has_row_labels_column_headers_and_tile_ssim(tmp_path):

    gen = torch.Generator().manual_seed(0)
    originals = torch.rand(4, 3, 16, 16, generator=gen)
    for defense in ("none", "gmm-cem"):
        run = write_run(tmp_path, defense=defense, attacks={"decoder": {"ssim": 0.5}})
        folder = next((run / "attacks").iterdir())
        recon = (originals + 0.1 * torch.rand(4, 3, 16, 16, generator=gen)).clamp(0, 1)
        tiles = {"original": originals, "reconstruction": recon, "mean_image": originals.mean(0, keepdim=True)}
        torch.save(tiles, folder / GRID_TENSORS)
        ssim = [0.11, 0.22, 0.33, 0.44] if defense == "none" else [0.55, 0.66, 0.77, 0.88]
        lines = "".join(f"{i},{s},20.0,0.01,\n" for i, s in enumerate(ssim))
        (folder / "per_image.csv").write_text("index,ssim,psnr,mse,lpips\n" + lines)
    long = rows.collect([tmp_path])
    table = tables.aggregate(long, rows.train_settings(long))
    fig = plots.reconstruction_figure(table, long, images=4)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert {"image 1", "image 4", "original", "mean image"} <= set(texts)
    assert "none@C8+0.025\ndecoder" in texts and "gmm-cem@C8+0.025\ndecoder" in texts
    assert {"SSIM 0.11", "SSIM 0.44", "SSIM 0.88"} <= set(texts)
    assert sum(t.startswith("SSIM ") for t in texts) == 4 * 3  # two defenses and the mean image
    assert "SSIM" in fig.axes[0].get_title()
    assert plots.reconstruction_grid(table, long, tmp_path / "g.png").stat().st_size > 0


# --------------------------------------------------------------------- defense evidence


def load_defense_evidence():
    path = Path(__file__).parent.parent / "bench" / "defense_evidence.py"
    spec = importlib.util.spec_from_file_location("bench_defense_evidence", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_defense_evidence_groups_and_never_prints_nan(tmp_path):
    evidence = load_defense_evidence()
    write_run(tmp_path, defense="none", attacks={"decoder": {"ssim": 0.5, "psnr": 18.0}})
    for seed in (0, 1):
        write_run(
            tmp_path,
            defense="gmm-cem",
            seed=seed,
            acc=0.7 + 0.1 * seed,
            attacks={"decoder": {"ssim": 0.4, "psnr": 17.0}},
        )
    write_run(tmp_path, defense="none", dataset="cifar10", attacks={"decoder": {"ssim": 0.3, "psnr": 15.0}})
    out = evidence.report([str(tmp_path)])
    assert "nan" not in out.lower()
    assert "## data set cifar10, model vgg11, preset quick" in out
    assert "## data set embedded, model vgg11, preset quick" in out
    none_line = next(line for line in out.splitlines() if line.startswith("| none | C8 + noise 0.025") and "80" in line)
    assert "80 (n=1)" in none_line and "±" not in none_line and none_line.endswith("| 1.00 |")
    gmm = next(line for line in out.splitlines() if line.startswith("| gmm-cem"))
    acc_ci = stats.t_ci95([70.0, 80.0])
    assert f"75 ± {acc_ci:.2g} (n=2)" in gmm and gmm.endswith("| 1.50 |")  # 3 s / 2 s per epoch
