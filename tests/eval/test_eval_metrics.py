"""The eval measurements against independent computations, and the controls' separation on the world."""
from __future__ import annotations

import numpy as np
import pytest

from lipforcing.eval.metrics import psnr, ssim, windowed_correlation


def test_windowed_correlation_against_numpy():
    rng = np.random.default_rng()
    n = int(rng.integers(60, 200))
    x, y = rng.standard_normal(n), rng.standard_normal(n)
    ref = np.mean([np.corrcoef(x[s:s + 50], y[s:s + 50])[0, 1] for s in range(0, n - 49, 25)])
    assert windowed_correlation(x, y) == pytest.approx(ref, abs=1e-12)
    assert windowed_correlation(x, 3 * x + 1) == pytest.approx(1.0)
    assert windowed_correlation(x[:20], -x[:20]) == pytest.approx(-1.0)       # shorter than a window: one window
    assert np.isnan(windowed_correlation(np.ones(80), x[:80]))


def test_psnr_ssim():
    rng = np.random.default_rng()
    a = rng.integers(0, 256, (3, 17, 19, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-9, 10, a.shape), 0, 255).astype(np.uint8)
    mse = ((a.astype(float) - b) ** 2).mean()
    assert psnr(a, b) == pytest.approx(10 * np.log10(255 ** 2 / mse))
    region = np.zeros((17, 19), bool)
    region[5:9, 3:11] = True
    mse_r = ((a[:, 5:9, 3:11].astype(float) - b[:, 5:9, 3:11]) ** 2).mean()
    assert psnr(a, b, region) == pytest.approx(10 * np.log10(255 ** 2 / mse_r))
    assert ssim(a, a) == pytest.approx(1.0) and ssim(a, 255 - a) < -0.5
    # SSIM against an independent computation (scipy's Gaussian filter, same window: sigma 1.5, radius 4)
    from scipy.ndimage import gaussian_filter

    def luma(x):
        return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]

    def blur(x):
        return gaussian_filter(x, sigma=(0, 1.5, 1.5), mode="mirror", truncate=4 / 1.5)

    la, lb = luma(a.astype(float)), luma(b.astype(float))
    ma, mb = blur(la), blur(lb)
    va, vb, cab = blur(la * la) - ma ** 2, blur(lb * lb) - mb ** 2, blur(la * lb) - ma * mb
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = (2 * ma * mb + c1) * (2 * cab + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))
    assert ssim(a, b) == pytest.approx(s.mean(), abs=1e-9)
    assert ssim(a, b, region) == pytest.approx(s[:, region].mean(), abs=1e-9)


def test_controls_separate_on_the_world():
    """Ground truth follows its audio (and not another clip's, nor the reference's mouth); the unchanged
    reference video follows the reference's mouth instead; silence closes the true mouth."""
    from lipforcing.eval.runner import EvalConfig, evaluate

    res = evaluate({}, EvalConfig(clips=2, seconds=4, size=48, speech="synthetic",
                                  seed=int(np.random.default_rng().integers(0, 1000))))
    gt, ref = res["rows"]["ground_truth"], res["rows"]["reference_copy"]
    assert gt["sync_gt"] > 0.8 and gt["sync"] > 0.5
    assert gt["sync_shuffled"] < 0.4 and abs(gt["ref_copy"]) < 0.4 and gt["silence_open"] == pytest.approx(0, abs=1e-6)
    assert ref["ref_copy"] > 0.8 and ref["sync"] < 0.4
    assert gt["rest_psnr"] > 40 and ref["rest_psnr"] > 100
