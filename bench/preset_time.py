"""Seconds per quick-preset training, before and after the precision changes, side by side.

    python bench/preset_time.py [--repeats 2] [--defense none] [--noise 0.025]

"before" is the wave-1 quick preset (embedded v2, 10 epochs, no warm-up, no label smoothing,
no weight average); "after" is the quick preset in force. Both run in this process,
alternating (before, after, before, after, ...), and the wall time of a whole `train()` call
(data loading excluded: both data sets are built first; evaluation and z statistics included)
is reported with the load average, so the ratio holds even on a busy machine.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from privbench.config import TrainConfig
from privbench.train import load_data, pick_device, train

BEFORE = dict(epochs=10, warmup_epochs=0.0, label_smoothing=0.0, ema=0.0, data_version=2)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--defense", default="none")
    ap.add_argument("--noise", type=float, default=0.025)
    args = ap.parse_args(argv)
    common = dict(defense=args.defense, bottleneck=8, noise=args.noise, progress=False)
    configs = {"before": TrainConfig.from_preset("quick", **common, **BEFORE),
               "after": TrainConfig.from_preset("quick", **common)}  # fmt: skip
    device = pick_device("auto")
    data = {k: load_data(cfg, device) for k, cfg in configs.items()}
    seconds: dict[str, list[float]] = {k: [] for k in configs}
    load0 = os.getloadavg()[0]
    for _ in range(args.repeats):
        for key, cfg in configs.items():
            t = time.perf_counter()
            result = train(cfg, data=data[key], log=lambda _m: None)
            seconds[key].append(time.perf_counter() - t)
            print(f"{key}: {seconds[key][-1]:.1f} s, accuracy {100 * result.test_accuracy:.1f}%", flush=True)
    load1 = os.getloadavg()[0]
    mean = {k: sum(v) / len(v) for k, v in seconds.items()}
    print(f"{args.defense} on C8+{args.noise:g}, {device}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, load average {load0:.2f} -> {load1:.2f}")  # fmt: skip
    print(f"before {mean['before']:.1f} s, after {mean['after']:.1f} s per training: "
          f"after/before = {mean['after'] / mean['before']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
