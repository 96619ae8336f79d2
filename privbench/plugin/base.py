"""The two plugin interfaces: Defense (hooks into the one training loop) and Attack.

A plugin is one file with one class that subclasses `Defense` or `Attack` and sets `name`.
Options are keyword-only constructor arguments; the registry passes only those the user set,
so a plugin's own defaults stay in force.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class TrainContext:
    """What a defense may look at during training. Built by the training loop."""

    model: nn.Module  # privbench.engine.models.SplitModel: .encoder, .server, .noise_std
    train_images: torch.Tensor  # uint8 [N,C,H,W] on `device`, un-augmented
    train_labels: torch.Tensor  # int64 [N] on `device`
    num_classes: int
    noise_std: float
    device: torch.device
    epochs: int
    batch_size: int
    steps_per_epoch: int
    seed: int
    # Call with new parameters (e.g. a lazily built module) to put them in the optimizer:
    # add_parameters(params, weight_decay=0.0, lr_scale=1.0); lr_scale multiplies the schedule's lr.
    add_parameters: Callable[..., None] = lambda params, **kw: None
    log: Callable[[str], None] = print
    # What the client sends before the channel noise (a module: the encoder, then the defense
    # transforms; model.client_view()). Epoch-end statistics of z should use it, not the encoder.
    client: nn.Module | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Defense:
    """A training-time defense. Every hook is optional; `none` overrides nothing.

    Per run the loop calls `build(z_shape, device)` (create modules whose shape depends on z),
    then `setup(ctx)` (register their parameters with `ctx.add_parameters`). Per step, with `z`
    the encoder output in train mode:
      - `transform(z, training=True)` maps z on its way to the server (a mask, a projection, a
        code's mean). The channel noise is added after it. The same transform, with
        training=False, runs when accuracy is measured and in the attacker's view
        (`Target.forward` / `query`), so the attacker sees exactly what the server receives;
      - `noise(z, training=)` adds the defense's own noise after every transform (shredder's
        learned noise, VIB's sampling), in training, in evaluation and in the attacker's view;
      - `loss(z, y, epoch=, lr=, x=)` sees the transformed z (before any noise) and the
        batch's float images x; the returned scalar is added to the cross-entropy before the
        single backward (return None for no term). A defense with modules of its own trained in
        alternation (an adversary) may take its own optimizer steps inside `loss` on a detached z.
    Per epoch: `epoch_end(epoch, ctx)` whose dict is logged. When the run compiles the model the
    loop also calls `compile_hot_path(compile)` once after `setup`. A run that is attacked later
    rebuilds the defense from its options, calls `build` and then `load_state_dict`, so every
    parameter the transform uses must be in `state_dict`. Channel options (bottleneck, noise)
    belong to the model, so every defense composes with them; defenses stack with `a+b`
    (privbench.plugin.stack): transforms compose left to right, then every part's noise, and losses add up.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # The option that trades accuracy for privacy (`--sweep NAME` sweeps it), or None, and its
    # default values for the sweep, weakest first.
    knob: ClassVar[str | None] = None
    strength_grid: ClassVar[tuple[float, ...]] = ()
    # Where this defense is the reference family, `privbench run` adds points to bracket the other
    # defenses' accuracy (privbench.analysis.bracket): the knob's valid range, the scale accuracy is
    # interpolated on ("log", "logit" for a rate in (0, 1), "linear"), and whether accuracy falls
    # as the knob rises (False for a fraction *kept*).
    knob_range: ClassVar[tuple[float, float]] = (0.0, math.inf)
    knob_scale: ClassVar[str] = "log"
    knob_lowers_accuracy: ClassVar[bool] = True
    # Whether the knob at 0 turns the defense off (it then behaves as `none`; a contract test
    # holds every defense to it); False where something stays on at 0, such as learned noise.
    knob_zero_is_off: ClassVar[bool] = True
    # The kinds of z this defense works on: "map" [C,H,W], "tokens" [N,D] (a transformer's
    # sequence) and "vector" [D]. A defense that reads channels of a map narrows it; a run whose
    # cut sends another kind is refused before training.
    z_kinds: ClassVar[tuple[str, ...]] = ("map", "tokens", "vector")

    def build(self, z_shape: tuple[int, ...], device: torch.device) -> None:
        pass

    def setup(self, ctx: TrainContext) -> None:
        pass

    def transform(self, z: torch.Tensor, *, training: bool) -> torch.Tensor:
        return z

    def noise(self, z: torch.Tensor, *, training: bool) -> torch.Tensor:
        """Noise this defense injects (learned noise, a sampled code), applied after every
        transform and before the channel noise. The losses see z before it: a loss on z then
        judges the features, not the noise on them (a CEM on top of shredder would otherwise
        shrink shredder's noise). Called right after `transform` on the same batch, so a defense
        may keep what `transform` computed for it (a predicted std)."""
        return z

    def loss(
        self, z: torch.Tensor, y: torch.Tensor, *, epoch: int, lr: float, x: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        return None

    def epoch_end(self, epoch: int, ctx: TrainContext) -> dict[str, float]:
        return {}

    def compile_hot_path(self, compile: Callable[[Callable], Callable]) -> None:
        """Wrap the per-step tensor code with `compile` (torch.compile with the run's mode).

        On a GPU at batch 128 every eager op of the loss is a kernel launch on the critical
        path; a defense whose loss is plain tensor code can hand it over here. Default: stay eager.
        """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def strength(self) -> tuple[str, float] | None:
        """(option name, value) of the knob that trades accuracy for privacy, if the defense has one."""
        return (self.knob, getattr(self, self.knob)) if self.knob else None

    def responsibilities(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Where the defense models each class as a mixture: each sample's soft assignment [N, K] to
        the components of its own class (rows sum to 1), from z = what the client sends before the
        channel noise, eval mode. None where it models none (the default) or has not been fitted.
        `privbench plot RUN --curves` draws them (slots.png). Pure: no state changes."""
        return None

    def conditional_entropy(self, z: torch.Tensor, y: torch.Tensor, *, noise_std: float | None = None) -> float | None:
        """The defense's own lower estimate of H(x|z) in nats up to H(x) (the CEM papers' Eq. 3
        bound takes it; privbench.engine.diagnostics), from z = what the client sends before the channel
        noise ([N, ...], eval mode), labels y and the channel noise std; None where the defense
        has no estimator. Pure: no state changes."""
        return None

    def options(self) -> dict[str, Any]:
        """The option values in force (recorded in the run's config)."""
        return dict(getattr(self, "_options", {}))

    @property
    def transforms(self) -> bool:
        """Whether this defense overrides `transform` or `noise` (the loop skips both otherwise)."""
        return type(self).transform is not Defense.transform or self.adds_noise

    @property
    def adds_noise(self) -> bool:
        """Whether this defense overrides `noise`."""
        return type(self).noise is not Defense.noise


def takes_keyword(fn: Callable, name: str) -> bool:
    """Whether `fn` accepts keyword `name` (plugins written before a hook grew an argument do not)."""
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@dataclass
class Target:
    """The attacker's view of a trained split model: white-box encoder plus the channel noise.

    `encoder` is frozen and in eval mode. `query(x)` returns what the server would receive for
    images x in [0,1] (noise included), without gradient; `forward(x)` is the same with
    gradient, for white-box optimization attacks.
    """

    encoder: nn.Module
    noise_std: float
    image_shape: tuple[int, int, int]
    device: torch.device
    # The defense's transform of z (eval mode), applied before the noise; None: identity.
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    # The frozen server half (input: what the server receives), for attacks whose threat model
    # grants it (a curious server owns it); None where unknown.
    server: nn.Module | None = None
    # The defense's own noise (eval mode), after the transform and before the channel noise.
    noise: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        if self.transform is not None:
            z = self.transform(z)
        if self.noise is not None:
            z = self.noise(z)
        if self.noise_std > 0:
            z = z + self.noise_std * torch.randn_like(z)
        return z

    @torch.no_grad()
    def query(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        return torch.cat([self.forward(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])

    def z_shape(self) -> tuple[int, ...]:
        with torch.no_grad():
            probe = torch.zeros(1, *self.image_shape, device=self.device)
            z = self.encoder(probe)
            return tuple((self.transform(z) if self.transform is not None else z).shape[1:])


class Attack:
    """A model inversion attack.

    `fit(target, images)` (optional) trains on the attacker's data: float images in [0,1],
    [N,C,H,W] on the target's device. An attack whose `fit` takes a `labels` keyword also gets
    the attacker images' class labels (int64 [N]), for threat models that grant them.
    `reconstruct(z)` maps observed activations (noise included) to images in [0,1] of shape
    [N, *target.image_shape]. The harness scores the
    output, so every attack is measured the same way. The budget is set through options
    (`epochs` for learned attacks, `steps` for optimization); presets supply values for them.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # Options added after results were written: at their default they are left out of the result
    # folder's hash, so folders written before the option existed are still found and reused.
    identity_omits: ClassVar[tuple[str, ...]] = ()
    # False for an attack whose threat model denies it queries of the encoder (a shadow model).
    queries_encoder: ClassVar[bool] = True

    def fit(self, target: Target, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        self.target = target

    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return dict(getattr(self, "_options", {}))
