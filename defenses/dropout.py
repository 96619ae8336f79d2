"""Dropout on z: every element of the activation is zeroed with probability `rate`.

Source: the dropout base defense of the CEM paper (Xia et al., "Theoretical Insights in Model
Inversion Robustness and Conditional Entropy Maximization for Collaborative Inference Systems",
CVPR 2025, arXiv 2503.00383), as its official code github.com/xiasong0501/CEM implements it
(utils.dropout_defense, `--AT_regularization dropout<rate>`); GLASS compares the same kind of
activation dropout. Our own code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from privbench.plugin.base import Defense


class Dropout(Defense):
    """Zero each element of z independently with probability `rate` (a fresh mask per call).

    What it does: the client drops a random fraction of its activation before sending it, so
    an attacker never sees the full code of an image. Defaults follow the official CEM code:
    with `at_inference=True` (default) the mask stays on when accuracy is measured and in the
    attacker's view (the reference applies it to the validation queries too), and the kept
    elements are not rescaled (the reference's masked_fill), so the server sees the same
    distribution in training and at inference. With `at_inference=False` the transform is
    ordinary inverted dropout: on in training with the kept elements scaled by 1 / (1 - rate)
    so the expectation matches the identity used at inference. `rate` 0.2 is the value in the
    reference's run_exp.sh ("dropout0.2"). Difference from the reference: the loop adds the
    channel noise after every transform, so dropped elements arrive as noise, not as exact
    zeros (the reference drops after the noise, which shows the attacker where the mask is).

    Options (keyword-only; `-o key=value`):
        rate: drop probability in [0, 1) (default 0.2); the strength: larger is more private.
        at_inference: keep the mask on at inference and in the attacker's view (default True).

    Cost: one random draw and one multiply per element of z; no parameters, no state.
    """

    name = "dropout"
    summary = "random dropout of z's elements, kept on at inference as in the CEM code"
    strength_grid = (0.1, 0.2, 0.4)
    knob = "rate"
    knob_range = (0.0, 1.0)
    knob_scale = "logit"

    def __init__(self, *, rate: float = 0.2, at_inference: bool = True):
        if not 0 <= rate < 1:
            raise ValueError(f"invalid rate {rate}: the drop probability must be in [0, 1)")
        if at_inference not in (True, False, 0, 1):
            raise ValueError(f"invalid at_inference {at_inference!r}: true or false")
        self.rate, self.at_inference = float(rate), bool(at_inference)

    def transform(self, z: torch.Tensor, *, training: bool) -> torch.Tensor:
        if self.rate == 0:
            return z
        if self.at_inference:  # same unscaled mask in training and inference, as the reference
            return z.masked_fill(torch.rand(z.shape, device=z.device) < self.rate, 0)  # fp32 draw, any z dtype
        return F.dropout(z, self.rate, training=training)
