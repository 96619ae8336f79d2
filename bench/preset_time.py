"""Seconds per quick-preset training, before and after the precision changes, side by side.

    python bench/preset_time.py [--repeats 2] [--defense none] [--noise 0.025]

"wave1" is the wave-1 quick preset (embedded v2, 10 epochs, no warm-up, no label smoothing,
no weight average); "15-epochs" is session 3's precision preset (the current one at 15 epochs);
"now" is the quick preset in force. All run in this process, alternating (wave1, 15-epochs,
now, wave1, ...), and the wall time of a whole `train()` call
(data loading excluded: every data set is built first; evaluation and z statistics included)
is reported with the load average, so the ratio holds even on a busy machine.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from privbench.engine.config import TrainConfig
from privbench.engine.train import load_data, pick_device, train

ARMS = {
    "wave1": dict(epochs=10, batch_size=128, warmup_epochs=0.0, label_smoothing=0.0, ema=0.0, data_version=2),
    "15-epochs": dict(epochs=15),
    "now": {},
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--defense", default="none")
    ap.add_argument("--noise", type=float, default=0.025)
    args = ap.parse_args(argv)
    common = dict(defense=args.defense, bottleneck=8, noise=args.noise, progress=False)
    configs = {k: TrainConfig.from_preset("quick", **common, **arm) for k, arm in ARMS.items()}
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
    print(
        ", ".join(f"{k} {v:.1f} s" for k, v in mean.items())
        + " per training; relative to wave1: "
        + ", ".join(f"{k} {v / mean['wave1']:.2f}x" for k, v in mean.items())
    )


if __name__ == "__main__":
    main()
