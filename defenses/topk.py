"""Top-k pruning of z: per sample, keep the largest-magnitude fraction of the activation.

Source: the top-k pruning base defense of the CEM paper (Xia et al., CVPR 2025, arXiv
2503.00383), official code github.com/xiasong0501/CEM (utils.prune_defense,
`--AT_regularization topkprune<ratio>`); GLASS compares the same kind of activation sparsification.
Our own code.
"""

from __future__ import annotations

import torch

from privbench.plugin.base import Defense


class TopK(Defense):
    """Zero all but the k = max(1, round(ratio * D)) largest-|z| elements of each sample (D: z's
    elements per sample); the same deterministic rule in training, at inference and in the
    attacker's view.

    What it does: the client sends a sparse code, only its strongest responses, so the weak
    detail a decoder would use to rebuild the image is gone. Gradients flow through the kept
    elements only. Choices where the reference differs or is open: the reference ranks the
    signed values over the whole batch tensor (one threshold for all samples) and its ratio is
    the fraction *pruned*; we rank magnitudes within each sample (an image's code must not depend
    on the other images in its batch, and signed ranking would keep large negative values out
    while keeping near-zero ones) and `ratio` is the fraction *kept*. For a non-negative z
    (ReLU or the C8 bottleneck's Sigmoid) magnitude and value rank the same. Exactly k elements
    are kept (ties broken by torch.topk). Default ratio 0.5: the reference leaves the ratio to
    the command line; half is a middle setting that still trains to useful accuracy.

    Options (keyword-only; `-o key=value`):
        ratio: fraction of z's elements kept per sample, in (0, 1] (default 0.5; 1 is the
            identity). strength() returns it as it is: smaller ratio, stronger defense.

    Cost: one torch.topk over each sample's D elements and one multiply; no parameters, no state.
    """

    name = "topk"
    summary = "keep the largest-magnitude fraction of z per sample (top-k pruning, CEM code)"
    strength_grid = (0.75, 0.5, 0.25)
    knob = "ratio"
    knob_range = (0.0, 1.0)
    knob_scale = "logit"
    knob_lowers_accuracy = False  # the fraction kept

    def __init__(self, *, ratio: float = 0.5):
        if not 0 < ratio <= 1:
            raise ValueError(f"invalid ratio {ratio}: the kept fraction must be in (0, 1]")
        self.ratio = float(ratio)

    def transform(self, z: torch.Tensor, *, training: bool) -> torch.Tensor:
        flat = z.reshape(len(z), -1)
        d = flat.shape[1]
        k = max(1, round(self.ratio * d))
        if k >= d:
            return z
        idx = flat.abs().topk(k, dim=1, sorted=False).indices
        keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
        return z * keep.view(z.shape)  # in z's own layout (channels-last stays channels-last)
