"""Training and decoder-attack throughput of the model families side by side, in one process.

    python bench/model_speed.py                    # CPU sizes: 32 px, batch 64
    python bench/model_speed.py --image-size 224 --device cuda --steps 20
    python bench/model_speed.py --whole 3          # also the real training loop, fp32 against --cpu-amp

Each arm is a real split model (privbench.engine.models.build_model) with a C8 bottleneck and
channel noise 0.025, and the decoder is the attack's own inverse network on that model's z.
Training is timed twice per arm: in fp32 and in the fast path (bf16 autocast + channels-last,
what CUDA runs by default and `--cpu-amp` asks for on a CPU), on a copy of the same model. The
arms run interleaved (A B C A B C ...), so a machine whose load drifts moves every arm alike;
the table gives the median images/s over the repetitions and the load average.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from privbench.engine.inverse import InverseNet
from privbench.engine.models import build_model

# name -> (model, cut, factory options); the ViT is timm's tiny ViT made small enough for a CPU.
ARMS = {
    "vgg11 (quick preset)": ("vgg11", 4, {}, 0.25),
    "torchvision:resnet18 @ layer2": ("torchvision:resnet18", "layer2", {}, 1.0),
    "timm ViT (96 dims, 9 blocks) @ blocks.3": (
        "timm:vit_tiny_patch16_224",
        "blocks.3",
        {"img_size": 32, "patch_size": 4, "embed_dim": 96, "num_heads": 3, "depth": 9},
        1.0,
    ),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--whole",
        type=int,
        default=0,
        metavar="EPOCHS",
        help="also time the real training loop, fp32 against cpu_amp, for this many epochs",
    )
    args = parser.parse_args()
    device, size, b = torch.device(args.device), args.image_size, args.batch_size
    arms = {}
    for name, (spec, cut, options, width) in ARMS.items():
        opts = dict(options, img_size=size) if "img_size" in options else options
        torch.manual_seed(0)
        model = build_model(
            spec,
            num_classes=10,
            cut=cut,
            bottleneck=8,
            noise_std=0.025,
            width=width,
            image_shape=(3, size, size),
            options=opts,
        ).to(device)
        x, y = torch.rand(b, 3, size, size, device=device), torch.randint(0, 10, (b,), device=device)
        with torch.no_grad():
            z_shape = tuple(model.encoder(x[:1]).shape[1:])
        decoder = InverseNet(z_shape, (3, size, size), channels=32, blocks=2).to(device)
        fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
        arms[name] = (
            model,
            decoder,
            torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
            torch.optim.Adam(decoder.parameters(), lr=3e-3),
            x,
            y,
            z_shape,
            fast,
            torch.optim.SGD(fast.parameters(), lr=0.01, momentum=0.9),
        )
    rates: dict[str, dict[str, list[float]]] = {n: {"train": [], "fast": [], "decoder": []} for n in arms}

    def fast_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)

    def images_per_s(loss_of: Callable[[], torch.Tensor], opt: torch.optim.Optimizer) -> float:
        """args.steps optimizer steps on one batch, timed between device syncs."""
        sync(device)
        t = time.perf_counter()
        for _ in range(args.steps):
            loss = loss_of()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        return args.steps * b / (time.perf_counter() - t)

    load0 = os.getloadavg()[0]
    for _ in range(args.reps):
        for name, (model, decoder, opt, dec_opt, x, y, _, fast, fast_opt) in arms.items():
            model.train()
            fast.train()
            rates[name]["train"].append(images_per_s(lambda m=model, x=x, y=y: F.cross_entropy(m(x), y), opt))
            rates[name]["fast"].append(images_per_s(lambda m=fast, x=x, y=y: fast_loss(m, x, y), fast_opt))
            with torch.no_grad():
                z = model.channel(model.encoder(x))
            rates[name]["decoder"].append(images_per_s(lambda d=decoder, z=z, x=x: F.mse_loss(d(z), x), dec_opt))
    print(
        f"device {device}, {torch.get_num_threads()} threads, {size} px, batch {b}, torch {torch.__version__}, "
        f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print("| model | z | training images/s | bf16 + channels-last | ratio | decoder images/s |")
    print("|---|---|---|---|---|---|")
    for name, arm in arms.items():
        train, fast, dec = (statistics.median(rates[name][k]) for k in ("train", "fast", "decoder"))
        z = "x".join(map(str, arm[6]))
        print(f"| {name} | {z} | {train:,.0f} | {fast:,.0f} | {fast / train:.2f}x | {dec:,.0f} |")
    if args.whole:
        whole_trainings(args.whole, args.reps)


def whole_trainings(epochs: int, reps: int) -> None:
    """The quick preset's base channel (C8 + noise 0.025) trained with the real loop for `epochs`
    epochs, fp32 and `cpu_amp` interleaved: seconds per epoch, the first epoch (one-off kernel
    set-up) apart, and the whole training's seconds."""
    from privbench.engine.config import TrainConfig
    from privbench.engine.train import train

    seconds: dict[bool, list[list[float]]] = {False: [], True: []}
    for rep in range(reps):
        for cpu_amp in (False, True):
            cfg = TrainConfig.from_preset(
                "quick",
                bottleneck=8,
                noise=0.025,
                epochs=epochs,
                seed=rep,
                cpu_amp=cpu_amp,
                device="cpu",
                progress=False,
            )
            t = time.perf_counter()
            history = train(cfg, log=lambda _msg: None).history
            seconds[cpu_amp].append([h["epoch_seconds"] for h in history] + [time.perf_counter() - t])
    print(f"the real loop, {epochs} epochs x {reps} repetitions, load average {os.getloadavg()[0]:.1f}")
    print("| | first epoch (s) | later epochs (s) | whole training (s) |")
    print("|---|---|---|---|")
    for cpu_amp, runs in seconds.items():
        first = statistics.median(r[0] for r in runs)
        later = statistics.median(x for r in runs for x in r[1:-1])
        whole = statistics.median(r[-1] for r in runs)
        print(f"| {'cpu_amp' if cpu_amp else 'fp32'} | {first:.1f} | {later:.1f} | {whole:.1f} |")


if __name__ == "__main__":
    main()
