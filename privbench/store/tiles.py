"""Stored runs evaluated per test tile: the input of the seed x tile variance split.

Each seed's model of one configuration is rebuilt from its run folder and read on the test split
tile by tile (the expectation over channel-noise draws, as the reported accuracy), with its
per-class accuracy and confusion rows; on the embedded set, each test tile's count of training
neighbours on the photograph's tile grid (privbench.analysis.variance_split summarises them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from privbench.engine.config import TrainConfig
from privbench.engine.data import EMBEDDED_VERSIONS, Dataset, Split, embedded_crops
from privbench.engine.models import SplitModel
from privbench.engine.train import fast_path, load_data, predictions
from privbench.errors import UserError
from privbench.store.runs import Run

NEIGHBOURS = ((1, 0), (-1, 0), (0, 1), (0, -1))  # a tile's 4 grid neighbours in its photograph


@dataclass(frozen=True)
class SeedRates:
    """One seed's model on the test split; rates are fractions."""

    seed: int
    tiles: list[float]  # accuracy per test tile, in tile id order
    classes: list[float]  # accuracy per class
    confusion: list[list[float]]  # per true class, the share of its predictions that went to each class


@dataclass(frozen=True)
class TileEvaluation:
    """Every seed of one configuration on the test split they share."""

    class_names: list[str]
    tile_ids: list[int]  # the order of SeedRates.tiles
    seeds: list[SeedRates]  # by seed
    neighbours: dict[int, int] | None  # test tile id -> training neighbours (of 4); None without a tile grid


def split_rates(
    model: SplitModel, split: Split, num_classes: int, *, amp: bool = False
) -> tuple[float, list[float], list[float], list[list[float]]]:
    """(accuracy; accuracy per test tile, in tile id order; accuracy per class; confusion rows: for
    each true class, the fraction of its crops' predictions that went to each class) of a model on a
    split (an image without a tile is its own), over the channel-noise draws the reported accuracy averages."""
    pred = predictions(model, split, amp=amp)  # [draws, N]
    labels = split.labels
    rate = (pred == labels).float().mean(0)
    _, tile_of = torch.unique(split.group_ids(), return_inverse=True)  # tiles numbered in id order
    tiles = (torch.bincount(tile_of, weights=rate.double()) / torch.bincount(tile_of)).tolist()
    counts = torch.bincount((labels * num_classes + pred).flatten(), minlength=num_classes**2)
    counts = counts.reshape(num_classes, num_classes).double()
    confusion = counts / counts.sum(1, keepdim=True).clamp(min=1)
    return rate.mean().item(), tiles, confusion.diagonal().tolist(), confusion.tolist()  # diagonal: per class


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


def evaluate_tiles(runs: list[Run], label: str) -> TileEvaluation:
    """Every run (the seeds of the configuration `label`) on its test split, per tile, on the CPU.
    Channel-noise draws are not seeded: a second call moves the figures by a few tenths of a point."""
    cfg = runs[0].config()
    data = load_data(cfg, torch.device("cpu"))  # the seeds of one configuration share it
    if data.test.groups is None:
        raise UserError(f"the data set of {label!r} has no test tiles (embedded v3 and later)")
    seeds = []
    for run in runs:
        run_cfg = run.config()
        amp = fast_path(run_cfg, torch.device("cpu"))[0]  # the arithmetic the reported accuracy used
        _, tiles, classes, confusion = split_rates(run.load_model(data), data.test, data.num_classes, amp=amp)
        seeds.append(SeedRates(run_cfg.seed, tiles, classes, confusion))
    tile_ids = torch.unique(data.test.groups).tolist()
    return TileEvaluation(list(data.classes), tile_ids, seeds, training_neighbours(cfg, data))
