"""Training configuration and presets.

One dict per preset holds the hyperparameters; `TrainConfig` defaults come from `quick`, so the
API and the command line cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from privbench.errors import UserError

PRESETS: dict[str, dict[str, Any]] = {
    # CPU minutes: a quarter-width VGG11 (z is still 8x8x8 with C8), 5,000 images, cosine lr.
    # lr 0.02: on embedded, 10 epochs reach 86% (none) where 0.05 reaches 67% (2-core CPU runs).
    "quick": dict(
        width=0.25, epochs=10, batch_size=128, lr=0.02, schedule="cosine",  # lr per epoch
        attack_epochs=3, attack_steps=200, eval_images=256,
        # A narrower, shallower decoder with small batches leaks clearly within ~20 CPU seconds
        # (5,000 images); the reference decoder needs ~20 s per epoch on 2 cores.
        attack_options={"decoder": {"channels": 32, "blocks": 2, "batch_size": 64, "lr": 3e-3}},
    ),
    # The reference protocol (CEM paper / official code): full width, 240 epochs, MultiStep.
    "paper": dict(
        width=1.0, epochs=240, batch_size=128, lr=0.05, schedule="multistep",
        milestones=(60, 120, 180, 210), gamma=0.2,
        attack_epochs=50, attack_steps=1000, eval_images=1000,
        attack_options={},  # every attack at its reference defaults
    ),
}  # fmt: skip

# Fields that say where or how a run executes, not what it computes: left out of its identity.
NON_IDENTITY = ("device", "data_dir", "progress", "compile", "channels_last")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass
class TrainConfig:
    dataset: str = "embedded"
    data_dir: str | None = None
    model: str = "vgg11"
    width: float = PRESETS["quick"]["width"]
    cut: int = 4
    bottleneck: int | None = None  # channels of the C<c> bottleneck
    noise: float = 0.0  # std of Gaussian noise on z, at train, test and attack time
    defense: str = "none"
    defense_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = PRESETS["quick"]["epochs"]
    batch_size: int = PRESETS["quick"]["batch_size"]
    lr: float = PRESETS["quick"]["lr"]
    schedule: str = PRESETS["quick"]["schedule"]  # "cosine" | "multistep"
    milestones: tuple[int, ...] = (60, 120, 180, 210)
    gamma: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    data_seed: int = 0  # the embedded crops; fixed so seeds vary the model, not the data
    n_train: int | None = None  # embedded only: number of training crops (default 5,000)
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    channels_last: bool = True  # channels-last memory format on CUDA; ignored on CPU
    # torch.compile the two halves: False, True (mode "default") or a mode of COMPILE_MODES.
    compile: bool | str = False
    preset: str = "quick"
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        self.milestones = tuple(self.milestones)
        if self.schedule not in ("cosine", "multistep"):
            raise UserError(f"invalid schedule {self.schedule!r}: cosine or multistep")
        if self.epochs < 1:
            raise UserError(f"invalid epochs {self.epochs}: must be >= 1")
        if self.noise < 0:
            raise UserError(f"invalid noise {self.noise}: the noise std must be >= 0")
        if self.batch_size < 1 or self.lr <= 0:
            raise UserError("batch size and learning rate must be positive")
        if isinstance(self.compile, str) and self.compile not in COMPILE_MODES:
            raise UserError(f"invalid compile mode {self.compile!r} (known: {', '.join(COMPILE_MODES)})")

    @property
    def compile_mode(self) -> str | None:
        if self.compile is True:
            return "default"
        return self.compile or None

    @classmethod
    def from_preset(cls, preset: str = "quick", **overrides: Any) -> TrainConfig:
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in PRESETS[preset].items() if k in names}
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserError(f"unknown training option {unknown[0]!r}")
        return cls(preset=preset, **values)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def identity(self) -> dict[str, Any]:
        d = self.to_dict()
        for k in NON_IDENTITY:
            d.pop(k, None)
        return d

    def hash(self) -> str:
        return config_hash(self.identity())


def config_hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def preset_value(preset: str, key: str) -> Any:
    return PRESETS.get(preset, PRESETS["quick"]).get(key)
