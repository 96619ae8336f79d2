"""slot-CEM: the CEM regularizer with a learned Slot-Attention mixture estimate instead of k-means.

Source: the slot + gated-cross-attention CEM manual (docs/slot-cem.md restates it); the loss it
approximates is GMM-CEM's (docs/gmm-cem.md). Our own code.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from privbench.engine.diagnostics import mixture_information
from privbench.engine.features import intra_class_mse
from privbench.engine.kmeans import kmeans_responsibilities
from privbench.errors import UserError
from privbench.plugin.base import Defense, TrainContext

# ------------------------------------------------------------------------- the mixture estimate
# Slot Attention + gated cross attention propose responsibilities of each sample for its class's
# slots and the learned parts of the gates; `loo_statistics` measures z under those
# responsibilities with no learned parameters, so rob_loss stays a function of the encoder's
# features (docs/slot-cem.md). Everything per class runs for all classes at once through the
# one-hot matrix [n, C]: a sample's own-class entries are picked by one-hot products rather than
# indexing, whose backward accumulates in a thread-dependent order (runs must repeat). Per-class
# work (slot projections, norms) runs on the C*K slot rows, never on per-sample copies of them.

GAMMA = 0.01  # as gmm-cem: log(v + 0.01) keeps the threshold defined when the noise is 0
KAPPA = 1.0  # pseudo-samples pulling a leave-one-out slot centre towards the class's other samples
GATE_INIT_BIAS = 3.0  # sigmoid(3) = 0.95: the dimension gates start open


def own_class(t: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """[..., n, C*K] scores against every class's slots -> [..., n, K] for each sample's own class."""
    n, C = onehot.shape
    return (t.unflatten(-1, (C, -1)) * onehot[:, :, None]).sum(-2)


def spread_to_classes(r: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """[n, K] weights on the own class's slots -> [n, C*K], zero outside the own class."""
    return (onehot[:, :, None] * r[:, None, :]).flatten(1)


class SlotAttention(nn.Module):
    """Stage 1: per class, slots compete for the class's samples (member [C, n]: 1 where sample
    m is in class c); tokens stay unpadded [n, H]."""

    def __init__(self, hidden: int, num_slots: int, num_iterations: int):
        super().__init__()
        self.num_slots, self.num_iterations = num_slots, num_iterations
        self.norm_in, self.norm_slots, self.norm_mlp = nn.LayerNorm(hidden), nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.to_q, self.to_k, self.to_v = (nn.Linear(hidden, hidden, bias=False) for _ in range(3))
        self.slot_mu = nn.Parameter(torch.randn(1, 1, hidden) * hidden**-0.5)
        self.slot_log_sigma = nn.Parameter(torch.full((1, 1, hidden), math.log(hidden**-0.5)))
        self.gru = nn.GRUCell(hidden, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, hidden))

    def forward(self, u: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
        """u [n, H], member [C, n] -> slots [C, K, H]."""
        C, H = member.shape[0], u.shape[1]
        x = self.norm_in(u)
        k = self.to_k(x) * H**-0.5  # the 1/sqrt(H) temperature, applied once instead of per round
        v = self.to_v(x)
        noise = torch.randn(C, self.num_slots, H, device=u.device, dtype=u.dtype)
        slots = self.slot_mu + self.slot_log_sigma.exp() * noise
        for _ in range(self.num_iterations):
            q = self.to_q(self.norm_slots(slots))
            attn = torch.softmax(q @ k.T, dim=1)  # [C, K, n], over slots: they compete
            attn = attn * member[:, None, :]  # only the class's own samples
            attn = attn / (attn.sum(-1, keepdim=True) + 1e-8)  # a weighted mean over samples
            slots = self.gru((attn @ v).flatten(0, 1), slots.flatten(0, 1)).view(C, self.num_slots, H)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots


class GatedCrossAttention(nn.Module):
    """Stage 2: each sample queries its class's slots; the answer enters through tanh(alpha) gates."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_ffn = nn.LayerNorm(hidden), nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.to_q, self.to_k, self.to_v = (nn.Linear(hidden, hidden, bias=False) for _ in range(3))
        self.out = nn.Linear(hidden, hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        self.alpha_attn = nn.Parameter(torch.tensor(0.1))
        self.alpha_ffn = nn.Parameter(torch.tensor(0.1))

    def forward(self, u: torch.Tensor, slots: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """u [n, H], slots [C, K, H], onehot [n, C] -> h [n, H]."""
        H = u.shape[-1]
        q = self.to_q(self.norm_q(u))
        s = self.norm_kv(slots).flatten(0, 1)  # [C*K, H]
        k, v = self.to_k(s), self.to_v(s)
        attn = torch.softmax(own_class(q @ k.T, onehot) * H**-0.5, dim=-1)  # [n, K], over slots
        h = u + torch.tanh(self.alpha_attn) * self.out(spread_to_classes(attn, onehot) @ v)
        return h + torch.tanh(self.alpha_ffn) * self.ffn(self.norm_ffn(h))


class LooStats(NamedTuple):
    """What the two losses need from z, each with its own gradient path."""

    v: torch.Tensor  # [C, K, D] leave-one-out slot variance; gradient to z only
    mu: torch.Tensor  # [C, K, D] slot means in z's scale; no gradient
    mass: torch.Tensor  # [C, K] mean responsibility; no gradient
    counts: torch.Tensor  # [C]
    e2: torch.Tensor  # [n, K] squared residual to each own-class slot's centre; gradient to r only
    class_var: torch.Tensor  # [C] mean squared distance to the class mean; no gradient
    intra_mse: torch.Tensor  # () the same over the batch; no gradient


# The leave-one-out centre of slot k for sample m (class c) is
#   centre_mk = (S_ck - r_mk z_m + KAPPA zl_m) / (V1_ck - r_mk + KAPPA),
# S_ck = sum_{j in c} r_jk z_j, V1_ck = sum_{j in c} r_jk, zl_m = mean of m's classmates. A slot
# owning only sample m is centred on the classmates, so it does not read as tight. With z
# centred per class (zc), T_c = sum_{j in c} zc_j (zero up to rounding, but its gradient is the
# loss's) and b_c = 1 / (n_c - 1), zl_m = b_c (T_c - zc_m), and the residual is
#   z_m - centre_mk = (A_ck zc_m - P_ck) / B_mk,   A = V1 + KAPPA (1 + b), P = S + KAPPA b T,
# B_mk = V1_ck - r_mk + KAPPA. Its square expands into the moments sum_m q zc^2 and sum_m q zc
# (q = r / B^2): matrix products, no [n, K, D] tensor.
def loo_statistics(z: torch.Tensor, y: torch.Tensor, onehot: torch.Tensor, r: torch.Tensor) -> LooStats:
    """Statistics of z [n, D] under responsibilities r [n, K] (onehot [n, C] of the labels y).

    The slot variance v carries gradient to z only (r is taken as fixed), the residuals e2 to
    r only (z taken as fixed): the encoder's loss and the module's fit share one pass.
    """
    n, D = z.shape
    C, K = onehot.shape[1], r.shape[1]
    counts = onehot.sum(0)
    with torch.no_grad():
        mean = (onehot.T @ z) / counts.clamp(min=1)[:, None]
    # Residuals do not change when a class is shifted; centring keeps the expansion accurate.
    zc = z - mean[y]
    T = onehot.T @ zc  # [C, D]
    kb = KAPPA / (counts - 1).clamp(min=1)  # [C]
    W = spread_to_classes(r, onehot)  # [n, C*K]
    V1 = W.sum(0).view(C, K)
    Wd, V1d = W.detach(), V1.detach()
    sq = torch.cat([zc * zc, zc], 1)  # [n, 2D]
    # v: sum over the class's samples of q (A zc - P)^2 / V1; gradient to z.
    S = (Wd.T @ zc).view(C, K, D)
    P = S + kb[:, None, None] * T[:, None, :]
    A = (V1d + KAPPA + kb[:, None])[..., None]  # [C, K, 1]
    q = Wd / (V1d.view(1, -1) - r.detach().repeat(1, C) + KAPPA).pow(2)  # [n, C*K]
    m0, m1 = (q.T @ sq).view(C, K, 2, D).unbind(2)
    num = A * (A * m0 - 2 * P * m1) + P.pow(2) * q.sum(0).view(C, K, 1)
    v = num.clamp(min=0) / V1d.clamp(min=1e-6)[..., None]
    # e2: the same residual per sample, its square summed over dimensions; gradient to r.
    Pr = ((W.T @ zc.detach()).view(C, K, D) + kb[:, None, None] * T.detach()[:, None, :]).flatten(0, 1)
    a = onehot @ (V1 + KAPPA)  # [n, K], own class
    Ar = a + (onehot @ kb)[:, None]
    s0 = sq.detach()[:, :D].sum(1, keepdim=True)  # |zc_m|^2
    num2 = Ar * (Ar * s0 - 2 * own_class(zc.detach() @ Pr.T, onehot)) + onehot @ Pr.pow(2).sum(1).view(C, K)
    e2 = num2.clamp(min=0) / ((a - r).pow(2) * D)
    with torch.no_grad():
        mu = S / V1d.clamp(min=1e-6)[..., None] + mean[:, None, :]
        mass = V1d / counts.clamp(min=1)[:, None]
        class_var = (onehot.T @ s0[:, 0]) / (D * counts.clamp(min=1))
    return LooStats(v, mu, mass, counts, e2, class_var, s0.mean() / D)


class SlotEstimator(nn.Module):
    """The auxiliary module: responsibilities of each sample for its class's slots, plus the
    learned parts of the gates (dimension gate MLP, slot power). It never sees the classifier."""

    def __init__(self, dim: int, num_classes: int, *, num_slots: int = 8, hidden: int = 64, num_iterations: int = 3):
        super().__init__()
        self.dim, self.num_classes, self.num_slots = dim, num_classes, num_slots
        self.hidden, self.num_iterations = hidden, num_iterations
        self.embed = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden))
        self.slot_attention = SlotAttention(hidden, num_slots, num_iterations)
        self.cross = GatedCrossAttention(hidden)
        self.norm_h = nn.LayerNorm(hidden)
        self.log_beta = nn.Parameter(torch.tensor(math.log(5.0)))
        self.slot_power = nn.Parameter(torch.tensor(1.0))
        self.gate_norm = nn.LayerNorm(dim)
        self.gate_mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))
        nn.init.constant_(self.gate_mlp[-1].bias, GATE_INIT_BIAS)

    def forward(self, z: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """z [n, D], onehot [n, C] -> responsibilities r [n, K] over the slots of each sample's class."""
        u = self.embed(z)
        slots = self.slot_attention(u, onehot.T)  # [C, K, H]
        h = F.normalize(self.norm_h(self.cross(u, slots, onehot)), dim=-1)
        cos = own_class(h @ F.normalize(slots, dim=-1).flatten(0, 1).T, onehot)
        return torch.softmax(self.log_beta.exp() * cos, dim=-1)

    def gate_logits(self, v: torch.Tensor, excess: torch.Tensor) -> torch.Tensor:
        """Dimension gate logits [C, K, D] from the LayerNormed log variance v [C, K, D] and its
        excess over the noise threshold (log(v + GAMMA) - threshold), both without gradient."""
        first, last = self.gate_mlp[0], self.gate_mlp[2]
        w = first.weight  # [16, 2]
        # The MLP runs on every (class, slot, dimension), [C*K*D, 16] in its middle, so its
        # layers are written as outer products (addr) and a matrix-vector product: their
        # backward is matrix-vector products and broadcasts, not skinny matrix products.
        x1 = self.gate_norm(torch.log(v + 1e-8)).flatten()
        hidden = torch.addr(first.bias, excess.flatten(), w[:, 1]).addr_(x1, w[:, 0]).relu_()
        return torch.addmv(last.bias, hidden, last.weight[0]).view(v.shape)

    def slot_weights(self, mass: torch.Tensor) -> torch.Tensor:
        """w_k = mass_k^p / sum_k mass_k^p, per class ([C, K])."""
        logw = self.slot_power * torch.log(mass.clamp(min=1e-8))
        return torch.softmax(logw, dim=-1)

    def objective(
        self, r: torch.Tensor, stats: LooStats, y: torch.Tensor, gate_logits: torch.Tensor, excess: torch.Tensor
    ) -> torch.Tensor:
        """The module's own loss (stats of z and excess fixed: gradients reach the module only).

        Leave-one-out fit: each sample's squared distance to the slot centre built from its
        classmates, weighted by its responsibilities, relative to its class's variance (about 1
        with uniform responsibilities, lower with a real sub-cluster structure). Plus the
        mixing-weight likelihood for the slot power (as KL(mass || w), 0 at its optimum) and a
        calibration target for the dimension gate (variance above the noise threshold or not).
        None of them pays for a smaller rob_loss.
        """
        counts, mass = stats.counts, stats.mass
        fit = ((r * stats.e2).sum(1) / stats.class_var.clamp(min=1e-8)[y]).mean()
        w = self.slot_weights(mass)
        pi_kl = (torch.xlogy(mass, mass) - mass * torch.log(w.clamp(min=1e-12))).sum(1)
        pi_kl = (pi_kl * counts).sum() / counts.sum().clamp(min=1)
        present = (counts >= 2).to(r.dtype)[:, None, None]
        bce = F.binary_cross_entropy_with_logits(gate_logits, (excess > 0).to(r.dtype), reduction="none")
        bce = (bce * present).sum() / (present.sum() * gate_logits.shape[1] * gate_logits.shape[2]).clamp(min=1)
        return fit + pi_kl + bce

    @torch.no_grad()
    def scalars(self) -> dict[str, float]:
        values = torch.stack(
            [self.log_beta.exp(), self.slot_power, torch.tanh(self.cross.alpha_attn), torch.tanh(self.cross.alpha_ffn)]
        ).tolist()
        return dict(zip(("beta", "slot_power", "alpha_attn", "alpha_ffn"), values))


# ------------------------------------------------------------------------- the defense

LR_PIVOT = 4.1e-4  # as gmm-cem: the CEM gradient is scaled by 0.001 / lr above this learning rate
GATE_FLOOR = 0.5  # no data-dependent gate can weigh a dimension or slot below this
SOFTPLUS_SHARPNESS = 10.0  # softplus(x, beta=10): ReLU-like, yet with gradient near the threshold


class SlotCem(Defense):
    """CEM with a differentiable mixture: Slot Attention finds sub-clusters, z is pulled into them.

    Per class in the batch (z_m: flattened encoder output before noise, D dims), three stages:
    (1) Slot Attention: LayerNorm + a projection to `hidden` dims, keys/values, `num_slots` slots
    drawn from a learnable Gaussian, `num_iterations` rounds of softmax-over-slots attention
    (slots compete for samples), a mean over samples, GRU and residual MLP; (2) gated cross
    attention: samples query the slots, h = u + tanh(a_attn) Wo(attn), h += tanh(a_ffn) FFN(LN h),
    the alphas start at 0.1; (3) responsibilities r_mk = softmax_k(beta cos(LN h_m, s_k)), then
    per slot and dimension the variance v_kd of z, gates, and the class score
    L_c = mean_d sum_k w_k g_kd softplus(log(v_kd + 0.01) - log(tau sigma^2 + 0.01)), with
    slot weights w_k = mass_k^p / sum mass^p, gates g = dimension gate (sigmoid MLP of the
    LayerNormed log variance) x SNR gate (sigma^2 / (mu^2 + eps)), and a class gate
    sigmoid(2 (n_c - 2.5)) (0 for a single sample). rob_loss = attention_loss_scale *
    sum_c (n_c / n) gate_c L_c; the encoder receives lam * s * rob_loss with s = 0.001 / lr when
    lr >= 4.1e-4, else 1 (as gmm-cem). intra_mse (mean squared distance of z to its class mean
    per dimension) is logged, without gradient.

    The hazard, and how it is prevented: a module that minimizes rob_loss itself can drive it to
    zero (close the gates, weight only the tightest slot, give each sample its own slot) while
    z stays as it was. Here:
    - rob_loss is a function of z in z's own scale (no LayerNorm, no learned map of z): the
      module supplies only responsibilities, gates and slot weights, all *detached* in
      rob_loss. No gradient of rob_loss reaches a module parameter (a test checks it).
    - The module learns from its own objective, which does not reward a small rob_loss: a
      leave-one-out fit (predict each sample from the slot centre built from its classmates,
      relative to the class variance), so a slot owning a single sample gains nothing; the slot
      power by the likelihood of the mixing weights (optimum: weights = slot masses, p = 1); the
      dimension gate by a calibration target that z sets (does this dimension's variance exceed
      the noise threshold?), never by the loss it gates.
    - v_kd is a leave-one-out variance, so sub-clusters of one or two samples are not measured
      as tight; all gates are bounded below by 0.5 (0.5 + 0.5 sigmoid).
    With z frozen, training the module for hundreds of steps leaves rob_loss well above half
    its start and the gates open (tests/test_slot_cem.py); only z moving lowers it.

    Training: off while epoch < warmup (loss returns None) or lam = 0. The module is built on
    first use, for the flattened size of z and the number of classes, and its parameters join
    the optimizer through ctx.add_parameters (no weight decay). The returned term is
    lam * s * rob_loss (encoder only) + module_loss (module only, computed on z.detach(),
    unscaled): one backward gives both their own gradients. NaN/Inf in z, rob_loss, the module
    loss or intra_mse turn the term into 0 and are counted on the device (no per-step sync).
    On a CPU the defense's forward and backward run on one thread (see `_one_thread`).

    Options (keyword-only; on the command line `-o key=value`):
        lam: lambda, the CEM weight (default 16 as gmm-cem; `lambda` is a Python keyword).
        num_slots: slots per class (default 8).
        num_iterations: Slot Attention rounds (default 3).
        attention_loss_scale: factor on rob_loss (default 0.25).
        var_threshold: tau, the variance target relative to sigma^2 (default 0.125).
        warmup: epochs trained without CEM (default 3).
        hidden: width of the attention (default 64; z is projected down to it).
        module_lr_scale: the module's learning rate as a multiple of the schedule's (default 1).

    Logged per epoch (in the loop's epoch line, once): rob_loss, module_loss, intra_mse,
    mean dimension / SNR / class gates, slot power, beta, the two alphas, nan_count.

    Example:
        privbench train --defense slot-cem -o lam=16 --cut 4 --bottleneck C8 --noise 0.025
    """

    name = "slot-cem"
    summary = "CEM with a Slot-Attention + gated cross-attention mixture estimate (encoder regularizer)"
    strength_grid = (4.0, 16.0, 64.0)
    knob = "lam"
    saved = ("shape", "module")

    def __init__(
        self,
        *,
        lam: float = 16.0,
        num_slots: int = 8,
        num_iterations: int = 3,
        attention_loss_scale: float = 0.25,
        var_threshold: float = 0.125,
        warmup: int = 3,
        hidden: int = 64,
        module_lr_scale: float = 1.0,
    ):
        for key, value in (("num_slots", num_slots), ("num_iterations", num_iterations), ("hidden", hidden)):
            if int(value) != value or value < 1:
                raise ValueError(f"invalid {key} {value}: need an integer >= 1")
        if int(warmup) != warmup or warmup < 0:
            raise ValueError(f"invalid warmup {warmup}: need an integer >= 0")
        if not lam >= 0:
            raise ValueError(f"invalid lam {lam}: the CEM weight must be >= 0")
        if not attention_loss_scale >= 0:
            raise ValueError(f"invalid attention_loss_scale {attention_loss_scale}: must be >= 0")
        if not var_threshold >= 0:
            raise ValueError(f"invalid var_threshold {var_threshold}: must be >= 0")
        if not module_lr_scale > 0:
            raise ValueError(f"invalid module_lr_scale {module_lr_scale}: must be > 0")
        self.module_lr_scale = float(module_lr_scale)
        self.lam, self.scale, self.var_threshold = float(lam), float(attention_loss_scale), float(var_threshold)
        self.num_slots, self.num_iterations = int(num_slots), int(num_iterations)
        self.hidden, self.warmup = int(hidden), int(warmup)
        self.module: SlotEstimator | None = None
        self.shape: torch.Tensor | None = None  # the module's [dim, classes, slots, hidden, iterations]
        self._guarded: SlotEstimator | None = None  # the module whose gradients _guard masks
        self._bad: torch.Tensor | None = None
        self.num_classes: int | None = None
        self.sigma = 0.0
        self.ctx: TrainContext | None = None
        self.last: dict[str, torch.Tensor] = {}  # the latest step's values (tests, debugging)
        self._sums: torch.Tensor | None = None  # on-device epoch sums, see STAT_KEYS
        self._steps = 0
        self._intra_steps = 0
        self._threads = 0  # the thread count to give back when a backward left this step's one thread

    # -- hooks --------------------------------------------------------------------------------

    def setup(self, ctx: TrainContext) -> None:
        self.ctx, self.num_classes, self.sigma = ctx, int(ctx.num_classes), float(ctx.noise_std)
        self._sums = torch.zeros(len(STAT_KEYS), device=ctx.device)
        self._steps = self._intra_steps = 0
        if self.module is not None:  # loaded from a checkpoint: continue training it
            if self.module.num_classes != self.num_classes:
                raise UserError(
                    f"slot-cem state is for {self.module.num_classes} classes; this run has {self.num_classes}"
                )
            self.module.to(ctx.device)
            ctx.add_parameters(list(self.module.parameters()), lr_scale=self.module_lr_scale)

    def compile_hot_path(self, compile) -> None:
        # forward (module, statistics, both losses) is one graph: on a GPU its ~1,000 small ops
        # per step (forward and backward) would otherwise each be a kernel launch.
        self.forward = compile(self.forward)

    def loss(self, z: torch.Tensor, y: torch.Tensor, *, epoch: int, lr: float) -> torch.Tensor | None:
        if self.num_classes is None or self._sums is None:
            raise RuntimeError("slot-cem: setup(ctx) must run before loss()")
        self._intra_steps += 1
        with torch.autocast(z.device.type, enabled=False):
            zf = z.float().flatten(1)
            if self.lam == 0 or epoch < self.warmup:
                intra = intra_class_mse(zf.detach(), y, self.num_classes)
                intra_bad = ~torch.isfinite(intra)
                self._sums[STAT_KEYS.index("intra_mse")] += torch.where(intra_bad, 0.0, intra)
                self._sums[STAT_KEYS.index("nan_count")] += intra_bad.float()
                return None
            if self.module is None:
                self._build(zf.shape[1], zf.device)
            assert self.module is not None
            threads = self._one_thread(zf)
            if threads:
                zf = zf.view_as(zf)  # a node of the defense's own: its gradient ends the defense's backward
            try:
                out = self.forward(zf, y)
            finally:
                if threads:
                    torch.set_num_threads(threads)
        intra_bad = ~torch.isfinite(out["intra_mse"])
        self._guard(zf, out["bad"])
        s = 0.001 / lr if lr >= LR_PIVOT else 1.0
        zero = torch.zeros((), device=zf.device)
        term = torch.where(out["bad"], zero, self.lam * s * out["rob_loss"] + out["module_loss"])
        stats = torch.stack([torch.where(out["bad"], zero, out[k].detach()) if k in out else zero for k in STAT_KEYS])
        stats[STAT_KEYS.index("intra_mse")] = torch.where(intra_bad, zero, out["intra_mse"])  # every step
        stats[STAT_KEYS.index("nan_count")] = (out["bad"] | intra_bad).float()
        self._sums += stats
        self._steps += 1
        self.last = {k: v.detach() for k, v in out.items()}
        if threads and term.requires_grad:
            term.register_hook(lambda g: self._set_threads(1, threads))
            zf.register_hook(lambda g: self._set_threads(threads, 0))
        return term

    def _guard(self, zf: torch.Tensor, bad: torch.Tensor) -> None:
        """Drop a non-finite step's gradient at its leaves. torch.where(bad, 0, term) zeroes the
        term, not its backward: a zero upstream gradient times an infinite local derivative is NaN,
        which reached the encoder and killed 2 of 3 seeds at lam=4 in their last epoch. The mask is
        a device tensor (no host sync); a finite step's gradients pass unchanged, bit for bit."""
        self._bad = bad
        if zf.requires_grad:
            zf.register_hook(lambda g: torch.where(bad, torch.zeros_like(g), g))
        if self._guarded is not self.module:  # once per module (built, or loaded to resume)
            for p in self.module.parameters():
                p.register_hook(lambda g: torch.where(self._bad, torch.zeros_like(g), g))
            self._guarded = self.module

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both losses and the gate statistics for a batch (z: [n, D] float, y: [n])."""
        assert self.module is not None and self.num_classes is not None
        finite = torch.isfinite(z).all()
        z = torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)
        onehot = F.one_hot(y, self.num_classes).to(z.dtype)  # [n, C]
        r = self.module(z.detach(), onehot)  # [n, K], gradient to the module only
        threshold = math.log(self.var_threshold * self.sigma**2 + GAMMA)
        # Encoder path: statistics of z itself (v), every module output detached.
        st = loo_statistics(z, y, onehot, r)
        v, counts = st.v, st.counts
        excess = torch.log(v + GAMMA) - threshold  # [C, K, D]
        gate_logits = self.module.gate_logits(v.detach(), excess.detach())  # grad to the MLP only
        with torch.no_grad():
            dim_gate = GATE_FLOOR + (1 - GATE_FLOOR) * torch.sigmoid(gate_logits)
            snr_gate = GATE_FLOOR + (1 - GATE_FLOOR) * torch.sigmoid(torch.log((st.mu.pow(2) + 1e-4) / (v + 1e-4)))
            gates = self.module.slot_weights(st.mass)[..., None] * dim_gate * snr_gate  # [C, K, D]
            class_gate = torch.sigmoid(2 * (counts - 2.5)) * (counts >= 2)
            present = (counts >= 1).float()
        per_class = (gates * F.softplus(excess, beta=SOFTPLUS_SHARPNESS)).sum(1).mean(-1)  # [C]
        rob = self.scale * (counts / counts.sum().clamp(min=1) * class_gate * per_class).sum()
        module_loss = self.module.objective(r, st, y, gate_logits, excess.detach())
        slot_w = st.mass * present[:, None]  # averages over the slots of the classes in the batch
        mean_w = slot_w.sum().clamp(min=1e-12)
        bad = ~(finite & torch.isfinite(rob) & torch.isfinite(module_loss))
        return {
            "rob_loss": rob,
            "module_loss": module_loss,
            "intra_mse": torch.where(finite, st.intra_mse, torch.nan),  # as measured on the raw z
            "dim_gate": (dim_gate.mean(-1) * slot_w).sum() / mean_w,
            "snr_gate": (snr_gate.mean(-1) * slot_w).sum() / mean_w,
            "class_gate": (class_gate * present).sum() / present.sum().clamp(min=1),
            "bad": bad,
        }

    def epoch_end(self, epoch: int, ctx: TrainContext) -> dict[str, float]:
        if self._threads:
            self._set_threads(self._threads, 0)
        if self._sums is None:
            return {}
        sums = self._sums.tolist()  # the one host sync of the epoch
        self._sums.zero_()
        steps, intra_steps = max(1, self._steps), max(1, self._intra_steps)
        active = self._steps > 0
        self._steps = self._intra_steps = 0
        row = {"cem_active": float(active), "intra_mse": sums[STAT_KEYS.index("intra_mse")] / intra_steps}
        row["nan_count"] = sums[STAT_KEYS.index("nan_count")]
        if active and self.module is not None:
            for k in ("rob_loss", "module_loss", "dim_gate", "snr_gate", "class_gate"):
                row[k] = sums[STAT_KEYS.index(k)] / steps
            row.update(self.module.scalars())
        return row  # the loop logs it in the epoch line; a line of our own would print it twice

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        # Not generic: the module's size (z's dims, the classes) is known only from the state, so build it first.
        shape = (state or {}).get("shape")
        if self.module is not None or not isinstance(shape, torch.Tensor):
            super().load_state_dict(state)
            return
        try:
            dim, classes, slots, hidden, iters = (int(v) for v in shape.tolist())
            self.module = SlotEstimator(dim, classes, num_slots=slots, hidden=hidden, num_iterations=iters)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise UserError(f"slot-cem state does not load: {type(exc).__name__}: {exc}") from None
        try:
            super().load_state_dict(state)
        except UserError:
            self.module = None  # nothing half-loaded
            raise
        self.num_slots, self.hidden, self.num_iterations = slots, hidden, iters

    # -- diagnostics --------------------------------------------------------------------------

    @torch.no_grad()
    def responsibilities(self, z: torch.Tensor, y: torch.Tensor, *, seed: int = 0) -> torch.Tensor | None:
        """The trained module's responsibilities [N, K] of each sample of z ([N, ...], before
        noise) for the slots of its own class, all N samples in one pass (the slots are drawn
        once, with the random state seeded to `seed` inside torch.random.fork_rng, so the
        global random state is left as it was and every call draws the same slots).
        None without a module (before the first CEM step, or a checkpoint's state not loaded).
        Pure: no parameter, mode or statistic of the defense changes."""
        if self.module is None or len(y) == 0:
            return None
        m = self.module
        device = next(m.parameters()).device
        zf = z.detach().flatten(1).float().to(device)
        if zf.shape[1] != m.dim:
            raise ValueError(f"slot-cem module is for {m.dim} features, z has {zf.shape[1]}")
        if int(y.max()) >= m.num_classes:
            raise ValueError(f"slot-cem module is for {m.num_classes} classes, y has label {int(y.max())}")
        onehot = F.one_hot(y.to(device), m.num_classes).float()
        cuda = []
        if device.type == "cuda":
            cuda = [device.index if device.index is not None else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=cuda):
            torch.random.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.manual_seed(seed)
            r = m(zf, onehot)
        return r.to(z.device)

    def conditional_entropy(self, z: torch.Tensor, y: torch.Tensor, *, noise_std: float | None = None) -> float | None:
        """-I_mix (nats): the mixture's lower bound on H(x|z) - H(x), i.e. the CEM bound on H(x|z)
        for H(x) = 0 (the largest entropy images in [0,1]^d can have; add the real H(x) if known).

        As gmm-cem's (privbench.engine.diagnostics.mixture_information), with the slots as components:
        I_mix = H(J) + sum_j w_j 1/2 sum_d log(1 + v_jd / sigma^2), j = (class, slot), w_j the
        slot's soft share of the N samples under the module's responsibilities, v_jd the
        responsibility-weighted variance of z (not the leave-one-out variance of the loss, and
        without its gates, threshold and scale), summed over all D dimensions. Soft
        responsibilities still give an upper bound on I(x; z + noise) when w and v are exact;
        these are plug-in estimates. Without a trained module (state not loaded) the slots are
        replaced by a per-class k-means with num_slots clusters (gmm-cem's estimator): still a
        bound of the same kind, but not this defense's own partition. sigma = noise_std or the
        channel noise given at setup; None when neither is known, -inf when it is 0. Pure.
        """
        sigma = noise_std if noise_std is not None else (self.sigma if self.num_classes is not None else None)
        if sigma is None or len(y) == 0:
            return None
        C = max(int(y.max()) + 1, self.module.num_classes if self.module is not None else 0)
        resp = self.responsibilities(z, y)
        if resp is None:
            resp = kmeans_responsibilities(z.flatten(1), y, C, self.num_slots)
        return -mixture_information(z, y, resp, float(sigma), C)

    # -- internals ----------------------------------------------------------------------------

    # Profiled on 2 CPU cores, a step of this defense is ~1,000 ops on tensors of 10^3-10^5
    # elements. Each op big enough to go parallel wakes the other OpenMP thread (a futex under
    # OMP_WAIT_POLICY=PASSIVE) for a few microseconds of work: on two threads the defense's forward and
    # backward took 1.3x as long as on one. So on a CPU it runs on one thread: forward here,
    # backward from the hook on its output to the hook on its input (the autograd engine runs a
    # graph's newest nodes first, so all of the defense's nodes run in between, before the
    # server's and encoder's). What is computed does not change.
    def _one_thread(self, zf: torch.Tensor) -> int:
        """Switch to one thread for this step; returns the count to restore (0: not switched)."""
        if self._threads:  # a backward that stopped short of z (autograd.grad on the module) left one thread
            self._set_threads(self._threads, 0)
        threads = torch.get_num_threads()
        if zf.device.type != "cpu" or threads == 1 or not zf.requires_grad:
            return 0
        torch.set_num_threads(1)
        return threads

    def _set_threads(self, n: int, pending: int) -> None:
        torch.set_num_threads(n)
        self._threads = pending

    def _build(self, dim: int, device: torch.device) -> None:
        assert self.num_classes is not None
        self.module = SlotEstimator(
            dim, self.num_classes, num_slots=self.num_slots, hidden=self.hidden, num_iterations=self.num_iterations
        ).to(device)
        self.shape = torch.tensor([dim, self.num_classes, self.num_slots, self.hidden, self.num_iterations])
        if self.ctx is not None:
            self.ctx.add_parameters(list(self.module.parameters()), lr_scale=self.module_lr_scale)


STAT_KEYS = ("rob_loss", "module_loss", "intra_mse", "dim_gate", "snr_gate", "class_gate", "nan_count")
