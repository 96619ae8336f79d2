"""Evidence: gmm-cem and slot-cem over their lam grids against the noise-only frontier.

    python bench/frontier_evidence.py [RESULTS] [--seeds 3] [--out DIR]

Reads the finished cells of the grid
    privbench run --defense none@plain --defense none --defense gmm-cem --defense slot-cem \\
        --sweep none.noise=0,0.025,0.05,0.1,0.2,0.4 --sweep gmm-cem.lam=4,16,64 \\
        --sweep slot-cem.lam=4,16,64 --attack decoder --seeds 3
and, unlike that command, tolerates missing cells (a training that diverged): it says which are
missing and compares the rest, decoder cells at the quick budget only. Prints the frontier
points, the verdicts and each configuration's z spread (intra-class and total variance of clean
z, the quantity CEM shrinks), and writes frontier.png / .pdf into --out.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from privbench.analysis import frontier
from privbench.executors.remote import attack_folder
from privbench.grid.spec import Grid
from privbench.report.plot_frontier import plot_frontier
from privbench.store import rows
from privbench.store.runs import Run, find_run
from privbench.util import stats
from privbench.util.storage import read_json

SWEEPS = ["none.noise=0,0.025,0.05,0.1,0.2,0.4", "gmm-cem.lam=4,16,64", "slot-cem.lam=4,16,64"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="?", default="results")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default="frontier-evidence")
    args = p.parse_args()
    grid = Grid(
        defense=["none@plain", "none", "gmm-cem", "slot-cem"],
        sweep=SWEEPS,
        attack=["decoder"],
        seeds=args.seeds,
        results_dir=args.results,
    )
    runs, attack_dirs, missing = [], [], []
    settings = grid.attack_settings()
    for cfg in grid.train_configs():
        run = find_run(cfg, args.results)
        folder = run and attack_folder(run.path, "decoder", settings, {})
        if run is None or not (folder / "metrics.json").is_file():
            missing.append(f"{cfg.defense} {cfg.defense_options or ''} noise {cfg.noise} seed {cfg.seed}")
            continue
        runs.append(run.path)
        attack_dirs.append(folder)
    print(f"{len(runs)} cells read; missing: {', '.join(missing) or 'none'}")
    long = rows.collect(runs, attack_dirs=attack_dirs)
    pts = frontier.points(long, infos=rows.run_infos(long), per_image=rows.per_image(long, "ssim"))
    comparison = frontier.compare(pts, reference="none")
    cols = [
        "family",
        "strength",
        "n_seeds",
        "accuracy_mean",
        "accuracy_ci95",
        "privacy_mean",
        "privacy_ci95",
        "gain",
        "gain_lo",
        "gain_hi",
        "extrapolated",
    ]
    print(comparison.points[cols].round(4).to_string(index=False))
    print("\n".join(frontier.verdict_lines(comparison) + comparison.notes))
    spread: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for path in runs:
        m, cfg = read_json(path / "metrics.json"), Run.open(path).config()
        spread[(cfg.defense, cfg.noise, str(cfg.defense_options))].append((m["z_intra_class_var"], m["z_total_var"]))
    print("\nz spread (mean over seeds): defense, noise, options, intra-class var, total var, ratio")
    for key, vals in spread.items():
        intra, total = stats.mean(v[0] for v in vals), stats.mean(v[1] for v in vals)
        print(f"  {key[0]:<9} {key[1]:<6} {key[2]:<16} {intra:.5f} {total:.5f} {intra / total:.3f}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for path in plot_frontier(comparison, Path(args.out) / "frontier"):
        print(path)


if __name__ == "__main__":
    main()
