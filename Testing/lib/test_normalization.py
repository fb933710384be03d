"""Per-channel normalization schemes of docs/bundle-format.md."""
import numpy as np
import pytest

from VeloxSegLib.data.normalization import fit_normalizer, normalize
from VeloxSegLib.errors import ConfigError


def test_ct_clips_then_uses_stored_mean_and_std():
    x = np.array([-3000, -1000, 0, 100, 5000], dtype=np.int16)
    out = normalize(x, {"scheme": "ct", "clip": [-1000, 600], "mean": 100.0, "std": 50.0})
    assert np.allclose(out, [(-1000 - 100) / 50, (-1000 - 100) / 50, -2.0, 0.0, (600 - 100) / 50])
    assert x[0] == -3000  # input untouched


def test_pet_zscore_over_the_body_ignores_the_minimum_background():
    x = np.zeros((10, 10, 10), dtype=np.float32)
    body = np.random.default_rng(0).normal(5.0, 2.0, size=(5, 10, 10)).astype(np.float32) + 20
    x[:5] = body
    out = normalize(x, {"scheme": "pet_zscore_body"})
    assert out[:5].mean() == pytest.approx(0.0, abs=1e-4)
    assert out[:5].std() == pytest.approx(1.0, abs=1e-3)
    assert np.allclose(out[5:], (0 - body.mean()) / body.std(), atol=1e-3)


def test_statistics_are_exact_in_float64_over_chunks():
    rng = np.random.default_rng(1)
    x = rng.normal(1000.0, 0.5, size=(5_000_001,)).astype(np.float32)  # more than one chunk
    n = fit_normalizer(x, {"scheme": "pet_zscore_body"})
    body = x[x > x.min()].astype(np.float64)
    assert n.mean == pytest.approx(body.mean(), rel=1e-12)
    assert n.std == pytest.approx(body.std(), rel=1e-6)


def test_pet_suv_scales_then_zscores():
    x = np.array([0.0, 1.0, 2.0], dtype=np.float32)
    out = normalize(x, {"scheme": "pet_suv", "suv_factor": 2.0, "mean": 1.0, "std": 2.0})
    assert np.allclose(out, [-0.5, 0.5, 1.5])


def test_zscore_nonzero_keeps_zeros_at_zero():
    x = np.array([0.0, 0.0, 2.0, 4.0, 6.0], dtype=np.float32)
    out = normalize(x, {"scheme": "zscore_nonzero"})
    assert out[0] == 0 and out[1] == 0
    assert np.allclose(out[2:], (np.array([2, 4, 6]) - 4) / np.std([2, 4, 6]))


def test_none_leaves_values():
    x = np.array([3.0, -7.0], dtype=np.float32)
    assert np.array_equal(normalize(x, {"scheme": "none"}), x)


def test_fitted_normalizer_applies_to_resampled_crops_in_place():
    x = np.arange(1, 101, dtype=np.float32)
    n = fit_normalizer(x, {"scheme": "pet_zscore_body"})
    crop = x[10:20].copy()
    assert n.apply(crop) is crop
    assert np.allclose(crop, (x[10:20] - n.mean) / n.std)
    assert n.normalized_background == pytest.approx((1 - n.mean) / n.std)


@pytest.mark.parametrize("spec", [{"scheme": "bogus"}, {"scheme": "ct", "mean": 0, "std": 1},
                                  {"scheme": "pet_suv", "mean": 0, "std": 1}])
def test_bad_specs_are_config_errors(spec):
    with pytest.raises(ConfigError):
        fit_normalizer(np.zeros(3, dtype=np.float32), spec)
