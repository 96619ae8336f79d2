"""Leakage against depth: one model cut after several of its modules, each cut trained undefended
and attacked; the rows of every cut go into one folder, whose summary table docs/models.md shows.

    python bench/depth_curve.py resnet18 --out docs/data/depth-resnet18            # layer1..layer4
    python bench/depth_curve.py vit --out docs/data/depth-vit --epochs 10 --seeds 3

Each cut is an ordinary `privbench run` grid (none@plain, the decoder and optimization attacks),
so finished cells are reused; `privbench report docs/models.md` then redraws the table from the
committed results.csv.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

import privbench.api as pb
from privbench.store import rows

MODELS = {
    "resnet18": ("torchvision:resnet18", [], ["layer1", "layer2", "layer3", "layer4"]),
    # A ViT small enough for a CPU: 32 px images in 4 px patches (64 tokens + a class token).
    "vit": (
        "timm:vit_tiny_patch16_224",
        ["model.img_size=32", "model.patch_size=4", "model.embed_dim=96", "model.num_heads=3", "model.depth=9"],
        ["blocks.1", "blocks.3", "blocks.7"],
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--out", required=True, help="folder for the combined results.csv")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--results-dir", default="results")
    args = parser.parse_args()
    spec, options, cuts = MODELS[args.model]
    frames = []
    for cut in cuts:
        result = pb.run(
            defense=["none@plain"],
            attack=["decoder", "optimization"],
            model=spec,
            cut=cut,
            option=options,
            epochs=args.epochs,
            seeds=args.seeds,
            results_dir=args.results_dir,
            progress=False,
        )
        frames.append(rows.read_csv(result.out_dir / "results.csv"))
        print(f"{cut}: {result.out_dir}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pd.concat(frames, ignore_index=True).drop(columns=["path"]).to_csv(out / "results.csv", index=False)
    print(out / "results.csv")


if __name__ == "__main__":
    main()
