"""Does a larger batch with a scaled learning rate keep the paper protocol's accuracy?

    python bench/batch_scaling.py                                   # CPU: quarter width, 20 epochs
    python bench/batch_scaling.py --width 1 --epochs 240 --defense none --defense gmm-cem   # GPU: the protocol

Batch 128 is launch-bound on a GPU; batch 512 is the lever for the paper protocol's wall time.
This trains the paper preset (SGD, MultiStep at 1/4, 1/2, 3/4 and 7/8 of the epochs, gamma 0.2)
on 50,000 embedded crops at each (batch size, lr) pair and seed, and reports test accuracy per
pair, mean over seeds, with the difference to the first pair. Results are appended to a JSON
file after every run, so a stopped sweep keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from privbench.engine.config import TrainConfig
from privbench.engine.train import train
from privbench.util.stats import t_ci95

OUT = Path(__file__).parent / "out"


def milestones(epochs: int) -> tuple[int, ...]:
    # The paper's 60/120/180/210 of 240, scaled to `epochs`.
    return tuple(max(1, round(epochs * f)) for f in (0.25, 0.5, 0.75, 0.875))


def parse_pair(text: str) -> tuple[int, float]:
    batch, lr = text.split(":")
    return int(batch), float(lr)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--pair",
        action="append",
        type=parse_pair,
        metavar="BATCH:LR",
        help="default: 128:0.05 (the paper) and 512:0.2 (linear scaling)",
    )
    p.add_argument("--defense", action="append", help="default: none")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--n-train", type=int, default=50000)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", default=None, help="torch.compile mode for the GPU run")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    pairs = args.pair or [(128, 0.05), (512, 0.2)]
    out = Path(args.out) if args.out else OUT / f"batch-scaling-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for defense in args.defense or ["none"]:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for batch, lr in pairs:
                cfg = TrainConfig.from_preset(
                    "paper",
                    defense=defense,
                    width=args.width,
                    epochs=args.epochs,
                    milestones=milestones(args.epochs),
                    batch_size=batch,
                    lr=lr,
                    cut=4,
                    bottleneck=8,
                    noise=0.025,
                    n_train=args.n_train,
                    seed=seed,
                    device=args.device,
                    compile=args.compile or False,
                    progress=False,
                )
                result = train(cfg, log=lambda m: None)
                rows.append(
                    {
                        "defense": defense,
                        "batch_size": batch,
                        "lr": lr,
                        "seed": seed,
                        "test_accuracy": result.test_accuracy,
                        "train_seconds": result.seconds,
                        "epochs": args.epochs,
                        "width": args.width,
                        "n_train": args.n_train,
                    }
                )
                print(
                    f"{defense} batch {batch} lr {lr} seed {seed}: acc {result.test_accuracy:.4f} "
                    f"({result.seconds:.0f} s)",
                    flush=True,
                )
                out.write_text(json.dumps(rows, indent=2))
    print("\n| defense | batch | lr | test accuracy % (mean ± 95% CI over seeds) | vs first pair | train s |")
    print("|---|---|---|---|---|---|")
    for defense in args.defense or ["none"]:
        first = None
        for batch, lr in pairs:
            sel = [r for r in rows if (r["defense"], r["batch_size"], r["lr"]) == (defense, batch, lr)]
            acc = [100 * r["test_accuracy"] for r in sel]
            mean, ci = statistics.mean(acc), t_ci95(acc)
            first = mean if first is None else first
            sec = statistics.mean(r["train_seconds"] for r in sel)
            print(f"| {defense} | {batch} | {lr:g} | {mean:.2f} ± {ci:.2f} | {mean - first:+.2f} | {sec:.0f} |")
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
