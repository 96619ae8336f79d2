"""The one training loop. Defenses hook into it; none copies it.

SGD with momentum, a per-epoch learning-rate schedule that never hits 0, the data set resident
on the device with batched tensor augmentation, bf16 autocast + channels-last on CUDA, fp32 on
CPU, and optional `torch.compile` in any mode ("reduce-overhead" adds CUDA graphs). Losses are
summed on the device and read once per epoch (no per-step host sync). The model kept is the
last epoch's: nothing is ever selected on the test split.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from privbench.engine import resume
from privbench.engine.config import CUDA_GRAPH_MODES, TrainConfig, config_hash
from privbench.engine.data import Dataset, Split, augment, load_dataset, to_float
from privbench.engine.diagnostics import entropy_bound
from privbench.engine.features import encoder_features, z_spread
from privbench.engine.models import SplitModel, build_model, read_weights, z_kind
from privbench.errors import UserError
from privbench.plugin import stack
from privbench.plugin.base import Defense, TrainContext
from privbench.util.progress import bar as progress_bar
from privbench.util.stats import grouped_mean_ci


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_at(cfg: TrainConfig, epoch: int, step: int = 0, steps: int = 1) -> float:
    """Learning rate of step `step` of `steps` in 0-based `epoch` (the loop sets it per step).

    Cosine is sampled at step starts, so it never reaches 0; multistep changes at epoch starts.
    A linear warm-up over the first `warmup_epochs` scales either; its first step is above 0.
    """
    t = epoch + step / steps
    if cfg.schedule == "cosine":
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * t / cfg.epochs))
    else:
        lr = cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    return lr * min(1.0, (t + 1 / steps) / cfg.warmup_epochs) if cfg.warmup_epochs > 0 else lr


def noise_at(cfg: TrainConfig, epoch: int, step: int = 0, steps: int = 1) -> float:
    """Channel-noise std of training step `step` of `steps` in 0-based `epoch`: a linear ramp from
    0 over the first `noise_warmup` of all steps (its first step is above 0), then `cfg.noise`."""
    ramp = cfg.noise_warmup * cfg.epochs * steps
    return cfg.noise * min(1.0, (epoch * steps + step + 1) / ramp) if ramp > 0 else cfg.noise


@dataclass
class TrainResult:
    model: SplitModel
    defense: Defense
    test_accuracy: float
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    z_stats: dict[str, float] = field(default_factory=dict)  # clean z on the training split
    accuracy: dict[str, Any] = field(default_factory=dict)  # accuracy_stats: CI, groups, draws
    entropy_bound: dict[str, Any] | None = None  # privbench.engine.diagnostics.entropy_bound on the test z


def make_model(cfg: TrainConfig, data: Dataset, *, initial_weights: bool = True) -> SplitModel:
    """The configuration's split model for `data`. With `initial_weights` False the starting
    weights (pretrained, `weights`) are not loaded: Run.load_model then loads the run's checkpoint,
    which holds every weight, without a download or the original file."""
    state = read_weights(cfg.weights, cfg.weights_digest) if cfg.weights and initial_weights else None
    return build_model(
        cfg.model,
        num_classes=data.num_classes,
        cut=cfg.cut,
        bottleneck=cfg.bottleneck,
        noise_std=cfg.noise,
        width=cfg.width,
        image_shape=data.image_shape,
        pretrained=cfg.pretrained and initial_weights,
        options=cfg.model_options,
        state_dict=state,
    )


def attach_defense(model: SplitModel, defense: Defense, image_shape: tuple[int, ...], device: torch.device) -> None:
    """Build the defense's modules for this model's z and route z through its transform, in
    training, when accuracy is measured and in the attacker's view (Run.load_model does the same).
    A defense that does not take this z's kind (map, tokens, vector: Defense.z_kinds) is refused."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        z_shape = tuple(model.encoder(torch.zeros(2, *image_shape, device=device)).shape[1:])
    model.train(was_training)
    stack.check_z_kind(defense, z_kind(z_shape), z_shape)
    defense.build(z_shape, device)
    model.defense_transform = defense.transform if defense.transforms else None
    model.defense_noise = defense.noise if defense.adds_noise else None


def check_trainable(cfg: TrainConfig, data: Dataset, model: SplitModel | None = None) -> SplitModel:
    """Refuse, before any training, what would fail in it: a defense that cannot be built with its
    options, or that does not take the cut's z (built on the CPU). Returns the model so that a
    caller checking several defenses on one model builds it once."""
    defense = stack.create(cfg.defense, cfg.defense_options)
    model = model if model is not None else make_model(cfg, data)
    attach_defense(model, defense, data.image_shape, torch.device("cpu"))
    return model


# The TrainConfig fields that make the model (check_configs builds each distinct one once).
MODEL_FIELDS = (
    "model",
    "cut",
    "bottleneck",
    "width",
    "model_options",
    "pretrained",
    "weights",
    "weights_digest",
    "image_size",
)


def check_configs(configs: list[TrainConfig]) -> None:
    """`check_trainable` for a grid's training configurations before any of them trains: each
    distinct model is built once, and each distinct defense on it once (seeds and channel noise
    do not change whether a defense takes the model's z)."""
    if not configs:
        return
    data = load_data(configs[0], torch.device("cpu"))
    models: dict[str, SplitModel] = {}
    checked: set[tuple[str, str]] = set()
    for cfg in configs:
        key = config_hash({k: getattr(cfg, k) for k in MODEL_FIELDS})
        pair = (key, config_hash([cfg.defense, cfg.defense_options]))
        if pair not in checked:
            checked.add(pair)
            models[key] = check_trainable(cfg, data, models.get(key))


def load_data(cfg: TrainConfig, device: torch.device) -> Dataset:
    data = load_dataset(
        cfg.dataset,
        data_dir=cfg.data_dir,
        seed=cfg.data_seed,
        n_train=cfg.n_train,
        version=cfg.data_version,
        image_size=cfg.image_size,
    )
    return data.to(device)


# Device types that get bf16 autocast and channels-last by default. A CPU gets them only when a
# run asks (`cpu_amp`): they change the numbers, and only CPUs with native bf16 (AVX-512 BF16,
# AMX) run faster with them. Tests add "cpu" here to run the exact GPU branches of the loop.
FAST_PATH_DEVICES: tuple[str, ...] = ("cuda",)


def fast_path(cfg: TrainConfig, device: torch.device) -> tuple[bool, bool]:
    """(bf16 autocast, channels-last) for a run of `cfg` on `device`."""
    fast = device.type in FAST_PATH_DEVICES or (device.type == "cpu" and cfg.cpu_amp)
    return cfg.amp and fast, cfg.channels_last and fast


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


# Tests swap in "aot_eager" to trace the compiled path without minutes of C++ code generation.
COMPILE_BACKEND = "inductor"


def compiled(fn: Callable, mode: str | None) -> Callable:
    """`torch.compile` of a module or function with one graph per batch shape (a full batch
    and the epoch's last one); `fn` itself when `mode` is None.

    A compiled module shares the module's parameters, so checkpoints keep the plain names.
    """
    if mode is None:
        return fn
    if COMPILE_BACKEND != "inductor":  # modes are inductor's
        return torch.compile(fn, backend=COMPILE_BACKEND, dynamic=False)
    return torch.compile(fn, mode=mode, dynamic=False)


# Channel-noise draws per test image: accuracy under a noisy channel is a random variable, and
# its expectation is what a deployment sees. Without noise one pass is exact.
NOISE_DRAWS = 8


@torch.no_grad()
def predictions(
    model: SplitModel, split: Split, *, batch_size: int = 1000, amp: bool = False, draws: int = NOISE_DRAWS
) -> torch.Tensor:
    """[draws, N] predicted classes of the split's images, one row per channel-noise draw (eval
    mode; a single row when the channel adds no noise).

    The encoder runs once per image; only the channel and the server are repeated per draw.
    """
    model.eval()
    device = split.images.device
    draws = draws if model.noise_std > 0 or model.defense_noise is not None else 1
    out = []
    for i in range(0, len(split), batch_size):
        with autocast(device, amp):
            z = model.transform(model.encoder(to_float(split.images[i : i + batch_size])))
            out.append(torch.stack([model.server(model.channel(z)).argmax(1) for _ in range(draws)]))
    return torch.cat(out, 1) if out else torch.zeros(draws, 0, dtype=torch.long, device=device)


def correct_rate(
    model: SplitModel, split: Split, *, batch_size: int = 1000, amp: bool = False, draws: int = NOISE_DRAWS
) -> torch.Tensor:
    """Per image, the fraction of `draws` channel-noise draws classified correctly (eval mode)."""
    return (predictions(model, split, batch_size=batch_size, amp=amp, draws=draws) == split.labels).float().mean(0)


def evaluate(model: SplitModel, split: Split, *, batch_size: int = 1000, amp: bool = False) -> float:
    """Top-1 accuracy in eval mode with the channel noise on (as the defense is deployed),
    averaged over NOISE_DRAWS draws of the noise."""
    return correct_rate(model, split, batch_size=batch_size, amp=amp).mean().item() if len(split) else 0.0


def accuracy_stats(model: SplitModel, split: Split, *, amp: bool = False) -> dict[str, Any]:
    """Expected accuracy with its 95% CI over test images, resampling the split's groups (tiles)."""
    rate = correct_rate(model, split, amp=amp).cpu().tolist()
    groups = split.groups.cpu().tolist() if split.groups is not None else None
    stats = grouped_mean_ci(rate, groups)
    draws = NOISE_DRAWS if model.noise_std > 0 else 1
    return {
        "test_accuracy": stats["mean"],
        "test_accuracy_ci95": stats["ci95"],
        "test_groups": stats["groups"],
        "noise_draws": draws,
    }


class WeightAverage:
    """Exponential moving average of a model's parameters and float buffers, updated per step.

    The decay ramps up as min(decay, (1 + t) / (10 + t)) so early steps do not anchor the average
    to the random initialisation. Integer buffers (BN step counters) are copied.
    """

    def __init__(self, model: torch.nn.Module, decay: float, extra: list[torch.Tensor] = ()):
        # extra: a defense's own trained parameters (a learned transform): averaged with the model,
        # so the kept encoder and the kept transform come from the same average.
        self.decay, self.steps, self.extra = decay, 0, list(extra)
        self.avg = [t.detach().clone() for t in self._tensors(model)]

    def _tensors(self, model: torch.nn.Module) -> list[torch.Tensor]:
        return [*model.parameters(), *model.buffers(), *self.extra]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for a, t in zip(self.avg, self._tensors(model)):
            if a.is_floating_point():
                a.lerp_(t.detach(), 1 - d)
            else:
                a.copy_(t)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for a, t in zip(self.avg, self._tensors(model)):
            t.copy_(a)


def train(
    cfg: TrainConfig,
    *,
    data: Dataset | None = None,
    log: Callable[[str], None] = print,
    checkpoint: Path | None = None,
    resume_from_checkpoint: bool = True,
) -> TrainResult:
    """Train the split model of `cfg` under its defense and report test accuracy.

    With `checkpoint`, the state after every epoch is written there and a run interrupted
    before (same configuration) resumes from it (privbench.engine.resume); a checkpoint that does
    not fit is ignored, and training starts again from scratch.
    """
    blob = resume.read(checkpoint, cfg.hash(), log) if resume_from_checkpoint else None

    def from_scratch(exc: BaseException) -> TrainResult:  # state may be half loaded: build everything anew
        assert checkpoint is not None
        resume.ignoring(checkpoint, exc, log)
        return train(cfg, data=data, log=log, checkpoint=checkpoint, resume_from_checkpoint=False)

    device = pick_device(cfg.device)
    defense = stack.create(cfg.defense, cfg.defense_options)
    seed_everything(cfg.seed)
    data = load_data(cfg, device) if data is None else data.to(device)  # a caller's CPU data set trains on CUDA too
    model = make_model(cfg, data).to(device)
    attach_defense(model, defense, data.image_shape, device)
    use_amp, channels_last = fast_path(cfg, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    opt = torch.optim.SGD(
        [{"params": decay}, {"params": no_decay}],
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=False,
    )
    opt.param_groups[1]["weight_decay"] = cfg.weight_decay  # reference decays every parameter

    def add_parameters(params: list[torch.nn.Parameter], weight_decay: float = 0.0, lr_scale: float = 1.0) -> None:
        # lr_scale: a defense's own module may need a larger step than the schedule's lr.
        opt.add_param_group({"params": list(params), "weight_decay": weight_decay, "lr_scale": lr_scale})

    n = len(data.train)
    steps = math.ceil(n / cfg.batch_size)
    ctx = TrainContext(
        model=model,
        train_images=data.train.images,
        train_labels=data.train.labels,
        num_classes=data.num_classes,
        noise_std=cfg.noise,
        device=device,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        steps_per_epoch=steps,
        seed=cfg.seed,
        add_parameters=add_parameters,
        log=log,
        client=model.client_view(),
    )
    if blob is not None:  # before setup: a defense may build modules from its state and register them
        try:
            defense.load_state_dict(blob["defense"])
        except Exception as exc:
            return from_scratch(exc)
    defense.setup(ctx)
    dev_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    encoder = compiled(model.encoder, cfg.compile_mode)
    server = compiled(model.server, cfg.compile_mode)
    if cfg.compile_mode is not None:
        defense.compile_hot_path(lambda fn: compiled(fn, cfg.compile_mode))
    # CUDA graphs (mode "reduce-overhead") reuse their output buffers: each step must say it is new.
    mark_step = cfg.compile_mode in CUDA_GRAPH_MODES and device.type == "cuda"
    transforms = defense.transforms
    defense_params = [p for group in opt.param_groups[2:] for p in group["params"]]  # added by the defense
    average = WeightAverage(model, cfg.ema, defense_params) if cfg.ema > 0 else None
    loop = resume.LoopState(model, opt, defense, dev_gen, average)
    start, history, done_seconds = 0, [], 0.0
    if blob is not None:
        try:
            start, history, done_seconds = resume.restore(checkpoint, blob, loop, log)
        except Exception as exc:
            return from_scratch(exc)
    t0 = time.perf_counter() - done_seconds
    for epoch in range(start, cfg.epochs):
        lr = lr_at(cfg, epoch, 0, steps)  # the epoch's first step, as logged
        model.train()
        t_epoch = time.perf_counter()
        perm = torch.randperm(n, device=device, generator=dev_gen)
        loss_sum = torch.zeros((), device=device)
        extra_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        bar = progress_bar(range(steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", show=cfg.progress)
        for step in bar:
            step_lr = lr_at(cfg, epoch, step, steps)
            for group in opt.param_groups:
                group["lr"] = step_lr * group.get("lr_scale", 1.0)
            model.noise_std = noise_at(cfg, epoch, step, steps)
            idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            x = to_float(augment(data.train.images[idx], generator=dev_gen))
            y = data.train.labels[idx]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if mark_step:
                torch.compiler.cudagraph_mark_step_begin()
            with autocast(device, use_amp):
                z = encoder(x)
                if transforms:
                    z = defense.transform(z, training=True)
                logits = server(model.channel(z))
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                extra = defense.loss(z, y, epoch=epoch, lr=step_lr, x=x)
            total = loss if extra is None else loss + extra
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            if average is not None:
                average.update(model)
            loss_sum += loss.detach() * len(y)
            if extra is not None:
                extra_sum += extra.detach().float() * len(y)
            correct += (logits.argmax(1) == y).sum()
        model.noise_std = cfg.noise  # evaluation, checkpoints and attacks see the deployed noise
        row: dict[str, float] = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": loss_sum.item() / n,
            "defense_loss": extra_sum.item() / n,
            "train_acc": correct.item() / n,
        }
        if cfg.noise_warmup > 0 and cfg.noise > 0:
            row["channel_noise"] = noise_at(cfg, epoch, steps - 1, steps)  # at the epoch's last step
        bad = defense.nonfinite_part() if transforms else None
        if bad is not None:  # raised before anything of this epoch is saved: no half-written run
            raise UserError(f"defense {bad}: its transform produced NaN or Inf in epoch {epoch + 1}; training stopped")
        if not (math.isfinite(row["train_loss"]) and math.isfinite(row["defense_loss"])):
            raise UserError(
                f"training diverged in epoch {epoch + 1} (defense {cfg.defense}, seed {cfg.seed}): the "
                "loss is NaN or Inf; training stopped and no run folder was written"
            )
        row.update(defense.epoch_end(epoch, ctx))
        row["epoch_seconds"] = time.perf_counter() - t_epoch  # training only: the spread below is not counted
        row.update(epoch_spread(model, data))
        history.append(row)
        if checkpoint is not None:
            resume.save(checkpoint, cfg.hash(), epoch + 1, history, time.perf_counter() - t0, loop)
        log(" ".join(f"{k}={_fmt(v)}" for k, v in row.items()))
    seconds = time.perf_counter() - t0
    if average is not None:
        average.copy_to(model)  # the averaged weights are the model kept, evaluated and attacked
    stats = accuracy_stats(model, data.test, amp=use_amp)
    acc = stats["test_accuracy"]
    model = model.to(memory_format=torch.contiguous_format)
    spread = z_spread(model.client_view(), data.train.images, data.train.labels, data.num_classes)
    kept = kept_defense(defense)
    bound = final_entropy_bound(model, kept, data, cfg.noise)
    ci = stats["test_accuracy_ci95"]
    log(
        f"test_accuracy={acc:.4f}"
        + (f" ±{ci:.4f} ({stats['test_groups']} groups)" if ci is not None else "")
        + f" train_seconds={seconds:.1f} "
        + " ".join(f"{k}={v:.4g}" for k, v in spread.items())
    )
    return TrainResult(model, kept, acc, history, seconds, spread, stats, bound)


def kept_defense(defense: stack.Stack) -> Defense:
    return defense.members[0][1] if defense.single else defense  # a lone defense is itself, not a stack of one


def final_entropy_bound(model: SplitModel, defense: Defense, data: Dataset, noise: float) -> dict[str, Any] | None:
    """Eq. 3's bound from the defense's estimator (gmm-cem's k-means for defenses without one)
    on the clean z of the test images (privbench.engine.diagnostics); None without channel noise."""
    if noise <= 0:
        return None
    z = encoder_features(model.client_view(), data.test.images)
    with torch.random.fork_rng(devices=[z.device] if z.device.type == "cuda" else []):
        return entropy_bound(
            defense, z, data.test.labels, x_dim=math.prod(data.image_shape), noise_std=noise, fallback_clusters=5
        )


SPREAD_IMAGES = 1000  # per-epoch z spread on the first training images: the curves, not the final number


def epoch_spread(model: SplitModel, data: Dataset) -> dict[str, float]:
    """Intra-class and total variance of z (what the defenses' losses see) on SPREAD_IMAGES
    training images, in eval mode, leaving the random streams as they were."""
    device = data.train.images.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return z_spread(
            model.client_view(), data.train.images[:SPREAD_IMAGES], data.train.labels[:SPREAD_IMAGES], data.num_classes
        )


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
