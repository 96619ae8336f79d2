"""Defense evidence from finished run folders: accuracy, z spread, attack SSIM/PSNR, epoch time.

    privbench run --seeds 3 && python bench/defense_evidence.py results

Groups runs by (defense, channel) and reports mean ± 95% CI over seeds of: test accuracy, the
intra-class and total variance of clean z on the training split (read from metrics.json, or
computed from the checkpoint for runs that predate it), each attack's SSIM and PSNR, and the
mean epoch time as a ratio to `none` on the same channel (the same machine, one sweep).
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict

import torch

from privbench.features import z_spread
from privbench.runs import Run
from privbench.storage import read_json
from privbench.tables import channel_label, expand_run_dirs, t_ci95
from privbench.train import load_data


def run_row(run: Run) -> dict:
    cfg, m = run.config(), run.metrics()
    if "z_intra_class_var" not in m:
        data = load_data(cfg, torch.device("cpu"))
        m |= z_spread(run.load_model(data).encoder, data.train.images, data.train.labels, data.num_classes)
    row = {
        "accuracy": 100 * m["test_accuracy"], "z_intra": m["z_intra_class_var"], "z_total": m["z_total_var"],
        "epoch_s": statistics.mean(h["epoch_seconds"] for h in m["history"]),
    }  # fmt: skip
    for folder in run.attack_dirs():
        a = read_json(folder / "metrics.json")
        row[f"{a['attack']}_ssim"] = a["metrics"]["ssim"]["mean"]
        row[f"{a['attack']}_psnr"] = a["metrics"]["psnr"]["mean"]
    return row


def main(paths: list[str]) -> None:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for path in expand_run_dirs(paths or ["results"]):
        run = Run.open(path)
        cfg = run.config()
        groups[(cfg.defense, channel_label(cfg.bottleneck, cfg.noise))].append(run_row(run))
    keys = sorted({k for rows in groups.values() for r in rows for k in r})
    print("| defense | channel | seeds | " + " | ".join(keys) + " | epoch time / none |")
    print("|---" * (len(keys) + 4) + "|")
    for (defense, channel), rows in sorted(groups.items()):
        cells = []
        for k in keys:
            vals = [r[k] for r in rows if k in r]
            digits = 5 if k.startswith("z_") else 3
            ci = t_ci95(vals) if len(vals) > 1 else float("nan")
            cells.append(f"{statistics.mean(vals):.{digits}g} ± {ci:.2g}" if vals else "")
        base = groups.get(("none", channel))
        mean_epoch = statistics.mean(r["epoch_s"] for r in rows)
        ratio = f"{mean_epoch / statistics.mean(r['epoch_s'] for r in base):.2f}" if base else ""
        print(f"| {defense} | {channel} | {len(rows)} | " + " | ".join(cells) + f" | {ratio} |")


if __name__ == "__main__":
    main(sys.argv[1:])
