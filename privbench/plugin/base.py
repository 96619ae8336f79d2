"""The two plugin interfaces: Defense (hooks into the one training loop) and Attack.

A plugin is one file with one class that subclasses `Defense` or `Attack` and sets `name`.
Options are keyword-only constructor arguments; the registry passes only those the user set,
so a plugin's own defaults stay in force.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from privbench.errors import UserError


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
    parameter the transform uses must be saved: list the attributes that hold trained state
    (modules, tensors, optimizers) in `saved`, and `state_dict` / `load_state_dict` save and
    restore them for checkpoints, resume and attacks. Channel options (bottleneck, noise)
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
    # The attributes that hold the trained state (`state_dict` / `load_state_dict`): an nn.Module,
    # a tensor (a parameter too), a torch optimizer, or a value torch.load(weights_only=True) reads
    # back (numbers, lists and dicts of tensors; start a dict at {}, not None: a dict loaded into None
    # is taken for the state of a module not built yet). A non-empty state must hold each of them,
    # except those in `saved_optional` (an attribute that may still be None when the state is saved).
    saved: ClassVar[tuple[str, ...]] = ()
    saved_optional: ClassVar[tuple[str, ...]] = ()

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
        """{attribute: value} for each `saved` attribute that is not None: a module's or optimizer's own
        state_dict, a tensor or a plain value, every tensor detached, cloned and on the CPU. Where
        the one saved attribute is a module, its state_dict alone (flat: the keys are the module's).
        A state still waiting for its module (`restore_pending`) is saved as it was loaded."""
        state = dict(vars(self).get("_pending_state") or {})
        for attr in self.saved:
            value = getattr(self, attr, None)
            if value is not None:
                state[attr] = _cpu_copy(value.state_dict() if isinstance(value, _LOADS_IN_PLACE) else value)
        only = self.saved[0] if len(self.saved) == 1 else None
        if only in state and isinstance(getattr(self, only, None), nn.Module):
            return state[only]  # the format of checkpoints written before `saved` existed (disco, vib)
        return state

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore what `state_dict` saved; an empty state (an untrained defense's) changes nothing.

        Modules and optimizers load in place (an optimizer keeps its parameters), tensors are copied
        into the current one (its device, and the shape checked), or kept on the device of the
        defense's other tensors while the attribute is None; other values are set. The state of a
        module or optimizer that does not exist yet waits until `restore_pending`. The flat state of
        a single saved module needs that module built (`build`). Anything that does not fit is one
        line of UserError.
        """
        if not state:
            return
        vars(self).pop("_pending_state", None)  # a new state replaces one still waiting
        if len(self.saved) == 1 and self.saved[0] not in state:
            module = getattr(self, self.saved[0], None)
            if isinstance(module, nn.Module) and all(isinstance(v, torch.Tensor) for v in state.values()):
                state = {self.saved[0]: state}  # one module's flat state (see state_dict)
        for attr in self.saved:
            if attr not in state and attr not in self.saved_optional:
                raise UserError(f"{self.name} state lacks {attr!r}")
        self._apply_state({a: state[a] for a in self.saved if a in state})

    def restore_pending(self) -> None:
        """Load the state of saved modules and optimizers that did not exist when `load_state_dict`
        ran (adversarial builds its decoder in `setup`). A defense that creates one after `build`
        calls this once it exists; the stack also calls it after every part's `build` and `setup`."""
        pending = vars(self).pop("_pending_state", None)
        if pending:
            self._apply_state(pending)

    def _apply_state(self, state: dict[str, Any]) -> None:
        # Check every tensor before anything changes; tensors are written last, after the modules
        # (whose load may fail) have loaded.
        device = _device_of(vars(self).values())
        tensors, pending = {}, {}
        for attr, value in state.items():
            current = getattr(self, attr, None)
            if isinstance(current, torch.Tensor):
                if not isinstance(value, torch.Tensor):
                    raise UserError(f"{self.name} state: {attr!r} is {type(value).__name__}, not a tensor")
                if value.shape != current.shape:
                    shapes = f"has shape {tuple(value.shape)}, z gives {tuple(current.shape)}"
                    raise UserError(f"{self.name} state: {attr!r} {shapes}")
                tensors[attr] = value
            elif current is None and isinstance(value, dict):
                pending[attr] = value  # a module's or optimizer's state: it is built later
        for attr, value in state.items():
            current = getattr(self, attr, None)
            if isinstance(current, _LOADS_IN_PLACE):
                try:
                    current.load_state_dict(value)
                except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
                    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
                    # torch's message is a heading ("Error(s) in loading ...:") over the errors: keep the first
                    first = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
                    raise UserError(f"{self.name} state does not fit {attr!r}: {first}") from None
        for attr, value in state.items():
            current = getattr(self, attr, None)
            if attr in tensors:
                with torch.no_grad():  # in place: an optimizer (or a compiled graph) holds this tensor
                    current.copy_(value)
            elif attr not in pending and not isinstance(current, _LOADS_IN_PLACE):
                on = device if device is not None and isinstance(value, torch.Tensor) else None
                setattr(self, attr, value.to(on) if on is not None else value)
        if pending:
            self._pending_state = pending

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


_LOADS_IN_PLACE = (nn.Module, torch.optim.Optimizer)


def _cpu_copy(value: Any) -> Any:
    """A nested state (dicts, lists, tuples, tensors) with every tensor detached and copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cpu_copy(v) for v in value)
    return value


def _device_of(values: Iterable[Any]) -> torch.device | None:
    """Where a defense keeps its tensors: an accelerator if any tensor or module among `values` is
    on one, else the CPU; None when there is none yet."""
    found = None
    for value in values:
        if isinstance(value, nn.Module):
            value = next(value.parameters(), next(value.buffers(), None))
        if isinstance(value, torch.Tensor):
            if value.device.type != "cpu":
                return value.device
            found = value.device
    return found


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
