"""Streamed calibration statistics: exact histograms, exact merges, the four range methods."""

from __future__ import annotations

import numpy as np
import pytest

from onnxzip.quantize.calibrate import TensorStats


def stats_of(*chunks, bins=256, histogram=True) -> TensorStats:
    s = TensorStats(bins, histogram)
    for c in chunks:
        s.update(c)
    return s


def test_histogram_counts_match_numpy_after_growth():
    rng = np.random.default_rng(0)
    small = rng.normal(0, 0.1, 10_000).astype(np.float32)
    large = rng.normal(0, 3.0, 10_000).astype(np.float32)
    s = stats_of(small, large)  # the radius grows from 0.5 to 16: bins merge pairwise
    assert s.radius == 2 ** np.ceil(np.log2(np.abs(np.concatenate([small, large])).max()))
    expected, _ = np.histogram(np.concatenate([small, large]).astype(np.float64), bins=s.edges())
    np.testing.assert_array_equal(s.hist, expected)
    assert s.count == 20_000


def test_merging_two_halves_equals_one_pass():
    rng = np.random.default_rng(1)
    a = rng.normal(0, 0.3, (64, 8)).astype(np.float32)
    b = rng.normal(2, 5.0, (64, 8)).astype(np.float32)
    one = stats_of(a, b)
    merged = stats_of(a).merge(stats_of(b))
    assert merged.min == one.min and merged.max == one.max and merged.count == one.count
    assert merged.radius == one.radius
    np.testing.assert_array_equal(merged.hist, one.hist)
    for method in ("minmax", "percentile", "entropy", "mse"):
        assert merged.range(method) == one.range(method)


def test_memory_does_not_grow_with_samples():
    s = TensorStats(128)
    for seed in range(20):
        s.update(np.random.default_rng(seed).normal(size=5000).astype(np.float32))
    assert s.hist.shape == (256,) and s.count == 100_000


def test_minmax_and_percentile():
    x = np.linspace(0.0, 1.0, 100_001, dtype=np.float32)
    s = stats_of(x, bins=2048)
    assert s.range("minmax") == (0.0, 1.0)
    lo, hi = s._percentile(99.0)  # the percentile search itself
    assert lo == pytest.approx(0.005, abs=2e-3) and hi == pytest.approx(0.995, abs=2e-3)
    assert s._percentile(100.0) == pytest.approx((0.0, 1.0), abs=1e-3)
    # On uniform data clipping the tails costs more than the finer steps save: the range stays.
    assert s.range("percentile", percentile=99.0) == (0.0, 1.0)


def test_percentile_clip_is_kept_where_it_lowers_the_quantization_error():
    x = np.random.default_rng(3).laplace(0, 1, 1_000_000).astype(np.float32)
    s = stats_of(x, bins=2048)
    lo, hi = s.range("percentile", percentile=99.99)
    assert (lo, hi) == s._percentile(99.99) and hi < 0.9 * x.max()


def test_entropy_clips_rare_outliers_but_keeps_the_bulk():
    rng = np.random.default_rng(2)
    bulk = np.abs(rng.normal(0, 1, 200_000)).astype(np.float32)
    s = stats_of(bulk, np.array([60.0, 80.0], np.float32), bins=2048)
    lo, hi = s._entropy("uint8", False)  # TensorRT's KL search itself
    assert lo == s.min and 2.0 < hi < 60.0
    # Two outliers clipped by 56 and 76 cost more squared error than the bulk's finer steps
    # save, so the guard keeps the full range here ...
    assert s.range("entropy") == (s.min, s.max)
    # ... and keeps KL's clip where the tail is a crowd, not two points.
    tail = np.random.default_rng(5).laplace(0, 1, 1_000_000).astype(np.float32)
    t = stats_of(tail, bins=2048)
    lo, hi = t.range("entropy")
    assert hi < 0.9 * tail.max() and lo > 0.9 * tail.min()


def test_mse_clips_a_heavy_tail_where_that_lowers_the_error():
    x = np.random.default_rng(4).laplace(0, 1, 1_000_000).astype(np.float32)
    s = stats_of(x, bins=2048)
    lo, hi = s.range("mse")
    assert 3.0 < hi < 0.8 * x.max() and 0.8 * x.min() < lo < -3.0

    def sq_error(a, b):
        from onnxzip.quantize import params as qp

        p = qp.activation_params(a, b)
        return float(np.mean((qp.dequantize(qp.quantize(x, p), p) - x) ** 2))

    assert sq_error(lo, hi) < sq_error(float(x.min()), float(x.max()))


def test_uniform_data_is_not_clipped_much():
    x = np.random.default_rng(3).uniform(0, 1, 100_000).astype(np.float32)
    s = stats_of(x, bins=2048)
    for method in ("mse", "entropy"):
        assert s.range(method)[1] > 0.85, method


def test_degenerate_and_non_finite_values():
    zeros = stats_of(np.zeros(100, np.float32))
    for method in ("minmax", "percentile", "entropy", "mse"):
        assert zeros.range(method) == (0.0, 0.0)
    s = stats_of(np.array([1.0, np.nan, np.inf, 2.0], np.float32))
    assert s.nonfinite == 2 and s.range("minmax") == (1.0, 2.0)
    assert TensorStats().range("minmax") == (0.0, 0.0)


def test_calibration_runs_are_sized_from_a_real_sample_when_the_model_has_symbolic_dims(tmp_path):
    """A text recogniser's input is [N, 3, H, W] with H and W symbolic: the run size comes from
    the samples' 3 x 48 x 320 images, not from the one fixed dimension (3 elements a sample,
    which would give whole batches of 32 images: 2.1x the calibration time on PP-OCRv4's
    recogniser)."""
    import onnx.parser

    from onnxzip import io
    from onnxzip.data import input_specs, open_samples
    from onnxzip.quantize.config import QuantizeConfig
    from onnxzip.quantize.plan import (
        HISTOGRAM_RUN_ELEMENTS,
        MINMAX_RUN_ELEMENTS,
        _calibration_run,
    )

    proto = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        "g (float[N,3,H,W] x) => (float[N,3,H,W] y) { y = Relu (x) }"
    )
    specs = input_specs(io.load_model(proto))
    path = tmp_path / "lines.npz"
    np.savez(path, x=np.zeros((40, 3, 48, 320), np.float32))
    samples = open_samples(specs, path)
    config = QuantizeConfig()
    per_sample = 3 * 48 * 320
    assert _calibration_run(config, samples, False) == MINMAX_RUN_ELEMENTS // per_sample == 13
    assert _calibration_run(config, samples, True) == HISTOGRAM_RUN_ELEMENTS // per_sample == 3
