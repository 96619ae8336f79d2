"""Decoder inversion: learn an inverse network z -> x from the attacker's own images.

Threat model: white-box *query* access to the trained encoder (the attacker can run it on
images of its choice), knows the defense, in particular the channel noise, and owns images from
the data distribution (the harness records which split). The decoder is trained on pairs
(target.forward(x), x) queried afresh every epoch, so it sees new noise each time
("noise-aware"), as in the CEM paper's attack.

Reference (CEM paper / official code): a residual block to 64 channels, 8 residual blocks of
64, stride-2 transposed convolutions up to the image size, a residual block to 3 channels,
Sigmoid; Adam 1e-3, weight decay 1e-4, cosine to 1e-5, MSE loss, 50 epochs, batch 256.

Options (keyword-only, reference defaults):
    epochs=50, batch_size=256, lr=1e-3, min_lr=1e-5, weight_decay=1e-4,
    channels=64 (width; smaller is faster on a CPU), blocks=8,
    ensemble=1: train that many decoders from independent initialisations and average their
    reconstructions: a stronger attacker at `ensemble` times the training (docs/attacks.md).
Shapes: fit(target, images [N,C,H,W] in [0,1]); reconstruct(z [N,*z_shape]) -> [N,C,H,W] in [0,1].

Example:
    attack = registry.create("attack", "decoder", {"epochs": 5})
    attack.fit(target, images); x_hat = attack.reconstruct(target.query(x))
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from privbench.plugins import Attack, Target


class ResBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a (1x1 when the width changes) shortcut."""

    def __init__(self, cin: int, cout: int, *, last_relu: bool = True):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip
        self.short = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()
        self.last_relu = last_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x) + self.short(x)
        return F.relu(y) if self.last_relu else y


def upsamplings(z_size: int, image_size: int) -> int:
    """Number of stride-2 upsamplings from z to the image: floor(log2(image/z)), 0 when z >= image."""
    return max(0, int(math.floor(math.log2(image_size / z_size) + 1e-9))) if z_size < image_size else 0


class InverseNet(nn.Module):
    """z [N,c,h,w] -> image [N,C,H,W] in (0,1), for any cut: 1x1 up to full-size activations.

    Power-of-two ratios are reached by transposed convolutions alone; any remainder (or a z
    larger than the image) is closed by a bilinear resize before the last block.
    """

    def __init__(self, z_shape: tuple[int, ...], image_shape: tuple[int, int, int], *, channels: int, blocks: int):
        super().__init__()
        if len(z_shape) == 1:  # a flat activation: treat it as channels at 1x1
            z_shape = (z_shape[0], 1, 1)
        self.z_shape, self.image_shape = tuple(z_shape), tuple(image_shape)
        zc, zh, zw = z_shape
        c, h, w = image_shape
        ups = min(upsamplings(zh, h), upsamplings(zw, w))
        layers: list[nn.Module] = [ResBlock(zc, channels)]
        layers += [ResBlock(channels, channels) for _ in range(blocks)]
        for _ in range(ups):
            layers += [
                nn.ConvTranspose2d(channels, channels, 3, stride=2, padding=1, output_padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            ]
        self.body = nn.Sequential(*layers)
        self.needs_resize = (zh << ups, zw << ups) != (h, w)
        self.head = ResBlock(channels, c, last_relu=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.reshape(len(z), *self.z_shape) if z.ndim == 2 else z
        y = self.body(z)
        if self.needs_resize:
            y = F.interpolate(y, size=self.image_shape[1:], mode="bilinear", align_corners=False)
        return torch.sigmoid(self.head(y))


def train_inverse(
    net: nn.Module,
    images: torch.Tensor,
    query: Callable[[torch.Tensor], torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    min_lr: float,
    weight_decay: float,
    desc: str,
    show: bool = True,
) -> list[float]:
    """Train `net` to map query(x) back to x (MSE; Adam, cosine to min_lr per step) and leave it in
    eval mode. `query` draws fresh channel noise on every call. Returns the mean loss per epoch."""
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(images) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=min_lr)
    history: list[float] = []
    bar = tqdm(range(epochs), desc=desc, leave=False, disable=not show)
    for _ in bar:
        perm = torch.randperm(len(images), device=images.device)
        total = torch.zeros((), device=images.device)
        for i in range(0, len(images), batch_size):
            x = images[perm[i : i + batch_size]]
            loss = F.mse_loss(net(query(x)), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach() * len(x)
        history.append(total.item() / len(images))
        bar.set_postfix(mse=f"{history[-1]:.4f}")
    net.eval()
    return history


class DecoderAttack(Attack):
    """Trains an inverse network on (noisy activation, image) pairs queried from the encoder."""

    name = "decoder"
    summary = "learned inverse network z -> x (noise-aware, white-box query access)"
    identity_omits = ("ensemble",)  # added in session 8: one decoder keeps the older folders' hashes

    def __init__(
        self,
        *,
        epochs: int = 50,
        batch_size: int = 256,
        lr: float = 1e-3,
        min_lr: float = 1e-5,
        weight_decay: float = 1e-4,
        channels: int = 64,
        blocks: int = 8,
        ensemble: int = 1,
    ):
        if epochs < 1 or batch_size < 1 or channels < 1 or blocks < 0 or ensemble < 1:
            raise ValueError("epochs, batch_size, channels and ensemble must be >= 1 and blocks >= 0")
        if lr <= 0 or min_lr < 0:
            raise ValueError("lr must be > 0 and min_lr >= 0")
        self.epochs, self.batch_size, self.lr, self.min_lr = epochs, batch_size, lr, min_lr
        self.weight_decay, self.channels, self.blocks, self.ensemble = weight_decay, channels, blocks, ensemble
        self.nets: list[InverseNet] = []
        self.history: list[float] = []  # mean training loss per epoch (every member's, one after another)

    @property
    def net(self) -> InverseNet | None:
        """The first (with ensemble=1 the only) decoder."""
        return self.nets[0] if self.nets else None

    def fit(self, target: Target, images: torch.Tensor) -> None:
        self.target = target
        self.nets = []
        for k in range(self.ensemble):  # each member draws its own initialisation and batch order
            net = InverseNet(target.z_shape(), target.image_shape, channels=self.channels, blocks=self.blocks)
            self.history += train_inverse(
                net.to(target.device), images, target.query, epochs=self.epochs, batch_size=self.batch_size,
                lr=self.lr, min_lr=self.min_lr, weight_decay=self.weight_decay,
                desc="decoder" if self.ensemble == 1 else f"decoder {k + 1}/{self.ensemble}",
                show=getattr(self, "progress", True),
            )  # fmt: skip
            self.nets.append(net)

    @torch.no_grad()
    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        if not self.nets:
            raise RuntimeError("decoder: call fit(target, images) before reconstruct(z)")
        parts = [z[i : i + self.batch_size] for i in range(0, len(z), self.batch_size)]
        return torch.cat([torch.stack([net(part) for net in self.nets]).mean(0) for part in parts])
