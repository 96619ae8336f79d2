"""Per-run diagnostics: training curves, the CEM papers' reconstruction bound, slot statistics.

Pure functions over a run's history and over activations: no training, no model, no state
change; the only files written are `curves.csv` (atomically, like every run file).

The bound (Xia et al., CVPR 2025, Eq. 3): for any attack that estimates x (d numbers) from z,
the mean squared error per coordinate is at least exp(2 H(x|z) / d) / (2 pi e), H in nats.
The CEM defenses cannot measure H(x|z); what their mixture gives is an upper bound on the
information z carries about x (`mixture_information`), hence H(x|z) >= H(x) - I_mix. See
docs/diagnostics.md for the derivation, the choice of d and the caveats.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import torch
import torch.nn.functional as F

from privbench.engine.kmeans import kmeans_responsibilities
from privbench.plugin.base import Defense, takes_keyword
from privbench.util.storage import atomic_write_text

CURVES_FILE = "curves.csv"
# The loop's own columns first, in this order; every other logged key follows (losses, then the
# rest), each group sorted by name, so the order never depends on the epoch a key first appears.
CURVE_COLUMNS = (
    "epoch",
    "lr",
    "train_loss",
    "defense_loss",
    "train_acc",
    "z_intra_class_var",
    "z_total_var",
    "epoch_seconds",
)
LOG_2PIE = math.log(2 * math.pi * math.e)

BOUND_CAVEAT = (
    "Eq. 3 bounds the per-pixel MSE of any attack only if H(x|z) is the true conditional entropy. "
    "Here H(x|z) = h_x - information_nats: information_nats is the defense's Gaussian-mixture estimate "
    "(plug-in, on the z given) of an upper bound on I(x;z) through a Gaussian channel of std noise_std, "
    "and h_x is an assumed entropy of the images (default 0, the largest any image in [0,1]^d can have). "
    "Real images have far lower entropy, so mse_bound overstates the true bound and is no guarantee; "
    "mse_bound_factor = exp(-2 information_nats / d), the share of the no-information bound that z leaves, "
    "does not depend on h_x."
)


# -------------------------------------------------------------------------------- curves


def curves_frame(history: list[dict[str, Any]]) -> pd.DataFrame:
    """The run's per-epoch history (metrics.json "history") as a frame, one row per epoch.

    Columns: those of CURVE_COLUMNS that occur (epoch, lr, train_loss, defense_loss, train_acc,
    z_intra_class_var, z_total_var, epoch_seconds), then every other key ending in `_loss`
    (rob_loss, module_loss, `<part>_loss`), then the remaining keys; each group after the first
    sorted by name. A key missing in an epoch (a CEM term before its warm-up ends) is NaN there.
    An empty history gives an empty frame with the columns epoch..epoch_seconds.
    """
    keys: dict[str, None] = {}
    for row in history:
        keys.update(dict.fromkeys(row))
    if not history:
        keys = dict.fromkeys(CURVE_COLUMNS)
    first = [k for k in CURVE_COLUMNS if k in keys]
    rest = sorted(k for k in keys if k not in CURVE_COLUMNS)
    order = first + [k for k in rest if k.endswith("_loss")] + [k for k in rest if not k.endswith("_loss")]
    frame = pd.DataFrame([{k: row.get(k, math.nan) for k in order} for row in history], columns=order)
    if "epoch" in frame and frame["epoch"].notna().all():
        frame["epoch"] = frame["epoch"].astype("int64")
    return frame


def write_curves_csv(history: list[dict[str, Any]], path: str | Path) -> Path:
    """Write `curves_frame(history)` as CSV to `path` (a file, or a run folder: then
    RUN/curves.csv), atomically, mode 0666 minus the umask (0644 under the usual umask 022).
    Floats are written in full precision, so reading the file back gives the history's values."""
    path = Path(path)
    if path.is_dir():
        path = path / CURVES_FILE
    atomic_write_text(path, curves_frame(history).to_csv(index=False, float_format=None, lineterminator="\n"))
    return path


def read_curves_csv(path: str | Path) -> pd.DataFrame:
    """A curves.csv (or the run folder holding one) as a frame, the inverse of write_curves_csv."""
    path = Path(path)
    return pd.read_csv(path / CURVES_FILE if path.is_dir() else path)


# -------------------------------------------------------------------------------- the bound


def reconstruction_bound(h_nats: float, d: int) -> float:
    """Eq. 3: the per-coordinate MSE bound exp(2 H / d) / (2 pi e) for H(x|z) = h_nats, x of d
    numbers; computed as exp(2 H / d - log(2 pi e)), finite for any finite H and d (an H of
    -inf gives 0). Example: H = d/2 log(2 pi e s2), a Gaussian of variance s2 per coordinate,
    gives s2."""
    if d < 1:
        raise ValueError(f"invalid dimension {d}: need d >= 1")
    if math.isnan(h_nats):
        raise ValueError("the conditional entropy is NaN")
    exponent = 2.0 * h_nats / d - LOG_2PIE
    return math.exp(min(exponent, 700.0)) if exponent > -math.inf else 0.0


class Moments(NamedTuple):
    """Statistics of z [N, D] under responsibilities [N, K] over each sample's own class's K
    components (one-hot rows for a hard partition). Component (c, k) is class c's k-th."""

    counts: torch.Tensor  # [C] samples per class
    mass: torch.Tensor  # [C, K] responsibility summed over the class's samples (soft member count)
    var: torch.Tensor  # [C, K, D] responsibility-weighted variance of z around the component mean
    resp: torch.Tensor  # [N, K] the responsibilities, float64


def component_moments(z: torch.Tensor, y: torch.Tensor, resp: torch.Tensor, num_classes: int) -> Moments:
    """Weighted mean and per-dimension variance of every component, in float64, z centred per
    class first (the variance does not change and the sums lose no digits)."""
    z = z.detach().flatten(1).double()
    r = resp.detach().to(z)
    onehot = F.one_hot(y, num_classes).to(z)  # [N, C]
    counts = onehot.sum(0)
    zc = z - ((onehot.T @ z) / counts.clamp(min=1)[:, None])[y]
    W = (onehot[:, :, None] * r[:, None, :]).flatten(1)  # [N, C*K], zero outside the own class
    mass = W.sum(0)
    m1 = (W.T @ zc) / mass.clamp(min=1e-300)[:, None]
    m2 = (W.T @ zc.pow(2)) / mass.clamp(min=1e-300)[:, None]
    K = r.shape[1]
    var = (m2 - m1.pow(2)).clamp(min=0).view(num_classes, K, -1)
    return Moments(counts, mass.view(num_classes, K), var, r)


def mixture_information(
    z: torch.Tensor, y: torch.Tensor, resp: torch.Tensor, noise_std: float, num_classes: int | None = None
) -> float:
    """I_mix in nats: the Gaussian-mixture upper bound on I(x; z + eps), eps ~ N(0, noise_std^2 I).

    Components j = (class, k) of weight w_j (share of the N samples, soft under `resp`) and
    per-dimension variance v_jd of z. With z a function of x and J a partition of the samples
    that depends on x (not on eps):
      I(x; z+eps) <= h(z+eps) - h(eps) <= H(J) + sum_j w_j h(z+eps | J=j) - h(eps)
                  <= H(J) + sum_j w_j 1/2 sum_d log(1 + v_jd / noise_std^2)
    (the mixture's entropy is at most the label's plus the components'; a component's at most
    that of a Gaussian with its covariance, whose log-det is at most that of its diagonal). With
    the true w and v it holds for any distribution of z; here they are plug-in estimates. The
    sum runs over all D dimensions of z: the information of the whole activation. Returns inf
    for noise_std = 0 (nothing bounds what a noiseless z tells).
    """
    if not noise_std >= 0:
        raise ValueError(f"invalid noise_std {noise_std}")
    if len(y) == 0:
        raise ValueError("no samples")
    C = int(num_classes if num_classes is not None else int(y.max()) + 1)
    if noise_std == 0:
        return math.inf
    m = component_moments(z, y, resp, C)
    w = (m.mass / len(y)).flatten()
    h_j = -torch.xlogy(w, w).sum()
    half_logdet = 0.5 * torch.log1p(m.var / noise_std**2).sum(-1).flatten()  # [C*K]
    return float(h_j + (w * half_logdet).sum())


def _parts(defense: Any) -> list[tuple[str, Any]]:
    members = getattr(defense, "members", None)
    return list(members) if members else [(getattr(defense, "name", type(defense).__name__), defense)]


def _estimate(part: Any, z: torch.Tensor, y: torch.Tensor, noise_std: float) -> float | None:
    fn = getattr(part, "conditional_entropy", None)
    if fn is None:
        return None
    # A plugin whose hook takes (z, y) only uses the noise it was set up with.
    return fn(z, y, noise_std=noise_std) if takes_keyword(fn, "noise_std") else fn(z, y)


def entropy_bound(
    defense: Any,
    z: torch.Tensor,
    y: torch.Tensor,
    *,
    x_dim: int,
    noise_std: float,
    h_x: float = 0.0,
    fallback_clusters: int | None = None,
) -> dict[str, Any] | None:
    """Eq. 3 from the defense's own mixture estimate (the first part of a stack that has one).

    z: what the client sends before the channel noise ([N, ...], eval mode, the defense's
    transform applied); y: labels [N]; x_dim: d, the number of values of one input image
    (C*H*W: Eq. 3's MSE is per coordinate of x, as privbench's `mse` metric is per pixel and
    channel of images in [0,1]); noise_std: the channel noise std of the run; h_x: the assumed
    differential entropy H(x) of the images in nats (0: uniform on [0,1]^d, its maximum).
    fallback_clusters: for a defense without an estimator, use gmm-cem's (a per-class k-means
    with this many clusters) instead of returning None, so runs without CEM get the same figure.

    Returns None when no part has an estimator (and no fallback), else a JSON-ready dict:
      h_x_given_z: h_x - information_nats (nats; None without channel noise: -infinity);
      dim: d; mse_bound: reconstruction_bound(h_x_given_z, d) (0.0 without noise);
      information_nats: the mixture's upper bound on I(x;z) (None without noise);
      mse_bound_factor: exp(-2 information_nats / d), mse_bound / reconstruction_bound(h_x, d);
      h_x, z_dim (D), noise_std, samples (N), estimator (the part's name or "k-means"), caveat.
    """
    if len(y) == 0:
        raise ValueError("no samples")
    h = estimator = None
    for name, part in _parts(defense):
        h = _estimate(part, z, y, noise_std)
        if h is not None:
            estimator = name
            break
    if h is None and fallback_clusters is not None:
        num_classes = int(y.max()) + 1
        resp = kmeans_responsibilities(z.flatten(1), y, num_classes, fallback_clusters)
        h = -mixture_information(z, y, resp, noise_std, num_classes)
        estimator = f"k-means ({fallback_clusters} clusters per class)"
    if h is None:
        return None
    finite = math.isfinite(h)
    info = -h if finite else None  # the hook's value is the lower bound for H(x) = 0: -I_mix
    return {
        "h_x_given_z": h_x - info if finite else None,
        "dim": int(x_dim),
        "mse_bound": reconstruction_bound(h_x - info, x_dim) if finite else 0.0,
        "information_nats": info,
        "mse_bound_factor": math.exp(-2.0 * info / x_dim) if finite else 0.0,
        "h_x": float(h_x),
        "z_dim": int(z[0].numel()),
        "noise_std": float(noise_std),
        "samples": len(y),
        "estimator": estimator,
        "caveat": BOUND_CAVEAT if finite else "no channel noise: z can tell everything, the bound is 0",
    }


def gaussian_entropy(x: torch.Tensor, *, floor: float = 1.0 / (12 * 255**2)) -> float:
    """Differential entropy (nats) of a Gaussian with the covariance of the images x [N, ...]
    (plus `floor` on the diagonal: the variance of 8-bit rounding). It is an upper bound of the
    images' own entropy (the Gaussian is the largest for a given covariance), a more realistic
    `h_x` than 0 for entropy_bound, yet still not a lower bound: the result is no guarantee."""
    xf = x.detach().flatten(1).double()
    d = xf.shape[1]
    cov = torch.cov(xf.T) if len(xf) > 1 else torch.zeros(d, d, dtype=xf.dtype)
    cov = cov + floor * torch.eye(d, dtype=xf.dtype)
    return float(0.5 * (d * LOG_2PIE + torch.linalg.slogdet(cov)[1]))


# -------------------------------------------------------------------------------- slots


def slot_stats(
    defense: Any, z: torch.Tensor, y: torch.Tensor, *, noise_std: float | None = None, num_classes: int | None = None
) -> dict[str, Any] | None:
    """How the defense's mixture splits each class (its components, e.g. a CEM defense's slots or
    clusters). `num_classes` defaults to the largest label in y plus one.

    Uses the first part whose `Defense.responsibilities(z, y)` hook returns them ([N, K] over
    the slots of each sample's own class; slot k of one class is unrelated to slot k of another).
    None when no part has them (slot-cem before its module is trained or loaded). Pure.

    Returns a JSON-ready dict; [C][K] lists have one row per class 0..C-1:
      defense, num_classes (C), num_slots (K), class_counts [C];
      responsibility [C][K]: mean responsibility of slot k over class c's samples (each row of
        a class with samples sums to 1; all 0 for a class absent from y);
      mass [C][K]: the share of all samples in (c, k) = class share x responsibility (sums to 1);
      argmax_share [C][K]: the share of class c's samples whose largest responsibility is slot k
        (rows sum to 1);
      slot_var [C][K]: the responsibility-weighted variance of z in the slot, mean over dims;
      class_var [C]: the variance of z within the class, mean over dims;
      effective_slots [C]: exp(entropy of the responsibility row): slots in use;
      assignment_entropy [C]: mean over the class's samples of the entropy (nats) of their
        responsibilities (0: hard assignments, log K: undecided);
      noise_var: noise_std^2, or None.
    """
    if len(y) == 0:
        raise ValueError("no samples")
    found = None
    for name, part in _parts(defense):
        resp = part.responsibilities(z, y) if isinstance(part, Defense) else None
        if resp is not None:
            found = (name, part, resp)
            break
    if found is None:
        return None
    name, part, resp = found
    C = max(int(num_classes or 0), int(y.max()) + 1)
    m = component_moments(z, y, resp, C)
    r, K = m.resp, m.resp.shape[1]
    n_c = m.counts.clamp(min=1)[:, None]
    onehot = F.one_hot(y, C).to(r)
    hard = onehot.T @ F.one_hot(r.argmax(1), K).to(r)
    sample_h = -torch.xlogy(r, r).sum(1)
    responsibility = m.mass / n_c
    row_h = -torch.xlogy(responsibility, responsibility).sum(1)
    zc = z.detach().flatten(1).double()
    zc = zc - ((onehot.T @ zc) / n_c)[y]
    class_var = (onehot.T @ zc.pow(2).mean(1)) / n_c[:, 0]

    def rows(t: torch.Tensor) -> list:
        return t.tolist()

    return {
        "defense": name,
        "num_classes": C,
        "num_slots": K,
        "class_counts": [int(c) for c in m.counts.tolist()],
        "responsibility": rows(responsibility),
        "mass": rows(m.mass / len(y)),
        "argmax_share": rows(hard / n_c),
        "slot_var": rows(m.var.mean(-1)),
        "class_var": rows(class_var),
        "effective_slots": rows(torch.where(m.counts > 0, row_h.exp(), 0.0)),
        "assignment_entropy": rows((onehot.T @ sample_h) / n_c[:, 0]),
        "noise_var": None if noise_std is None else float(noise_std) ** 2,
    }
