"""Variational information bottleneck on z: the client sends a sample of a learned Gaussian code.

Source: Alemi et al., "Deep Variational Information Bottleneck", ICLR 2017 (arXiv 1612.00410).
As a model inversion defense (MID, Wang et al., AAAI 2021) its training code ships with BiDO in
the CEM repository (github.com/xiasong0501/CEM, BiDO/train_vib.py, BiDO/engine.py train_vib,
BiDO/model.py *_vib), whose objective and sampling we follow. Our own code.
"""

from __future__ import annotations

import torch
from torch import nn

from privbench.errors import UserError
from privbench.plugin.base import Defense, TrainContext

INFERENCE = ("sample", "mean")
LOGVAR_INIT = -10.0  # initial sigma ~ 0.0067: the reference's softplus(s - 5) for s near 0
LOGVAR_MIN, LOGVAR_MAX = -20.0, 10.0  # exp() stays finite and the KL bounded if a head diverges


class Vib(Defense):
    """z' = mu(z) + sigma(z) * eps, eps ~ N(0, I), with mu and log sigma^2 from two 1x1-conv
    heads on z (a C x C map of the channels, the same at every position; a flat z is C features
    at one position), and the loss beta * KL(N(mu, sigma^2) || N(0, I)).

    What it does: the KL term pushes the per-element noise of the code up and its mean towards
    0, so the code keeps only what the task needs (I(z'; x) <= E KL), and the server, like the
    attacker, sees one noisy sample. Reduction (Alemi's objective, the reference's
    engine.train_vib): the KL is summed over z's elements and averaged over the batch, in fp32;
    beta therefore scales with the size of z (512 elements for C8 at cut 4), so compare betas
    at one cut and bottleneck. At inference (accuracy and the attacker's view) the code is a
    fresh sample by default, as in the reference (its forward always samples): the noise is the
    defense, and a deployed client sending the mean would hand the attacker a deterministic
    code; `inference="mean"` measures that accuracy-first deployment. beta 1e-3: Alemi's best
    setting for accuracy (the reference sweeps 0.001-0.1). Measured on embedded, quick preset,
    C8 + noise 0.025, 4 epochs of 2,000 images: beta 1e-3 keeps sigma near 0.01 (accuracy 65%,
    none 73%); 1e-2 drives sigma to the prior's 1 (31%); 0.1 leaves chance.
    Choices where the source is open: the mean head starts as the identity and the
    log-variance head at the constant -10, so training starts from the plain model's z with
    almost no noise; the heads take no weight decay (the KL already regularizes them; decay
    would pull the identity start towards 0). The heads belong to the defense, not the model,
    so the run's weight average (quick preset) does not average them: the kept model pairs the
    averaged encoder with the last step's heads.

    Options (keyword-only; `-o key=value`):
        beta: KL weight, >= 0 (default 0.001); the strength: larger is more private.
        inference: "sample" (default) or "mean" (the deterministic mu).

    Logged per epoch: vib_kl (mean KL per sample, unweighted), vib_sigma (mean sigma).
    """

    name = "vib"
    summary = "variational information bottleneck on z (stochastic code + KL, Alemi et al.)"
    strength_grid = (3e-4, 1e-3, 3e-3)
    knob = "beta"
    knob_zero_is_off = False  # its noise is sampled whatever the weight of its loss
    z_kinds = ("map", "vector")  # the heads mix dim 1, the channels; on tokens [N,D] that is the token
    saved = ("head",)

    def __init__(self, *, beta: float = 1e-3, inference: str = "sample"):
        if not beta >= 0:
            raise ValueError(f"invalid beta {beta}: the KL weight must be >= 0")
        if inference not in INFERENCE:
            raise ValueError(f"invalid inference {inference!r}: sample or mean")
        self.beta, self.inference = float(beta), inference
        self.head: nn.ParameterDict | None = None  # weight [2C, C], bias [2C]
        self._stats: tuple[torch.Tensor, ...] | None = None  # (mu, logvar, sigma) of the last training step
        self._std: torch.Tensor | None = None  # sigma of the last transformed batch, for `noise`
        self._kl_sum: torch.Tensor | None = None
        self._sigma_sum: torch.Tensor | None = None
        self._steps = 0

    def build(self, z_shape: tuple[int, ...], device: torch.device) -> None:
        c = int(z_shape[0]) if z_shape else 1
        # Both 1x1-conv heads in one [2C, C] matrix (rows: mu, then logvar), applied at every
        # position as a matmul: on CPU about 2.5x faster than Conv1d with a 1-wide kernel.
        weight = torch.zeros(2 * c, c, device=device)
        weight[:c] = torch.eye(c, device=device)
        bias = torch.zeros(2 * c, device=device)
        bias[c:] = LOGVAR_INIT
        self.head = nn.ParameterDict({"weight": nn.Parameter(weight), "bias": nn.Parameter(bias)})

    def setup(self, ctx: TrainContext) -> None:
        if self.head is None:
            raise UserError("vib: setup before build (the loop builds the heads for z's shape first)")
        ctx.add_parameters(list(self.head.values()), weight_decay=0.0)
        self._kl_sum = torch.zeros((), device=ctx.device)
        self._sigma_sum = torch.zeros((), device=ctx.device)
        self._steps = 0

    def transform(self, z: torch.Tensor, *, training: bool) -> torch.Tensor:
        assert self.head is not None
        w, b = self.head["weight"], self.head["bias"]
        flat = z.reshape(z.shape[0], z.shape[1], -1)  # [N, C, L], L = positions (1 for a flat z)
        if not torch.is_autocast_enabled(z.device.type):  # autocast casts by itself; otherwise match the heads
            flat = flat.to(w.dtype)
        mu, logvar = (torch.matmul(w, flat) + b[:, None]).chunk(2, dim=1)
        logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self._std = None
        if not training and self.inference == "mean":
            return mu.reshape(z.shape).to(z.dtype)
        std = torch.exp(0.5 * logvar)
        if training:
            self._stats = (mu, logvar, std)
        self._std = std.reshape(z.shape)  # for `noise`, which follows on the same batch
        return mu.reshape(z.shape).to(z.dtype)

    def noise(self, z: torch.Tensor, *, training: bool) -> torch.Tensor:
        # The sampling is a noise hook: a stacked CEM's loss sees the code's mean, not the draw.
        std, self._std = self._std, None
        if std is None:  # inference="mean" at evaluation
            return z
        return (z.to(std.dtype) + std * torch.randn_like(std)).to(z.dtype)

    def loss(
        self, z: torch.Tensor, y: torch.Tensor, *, epoch: int, lr: float, x: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        if self._stats is None:
            return None
        mu, logvar, std = self._stats
        self._stats = None  # the graph is the loss's now; keep no reference past this step
        with torch.autocast(mu.device.type, enabled=False):
            mu, logvar, std = mu.float(), logvar.float(), std.float()
            # sum over z of 0.5 (mu^2 + sigma^2 - 1 - log sigma^2), mean over the batch; three
            # reductions instead of an elementwise chain (this is most of the defense's cost)
            kl = 0.5 * (mu.square().sum() + std.square().sum() - logvar.sum()) / len(mu) - 0.5 * mu[0].numel()
        if self._kl_sum is not None and self._sigma_sum is not None:
            self._kl_sum += kl.detach()
            self._sigma_sum += std.detach().mean()
            self._steps += 1
        return self.beta * kl if self.beta > 0 else None

    def epoch_end(self, epoch: int, ctx: TrainContext) -> dict[str, float]:
        if self._kl_sum is None or self._sigma_sum is None or not self._steps:
            return {}
        kl, sigma = (torch.stack([self._kl_sum, self._sigma_sum]) / self._steps).tolist()  # one sync
        self._kl_sum.zero_()
        self._sigma_sum.zero_()
        self._steps = 0
        return {"vib_kl": kl, "vib_sigma": sigma}
