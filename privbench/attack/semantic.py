"""Semantic leakage: does a reconstruction still show its image's class?

A low SSIM can leave the identity of an image readable, so every attack is also scored by an
evaluation classifier that is independent of the target: its own architecture (ResNet-20) and
its own seed, trained by privbench's one training loop on the data set's training split and
cached per data set under privbench's cache folder (`PRIVBENCH_CACHE`). `sem_acc` is the
fraction of reconstructions it labels with the true class (per image 0/1, mean with the grouped
95% CI of the other metrics). Its accuracy on the clean evaluation images is the reference
line (what a perfect reconstruction reaches); the mean image scores about chance.

On by default in both presets (preset key `semantic`): the classifier trains once per data set
(about a minute on 2 CPU cores at the quick budget) and scoring is one forward pass per attack.
`PRIVBENCH_SEMANTIC=0` (or `attack_run(..., semantic=False)`) turns it off.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from privbench.engine import train as training
from privbench.engine.config import PRESETS, TrainConfig, preset_value
from privbench.engine.data import Dataset, cache_dir
from privbench.engine.train import make_model
from privbench.errors import UserError
from privbench.util.stats import grouped_mean_ci
from privbench.util.storage import atomic_write_bytes, build_dir_once, load_checkpoint, tensor_bytes, write_json

MODEL = "resnet20"
SEED = 7919  # targets use seeds 0, 1, 2, ...: a prime far from them keeps the classifier independent
# Data fields shared with the target: the classifier learns the same training split.
DATA_FIELDS = ("dataset", "data_dir", "data_seed", "data_version", "n_train", "data_fingerprint", "image_size")
# Training budget per preset, on top of that preset's TrainConfig defaults.
# quick: half width and 8 epochs with the quick preset's stabilisers (warm-up, label smoothing,
#        weight average): about 6 s per epoch of 5,000 images on 2 CPU cores.
# paper: full width and He et al. (2016)'s CIFAR recipe for ResNet-20 (164 epochs, lr 0.1 divided
#        by 10 at epochs 82 and 123, weight decay 1e-4, batch 128).
BUDGETS: dict[str, dict[str, Any]] = {
    "quick": dict(width=0.5, epochs=8),
    "paper": dict(
        width=1.0,
        epochs=164,
        batch_size=128,
        lr=0.1,
        schedule="multistep",
        milestones=(82, 123),
        gamma=0.1,
        weight_decay=1e-4,
        warmup_epochs=0.0,
        label_smoothing=0.0,
        ema=0.0,
    ),
}
PREDICT_BATCH = 1024


def enabled(preset: str, override: bool | None = None) -> bool:
    """Whether attacks get sem_acc: the argument, else PRIVBENCH_SEMANTIC (0/1), else the preset."""
    if override is not None:
        return bool(override)
    env = os.environ.get("PRIVBENCH_SEMANTIC", "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    if env:
        raise UserError(f"invalid PRIVBENCH_SEMANTIC {env!r}: 0 or 1")
    return bool(preset_value(preset, "semantic"))


def classifier_config(target: TrainConfig, device: str = "cpu") -> TrainConfig:
    """The evaluation classifier's TrainConfig: the target's data, ResNet-20, no defense or noise."""
    preset = target.preset if target.preset in PRESETS else "quick"
    data = {k: getattr(target, k) for k in DATA_FIELDS}
    return TrainConfig.from_preset(
        preset,
        **data,
        **BUDGETS.get(preset, BUDGETS["quick"]),
        model=MODEL,
        cut=1,
        defense="none",
        bottleneck=None,
        noise=0.0,
        seed=SEED,
        device=device,
        progress=False,
    )


def cache_folder(cfg: TrainConfig) -> Path:
    return cache_dir() / "semantic" / f"{MODEL}-{cfg.hash()}"


def _train_into(tmp: Path, name: str, cfg: TrainConfig, data: Dataset, log: Callable[[str], None]) -> None:
    log(
        f"semantic: training the evaluation classifier ({MODEL}, width {cfg.width:g}, epochs {cfg.epochs}, "
        f"seed {cfg.seed}) on {len(data.train)} training images; cached for this data set"
    )
    result = training.train(cfg, data=data, log=lambda _: None)
    info = {
        "id": name,
        "model": MODEL,
        "width": cfg.width,
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "preset": cfg.preset,
        "train_images": len(data.train),
        "test_accuracy": result.test_accuracy,
        "train_seconds": result.seconds,
    }
    blob = {"state_dict": result.model.state_dict(), "info": info, "config_hash": cfg.hash()}
    atomic_write_bytes(tmp / "classifier.pt", tensor_bytes(blob))
    write_json(tmp / "info.json", info | {"config": cfg.identity()})  # for people; the .pt is what loads


def _load(folder: Path, cfg: TrainConfig, data: Dataset, device: torch.device) -> tuple[torch.nn.Module, dict]:
    blob = load_checkpoint(folder / "classifier.pt")  # weights_only: damage is a one-line UserError
    model = make_model(cfg, data)
    try:
        if blob.get("config_hash") != cfg.hash() or not isinstance(blob.get("info"), dict):
            raise ValueError("it belongs to another configuration")
        model.load_state_dict(blob["state_dict"])
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise UserError(f"{folder / 'classifier.pt'} is damaged: {str(exc).splitlines()[0]}") from None
    return model.to(device).eval(), dict(blob["info"])


def load_or_train(
    target: TrainConfig, data: Dataset, device: torch.device, log: Callable[[str], None] = print
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The cached evaluation classifier of the target's data set (trained here when absent or
    damaged) in eval mode, and its record (id, architecture, seed, test accuracy)."""
    cfg = classifier_config(target, str(device))
    folder = cache_folder(cfg)
    for attempt in range(2):
        # The lock makes parallel cells wait for one training instead of each training their own.
        build_dir_once(folder, lambda tmp: _train_into(tmp, folder.name, cfg, data, log), log=log)
        try:
            return _load(folder, cfg, data, device)
        except UserError as exc:
            if attempt:
                raise
            log(f"semantic: {exc}; retraining the evaluation classifier")
            shutil.rmtree(folder, ignore_errors=True)
    raise AssertionError("unreachable")


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Predicted class per float image in [0,1]."""
    dev = next(model.parameters()).device
    out = [model(images[i : i + PREDICT_BATCH].float().to(dev)).argmax(1) for i in range(0, len(images), PREDICT_BATCH)]
    return torch.cat(out).cpu() if out else torch.zeros(0, dtype=torch.long)


def pool_labels(data: Dataset, attacker_data: str) -> torch.Tensor:
    """Labels of the evaluation pool of privbench.attack.harness.split_attacker_eval, in its order."""
    if attacker_data == "train" or (data.aux is not None and len(data.aux) > 0):
        return data.test.labels
    return data.test.labels[len(data.test) // 2 :]


@dataclass
class Semantic:
    """The classifier and the evaluation images' labels, shared by every attack of one command."""

    model: torch.nn.Module
    labels: torch.Tensor  # [N] true classes of the evaluation images (CPU)
    groups: list[int] | None
    info: dict[str, Any]
    clean: list[float] = field(default_factory=list)  # per evaluation image: 1 if classified correctly

    def correct(self, images: torch.Tensor) -> tuple[list[float], torch.Tensor]:
        """(per image 1.0/0.0: labelled with its true class, predicted classes)."""
        pred = predict(self.model, images)
        return (pred == self.labels).float().tolist(), pred

    def add_scores(
        self, per_image: dict[str, Any], baseline: dict[str, Any], recon: torch.Tensor, base: torch.Tensor
    ) -> str:
        """Add sem_acc to an attack's and its baseline's per-image scores; returns semantic.csv."""
        per_image["sem_acc"], pred = self.correct(recon)
        baseline["sem_acc"], _ = self.correct(base)
        rows = ["index,label,predicted,correct"]
        triples = zip(self.labels.tolist(), pred.tolist(), per_image["sem_acc"])
        rows += [f"{i},{y},{p},{int(c)}" for i, (y, p, c) in enumerate(triples)]
        return "\n".join(rows) + "\n"

    def record(self) -> dict[str, Any]:
        """metrics.json "semantic": the reference line (clean accuracy) and the classifier."""
        stats = grouped_mean_ci(self.clean, self.groups)
        return {"clean_accuracy": stats["mean"], "clean_accuracy_ci95": stats["ci95"], "classifier": self.info}


def prepare(
    target: TrainConfig,
    data: Dataset,
    attacker_data: str,
    perm: torch.Tensor,
    eval_x: torch.Tensor,
    groups: list[int] | None,
    device: torch.device,
    log: Callable[[str], None] = print,
) -> Semantic:
    """The classifier (cached) and the labels of the evaluation images `perm` picked from the pool."""
    model, info = load_or_train(target, data, device, log)
    labels = pool_labels(data, attacker_data)[perm.to(data.test.labels.device)].cpu()
    sem = Semantic(model, labels, groups, info)
    sem.clean, _ = sem.correct(eval_x)
    return sem
