"""NoPeek: minimise the distance correlation between the input images and z.

Paper: Vepakomma, Singh, Gupta, Raskar, "NoPeek: Information leakage reduction to share
activations in distributed deep learning", ICDM Workshops 2020 (arXiv 2008.09161). The official
CEM code (github.com/xiasong0501/CEM, utils.dist_corr, `--AT_regularization nopeek`) has it as a
base defense. Our own code.
"""

from __future__ import annotations

import torch

from privbench.plugin.base import Defense, TrainContext

EPS = 1e-12  # floor under squared distances and under dCor^2: sqrt has an infinite slope at 0


def pairwise_distances(a: torch.Tensor) -> torch.Tensor:
    """Euclidean distance matrix [B, B] of the rows of a [B, D], with an exact zero diagonal.

    |a_i|^2 + |a_j|^2 - 2 a_i.a_j is one matmul (no [B, B, D] difference tensor); rounding can make
    it slightly negative, hence the floor, and the diagonal is masked so its gradient is 0, not NaN.
    """
    sq = a.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * a @ a.T).clamp(min=EPS)
    off = 1 - torch.eye(len(a), device=a.device, dtype=a.dtype)
    return d2.sqrt() * off


def _double_center(d: torch.Tensor) -> torch.Tensor:
    return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()


def distance_correlation(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation dCor(x, z) in [0, 1] (Szekely et al. 2007, V-statistic).

    x [B, ...] and z [B, ...] are flattened per sample. dCor = sqrt(dCov^2 / sqrt(dVar_x^2 dVar_z^2))
    with dCov^2 = mean(A * B) over the double-centred distance matrices A, B. Memory and time are
    O(B^2) besides the two [B, D] x [D, B] products. Computed in fp32.
    """
    a = _double_center(pairwise_distances(x.flatten(1).float()))
    b = _double_center(pairwise_distances(z.flatten(1).float()))
    dcov2 = (a * b).mean()
    denom = ((a * a).mean() * (b * b).mean()).sqrt()
    return (dcov2 / denom.clamp(min=EPS)).clamp(min=EPS).sqrt()


class NoPeek(Defense):
    """Add `weight * dCor(x, z)` to the task loss, so z carries as little of x as accuracy allows.

    What it does: distance correlation is 0 only when x and z are independent and 1 when z is a
    similarity transform of x; NoPeek adds the batch estimate between the (augmented) input
    images x in [0, 1] and the activation z the client sends, before the channel noise (the
    transformed z when it is stacked after a transform defense), to the cross-entropy. dCor is
    invariant to shifts and scaling of either argument, so normalising x first changes nothing.
    Defaults follow the official CEM code: the statistic is the biased (V-statistic) dCor, not
    its square, with distances floored away from 0 (`utils.dist_corr`), and the reference's
    effective weight on CIFAR-10 is its AT_regularization_strength (it multiplies 0.1 * strength
    by 10), 0.3 in its run_exp.sh, so `weight` defaults to 0.3. Choices where the sources are
    open: the statistic is computed in fp32 under any autocast; the loss is on for every step
    (no warm-up).

    Memory and time: two [B, B] distance matrices per step, so O(B^2): negligible at batch 128
    (64 KiB each), 4 GiB each at batch 32,768; the [B, D] x [D, B] products cost about one
    encoder layer.

    Options (keyword-only; `-o key=value`):
        weight: the dCor weight, >= 0 (default 0.3); the strength: larger is more private.

    Logged per epoch: dcor (the mean batch dCor over the epoch, unweighted).
    """

    name = "nopeek"
    summary = "distance-correlation loss between x and z (Vepakomma et al. 2020)"
    strength_grid = (0.1, 0.3, 1.0)
    knob = "weight"

    def __init__(self, *, weight: float = 0.3):
        if not weight >= 0:
            raise ValueError(f"invalid weight {weight}: the dCor weight must be >= 0")
        self.weight = float(weight)
        self._sum: torch.Tensor | None = None
        self._steps = 0

    def setup(self, ctx: TrainContext) -> None:
        self._sum = torch.zeros((), device=ctx.device)
        self._steps = 0

    def loss(
        self, z: torch.Tensor, y: torch.Tensor, *, epoch: int, lr: float, x: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        if self.weight == 0:
            return None
        if x is None:
            raise RuntimeError("nopeek needs the input images: the training loop must pass x= to loss")
        with torch.autocast(z.device.type, enabled=False):
            dcor = distance_correlation(x, z)
        if self._sum is not None:
            self._sum += dcor.detach()
            self._steps += 1
        return self.weight * dcor

    def epoch_end(self, epoch: int, ctx: TrainContext) -> dict[str, float]:
        if self._sum is None or self._steps == 0:
            return {}
        mean = self._sum.item() / self._steps  # one sync per epoch
        self._sum.zero_()
        self._steps = 0
        return {"dcor": mean}
