"""PATROL-style channel pruning of z at a fixed ratio: a fixed set of z's channels is zeroed.

Source: PATROL (Ding et al., "PATROL: Privacy-Oriented Pruning for Collaborative Inference
Against Model Inversion Attacks", WACV 2024), as the CEM paper (Xia et al., CVPR 2025, arXiv
2503.00383) uses it for a base defense; official CEM code github.com/xiasong0501/CEM
(`--AT_regularization ..._pruning<epoch>`, MIA_train.model_pruning). Our own code.
"""

from __future__ import annotations

from typing import Any

import torch

from privbench.errors import UserError
from privbench.plugin.base import Defense, TrainContext

SELECTS = ("magnitude", "random")


class Prune(Defense):
    """Zero a fixed set of z's channels (dim 1 of z: feature maps of [N,C,H,W], features of a
    flat [N,D]); k = max(1, round(ratio * C)) channels are kept, the same ones for every image.

    What it does: PATROL removes the encoder's least important channels once, part-way through
    training, and fine-tunes, so the client's output keeps only what the task needs. The
    official CEM code does it with torch-pruning (Taylor importance, 5% of every conv layer
    wider than 32 channels, at epoch 140 of 240, or the epoch named in the option); here the
    pruning acts on z itself, which composes with every model and defense. How the channels
    are chosen (select):
      - "magnitude" (default): during the first `warmup` epochs z passes unpruned and the
        transform sums |z| per channel over the epoch's training batches (on the device, no
        host sync); at the end of epoch `warmup` the `ratio` fraction of channels with the
        largest mean |z| is kept (activation-magnitude importance, a gradient-free stand-in for
        the reference's Taylor importance), and the mask stays fixed for the rest of training.
        The statistic is of this part's own input, so it is right at any place in a stack.
        If training is not longer than `warmup` epochs the mask is fixed after the last epoch
        (the server then never trains with it: accuracy pays, but the defense is in force).
      - "random": a mask drawn once at setup from the run's seed, in force from the first step.
    The mask is in state_dict, so the attacked model uses exactly the trained mask; before the
    mask is fixed the transform is the identity. Default ratio 0.5: the reference's 5% of a
    layer's channels would prune nothing from a C8 z, so we keep half the channels; warmup 1:
    the mask is fixed early so the remaining epochs adapt to it (the reference prunes late and
    fine-tunes for the remaining 100 epochs of its 240).

    Options (keyword-only; `-o key=value`):
        ratio: fraction of channels kept, in (0, 1] (default 0.5). strength() returns it as it
            is: smaller ratio, stronger defense.
        select: "magnitude" (default) or "random".
        warmup: epochs before a magnitude mask is fixed, an integer >= 1 (default 1; unused by random).

    Logged at the epoch that fixes the mask: prune_kept (channels kept).
    """

    name = "prune"
    summary = "fixed channel pruning of z at a ratio (PATROL-style, as in the CEM code)"
    strength_grid = (0.75, 0.5, 0.25)
    knob = "ratio"
    knob_range = (0.0, 1.0)
    knob_scale = "logit"
    knob_lowers_accuracy = False  # the fraction kept
    z_kinds = ("map", "vector")  # dim 1 is the channel; on tokens [N,D] it would be the token
    saved = ("mask",)

    def __init__(self, *, ratio: float = 0.5, select: str = "magnitude", warmup: int = 1):
        if not 0 < ratio <= 1:
            raise ValueError(f"invalid ratio {ratio}: the kept fraction of channels must be in (0, 1]")
        if select not in SELECTS:
            raise ValueError(f"invalid select {select!r}: magnitude or random")
        if int(warmup) != warmup or warmup < 1:
            raise ValueError(f"invalid warmup {warmup}: need an integer >= 1 (epochs measured before pruning)")
        self.ratio, self.select, self.warmup = float(ratio), select, int(warmup)
        self.mask: torch.Tensor | None = None  # [C] float 0/1, fixed once chosen
        self._sums: torch.Tensor | None = None  # [C] sum of |z| per channel in this epoch

    def kept_channels(self, channels: int) -> int:
        return max(1, round(self.ratio * channels))

    def build(self, z_shape: tuple[int, ...], device: torch.device) -> None:
        self.channels = int(z_shape[0]) if z_shape else 1
        self._sums = torch.zeros(self.channels, device=device)
        if self.mask is not None:
            self.mask = self.mask.to(device)

    def setup(self, ctx: TrainContext) -> None:
        if self.select == "random" and self.mask is None:
            gen = torch.Generator().manual_seed(ctx.seed)
            order = torch.randperm(self.channels, generator=gen)
            self._fix(order[: self.kept_channels(self.channels)], ctx.device)

    def transform(self, z: torch.Tensor, *, training: bool) -> torch.Tensor:
        if self.mask is None:
            if training and self._sums is not None:  # warm-up: measure, do not prune yet
                with torch.no_grad():
                    self._sums += z.detach().abs().sum(dim=(0, *range(2, z.dim())), dtype=torch.float32)
            return z
        return z * self.mask.view(1, -1, *([1] * (z.dim() - 2))).to(z.dtype)

    def epoch_end(self, epoch: int, ctx: TrainContext) -> dict[str, float]:
        if self.mask is not None or self._sums is None:
            return {}
        if epoch + 1 < self.warmup and epoch + 1 < ctx.epochs:
            self._sums.zero_()  # only the last warm-up epoch's statistics decide
            return {}
        if epoch + 1 >= ctx.epochs:
            ctx.log(
                f"prune: the run has {ctx.epochs} epoch(s), not more than the {self.warmup}-epoch warm-up: "
                "the mask is fixed after the last epoch and the server never trained with it"
            )
        self._fix(self._sums.topk(self.kept_channels(self.channels)).indices, self._sums.device)
        return {"prune_kept": float(self.kept_channels(self.channels))}

    def _fix(self, kept: torch.Tensor, device: torch.device) -> None:
        mask = torch.zeros(self.channels, device=device)
        mask[kept.to(device)] = 1.0
        self.mask = mask

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        # Not generic: the mask is None until training fixes it, so check a loaded one against z's channels here.
        mask, channels = (state or {}).get("mask"), getattr(self, "channels", None)
        if isinstance(mask, torch.Tensor) and channels is not None and tuple(mask.shape) != (channels,):
            raise UserError(f"prune mask has shape {tuple(mask.shape)}; z has {channels} channels")
        super().load_state_dict(state)
