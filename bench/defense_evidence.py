"""Defense evidence from finished run folders: accuracy, z spread, attack SSIM/PSNR, epoch time.

    privbench run --seeds 3 && python bench/defense_evidence.py results

One table per (data set, model, preset); in it one row per (defense, channel, options) with
the mean ± 95% CI (Student t, n-1 dof) over seeds of: test accuracy, the intra-class and
total variance of clean z on the training split (read from metrics.json, or computed from the
checkpoint for runs that predate it), each attack's SSIM and PSNR, and the mean epoch time as a
ratio to `none` on the same channel (the same machine, one sweep). With one seed a cell is the
seed's number marked "(n=1)": there is no interval to give.
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict

from privbench.store.rows import channel_label, expand_run_dirs, options_label
from privbench.store.runs import Run
from privbench.util import stats
from privbench.util.storage import read_json


def run_row(run: Run) -> dict:
    cfg, m = run.config(), run.metrics()
    if "z_intra_class_var" not in m:
        import torch

        from privbench.engine.features import z_spread
        from privbench.engine.train import load_data

        data = load_data(cfg, torch.device("cpu"))
        m |= z_spread(run.load_model(data).encoder, data.train.images, data.train.labels, data.num_classes)
    row = {
        "accuracy": 100 * m["test_accuracy"],
        "z_intra": m["z_intra_class_var"],
        "z_total": m["z_total_var"],
    }
    epochs = [h["epoch_seconds"] for h in m.get("history", []) if "epoch_seconds" in h]
    if epochs:
        row["epoch_s"] = statistics.mean(epochs)
    for folder in run.attack_dirs():
        a = read_json(folder / "metrics.json")
        for metric in ("ssim", "psnr"):
            mean = a.get("metrics", {}).get(metric, {}).get("mean")
            if mean is not None:  # a metric reported as missing has no mean
                row[f"{a['attack']}_{metric}"] = mean
    return row


def cell(values: list[float], digits: int) -> str:
    """'0.512 ± 0.03 (n=3)'; one value: '0.512 (n=1)'; never '± nan'."""
    if not values:
        return ""
    mean = f"{stats.mean(values):.{digits}g}"
    if len(values) < 2:
        return f"{mean} (n=1)"
    return f"{mean} ± {stats.t_ci95(values):.2g} (n={len(values)})"


def report(paths: list[str]) -> str:
    """The Markdown tables, one per (data set, model, preset)."""
    groups: dict[tuple, dict[tuple, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for path in expand_run_dirs(paths or ["results"]):
        run = Run.open(path)
        cfg = run.config()
        setting = (cfg.dataset, cfg.model, cfg.preset)
        config = (cfg.defense, channel_label(cfg.bottleneck, cfg.noise), options_label(cfg.defense_options))
        groups[setting][config].append(run_row(run))
    out = []
    for (dataset, model, preset), configs in sorted(groups.items()):
        keys = sorted({k for rows in configs.values() for r in rows for k in r} - {"epoch_s"})
        out += [f"## data set {dataset}, model {model}, preset {preset}", ""]
        out.append("| defense | channel | options | seeds | " + " | ".join(keys) + " | epoch time / none |")
        out.append("|---" * (len(keys) + 5) + "|")
        for (defense, channel, options), rows in sorted(configs.items()):
            cells = [cell([r[k] for r in rows if k in r], 5 if k.startswith("z_") else 3) for k in keys]
            base = [r["epoch_s"] for rs in (v for c, v in configs.items() if c[:2] == ("none", channel)) for r in rs]
            own = [r["epoch_s"] for r in rows if "epoch_s" in r]
            ratio = f"{statistics.mean(own) / statistics.mean(base):.2f}" if own and base else ""
            out.append(f"| {defense} | {channel} | {options} | {len(rows)} | " + " | ".join(cells) + f" | {ratio} |")
        out.append("")
    return "\n".join(out)


def main(paths: list[str]) -> None:
    print(report(paths), end="")


if __name__ == "__main__":
    main(sys.argv[1:])
