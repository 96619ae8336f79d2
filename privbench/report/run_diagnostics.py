"""`privbench plot RUN --curves`: a run's training curves, its Eq. 3 bound beside the attacks'
measured MSE, and, for a mixture defense (slot-cem, gmm-cem), how its slots split each class.

Reads the run folder only: curves.csv (or metrics.json's history for runs older than it), the
`entropy_bound` recorded at the end of training, and the attacks' metrics.json. The slot plot
rebuilds the model and the defense's trained state from checkpoint.pt (weights only).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from privbench.engine.diagnostics import curves_frame, read_curves_csv, slot_stats
from privbench.engine.features import encoder_features
from privbench.engine.train import attach_defense, load_data
from privbench.errors import UserError
from privbench.plugin import stack
from privbench.plugin.base import Defense
from privbench.report.plot_diagnostics import plot_curves, plot_slots
from privbench.store.runs import Run, read_result
from privbench.util.storage import load_checkpoint


def bound_line(run: Any) -> str:
    """Eq. 3's bound (its caveat included) beside the lowest MSE an attack reached on this run."""
    bound = run.metrics().get("entropy_bound")
    if not bound:
        return f"{run.name}: no Eq. 3 bound recorded (a run without channel noise, or older than the bound)"
    measured = []
    for folder in run.attack_dirs():
        mse = read_result(folder)["metrics"].get("mse", {}).get("mean")
        if mse is not None:
            measured.append((mse, folder.name))
    best = f"lowest attack MSE {min(measured)[0]:.4g} ({min(measured)[1]})" if measured else "no attack yet"
    return (
        f"{run.name}: Eq. 3 bound MSE >= {bound['mse_bound']:.3g} with H(x) = {bound['h_x']:g} "
        f"(information {bound['information_nats']:.4g} nats, {bound['estimator']}); {best}. "
        f"Caveat: {bound['caveat']}"
    )


def write_run_diagnostics(run_dir: str | Path, *, log: Callable[[str], None] = print) -> list[Path]:
    """Write RUN/curves.png and, for a defense with slot responsibilities, RUN/slots.png."""
    run = Run.open(run_dir)
    cfg = run.config()
    csv = run.path / "curves.csv"
    frame = read_curves_csv(csv) if csv.is_file() else curves_frame(run.metrics().get("history") or [])
    if frame.empty:
        raise UserError(f"{run.path}: no per-epoch history recorded")
    out = [plot_curves(frame, run.path / "curves", noise_std=cfg.noise or None, title=run.name)]
    log(bound_line(run))
    defense = stack.create(cfg.defense, cfg.defense_options)
    if not any(type(part).responsibilities is not Defense.responsibilities for _, part in defense.members):
        return out
    device = torch.device("cpu")
    data = load_data(cfg, device)
    model = run.load_model(data, device)
    attach_defense(model, defense, data.image_shape, device)  # build, then its trained state
    try:
        defense.load_state_dict(load_checkpoint(run.path / "checkpoint.pt").get("defense") or {})
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{run.path / 'checkpoint.pt'} is damaged: the defense state does not load ({exc})") from None
    z = encoder_features(model.client_view(), data.test.images)
    stats = slot_stats(defense, z, data.test.labels, noise_std=cfg.noise, num_classes=data.num_classes)
    if stats is None:
        log(f"{run.name}: the defense holds no trained slots: no slot plot")
        return out
    out.append(plot_slots(stats, run.path / "slots", title=run.name))
    return out
