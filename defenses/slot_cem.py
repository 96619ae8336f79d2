"""slot-CEM: the CEM regularizer with a learned Slot-Attention mixture estimate instead of k-means.

Source: the slot + gated-cross-attention CEM manual (docs/slot-cem.md restates it); the loss it
approximates is GMM-CEM's (docs/gmm-cem.md). Our own code.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from privbench.errors import UserError
from privbench.features import intra_class_mse
from privbench.plugins import Defense, TrainContext

LR_PIVOT = 4.1e-4  # as gmm-cem: the CEM gradient is scaled by 0.001 / lr above this learning rate
GAMMA = 0.01  # as gmm-cem: log(v + 0.01) keeps the threshold defined when the noise is 0
GATE_FLOOR = 0.5  # no data-dependent gate can weigh a dimension or slot below this
SOFTPLUS_SHARPNESS = 10.0  # softplus(x, beta=10): ReLU-like, yet with gradient near the threshold
KAPPA = 1.0  # pseudo-samples pulling a leave-one-out slot centre towards the class's other samples
GATE_INIT_BIAS = 3.0  # sigmoid(3) = 0.95: the dimension gates start open


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

    Options (keyword-only; on the command line `-o key=value`):
        lam: lambda, the CEM weight (default 16 as gmm-cem; `lambda` is a Python keyword).
        num_slots: slots per class (default 8).
        num_iterations: Slot Attention rounds (default 3).
        attention_loss_scale: factor on rob_loss (default 0.25).
        var_threshold: tau, the variance target relative to sigma^2 (default 0.125).
        warmup: epochs trained without CEM (default 3).
        hidden: width of the attention (default 64; z is projected down to it).
        module_lr_scale: the module's learning rate as a multiple of the schedule's (default 1).

    Logged per epoch ("[CEM-GATE]" line and the epoch row): rob_loss, module_loss, intra_mse,
    mean dimension / SNR / class gates, slot power, beta, the two alphas, nan_count.

    Example:
        privbench train --defense slot-cem -o lam=16 --cut 4 --bottleneck C8 --noise 0.025
    """

    name = "slot-cem"
    summary = "CEM with a Slot-Attention + gated cross-attention mixture estimate (encoder regularizer)"

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
        self.num_classes: int | None = None
        self.sigma = 0.0
        self.ctx: TrainContext | None = None
        self.last: dict[str, torch.Tensor] = {}  # the latest step's values (tests, debugging)
        self._sums: torch.Tensor | None = None  # on-device epoch sums, see STAT_KEYS
        self._steps = 0
        self._intra_steps = 0

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
        # forward (module, statistics, both losses) is one graph: on a GPU its ~1,500 small ops
        # per step would otherwise each be a kernel launch.
        self.forward = compile(self.forward)

    def loss(self, z: torch.Tensor, y: torch.Tensor, *, epoch: int, lr: float) -> torch.Tensor | None:
        if self.num_classes is None or self._sums is None:
            raise RuntimeError("slot-cem: setup(ctx) must run before loss()")
        with torch.autocast(z.device.type, enabled=False):
            zf = z.float().flatten(1)
            intra = intra_class_mse(zf.detach(), y, self.num_classes)
            intra_bad = ~torch.isfinite(intra)
            self._sums[STAT_KEYS.index("intra_mse")] += torch.where(intra_bad, 0.0, intra)
            self._intra_steps += 1
            if self.lam == 0 or epoch < self.warmup:
                self._sums[STAT_KEYS.index("nan_count")] += intra_bad.float()
                return None
            if self.module is None:
                self._build(zf.shape[1], zf.device)
            assert self.module is not None
            out = self.forward(zf, y)
        bad = out["bad"] | intra_bad
        s = 0.001 / lr if lr >= LR_PIVOT else 1.0
        zero = torch.zeros((), device=zf.device)
        term = torch.where(out["bad"], zero, self.lam * s * out["rob_loss"] + out["module_loss"])
        stats = torch.stack([
            torch.where(out["bad"], zero, out[k].detach()) if k in out else zero for k in STAT_KEYS
        ])  # fmt: skip
        stats[STAT_KEYS.index("intra_mse")] = 0.0  # summed above, every step
        stats[STAT_KEYS.index("nan_count")] = bad.float()
        self._sums += stats
        self._steps += 1
        self.last = {k: v.detach() for k, v in out.items()}
        return term

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both losses and the gate statistics for a batch (z: [n, D] float, y: [n])."""
        assert self.module is not None and self.num_classes is not None
        finite = torch.isfinite(z).all()
        z = torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)
        C = self.num_classes
        r = self.module(z.detach(), y, C)  # [n, K], gradient to the module only
        threshold = math.log(self.var_threshold * self.sigma**2 + GAMMA)
        # Encoder path: statistics of z itself, every module output detached.
        v, mu, mass, counts = loo_slot_variance(z, y, r.detach(), C)
        gate_logits = self.module.gate_logits(v.detach(), threshold)  # [C, K, D], grad to the MLP only
        with torch.no_grad():
            excess = torch.log(v + GAMMA) - threshold  # [C, K, D]
            dim_gate = GATE_FLOOR + (1 - GATE_FLOOR) * torch.sigmoid(gate_logits)
            snr_gate = GATE_FLOOR + (1 - GATE_FLOOR) * torch.sigmoid(torch.log((mu.pow(2) + 1e-4) / (v + 1e-4)))
            weights = self.module.slot_weights(mass)  # [C, K]
            class_gate = torch.sigmoid(2 * (counts - 2.5)) * (counts >= 2)
            present = (counts >= 1).float()
        term = F.softplus(torch.log(v + GAMMA) - threshold, beta=SOFTPLUS_SHARPNESS)
        per_class = (weights[..., None] * dim_gate * snr_gate * term).sum(1).mean(-1)  # [C]
        rob = self.scale * (counts / counts.sum().clamp(min=1) * class_gate * per_class).sum()
        module_loss = self.module.objective(z.detach(), y, r, C, gate_logits, excess, mass.detach())
        slot_w = mass * present[:, None]  # averages over the slots of the classes in the batch
        mean_w = slot_w.sum().clamp(min=1e-12)
        bad = ~(finite & torch.isfinite(rob) & torch.isfinite(module_loss))
        return {
            "rob_loss": rob,
            "module_loss": module_loss,
            "dim_gate": (dim_gate.mean(-1) * slot_w).sum() / mean_w,
            "snr_gate": (snr_gate.mean(-1) * slot_w).sum() / mean_w,
            "class_gate": (class_gate * present).sum() / present.sum().clamp(min=1),
            "bad": bad,
        }

    def epoch_end(self, epoch: int, ctx: TrainContext) -> dict[str, float]:
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
            ctx.log("[CEM-GATE] epoch=" + str(epoch + 1) + " " + " ".join(f"{k}={v:.4g}" for k, v in row.items()))
        return row

    def state_dict(self) -> dict[str, Any]:
        if self.module is None:
            return {}
        m = self.module
        return {
            "shape": torch.tensor([m.dim, m.num_classes, m.num_slots, m.hidden, m.num_iterations]),
            "module": {k: v.detach().cpu() for k, v in m.state_dict().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        try:
            dim, classes, slots, hidden, iters = (int(v) for v in state["shape"].tolist())
            module = SlotEstimator(dim, classes, num_slots=slots, hidden=hidden, num_iterations=iters)
            module.load_state_dict(state["module"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise UserError(f"slot-cem state does not load: {type(exc).__name__}: {exc}") from None
        self.module = module
        self.num_slots, self.hidden, self.num_iterations = slots, hidden, iters

    # -- internals ----------------------------------------------------------------------------

    def _build(self, dim: int, device: torch.device) -> None:
        assert self.num_classes is not None
        self.module = SlotEstimator(
            dim, self.num_classes, num_slots=self.num_slots, hidden=self.hidden, num_iterations=self.num_iterations
        ).to(device)
        if self.ctx is not None:
            self.ctx.add_parameters(list(self.module.parameters()), lr_scale=self.module_lr_scale)


STAT_KEYS = ("rob_loss", "module_loss", "intra_mse", "dim_gate", "snr_gate", "class_gate", "nan_count")


# -- the estimator ----------------------------------------------------------------------------


class SlotAttention(nn.Module):
    """Stage 1: per class, slots compete for the class's samples.

    Tokens stay unpadded ([n, H]); the class structure enters as the membership matrix
    member [C, n] (1 where sample m is in class c), so all classes run at once.
    """

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
        k, v = self.to_k(x), self.to_v(x)
        noise = torch.randn(C, self.num_slots, H, device=u.device, dtype=u.dtype)
        slots = self.slot_mu + self.slot_log_sigma.exp() * noise
        for _ in range(self.num_iterations):
            q = self.to_q(self.norm_slots(slots))
            attn = torch.softmax(q @ k.T * H**-0.5, dim=1)  # [C, K, n], over slots: they compete
            attn = attn * member[:, None, :]  # only the class's own samples
            attn = attn / (attn.sum(-1, keepdim=True) + 1e-8)  # a weighted mean over samples
            updates = attn @ v
            slots = self.gru(updates.reshape(-1, H), slots.reshape(-1, H)).view(C, self.num_slots, H)
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

    def forward(self, u: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """u [n, H], slots [n, K, H] (each sample's class slots) -> h [n, H]."""
        H = u.shape[-1]
        q = self.to_q(self.norm_q(u))
        s = self.norm_kv(slots)
        k, v = self.to_k(s), self.to_v(s)
        attn = torch.softmax(torch.einsum("nh,nkh->nk", q, k) * H**-0.5, dim=-1)  # over slots
        h = u + torch.tanh(self.alpha_attn) * self.out(torch.einsum("nk,nkh->nh", attn, v))
        return h + torch.tanh(self.alpha_ffn) * self.ffn(self.norm_ffn(h))


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

    def forward(self, z: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        """z [n, D], y [n] -> responsibilities r [n, K] over the slots of each sample's class."""
        u = self.embed(z)
        member = F.one_hot(y, num_classes).T.to(u.dtype)  # [C, n]
        # Each sample's class slots [n, K, H]; a product with the one-hot matrix rather than an
        # index, whose backward accumulates in a thread-dependent order (runs must repeat).
        slots = torch.einsum("cn,ckh->nkh", member, self.slot_attention(u, member))
        h = self.norm_h(self.cross(u, slots))
        cos = torch.einsum("nh,nkh->nk", F.normalize(h, dim=-1), F.normalize(slots, dim=-1))
        return torch.softmax(self.log_beta.exp() * cos, dim=-1)

    def gate_logits(self, v: torch.Tensor, threshold: float) -> torch.Tensor:
        """Dimension gate logits [C, K, D] from the LayerNormed log variance v [C, K, D] and its
        excess over the noise threshold."""
        excess = torch.log(v + GAMMA) - threshold
        feats = torch.stack([self.gate_norm(torch.log(v + 1e-8)), excess], -1)
        return self.gate_mlp(feats).squeeze(-1)

    def slot_weights(self, mass: torch.Tensor) -> torch.Tensor:
        """w_k = mass_k^p / sum_k mass_k^p, per class ([C, K])."""
        logw = self.slot_power * torch.log(mass.clamp(min=1e-8))
        return torch.softmax(logw, dim=-1)

    def objective(
        self,
        z: torch.Tensor,
        y: torch.Tensor,
        r: torch.Tensor,
        num_classes: int,
        gate_logits: torch.Tensor,
        excess: torch.Tensor,
        mass: torch.Tensor,
    ) -> torch.Tensor:
        """The module's own loss (z, excess and mass detached: gradients reach the module only).

        Leave-one-out fit: each sample's squared distance to the slot centre built from its
        classmates, weighted by its responsibilities, relative to its class's variance (about 1
        with uniform responsibilities, lower with a real sub-cluster structure). Plus the
        mixing-weight likelihood for the slot power (as KL(mass || w), 0 at its optimum) and a
        calibration target for the dimension gate (variance above the noise threshold or not).
        None of them pays for a smaller rob_loss.
        """
        # One-hot sums, not bincount: a fixed output shape keeps the step in one compiled graph.
        counts = F.one_hot(y, num_classes).sum(0).to(z.dtype)
        e2 = loo_sample_residuals(z, y, r, num_classes)  # [n, K], mean over dimensions
        class_var = intra_class_mse(z, y, num_classes, per_class=True).clamp(min=1e-8)  # [C]
        fit = ((r * e2).sum(1) / class_var[y]).mean()
        w = self.slot_weights(mass)
        pi_kl = (torch.xlogy(mass, mass) - mass * torch.log(w.clamp(min=1e-12))).sum(1)
        pi_kl = (pi_kl * counts).sum() / counts.sum().clamp(min=1)
        logits = gate_logits
        present = (counts >= 2).to(z.dtype)[:, None, None]
        bce = F.binary_cross_entropy_with_logits(logits, (excess > 0).to(z.dtype), reduction="none")
        bce = (bce * present).sum() / (present.sum() * logits.shape[1] * logits.shape[2]).clamp(min=1)
        return fit + pi_kl + bce

    @torch.no_grad()
    def scalars(self) -> dict[str, float]:
        values = torch.stack([
            self.log_beta.exp(), self.slot_power, torch.tanh(self.cross.alpha_attn), torch.tanh(self.cross.alpha_ffn)
        ]).tolist()  # fmt: skip
        return dict(zip(("beta", "slot_power", "alpha_attn", "alpha_ffn"), values))


# -- statistics of z (no learned parameters) --------------------------------------------------
#
# The leave-one-out centre of slot k for sample m (class c) is
#   centre_mk = (S_ck - r_mk z_m + KAPPA zl_m) / (V1_ck - r_mk + KAPPA),
# S_ck = sum_{j in c} r_jk z_j, V1_ck = sum_{j in c} r_jk, zl_m = mean of m's classmates. A slot
# owning only sample m is centred on the classmates, so it does not read as tight. With
# a_ck = V1_ck + KAPPA and B_mk = V1_ck - r_mk + KAPPA the residual is
#   z_m - centre_mk = (a_ck z_m - S_ck - KAPPA zl_m) / B_mk,
# whose square expands into sums over samples that are matrix products: no [n, K, D] tensor.


def _loo_parts(z: torch.Tensor, y: torch.Tensor, r: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    n, D = z.shape
    K = r.shape[1]
    onehot = F.one_hot(y, num_classes).to(z.dtype)  # [n, C]
    counts = onehot.sum(0)
    mean = (onehot.T @ z) / counts.clamp(min=1)[:, None]
    # Residuals do not change when a class is shifted; centring keeps the expansion accurate.
    zc = z - mean.detach()[y]
    zl = (onehot @ (onehot.T @ zc) - zc) / (counts[y] - 1).clamp(min=1)[:, None]  # products, not indexing
    W = (onehot[:, :, None] * r[:, None, :]).reshape(n, num_classes * K)  # [n, C*K]
    S = W.T @ zc  # [C*K, D]
    V1 = W.sum(0)  # [C*K]
    return {"zc": zc, "zl": zl, "W": W, "S": S, "V1": V1, "counts": counts, "mean": mean, "onehot": onehot}


def loo_slot_variance(
    z: torch.Tensor, y: torch.Tensor, r: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per class, slot and dimension, the responsibility-weighted mean of the leave-one-out
    squared residuals of z: v [C, K, D]; slot means mu [C, K, D] (in z's scale); slot masses
    [C, K] (mean responsibility); class counts [C]."""
    p = _loo_parts(z, y, r, num_classes)
    zc, zl, W, S, V1 = p["zc"], p["zl"], p["W"], p["S"], p["V1"]
    K, D = r.shape[1], z.shape[1]
    a = (V1 + KAPPA)[:, None]  # [C*K, 1]
    B = V1[None, :] - r.repeat(1, num_classes) + KAPPA  # [n, C*K]; only the own class is used
    q = W / B.pow(2)
    m = (q.T @ torch.cat([zc * zc, zc, zl * zl, zc * zl, zl], 1)).view(-1, 5, D)  # [C*K, 5, D]
    q0 = q.sum(0)[:, None]
    num = (
        a.pow(2) * m[:, 0] + S.pow(2) * q0 + KAPPA**2 * m[:, 2]
        - 2 * a * S * m[:, 1] - 2 * KAPPA * a * m[:, 3] + 2 * KAPPA * S * m[:, 4]
    )  # fmt: skip
    v = num.clamp(min=0) / V1.clamp(min=1e-6)[:, None]
    C = num_classes
    mu = (S / V1.clamp(min=1e-6)[:, None]).view(C, K, D) + p["mean"][:, None, :]
    mass = V1.view(C, K) / p["counts"].clamp(min=1)[:, None]
    return v.view(C, K, D), mu, mass, p["counts"]


def loo_sample_residuals(z: torch.Tensor, y: torch.Tensor, r: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean over dimensions of each sample's squared residual to each of its class's slots'
    leave-one-out centres: [n, K]."""
    p = _loo_parts(z, y, r, num_classes)
    zc, zl, S, V1 = p["zc"], p["zl"], p["S"], p["V1"]
    n, D = z.shape
    K = r.shape[1]
    onehot = p["onehot"]  # selections by one-hot products: deterministic backward on CPU

    def own(t: torch.Tensor) -> torch.Tensor:  # [n, C*K] or [C*K] -> the sample's own class [n, K]
        t = t.view(-1, num_classes, K)
        return (t * onehot[:, :, None]).sum(1) if t.shape[0] == n else onehot @ t[0]

    a = own(V1) + KAPPA
    B = a - r
    zS = own(zc @ S.T)  # z_m . S_ck for the own class's slots
    lS = own(zl @ S.T)
    S2 = own(S.pow(2).sum(1))
    num = (
        a.pow(2) * zc.pow(2).sum(1, keepdim=True) + S2 + KAPPA**2 * zl.pow(2).sum(1, keepdim=True)
        - 2 * a * zS - 2 * KAPPA * a * (zc * zl).sum(1, keepdim=True) + 2 * KAPPA * lS
    )  # fmt: skip
    return num.clamp(min=0) / (B.pow(2) * D)
