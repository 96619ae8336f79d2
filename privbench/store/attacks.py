"""Attack cells: attack a stored run, score the reconstructions, store the results.

For each attack it writes RUN/attacks/<attack>-<hash12>/ with metrics.json, per_image.csv and
grid.png (see the result format in docs/plugins.md). The hash covers the attack name, its
resolved options, the attacker data choice, the number of evaluation images and the seed, so
a finished folder is reused instead of recomputed. The harness that fits and scores an attack
is privbench.attack.harness; this module adds the folders and reads their per-image values
back (`read_per_image`).
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from privbench.attack import saturation
from privbench.attack import semantic as sem_mod
from privbench.attack.harness import (
    ATTACKER_DATA,
    RECONSTRUCT_BATCH,
    attacker_labels,
    check_disjoint,
    checked_reconstruction,
    eval_indices,
    eval_pool_groups,
    folder_key,
    make_target,
    resolve_attack,
    split_attacker_eval,
    threat_model,
)
from privbench.attack.images import GRID_IMAGES, GRID_TENSORS, image_grid
from privbench.attack.metrics import load_lpips, score, summarize
from privbench.engine.config import preset_value
from privbench.engine.data import to_float
from privbench.engine.train import load_data, pick_device, seed_everything
from privbench.errors import UserError
from privbench.plugin import registry
from privbench.plugin.base import takes_keyword
from privbench.store.runs import Run, now, provenance, read_result
from privbench.util.progress import warn_once
from privbench.util.storage import (
    atomic_write_bytes,
    atomic_write_text,
    build_dir_once,
    load_checkpoint,
    tensor_bytes,
    write_json,
)


def _per_image_csv(per_image: dict[str, list[float] | None]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["index", "ssim", "psnr", "mse", "lpips"])
    lp = per_image["lpips"]
    for i, (s, p, m) in enumerate(zip(per_image["ssim"], per_image["psnr"], per_image["mse"])):
        writer.writerow([i, repr(s), repr(p), repr(m), "" if lp is None else repr(lp[i])])
    return buf.getvalue()


def read_per_image(path: Path, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(image indices, values) of `metric` in an attack's per_image.csv; None when the file or
    the column is absent, the file is damaged, or no value is finite (LPIPS offline)."""
    try:
        lines = path.read_text().split()
    except (OSError, UnicodeDecodeError):
        return None
    header = lines[0].split(",") if lines else []
    if len(lines) < 2 or metric not in header or "index" not in header:
        return None
    width = len(header)
    cells = ",".join(lines[1:]).split(",")  # the CSV holds numbers and empty cells only
    if len(cells) != width * (len(lines) - 1):
        return None
    try:
        idx = np.array(cells[header.index("index") :: width], dtype=np.int64)
        values = np.array([c or "nan" for c in cells[header.index(metric) :: width]], dtype=np.float64)
    except ValueError:
        return None
    return (idx, values) if np.isfinite(values).any() else None


def attack_run(
    run_dir: str | Path,
    attacks: list[str],
    *,
    attacker_data: str = "train",
    epochs: int | None = None,
    steps: int | None = None,
    eval_images: int | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    check_saturation: bool | None = None,
    semantic: bool | None = None,
) -> list[dict[str, Any]]:
    """Attack the run in `run_dir` with each named attack; returns each attack's metrics.json
    content plus "path" (its folder) and "reused" (True when a finished folder was found).
    With `check_saturation` (default: the preset's), every learned attack is repeated at twice
    its budget and the result records both (privbench.attack.saturation). With `semantic` (default: the
    preset's, or PRIVBENCH_SEMANTIC) every attack also gets sem_acc (privbench.attack.semantic).

    `epochs` / `steps` override the preset's attack budget for attacks that take them;
    `options` maps attack name -> {option: value} and wins over the preset's attack_options.
    """
    if not attacks:
        raise UserError("no attack given (e.g. --attack decoder)")
    options = options or {}
    stray = sorted(set(options) - set(attacks))
    if stray:
        raise UserError(f"options given for {stray[0]!r}, which is not among the attacks run")
    for name in attacks:
        registry.get("attack", name)  # unknown names fail before any work
    if attacker_data not in ATTACKER_DATA:
        raise UserError(f"invalid attacker data {attacker_data!r}: choose train or aux")
    run = Run.open(run_dir)
    cfg = run.config()
    dev = pick_device(device)
    n_eval = eval_images if eval_images is not None else preset_value(cfg.preset, "eval_images")
    if isinstance(n_eval, bool) or not isinstance(n_eval, int) or n_eval < 1:
        raise UserError(f"invalid number of evaluation images {n_eval!r}: must be an integer >= 1")
    budget = {
        "epochs": epochs if epochs is not None else preset_value(cfg.preset, "attack_epochs"),
        "steps": steps if steps is not None else preset_value(cfg.preset, "attack_steps"),
    }
    preset_options = preset_value(cfg.preset, "attack_options") or {}
    use_semantic = sem_mod.enabled(cfg.preset, semantic)
    plans = []
    for name in attacks:
        attack, resolved = resolve_attack(name, options.get(name, {}), budget, progress, preset_options.get(name))
        key = folder_key(name, attack, resolved, attacker_data, n_eval, seed)
        plans.append((name, attack, resolved, run.path / "attacks" / f"{name}-{key}"))

    state: dict[str, Any] = {}

    def prepare() -> dict[str, Any]:
        """Data, model, target and metrics model: loaded once, only if some attack must run."""
        if state:
            return state
        data = load_data(cfg, dev)
        model = run.load_model(data, dev)
        attacker_u8, pool, attacker_split, eval_split = split_attacker_eval(data, attacker_data)
        perm, dropped = eval_indices(pool, attacker_u8, n_eval, seed)
        eval_u8 = pool[perm.to(pool.device)]
        check_disjoint(attacker_u8, eval_u8)
        # CIs over evaluation images resample their tiles: crops of one tile are not independent.
        pool_groups = eval_pool_groups(data, attacker_data)
        groups = pool_groups[perm.to(pool_groups.device)].tolist() if pool_groups is not None else None
        if dropped:  # the same for every attack on this data: said once per command
            warn_once(log, f"dropped {dropped} evaluation candidates that also occur in the attacker data")
        lpips_model, lpips_missing = load_lpips(dev)
        if lpips_missing:
            warn_once(log, f"lpips: missing ({lpips_missing})")
        attacker_x, eval_x = to_float(attacker_u8), to_float(eval_u8)
        state["attacker_y"] = attacker_labels(data, attacker_data)
        state["semantic"] = (
            sem_mod.prepare(cfg, data, attacker_data, perm, eval_x, groups, dev, log) if use_semantic else None
        )
        state.update(
            target=make_target(model, data.image_shape, dev),
            attacker_x=attacker_x,
            eval_x=eval_x,
            attacker_split=attacker_split,
            eval_split=eval_split,
            dropped=dropped,
            lpips_model=lpips_model,
            lpips_missing=lpips_missing,
            mean_image=attacker_x.mean(dim=0, keepdim=True),
            groups=groups,
        )
        return state

    results = []
    for name, attack, resolved, folder in plans:
        if (folder / "metrics.json").is_file():
            log(f"{name}: reusing finished {folder}")
            results.append(read_result(folder) | {"path": str(folder), "reused": True})
            continue

        def build(tmp: Path, name=name, attack=attack, resolved=resolved) -> None:
            s = prepare()
            prov = provenance(dev, seed) | {"start_time": now()}
            seed_everything(seed)
            target, attacker_x, eval_x = s["target"], s["attacker_x"], s["eval_x"]
            log(f"{name}: fitting on {len(attacker_x)} {s['attacker_split']} images, options {resolved}")
            t0 = time.perf_counter()
            if takes_keyword(attack.fit, "labels"):  # the threat model grants the attacker its labels
                attack.fit(target, attacker_x, labels=s["attacker_y"])
            else:
                attack.fit(target, attacker_x)
            t1 = time.perf_counter()
            z = target.query(eval_x)
            chunks = range(0, len(z), RECONSTRUCT_BATCH)
            recon = torch.cat([attack.reconstruct(z[i : i + RECONSTRUCT_BATCH]) for i in chunks])
            t2 = time.perf_counter()
            recon = checked_reconstruction(recon, eval_x.shape, name)
            per_image = score(recon, eval_x, lpips_model=s["lpips_model"])
            base_image = s["mean_image"].expand_as(eval_x)
            base_scores = score(base_image, eval_x, lpips_model=s["lpips_model"])
            sem = s["semantic"]  # sem_acc: does the reconstruction still show its true class?
            sem_csv = sem.add_scores(per_image, base_scores, recon, base_image) if sem is not None else None
            baseline = summarize(base_scores, s["lpips_missing"], s["groups"])
            t3 = time.perf_counter()
            result = {
                "attack": name,
                "options": resolved,
                "attacker_data": attacker_data,
                "attacker_split": s["attacker_split"],
                "attacker_images": len(attacker_x),
                "eval_images": len(eval_x),
                "eval_split": s["eval_split"],
                "eval_duplicates_dropped": s["dropped"],
                "seed": seed,
                "run": run.name,
                "threat_model": threat_model(attacker_data),
                "info": dict(getattr(attack, "info", None) or {}),
                "metrics": summarize(per_image, s["lpips_missing"], s["groups"]),
                "baseline": baseline,
                "eval_groups": len(set(s["groups"])) if s["groups"] is not None else len(eval_x),
                "timings": {"fit_seconds": t1 - t0, "reconstruct_seconds": t2 - t1, "metrics_seconds": t3 - t2},
                "provenance": prov | {"end_time": now()},
            }
            if sem is not None:
                result["semantic"] = sem.record()
                atomic_write_text(tmp / "semantic.csv", sem_csv)
            write_json(tmp / "metrics.json", result)
            atomic_write_text(tmp / "per_image.csv", _per_image_csv(per_image))
            rows = [eval_x[:GRID_IMAGES], recon[:GRID_IMAGES]]
            atomic_write_bytes(tmp / "grid.png", image_grid(rows, labels=["original", name]))
            tiles = {"original": rows[0], "reconstruction": rows[1], "mean_image": s["mean_image"]}
            atomic_write_bytes(tmp / GRID_TENSORS, tensor_bytes(tiles))

        built = build_dir_once(folder, build, log=log)  # False: another process finished it meanwhile
        result = read_result(folder)
        m = result["metrics"]
        log(f"{name}: SSIM {m['ssim']['mean']:.4f} PSNR {m['psnr']['mean']:.2f} -> {folder}")
        results.append(result | {"path": str(folder), "reused": not built})

    if len(results) > 1:
        write_combined_grid(run.path / "attacks" / "grid.png", [Path(r["path"]) for r in results])
    if check_saturation if check_saturation is not None else preset_value(cfg.preset, "check_saturation"):
        results = saturation.check(
            run.path,
            results,
            attack_run,
            attacker_data=attacker_data,
            eval_images=n_eval,
            device=device,
            seed=seed,
            progress=progress,
            log=log,
        )
    return results


def write_combined_grid(path: Path, folders: list[Path]) -> None:
    """One PNG: originals on top, one row per attack folder, the mean-image baseline last.
    Built from the tensors each attack folder stores, so reused folders take part too."""
    found = [f for f in folders if (f / GRID_TENSORS).is_file()]
    entries = [(read_result(f)["attack"], _grid_tensors(f / GRID_TENSORS)) for f in found]
    entries = [(n, t) for n, t in entries if torch.equal(t["original"], entries[0][1]["original"])]
    if len(entries) < 2:
        return
    first = entries[0][1]
    mean_row = first["mean_image"].expand_as(first["original"])
    rows = [first["original"], *(t["reconstruction"] for _, t in entries), mean_row]
    atomic_write_bytes(path, image_grid(rows, labels=["original", *(n for n, _ in entries), "mean image"]))


def _grid_tensors(path: Path) -> dict[str, torch.Tensor]:
    tiles = load_checkpoint(path)
    if not all(isinstance(tiles.get(k), torch.Tensor) for k in ("original", "reconstruction", "mean_image")):
        raise UserError(f"{path} is damaged: expected the tensors original, reconstruction and mean_image")
    return tiles
