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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from privbench import registry
from privbench.config import CUDA_GRAPH_MODES, TrainConfig
from privbench.data import Dataset, Split, augment, load_dataset, to_float
from privbench.features import z_spread
from privbench.models import SplitModel, build_model
from privbench.plugins import Defense, TrainContext


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate of 0-based `epoch`. Cosine is sampled at epoch starts, so it never reaches 0."""
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
    return cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)


@dataclass
class TrainResult:
    model: SplitModel
    defense: Defense
    test_accuracy: float
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    z_stats: dict[str, float] = field(default_factory=dict)  # clean z on the training split


def make_model(cfg: TrainConfig, data: Dataset) -> SplitModel:
    return build_model(
        cfg.model, num_classes=data.num_classes, cut=cfg.cut, bottleneck=cfg.bottleneck,
        noise_std=cfg.noise, width=cfg.width, image_shape=data.image_shape,
    )  # fmt: skip


def load_data(cfg: TrainConfig, device: torch.device) -> Dataset:
    return load_dataset(cfg.dataset, data_dir=cfg.data_dir, seed=cfg.data_seed, n_train=cfg.n_train).to(device)


# Device types that get bf16 autocast and channels-last. On CPU both usually cost more than they
# save; tests add "cpu" here to run the exact GPU branches of the loop on a CPU-only machine.
FAST_PATH_DEVICES: tuple[str, ...] = ("cuda",)


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type in FAST_PATH_DEVICES)


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


@torch.no_grad()
def evaluate(model: SplitModel, split: Split, *, batch_size: int = 1000, amp: bool = True) -> float:
    """Top-1 accuracy in eval mode with the channel noise on (as the defense is deployed)."""
    model.eval()
    device = split.images.device
    correct = torch.zeros((), device=device, dtype=torch.long)
    for i in range(0, len(split), batch_size):
        with autocast(device, amp):
            logits = model(to_float(split.images[i : i + batch_size]))
        correct += (logits.argmax(1) == split.labels[i : i + batch_size]).sum()
    return correct.item() / max(1, len(split))


def train(
    cfg: TrainConfig,
    *,
    data: Dataset | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train the split model of `cfg` under its defense and report test accuracy."""
    device = pick_device(cfg.device)
    defense = registry.create("defense", cfg.defense, cfg.defense_options)
    seed_everything(cfg.seed)
    data = data if data is not None else load_data(cfg, device)
    model = make_model(cfg, data).to(device)
    use_amp = cfg.amp and device.type in FAST_PATH_DEVICES
    channels_last = cfg.channels_last and device.type in FAST_PATH_DEVICES
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    opt = torch.optim.SGD(
        [{"params": decay}, {"params": no_decay}], lr=cfg.lr, momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, nesterov=False,
    )  # fmt: skip
    opt.param_groups[1]["weight_decay"] = cfg.weight_decay  # reference decays every parameter

    def add_parameters(params: list[torch.nn.Parameter], weight_decay: float = 0.0, lr_scale: float = 1.0) -> None:
        # lr_scale: a defense's own module may need a larger step than the schedule's lr.
        opt.add_param_group({"params": list(params), "weight_decay": weight_decay, "lr_scale": lr_scale})

    n = len(data.train)
    steps = math.ceil(n / cfg.batch_size)
    ctx = TrainContext(
        model=model, train_images=data.train.images, train_labels=data.train.labels,
        num_classes=data.num_classes, noise_std=cfg.noise, device=device, epochs=cfg.epochs,
        batch_size=cfg.batch_size, steps_per_epoch=steps, seed=cfg.seed,
        add_parameters=add_parameters, log=log,
    )  # fmt: skip
    defense.setup(ctx)
    dev_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    encoder = compiled(model.encoder, cfg.compile_mode)
    server = compiled(model.server, cfg.compile_mode)
    if cfg.compile_mode is not None:
        defense.compile_hot_path(lambda fn: compiled(fn, cfg.compile_mode))
    # CUDA graphs (mode "reduce-overhead") reuse their output buffers: each step must say it is new.
    mark_step = cfg.compile_mode in CUDA_GRAPH_MODES and device.type == "cuda"
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        lr = lr_at(cfg, epoch)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        model.train()
        t_epoch = time.perf_counter()
        perm = torch.randperm(n, device=device, generator=dev_gen)
        loss_sum = torch.zeros((), device=device)
        extra_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not cfg.progress)
        for step in bar:
            idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            x = to_float(augment(data.train.images[idx], generator=dev_gen))
            y = data.train.labels[idx]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if mark_step:
                torch.compiler.cudagraph_mark_step_begin()
            with autocast(device, use_amp):
                z = encoder(x)
                logits = server(model.channel(z))
                loss = F.cross_entropy(logits, y)
                extra = defense.loss(z, y, epoch=epoch, lr=lr)
            total = loss if extra is None else loss + extra
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            loss_sum += loss.detach() * len(y)
            if extra is not None:
                extra_sum += extra.detach().float() * len(y)
            correct += (logits.argmax(1) == y).sum()
        row: dict[str, float] = {
            "epoch": epoch + 1, "lr": lr, "train_loss": loss_sum.item() / n,
            "defense_loss": extra_sum.item() / n, "train_acc": correct.item() / n,
        }  # fmt: skip
        row.update(defense.epoch_end(epoch, ctx))
        row["epoch_seconds"] = time.perf_counter() - t_epoch
        history.append(row)
        log(" ".join(f"{k}={_fmt(v)}" for k, v in row.items()))
    seconds = time.perf_counter() - t0
    acc = evaluate(model, data.test, amp=use_amp)
    model = model.to(memory_format=torch.contiguous_format)
    spread = z_spread(model.encoder, data.train.images, data.train.labels, data.num_classes)
    log(f"test_accuracy={acc:.4f} train_seconds={seconds:.1f} " + " ".join(f"{k}={v:.4g}" for k, v in spread.items()))
    return TrainResult(model, defense, acc, history, seconds, spread)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
