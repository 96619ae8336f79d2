"""Training configuration and presets.

One table per preset in defaults.toml holds the hyperparameters; `TrainConfig` defaults come from
`quick`, so the API and the command line cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from privbench.engine.data import EMBEDDED_VERSION, folder_fingerprint
from privbench.engine.models import MODELS
from privbench.engine.zoo import is_model_spec
from privbench.errors import UserError
from privbench.plugin import stack
from privbench.util.storage import file_digest

# The presets and the default grid are data (defaults.toml, beside this module), so the core
# names no plugin; a preset's lists are tuples, as the TrainConfig fields they set.
DEFAULTS: dict[str, Any] = tomllib.loads((Path(__file__).parent / "defaults.toml").read_text())
PRESETS: dict[str, dict[str, Any]] = {
    name: {k: tuple(v) if isinstance(v, list) else v for k, v in preset.items()}
    for name, preset in DEFAULTS["presets"].items()
}
DEFAULT_GRID: dict[str, Any] = DEFAULTS["grid"]

# Fields that say where or how a run executes, not what it computes: left out of its identity.
NON_IDENTITY = ("device", "data_dir", "progress", "compile", "channels_last", "weights")
# Fields added after run folders existed, with the value that trains as before they existed: at
# that value they are left out of the identity, so those folders keep their hashes.
ADDED_FIELDS: dict[str, Any] = {
    "image_size": None,
    "pretrained": False,
    "model_options": {},
    "weights_digest": None,
    "cpu_amp": False,
}
MODEL_FORMS = "vgg11, resnet20, torchvision:NAME, timm:NAME or pkg.module:callable"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass
class TrainConfig:
    dataset: str = "embedded"
    data_dir: str | None = None
    # vgg11 | resnet20 (built in), or any model: torchvision:NAME, timm:NAME, pkg.module:callable
    # (privbench.engine.zoo), split at `cut` by privbench.engine.cuts.
    model: str = "vgg11"
    width: float = PRESETS["quick"]["width"]  # built-in models only
    # Built-in models: the number of entries on the client. Other models: a module name (the cut
    # falls after it) or an index into the model's valid cuts (`privbench cuts MODEL`).
    cut: int | str = 4
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
    label_smoothing: float = PRESETS["quick"]["label_smoothing"]  # of the cross-entropy, not the defense's loss
    warmup_epochs: float = PRESETS["quick"]["warmup_epochs"]  # linear lr warm-up from 0, per step
    ema: float = PRESETS["quick"]["ema"]  # per-step decay of the weight average kept as the model; 0: off
    # Fraction of the training steps over which the channel noise (`noise`) ramps linearly from 0 to
    # its value, in training only; evaluation and attacks always see the full noise. 0: off.
    noise_warmup: float = PRESETS["quick"].get("noise_warmup", 0.0)
    seed: int = 0
    data_seed: int = 0  # the embedded crops; fixed so seeds vary the model, not the data
    data_version: int = EMBEDDED_VERSION  # the embedded set's version; run folders before it had 2
    n_train: int | None = None  # embedded only: number of training crops (default 5,000)
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    channels_last: bool = True  # channels-last memory format on CUDA; ignored on CPU
    # bf16 autocast and channels-last on the CPU too (as amp / channels_last allow): 1.5-1.9x faster
    # training where the CPU has native bf16 (bench/README.md), different numbers, so an identity field.
    cpu_amp: bool = False
    # torch.compile the two halves: False, True (mode "default") or a mode of COMPILE_MODES.
    compile: bool | str = False
    preset: str = "quick"
    device: str = "auto"
    progress: bool = True
    # folder: data sets only: a fingerprint of the folder's content (set by from_preset), so
    # changed images make a new run instead of reusing a stale one. None: left out of identity.
    data_fingerprint: str | None = None
    image_size: int | None = None  # resize every image of the data set to this many pixels a side; None: native
    pretrained: bool = False  # zoo models: start from the family's default pretrained weights
    model_options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the model factory
    # A state dict file loaded into the model before training (not part of the identity: its
    # sha256, `weights_digest`, set by from_preset, is).
    weights: str | None = None
    weights_digest: str | None = None

    def __post_init__(self) -> None:
        _check_types(self)
        self.milestones = tuple(self.milestones)
        if self.schedule not in ("cosine", "multistep"):
            raise UserError(f"invalid schedule {self.schedule!r}: cosine or multistep")
        if self.epochs < 0:
            raise UserError(f"invalid epochs {self.epochs}: must be >= 0 (0 evaluates the model as it is)")
        self._check_model()
        if self.noise < 0:
            raise UserError(f"invalid noise {self.noise}: the noise std must be >= 0")
        if self.batch_size < 1 or self.lr <= 0:
            raise UserError("batch size and learning rate must be positive")
        if self.seed < 0:
            raise UserError(f"invalid seed {self.seed}: seeds are integers >= 0")
        if not 0 <= self.label_smoothing < 1 or not 0 <= self.ema < 1 or self.warmup_epochs < 0:
            raise UserError("label_smoothing and ema must lie in [0, 1) and warmup_epochs must be >= 0")
        if not 0 <= self.noise_warmup < 1:
            raise UserError(f"invalid noise_warmup {self.noise_warmup}: a fraction of training in [0, 1)")
        if isinstance(self.compile, str) and self.compile not in COMPILE_MODES:
            raise UserError(f"invalid compile mode {self.compile!r} (known: {', '.join(COMPILE_MODES)})")

    def _check_model(self) -> None:
        builtin = self.model in MODELS
        if not builtin and not is_model_spec(self.model):
            raise UserError(f"unknown model {self.model!r}: expected {MODEL_FORMS}")
        if isinstance(self.cut, str):
            name = self.cut.strip()
            if builtin and name.lstrip("-").isdigit():
                self.cut = int(name)  # "4" from a command line: the same run as 4
            elif builtin:
                raise UserError(
                    f"invalid cut {self.cut!r} for {self.model}: its cuts are numbers (privbench cuts "
                    f"{self.model}); module names cut torchvision, timm and user models"
                )
            elif not name:
                raise UserError("invalid cut '': a module name or an index into the valid cuts")
        if self.image_size is not None and self.image_size < 1:
            raise UserError(f"invalid image size {self.image_size}: a positive number of pixels")
        if builtin and (self.pretrained or self.model_options):
            what = "pretrained weights" if self.pretrained else f"model options ({', '.join(self.model_options)})"
            raise UserError(f"{what} apply to torchvision, timm and user models, not the built-in {self.model}")

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
        if values.get("defense_options") or "+" in str(values.get("defense", "")):
            values["defense_options"] = stack.canonical(values.get("defense", "none"), values.get("defense_options"))
        dataset = values.get("dataset", "embedded")
        if isinstance(dataset, str) and dataset.startswith("folder:") and not values.get("data_fingerprint"):
            values["data_fingerprint"] = folder_fingerprint(dataset[len("folder:") :])
        if values.get("weights") and not values.get("weights_digest"):  # a grid digests its file once
            values["weights_digest"] = weights_digest(values["weights"])
        return cls(preset=preset, **values)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        # Run folders written before these fields existed trained without them, on embedded v2.
        values.setdefault("data_version", 2)
        for k in ("label_smoothing", "warmup_epochs", "ema", "noise_warmup"):
            values.setdefault(k, 0.0)
        return cls(**values)

    def identity(self) -> dict[str, Any]:
        d = self.to_dict()
        for k in NON_IDENTITY:
            d.pop(k, None)
        if d["data_fingerprint"] is None:  # keeps the hashes of runs made before the field existed
            del d["data_fingerprint"]
        if d["noise_warmup"] == 0 or d["noise"] == 0:  # no ramp, or nothing to ramp: trains as before it existed
            del d["noise_warmup"]
        for k, default in ADDED_FIELDS.items():
            if d[k] == default:
                del d[k]
        return d

    def hash(self) -> str:
        return config_hash(self.identity())


def _check_types(cfg: TrainConfig) -> None:
    """Refuse values of the wrong type (a damaged config.json, a TOML typo) with one line.
    Numbers are cast to the field's type (1 -> 1.0 for a float), so equal values hash equally."""
    for f in fields(cfg):
        value, allowed = getattr(cfg, f.name), [t.strip() for t in str(f.type).split("|")]
        if value is None:
            ok = "None" in allowed
        elif isinstance(value, bool):
            ok = "bool" in allowed
        elif isinstance(value, numbers.Real) and "float" in allowed:
            value, ok = float(value), True
        elif isinstance(value, numbers.Real) and "int" in allowed:
            ok = isinstance(value, numbers.Integral) or float(value).is_integer()
            value = int(value) if ok else value
        elif isinstance(value, str):
            ok = "str" in allowed
        else:
            ok = isinstance(value, list | tuple) if f.type.startswith("tuple") else isinstance(value, dict)
            ok = ok and f.type.startswith(("tuple", "dict"))
        if not ok:
            want = " or ".join("none" if t == "None" else t.split("[")[0] for t in allowed)
            raise UserError(f"invalid {f.name} {value!r}: expected {want}")
        setattr(cfg, f.name, value)


def weights_digest(path: str) -> str:
    """The sha256 of a --weights file: part of the run's identity (its path is not)."""
    if not os.path.isfile(path):
        raise UserError(f"weights file not found: {path} (expected a state dict saved with torch.save)")
    return file_digest(path)


def config_hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def preset_value(preset: str, key: str) -> Any:
    return PRESETS.get(preset, PRESETS["quick"]).get(key)
