"""Networks and losses shared by attacks and defenses that invert an encoder.

The decoder attack, the shadow-model attack, the likelihood attack's warm start and the
adversarial defense's simulated attacker all train the same inverse network z -> x; the
optimization and likelihood attacks share the total-variation image prior. They live here so
that no plugin imports another.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from privbench.util.progress import bar as progress_bar


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV per image [N]: mean |horizontal| + mean |vertical| neighbour differences."""
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean(dim=(1, 2, 3))
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean(dim=(1, 2, 3))
    return dh + dw


class ResBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a (1x1 when the width changes) shortcut."""

    def __init__(self, cin: int, cout: int, *, last_relu: bool = True):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.short = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()
        self.last_relu = last_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x) + self.short(x)
        return F.relu(y) if self.last_relu else y


def upsamplings(z_size: int, image_size: int) -> int:
    """Number of stride-2 upsamplings from z to the image: floor(log2(image/z)), 0 when z >= image."""
    return max(0, int(math.floor(math.log2(image_size / z_size) + 1e-9))) if z_size < image_size else 0


def token_grid(n: int) -> tuple[int, int]:
    """(leading tokens to drop, grid side) for a sequence of n tokens: the largest square of
    patches, after the leading class (distillation, register) tokens; 65 -> (1, 8), 64 -> (0, 8)."""
    side = math.isqrt(n)
    return n - side * side, side


class InverseNet(nn.Module):
    """z [N,c,h,w] -> image [N,C,H,W] in (0,1), for any cut: 1x1 up to full-size activations.

    Tokens [N,n,d] (a transformer's sequence) are laid back on their patch grid first: leading
    tokens beyond the largest square (a class token) are dropped and the rest read row by row as
    a d-channel map (`token_grid`). A flat z [N,d] is d channels at 1x1. Power-of-two ratios are
    reached by transposed convolutions alone; any remainder (or a z larger than the image) is
    closed by a bilinear resize before the last block.
    """

    def __init__(self, z_shape: tuple[int, ...], image_shape: tuple[int, int, int], *, channels: int, blocks: int):
        super().__init__()
        self.tokens, self.prefix = len(z_shape) == 2, 0
        if len(z_shape) == 1:  # a flat activation: treat it as channels at 1x1
            z_shape = (z_shape[0], 1, 1)
        elif self.tokens:
            self.prefix, side = token_grid(z_shape[0])
            z_shape = (z_shape[1], side, side)
        if len(z_shape) != 3:
            raise ValueError(f"InverseNet takes z of shape [C,H,W], [N,D] or [D], got {list(z_shape)}")
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
        if self.tokens:  # [N, n, d] -> [N, d, side, side], the class token(s) dropped
            z = z[:, self.prefix :].transpose(1, 2).reshape(len(z), *self.z_shape)
        elif z.ndim == 2:
            z = z.reshape(len(z), *self.z_shape)
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
    bar = progress_bar(range(epochs), desc=desc, show=show)
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
