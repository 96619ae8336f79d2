"""GMM-CEM: conditional entropy maximization with a per-class Gaussian-mixture estimate.

Paper: Xia et al., "Theoretical Insights in Model Inversion Robustness and Conditional Entropy
Maximization for Collaborative Inference Systems", CVPR 2025 (arXiv 2503.00383). Official code:
github.com/xiasong0501/CEM (model_training_paral_pruning.py, class MIA_train). Our own code.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from privbench.engine.diagnostics import mixture_information
from privbench.engine.features import encoder_features
from privbench.engine.kmeans import kmeans_per_class, kmeans_responsibilities, own_class_sq_dist
from privbench.errors import UserError
from privbench.plugin.base import Defense, TrainContext

LR_PIVOT = 4.1e-4  # below this learning rate the reference stops rescaling the CEM gradient
GAMMA = 0.01  # the reference's smoothing inside log(v + gamma)
BLEND = 10.0  # a_j = min(BLEND * n_j / N_j, A_MAX): weight of the batch estimate
A_MAX = 0.99
FEATURE_BATCH = 512  # images per forward pass of the epoch-end refit


class GmmCem(Defense):
    """Raise H(x|z) by shrinking each class's feature clusters relative to the channel noise.

    Theory: every attacker's reconstruction MSE is bounded below by exp(2 H(x|z)/d) / (2 pi e).
    With z = zhat + eps, eps ~ N(0, sigma^2 I) and zhat a Gaussian mixture (pi_j, mu_j, Sigma_j),
    H(x|z) >= H(x) - sum_j pi_j (-log pi_j + 1/2 log(|Sigma_j + sigma^2 I| / |sigma^2 I|)), so
    CEM adds lambda * L_C (the sum) to the task loss.

    What the official code does (estimator="reference", the default; it produced the paper's
    tables): after every epoch, one eval-mode pass of the encoder over the un-augmented training
    set (clean features, no noise) and a per-class k-means (K clusters; k-means++ the first time,
    warm-started from the previous centroids afterwards; Lloyd, at most `kmeans_iters`
    iterations). Per cluster it keeps the centroid mu_j, the scalar variance vbar_j (mean over
    members and dimensions of (z - mu_j)^2) and pi_j = n_j / N_class. Per batch, each sample
    goes to the nearest centroid of its own class; a cluster with n_j >= 1 members gets
    vhat_j (same mean, differentiable), v_j = a_j vhat_j + (1 - a_j) vbar_j with
    a_j = min(10 n_j / (pi_j N_class), 0.99), and
    term_j = pi_j ReLU(log(v_j + 0.01) - log(tau sigma^2 + 0.01)) (log_entropy=True) or
    pi_j (v_j + 0.001) (log_entropy=False). rob_loss = mean over the classes in the batch of
    sum_j term_j. The returned loss is lam * s * rob_loss with s = 0.001 / lr when
    lr >= 4.1e-4, else 1 (the reference rescales the encoder gradient this way). It depends on
    z only, so in the loop's single backward only the encoder receives it: the same update as
    the reference's separate encoder-only backward.

    estimator="paper": the paper's Eq. 5-7 instead, with diagonal covariances. The same k-means
    gives mu_j and the stored pi_j, Sigma_j (per dimension); per batch pi and Sigma are running
    blends of the stored values and the batch estimates (Sigma_j with a_j as above, pi with
    b_c = min(10 n_c / N_class, 0.99)), and rob_loss is the mean over classes in the batch of
    sum_j pi_j (-log pi_j + 1/2 sum_d log(1 + Sigma_jd / sigma^2)). It sums over the D
    dimensions, so it is about D times larger than the reference form: scale `lam` down.

    Differences from the reference (its defects, not copied): the refit pass uses un-augmented
    images; no per-step host sync and no Python loop over classes or clusters; a cluster left
    empty by k-means keeps its centroid with pi = 0, vbar = 0 (never NaN, never shifts the
    indices) and takes no samples in later batches; every class is clustered, even one with
    fewer than K images; N_class is the class's real count in the training set.

    Noise: sigma is the model's channel noise (--noise), which this defense composes with, as
    with --bottleneck C8 (the paper's setting: C8 + Sigmoid, sigma = 0.025). With sigma = 0 the
    reference form stays defined: its threshold becomes log(0.01), so it still shrinks every
    cluster (without noise nothing hides what is left; use --noise > 0 for privacy). The paper
    form needs sigma > 0 (log |sigma^2 I|) and refuses sigma = 0 at setup.

    Options (keyword-only; on the command line `-o key=value`):
        lam: lambda, the CEM weight (default 16; `lambda` is a Python keyword: `-o lam=16`).
        clusters: K per class (default 5, the official code; the paper's text says 3).
        var_threshold: tau, the variance target relative to sigma^2 (default 0.125).
        warmup: epochs trained without CEM (default 1: the first epoch).
        log_entropy: the log form (default True) or the linear form pi_j (v_j + 0.001).
        estimator: "reference" (default) or "paper".
        kmeans_iters: at most this many Lloyd iterations per refit (default 50).

    Logged per epoch: rob_loss (mean over the epoch's CEM steps, unweighted), within_var (mean
    squared distance per dimension of a training feature to its centroid), empty_clusters,
    kmeans_iters, refit_seconds (the extra pass plus k-means). lam = 0 skips the refit.

    Example:
        privbench train --defense gmm-cem -o lam=16 --cut 4 --bottleneck C8 --noise 0.025
    """

    name = "gmm-cem"
    summary = "conditional entropy maximization, per-class k-means mixture (Xia et al. CVPR'25)"
    strength_grid = (4.0, 16.0, 64.0)
    knob = "lam"
    saved = ("centroids", "vbar", "pi", "var_diag")  # the fitted mixture
    saved_optional = ("var_diag",)  # estimator="paper" only

    def __init__(
        self,
        *,
        lam: float = 16.0,
        clusters: int = 5,
        var_threshold: float = 0.125,
        warmup: int = 1,
        log_entropy: bool = True,
        estimator: str = "reference",
        kmeans_iters: int = 50,
    ):
        if not lam >= 0:
            raise ValueError(f"invalid lam {lam}: the CEM weight must be >= 0")
        if int(clusters) != clusters or clusters < 1:
            raise ValueError(f"invalid clusters {clusters}: need an integer >= 1")
        if not var_threshold >= 0:
            raise ValueError(f"invalid var_threshold {var_threshold}: must be >= 0")
        if int(warmup) != warmup or warmup < 0:
            raise ValueError(f"invalid warmup {warmup}: need an integer >= 0")
        if estimator not in ("reference", "paper"):
            raise ValueError(f"invalid estimator {estimator!r}: reference or paper")
        if int(kmeans_iters) != kmeans_iters or kmeans_iters < 1:
            raise ValueError(f"invalid kmeans_iters {kmeans_iters}: need an integer >= 1")
        if log_entropy not in (True, False, 0, 1):
            raise ValueError(f"invalid log_entropy {log_entropy!r}: true or false")
        self.lam, self.clusters, self.var_threshold = float(lam), int(clusters), float(var_threshold)
        self.warmup, self.log_entropy, self.estimator = int(warmup), bool(log_entropy), estimator
        self.kmeans_iters = int(kmeans_iters)
        # The mixture: [C, K, D], [C, K], [C, K] (and [C, K, D] diagonal variances for "paper").
        self.centroids: torch.Tensor | None = None
        self.vbar: torch.Tensor | None = None
        self.pi: torch.Tensor | None = None
        self.var_diag: torch.Tensor | None = None
        self.sigma = 0.0
        self.class_counts: torch.Tensor | None = None  # [C] training images per class
        self._rob_sum: torch.Tensor | None = None
        self._rob_steps = 0

    # -- hooks --------------------------------------------------------------------------------

    def setup(self, ctx: TrainContext) -> None:
        self.sigma = float(ctx.noise_std)
        if self.estimator == "paper" and self.lam > 0 and self.sigma <= 0:
            raise UserError(
                "gmm-cem estimator=paper needs --noise > 0: its loss is log(|Sigma + sigma^2 I| / |sigma^2 I|)"
            )
        if self.lam > 0 and self.sigma <= 0 and self.log_entropy:
            ctx.log("gmm-cem: noise 0, so the variance floor is log(0.01) and no noise hides what is left")
        self.class_counts = torch.bincount(ctx.train_labels, minlength=ctx.num_classes).float().to(ctx.device)
        self._rob_sum = torch.zeros((), device=ctx.device)
        self._rob_steps = 0
        if self.centroids is not None:  # loaded from a checkpoint
            if tuple(self.centroids.shape[:2]) != (ctx.num_classes, self.clusters):
                raise UserError(
                    f"gmm-cem state has {tuple(self.centroids.shape[:2])} (classes, clusters); "
                    f"this run needs ({ctx.num_classes}, {self.clusters})"
                )
            self._to(ctx.device)

    def compile_hot_path(self, compile) -> None:
        # rob_loss is plain tensor code over (z, y) and the fitted mixture: one graph, no syncs.
        self.rob_loss = compile(self.rob_loss)

    def loss(self, z: torch.Tensor, y: torch.Tensor, *, epoch: int, lr: float) -> torch.Tensor | None:
        if self.lam == 0 or epoch < self.warmup or self.centroids is None:
            return None
        with torch.autocast(z.device.type, enabled=False):
            rob = self.rob_loss(z.float(), y)
        self._rob_sum += rob.detach()
        self._rob_steps += 1
        scale = 0.001 / lr if lr >= LR_PIVOT else 1.0
        return self.lam * scale * rob

    def epoch_end(self, epoch: int, ctx: TrainContext) -> dict[str, float]:
        if self.lam == 0:
            return {}  # CEM off: no extra pass
        t0 = time.perf_counter()
        feats = encoder_features(ctx.client or ctx.model.encoder, ctx.train_images, FEATURE_BATCH)
        gen = torch.Generator(device=feats.device).manual_seed(ctx.seed + epoch)
        if self.centroids is not None and self.centroids.shape[-1] != feats.shape[1]:
            raise UserError(
                f"gmm-cem centroids have {self.centroids.shape[-1]} dims, the encoder gives {feats.shape[1]}"
            )
        fit = kmeans_per_class(
            feats,
            ctx.train_labels,
            ctx.num_classes,
            self.clusters,
            init=self.centroids,
            iters=self.kmeans_iters,
            generator=gen,
        )
        self.centroids = fit.centroids
        self.vbar = fit.var_diag.mean(-1)
        self.pi = fit.counts / fit.counts.sum(1, keepdim=True).clamp(min=1)
        self.var_diag = fit.var_diag if self.estimator == "paper" else None
        rob = self._rob_sum / max(1, self._rob_steps)
        empty = (fit.counts == 0).sum()
        rob_v, within, n_empty = torch.stack([rob, fit.within_var, empty.float()]).tolist()  # one sync
        self._rob_sum.zero_()
        self._rob_steps = 0
        return {
            "rob_loss": rob_v,
            "within_var": within,
            "empty_clusters": int(n_empty),
            "kmeans_iters": fit.iters,
            "refit_seconds": time.perf_counter() - t0,
        }

    # -- the loss -----------------------------------------------------------------------------

    def rob_loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """L_C on one batch (z: encoder output before noise, [B, ...]; y: [B]); a scalar."""
        assert self.centroids is not None and self.pi is not None and self.vbar is not None
        C, K, D = self.centroids.shape
        zf = z.flatten(1)
        with torch.no_grad():  # hard assignment to the nearest non-empty centroid of the own class
            dist = (zf[:, None, :] - self.centroids[y]).pow(2).sum(-1)  # [B, K]
            dist = dist.masked_fill(self.pi[y] <= 0, math.inf)
            g = y * K + dist.argmin(1)  # flat cluster index in [0, C*K)
        flat_mu = self.centroids.reshape(C * K, D)
        resid = (zf - flat_mu[g]).pow(2)  # [B, D], differentiable
        counts = torch.zeros(C * K, device=z.device).index_add_(0, g, torch.ones_like(g, dtype=torch.float))
        pi = self.pi.reshape(-1)
        expected = pi * self.class_counts.repeat_interleave(K)  # N_j: members per epoch
        a = (BLEND * counts / expected.clamp(min=1e-12)).clamp(max=A_MAX)
        in_batch = counts > 0
        class_n = counts.view(C, K).sum(1)
        present = (class_n > 0).float()
        if self.estimator == "paper":
            s2 = self.sigma**2
            sig_hat = torch.zeros(C * K, D, device=z.device).index_add(0, g, resid) / counts.clamp(min=1)[:, None]
            sig = a[:, None] * sig_hat + (1 - a[:, None]) * self.var_diag.reshape(C * K, D)
            b = (BLEND * class_n / self.class_counts.clamp(min=1)).clamp(max=A_MAX)[:, None]
            pi_run = b * counts.view(C, K) / class_n.clamp(min=1)[:, None] + (1 - b) * self.pi
            half_logdet = 0.5 * torch.log1p(sig / s2).sum(-1).view(C, K)
            per_class = (-torch.xlogy(pi_run, pi_run) + pi_run * half_logdet).sum(1)
        else:
            vhat = torch.zeros(C * K, device=z.device).index_add(0, g, resid.mean(1)) / counts.clamp(min=1)
            v = a * vhat + (1 - a) * self.vbar.reshape(-1)
            if self.log_entropy:
                floor = math.log(self.var_threshold * self.sigma**2 + GAMMA)
                term = pi * F.relu(torch.log(v + GAMMA) - floor)
            else:
                term = pi * (v + 0.001)
            per_class = (term * in_batch).view(C, K).sum(1)
        return (per_class * present).sum() / present.sum().clamp(min=1)

    # -- diagnostics --------------------------------------------------------------------------

    @torch.no_grad()
    def responsibilities(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Hard assignments [N, K] (one-hot rows) of each sample of z ([N, ...], before noise) to
        a cluster of its own class: the nearest fitted centroid with pi > 0 when this defense
        holds a mixture for z's size and classes (after training, or after load_state_dict),
        else a fresh k-means on z itself (this defense's refit, K = clusters, fixed seed). Pure."""
        zf = z.detach().flatten(1).float()
        C = int(y.max()) + 1 if len(y) else 1
        if self.centroids is not None and self.pi is not None:
            Cs, K, D = self.centroids.shape
            if D == zf.shape[1] and C <= Cs:
                mu, pi = self.centroids.to(zf.device), self.pi.to(zf.device)
                dist = own_class_sq_dist(zf, mu, y).masked_fill(pi[y] <= 0, math.inf)
                return F.one_hot(dist.argmin(1), K).float()
        return kmeans_responsibilities(zf, y, C, self.clusters, iters=self.kmeans_iters)

    def conditional_entropy(self, z: torch.Tensor, y: torch.Tensor, *, noise_std: float | None = None) -> float | None:
        """-I_mix (nats): the mixture's lower bound on H(x|z) - H(x), i.e. the CEM bound on H(x|z)
        for H(x) = 0 (the largest entropy images in [0,1]^d can have; add the real H(x) if known).

        I_mix = H(J) + sum_j w_j 1/2 sum_d log(1 + v_jd / sigma^2) over the clusters j of every
        class (`responsibilities`), w_j their share of the N samples, v_jd the variance of z in
        cluster j per dimension, summed over all D dimensions of z, sigma = noise_std or the
        channel noise given at setup (privbench.engine.diagnostics.mixture_information). It is the
        paper's L_C for the whole activation, without the reference loss's threshold and
        per-dimension mean: an upper bound on I(x; z + noise) for any distribution of z when w
        and v are exact; here a plug-in estimate on the z given (diagonal covariances). Pure.
        None when no noise std is known (setup has not run and noise_std is not given); -inf
        when the noise is 0.
        """
        sigma = noise_std if noise_std is not None else (self.sigma if self.class_counts is not None else None)
        if sigma is None or len(y) == 0:
            return None
        resp = self.responsibilities(z, y)
        return -mixture_information(z, y, resp, float(sigma), resp_classes(y, self.centroids))

    def _to(self, device: torch.device) -> None:
        for k in ("centroids", "vbar", "pi", "var_diag"):
            t = getattr(self, k)
            if t is not None:
                setattr(self, k, t.to(device))


# -- the epoch-end refit ----------------------------------------------------------------------


def resp_classes(y: torch.Tensor, centroids: torch.Tensor | None) -> int:
    """The number of classes for the statistics of labels y (at least the fitted mixture's)."""
    return max(int(y.max()) + 1, 0 if centroids is None else int(centroids.shape[0]))
