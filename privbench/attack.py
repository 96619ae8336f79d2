"""The attack harness: attack a trained run, score the reconstructions, store the results.

For each attack it writes RUN/attacks/<attack>-<hash12>/ with metrics.json, per_image.csv and
grid.png (see the result format in docs/plugins.md). The hash covers the attack name, its
resolved options, the attacker data choice, the number of evaluation images and the seed, so
a finished folder is reused instead of recomputed.

The attacker's data is an explicit, recorded choice:
  - "train": the private training split (the paper's worst case);
  - "aux":   a disjoint split, `Dataset.aux` where the data set has one, else the first half of
             the test split (evaluation images then come from the second half).
Evaluation images are the first N of a seeded permutation of the test pool; a check refuses
any evaluation image that is also an attacker image.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from privbench import registry
from privbench.config import config_hash, preset_value
from privbench.data import Dataset, image_hash_list, image_hashes, to_float
from privbench.errors import UserError
from privbench.metrics import load_lpips, score, summarize
from privbench.plugins import Attack, Target, takes_keyword
from privbench.progress import warn_once
from privbench.recon_images import (  # noqa: F401 (GRID_TENSORS, write_combined_grid: imported from here)
    GRID_IMAGES,
    GRID_TENSORS,
    image_grid,
    write_combined_grid,
)
from privbench.runs import Run, now, provenance, read_result
from privbench.storage import atomic_write_bytes, atomic_write_text, build_dir_once, tensor_bytes, write_json

ATTACKER_DATA = ("train", "aux")
RECONSTRUCT_BATCH = 1024  # z rows handed to attack.reconstruct at once


def threat_model(attacker_data: str) -> str:
    data = {"train": "train split (the private training data)", "aux": "aux split (disjoint from training data)"}
    return (
        "white-box query access to the trained encoder, knows the defense's noise, "
        f"attacker data: {data[attacker_data]}"
    )


# ------------------------------------------------------------------------------- data


def check_disjoint(attacker_images: torch.Tensor, eval_images: torch.Tensor) -> None:
    """Raise UserError if any evaluation image is byte-identical to an attacker image."""
    shared = image_hashes(attacker_images) & image_hashes(eval_images)
    if shared:
        raise UserError(
            f"{len(shared)} evaluation image(s) also appear in the attacker's data: "
            "attacker and evaluation images must be disjoint"
        )


def split_attacker_eval(data: Dataset, attacker_data: str) -> tuple[torch.Tensor, torch.Tensor, str, str]:
    """(attacker images, evaluation pool, attacker split name, eval split name), uint8."""
    if attacker_data not in ATTACKER_DATA:
        raise UserError(f"invalid attacker data {attacker_data!r}: choose train or aux")
    if attacker_data == "train":
        return data.train.images, data.test.images, "train", "test"
    if data.aux is not None and len(data.aux) > 0:
        return data.aux.images, data.test.images, "aux", "test"
    half = len(data.test) // 2
    if half < 1:
        raise UserError("the test split is too small to split into attacker and evaluation halves")
    return data.test.images[:half], data.test.images[half:], "test[:half]", "test[half:]"


def attacker_labels(data: Dataset, attacker_data: str) -> torch.Tensor:
    """Class labels of the images `split_attacker_eval` gives the attacker, in the same order."""
    if attacker_data == "train":
        return data.train.labels
    if data.aux is not None and len(data.aux) > 0:
        return data.aux.labels
    return data.test.labels[: len(data.test) // 2]


def eval_indices(pool: torch.Tensor, attacker: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, int]:
    """Indices into the pool of the first n images of a seeded permutation, after dropping any
    image that also occurs in the attacker's data (real data sets hold a few exact duplicates).
    Returns (indices, number of pool images dropped as duplicates)."""
    if n < 1:
        raise UserError(f"invalid number of evaluation images {n}: must be >= 1")
    seen = image_hashes(attacker)
    pool_hashes = image_hash_list(pool)
    keep = torch.tensor([h not in seen for h in pool_hashes], dtype=torch.bool)
    idx = keep.nonzero().flatten()
    perm = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))][:n]
    return perm, int((~keep).sum())


def pick_eval(pool: torch.Tensor, attacker: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, int]:
    """The evaluation images chosen by `eval_indices`, checked disjoint from the attacker's data.
    Returns (images, number of pool images dropped as duplicates)."""
    perm, dropped = eval_indices(pool, attacker, n, seed)
    chosen = pool[perm.to(pool.device)]
    check_disjoint(attacker, chosen)  # the enforced check, independent of the filtering above
    return chosen, dropped


def eval_pool_groups(data: Dataset, attacker_data: str) -> torch.Tensor | None:
    """Group ids (tiles) of the evaluation pool that `split_attacker_eval` returns, or None."""
    groups = data.test.groups
    if groups is None or attacker_data == "train" or (data.aux is not None and len(data.aux) > 0):
        return groups
    return groups[len(data.test) // 2 :]


# ---------------------------------------------------------------------------- options


def resolve_attack(
    name: str,
    user_options: dict[str, Any],
    budget: dict[str, Any],
    progress: bool = True,
    preset_options: dict[str, Any] | None = None,
) -> tuple[Attack, dict[str, Any]]:
    """Create attack `name`. User options are validated strictly; the preset budget
    (epochs/steps) and the preset's options for this attack only apply where the attack takes
    them, and user options win over both. Returns (attack, resolved options)."""
    cls = registry.get("attack", name)
    defaults = registry.option_defaults(cls)
    unknown = sorted(set(k for k, v in user_options.items() if v is not None) - set(defaults))
    if unknown:
        allowed = ", ".join(sorted(defaults)) or "none"
        raise UserError(f"attack {name!r} has no option {unknown[0]!r} (options: {allowed})")
    merged = {**budget, **(preset_options or {}), **user_options}
    attack = registry.create("attack", name, merged, strict=False)
    attack.progress = progress  # read by built-in attacks' progress bars
    return attack, attack.options()


def folder_key(name: str, attack: Attack, resolved: dict[str, Any], attacker_data: str, eval_images: int,
               seed: int) -> str:  # fmt: skip
    """The hash naming an attack cell's folder: its name, options in force, attacker data, number
    of evaluation images and seed. Options the attack lists in `identity_omits` count only when
    they differ from their default."""
    defaults = registry.option_defaults(type(attack))
    options = {k: v for k, v in resolved.items() if not (k in attack.identity_omits and v == defaults.get(k))}
    return config_hash(
        {"attack": name, "options": options, "attacker_data": attacker_data, "eval_images": eval_images, "seed": seed}
    )


def make_target(model: torch.nn.Module, image_shape: tuple[int, int, int], device: torch.device) -> Target:
    """The attacker's view of a SplitModel: frozen encoder in eval mode, the defense's transform
    (eval mode), the channel noise, and the frozen server half for threat models that grant it."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    f, g = getattr(model, "defense_transform", None), getattr(model, "defense_noise", None)
    transform = (lambda z: f(z, training=False)) if f is not None else None
    noise = (lambda z: g(z, training=False)) if g is not None else None
    return Target(encoder=model.encoder, noise_std=float(model.noise_std), image_shape=tuple(image_shape),
                  device=device, transform=transform, server=model.server, noise=noise)  # fmt: skip


# ----------------------------------------------------------------------------- harness


def _per_image_csv(per_image: dict[str, list[float] | None]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["index", "ssim", "psnr", "mse", "lpips"])
    lp = per_image["lpips"]
    for i, (s, p, m) in enumerate(zip(per_image["ssim"], per_image["psnr"], per_image["mse"])):
        writer.writerow([i, repr(s), repr(p), repr(m), "" if lp is None else repr(lp[i])])
    return buf.getvalue()


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
    its budget and the result records both (privbench.saturation). With `semantic` (default: the
    preset's, or PRIVBENCH_SEMANTIC) every attack also gets sem_acc (privbench.semantic).

    `epochs` / `steps` override the preset's attack budget for attacks that take them;
    `options` maps attack name -> {option: value} and wins over the preset's attack_options.
    """
    from privbench import semantic as sem_mod
    from privbench.train import load_data, pick_device, seed_everything

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
            target=make_target(model, data.image_shape, dev), attacker_x=attacker_x, eval_x=eval_x,
            attacker_split=attacker_split, eval_split=eval_split, dropped=dropped,
            lpips_model=lpips_model, lpips_missing=lpips_missing,
            mean_image=attacker_x.mean(dim=0, keepdim=True), groups=groups,
        )  # fmt: skip
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
            recon = _checked(recon, eval_x.shape, name)
            per_image = score(recon, eval_x, lpips_model=s["lpips_model"])
            base_image = s["mean_image"].expand_as(eval_x)
            base_scores = score(base_image, eval_x, lpips_model=s["lpips_model"])
            sem = s["semantic"]  # sem_acc: does the reconstruction still show its true class?
            sem_csv = sem.add_scores(per_image, base_scores, recon, base_image) if sem is not None else None
            baseline = summarize(base_scores, s["lpips_missing"], s["groups"])
            t3 = time.perf_counter()
            result = {
                "attack": name, "options": resolved, "attacker_data": attacker_data,
                "attacker_split": s["attacker_split"], "attacker_images": len(attacker_x),
                "eval_images": len(eval_x), "eval_split": s["eval_split"],
                "eval_duplicates_dropped": s["dropped"], "seed": seed, "run": run.name,
                "threat_model": threat_model(attacker_data), "info": dict(getattr(attack, "info", None) or {}),
                "metrics": summarize(per_image, s["lpips_missing"], s["groups"]), "baseline": baseline,
                "eval_groups": len(set(s["groups"])) if s["groups"] is not None else len(eval_x),
                "timings": {"fit_seconds": t1 - t0, "reconstruct_seconds": t2 - t1, "metrics_seconds": t3 - t2},
                "provenance": prov | {"end_time": now()},
            }  # fmt: skip
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
        from privbench import saturation

        results = saturation.check(
            run.path, results, attack_run, attacker_data=attacker_data, eval_images=n_eval, device=device,
            seed=seed, progress=progress, log=log,
        )  # fmt: skip
    return results


def _checked(recon: torch.Tensor, shape: torch.Size, name: str) -> torch.Tensor:
    """Refuse malformed reconstructions; clamp tiny excursions outside [0,1]."""
    if tuple(recon.shape) != tuple(shape):
        raise UserError(f"attack {name!r} returned shape {tuple(recon.shape)}, expected {tuple(shape)}")
    if not torch.isfinite(recon).all():
        raise UserError(f"attack {name!r} returned non-finite values")
    return recon.detach().float().clamp(0, 1)


def split_options(pairs: dict[str, Any], attacks: list[str]) -> dict[str, dict[str, Any]]:
    """{"decoder.epochs": 5} -> {"decoder": {"epochs": 5}}; a bare key needs exactly one attack."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in pairs.items():
        name, dot, opt = key.rpartition(".")
        if not dot:
            if len(attacks) != 1:
                raise UserError(f"option {key!r} is ambiguous with several attacks: write ATTACK.{key}=VALUE")
            name = attacks[0]
        if name not in attacks:
            raise UserError(f"option {key!r} names attack {name!r}, which is not among the attacks run")
        out.setdefault(name, {})[opt.replace("-", "_") if dot else key] = value
    return out


def format_table(results: list[dict[str, Any]]) -> str:
    """Plain-text table: one row per attack and one for its mean-image baseline."""

    def cell(stat: dict[str, Any], digits: int) -> str:
        if "missing" in stat:
            return "missing"
        ci = stat.get("ci95")
        return f"{stat['mean']:.{digits}f} ± {ci:.{digits}f}" if ci is not None else f"{stat['mean']:.{digits}f}"

    digits = {"ssim": 4, "psnr": 2, "mse": 5, "lpips": 4}
    header = ["attack", "SSIM", "PSNR", "MSE", "LPIPS"]
    if any("sem_acc" in r["metrics"] for r in results):  # folders built without it show "–"
        digits["sem_acc"] = 3
        header.append("sem_acc")
    rows = []
    for r in results:
        for label, key in ((r["attack"], "metrics"), ("  baseline (mean image)", "baseline")):
            rows.append([label, *(cell(r[key][m], d) if m in r[key] else "–" for m, d in digits.items())])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)
