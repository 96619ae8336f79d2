"""The attack harness: the attacker's view of a trained model, its data, and the attack's identity.

privbench.store.attacks runs the harness on a stored run and writes the attack folders.

The attacker's data is an explicit, recorded choice:
  - "train": the private training split (the paper's worst case);
  - "aux":   a disjoint split, `Dataset.aux` where the data set has one, else the first half of
             the test split (evaluation images then come from the second half).
Evaluation images are the first N of a seeded permutation of the test pool; a check refuses
any evaluation image that is also an attacker image.
"""

from __future__ import annotations

from typing import Any

import torch

from privbench.engine.config import config_hash
from privbench.engine.data import Dataset, image_hash_list, image_hashes
from privbench.errors import UserError
from privbench.plugin import registry
from privbench.plugin.base import Attack, Target

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


def folder_key(
    name: str, attack: Attack, resolved: dict[str, Any], attacker_data: str, eval_images: int, seed: int
) -> str:
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
    return Target(
        encoder=model.encoder,
        noise_std=float(model.noise_std),
        image_shape=tuple(image_shape),
        device=device,
        transform=transform,
        server=model.server,
        noise=noise,
    )


# ----------------------------------------------------------------------------- harness


def checked_reconstruction(recon: torch.Tensor, shape: torch.Size, name: str) -> torch.Tensor:
    """Refuse malformed reconstructions; clamp tiny excursions outside [0,1]."""
    if tuple(recon.shape) != tuple(shape):
        raise UserError(f"attack {name!r} returned shape {tuple(recon.shape)}, expected {tuple(shape)}")
    if not torch.isfinite(recon).all():
        raise UserError(f"attack {name!r} returned non-finite values")
    return recon.detach().float().clamp(0, 1)


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
