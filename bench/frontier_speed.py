"""Time the frontier analysis: `frontier.points` + `frontier.compare` on synthetic run folders.

    python bench/frontier_speed.py                       # 50 configurations x 3 seeds x 256 images, 1,000 resamples
    python bench/frontier_speed.py --configs 50 --seeds 3 --images 256 --resamples 1000 --repeats 3

Writes the run folders (config.json, metrics.json, two attacks with metrics.json and
per_image.csv each) into a temporary folder, reads them with `store.rows.collect`, `run_infos`
and `per_image` (timed apart: the store's reading), then times `points` + `compare` per
repeat. The first repeat also pays one-off imports (scipy's t quantiles, the defense plugins
that name the strength knobs); later repeats show the steady cost. The target: under 2 s on a
2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

DEFENSES = ("none", "gmm-cem", "slot-cem", "dropout", "topk", "prune", "vib", "nopeek", "shredder", "disco")
KNOB = {
    "none": None,
    "gmm-cem": "lam",
    "slot-cem": "lam",
    "dropout": "rate",
    "topk": "ratio",
    "prune": "ratio",
    "vib": "beta",
    "nopeek": "weight",
    "shredder": "weight",
    "disco": "ratio",
}


def write_runs(root: Path, configs: int, seeds: int, images: int, rng: np.random.Generator) -> int:
    """`configs` configurations: families of 5 strengths (`none` sweeps the channel noise), the
    last one the undefended model (no bottleneck, no noise)."""
    from privbench.engine.config import TrainConfig

    n_runs = 0
    for c in range(configs):
        defense, level = DEFENSES[(c // 5) % len(DEFENSES)], c % 5
        knob = KNOB[defense]
        options = {knob: [0.1, 0.2, 0.3, 0.4, 0.5][level]} if knob else {}
        noise = [0.0125, 0.025, 0.05, 0.1, 0.2][level] if knob is None else 0.025
        undefended = c == configs - 1
        acc, ssim = 0.92 - 0.03 * level, 0.65 - 0.04 * level - 0.01 * (c // 5)
        defense, options, noise = ("none", {}, 0.0) if undefended else (defense, options, noise)
        acc, ssim = (0.94, 0.75) if undefended else (acc, ssim)
        for seed in range(seeds):
            cfg = TrainConfig(
                defense=defense,
                bottleneck=None if undefended else 8,
                noise=noise,
                seed=seed,
                epochs=1 + c // 50,
                defense_options=options,
                progress=False,
            )
            run = root / f"{defense}-{cfg.hash()}"
            (run / "attacks").mkdir(parents=True)
            (run / "config.json").write_text(json.dumps({"train": cfg.to_dict(), "defense_options": options}))
            a = acc + rng.normal(0, 0.005)
            (run / "metrics.json").write_text(json.dumps({"test_accuracy": a, "num_classes": 10, "test_groups": 192}))
            for attack, shift in (("decoder", 0.0), ("optimization", -0.05)):
                values = np.clip(rng.normal(ssim + shift, 0.2, images), 0, 1)
                folder = run / "attacks" / f"{attack}-{seed:012d}"
                folder.mkdir()
                stat = {"mean": float(values.mean()), "ci95": 1.96 * float(values.std()) / images**0.5, "n": images}
                (folder / "metrics.json").write_text(
                    json.dumps(
                        {
                            "attack": attack,
                            "options": {},
                            "attacker_data": "train",
                            "eval_images": images,
                            "metrics": {"ssim": stat},
                            "baseline": {"ssim": {"mean": 0.46, "ci95": 0.05, "n": images}},
                        }
                    )
                )
                lines = ["index,ssim,psnr,mse,lpips", *(f"{i},{float(v)!r},20.0,0.01," for i, v in enumerate(values))]
                (folder / "per_image.csv").write_text("\n".join(lines) + "\n")
            n_runs += 1
    return n_runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from privbench.analysis import frontier
    from privbench.store.rows import collect, per_image, run_infos

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n_runs = write_runs(root, args.configs, args.seeds, args.images, np.random.default_rng(0))
        t = time.perf_counter()
        rows = collect([root])
        infos, images = run_infos(rows), per_image(rows, "ssim")  # the store's reading, timed with collect
        collect_s = time.perf_counter() - t
        print(
            f"{args.configs} configurations, {n_runs} runs, {args.images} images, 2 attacks, "
            f"{args.resamples} resamples; collect + run facts + per-image values {collect_s:.2f} s"
        )
        for i in range(args.repeats):
            t0 = time.perf_counter()
            pts = frontier.points(rows, infos=infos, per_image=images)
            t1 = time.perf_counter()
            cmp = frontier.compare(pts, resamples=args.resamples)
            t2 = time.perf_counter()
            first = " (with the one-off imports)" if i == 0 else ""
            print(f"repeat {i + 1}{first}: points {t1 - t0:.2f} s + compare {t2 - t1:.2f} s = {t2 - t0:.2f} s")
        print("\n".join(frontier.verdict_lines(cmp)[:3]))
    print(f"cpus {os.cpu_count()}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
