"""Screen training levers for their seed spread: many seeds per arm, trainings in parallel.

    python bench/lever_screen.py OUT.jsonl --seeds 0-9 --plan 0.1=preset,reflect4 --workers 10

Each task trains the base channel (C8, channel noise from `--plan`) under one arm at one seed
and appends a JSON line: accuracy (expectation over the channel noise), per-class and per-tile
accuracy, final training accuracy, seconds. Tasks are dealt seed by seed, every arm of a seed
before the next seed, so wherever `--deadline` stops new starts the arms have equal seeds. Made
for a GPU (docs/precision.md, "The floor"; one H200 ran 10 workers): on a 2-core CPU
use --workers 2 and expect ~3.6 minutes per training. `python bench/lever_screen.py --summary
OUT.jsonl ...` prints each arm's mean, sd with its 95% interval, and the seed x tile split.

An arm is a set of TrainConfig overrides, optionally with a crop padding other than the
library's zero padding (`augment` with another `mode`, swapped in the worker process only) or a candidate
embedded geometry (registered as version 4 in the worker process only). Nothing here changes
the library: an arm that wins becomes a preset change, measured again on fresh seeds.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from privbench.engine.data import EMBEDDED_VERSIONS, augment
from privbench.store.tiles import split_rates  # per-tile and per-class rates
from privbench.util import stats

# name: (TrainConfig overrides, crop padding mode ("constant" is the library's) , padding px)
ARMS: dict[str, tuple[dict[str, Any], str, int]] = {
    "preset": ({}, "constant", 4),
    "ema998": ({"ema": 0.998}, "constant", 4),  # a weight average over ~500 steps, not ~100
    "reflect4": ({}, "reflect", 4),  # no black borders: zero padding blacks out 14% of the pixels
    "zeros2": ({}, "constant", 2),
    "ep40": ({"epochs": 40}, "constant", 4),
    "v4_448": ({"data_version": 4}, "constant", 4),  # V4_448 below: about 2x the tiles of v3
    "ramp20": ({"noise_warmup": 0.2}, "constant", 4),  # channel noise ramped in over the first 20% of steps
    "noramp": ({"noise_warmup": 0.0}, "constant", 4),  # full channel noise from the first step
    "wd2e3": ({"weight_decay": 2e-3}, "constant", 4),  # 4x the weight decay
    "w050": ({"width": 0.5}, "constant", 4),  # a half-width VGG11: twice the channels of the preset
    "w050plain": ({"width": 0.5, "bottleneck": 0}, "constant", 4),  # the same, no bottleneck (plan it at noise 0)
}
V4_448 = dict(short_side=448, tile=40, fractions={"train": 0.6, "aux": 0.15, "test": 0.25}, n_aux=1000, n_test=4000)
DEFAULT_PLAN = ["0.1=preset,reflect4,v4_448,ep40", "0.025=preset,v4_448"]


def register_candidates() -> None:
    EMBEDDED_VERSIONS.setdefault(4, V4_448)


def parse_plan(items: list[str]) -> list[tuple[float, list[str]]]:
    plan = []
    for item in items:
        noise, _, arms = item.partition("=")
        names = [a for a in arms.split(",") if a]
        unknown = [a for a in names if a not in ARMS]
        if not names or unknown:
            raise SystemExit(f"--plan {item!r}: expected NOISE=ARM[,ARM...] with arms from {', '.join(ARMS)}")
        plan.append((float(noise), names))
    return plan


def tasks(plan: list[tuple[float, list[str]]], seeds: range) -> list[tuple[float, str, int]]:
    return [(noise, arm, seed) for seed in seeds for noise, arms in plan for arm in arms]


def train_task(task: tuple[float, str, int], epochs: int | None = None) -> dict[str, Any]:
    import privbench.engine.train as T
    from privbench.engine.config import TrainConfig
    from privbench.engine.data import load_dataset

    torch.set_num_threads(1)
    register_candidates()
    noise, arm, seed = task
    overrides, mode, pad = ARMS[arm]
    T.augment = functools.partial(augment, pad=pad, mode=mode)  # this worker process only
    if epochs:
        overrides = {**overrides, "epochs": epochs}
    settings = {"bottleneck": 8, "noise": noise, "seed": seed, "amp": False, "channels_last": False, "progress": False}
    cfg = TrainConfig.from_preset("quick", **{**settings, **overrides})  # an arm may change the bottleneck
    data = load_dataset("embedded", seed=cfg.data_seed, n_train=5000, version=cfg.data_version)
    t0 = time.time()
    res = T.train(cfg, data=data, log=lambda m: None)
    test = data.to(next(res.model.parameters()).device).test
    torch.manual_seed(1234)
    acc, tiles, classes, _ = split_rates(res.model, test, data.num_classes, amp=False)
    return {
        "noise": noise,
        "arm": arm,
        "seed": seed,
        "acc": acc * 100,
        "train_acc": res.history[-1]["train_acc"],
        "seconds": time.time() - t0,
        "device": str(test.images.device),
        "per_class": [100 * c for c in classes],
        "tile_rates": tiles,
    }


def screen(out: Path, todo: list[tuple[float, str, int]], workers: int, deadline: float, epochs: int | None) -> None:
    from privbench.engine.data import load_dataset

    register_candidates()
    for version in sorted({3, *(4 for _, arm, _ in todo if ARMS[arm][0].get("data_version") == 4)}):
        load_dataset("embedded", seed=0, n_train=5000, version=version)  # build each cache once, not per worker
    t0, it = time.time(), iter(todo)
    with mp.get_context("spawn").Pool(workers) as pool, out.open("a") as f:
        pending = [pool.apply_async(train_task, (t, epochs)) for t in [next(it, None) for _ in range(2 * workers)] if t]
        while pending:
            try:
                row = pending.pop(0).get()
                f.write(json.dumps(row) + "\n")
                f.flush()
                print(
                    f"{time.time() - t0:6.1f}s noise {row['noise']} {row['arm']} seed {row['seed']}: "
                    f"{row['acc']:.2f}% ({row['seconds']:.0f} s)",
                    flush=True,
                )
            except Exception as e:  # one failed training must not lose the others
                print(f"failed: {e!r}", flush=True)
            task = next(it, None) if time.time() - t0 < deadline else None
            if task:
                pending.append(pool.apply_async(train_task, (task, epochs)))


def summary(paths: list[Path]) -> str:
    by_arm: dict[tuple[float, str], dict[int, dict[str, Any]]] = defaultdict(dict)
    for path in paths:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            by_arm[(row["noise"], row["arm"])][row["seed"]] = row
    lines = [
        "| noise | arm | seeds | mean (%) | sd | sd 95% CI | model part | test-set part | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (noise, arm), rows in sorted(by_arm.items()):
        acc = [rows[s]["acc"] for s in sorted(rows)]
        lo, hi = stats.sd_ci95(acc)
        spread = f"{stats.sd(acc):.2f} | {lo:.2f}..{hi:.2f}" if len(acc) > 1 else "n/a | n/a"  # one seed: no spread
        split = ["n/a", "n/a"]
        tiles = [rows[s]["tile_rates"] for s in sorted(rows) if "tile_rates" in rows[s]]
        if len(tiles) >= 2:
            c = stats.seed_tile_components([[100 * v for v in t] for t in tiles])
            split = [f"{c['model'] ** 0.5:.2f}", f"{(c['interaction'] / c['tiles']) ** 0.5:.2f} ({len(tiles)} seeds)"]
        lines.append(
            f"| {noise:g} | {arm} | {min(rows)}-{max(rows)} (n={len(acc)}) | {stats.mean(acc):.2f} | "
            f"{spread} | {split[0]} | {split[1]} | "
            f"{stats.mean(r['seconds'] for r in rows.values()):.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, nargs="+", help="JSON-lines file to append to (with --summary: files to read)")
    ap.add_argument("--seeds", default="0-9", help="FIRST-LAST, inclusive")
    ap.add_argument(
        "--plan", action="append", help=f"NOISE=ARM[,ARM...], repeatable [default: {' '.join(DEFAULT_PLAN)}]"
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--deadline", type=float, default=float("inf"), help="seconds after which no training starts")
    ap.add_argument("--epochs", type=int, help="override every arm's epochs (smoke tests)")
    ap.add_argument("--summary", action="store_true", help="train nothing: summarise the files")
    a = ap.parse_args(argv)
    if a.summary:
        print(summary(a.out))
        return 0
    first, _, last = a.seeds.partition("-")
    todo = tasks(parse_plan(a.plan or DEFAULT_PLAN), range(int(first), int(last or first) + 1))
    screen(a.out[0], todo, a.workers, a.deadline, a.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
