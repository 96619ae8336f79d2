"""slot-cem's mixture estimate: Slot Attention + gated cross attention, and the statistics of z.

Not a plugin (the registry skips files starting with "_"); defenses/slot_cem.py is the plugin.
The module proposes responsibilities of each sample for its class's slots and the learned parts
of the gates; `loo_statistics` measures z under those responsibilities with no learned
parameters, so rob_loss stays a function of the encoder's features (docs/slot-cem.md).

Everything per class runs for all classes at once through the one-hot matrix [n, C]: a
sample's own-class entries are picked by one-hot products rather than indexing, whose backward
accumulates in a thread-dependent order (runs must repeat). Per-class work (slot projections,
norms) runs on the C*K slot rows, never on per-sample copies of them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

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
        values = torch.stack([
            self.log_beta.exp(), self.slot_power, torch.tanh(self.cross.alpha_attn), torch.tanh(self.cross.alpha_ffn)
        ]).tolist()  # fmt: skip
        return dict(zip(("beta", "slot_power", "alpha_attn", "alpha_ffn"), values))
