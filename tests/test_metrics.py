import math

import numpy as np
import pytest
import torch
from scipy import stats
from skimage.metrics import structural_similarity

from privbench.attack import metrics
from privbench.util.stats import mean_ci


def skimage_ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(
        structural_similarity(
            x.numpy().astype(np.float64),
            y.numpy().astype(np.float64),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1,
            channel_axis=0,
        )
    )


def image_pairs() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    pairs = []
    x = torch.rand(3, 32, 32, generator=g)
    pairs.append((x, torch.rand(3, 32, 32, generator=g)))  # unrelated noise
    pairs.append((x, (x + 0.1 * torch.randn(3, 32, 32, generator=g)).clamp(0, 1)))  # mild noise
    ramp = torch.linspace(0, 1, 32)
    grad = torch.stack([ramp.expand(32, 32), ramp[:, None].expand(32, 32), (ramp[:, None] * ramp).sqrt()])
    pairs.append((grad, grad.flip(2)))  # smooth structure
    checker = ((torch.arange(32)[:, None] // 4 + torch.arange(32) // 4) % 2).float().expand(3, 32, 32)
    pairs.append((checker, (checker * 0.8 + 0.1)))  # contrast change
    pairs.append((torch.zeros(3, 32, 32), torch.full((3, 32, 32), 0.5)))  # flat images
    rect = torch.rand(3, 24, 40, generator=g)
    pairs.append((rect, (rect**2)))  # non-square, gamma change
    return pairs


@pytest.mark.parametrize("i", range(6))
def test_ssim_matches_skimage(i):
    x, y = image_pairs()[i]
    ours = metrics.ssim(x[None], y[None]).item()
    assert abs(ours - skimage_ssim(x, y)) < 1e-4


def test_ssim_batch_equals_single_images_and_identity_is_one():
    pairs = [p for p in image_pairs() if p[0].shape == (3, 32, 32)]
    x = torch.stack([a for a, _ in pairs])
    y = torch.stack([b for _, b in pairs])
    batched = metrics.ssim(x, y, batch_size=2)
    expected = torch.tensor([skimage_ssim(a, b) for a, b in pairs])
    assert torch.allclose(batched, expected, atol=1e-4)
    assert torch.allclose(metrics.ssim(x, x), torch.ones(len(x)), atol=1e-6)


def test_ssim_refuses_small_or_mismatched_images():
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="one shape"):
        metrics.ssim(torch.rand(1, 3, 32, 32), torch.rand(2, 3, 32, 32))


def test_mse_and_psnr_by_hand():
    x = torch.zeros(2, 3, 4, 4)
    y = torch.zeros(2, 3, 4, 4)
    y[0] = 0.1  # mse 0.01 -> psnr 20 dB
    y[1, 0, 0, 0] = 1.0  # one pixel off by 1 out of 48 values
    assert torch.allclose(metrics.mse(x, y), torch.tensor([0.01, 1 / 48]))
    assert torch.allclose(metrics.psnr(x, y), torch.tensor([20.0, 10 * math.log10(48)]), atol=1e-4)
    assert metrics.psnr(x, x).tolist() == pytest.approx([100.0, 100.0])  # floored, finite


def test_mean_ci_against_scipy():
    values = [0.1, 0.4, 0.35, 0.8, 0.55, 0.2, 0.9]
    got = mean_ci(values)
    lo, hi = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert got["mean"] == pytest.approx(np.mean(values))
    assert got["ci95"] == pytest.approx((hi - lo) / 2)
    assert got["std"] == pytest.approx(np.std(values, ddof=1))
    assert got["n"] == 7
    assert mean_ci([0.5]) == {"mean": 0.5, "ci95": None, "std": None, "n": 1}


def test_lpips_code_path_with_random_backbone():
    import lpips

    model = lpips.LPIPS(pnet_rand=True, net="alex", verbose=False).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 32, 32, generator=g)
    y = torch.rand(4, 3, 32, 32, generator=g)
    d = metrics.lpips_distance(x, y, model, batch_size=3)
    with torch.no_grad():
        direct = model(x * 2 - 1, y * 2 - 1).flatten()
    assert d.shape == (4,) and torch.allclose(d, direct)
    assert torch.allclose(metrics.lpips_distance(x, x, model), torch.zeros(4), atol=1e-6)
    scores = metrics.score(y, x, lpips_model=model)
    assert scores["lpips"] == pytest.approx(d.tolist())
    assert metrics.summarize(scores)["lpips"]["n"] == 4


def test_lpips_missing_gives_a_reason_not_a_number(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    model, reason = metrics.load_lpips()
    assert model is None
    assert "AlexNet" in reason and str(tmp_path) in reason and "\n" not in reason
    x = torch.rand(3, 3, 32, 32)
    summary = metrics.summarize(metrics.score(x, x.flip(0)), reason)
    assert summary["lpips"] == {"missing": reason}
    assert summary["ssim"]["n"] == 3


def test_metrics_are_fast_on_ten_thousand_images():
    import time

    x, y = torch.rand(10_000, 3, 32, 32), torch.rand(10_000, 3, 32, 32)
    t0 = time.perf_counter()
    s = metrics.score(x, y)
    seconds = time.perf_counter() - t0
    assert len(s["ssim"]) == 10_000 and seconds < 15  # about 1 s on 2 CPU cores
