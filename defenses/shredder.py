"""Shredder: learned additive noise on z whose magnitude the training pushes up.

Paper: Mireshghallah, Taram, Ramrakhya, Jalali, Tullsen, Esmaeilzadeh, "Shredder: Learning
Noise Distributions to Protect Inference Privacy", ASPLOS 2020 (arXiv 1905.11814). Our own code.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from privbench.plugin.base import Defense, TrainContext

MIN_SCALE, MAX_SCALE = 1e-4, 10.0  # the learned std is clamped here: it can neither vanish nor run away
UNIFORM_EPS = 1e-7  # keeps log1p(-|u|) finite: |Laplace draw| <= 11.4 std


def unit_noise(like: torch.Tensor, distribution: str) -> torch.Tensor:
    """Zero-mean, unit-variance noise of `like`'s shape, in fp32."""
    if distribution == "gaussian":
        return torch.randn(like.shape, device=like.device)
    u = torch.rand(like.shape, device=like.device) * 2 - 1  # [-1, 1)
    u = u.clamp(-1 + UNIFORM_EPS, 1 - UNIFORM_EPS)
    return -torch.sign(u) * torch.log1p(-u.abs()) / math.sqrt(2)  # Laplace(0, 1/sqrt 2): variance 1


class Shredder(Defense):
    """Add noise with a learned per-element scale to z, in training and at inference.

    What it does: z (one sample's activation, shape [C, H, W]) gets `scale * eps` added, with
    `scale` a learned tensor of z's shape and eps fresh Laplace noise of unit variance, so the
    scale is the noise std per element. The loss is `-weight * mean(log scale)`: it grows the
    noise everywhere, and the task loss pushes back where the noise hurts accuracy, so the
    noise ends large on the elements the task does not need (Shredder's idea: maximise the
    noise subject to accuracy). The noise stays on at inference and in the attacker's view,
    with the learned scale saved in the run's checkpoint. Shredder itself trains the noise
    of a frozen, pre-trained model with its own optimizer, then fits a distribution to many
    trained noise tensors; here the scale is trained jointly with the model by the main
    optimizer, in one run, and the distribution is the learned Laplace directly. Choices where
    the paper is open for this setting: Laplace noise (the paper's choice; `distribution=
    gaussian` is the alternative), a log-scale parameter (the magnitude stays positive and the
    loss is scale-free) clamped to [1e-4, 10], initial std `init_scale` = 0.025 (the CEM paper's
    base channel noise), and the parameter's learning rate scaled by the number of elements of
    z (`lr_scale` in ctx.add_parameters), so `weight` is per element: without opposition from
    the task loss each log-scale rises by about `lr * weight / (1 - momentum)` per step.

    Options (keyword-only; `-o key=value`):
        weight: the noise-growth weight, >= 0 (default 0.1); the strength: larger is more private.
        init_scale: initial noise std per element, > 0 (default 0.025).
        distribution: "laplace" (default) or "gaussian".

    Logged per epoch: noise_scale (mean learned std), noise_scale_max.
    """

    name = "shredder"
    summary = "learned additive noise whose magnitude the loss grows (Mireshghallah et al. ASPLOS'20)"
    strength_grid = (0.03, 0.1, 0.3)
    knob = "weight"
    knob_zero_is_off = False  # its noise is sampled whatever the weight of its loss
    saved = ("log_scale",)

    def __init__(self, *, weight: float = 0.1, init_scale: float = 0.025, distribution: str = "laplace"):
        if not weight >= 0:
            raise ValueError(f"invalid weight {weight}: the noise-growth weight must be >= 0")
        if not MIN_SCALE <= init_scale <= MAX_SCALE:
            raise ValueError(f"invalid init_scale {init_scale}: the initial std must be in [{MIN_SCALE}, {MAX_SCALE}]")
        if distribution not in ("laplace", "gaussian"):
            raise ValueError(f"invalid distribution {distribution!r}: laplace or gaussian")
        self.weight, self.init_scale, self.distribution = float(weight), float(init_scale), distribution
        self.log_scale: nn.Parameter | None = None

    def build(self, z_shape: tuple[int, ...], device: torch.device) -> None:
        self.log_scale = nn.Parameter(torch.full(tuple(z_shape), math.log(self.init_scale), device=device))

    def setup(self, ctx: TrainContext) -> None:
        assert self.log_scale is not None, "build(z_shape, device) runs before setup"
        ctx.add_parameters([self.log_scale], weight_decay=0.0, lr_scale=float(self.log_scale.numel()))

    def _log_scale(self) -> torch.Tensor:
        assert self.log_scale is not None, "shredder: build(z_shape, device) was not called"
        return self.log_scale.clamp(math.log(MIN_SCALE), math.log(MAX_SCALE))

    def scale(self) -> torch.Tensor:
        """The learned noise std per element of z (shape z_shape), detached."""
        return self._log_scale().detach().exp()

    def noise(self, z: torch.Tensor, *, training: bool) -> torch.Tensor:
        # A noise hook, not a transform: a stacked CEM's loss then sees z without this noise,
        # and cannot shrink it.
        log_s = self._log_scale() if training else self._log_scale().detach()  # the attacker trains nothing here
        noise = log_s.exp() * unit_noise(z, self.distribution)
        return z + noise.to(z.dtype)

    def loss(self, z: torch.Tensor, y: torch.Tensor, *, epoch: int, lr: float) -> torch.Tensor | None:
        if self.weight == 0:
            return None
        # Relative to the initial scale, so the logged term starts at 0 and falls as the noise grows.
        return -self.weight * (self._log_scale().mean() - math.log(self.init_scale))

    def epoch_end(self, epoch: int, ctx: TrainContext) -> dict[str, float]:
        s = self.scale()
        mean, top = torch.stack([s.mean(), s.max()]).tolist()  # one sync per epoch
        return {"noise_scale": mean, "noise_scale_max": top}
