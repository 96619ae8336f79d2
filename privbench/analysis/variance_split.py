"""Where the seed-to-seed spread of accuracy comes from: the models, or the finite test set
(`privbench precision RESULTS --split CONFIGURATION`; docs/precision.md).

Input: per seed, accuracy per test tile, per class and the confusion rows
(privbench.store.tiles). The variance of accuracy over seeds splits, with
`stats.seed_tile_components`, into a model part (the whole model better or worse) and a test-set
part (each model gets its own tiles right or wrong, which more test tiles would average out);
the seed sd is projected to 2x, 4x and unlimited test tiles. Beside it: the per-class sd over
seeds, what each class is misread as, and, on a tile grid, the test tiles grouped by how many of
their neighbours are training tiles. Tiles weigh equally, accuracies are in points.
"""

from __future__ import annotations

import math
from typing import Any

from privbench.store.tiles import TileEvaluation
from privbench.util.stats import mean, sd, seed_tile_components

COIN_FLIP_SD = 20.0  # points over seeds: a test tile that some seeds' models read and others do not
MORE_TILES = (2, 4)  # the test-set sizes, as multiples of the present one, the seed sd is projected to


def components(tiles_by_seed: list[list[float]]) -> dict[str, Any]:
    """{"components_points2": the total variance over seeds and its model and per-tile interaction
    parts, in points^2; "tiles": G; "sd_points": the seed sd, its model part, its test-set part
    (interaction / G) and the seed sd with 2x, 4x and unlimited test tiles}. Rates are fractions."""
    comp = seed_tile_components(tiles_by_seed)
    pts = {k: 1e4 * comp[k] for k in ("total", "model", "interaction")}
    g = comp["tiles"]
    sds = {
        "total": math.sqrt(pts["total"]),
        "model": math.sqrt(pts["model"]),
        "test_set": math.sqrt(pts["interaction"] / g),
    }
    sds |= {f"tiles_{k}x": math.sqrt(pts["model"] + pts["interaction"] / (k * g)) for k in MORE_TILES}
    sds["tiles_unlimited"] = sds["model"]
    return {"components_points2": pts, "tiles": g, "sd_points": sds}


def class_sd(classes_by_seed: list[list[float]]) -> list[float]:
    """Per class, the sd over seeds of its accuracy, in points."""
    return [100 * sd([row[k] for row in classes_by_seed]) for k in range(len(classes_by_seed[0]))]


def pooled_confusion(confusions: list[list[list[float]]]) -> list[list[float]]:
    """The seeds' confusion rows averaged, each seed weighted equally."""
    k = len(confusions[0])
    return [[mean(c[i][j] for c in confusions) for j in range(k)] for i in range(k)]


def misreads(confusion: list[list[float]], names: list[str], top: int = 3) -> list[dict[str, Any]]:
    """Per class: the share of its crops read correctly and the `top` other classes they are most
    often read as, most first ([name, share] pairs)."""
    out = []
    for i, name in enumerate(names):
        wrong = sorted(((confusion[i][j], names[j]) for j in range(len(names)) if j != i), reverse=True)[:top]
        out.append({"class": name, "correct": confusion[i][i], "misread_as": [[n, v] for v, n in wrong]})
    return out


def by_neighbours(rates: list[list[float]], tile_ids: list[int], neighbours: dict[int, int]) -> list[dict[str, Any]]:
    """Per count of training neighbours: the test tiles' mean accuracy, their mean sd over seeds and
    how many spread over COIN_FLIP_SD. `rates[seed][tile]` in points, tiles in `tile_ids` order."""
    counts = [neighbours[t] for t in tile_ids]
    columns = list(zip(*rates))  # per tile, its rate per seed
    tile_sd = [sd(col) if len(rates) > 1 else 0.0 for col in columns]
    out = []
    for k in sorted(set(counts)):
        own = [j for j, c in enumerate(counts) if c == k]
        sds = [tile_sd[j] for j in own]
        out.append(
            {
                "neighbours": k,
                "tiles": len(own),
                "mean": mean(v for j in own for v in columns[j]),
                "mean_sd": mean(sds),
                "coin_flips": sum(s > COIN_FLIP_SD for s in sds),
            }
        )
    return out


def split(configuration: str, evaluation: TileEvaluation) -> dict[str, Any]:
    """The variance split of one configuration's seeds: "configuration", "components_points2",
    "tiles", "sd_points", "classes" (the class names), "class_sd", "confusion" (pooled over seeds),
    "by_neighbours" (None without a tile grid) and "seeds" ({seed: {"tiles", "classes",
    "confusion"}}, rates as fractions)."""
    seeds = evaluation.seeds
    tiles = [s.tiles for s in seeds]
    layout = None
    if evaluation.neighbours is not None:
        layout = by_neighbours([[100 * v for v in row] for row in tiles], evaluation.tile_ids, evaluation.neighbours)
    return {
        "configuration": configuration,
        **components(tiles),
        "classes": evaluation.class_names,
        "class_sd": class_sd([s.classes for s in seeds]),
        "confusion": pooled_confusion([s.confusion for s in seeds]),
        "by_neighbours": layout,
        "seeds": {str(s.seed): {"tiles": s.tiles, "classes": s.classes, "confusion": s.confusion} for s in seeds},
    }
