"""slot-cem as of commit de1d550: the reference that the faster code must reproduce.

The Slot-Attention + gated cross-attention estimator and the leave-one-out statistics exactly
as they were, before per-sample copies of the slots were removed and the two loss paths were
made to share one pass over z. The parameter names are the same, so a `ReferenceEstimator`
loads the plugin module's state_dict. Not a plugin (no Defense subclass) and not a test file.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from privbench.defenses.slot_cem import GATE_FLOOR, SOFTPLUS_SHARPNESS
from torch import nn

from privbench.engine.features import intra_class_mse

GAMMA, KAPPA, GATE_INIT_BIAS = 0.01, 1.0, 3.0


def reference_forward(defense, module: ReferenceEstimator, z: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """SlotCem.forward as it was (its options from `defense`, `module` in the plugin module's place)."""
    self = defense
    raw = z
    finite = torch.isfinite(z).all()
    z = torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)
    C = self.num_classes
    r = module(z.detach(), y, C)  # [n, K], gradient to the module only
    threshold = math.log(self.var_threshold * self.sigma**2 + GAMMA)
    # Encoder path: statistics of z itself, every module output detached.
    v, mu, mass, counts = loo_slot_variance(z, y, r.detach(), C)
    gate_logits = module.gate_logits(v.detach(), threshold)  # [C, K, D], grad to the MLP only
    with torch.no_grad():
        excess = torch.log(v + GAMMA) - threshold  # [C, K, D]
        dim_gate = GATE_FLOOR + (1 - GATE_FLOOR) * torch.sigmoid(gate_logits)
        snr_gate = GATE_FLOOR + (1 - GATE_FLOOR) * torch.sigmoid(torch.log((mu.pow(2) + 1e-4) / (v + 1e-4)))
        weights = module.slot_weights(mass)  # [C, K]
        class_gate = torch.sigmoid(2 * (counts - 2.5)) * (counts >= 2)
        present = (counts >= 1).float()
    term = F.softplus(torch.log(v + GAMMA) - threshold, beta=SOFTPLUS_SHARPNESS)
    per_class = (weights[..., None] * dim_gate * snr_gate * term).sum(1).mean(-1)  # [C]
    rob = self.scale * (counts / counts.sum().clamp(min=1) * class_gate * per_class).sum()
    module_loss = module.objective(z.detach(), y, r, C, gate_logits, excess, mass.detach())
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
        "intra_mse": intra_class_mse(raw.detach(), y, C),  # computed in loss() then
    }


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


class ReferenceEstimator(nn.Module):
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
        values = torch.stack(
            [self.log_beta.exp(), self.slot_power, torch.tanh(self.cross.alpha_attn), torch.tanh(self.cross.alpha_ffn)]
        ).tolist()
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
        a.pow(2) * m[:, 0]
        + S.pow(2) * q0
        + KAPPA**2 * m[:, 2]
        - 2 * a * S * m[:, 1]
        - 2 * KAPPA * a * m[:, 3]
        + 2 * KAPPA * S * m[:, 4]
    )
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
        a.pow(2) * zc.pow(2).sum(1, keepdim=True)
        + S2
        + KAPPA**2 * zl.pow(2).sum(1, keepdim=True)
        - 2 * a * zS
        - 2 * KAPPA * a * (zc * zl).sum(1, keepdim=True)
        + 2 * KAPPA * lS
    )
    return num.clamp(min=0) / (B.pow(2) * D)
