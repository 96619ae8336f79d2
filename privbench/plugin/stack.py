"""Defense stacks: `dropout+gmm-cem` runs several defenses in one training.

A stack's spec is defense names joined by `+`, applied left to right: transforms compose in
order (the first part sees the encoder's output), then every part's `noise` (shredder's learned
noise, VIB's sampling) in the same order; every part's loss sees the transformed z before any
noise, and the loss terms add up. Options are per part. A run's `defense_options` is the flat option
dict of its defense when the stack has one part (as before stacks existed, so old run folders
keep their hashes), else `{part: {option: value}}` with only the parts that differ from their
defaults. The same defense twice in a stack is refused: its options could not be addressed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from privbench.errors import UserError
from privbench.plugin import options as opts
from privbench.plugin import registry
from privbench.plugin.base import Defense, TrainContext, takes_keyword

SEPARATOR = opts.STACK_SEPARATOR


def parts(spec: str) -> list[str]:
    """The defense names of a stack spec, checked: known, none twice, none empty."""
    names = [p.strip() for p in str(spec).split(SEPARATOR)]
    if not names or any(not n for n in names):
        raise UserError(f"invalid defense {spec!r}: expected NAME or NAME+NAME+... (e.g. dropout+gmm-cem)")
    for name in names:
        registry.get("defense", name)  # unknown: one line naming the installed defenses
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"defense {twice[0]!r} appears twice in the stack {spec!r}: each part may appear once")
    return names


def label(spec: str) -> str:
    """'dropout+gmm-cem' -> 'dropout + gmm-cem' (tables and plots)."""
    return " + ".join(p.strip() for p in str(spec).split(SEPARATOR))


def route_options(names: list[str], options: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Options per part from any form privbench.plugin.options.parse_all takes: `{part: {key: value}}`,
    `{"part.key": value}` or a bare `{key: value}`, which goes to the one part that has `key`."""
    routed, _ = opts.route(opts.parse_all(options), defenses=[SEPARATOR.join(names)], where="the stack")
    return {n: routed.get(n, {}) for n in names}


def canonical(spec: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """The options of a stack as they define a run (see the module docstring)."""
    names = parts(spec)
    routed = route_options(names, options)
    canon = {n: registry.canonical_options("defense", n, routed[n]) for n in names}
    if len(names) == 1:
        return canon[names[0]]
    return {n: opts for n, opts in canon.items() if opts}


def knob(spec: str) -> str | None:
    """The strength knob of a stack, as `Stack.strength` names it (`gmm-cem.lam` in a stack, `lam`
    alone), read off the parts' classes: nothing is built. A plugin that still overrides
    `strength()` instead of setting `knob` is built with its defaults to ask."""
    names = parts(spec)
    for name in reversed(names):
        cls = registry.get("defense", name)
        key = cls.knob
        if key is None and cls.strength is not Defense.strength:
            found = registry.create("defense", name).strength()
            key = found[0] if found else None
        if key is not None:
            return key if len(names) == 1 else f"{name}.{key}"
    return None


def create(spec: str, options: dict[str, Any] | None = None) -> Stack:
    """The defense stack of `spec` with its options (any form `route_options` takes)."""
    names = parts(spec)
    routed = route_options(names, options)
    return Stack(spec, [(n, registry.create("defense", n, routed[n])) for n in names])


def check_z_kind(defense: Defense, kind: str, z_shape: tuple[int, ...]) -> None:
    """Refuse a defense (or a stack part) that does not work on z of this kind (Defense.z_kinds)."""
    members = defense.members if isinstance(defense, Stack) else [(defense.name, defense)]
    for name, d in members:
        if kind not in d.z_kinds:
            raise UserError(
                f"defense {name} works on {' and '.join(d.z_kinds)} activations, but this model's z is "
                f"{kind} of shape {list(z_shape)}: choose another cut or defense"
            )


class Stack(Defense):
    """Several defenses run as one; with one part it behaves exactly as that part.

    Not registered: `create` builds it from a spec. Per-part losses are logged per epoch as
    `<part>_loss` when the stack has several parts, and a transform that returns NaN or Inf is
    caught at the end of the epoch and blamed on its part.
    """

    def __init__(self, spec: str, members: list[tuple[str, Defense]]):
        self.spec, self.members = spec, members
        self._takes_x = [takes_keyword(d.loss, "x") for _, d in members]
        self._loss_sums: list[torch.Tensor] | None = None
        self._bad: list[torch.Tensor] | None = None

    @property
    def single(self) -> bool:
        return len(self.members) == 1

    @property
    def transforms(self) -> bool:
        return any(d.transforms for _, d in self.members)

    @property
    def adds_noise(self) -> bool:
        return any(d.adds_noise for _, d in self.members)

    def build(self, z_shape: tuple[int, ...], device: torch.device) -> None:
        for _, d in self.members:
            d.build(z_shape, device)
            d.restore_pending()  # a state loaded before build: its modules exist now
            if d.transforms:  # the next part sees this part's output
                with torch.no_grad():
                    z_shape = tuple(d.transform(torch.zeros(2, *z_shape, device=device), training=False).shape[1:])

    def setup(self, ctx: TrainContext) -> None:
        for _, d in self.members:
            d.setup(ctx)
            d.restore_pending()  # modules a part creates in setup get a state loaded before it
        zero = torch.zeros((), device=ctx.device)
        self._loss_sums = [zero.clone() for _ in self.members]
        self._bad = [torch.zeros((), dtype=torch.bool, device=ctx.device) for _ in self.members]

    def transform(self, z: torch.Tensor, *, training: bool) -> torch.Tensor:
        for i, (_, d) in enumerate(self.members):
            if d.transforms:
                z = self._checked(i, d.transform(z, training=training), training)
        return z

    def noise(self, z: torch.Tensor, *, training: bool) -> torch.Tensor:
        for i, (_, d) in enumerate(self.members):
            if d.adds_noise:
                z = self._checked(i, d.noise(z, training=training), training)
        return z

    def _checked(self, i: int, z: torch.Tensor, training: bool) -> torch.Tensor:
        if training and self._bad is not None:  # read once per epoch: no per-step host sync
            self._bad[i] |= ~torch.isfinite(z).all()
        return z

    def loss(
        self, z: torch.Tensor, y: torch.Tensor, *, epoch: int, lr: float, x: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        total = None
        for i, (_, d) in enumerate(self.members):
            kw = {"x": x} if self._takes_x[i] else {}
            term = d.loss(z, y, epoch=epoch, lr=lr, **kw)
            if term is None:
                continue
            if not self.single and self._loss_sums is not None:
                self._loss_sums[i] += term.detach().float() * len(y)
            total = term if total is None else total + term
        return total

    def nonfinite_part(self) -> str | None:
        """The first part whose transform produced NaN or Inf since the last call, else None."""
        if self._bad is None:
            return None
        found = next((name for (name, _), bad in zip(self.members, self._bad) if bool(bad)), None)
        for bad in self._bad:
            bad.zero_()
        return found

    def epoch_end(self, epoch: int, ctx: TrainContext) -> dict[str, float]:
        row: dict[str, float] = {}
        n = len(ctx.train_labels)
        for i, (name, d) in enumerate(self.members):
            if not self.single and self._loss_sums is not None:
                row[f"{name}_loss"] = self._loss_sums[i].item() / n
                self._loss_sums[i].zero_()
            row.update(d.epoch_end(epoch, ctx))
        return row

    def compile_hot_path(self, compile: Callable[[Callable], Callable]) -> None:
        for _, d in self.members:
            d.compile_hot_path(compile)

    def state_dict(self) -> dict[str, Any]:
        if self.single:  # the part's own state: checkpoints from before stacks load unchanged
            return self.members[0][1].state_dict()
        return {name: d.state_dict() for name, d in self.members}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.single:
            self.members[0][1].load_state_dict(state)
            return
        for name, d in self.members:
            d.load_state_dict(state.get(name, {}))

    def options(self) -> dict[str, Any]:
        if self.single:
            return self.members[0][1].options()
        return {name: d.options() for name, d in self.members}

    def conditional_entropy(self, z: torch.Tensor, y: torch.Tensor, *, noise_std: float | None = None) -> float | None:
        """The first part's estimate that has one (the CEM part of a stack)."""
        for _, d in self.members:
            h = d.conditional_entropy(z, y, noise_std=noise_std)
            if h is not None:
                return h
        return None

    def strength(self) -> tuple[str, float] | None:
        """The last part's knob that has one, as `part.option` (e.g. gmm-cem.lam)."""
        for name, d in reversed(self.members):
            knob = d.strength()
            if knob is not None:
                return (knob[0] if self.single else f"{name}.{knob[0]}", knob[1])
        return None
