"""Epoch-time ratios of defenses to `none`, side by side step by step, through privbench's own loop.

    OMP_WAIT_POLICY=PASSIVE python bench/lockstep.py                       # none vs slot-cem
    OMP_WAIT_POLICY=PASSIVE python bench/lockstep.py --compile              # the same, torch.compile'd
    python bench/lockstep.py --plugin old_slot_cem.py --defense none --defense slot-cem-old --defense slot-cem

Whole runs one after another (bench/bench.py) are only comparable on a quiet machine: on a
shared one the load drifts by tens of percent within a minute. Here every defense trains in
its own thread with the real loop (`privbench.engine.train.train`, quick preset, the same options as
bench/bench.py), and a baton lets exactly one of them run at a time, passing on at each
training step (the defense's loss() call). A turn is thus one step of one run (its backward,
optimizer and weight-average update, the next batch and forward) and the runs take turns
A, B, C, A, B, C, ...: drift hits all of them alike. A run's epoch time is the sum of its turns
in that epoch; the first epoch, and a defense's first with its loss on, are not timed (warm-up
1, as bench/bench.py; with --compile they hold the compilation). The runs share the global
random generator, so their accuracies are not a solo run's: this measures time only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import torch

from privbench.engine.config import TrainConfig
from privbench.engine.data import load_dataset
from privbench.engine.train import train
from privbench.plugin import registry


class Baton:
    """Turns in a ring of runs; a finished run leaves the ring."""

    def __init__(self, n: int):
        self.cv, self.turn, self.ring = threading.Condition(), 0, list(range(n))

    def wait(self, i: int) -> None:
        with self.cv:
            self.cv.wait_for(lambda: self.turn == i)

    def pass_on(self, i: int, leave: bool = False) -> None:
        with self.cv:
            at = self.ring.index(i)
            if leave:
                self.ring.remove(i)
            if self.ring:
                self.turn = self.ring[(at + (0 if leave else 1)) % len(self.ring)]
            self.cv.notify_all()


def lockstep_class(cls: type, i: int, baton: Baton, turns: list[tuple[int, float]]) -> type:
    """The defense `cls`, passing the baton at each loss() call and timing its own turns."""

    def loss(self, z, y, *, epoch, lr):
        if self._turn_start is not None:
            turns.append((self._turn_epoch, time.perf_counter() - self._turn_start))
        baton.pass_on(i)
        baton.wait(i)
        self._turn_start, self._turn_epoch = time.perf_counter(), epoch
        return cls.loss(self, z, y, epoch=epoch, lr=lr)

    return type(f"Lockstep{i}", (cls,), {"name": f"{cls.name}@lockstep{i}", "loss": loss, "_turn_start": None})


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--defense", action="append", help="default: none, slot-cem (none is always first)")
    p.add_argument("--plugin", action="append", default=[], help="a defense plugin file (e.g. an older version)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--n-train", type=int, default=5000)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE")
    args = p.parse_args(argv)
    for path in args.plugin:
        registry.load_plugin_file(path)
    defenses = ["none"] + [d for d in (args.defense or ["slot-cem"]) if d != "none"]
    data = load_dataset("embedded", n_train=args.n_train)
    baton, turns = Baton(len(defenses)), [[] for _ in defenses]
    accuracy: dict[str, float] = {}

    names = [
        registry.register(lockstep_class(registry.get("defense", d), i, baton, turns[i])).name
        for i, d in enumerate(defenses)
    ]

    def run(i: int, defense: str) -> None:
        options = {} if defense == "none" else {"warmup": 1}
        cfg = TrainConfig.from_preset(
            "quick",
            defense=names[i],
            defense_options=options,
            epochs=args.epochs,
            width=args.width,
            batch_size=args.batch_size,
            cut=4,
            bottleneck=8,
            noise=0.025,
            n_train=args.n_train,
            device="cpu",
            compile=args.compile or False,
            progress=False,
        )
        baton.wait(i)
        try:
            accuracy[defense] = train(cfg, data=data, log=lambda m: None).test_accuracy
        finally:
            baton.pass_on(i, leave=True)

    load = os.getloadavg()
    threads = [threading.Thread(target=run, args=(i, d)) for i, d in enumerate(defenses)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for name in names:  # the wrappers are this measurement's own: the registry has no remove
            registry._REGISTRY["defense"].pop(name, None)
    epoch = {}
    for d, ts in zip(defenses, turns):
        skip = 1 if d == "none" else 2
        per_epoch = [sum(s for e, s in ts if e == k) for k in range(skip, args.epochs)]
        epoch[d] = statistics.mean(per_epoch)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "load_before": load,
        "load_after": os.getloadavg(),
        "epoch_seconds": epoch,
        "test_accuracy": accuracy,
    }
    for d in defenses:
        print(f"{d:<20} epoch {epoch[d]:7.3f} s  ratio to none {epoch[d] / epoch['none']:.3f}")
    print(
        f"load average {load[0]:.2f} before, {report['load_after'][0]:.2f} after; torch {torch.__version__}, "
        f"{report['threads']} threads, OMP_WAIT_POLICY={report['omp_wait_policy']}"
    )
    return report


if __name__ == "__main__":
    main()
