"""Per-class k-means on activations: gmm-cem's mixture fit, slot-cem's fallback, and the Eq. 3
bound's estimator for defenses without one (privbench.engine.diagnostics). Core code: plugins import it,
it imports no plugin."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def own_class_sq_dist(z: torch.Tensor, mu: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared distances [N, K] of z [N, D] to the K centroids of each sample's own class (mu: [C, K, D])."""
    C, K, D = mu.shape
    flat = mu.reshape(C * K, D)
    d = z.pow(2).sum(1, keepdim=True) - 2 * z @ flat.T + flat.pow(2).sum(1)  # [N, C*K]
    return d.view(-1, C, K)[torch.arange(len(y), device=z.device), y]


@torch.no_grad()
def kmeans_responsibilities(
    z: torch.Tensor, y: torch.Tensor, num_classes: int, k: int, *, iters: int = 50, seed: int = 0
) -> torch.Tensor:
    """One-hot [N, k]: each sample's cluster within its class after `kmeans_per_class` on z
    ([N, D]; k-means++ from a generator of its own, so the global random state is untouched)."""
    zf = z.detach().flatten(1).float()
    gen = torch.Generator(device=zf.device).manual_seed(seed)
    fit = kmeans_per_class(zf, y, num_classes, k, iters=iters, generator=gen)
    dist = own_class_sq_dist(zf, fit.centroids, y).masked_fill(fit.counts[y] <= 0, math.inf)
    return F.one_hot(dist.argmin(1), k).float()


@dataclass
class KMeansFit:
    centroids: torch.Tensor  # [C, K, D]
    counts: torch.Tensor  # [C, K] members per cluster
    var_diag: torch.Tensor  # [C, K, D] per-dimension variance around the centroid (0 if empty)
    within_var: torch.Tensor  # scalar: mean over all features and dims of (x - own centroid)^2
    iters: int  # Lloyd updates done (1 when a warm start was already a fixed point)


@torch.no_grad()
def kmeans_per_class(
    x: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    k: int,
    *,
    init: torch.Tensor | None = None,
    iters: int = 50,
    generator: torch.Generator | None = None,
) -> KMeansFit:
    """Lloyd k-means in every class at once, on a zero-padded [C, Nmax, D] layout.

    `init` ([C, K, D]) warm-starts; without it, k-means++ seeds each class. A cluster that loses
    all members keeps its previous centroid. Stops when no assignment changes.
    """
    C, D = num_classes, x.shape[1]
    counts_c = torch.bincount(labels, minlength=C)
    order = torch.argsort(labels, stable=True)
    starts = torch.cumsum(counts_c, 0) - counts_c
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(len(labels), device=labels.device) - starts[labels[order]]
    m = max(1, int(counts_c.max()))
    xp = x.new_zeros(C, m, D)
    xp[labels, rank] = x
    valid = torch.zeros(C, m, dtype=torch.bool, device=x.device)
    valid[labels, rank] = True
    mu = init.to(x).clone() if init is not None else _kmeans_pp(xp, valid, k, generator)
    x2 = xp.pow(2).sum(-1, keepdim=True)  # [C, m, 1]
    assign: torch.Tensor | None = None
    updates = 0
    for _ in range(iters):
        d = x2 - 2 * torch.bmm(xp, mu.transpose(1, 2)) + mu.pow(2).sum(-1)[:, None, :]
        new = d.argmin(-1).masked_fill(~valid, 0)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        onehot = F.one_hot(assign, k).to(x.dtype) * valid[..., None]  # [C, m, K]
        counts = onehot.sum(1)
        sums = torch.bmm(onehot.transpose(1, 2), xp)
        mu = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], mu)
        updates += 1
    onehot = F.one_hot(assign, k).to(x.dtype) * valid[..., None]
    counts = onehot.sum(1)
    resid = (xp - torch.gather(mu, 1, assign[..., None].expand(-1, -1, D))).pow(2) * valid[..., None]
    var_diag = torch.bmm(onehot.transpose(1, 2), resid) / counts.clamp(min=1)[..., None]
    within = resid.sum() / max(1, len(x) * D)
    return KMeansFit(mu, counts, var_diag, within, updates)


def _kmeans_pp(xp: torch.Tensor, valid: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling) for every class at once. [C, m, D] -> [C, K, D]."""
    C = xp.shape[0]
    rows = torch.arange(C, device=xp.device)
    uniform = valid.float()
    uniform[:, 0] += (uniform.sum(1) == 0).float()  # a class without images: any slot
    idx = torch.multinomial(uniform, 1, generator=generator)[:, 0]
    chosen = [xp[rows, idx]]
    dmin = (xp - chosen[0][:, None]).pow(2).sum(-1)
    for _ in range(1, k):
        w = dmin * valid
        w = torch.where(w.sum(1, keepdim=True) > 0, w, uniform)  # all points taken: duplicates
        idx = torch.multinomial(w, 1, generator=generator)[:, 0]
        chosen.append(xp[rows, idx])
        dmin = torch.minimum(dmin, (xp - chosen[-1][:, None]).pow(2).sum(-1))
    return torch.stack(chosen, 1)
