"""privbench benchmarks: training, defense, attack and metric throughput, side by side.

    python bench/bench.py                      # CPU-sized defaults, prints a table, writes JSON
    python bench/bench.py --n-train 50000 --width 1 --batch-size 512 --compile   # CIFAR scale, GPU
    python bench/bench.py --n-train 50000 --width 1 --levers   # bf16 / channels-last / compile on and off

Every ratio is measured in this one process on this one machine. Training throughput comes
from privbench's real training loop (`privbench.engine.train.train`), timed per epoch; defenses run
with warm-up 1, and their first two epochs (warm-up, then the first with the loss on, where a
module is built or a hot path compiled) are excluded from their figures. The
reference-style baseline trains the same model the way the reference code feeds it: a
torchvision DataLoader with per-image PIL transforms, fp32, one worker per core.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from privbench.engine.config import TrainConfig
from privbench.engine.data import load_dataset, to_float
from privbench.engine.train import FAST_PATH_DEVICES, make_model, pick_device, train
from privbench.plugin import registry
from privbench.plugin.base import Target
from privbench.store.runs import device_name

OUT = Path(__file__).parent / "out"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@dataclass(frozen=True)
class Lever:
    """One setting of the GPU levers; bf16 and channels-last are CUDA-only in the loop."""

    amp: bool
    channels_last: bool
    compile: str | None

    @property
    def label(self) -> str:
        parts = ["bf16" if self.amp else "fp32"] + ["channels-last"] * self.channels_last
        return " + ".join(parts + ([f"compile {self.compile}"] if self.compile else []))


# --levers: each lever on and off, ending at the fastest expected setting.
CUDA_LEVERS = [
    Lever(False, False, None),
    Lever(True, False, None),
    Lever(False, True, None),
    Lever(True, True, None),
    Lever(True, True, "default"),
    Lever(True, True, "reduce-overhead"),
]
CPU_LEVERS = [Lever(False, False, None), Lever(False, False, "default")]

# The paper's protocol: 240 training epochs and a 50-epoch decoder on 50,000 CIFAR-sized images.
PAPER_EPOCHS, PAPER_DECODER_EPOCHS, PAPER_IMAGES = 240, 50, 50_000


def bench_training(args, defense: str, data, lever: Lever) -> dict:
    """Images/s of privbench's loop over the epochs after warm-up."""
    takes_warmup = "+" not in defense and "warmup" in registry.option_defaults(registry.get("defense", defense))
    options = {"warmup": 1} if takes_warmup else {}
    cfg = TrainConfig.from_preset(
        "quick",
        defense=defense,
        defense_options=options,
        epochs=args.epochs,
        width=args.width,
        batch_size=args.batch_size,
        cut=4,
        bottleneck=8,
        noise=0.025,
        n_train=args.n_train,
        device=args.device,
        amp=lever.amp,
        channels_last=lever.channels_last,
        compile=lever.compile or False,
        progress=False,
    )
    if args.device != "cpu" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = train(cfg, data=data, log=lambda m: None)
    # Untimed: the first epoch (warm-up, compilation) and a defense's first epoch with its loss
    # on (slot-cem builds its module there; a compiled run compiles the defense's hot path).
    skip = 1 + options.get("warmup", 0)
    if len(result.history) <= skip:
        raise SystemExit(f"--epochs {args.epochs}: need more than {skip} to time {defense}")
    timed = [h["epoch_seconds"] for h in result.history[skip:]]
    sec = statistics.mean(timed)
    return {
        "what": f"train {defense} [{lever.label}]",
        "defense": defense,
        "lever": lever.label,
        "epoch_seconds": sec,
        "epoch_seconds_all": [h["epoch_seconds"] for h in result.history],
        "images_per_s": len(data.train) / sec,
        "test_accuracy": result.test_accuracy,
        "peak_memory_mb": peak_memory_mb(pick_device(args.device)),
        "model": result.model,
    }


class PILDataset(torch.utils.data.Dataset):
    """The reference's input path: numpy uint8 -> PIL image -> per-image transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        import torchvision.transforms as T

        self.images = images.permute(0, 2, 3, 1).cpu().numpy()
        self.labels = labels.cpu().tolist()
        self.tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.tf(Image.fromarray(self.images[i])), self.labels[i]


def bench_reference_style(args, data) -> dict:
    """Same model and optimizer, fed the reference way: DataLoader + PIL, fp32, batch 128."""
    device = pick_device(args.device)
    cfg = TrainConfig.from_preset("quick", width=args.width, cut=4, bottleneck=8, noise=0.025)
    torch.manual_seed(0)
    model = make_model(cfg, data).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(
        PILDataset(data.train.images, data.train.labels),
        batch_size=128,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )
    times = []
    for _ in range(args.epochs):
        sync(device)
        t = time.perf_counter()
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sync(device)
        times.append(time.perf_counter() - t)
    sec = statistics.mean(times[1:] or times)
    return {
        "what": f"reference-style train none ({workers} workers, fp32, batch 128)",
        "epoch_seconds": sec,
        "epoch_seconds_all": times,
        "images_per_s": len(data.train) / sec,
    }


def bench_attacks(args, data, model) -> list[dict]:
    device = pick_device(args.device)
    shape = data.image_shape
    target = Target(
        model.encoder.eval().requires_grad_(False),
        0.025,
        shape,
        device,
        server=model.server.eval().requires_grad_(False),
    )
    images = to_float(data.train.images[: args.attack_images])
    rows = []
    if "decoder" in registry.names("attack"):
        attack = registry.create("attack", "decoder", {"epochs": 2}, strict=False)
        attack.progress = False
        sync(device)
        t = time.perf_counter()
        attack.fit(target, images)
        sync(device)
        sec = time.perf_counter() - t
        rows.append(
            {"what": "decoder training, reference net, 2 epochs", "seconds": sec, "images_per_s": 2 * len(images) / sec}
        )
    if "optimization" in registry.names("attack"):
        steps = 100
        attack = registry.create("attack", "optimization", {"steps": steps}, strict=False)
        attack.progress = False
        attack.fit(target, images)
        z = target.query(to_float(data.test.images[:256]))
        sync(device)
        t = time.perf_counter()
        attack.reconstruct(z)
        sync(device)
        sec = time.perf_counter() - t
        rows.append(
            {"what": f"optimization attack ({steps} steps, 256 images)", "seconds": sec, "images_per_s": 256 / sec}
        )
    rows += bench_attack_pack(args, data, target, images)
    return rows


# The attack pack at the quick preset's options, at a budget cut to keep the benchmark short:
# fit images/s is per epoch (learned) and reconstruction images/s at the given steps.
PACK = {"likelihood": {"steps": 50}, "gan-prior": {"epochs": 1, "steps": 50}, "shadow": {"epochs": 1}}


def bench_attack_pack(args, data, target: Target, images: torch.Tensor) -> list[dict]:
    import tempfile

    from privbench.engine.config import PRESETS
    from privbench.plugin.base import takes_keyword

    rows, labels = [], data.train.labels[: len(images)]
    eval_x = to_float(data.test.images[:64])
    # An empty cache folder: gan-prior must train its generator here, not load one.
    os.environ["PRIVBENCH_CACHE"] = tempfile.mkdtemp(prefix="privbench-bench-")
    for name, budget in PACK.items():
        if name not in registry.names("attack"):
            continue
        options = {**PRESETS["quick"]["attack_options"].get(name, {}), **budget}
        attack = registry.create("attack", name, options, strict=False)
        attack.progress = False
        kw = {"labels": labels} if takes_keyword(attack.fit, "labels") else {}
        sync(target.device)
        t = time.perf_counter()
        attack.fit(target, images, **kw)
        sync(target.device)
        fit = time.perf_counter() - t
        z = target.query(eval_x)
        t = time.perf_counter()
        attack.reconstruct(z)
        sync(target.device)
        rec = time.perf_counter() - t
        epochs = budget.get("epochs")
        rows.append(
            {
                "what": f"{name} fit ({', '.join(f'{k} {v}' for k, v in budget.items())})",
                "seconds": fit,
                "images_per_s": (epochs or 1) * len(images) / fit,
            }
        )
        rows.append({"what": f"{name} reconstruction (64 images)", "seconds": rec, "images_per_s": 64 / rec})
    return rows


def bench_metrics(args, data) -> list[dict]:
    import importlib

    try:
        metrics = importlib.import_module("privbench.attack.metrics")
    except ImportError:
        return []
    device = pick_device(args.device)
    n = args.metric_images
    x = to_float(data.train.images[:n].repeat(max(1, n // len(data.train) + 1), 1, 1, 1)[:n]).to(device)
    y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    rows = []
    for name in ("ssim", "psnr", "mse"):
        fn = getattr(metrics, name)
        fn(x[:16], y[:16])
        sync(device)
        t = time.perf_counter()
        fn(x, y)
        sync(device)
        sec = time.perf_counter() - t
        rows.append({"what": f"metric {name} ({n} images)", "seconds": sec, "images_per_s": n / sec})
    try:
        import lpips

        net = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).to(device)
        m = min(n, 2000)
        t = time.perf_counter()
        with torch.no_grad():
            for i in range(0, m, 500):
                net(x[i : i + 500] * 2 - 1, y[i : i + 500] * 2 - 1)
        sync(device)
        sec = time.perf_counter() - t
        rows.append(
            {"what": f"metric lpips alexnet, random weights ({m} images)", "seconds": sec, "images_per_s": m / sec}
        )
    except Exception as exc:  # speed only; the harness reports LPIPS availability itself
        rows.append({"what": f"metric lpips: not measured ({type(exc).__name__})"})
    return rows


def project_paper_protocol(args, train_rows: list[dict], rows: list[dict]) -> list[dict]:
    """Wall time of the paper's protocol from the measured epoch and decoder throughputs.

    Epoch time scales linearly with the number of images (the data set is resident; no
    per-epoch start-up), so epochs measured on --n-train images project to 50,000.
    """
    decoder = next((r for r in rows if r["what"].startswith("decoder training")), None)
    if decoder is None:
        return []
    decoder_minutes = PAPER_DECODER_EPOCHS * PAPER_IMAGES / decoder["images_per_s"] / 60
    out = []
    for r in train_rows:
        train_minutes = PAPER_EPOCHS * PAPER_IMAGES / r["images_per_s"] / 60
        out.append(
            {
                "what": r["what"],
                "train_minutes": train_minutes,
                "decoder_minutes": decoder_minutes,
                "minutes": train_minutes + decoder_minutes,
            }
        )
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--n-train", type=int, default=5000, help="embedded crops (50000 = CIFAR scale)")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=4, help="per measurement; the first (two for a defense) untimed")
    p.add_argument("--defense", action="append", help="default: none, gmm-cem, slot-cem")
    p.add_argument("--all-defenses", action="store_true", help="every installed defense (base defense ratios)")
    p.add_argument("--workers", type=int, default=None, help="reference-style loader workers (default: cores)")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 on CUDA")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="contiguous NCHW on CUDA")
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        metavar="MODE",
        help="torch.compile the model halves; MODE: default, reduce-overhead (CUDA graphs), ...",
    )
    p.add_argument(
        "--levers",
        action="store_true",
        help="train under each lever setting (bf16, channels-last, compile, on and off)",
    )
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--attack-images", type=int, default=5000)
    p.add_argument("--metric-images", type=int, default=10000)
    p.add_argument("--out", default=None, help="JSON file (default bench/out/bench-<time>.json)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    data = load_dataset("embedded", n_train=args.n_train).to(device)
    chosen = registry.names("defense") if args.all_defenses else args.defense or ["none", "gmm-cem", "slot-cem"]
    defenses = sorted(chosen, key=lambda d: d != "none")  # none first: every ratio is to it
    fast = device.type in FAST_PATH_DEVICES  # the loop's own rule for bf16 and channels-last
    if args.levers:
        levers = CUDA_LEVERS if fast else CPU_LEVERS
    else:
        levers = [Lever(args.amp and fast, args.channels_last and fast, args.compile)]
    rows, model, train_rows = [], None, []
    for lever in levers:
        lever_rows = []
        for d in defenses:
            row = bench_training(args, d, data, lever)
            model = model or row.pop("model")
            row.pop("model", None)
            lever_rows.append(row)
        none = next((r for r in lever_rows if r["defense"] == "none"), None)
        for row in lever_rows:
            if none:
                row["ratio_to_none"] = row["epoch_seconds"] / none["epoch_seconds"]
        train_rows += lever_rows
    rows += train_rows
    nones = [r for r in train_rows if r["defense"] == "none"]
    if not args.skip_reference:
        ref = bench_reference_style(args, data)
        if nones:
            fastest = min(nones, key=lambda r: r["epoch_seconds"])
            ref["privbench_speedup"] = ref["epoch_seconds"] / fastest["epoch_seconds"]
            ref["privbench_speedup_vs"] = fastest["what"]
        rows.append(ref)
    if model is not None:
        rows += bench_attacks(args, data, model)
    rows += bench_metrics(args, data)
    projections = project_paper_protocol(args, train_rows, rows)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # PASSIVE makes idle OpenMP threads sleep: fairer on a shared box, slower for many small ops.
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "torch": torch.__version__,
        "args": vars(args),
        "rows": rows,
        "peak_memory_mb": peak_memory_mb(device),
        "paper_protocol_projection": projections,
    }
    for row in rows:
        extra = "".join(
            f"  {k}={v:.3g}" for k, v in row.items() if k in ("ratio_to_none", "privbench_speedup", "test_accuracy")
        )
        ips = row.get("images_per_s")
        print(f"{row['what']:<62} {f'{ips:10.0f} img/s' if ips else '':>16}{extra}")
    print(f"peak memory: {report['peak_memory_mb']:.0f} MB")
    if projections:
        print(
            f"\nprojected paper protocol ({PAPER_EPOCHS} epochs x {PAPER_IMAGES:,} images + "
            f"{PAPER_DECODER_EPOCHS}-epoch decoder), width {args.width:g}, batch {args.batch_size}:"
        )
        for p in projections:
            print(
                f"  {p['what']:<60} {p['minutes']:8.1f} min  (train {p['train_minutes']:.1f} + decoder "
                f"{p['decoder_minutes']:.1f})"
            )
    out = Path(args.out) if args.out else OUT / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    sys.exit(main() and 0)
