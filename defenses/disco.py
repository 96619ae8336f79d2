"""DISCO: per-sample channel pruning of z chosen by a small learned filter network.

Paper: Singh, Chopra, Garza, Zhang, Vepakomma, Sharma, Raskar, "DISCO: Dynamic and Invariant
Sensitive Channel Obfuscation for deep neural networks", CVPR 2021 (arXiv 2012.11025). Our own code.
"""

from __future__ import annotations

import torch
from torch import nn

from privbench.errors import UserError
from privbench.plugin.base import Defense, TrainContext


class ChannelScorer(nn.Module):
    """z [B, C, H, W] (or [B, C]) -> one score per channel per sample [B, C].

    conv3x3 (C -> hidden) + ReLU, global average pool, linear (hidden -> C): it sees every channel
    and the spatial layout, and costs about one thin conv layer on z.
    """

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, hidden, 3, padding=1)
        self.head = nn.Linear(hidden, channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.reshape(*z.shape[:2], 1, 1) if z.ndim == 2 else z
        return self.head(torch.relu(self.conv(z)).mean((2, 3)))


class Disco(Defense):
    """Zero the `ratio` fraction of z's channels that a learned filter scores lowest, per sample.

    What it does: a small filter network (ChannelScorer) reads the client's activation z and
    scores its C channels for that sample; the client keeps the k = max(1, round((1 - ratio) * C))
    best-scored channels and zeroes the rest, so which channels reach the server changes from
    image to image. The mask is hard (exact zeros) in training and at inference; in training the
    gradient reaches the filter through a straight-through estimator (forward: the hard top-k
    mask; backward: the gradient of sigmoid(score)), so the filter learns from the task loss
    which channels to keep. What we kept of DISCO: the learned, input-dependent channel
    selection trained with the task loss. What we left out: DISCO's min-max term, in which a
    proxy adversary reconstructs the sensitive input and the filter is also trained to defeat
    it; stack `disco+adversarial` to get it back (the adversarial defense's loss sees the
    pruned z, so its penalty trains the filter as well as the encoder). Defaults: ratio 0.5
    (the middle of the paper's pruning-ratio sweep); filter width 16; the filter has no
    batch norm, so the train and eval masks come from the same function.

    Options (keyword-only; `-o key=value`):
        ratio: the fraction of channels pruned per sample, in (0, 1] (default 0.5); at least one
            channel is always kept. The strength: larger is more private.
        hidden: channels of the filter's conv layer, >= 1 (default 16).

    Logged per epoch: kept_channels (k), channel_usage_min/max (over the training set, the
    fraction of samples that keep each channel: a channel at 0 is never sent, one at 1 always).
    """

    name = "disco"
    summary = "learned per-sample channel pruning by a filter network (Singh et al. CVPR'21)"
    strength_grid = (0.25, 0.5, 0.75)
    knob = "ratio"
    knob_range = (0.0, 1.0)
    knob_scale = "logit"
    z_kinds = ("map", "vector")  # the scorer convolves channels of a map (a vector: channels at 1x1)
    saved = ("scorer",)

    def __init__(self, *, ratio: float = 0.5, hidden: int = 16):
        if not 0 < ratio <= 1:
            raise ValueError(f"invalid ratio {ratio}: the pruned fraction must be in (0, 1]")
        if int(hidden) != hidden or hidden < 1:
            raise ValueError(f"invalid hidden {hidden}: the filter width must be an integer >= 1")
        self.ratio, self.hidden = float(ratio), int(hidden)
        self.scorer: ChannelScorer | None = None
        self.keep = 0
        self._usage: torch.Tensor | None = None  # [C] samples that kept each channel, this epoch
        self._seen = 0

    def build(self, z_shape: tuple[int, ...], device: torch.device) -> None:
        channels = int(z_shape[0])
        self.scorer = ChannelScorer(channels, self.hidden).to(device)
        self.keep = max(1, round((1 - self.ratio) * channels))
        self._usage = torch.zeros(channels, device=device)

    def setup(self, ctx: TrainContext) -> None:
        assert self.scorer is not None, "build(z_shape, device) runs before setup"
        ctx.add_parameters(list(self.scorer.parameters()), weight_decay=0.0)
        self._seen = 0

    def mask(self, z: torch.Tensor, *, training: bool) -> torch.Tensor:
        """[B, C] channel mask: hard 0/1 values; with training=True, straight-through gradients."""
        if self.scorer is None:
            raise UserError("disco: build(z_shape, device) was not called")
        with torch.set_grad_enabled(training and torch.is_grad_enabled()):
            scores = self.scorer(z.float()).float()  # fp32 weights: any z dtype outside autocast
        idx = scores.topk(self.keep, dim=1).indices
        hard = torch.zeros_like(scores).scatter_(1, idx, 1.0)
        if not training:
            return hard.detach()
        soft = torch.sigmoid(scores)
        return hard + (soft - soft.detach())  # forward: exactly hard (the bracket is 0); backward: d sigmoid

    def transform(self, z: torch.Tensor, *, training: bool) -> torch.Tensor:
        m = self.mask(z, training=training)
        if training and self._usage is not None:
            self._usage += m.detach().sum(0)
            self._seen += len(z)
        return z * m.reshape(*m.shape, *([1] * (z.ndim - 2))).to(z.dtype)

    def epoch_end(self, epoch: int, ctx: TrainContext) -> dict[str, float]:
        if self._usage is None or self._seen == 0:
            return {}
        use = self._usage / self._seen
        lo, hi = torch.stack([use.min(), use.max()]).tolist()  # one sync per epoch
        self._usage.zero_()
        self._seen = 0
        return {"kept_channels": float(self.keep), "channel_usage_min": lo, "channel_usage_max": hi}
