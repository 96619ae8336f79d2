"""Split models: `encoder(x) -> z` runs on the client, `server(z) -> logits` on the server.

Images enter the encoder as floats in [0,1]; per-channel normalization is the encoder's first
layer, so attacks work in image space. The channel between the two halves may add Gaussian
noise (train, test and attack time) and a bottleneck (client conv to c channels + Sigmoid,
server conv back).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from privbench.errors import UserError

VGG11_CFG: list[int | str] = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10, as the reference
MODELS = ("vgg11", "resnet20")


class Normalize(nn.Module):
    def __init__(self, mean=MEAN, std=STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SplitModel(nn.Module):
    """encoder -> (defense transform) -> (defense noise, channel noise) -> server. `noise_std` is
    part of the model: on in train and eval. `defense_transform(z, training=)` and
    `defense_noise(z, training=)` are set by the training loop and by Run.load_model from the
    run's defense (privbench.engine.train.attach_defense); None: identity."""

    def __init__(self, encoder: nn.Module, server: nn.Module, noise_std: float = 0.0):
        super().__init__()
        self.encoder, self.server = encoder, server
        self.noise_std = float(noise_std)
        self.defense_transform: Callable[..., torch.Tensor] | None = None
        self.defense_noise: Callable[..., torch.Tensor] | None = None

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        """The defense's transform of z, in the encoder's train/eval mode."""
        f = self.defense_transform
        return z if f is None else f(z, training=self.encoder.training)

    def channel(self, z: torch.Tensor) -> torch.Tensor:
        """The noise on the way to the server: the defense's own, then the channel's Gaussian."""
        if self.defense_noise is not None:
            z = self.defense_noise(z, training=self.encoder.training)
        return z + self.noise_std * torch.randn_like(z) if self.noise_std > 0 else z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.server(self.channel(self.transform(self.encoder(x))))

    def client_view(self) -> ClientView:
        return ClientView(self)


class ClientView(nn.Module):
    """z before any noise: the encoder, then the defense transform (what the defenses' losses see).

    Holds the model without registering it, so it adds no parameters or state-dict keys; its
    train/eval mode is the encoder's.
    """

    def __init__(self, model: SplitModel):
        super().__init__()
        self.__dict__["model"] = model

    def train(self, mode: bool = True) -> ClientView:
        self.training = mode
        self.model.encoder.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.transform(self.model.encoder(x))


def _width(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


def parse_bottleneck(spec: str | int | None) -> int | None:
    """'C8' -> 8; None/'' -> None."""
    if spec in (None, "", "none"):
        return None
    s = str(spec)
    digits = s[1:] if s[:1] in ("C", "c") else s
    if not digits.isdigit() or int(digits) < 1:
        raise UserError(f"invalid bottleneck {spec!r}: expected C<channels>, e.g. C8")
    return int(digits)


def _bottleneck(in_ch: int, c: int) -> tuple[nn.Module, nn.Module]:
    client = nn.Sequential(nn.Conv2d(in_ch, c, 3, padding=1), nn.Sigmoid())
    server = nn.Sequential(nn.Conv2d(c, in_ch, 3, padding=1), nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True))
    return client, server


def vgg11(
    *,
    num_classes: int = 10,
    cut: int = 4,
    bottleneck: int | None = None,
    noise_std: float = 0.0,
    width: float = 1.0,
    in_channels: int = 3,
    image_size: int = 32,
) -> SplitModel:
    """VGG11-BN (configuration A) for small images; the first `cut` entries run on the client."""
    if not 1 <= cut <= len(VGG11_CFG):
        raise UserError(f"invalid cut {cut} for vgg11: valid cuts are 1..{len(VGG11_CFG)}")
    layers: list[nn.Module] = []
    ch, size, cut_at = in_channels, image_size, 0
    for i, v in enumerate(VGG11_CFG):
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            size //= 2
        else:
            out = _width(int(v), width)
            layers += [nn.Sequential(nn.Conv2d(ch, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True))]
            ch = out
        if i + 1 == cut:
            cut_at, cut_ch = len(layers), ch
    client = [Normalize(), *layers[:cut_at]]
    server = list(layers[cut_at:])
    if bottleneck:
        bc, bs = _bottleneck(cut_ch, bottleneck)
        client.append(bc)
        server.insert(0, bs)
    hidden = _width(512, width)
    server += [
        nn.Flatten(),
        nn.Dropout(),
        nn.Linear(ch * size * size, hidden), nn.ReLU(inplace=True), nn.Dropout(),
        nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    ]  # fmt: skip
    return SplitModel(nn.Sequential(*client), nn.Sequential(*server), noise_std)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.short(x))


RESNET20_UNITS = 10  # stem + 9 basic blocks; cut k puts the first k units on the client


def resnet20(
    *,
    num_classes: int = 10,
    cut: int = 2,
    bottleneck: int | None = None,
    noise_std: float = 0.0,
    width: float = 1.0,
    in_channels: int = 3,
    image_size: int = 32,
) -> SplitModel:
    """CIFAR-style ResNet-20 (3 stages of 3 basic blocks, 16/32/64 channels x width)."""
    if not 1 <= cut <= RESNET20_UNITS:
        raise UserError(f"invalid cut {cut} for resnet20: valid cuts are 1..{RESNET20_UNITS}")
    c = [_width(16, width), _width(32, width), _width(64, width)]
    units: list[nn.Module] = [
        nn.Sequential(nn.Conv2d(in_channels, c[0], 3, 1, 1, bias=False), nn.BatchNorm2d(c[0]), nn.ReLU(inplace=True))
    ]
    chans, ch = [c[0]], c[0]
    for stage, out in enumerate(c):
        for b in range(3):
            units.append(BasicBlock(ch, out, 2 if stage > 0 and b == 0 else 1))
            ch = out
            chans.append(ch)
    client = [Normalize(), *units[:cut]]
    server: list[nn.Module] = list(units[cut:])
    if bottleneck:
        bc, bs = _bottleneck(chans[cut - 1], bottleneck)
        client.append(bc)
        server.insert(0, bs)
    server += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, num_classes)]
    return SplitModel(nn.Sequential(*client), nn.Sequential(*server), noise_std)


def build_model(
    name: str,
    *,
    num_classes: int,
    cut: int,
    bottleneck: int | None = None,
    noise_std: float = 0.0,
    width: float = 1.0,
    image_shape: tuple[int, int, int] = (3, 32, 32),
) -> SplitModel:
    if noise_std < 0:
        raise UserError(f"invalid noise {noise_std}: the noise std must be >= 0")
    builders = {"vgg11": vgg11, "resnet20": resnet20}
    if name not in builders:
        raise UserError(f"unknown model {name!r} (known: {', '.join(MODELS)})")
    if width <= 0:
        raise UserError(f"invalid width {width}: must be > 0")
    return builders[name](
        num_classes=num_classes, cut=cut, bottleneck=bottleneck, noise_std=noise_std, width=width,
        in_channels=image_shape[0], image_size=image_shape[1],
    )  # fmt: skip
