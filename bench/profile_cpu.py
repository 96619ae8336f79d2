"""Where the main job's CPU time goes, and what each speed lever buys: a profile, no library change.

    python bench/profile_cpu.py               # quick: every section, 3 reps (~8 min on 2 quiet cores)
    python bench/profile_cpu.py --full        # 5 reps, longer blocks, compile + channels_last arms (~15 min)
    OMP_WAIT_POLICY=PASSIVE python bench/profile_cpu.py --threads 1 --sections train,attack
    python bench/profile_cpu.py --sections train,exact --reps 5 --steps 30
    python bench/profile_cpu.py --sections ceiling --reps 1 --json profile.json

A cold inductor cache adds about 2 min to the first run with compile arms.

Sections (each prints its table, load average before and after, and goes into the JSON):
  ceiling  matmul GFLOP/s (1024^3 fp32, 1 and 2 threads) and conv2d throughput at the model's layer shapes
  train    the quick preset's training step (privbench's own loop rebuilt from its pieces: augment,
           lr/noise schedule, label smoothing, channel noise, weight average), per-phase breakdown,
           torch.profiler top ops, and every lever side by side, interleaved, several repetitions
  omp      the same step in subprocesses: OMP_WAIT_POLICY default/PASSIVE/ACTIVE, and two one-thread
           processes at once against one two-thread process (aggregate images/s)
  eval     the per-run evaluation after training (8-draw accuracy, z spread, entropy bound, checkpoints)
  attack   decoder and optimization cells: phases (fit, reconstruct, SSIM/PSNR/LPIPS, sem_acc) and levers
  fixed    process start, imports, data set build/load, model save/load, LPIPS construction
  exact    which levers keep numbers: a tiny training per lever, loss curve and weights against eager NCHW
           (step-1 loss difference = the lever's rounding; later steps = its amplification by training)

On a shared box the two-thread figures swing by 2-20x whenever another job runs (OpenMP threads
spin on a busy core); `--threads 1` with OMP_WAIT_POLICY=PASSIVE gives ratios that hold there.

Every ratio is measured in one process with the variants interleaved (A B C A B C ...), so a
drifting machine moves all arms alike; medians and (max-min)/median spreads are reported.
Nothing here changes the library. The data set cache (PRIVBENCH_CACHE) defaults to
privbench-profile-cache in the temporary directory, so a cold build can be timed without touching
the user's cache; the JSON goes to profile_cpu.json there unless --json names another file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from privbench.attack.harness import eval_indices, make_target
from privbench.attack.metrics import lpips_distance, psnr, score, ssim
from privbench.attack.semantic import predict
from privbench.engine import resume
from privbench.engine.config import PRESETS, TrainConfig
from privbench.engine.data import augment, embedded, to_float
from privbench.engine.features import z_spread
from privbench.engine.inverse import InverseNet, total_variation
from privbench.engine.models import build_model
from privbench.engine.train import (
    WeightAverage,
    accuracy_stats,
    attach_defense,
    epoch_spread,
    final_entropy_bound,
    kept_defense,
    load_data,
    lr_at,
    make_model,
    noise_at,
)
from privbench.engine.train import train as train_model
from privbench.plugin import registry, stack
from privbench.plugin.base import TrainContext
from privbench.util.storage import atomic_write_bytes, load_checkpoint, tensor_bytes

os.environ.setdefault("PRIVBENCH_CACHE", os.path.join(tempfile.gettempdir(), "privbench-profile-cache"))
REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = os.path.join(tempfile.gettempdir(), "profile_cpu.json")

# --------------------------------------------------------------------------------- helpers

CPU = torch.device("cpu")
RESULTS: dict[str, Any] = {}


def load() -> tuple[float, float, float]:
    return tuple(round(x, 2) for x in os.getloadavg())  # type: ignore[return-value]


def summary(xs: list[float]) -> dict[str, float]:
    med = statistics.median(xs)
    return {
        "median": med,
        "min": min(xs),
        "max": max(xs),
        "n": len(xs),
        "spread": (max(xs) - min(xs)) / med if med else 0.0,
    }


def fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = [
        f"\n## {title}",
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


@contextlib.contextmanager
def threads(n: int | None):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def section(name: str):
    l0, t0, c0 = load(), time.perf_counter(), time.process_time()
    print(f"\n# section {name}: load average {l0}, {torch.get_num_threads()} threads", flush=True)
    out: dict[str, Any] = {}
    try:
        yield out
    finally:
        l1, wall, cpu = load(), time.perf_counter() - t0, time.process_time() - c0
        out["load_before"], out["load_after"], out["wall_s"], out["cpu_s"] = l0, l1, wall, cpu
        RESULTS[name] = out
        print(f"# section {name} done: {wall:.1f} s wall, {cpu:.1f} s CPU (this process), load {l1}", flush=True)


def lever_rows(
    res: dict[str, list[float]], states: dict[str, Any], *, digits: int, per_200_steps: bool = False
) -> tuple[list[list[str]], dict[str, dict[str, float]]]:
    """Table rows (variant, median rate, range, ratio to "eager (library)"[, seconds per 200 steps],
    compile seconds) and the JSON summary of interleaved lever arms; `states[k].compile_s` is 0
    for an arm that does not compile."""
    base = summary(res["eager (library)"])["median"]
    rows, summaries = [], {}
    for k, v in res.items():
        sm = summary(v)
        summaries[k] = sm | {"ratio": sm["median"] / base}
        row = [
            k,
            f"{sm['median']:.{digits}f}",
            f"{sm['min']:.{digits}f}-{sm['max']:.{digits}f}",
            f"{sm['median'] / base:.2f}x",
        ]
        if per_200_steps:
            row.append(f"{200 / sm['median']:.1f}")
        rows.append(row + [f"{states[k].compile_s:.1f}" if states[k].compile_s else ""])
    return rows, summaries


def interleave(arms: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Call each arm once per repetition, in turn (A B C A B C ...); each returns a rate."""
    out: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(reps):
        for k, fn in arms.items():
            out[k].append(fn())
    return out


# ------------------------------------------------------------------------------- 1 ceiling


def bench_matmul(n: int, reps: int) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


CONV_SHAPES = [  # (name, batch, cin, cout, size): the quarter-width VGG11's convolutions at batch 64
    ("enc conv1 3->16 @32", 64, 3, 16, 32),
    ("enc conv2 16->32 @16", 64, 16, 32, 16),
    ("srv conv 32->64 @8", 64, 32, 64, 8),
    ("srv conv 64->64 @8", 64, 64, 64, 8),
    ("srv conv 128->128 @4", 64, 128, 128, 4),
    ("dec convT 32->32 @16->32", 64, 32, 32, 16),
]


def bench_conv(
    batch: int, cin: int, cout: int, size: int, reps: int, *, cl: bool, train: bool, transposed=False
) -> float:
    if transposed:
        conv = torch.nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1, bias=False)
        out_size = size * 2
    else:
        conv = torch.nn.Conv2d(cin, cout, 3, padding=1)
        out_size = size
    x = torch.randn(batch, cin, size, size, requires_grad=train)
    if cl:
        conv = conv.to(memory_format=torch.channels_last)
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(train)
    flops = 2 * batch * cin * cout * 9 * (out_size**2 if not transposed else size**2) * (3 if train else 1)

    def once():
        y = conv(x)
        if train:
            y.sum().backward()

    once()
    t = time.perf_counter()
    for _ in range(reps):
        once()
    return flops * reps / (time.perf_counter() - t) / 1e9


def run_ceiling(args) -> None:
    with section("ceiling") as out:
        arms = {}
        for nt in (1, 2):

            def mm(nt=nt):
                with threads(nt):
                    return bench_matmul(1024, 10 if args.full else 5)

            arms[f"matmul 1024 fp32, {nt} thr"] = mm
        res = interleave(arms, args.reps)
        rows = [[k, fmt(summary(v)["median"]), f"{summary(v)['spread']:.2f}"] for k, v in res.items()]
        out["matmul"] = {k: summary(v) for k, v in res.items()}
        conv_rows, conv_res = [], {}
        conv_reps = 10 if args.full else 5
        for name, b, cin, cout, size in CONV_SHAPES:
            tr = name.startswith("dec")
            arms = {}
            for cl in (False, True):
                for train in (False, True):

                    def conv_arm(b=b, cin=cin, cout=cout, size=size, cl=cl, train=train, tr=tr):
                        return bench_conv(b, cin, cout, size, conv_reps, cl=cl, train=train, transposed=tr)

                    arms[(cl, train)] = conv_arm
            r = interleave(arms, max(2, args.reps - 1))
            m = {k: summary(v)["median"] for k, v in r.items()}
            conv_res[name] = {f"{'cl' if k[0] else 'nchw'}_{'fwdbwd' if k[1] else 'fwd'}": v for k, v in m.items()}
            conv_rows.append(
                [name, fmt(m[(False, False)]), fmt(m[(True, False)]), fmt(m[(False, True)]), fmt(m[(True, True)])]
            )
        out["conv_gflops"] = conv_res
        out["text"] = table("matmul ceiling (GFLOP/s, median over reps)", ["what", "GFLOP/s", "spread"], rows)
        out["text"] += table(
            "conv2d GFLOP/s at the model's shapes (batch 64, 2 threads)",
            ["layer", "fwd NCHW", "fwd CL", "fwd+bwd NCHW", "fwd+bwd CL"],
            conv_rows,
        )


# -------------------------------------------------------------------------------- 2 training


def quick_config(**over: Any):
    base = dict(bottleneck=8, noise=0.025, defense="none", progress=False, device="cpu")
    base.update(over)
    return TrainConfig.from_preset("quick", **base)


_DATA: dict[Any, Any] = {}


def get_data(cfg):
    key = (cfg.dataset, cfg.data_seed, cfg.n_train, cfg.data_version)
    if key not in _DATA:
        _DATA[key] = load_data(cfg, CPU)
    return _DATA[key]


def channel_nchw_noise(model, z: torch.Tensor) -> torch.Tensor:
    """SplitModel.channel with the Gaussian drawn in NCHW order whatever z's layout (proposed fix)."""
    if model.defense_noise is not None:
        z = model.defense_noise(z, training=model.encoder.training)
    if model.noise_std > 0:
        return z + model.noise_std * torch.randn_like(z, memory_format=torch.contiguous_format)
    return z


class ForeachAverage:
    """privbench's WeightAverage with the per-tensor loop replaced by one _foreach_lerp_."""

    def __init__(self, inner):
        self.inner = inner
        self.pairs = None

    def update(self, model) -> None:
        w = self.inner
        w.steps += 1
        d = min(w.decay, (1 + w.steps) / (10 + w.steps))
        if self.pairs is None:
            cur = w._tensors(model)
            self.fa = [a for a in w.avg if a.is_floating_point()]
            self.ft = [t.detach() for a, t in zip(w.avg, cur) if a.is_floating_point()]
            self.ia = [a for a in w.avg if not a.is_floating_point()]
            self.it = [t for a, t in zip(w.avg, cur) if not a.is_floating_point()]
            self.pairs = True
        with torch.no_grad():
            torch._foreach_lerp_(self.fa, self.ft, 1 - d)
            for a, t in zip(self.ia, self.it):
                a.copy_(t)

    def copy_to(self, model) -> None:
        self.inner.copy_to(model)


@dataclass(frozen=True)
class Variant:
    name: str
    channels_last: bool = False
    compile: str | None = None  # inductor mode
    opt: str = "default"  # default | foreach | fused
    ema: str = "loop"  # loop | foreach | off
    batch: int = 64
    threads: int | None = None  # None: the process's
    mkldnn: bool = True
    sync: bool = False  # per-step loss.item() and a live tqdm bar
    fallback_random: bool = False  # inductor: eager RNG, for bit comparisons
    # channels_last: torch.randn_like(z) follows z's memory layout, so the same stream lands on other
    # elements; True draws the channel noise in NCHW order (the same numbers as the NCHW loop)
    cl_noise_fix: bool = False
    bf16: bool = False  # bf16 autocast on the CPU (AVX512_BF16 / AMX machines); changes numbers


class TrainState:
    """One model + optimizer + weight average + streams, stepped like privbench.engine.train.train's loop."""

    def __init__(self, v: Variant, cfg, data, seed: int = 0, warm_compile: bool = True):
        t0 = time.perf_counter()
        self.v, self.data = v, data
        lr_scale = v.batch / cfg.batch_size
        self.cfg = cfg = replace(cfg, batch_size=v.batch, lr=cfg.lr * lr_scale) if v.batch != cfg.batch_size else cfg
        torch.manual_seed(seed)
        self.defense = stack.create(cfg.defense, cfg.defense_options)
        model = make_model(cfg, data)
        attach_defense(model, self.defense, data.image_shape, CPU)
        if v.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if v.cl_noise_fix:
            model.channel = lambda z, m=model: channel_nchw_noise(m, z)
        self.model = model
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        kw = {"foreach": True} if v.opt == "foreach" else {"fused": True} if v.opt == "fused" else {}
        self.opt = torch.optim.SGD(
            [{"params": decay}, {"params": no_decay}],
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=False,
            **kw,
        )
        self.n = len(data.train)
        self.steps = math.ceil(self.n / cfg.batch_size)
        ctx = TrainContext(
            model=model,
            train_images=data.train.images,
            train_labels=data.train.labels,
            num_classes=data.num_classes,
            noise_std=cfg.noise,
            device=CPU,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            steps_per_epoch=self.steps,
            seed=seed,
            add_parameters=lambda *a, **k: None,
            log=lambda _: None,
            client=model.client_view(),
        )
        self.defense.setup(ctx)
        self.gen = torch.Generator().manual_seed(seed)
        self.encoder, self.server = model.encoder, model.server
        self.compile_s = 0.0
        if v.compile:
            import torch._inductor.config as ic

            ic.fallback_random = v.fallback_random
            torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
            self.encoder = torch.compile(model.encoder, mode=v.compile, dynamic=False)
            self.server = torch.compile(model.server, mode=v.compile, dynamic=False)
        avg = WeightAverage(model, cfg.ema) if cfg.ema > 0 and v.ema != "off" else None
        self.average = ForeachAverage(avg) if (avg is not None and v.ema == "foreach") else avg
        self.epoch, self.step_i = 0, 0
        self.perm = torch.randperm(self.n, generator=self.gen)
        self.losses: list[float] = []
        self.bar = None
        if v.sync:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=10**9, file=open(os.devnull, "w"), mininterval=0.1)
        self.build_s = time.perf_counter() - t0
        if v.compile and warm_compile:  # compile both graphs the real loop meets: a full batch and the epoch's last one
            t1 = time.perf_counter()
            self.step(full_only=True)
            self.compile_full_s = time.perf_counter() - t1
            last = self.n - (self.steps - 1) * cfg.batch_size
            t1 = time.perf_counter()
            if last != cfg.batch_size:
                self.step(indices=self.perm[:last])
            self.compile_last_s = time.perf_counter() - t1
            self.compile_s = self.compile_full_s + self.compile_last_s

    def ctxs(self):
        stack = contextlib.ExitStack()
        if self.v.threads:
            stack.enter_context(threads(self.v.threads))
        if not self.v.mkldnn:
            stack.enter_context(torch.backends.mkldnn.flags(enabled=False))
        return stack

    def step(self, *, full_only: bool = True, indices: torch.Tensor | None = None, timers: dict | None = None) -> None:
        cfg, v, model = self.cfg, self.v, self.model
        clock = time.perf_counter
        t0 = clock()
        if indices is None:
            if self.step_i >= self.steps or (full_only and (self.step_i + 1) * cfg.batch_size > self.n):
                self.epoch, self.step_i = self.epoch + 1, 0
                self.perm = torch.randperm(self.n, generator=self.gen)
            step = self.step_i
            idx = self.perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            self.step_i += 1
        else:
            step, idx = 0, indices
        epoch = min(self.epoch, cfg.epochs - 1)
        model.train()
        step_lr = lr_at(cfg, epoch, step, self.steps)
        for group in self.opt.param_groups:
            group["lr"] = step_lr * group.get("lr_scale", 1.0)
        model.noise_std = noise_at(cfg, epoch, step, self.steps)
        x = to_float(augment(self.data.train.images[idx], generator=self.gen))
        y = self.data.train.labels[idx]
        if v.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        t1 = clock()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=v.bf16):
            z = self.encoder(x)
            if self.defense.transforms:
                z = self.defense.transform(z, training=True)
            logits = self.server(model.channel(z))
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            extra = self.defense.loss(z, y, epoch=epoch, lr=step_lr, x=x)
        total = loss if extra is None else loss + extra
        t2 = clock()
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        t3 = clock()
        self.opt.step()
        t4 = clock()
        if self.average is not None:
            self.average.update(model)
        t5 = clock()
        self.loss_sum = loss.detach() * len(y)
        self.correct = (logits.argmax(1) == y).sum()
        if v.sync:
            self.losses.append(loss.item())
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{self.losses[-1]:.3f}", refresh=False)
        else:
            self.losses.append(loss.detach())
        t6 = clock()
        if timers is not None:
            for k, a, b in (
                ("data", t0, t1),
                ("forward", t1, t2),
                ("backward", t2, t3),
                ("optimizer", t3, t4),
                ("ema", t4, t5),
                ("bookkeeping", t5, t6),
            ):
                timers[k] = timers.get(k, 0.0) + (b - a)

    def rate(self, k: int) -> float:
        """Images per second over k full-batch steps."""
        with self.ctxs():
            t = time.perf_counter()
            for _ in range(k):
                self.step()
            return k * self.cfg.batch_size / (time.perf_counter() - t)


def train_variants(full: bool) -> list[Variant]:
    vs = [
        Variant("eager (as the loop on CPU)"),
        Variant("channels_last", channels_last=True),
        Variant("channels_last, noise drawn NCHW", channels_last=True, cl_noise_fix=True),
        Variant("SGD foreach=True", opt="foreach"),
        Variant("SGD fused=True", opt="fused"),
        Variant("EMA one _foreach_lerp_", ema="foreach"),
        Variant("EMA off (changes numbers)", ema="off"),
        Variant("1 thread", threads=1),
        Variant("per-step .item() + tqdm", sync=True),
        Variant("batch 128, lr x2 (changes numbers)", batch=128),
        Variant("batch 256, lr x4 (changes numbers)", batch=256),
        Variant("fused SGD + foreach EMA", opt="fused", ema="foreach"),
        Variant("bf16 autocast (changes numbers)", bf16=True),
        Variant("bf16 autocast + channels_last (changes numbers)", bf16=True, channels_last=True, cl_noise_fix=True),
        Variant("compile (inductor default)", compile="default"),
        Variant("compile + fused SGD + foreach EMA", compile="default", opt="fused", ema="foreach"),
    ]
    if full:
        vs += [
            Variant("compile + channels_last", compile="default", channels_last=True),
            Variant("channels_last + fused + foreach EMA", channels_last=True, opt="fused", ema="foreach"),
        ]
    return vs


def run_train(args) -> None:
    with section("train") as out:
        cfg = quick_config()
        data = get_data(cfg)
        out["config"] = {
            "batch": cfg.batch_size,
            "lr": cfg.lr,
            "ema": cfg.ema,
            "label_smoothing": cfg.label_smoothing,
            "width": cfg.width,
            "noise": cfg.noise,
            "bottleneck": cfg.bottleneck,
            "steps_per_epoch": math.ceil(len(data.train) / cfg.batch_size),
            "epochs": cfg.epochs,
        }
        # Per-phase breakdown of the eager step.
        st = TrainState(Variant("eager"), cfg, data)
        for _ in range(3):
            st.step()
        timers: dict[str, float] = {}
        k = args.steps * 2
        t = time.perf_counter()
        for _ in range(k):
            st.step(timers=timers)
        total = time.perf_counter() - t
        rows = [[p, f"{1000 * s / k:.2f}", f"{100 * s / total:.1f}%"] for p, s in timers.items()]
        rows.append(["step total", f"{1000 * total / k:.2f}", f"{k * cfg.batch_size / total:.0f} img/s"])
        out["breakdown_ms"] = {p: 1000 * s / k for p, s in timers.items()} | {"total": 1000 * total / k}
        text = table(
            f"eager step breakdown (batch {cfg.batch_size}, {k} steps, {torch.get_num_threads()} threads)",
            ["phase", "ms/step", "share"],
            rows,
        )
        # Data path detail: indexing, augmentation, to_float.
        idx = st.perm[:64]
        reps = 200
        t = time.perf_counter()
        for _ in range(reps):
            u = data.train.images[idx]
        t_idx = (time.perf_counter() - t) / reps
        t = time.perf_counter()
        for _ in range(reps):
            a = augment(u, generator=st.gen)
        t_aug = (time.perf_counter() - t) / reps
        t = time.perf_counter()
        for _ in range(reps):
            to_float(a)
        t_float = (time.perf_counter() - t) / reps
        out["data_ms"] = {"index": 1000 * t_idx, "augment": 1000 * t_aug, "to_float": 1000 * t_float}
        text += table(
            "data path per batch of 64", ["part", "ms"], [[k2, f"{v2:.3f}"] for k2, v2 in out["data_ms"].items()]
        )
        # torch.profiler: top ops by self CPU time over a few steps.
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                st.step()
        ka = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        tot = sum(e.self_cpu_time_total for e in ka)
        top = [
            [
                e.key,
                e.count // 10,
                f"{e.self_cpu_time_total / 10 / 1000:.2f}",
                f"{100 * e.self_cpu_time_total / tot:.1f}%",
            ]
            for e in ka[:16]
        ]
        out["profiler_top"] = top
        out["aten_calls_per_step"] = sum(e.count for e in ka) / 10
        text += table(
            f"torch.profiler, top ops by self CPU (per step; {out['aten_calls_per_step']:.0f} op calls per step)",
            ["op", "calls", "ms", "share"],
            top,
        )
        del st

        # The library's own loop, 2 epochs: its epoch time (2nd epoch) against the replica's step rate,
        # and the whole call (evaluation, z statistics, entropy bound included).
        t = time.perf_counter()
        result = train_model(replace(cfg, epochs=2), data=data, log=lambda _: None)
        t_call = time.perf_counter() - t
        ep = [row["epoch_seconds"] for row in result.history]
        steps = math.ceil(len(data.train) / cfg.batch_size)
        out["library_train_2_epochs"] = {
            "call_s": t_call,
            "epoch_s": ep,
            "train_s": result.seconds,
            "img_per_s_epoch2": len(data.train) / ep[-1],
        }
        text += table(
            "privbench's train(), 2 epochs (same data and settings)",
            ["what", "s"],
            [
                ["epoch 1 / epoch 2 (training only)", f"{ep[0]:.2f} / {ep[1]:.2f}"],
                ["epoch 2 images/s", f"{len(data.train) / ep[1]:.0f}"],
                ["replica step breakdown x steps/epoch", f"{out['breakdown_ms']['total'] * steps / 1000:.2f}"],
                ["whole call", f"{t_call:.2f}"],
                ["call - result.seconds (evaluation after training)", f"{t_call - result.seconds:.2f}"],
            ],
        )

        # Levers side by side.
        states: dict[str, TrainState] = {}
        compile_rows = []
        for v in train_variants(args.full):
            if v.compile and args.no_compile:
                continue
            print(f"  building {v.name} ...", flush=True)
            s = TrainState(v, cfg, data)
            for _ in range(3):
                s.step()
            states[v.name] = s
            if v.compile:
                compile_rows.append([v.name, f"{s.compile_full_s:.1f}", f"{s.compile_last_s:.1f}"])
        res = interleave({name: (lambda s=s: s.rate(args.steps)) for name, s in states.items()}, args.reps)
        base = summary(res[next(iter(res))])["median"]
        rows = []
        out["levers"] = {}
        for name, rates in res.items():
            sm = summary(rates)
            out["levers"][name] = sm | {"ratio": sm["median"] / base}
            best = summary(res[next(iter(res))])["max"]
            rows.append(
                [
                    name,
                    f"{sm['median']:.0f}",
                    f"{sm['min']:.0f}-{sm['max']:.0f}",
                    f"{sm['spread']:.2f}",
                    f"{sm['median'] / base:.2f}x",
                    f"{sm['max'] / best:.2f}x",
                ]
            )
        text += table(
            f"training levers, images/s ({args.reps} interleaved reps x {args.steps} steps, "
            f"{torch.get_num_threads()} threads)",
            ["variant", "median img/s", "range", "spread", "vs eager (median)", "vs eager (best)"],
            rows,
        )
        if compile_rows:
            out["compile_s"] = compile_rows
            text += table(
                "compile time (s): first full batch, first last-batch (recompile)",
                ["variant", "full", "last"],
                compile_rows,
            )
        out["text"] = text


# --------------------------------------------------------------------------- 2b OMP / procs

WORKER_SNIPPET = r"""
import importlib.util, json, sys
sys.argv = ['w']
spec = importlib.util.spec_from_file_location('profile_cpu', {path!r})
pc = sys.modules['profile_cpu'] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pc)
import torch
cfg = pc.quick_config(); data = pc.get_data(cfg)
s = pc.TrainState(pc.Variant('w'), cfg, data)
for _ in range(3): s.step()
rates = [s.rate({steps}) for _ in range({reps})]
print('RESULT', json.dumps({{'rates': rates, 'threads': torch.get_num_threads()}}))
"""


def spawn(env_over: dict[str, str], steps: int, reps: int) -> subprocess.Popen:
    env = dict(os.environ)
    for k, v in env_over.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    code = WORKER_SNIPPET.format(path=str(Path(__file__).resolve()), steps=steps, reps=reps)
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def collect(p: subprocess.Popen) -> dict:
    so, se = p.communicate()
    for line in so.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"worker failed: {se[-2000:]}")


def run_omp(args) -> None:
    with section("omp") as out:
        arms = {
            "2 threads, OMP_WAIT_POLICY unset": [{"OMP_WAIT_POLICY": None, "OMP_NUM_THREADS": "2"}],
            "2 threads, PASSIVE": [{"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "2"}],
            "2 threads, ACTIVE": [{"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "2"}],
            "two 1-thread processes at once (sum)": [{"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}] * 2,
        }
        res: dict[str, list[float]] = {k: [] for k in arms}
        for _ in range(args.omp_reps):
            for name, envs in arms.items():
                procs = [spawn(e, args.steps, 2) for e in envs]
                results = [collect(p) for p in procs]
                # per process: median of its reps; the arm's figure: the sum over its processes
                res[name].append(sum(statistics.median(r["rates"]) for r in results))
        base = summary(res[next(iter(res))])["median"]
        rows = []
        for name, rates in res.items():
            sm = summary(rates)
            out[name] = sm | {"ratio": sm["median"] / base}
            rows.append(
                [name, f"{sm['median']:.0f}", f"{sm['min']:.0f}-{sm['max']:.0f}", f"{sm['median'] / base:.2f}x"]
            )
        out["text"] = table(
            f"subprocess training step, aggregate images/s ({args.omp_reps} interleaved reps)",
            ["arm", "median img/s", "range", "vs first"],
            rows,
        )


# -------------------------------------------------------------------------------- 3 evaluation


def trained_state(epochs_of_steps: int = 20) -> TrainState:
    cfg = quick_config()
    s = TrainState(Variant("eval"), cfg, get_data(cfg))
    for _ in range(epochs_of_steps):
        s.step()
    s.average.copy_to(s.model) if s.average is not None else None
    s.model.noise_std = cfg.noise
    return s


@torch.no_grad()
def predictions_variant(model, split, *, draws: int, batch_size: int = 1000, inference: bool = False, cl: bool = False):
    ctx = torch.inference_mode() if inference else contextlib.nullcontext()
    with ctx:
        model.eval()
        out = []
        for i in range(0, len(split), batch_size):
            x = to_float(split.images[i : i + batch_size])
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            z = model.transform(model.encoder(x))
            out.append(torch.stack([model.server(model.channel(z)).argmax(1) for _ in range(draws)]))
        return torch.cat(out, 1)


def timed(fn: Callable[[], Any], reps: int = 1) -> tuple[float, Any]:
    r = None
    xs = []
    for _ in range(reps):
        t = time.perf_counter()
        r = fn()
        xs.append(time.perf_counter() - t)
    return statistics.median(xs), r


def run_eval(args) -> None:
    with section("eval") as out:
        s = trained_state(20)
        model, data, cfg = s.model, s.data, s.cfg
        reps = 3
        rows = []
        t_acc, stats = timed(lambda: accuracy_stats(model, data.test, amp=False), reps)
        rows.append(["accuracy_stats: 8 draws x 2,000 test images (once per run)", f"{t_acc:.3f}", "1", f"{t_acc:.2f}"])
        t_sp, _ = timed(lambda: epoch_spread(model, data), reps)
        rows.append(
            [
                "epoch_spread: z stats on 1,000 train images (per epoch)",
                f"{t_sp:.3f}",
                str(cfg.epochs),
                f"{t_sp * cfg.epochs:.2f}",
            ]
        )
        t_zs, _ = timed(
            lambda: z_spread(model.client_view(), data.train.images, data.train.labels, data.num_classes), reps
        )
        rows.append(["z_spread on 5,000 train images (once)", f"{t_zs:.3f}", "1", f"{t_zs:.2f}"])
        t_eb, _ = timed(lambda: final_entropy_bound(model, kept_defense(s.defense), data, cfg.noise), 2)
        rows.append(["final_entropy_bound (k-means fallback, test z)", f"{t_eb:.3f}", "1", f"{t_eb:.2f}"])
        loop = resume.LoopState(
            model, s.opt, s.defense, s.gen, s.average.inner if isinstance(s.average, ForeachAverage) else s.average
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "ck.pt"
            t_ck, _ = timed(lambda: resume.save(path, cfg.hash(), 1, [], 0.0, loop), reps)
            size = path.stat().st_size
        rows.append(
            [
                f"resume.save epoch checkpoint ({size / 1e6:.1f} MB, per epoch)",
                f"{t_ck:.3f}",
                str(cfg.epochs),
                f"{t_ck * cfg.epochs:.2f}",
            ]
        )
        out["rows"] = rows
        text = table(
            "per-run evaluation after (and around) training", ["what", "s per call", "calls/run", "s per run"], rows
        )
        # Levers on the 8-draw accuracy.
        arms = {
            "no_grad, 8 draws (library)": lambda: predictions_variant(model, data.test, draws=8),
            "inference_mode, 8 draws": lambda: predictions_variant(model, data.test, draws=8, inference=True),
            "no_grad, 8 draws, batch 2000": lambda: predictions_variant(model, data.test, draws=8, batch_size=2000),
            "no_grad, 4 draws (changes numbers)": lambda: predictions_variant(model, data.test, draws=4),
            "no_grad, 1 draw (changes numbers)": lambda: predictions_variant(model, data.test, draws=1),
        }
        res = interleave({k: (lambda f=f: timed(f)[0]) for k, f in arms.items()}, reps)
        rows2 = [[k, f"{summary(v)['median']:.3f}", f"{summary(v)['spread']:.2f}"] for k, v in res.items()]
        out["predictions"] = {k: summary(v) for k, v in res.items()}
        torch.manual_seed(1)
        a = predictions_variant(model, data.test, draws=8)
        torch.manual_seed(1)
        b = predictions_variant(model, data.test, draws=8, inference=True)
        out["inference_mode_identical"] = bool(torch.equal(a, b))
        text += table(
            f"8-draw predictions on the test split (s; inference_mode identical: {out['inference_mode_identical']})",
            ["variant", "s", "spread"],
            rows2,
        )
        out["text"] = text


# ---------------------------------------------------------------------------------- 4 attacks


def attack_setup():
    """A target from a briefly trained quick model, the attacker's images, the evaluation images."""
    s = trained_state(10)
    target = make_target(s.model, s.data.image_shape, CPU)
    attacker_x = to_float(s.data.train.images)
    eval_x = to_float(s.data.test.images[:256])
    return s, target, attacker_x, eval_x


class DecoderState:
    def __init__(
        self,
        target,
        images,
        *,
        channels_last=False,
        compile=False,
        thr=None,
        batch=64,
        opt="default",
        channels=32,
        blocks=2,
        lr=3e-3,
        seed=0,
    ):
        torch.manual_seed(seed)
        self.net = InverseNet(target.z_shape(), target.image_shape, channels=channels, blocks=blocks)
        self.cl, self.thr, self.batch, self.images, self.target = channels_last, thr, batch, images, target
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        kw = {"foreach": True} if opt == "foreach" else {"fused": True} if opt == "fused" else {}
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr, weight_decay=1e-4, **kw)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.opt, 6 * math.ceil(len(images) / batch), eta_min=1e-5
        )
        self.fwd = torch.compile(self.net, dynamic=False) if compile else self.net
        self.gen = torch.Generator().manual_seed(seed)
        self.i = 0
        self.perm = torch.randperm(len(images), generator=self.gen)
        self.net.train()
        self.losses = []
        self.compile_s = 0.0
        if compile:
            t = time.perf_counter()
            self.step()
            self.compile_s = time.perf_counter() - t

    def step(self):
        if (self.i + 1) * self.batch > len(self.images):
            self.i, self.perm = 0, torch.randperm(len(self.images), generator=self.gen)
        x = self.images[self.perm[self.i * self.batch : (self.i + 1) * self.batch]]
        self.i += 1
        z = self.target.query(x)
        if self.cl:
            z = z.contiguous(memory_format=torch.channels_last)
        loss = F.mse_loss(self.fwd(z), x)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.losses.append(loss.detach())

    def rate(self, k):
        with threads(self.thr):
            t = time.perf_counter()
            for _ in range(k):
                self.step()
            return k * self.batch / (time.perf_counter() - t)


class OptState:
    def __init__(self, target, z, start, *, channels_last=False, compile=False, thr=None, lr=0.2, tv=0.2):
        self.target, self.z, self.thr, self.tv, self.tv_fn = target, z, thr, tv, total_variation
        enc = target.encoder
        if channels_last:  # a copy: the other arms keep the NCHW encoder
            import copy

            enc = copy.deepcopy(enc).to(memory_format=torch.channels_last)
        self.enc = torch.compile(enc, dynamic=False) if compile else enc
        self.cl = channels_last
        s = start.clamp(0.02, 0.98).expand(len(z), *target.image_shape)
        self.w = torch.logit(s).clone().requires_grad_(True)
        if channels_last:
            self.w = self.w.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
        self.opt = torch.optim.Adam([self.w], lr=lr)
        self.scale = z.flatten(1).pow(2).sum(1).clamp_min(1e-12)
        self.compile_s = 0.0
        if compile:
            t = time.perf_counter()
            self.step()
            self.compile_s = time.perf_counter() - t

    def step(self):
        x = torch.sigmoid(self.w)
        zz = self.enc(x)
        if self.target.transform is not None:
            zz = self.target.transform(zz)
        if self.target.noise_std > 0:
            zz = zz + self.target.noise_std * torch.randn_like(zz)
        data = (zz - self.z).flatten(1).pow(2).sum(1) / self.scale
        loss = (data + self.tv * self.tv_fn(x)).sum()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def rate(self, k):
        with threads(self.thr):
            t = time.perf_counter()
            for _ in range(k):
                self.step()
            return k / (time.perf_counter() - t)  # steps/s over the whole batch


def run_attack(args) -> None:
    with section("attack") as out:
        s, target, attacker_x, eval_x = attack_setup()
        dec_opts = dict(PRESETS["quick"]["attack_options"]["decoder"])
        text = ""
        # --- the real decoder attack, one epoch (the preset trains 6)
        attack = registry.create("attack", "decoder", dec_opts | {"epochs": 1})
        attack.progress = False
        t_fit, _ = timed(lambda: attack.fit(target, attacker_x))
        t_q, z_eval = timed(lambda: target.query(eval_x))
        t_rec, recon = timed(lambda: attack.reconstruct(z_eval))
        recon = recon.clamp(0, 1)
        t_ssim, _ = timed(lambda: ssim(recon, eval_x), 3)
        t_psnr, _ = timed(lambda: psnr(recon, eval_x), 3)
        import lpips as _lp

        t_lp_build, lp = timed(lambda: _lp.LPIPS(net="alex", pnet_rand=True, verbose=False).eval())
        t_lp, _ = timed(lambda: lpips_distance(recon, eval_x, lp), 3)
        t_score, _ = timed(lambda: score(recon, eval_x, lpips_model=lp))
        sem_model = build_model("resnet20", num_classes=10, cut=1, width=0.5).eval()
        t_sem, _ = timed(lambda: predict(sem_model, recon), 3)
        rows = [
            ["decoder fit, 1 epoch of 5,000 images (preset: 6)", f"{t_fit:.2f}", f"{6 * t_fit:.1f}"],
            ["target.query of 256 eval images", f"{t_q:.3f}", f"{t_q:.3f}"],
            ["decoder reconstruct 256", f"{t_rec:.3f}", f"{t_rec:.3f}"],
            ["SSIM 256", f"{t_ssim:.4f}", f"{2 * t_ssim:.3f}"],
            ["PSNR 256", f"{t_psnr:.4f}", f"{2 * t_psnr:.3f}"],
            ["LPIPS 256 (random AlexNet: same cost)", f"{t_lp:.3f}", f"{2 * t_lp:.3f}"],
            ["score() recon (ssim+psnr+mse+lpips)", f"{t_score:.3f}", f"{2 * t_score:.3f}"],
            ["LPIPS construction (random weights; per cell)", f"{t_lp_build:.3f}", f"{t_lp_build:.3f}"],
            ["sem_acc predict 256 (resnet20 w0.5)", f"{t_sem:.3f}", f"{3 * t_sem:.3f}"],
        ]
        # --- the real optimization attack, a few steps (the preset runs 200)
        k_opt = 20 if args.full else 10
        opt_attack = registry.create("attack", "optimization", {"steps": k_opt})
        opt_attack.progress = False
        opt_attack.fit(target, attacker_x)
        t_opt, _ = timed(lambda: opt_attack.reconstruct(z_eval))
        rows.append(
            [f"optimization reconstruct 256, {k_opt} steps (preset: 200)", f"{t_opt:.2f}", f"{t_opt * 200 / k_opt:.1f}"]
        )
        out["phases"] = rows
        text += table(
            "attack cell phases (s; 'per cell' scales to the quick preset)", ["phase", "s measured", "s per cell"], rows
        )

        # --- decoder levers
        dec_arms = {
            "eager (library)": dict(),
            "channels_last (decoder net)": dict(channels_last=True),
            "Adam foreach": dict(opt="foreach"),
            "Adam fused": dict(opt="fused"),
            "1 thread": dict(thr=1),
            "batch 128 (changes numbers)": dict(batch=128),
        }
        if not args.no_compile:
            dec_arms["compile (decoder net)"] = dict(compile=True)
            dec_arms["compile + fused Adam"] = dict(compile=True, opt="fused")
        states = {}
        for k, kw in dec_arms.items():
            st = DecoderState(target, attacker_x, **kw)
            st.rate(2)
            states[k] = st
        res = interleave({k: (lambda st=st: st.rate(args.steps)) for k, st in states.items()}, args.reps)
        rows, out["decoder_levers"] = lever_rows(res, states, digits=0)
        text += table(
            f"decoder training step levers, images/s ({args.reps} interleaved reps x {args.steps} steps)",
            ["variant", "img/s", "range", "vs eager", "compile s"],
            rows,
        )
        # Decoder step breakdown: the encoder query vs the decoder's own forward/backward/step.
        st = states["eager (library)"]
        xb = attacker_x[:64]
        t_query, zb = timed(lambda: target.query(xb), 20)

        def fb():
            loss = F.mse_loss(st.net(zb), xb)
            st.opt.zero_grad(set_to_none=True)
            loss.backward()

        t_fb, _ = timed(fb, 10)
        t_os, _ = timed(lambda: st.opt.step(), 10)
        out["decoder_step_ms"] = {"query": 1000 * t_query, "net fwd+bwd": 1000 * t_fb, "adam": 1000 * t_os}
        text += table(
            "decoder step breakdown (ms per batch of 64)",
            ["part", "ms"],
            [[k, f"{v:.2f}"] for k, v in out["decoder_step_ms"].items()],
        )

        # --- optimization levers
        start = attacker_x.mean(0, keepdim=True)
        opt_arms = {"eager (library)": dict(), "channels_last": dict(channels_last=True), "1 thread": dict(thr=1)}
        if not args.no_compile:
            opt_arms["compile (encoder)"] = dict(compile=True)
        ostates = {}
        for k, kw in opt_arms.items():
            o = OptState(target, z_eval, start, **kw)
            o.rate(1)
            ostates[k] = o
        res = interleave({k: (lambda o=o: o.rate(max(3, args.steps // 3))) for k, o in ostates.items()}, args.reps)
        rows, out["optimization_levers"] = lever_rows(res, ostates, digits=2, per_200_steps=True)
        text += table(
            "optimization attack step levers (256 images per step)",
            ["variant", "steps/s", "range", "vs eager", "s per 200 steps", "compile s"],
            rows,
        )
        out["text"] = text


# ------------------------------------------------------------------------------- 5 fixed costs


def run_fixed(args) -> None:
    with section("fixed") as out:
        rows = []
        snippets = {
            "python -c pass": "pass",
            "import torch": "import torch",
            "import privbench.attack.harness + privbench.engine.train": (
                "import privbench.attack.harness, privbench.engine.train"
            ),
            "import privbench.cli (the entry point)": "import privbench.cli",
            "import lpips": "import lpips",
        }
        for name, code in snippets.items():
            xs = []
            for _ in range(3 if args.full else 2):
                t = time.perf_counter()
                r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
                xs.append(time.perf_counter() - t)
            rows.append([name + ("" if r.returncode == 0 else " (FAILED)"), f"{min(xs):.2f}", f"{max(xs):.2f}"])
        text = table("process start and imports (s, fresh interpreter)", ["what", "min", "max"], rows)
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            old = os.environ.get("PRIVBENCH_CACHE")
            os.environ["PRIVBENCH_CACHE"] = tmp
            try:
                t_cold, _ = timed(lambda: embedded(seed=0, n_train=5000))
                t_warm, d = timed(lambda: embedded(seed=0, n_train=5000), 3)
            finally:
                if old is None:
                    os.environ.pop("PRIVBENCH_CACHE", None)
                else:
                    os.environ["PRIVBENCH_CACHE"] = old
        rows.append(["embedded data set, cold build (once per machine)", f"{t_cold:.2f}"])
        rows.append(["embedded data set, cached load (every cell)", f"{t_warm:.3f}"])
        t_hash, _ = timed(lambda: eval_indices(d.test.images, d.train.images, 256, 0), 2)
        rows.append(["eval_indices: sha1 of 5,000 + 2,000 images (every attack cell)", f"{t_hash:.3f}"])
        cfg = quick_config()
        model = make_model(cfg, d)
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "checkpoint.pt"
            t_save, _ = timed(lambda: atomic_write_bytes(p, tensor_bytes({"model": model.state_dict()})), 3)

            def reload():
                m = make_model(cfg, d)
                m.load_state_dict(load_checkpoint(p)["model"])
                return m

            t_load, _ = timed(reload, 3)
        rows.append(["checkpoint write (tensor_bytes + atomic write)", f"{t_save:.3f}"])
        rows.append(["model build + checkpoint load (Run.load_model's work)", f"{t_load:.3f}"])
        import lpips as _lp

        t_lp, _ = timed(lambda: _lp.LPIPS(net="alex", pnet_rand=True, verbose=False), 2)
        rows.append(["LPIPS construction (random AlexNet; cached weights add a torch.load)", f"{t_lp:.3f}"])
        out["rows"] = rows
        text += table("in-process fixed costs per cell (s)", ["what", "s"], rows)
        out["text"] = text


# --------------------------------------------------------------------------------- 6 exactness


def tiny_training(v: Variant, steps: int, cfg, data) -> tuple[list[float], list[torch.Tensor], float]:
    if v.compile:
        torch._dynamo.reset()  # no graph compiled under other inductor settings is reused
    s = TrainState(v, cfg, data, seed=0, warm_compile=False)
    torch.manual_seed(123)  # the channel noise and dropout streams (global RNG), after any compile warm-up
    s.gen.manual_seed(0)
    s.epoch, s.step_i = 0, 0
    s.perm = torch.randperm(s.n, generator=s.gen)
    s.losses = []
    t = time.perf_counter()
    with s.ctxs():
        for _ in range(steps):
            s.step()
    dt = time.perf_counter() - t
    losses = [float(x) for x in s.losses]
    if s.average is not None:
        s.average.copy_to(s.model)
    params = [p.detach().contiguous().clone() for p in s.model.state_dict().values() if p.is_floating_point()]
    return losses, params, dt


def run_exact(args) -> None:
    with section("exact") as out:
        cfg = quick_config()
        data = get_data(cfg)
        steps = args.exact_steps
        vs = [
            Variant("eager (reference)"),
            Variant("eager again (determinism)"),
            Variant("channels_last", channels_last=True),
            Variant("SGD foreach=True", opt="foreach"),
            Variant("SGD fused=True", opt="fused"),
            Variant("EMA _foreach_lerp_", ema="foreach"),
            Variant("per-step .item() + tqdm", sync=True),
            Variant("1 thread", threads=1),
            Variant("channels_last, noise drawn NCHW", channels_last=True, cl_noise_fix=True),
        ]
        if not args.no_compile:
            # (with inductor's own RNG the dropout and noise streams differ by construction)
            vs += [Variant("compile, fallback_random (eager RNG)", compile="default", fallback_random=True)]
        ref_l, ref_p, _ = tiny_training(vs[0], steps, cfg, data)
        rows = []
        out["variants"] = {}
        for v in vs[1:]:
            l, p, dt = tiny_training(v, steps, cfg, data)
            dl = max(abs(a - b) for a, b in zip(l, ref_l))
            dl_last = abs(l[-1] - ref_l[-1])
            dp = max(float((a - b).abs().max()) for a, b in zip(p, ref_p))
            same = all(torch.equal(a, b) for a, b in zip(p, ref_p)) and l == ref_l
            d1 = abs(l[0] - ref_l[0])
            first_big = next((i + 1 for i, (a, b) in enumerate(zip(l, ref_l)) if abs(a - b) > 1e-4), None)
            out["variants"][v.name] = {
                "max_loss_diff": dl,
                "last_loss_diff": dl_last,
                "max_weight_diff": dp,
                "bit_identical": same,
                "step1_loss_diff": d1,
                "first_step_over_1e-4": first_big,
            }
            rows.append(
                [
                    v.name,
                    "yes" if same else "no",
                    f"{d1:.1e}",
                    str(first_big or "-"),
                    f"{dl:.2e}",
                    f"{dl_last:.2e}",
                    f"{dp:.2e}",
                ]
            )
        import torch._inductor.config as ic

        ic.fallback_random = False
        out["text"] = table(
            f"exactness: {steps} training steps against eager NCHW (loss per step, weight-averaged weights)",
            [
                "variant",
                "bit-identical",
                "|dloss| step 1",
                "first step |dloss|>1e-4",
                "max |dloss|",
                "|dloss| last step",
                "max |dweight|",
            ],
            rows,
        )
        # the decoder: channels_last against NCHW on one target
        s, target, attacker_x, _ = attack_setup()
        a = DecoderState(target, attacker_x, seed=0)
        torch.manual_seed(5)
        for _ in range(steps // 2):
            a.step()
        b = DecoderState(target, attacker_x, channels_last=True, seed=0)
        torch.manual_seed(5)
        for _ in range(steps // 2):
            b.step()
        la, lb = [float(x) for x in a.losses], [float(x) for x in b.losses]
        dd = max(abs(x - y) for x, y in zip(la, lb))
        out["decoder_channels_last_max_loss_diff"] = dd
        out["text"] += table(
            "exactness: decoder, channels_last vs NCHW",
            ["steps", "bit-identical", "max |dloss|"],
            [[steps // 2, "yes" if la == lb else "no", f"{dd:.2e}"]],
        )


# ---------------------------------------------------------------------------------------- main

SECTIONS = {
    "ceiling": run_ceiling,
    "train": run_train,
    "omp": run_omp,
    "eval": run_eval,
    "attack": run_attack,
    "fixed": run_fixed,
    "exact": run_exact,
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--full", action="store_true", help="more steps, repetitions and variants (~15 min)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions per lever (quick 3, full 5)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per timed block (quick 20, full 30)")
    ap.add_argument("--omp-reps", type=int, default=None, help="subprocess repetitions (quick 1, full 2)")
    ap.add_argument(
        "--exact-steps", type=int, default=None, help="steps of each exactness training (quick 40, full 80)"
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads for the process (default: torch's)"
    )
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile arms")
    ap.add_argument("--json", default=DEFAULT_JSON, help="where to write every figure (default: %(default)s)")
    args = ap.parse_args(argv)
    args.reps = args.reps or (5 if args.full else 3)
    args.steps = args.steps or (30 if args.full else 20)
    args.omp_reps = args.omp_reps or (2 if args.full else 1)
    args.exact_steps = args.exact_steps or (80 if args.full else 40)
    if args.threads:
        torch.set_num_threads(args.threads)
    RESULTS["env"] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_start": load(),
        "args": vars(args),
    }
    print(json.dumps(RESULTS["env"]), flush=True)
    t0 = time.perf_counter()
    for name in args.sections.split(","):
        name = name.strip()
        if name not in SECTIONS:
            ap.error(f"unknown section {name!r}")
        SECTIONS[name](args)
        Path(args.json).write_text(json.dumps(RESULTS, indent=1, default=str))
    RESULTS["env"]["load_end"] = load()
    RESULTS["env"]["total_wall_s"] = time.perf_counter() - t0
    Path(args.json).write_text(json.dumps(RESULTS, indent=1, default=str))
    print(f"\nwrote {args.json}; total {RESULTS['env']['total_wall_s']:.0f} s, load {RESULTS['env']['load_end']}")


if __name__ == "__main__":
    main()
