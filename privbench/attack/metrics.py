"""Reconstruction metrics: SSIM, PSNR, MSE and LPIPS per image, then mean with a 95% interval.

Everything is scored on float images in [0,1] before any 8-bit rounding, with the data range
fixed to 1, so numbers compare across attacks, defenses and papers. SSIM uses the reference
setting (11x11 Gaussian window, sigma 1.5, population covariances) and matches
`skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1)`: skimage crops (win-1)/2 pixels from every border
before averaging, which is exactly a 'valid' convolution. All of it is batched tensor code:
10,000 32x32 images take about a second on a CPU.

LPIPS (AlexNet) needs torchvision's ImageNet AlexNet weights in the torch hub cache. Where they
are absent we report why, never a number computed from random weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchvision.models import AlexNet_Weights

from privbench.util import stats

SSIM_WINDOW = 11  # px, as the reference (Wang et al. 2004)
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
PSNR_MSE_FLOOR = 1e-10  # a perfect reconstruction scores 100 dB instead of inf (JSON has no inf)
METRICS = ("ssim", "psnr", "mse", "lpips")
# Summarized only where computed (privbench.attack.semantic): absent, not "missing", when turned off.
OPTIONAL_METRICS = ("sem_acc",)
HIGHER_IS_BETTER = {"ssim": True, "psnr": True, "mse": False, "lpips": False, "sem_acc": True}  # for the attacker


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        shapes = f"{tuple(x.shape)} and {tuple(y.shape)}"
        raise ValueError(f"expected two image batches [N,C,H,W] of one shape, got {shapes}")


def gaussian_kernel(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalized 1-D Gaussian taps (float64)."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    k = torch.exp(-(r**2) / (2 * sigma**2))
    return k / k.sum()


def valid_filter_matrix(size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[size-10, size] banded matrix: row i holds the Gaussian taps at columns i..i+10.

    Multiplying by it is a 'valid' 1-D Gaussian filter; on CPU a batched matmul beats a grouped
    convolution with 1-channel kernels by about 2x.
    """
    k = gaussian_kernel()
    out = size - SSIM_WINDOW + 1
    m = torch.zeros(out, size, dtype=torch.float64)
    for i in range(out):
        m[i, i : i + SSIM_WINDOW] = k
    return m.to(device=device, dtype=torch.float32)


def ssim(x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 2048) -> torch.Tensor:
    """SSIM per image [N] for batches [N,C,H,W] in [0,1] (data range 1), averaged over channels.

    Five local moments (mu_x, mu_y, E[x^2], E[y^2], E[xy]) come from one separable 'valid'
    Gaussian filter per batch (two matrix products).
    """
    _check_pair(x, y)
    n, c, h, w = x.shape
    if min(h, w) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {h}x{w}")
    gh, gw = valid_filter_matrix(h, x.device), valid_filter_matrix(w, x.device)
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    out = []
    for i in range(0, n, batch_size):
        a, b = x[i : i + batch_size].float(), y[i : i + batch_size].float()
        stack = torch.stack([a, b, a * a, b * b, a * b])  # [5,B,C,H,W]
        mx, my, mxx, myy, mxy = gh @ stack @ gw.T  # separable 'valid' Gaussian filter
        vx, vy, cov = mxx - mx * mx, myy - my * my, mxy - mx * my
        s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        out.append(s.mean(dim=(1, 2, 3)))
    return torch.cat(out) if out else torch.zeros(0, device=x.device)


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image [N]."""
    _check_pair(x, y)
    return (x.float() - y.float()).pow(2).mean(dim=(1, 2, 3))


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image [N] in dB, data range 1 (MSE floored at 1e-10)."""
    return 10 * torch.log10(1.0 / mse(x, y).clamp_min(PSNR_MSE_FLOOR))


# --------------------------------------------------------------------------------- LPIPS


def alexnet_checkpoint() -> Path:
    """Where torchvision keeps the ImageNet AlexNet weights that lpips loads."""

    name = AlexNet_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def load_lpips(device: torch.device | str = "cpu") -> tuple[torch.nn.Module | None, str | None]:
    """(lpips model, None), or (None, one-line reason) when the AlexNet weights are not cached.

    Only the local torch hub cache is consulted: torchvision would otherwise try to download
    the weights, which hangs or fails on machines without internet. The model is built once per
    process and device (it costs about a second per attack cell otherwise); it is frozen, so
    sharing it changes no number.
    """
    key = (str(device), str(alexnet_checkpoint()))
    if key in _LPIPS:
        return _LPIPS[key], None
    model, missing = _build_lpips(device)
    if model is not None:  # a missing file is looked for again: it may be put there meanwhile
        _LPIPS[key] = model
    return model, missing


_LPIPS: dict[tuple[str, str], torch.nn.Module] = {}


def _build_lpips(device: torch.device | str) -> tuple[torch.nn.Module | None, str | None]:
    ckpt = alexnet_checkpoint()
    if not ckpt.is_file():
        return None, f"LPIPS needs torchvision's ImageNet AlexNet weights, not found at {ckpt} (no download here)"
    try:
        import lpips

        model = lpips.LPIPS(net="alex", verbose=False)
    except Exception as exc:  # a broken cache or package: report why, never score with it
        return None, f"LPIPS could not be built: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return model.to(device).eval(), None


@torch.no_grad()
def lpips_distance(x: torch.Tensor, y: torch.Tensor, model: torch.nn.Module, *, batch_size: int = 512) -> torch.Tensor:
    """LPIPS per image [N] for images in [0,1] (the model expects [-1,1])."""
    _check_pair(x, y)
    dev = next(model.parameters()).device
    out = [
        model(x[i : i + batch_size].float().to(dev) * 2 - 1, y[i : i + batch_size].float().to(dev) * 2 - 1).flatten()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out).to(x.device) if out else torch.zeros(0)


# ------------------------------------------------------------------------------ aggregate


def score(
    recon: torch.Tensor, original: torch.Tensor, *, lpips_model: torch.nn.Module | None = None
) -> dict[str, list[float] | None]:
    """Per-image metrics as plain lists; "lpips" is None when no LPIPS model is given."""
    recon, original = recon.detach(), original.detach()
    out: dict[str, list[float] | None] = {
        "ssim": ssim(recon, original).cpu().tolist(),
        "psnr": psnr(recon, original).cpu().tolist(),
        "mse": mse(recon, original).cpu().tolist(),
        "lpips": None,
    }
    if lpips_model is not None:
        out["lpips"] = lpips_distance(recon, original, lpips_model).cpu().tolist()
    return out


def summarize(
    per_image: dict[str, list[float] | None], lpips_missing: str | None = None, groups: list[int] | None = None
) -> dict[str, Any]:
    """{"ssim": grouped_mean_ci, ..., "lpips": ... or {"missing": reason}}; CIs resample `groups`."""
    out: dict[str, Any] = {}
    for name in METRICS:
        values = per_image.get(name)
        if values is None:
            out[name] = {"missing": lpips_missing or f"{name} not computed"}
        else:
            out[name] = stats.grouped_mean_ci(values, groups)
    for name in OPTIONAL_METRICS:
        if per_image.get(name) is not None:
            out[name] = stats.grouped_mean_ci(per_image[name], groups)
    return out
