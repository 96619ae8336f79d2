"""Tables from hand-written run folders: numbers against hand computation, formats read back."""

import io
import json
import math
import shutil

import pandas as pd
import pytest
from conftest import run_cli
from scipy import stats

from privbench import api
from privbench.analysis import tables
from privbench.engine.config import TrainConfig
from privbench.errors import UserError
from privbench.report import table_format
from privbench.store import rows

T975_2 = 4.302652729749464  # Student t quantile 0.975 with 2 degrees of freedom


def write_run(
    root, *, defense="none", bottleneck=8, noise=0.025, seed=0, acc=0.8, num_classes=10, attacks=None, epochs=1
):
    """A fake run folder; `attacks` maps attack name -> {metric: mean} (or a full metrics dict)."""
    cfg = TrainConfig(defense=defense, bottleneck=bottleneck, noise=noise, seed=seed, epochs=epochs, progress=False)
    run = root / f"{defense}-{cfg.hash()}"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"train": cfg.to_dict(), "defense_options": {}}))
    (run / "metrics.json").write_text(
        json.dumps({"test_accuracy": acc, "num_classes": num_classes, "history": [], "train_seconds": 1.0})
    )
    for name, values in (attacks or {}).items():
        folder = run / "attacks" / f"{name}-abcdef{seed:06d}"
        folder.mkdir(parents=True)
        metrics = {
            m: (v if isinstance(v, dict) else {"mean": v, "ci95": 0.01, "std": 0.05, "n": 64})
            for m, v in values.items()
        }
        baseline = {m: {"mean": 0.1, "ci95": 0.02, "std": 0.1, "n": 64} for m in ("ssim", "psnr", "mse")}
        baseline["lpips"] = {"missing": "AlexNet weights not in the torch hub cache (offline)"}
        (folder / "metrics.json").write_text(
            json.dumps(
                {
                    "attack": name,
                    "options": {},
                    "attacker_data": "train",
                    "eval_images": 64,
                    "metrics": metrics,
                    "baseline": baseline,
                    "threat_model": "white-box",
                }
            )
        )
    return run


def attack_values(ssim, psnr=20.0, mse=0.01, lpips=0.3):
    return {"ssim": ssim, "psnr": psnr, "mse": mse, "lpips": lpips}


@pytest.fixture
def three_seeds(tmp_path):
    ssims = [0.50, 0.60, 0.70]
    accs = [0.80, 0.82, 0.87]
    for seed, (s, a) in enumerate(zip(ssims, accs)):
        write_run(
            tmp_path,
            defense="gmm-cem",
            seed=seed,
            acc=a,
            attacks={"decoder": attack_values(s, psnr=18 + seed), "optimization": attack_values(s - 0.2)},
        )
    write_run(tmp_path, defense="none", bottleneck=None, noise=0.0, acc=0.9, attacks={"decoder": attack_values(0.9)})
    return tmp_path, ssims, accs


def test_mean_and_t_ci_over_seeds(three_seeds):
    root, ssims, accs = three_seeds
    table = api.results([root])
    assert len(table) == 2
    row = table[table.defense == "gmm-cem"].iloc[0]
    mean = sum(ssims) / 3
    sd = math.sqrt(sum((s - mean) ** 2 for s in ssims) / 2)
    assert row.decoder_ssim_mean == pytest.approx(mean)
    assert row.decoder_ssim_ci95 == pytest.approx(T975_2 * sd / math.sqrt(3))
    assert row.decoder_ssim_ci95 == pytest.approx(stats.sem(ssims) * stats.t.ppf(0.975, 2))
    assert row.accuracy_mean == pytest.approx(sum(accs) / 3)
    assert row.decoder_psnr_mean == pytest.approx(19.0)
    assert row.n_seeds == 3 and row.channel == "C8 + noise 0.025"
    assert row.baseline_ssim_mean == pytest.approx(0.1)
    assert math.isnan(row.decoder_lpips_ci95) is False and row.decoder_lpips_mean == pytest.approx(0.3)
    assert math.isnan(row.baseline_lpips_mean)  # missing, never made up


def test_single_seed_uses_image_ci_and_worst_case(tmp_path):
    optimization = attack_values(0.55) | {"ssim": {"mean": 0.55, "ci95": 0.03, "n": 64}}
    write_run(tmp_path, attacks={"decoder": attack_values(0.40), "optimization": optimization})
    table = api.results([tmp_path])
    row = table.iloc[0]
    assert row.worst_attack == "optimization"
    assert row.worst_ssim_mean == pytest.approx(0.55) and row.worst_ssim_ci95 == pytest.approx(0.03)
    assert row.decoder_ssim_ci95 == pytest.approx(0.01)  # over images, from metrics.json
    assert math.isnan(row.accuracy_ci95)  # one seed: no interval for accuracy


def test_worst_case_picks_highest_ssim_per_configuration(three_seeds):
    root, _, _ = three_seeds
    write_run(
        root, defense="slot-cem", seed=0, attacks={"decoder": attack_values(0.3), "optimization": attack_values(0.4)}
    )
    table = api.results([root]).set_index("defense")
    assert table.at["gmm-cem", "worst_attack"] == "decoder"
    assert table.at["slot-cem", "worst_attack"] == "optimization"
    assert table.at["slot-cem", "worst_ssim_mean"] == pytest.approx(0.4)


def test_long_form_rows(three_seeds):
    root, _, _ = three_seeds
    long = rows.collect([root])
    assert {"run", "defense", "bottleneck", "noise", "options", "seed", "attack", "metric", "value"} <= set(long)
    acc = long[(long.metric == "accuracy")]
    assert len(acc) == 4 and set(acc.attack) == {""}
    dec = long[(long.defense == "gmm-cem") & (long.attack == "decoder") & (long.metric == "ssim")]
    assert sorted(dec.value) == pytest.approx([0.5, 0.6, 0.7])
    missing = long[(long.attack == "baseline") & (long.metric == "lpips")]
    assert missing.value.isna().all() and missing.note.str.contains("lpips missing").all()


def test_chance_flag_and_warning(tmp_path):
    write_run(tmp_path, defense="gmm-cem", acc=0.14, attacks={"decoder": attack_values(0.2)})  # < 1.5 / 10
    write_run(tmp_path, defense="none", acc=0.16, attacks={"decoder": attack_values(0.2)})  # >= 0.15
    table = api.results([tmp_path])
    flags = dict(zip(table.defense, table.near_chance))
    assert flags == {"gmm-cem": True, "none": False}
    md = table_format.render(table, "md")
    gmm_line = next(line for line in md.splitlines() if line.startswith("| gmm-cem"))
    assert rows.CHANCE_MARK in gmm_line
    none_line = next(line for line in md.splitlines() if line.startswith("| none"))
    assert rows.CHANCE_MARK not in none_line
    warnings = tables.chance_warnings(table)
    assert len(warnings) == 1 and "gmm-cem" in warnings[0]


def test_markdown_csv_latex_read_back(three_seeds):
    root, ssims, _ = three_seeds
    table = api.results([root])
    md = table_format.render(table, "md")
    lines = [line for line in md.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert len(lines) == 2 + len(table) and all(line.count("|") == lines[0].count("|") for line in lines)
    assert {"defense", "accuracy (%)", "decoder SSIM [0,1]", "optimization LPIPS", "worst case SSIM [0,1]"} <= set(
        header
    )
    gmm = dict(zip(header, (c.strip() for c in lines[2 + list(table.defense).index("gmm-cem")].strip("|").split("|"))))
    sd = stats.tstd(ssims)
    assert gmm["decoder SSIM [0,1]"] == f"{0.6:.3f} ± {stats.t.ppf(0.975, 2) * sd / math.sqrt(3):.3f}"
    assert "lpips missing" in md.lower() or "LPIPS missing" in md  # baseline footnote
    back = pd.read_csv(io.StringIO(table_format.render(table, "csv")))
    assert len(back) == 2
    gb = back[back.defense == "gmm-cem"].iloc[0]
    assert gb.decoder_ssim_mean == pytest.approx(0.6) and gb.accuracy_mean == pytest.approx((0.80 + 0.82 + 0.87) / 3)
    assert back.decoder_ssim_mean.dtype.kind == "f"  # raw numbers, not formatted strings
    latex = table_format.render(table, "latex")
    assert latex.startswith(r"\begin{table}") and r"\end{tabular}" in latex
    for tabular in latex.split(r"\begin{tabular}")[1:]:  # one table per metric: 14 columns are too many
        body = [line for line in tabular.split(r"\end{tabular}")[0].splitlines() if line.endswith(r"\\")]
        assert len(body) == 1 + len(table) and len({line.count(" & ") for line in body}) == 1
    assert r"$\pm$" in latex and "±" not in latex


def test_lpips_missing_says_missing(tmp_path):
    write_run(tmp_path, attacks={"decoder": {**attack_values(0.5), "lpips": {"missing": "no AlexNet weights offline"}}})
    table = api.results([tmp_path])
    md = table_format.render(table, "md")
    header = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    cells = [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
    assert dict(zip(header, cells))["decoder LPIPS"] == "missing"
    assert "LPIPS missing: no AlexNet weights offline" in md


def test_settings_that_differ_get_a_column(tmp_path):
    write_run(tmp_path, epochs=1, acc=0.5, attacks={"decoder": attack_values(0.5)})
    write_run(tmp_path, epochs=3, acc=0.7, attacks={"decoder": attack_values(0.6)})
    table = api.results([tmp_path])
    assert len(table) == 2 and sorted(table.epochs) == [1, 3]  # not averaged together as seeds
    header = [c.strip() for c in table_format.render(table, "md").splitlines()[0].strip("|").split("|")]
    assert "epochs" in header and "width" not in header


def test_not_a_run_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty is not a run folder, a results folder .*, and holds none"):
        api.results([tmp_path / "empty"])
    with pytest.raises(UserError, match="nowhere: no such folder"):
        api.results([tmp_path / "nowhere"])
    with pytest.raises(UserError, match="not a privbench run folder"):  # the store's own reading
        rows.collect([tmp_path / "empty"])
    with pytest.raises(UserError, match="no such run folder"):
        rows.collect([tmp_path / "nowhere"])
    with pytest.raises(UserError, match="unknown privacy metric 'fid'"):  # before any folder is read
        api.results([tmp_path / "nowhere"], privacy_metric="fid")


def test_aggregate_is_a_function_of_rows_and_settings(tmp_path):
    """The store reads the training fields (store.rows.train_settings); aggregate reads no file:
    the same table after the run folders are gone, and without settings no settings column."""
    write_run(tmp_path / "r", epochs=1, acc=0.5, attacks={"decoder": attack_values(0.5)})
    write_run(tmp_path / "r", epochs=3, acc=0.7, attacks={"decoder": attack_values(0.6)})
    expected = api.results([tmp_path / "r"])
    long = rows.collect([tmp_path / "r"])
    settings = rows.train_settings(long)
    assert sorted(s["epochs"] for s in settings.values()) == [1, 3]
    shutil.rmtree(tmp_path / "r")
    pd.testing.assert_frame_equal(tables.aggregate(long, settings), expected, check_exact=True)
    plain = tables.aggregate(long)
    assert "epochs" not in plain and plain.attrs["settings"] == []
    assert list(plain.columns) == [c for c in expected.columns if c != "epochs"]
    with pytest.raises(ValueError, match="no settings for config .*pass privbench.store.rows.train_settings"):
        tables.aggregate(long, {})


def test_unreadable_config_is_a_one_line_error(tmp_path):
    run = write_run(tmp_path, attacks={"decoder": attack_values(0.5)})
    long = rows.collect([tmp_path])
    (run / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable run files") as info:
        rows.train_settings(long)
    assert "\n" not in str(info.value) and run.name in str(info.value)


def test_cli_table(three_seeds, capsys, tmp_path_factory):
    root, _, _ = three_seeds
    code, out, _ = run_cli(["table", str(root)], capsys)
    assert code == 0 and "| gmm-cem" in out
    out_file = tmp_path_factory.mktemp("out") / "t.csv"
    code, out, _ = run_cli(["table", str(root), "--format", "csv", "--out", str(out_file)], capsys)
    assert code == 0 and len(pd.read_csv(out_file)) == 2
    empty = tmp_path_factory.mktemp("empty")
    code, out, err = run_cli(["table", str(empty)], capsys)
    assert code == 2 and err.count("\n") == 1 and "run folder" in err and "holds none" in err


def test_aux_attacker_data_gets_its_own_columns_and_train_baseline(tmp_path):
    run = write_run(tmp_path, attacks={"decoder": attack_values(0.6)})
    aux = run / "attacks" / "decoder-aux000000000"
    aux.mkdir()
    m = json.loads((run / "attacks" / "decoder-abcdef000000" / "metrics.json").read_text())
    m["attacker_data"] = "aux"
    m["metrics"]["ssim"]["mean"] = 0.4
    m["baseline"]["ssim"]["mean"] = 0.05  # another mean image: not the one the table reports
    (aux / "metrics.json").write_text(json.dumps(m))
    row = api.results([run]).iloc[0]
    assert row["decoder_ssim_mean"] == 0.6 and row["decoder[aux]_ssim_mean"] == 0.4
    assert row["baseline_ssim_mean"] == 0.1


def test_environment_warnings_name_what_differs_between_trainings():
    from privbench.analysis.tables import environment_warnings

    def rows(threads, attack_threads="8"):
        train = [{"attack": "", "metric": "accuracy", "num_threads": t, "torch_version": "2.14.1"} for t in threads]
        attack = [{"attack": "decoder", "metric": "ssim", "num_threads": attack_threads, "torch_version": "2.14.1"}]
        return pd.DataFrame(train + attack)

    (line,) = environment_warnings(rows(["2", "1", "2"]))
    assert line.startswith("note: these trainings ran in different environments (num_threads 1 vs 2);")
    assert environment_warnings(rows(["2", "2"])) == []  # an attack elsewhere is not a training
    assert environment_warnings(pd.DataFrame()) == []


def test_results_csv_read_back_keeps_provenance_as_text(tmp_path):
    """rows.read_csv gives provenance as collect does (text), so a results.csv read back shows
    the same environment differences: num_threads 1 and 2 are not read as 1.0 and 2.0."""
    from privbench.analysis.tables import environment_warnings
    from privbench.store import rows

    frame = pd.DataFrame(
        [
            {
                "config": c,
                "defense": "none",
                "channel": "plain",
                "attack": "",
                "metric": "accuracy",
                "value": 0.9,
                "num_threads": t,
            }
            for c, t in (("a", "1"), ("b", "2"))
        ]
    )
    frame.to_csv(tmp_path / "results.csv", index=False)
    back = rows.read_csv(tmp_path / "results.csv")
    assert list(back.num_threads) == ["1", "2"]
    assert environment_warnings(back) == environment_warnings(frame)
