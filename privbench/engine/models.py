"""Split models: `encoder(x) -> z` runs on the client, `server(z) -> logits` on the server.

Images enter the encoder as floats in [0,1]; per-channel normalization is the encoder's first
layer, so attacks work in image space. The channel between the two halves may add Gaussian
noise (train, test and attack time) and a bottleneck (client conv to c channels + Sigmoid,
server conv back).

Two kinds of model: the built-in `vgg11` and `resnet20` (cut by an entry count), and any model
named by a spec `torchvision:NAME`, `timm:NAME` or `pkg.module:callable` (privbench.engine.zoo),
cut after a module by privbench.engine.cuts. z may then be a map [C,H,W], tokens [N,D] or a
vector [D]; `z_kind` names which.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.utils.flop_counter as flop_counter
from torch import nn

from privbench.engine import cuts, zoo
from privbench.errors import UserError
from privbench.util.storage import file_digest, load_checkpoint

VGG11_CFG: list[int | str] = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10, as the reference
MODELS = ("vgg11", "resnet20")
Z_KINDS = {3: "map", 2: "tokens", 1: "vector"}  # by the rank of z without the batch dimension


def z_kind(z_shape: tuple[int, ...]) -> str:
    """The kind of z: "map" for [C,H,W], "tokens" for [N,D], "vector" for [D], else "other"."""
    return Z_KINDS.get(len(z_shape), "other")


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

    def __init__(self, encoder: nn.Module, server: nn.Module, noise_std: float = 0.0, num_classes: int | None = None):
        super().__init__()
        self.encoder, self.server = encoder, server
        self.noise_std = float(noise_std)
        self.num_classes = num_classes  # set by build_model; not part of the state dict
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
        nn.Linear(ch * size * size, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    ]
    return SplitModel(nn.Sequential(*client), nn.Sequential(*server), noise_std)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
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
    cut: int | str,
    bottleneck: int | None = None,
    noise_std: float = 0.0,
    width: float = 1.0,
    image_shape: tuple[int, int, int] = (3, 32, 32),
    pretrained: bool = False,
    options: Mapping[str, Any] | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> SplitModel:
    """The split model `name` (a built-in name or a zoo spec) for images of `image_shape`.

    Zoo models only: `pretrained` (the family's default weights), `options` (keyword arguments
    of the factory) and `state_dict` (the full model's weights, loaded before the split; one that
    does not fit raises a UserError naming the first key that does not)."""
    if noise_std < 0:
        raise UserError(f"invalid noise {noise_std}: the noise std must be >= 0")
    if zoo.is_model_spec(name):
        return zoo_model(
            name,
            num_classes=num_classes,
            cut=cut,
            bottleneck=bottleneck,
            noise_std=noise_std,
            image_shape=image_shape,
            pretrained=pretrained,
            options=options,
            state_dict=state_dict,
        )
    builders = {"vgg11": vgg11, "resnet20": resnet20}
    if name not in builders:
        raise UserError(
            f"unknown model {name!r} (known: {', '.join(MODELS)}, or torchvision:NAME, timm:NAME, pkg.module:callable)"
        )
    if width <= 0:
        raise UserError(f"invalid width {width}: must be > 0")
    if isinstance(cut, str):
        if not cut.strip().lstrip("-").isdigit():
            raise UserError(f"invalid cut {cut!r} for {name}: its cuts are numbers (privbench cuts {name})")
        cut = int(cut)
    model = builders[name](
        num_classes=num_classes,
        cut=cut,
        bottleneck=bottleneck,
        noise_std=noise_std,
        width=width,
        in_channels=image_shape[0],
        image_size=image_shape[1],
    )
    model.num_classes = num_classes
    if state_dict is not None:
        load_weights(model, state_dict, name)
    return model


def builtin_cuts(
    name: str, *, width: float, image_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10
) -> list[cuts.CutInfo]:
    """The cuts of a built-in model, 1..n entries on the client, described as
    privbench.engine.cuts.list_cuts describes a zoo model's (every one valid)."""
    counts = {"vgg11": len(VGG11_CFG), "resnet20": RESNET20_UNITS}
    if name not in counts:
        raise UserError(f"unknown model {name!r} (known: {', '.join(MODELS)})")
    x = torch.rand(1, *image_shape, generator=torch.Generator().manual_seed(0))
    out = []
    for k in range(1, counts[name] + 1):
        model = build_model(name, num_classes=num_classes, cut=k, width=width, image_shape=image_shape).eval()
        with torch.no_grad():
            z = model.encoder(x)
        params = sum(p.numel() for p in model.encoder.parameters()) / sum(p.numel() for p in model.parameters())
        flops = _flops(model.encoder, x) / max(1, _flops(model, x))
        shape = tuple(z.shape[1:])
        out.append(cuts.CutInfo(str(k), True, None, shape, z_kind(shape), params, flops, k))
    return out


def _flops(module: nn.Module, x: torch.Tensor) -> int:
    """What torch.utils.flop_counter counts (convolutions, matrix products) for one forward pass."""
    counter = flop_counter.FlopCounterMode(display=False)
    with counter:
        module(x)
    return counter.get_total_flops()


# ------------------------------------------------------------------------ any model (zoo)


def zoo_model(
    spec: str,
    *,
    num_classes: int,
    cut: int | str,
    bottleneck: int | None = None,
    noise_std: float = 0.0,
    image_shape: tuple[int, int, int] = (3, 32, 32),
    pretrained: bool = False,
    options: Mapping[str, Any] | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> SplitModel:
    """Build `spec` whole (privbench.engine.zoo), load `state_dict` into it, cut it after `cut`
    (privbench.engine.cuts) and put the model's input normalization first on the client.

    The bottleneck follows z's kind: on a map [C,H,W] a 1x1 conv C->c + Sigmoid on the client
    and a 1x1 conv c->C on the server; on tokens [N,D] and on a vector [D] a Linear D->c +
    Sigmoid and a Linear c->D."""
    channels, height, width = image_shape
    if height != width:
        raise UserError(f"{spec} is cut for square images; the data set's are {height}x{width}")
    model = zoo.build_model(spec, num_classes=num_classes, pretrained=pretrained, options=dict(options or {}))
    if state_dict is not None:
        load_weights(model, state_dict, spec)
    norm = zoo.input_normalization(spec, model)
    encoder, server = cuts.split(model, cut, height, channels)
    client: list[nn.Module] = [zoo.Normalize(*norm) if norm else nn.Identity(), encoder]
    back: list[nn.Module] = [server]
    z_shape = _probe(nn.Sequential(*client), image_shape)
    kind = z_kind(z_shape)
    if kind == "other":
        raise UserError(
            f"cut {cut!r} of {spec} sends a tensor of shape {list(z_shape)}; privbench handles maps "
            "[C,H,W], tokens [N,D] and vectors [D]: choose another cut (privbench cuts)"
        )
    if bottleneck:
        bc, bs = zoo_bottleneck(z_shape, bottleneck)
        client.append(bc)
        back.insert(0, bs)
    split = SplitModel(nn.Sequential(*client), nn.Sequential(*back), noise_std, num_classes)
    split.train(model.training)
    return split


def _probe(encoder: nn.Module, image_shape: tuple[int, ...]) -> tuple[int, ...]:
    """z's shape without the batch dimension: one zero image in eval mode, modes restored after."""
    modes = {m: m.training for m in encoder.modules()}
    encoder.eval()
    try:
        first = next(iter(encoder.parameters()), None)
        x = torch.zeros(1, *image_shape, device=first.device if first is not None else None)
        with torch.no_grad():
            z = encoder(x)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return tuple(z.shape[1:])


def zoo_bottleneck(z_shape: tuple[int, ...], c: int) -> tuple[nn.Module, nn.Module]:
    """(client, server) halves of the C<c> bottleneck for z of this shape (see zoo_model)."""
    if z_kind(z_shape) == "map":
        ch = z_shape[0]
        return nn.Sequential(nn.Conv2d(ch, c, 1), nn.Sigmoid()), nn.Conv2d(c, ch, 1)
    d = z_shape[-1]
    return nn.Sequential(nn.Linear(d, c), nn.Sigmoid()), nn.Linear(c, d)


def load_weights(model: nn.Module, state: Mapping[str, Any], name: str) -> None:
    """Load a state dict that must fit `model` exactly; else a UserError naming the first key that
    does not (missing, unexpected, or of another shape)."""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"the weights for {name} are not a state dict of tensors")
    own = model.state_dict()
    for key, value in own.items():
        if key not in state:
            raise UserError(
                f"the weights do not fit {name}: key {key!r} is missing ({len(state)} keys given, {len(own)} expected)"
            )
        if tuple(state[key].shape) != tuple(value.shape):
            raise UserError(
                f"the weights do not fit {name}: key {key!r} has shape {list(state[key].shape)}, "
                f"the model's is {list(value.shape)}"
            )
    extra = [k for k in state if k not in own]
    if extra:
        raise UserError(f"the weights do not fit {name}: unexpected key {extra[0]!r}")
    model.load_state_dict(dict(state))


def read_weights(path: str, digest: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict in a --weights file (torch.load with weights_only=True; a dict holding it
    under "state_dict" or "model" is unwrapped). With `digest`, the file must still be the one
    the run's configuration names."""
    if digest is not None and file_digest(path) != digest:
        raise UserError(
            f"the weights file {path} changed since the configuration was made (sha256 "
            f"{digest[:12]}, now {file_digest(path)[:12]})"
        )
    state = load_checkpoint(path)
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((state[k] for k in ("state_dict", "model") if isinstance(state.get(k), dict)), None)
        if inner is None or not all(isinstance(v, torch.Tensor) for v in inner.values()):
            raise UserError(
                f"{path} holds no state dict of tensors (save one with torch.save(model.state_dict(), FILE))"
            )
        state = inner
    return state
