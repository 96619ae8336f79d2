"""Where does the seed-to-seed spread of accuracy come from: the models, or the finite test set?

    python bench/variance_split.py RESULTS "none@C8+0.025"            # a label as privbench precision prints it
    python bench/variance_split.py RESULTS "none@C8+0.025 (epochs=15)" --json split.json

Evaluates every seed's model of one configuration on its test split, per test tile (the
expectation over channel-noise draws, as the reported accuracy), and splits the variance of
accuracy over seeds with `stats.seed_tile_components`: a model part (the whole model better or
worse) and a test-set part (each model gets its own tiles right or wrong, which more test
tiles would average out). Prints both, the seed sd projected to 2x, 4x and unlimited test
tiles, the per-class accuracy per seed with its sd over seeds, what each class's crops are
misread as (pooled over seeds and noise draws), and, on the embedded set, the test tiles grouped
by how many of their grid neighbours are training tiles (does a test tile's luck depend on
whether training saw its surroundings?): what a new version of the data set could gain, and
what only better training can. Exit 2 with one line on bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

from privbench.engine.config import TrainConfig
from privbench.engine.data import EMBEDDED_VERSIONS, Dataset, Split, embedded_crops
from privbench.engine.train import load_data, predictions
from privbench.errors import UserError
from privbench.store.runs import Run
from privbench.store.seeds import configuration_key
from privbench.store.seeds import configuration_label as _label
from privbench.util.stats import sd, seed_tile_components
from privbench.util.storage import read_json


def runs_of(results_dir: Path, label: str) -> list[Run]:
    """The finished runs of the configuration `label`, one per seed, by seed. Runs are grouped as
    privbench precision groups them (every identity setting but the seed), so a label that two
    configurations share (settings it does not show, such as the data seed) is refused, not pooled."""
    if not results_dir.is_dir():
        raise UserError(f"results folder {results_dir} does not exist")
    groups: dict[str, dict[int, Path]] = defaultdict(dict)
    labels: dict[str, str] = {}
    for path in sorted(results_dir.iterdir()):
        if (path / "metrics.json").is_file() and (path / "config.json").is_file():
            train = read_json(path / "config.json")["train"]
            key = configuration_key(train)
            labels[key] = _label(train)
            groups[key][int(train["seed"])] = path
    matches = [k for k, v in labels.items() if v == label]
    if len(matches) != 1:
        why = "no configuration" if not matches else f"{len(matches)} configurations share the label"
        raise UserError(f"{why} {label!r} under {results_dir} (known: {', '.join(sorted(set(labels.values())))})")
    found = groups[matches[0]]
    if len(found) < 2:
        raise UserError(f"{label!r} has one seed under {results_dir}: a spread needs at least 2")
    return [Run.open(found[s]) for s in sorted(found)]


def split_rates(
    model: torch.nn.Module, split: Split, num_classes: int, *, amp: bool = True
) -> tuple[float, list[float], list[float], list[list[float]]]:
    """(accuracy; accuracy per test tile, in tile id order; accuracy per class; confusion rows: for
    each true class, the fraction of its crops' predictions that went to each class) of a model on a
    split, over the channel-noise draws the reported accuracy averages."""
    pred = predictions(model, split, amp=amp)  # [draws, N]
    groups, labels = split.groups, split.labels
    rate = (pred == labels).float().mean(0)
    _, tile_of = torch.unique(groups, return_inverse=True)  # tiles numbered in id order
    tiles = (torch.bincount(tile_of, weights=rate.double()) / torch.bincount(tile_of)).tolist()
    counts = torch.bincount((labels * num_classes + pred).flatten(), minlength=num_classes**2)
    counts = counts.reshape(num_classes, num_classes).double()
    confusion = counts / counts.sum(1, keepdim=True).clamp(min=1)
    return rate.mean().item(), tiles, confusion.diagonal().tolist(), confusion.tolist()  # diagonal: per class


def per_tile(run: Run, data: Dataset) -> tuple[list[float], list[float], list[list[float]]]:
    """(per test tile, per class, confusion rows) of one run on `data`: `split_rates` without the total."""
    return split_rates(run.load_model(data), data.test, len(data.classes))[1:]


def misreads(rows: list[tuple], names: list[str], top: int = 3) -> list[list[float]]:
    """Print, per class, what its crops are read as, pooled over seeds (each seed weighted equally);
    return the pooled confusion rows."""
    k = len(names)
    pooled = torch.tensor([r[3] for r in rows], dtype=torch.float64).mean(0).tolist()
    print("\n| class | read correctly (%) | most often misread as (%) |\n|---|---|---|")
    for i, name in enumerate(names):
        wrong = sorted(((pooled[i][j], names[j]) for j in range(k) if j != i), reverse=True)[:top]
        misread = ", ".join(f"{n} {100 * v:.1f}" for v, n in wrong if round(100 * v, 1) > 0)
        print(f"| {name} | {100 * pooled[i][i]:.1f} | {misread} |")
    return pooled


NEIGHBOURS = ((1, 0), (-1, 0), (0, 1), (0, -1))  # a tile's 4 grid neighbours in its photograph
COIN_FLIP_SD = 20.0  # points over seeds: a test tile that some seeds' models read and others do not


def training_neighbours(cfg: TrainConfig, data: Dataset) -> dict[int, int] | None:
    """Embedded test tile id -> how many of its 4 grid neighbours (same photograph) hold training
    crops. Rebuilds the crops of `data` (the run's data set, for its split sizes) to read each
    tile's place off its crops' boxes; None for a data set without a tile grid."""
    if cfg.dataset != "embedded" or data.aux is None:
        return None
    geo = EMBEDDED_VERSIONS[cfg.data_version]
    counts = {"train": len(data.train), "aux": len(data.aux), "test": len(data.test)}
    place = {}  # tile id -> (split, photograph, column, row)
    for split, (_, labels, boxes, tiles) in embedded_crops(cfg.data_seed, counts, version=cfg.data_version).items():
        for label, box, tile in zip(labels.tolist(), boxes.tolist(), tiles.tolist()):
            place[tile] = (split, label, box[0] // geo["tile"], box[1] // geo["tile"])
    cell = {(label, col, row): split for split, label, col, row in place.values()}
    return {
        tile: sum(cell.get((label, col + dc, row + dr)) == "train" for dc, dr in NEIGHBOURS)
        for tile, (split, label, col, row) in place.items()
        if split == "test"
    }


def by_neighbours(rates: torch.Tensor, tile_ids: list[int], neighbours: dict[int, int]) -> list[dict]:
    """Print and return, per count of training neighbours, the test tiles' mean accuracy, mean sd over
    seeds and how many are coin flips. `rates` [seeds, tiles] in points, columns in `tile_ids` order."""
    counts = torch.tensor([neighbours[t] for t in tile_ids])
    tile_sd = rates.std(0) if len(rates) > 1 else torch.zeros(rates.shape[1])
    print(f"\n| training neighbours (of 4) | test tiles | mean accuracy (%) | mean sd over seeds | "
          f"tiles with sd > {COIN_FLIP_SD:g} |\n|---|---|---|---|---|")  # fmt: skip
    out = []
    for k in sorted(set(counts.tolist())):
        own, sds = counts == k, tile_sd[counts == k]
        row = {"neighbours": k, "tiles": int(own.sum()), "mean": rates[:, own].mean().item(),
               "mean_sd": sds.mean().item(), "coin_flips": int((sds > COIN_FLIP_SD).sum())}  # fmt: skip
        print(f"| {k} | {row['tiles']} | {row['mean']:.1f} | {row['mean_sd']:.1f} | {row['coin_flips']} |")
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results_dir", type=Path)
    ap.add_argument("configuration", help='a label as privbench precision prints it, e.g. "none@C8+0.025"')
    ap.add_argument("--json", type=Path, help="write the components and per-seed numbers to this file")
    args = ap.parse_args(argv)
    try:
        runs = runs_of(args.results_dir, args.configuration)
        data = load_data(runs[0].config(), torch.device("cpu"))  # the seeds of one configuration share it
        if data.test.groups is None:
            raise UserError(f"the data set of {args.configuration!r} has no test tiles (embedded v3 and later)")
        rows = [(run.config().seed, *per_tile(run, data)) for run in runs]
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    names = list(data.classes)
    comp = seed_tile_components([tiles for _, tiles, _, _ in rows])
    pts = {k: 1e4 * comp[k] for k in ("total", "model", "interaction")}  # variances in points^2
    g = comp["tiles"]
    print(f"{args.configuration}: {len(rows)} seeds, {g} test tiles (accuracy in points, tiles weighted equally)")
    print(f"  seed sd {math.sqrt(pts['total']):.2f}: model part sd {math.sqrt(pts['model']):.2f}, "
          f"test-set part sd {math.sqrt(pts['interaction'] / g):.2f}")  # fmt: skip
    projected = {k: math.sqrt(pts["model"] + pts["interaction"] / (k * g)) for k in (2, 4)}
    print(f"  seed sd with 2x the test tiles {projected[2]:.2f}, 4x {projected[4]:.2f}, "
          f"unlimited {math.sqrt(pts['model']):.2f}")  # fmt: skip
    print("\n| seed | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for seed, _, classes, _ in rows:
        print(f"| {seed} | " + " | ".join(f"{100 * c:.1f}" for c in classes) + " |")
    class_sd = [100 * sd([r[2][k] for r in rows]) for k in range(len(names))]
    print("| sd | " + " | ".join(f"{v:.1f}" for v in class_sd) + " |")
    confusion = misreads(rows, names)
    neighbours = training_neighbours(runs[0].config(), data)
    layout = None
    if neighbours is not None:
        rates = 100 * torch.tensor([tiles for _, tiles, _, _ in rows], dtype=torch.float64)
        layout = by_neighbours(rates, torch.unique(data.test.groups).tolist(), neighbours)
    if args.json:
        seeds = {str(seed): {"tiles": tiles, "classes": classes, "confusion": confusion_rows}
                 for seed, tiles, classes, confusion_rows in rows}  # fmt: skip
        out = {"configuration": args.configuration, "components_points2": pts, "tiles": g, "class_sd": class_sd,
               "confusion": confusion, "by_neighbours": layout, "seeds": seeds}  # fmt: skip
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
