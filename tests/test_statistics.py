"""The one-sweep statistics collector: ranges and per-channel moments in one onnxruntime pass,
equal to numpy's over the same tensors; quantize reads the samples once for calibration and bias
correction and runs the reference once."""

from __future__ import annotations

import numpy as np
import pytest

from onnxzip import io
from onnxzip.data import NpzSamples, SyntheticSamples, input_specs
from onnxzip.quantize import QuantizeConfig, quantize
from onnxzip.runtime import Runner, expose
from onnxzip.statistics import Collector


@pytest.fixture(scope="module")
def resnet(resnet_path):
    return io.load_model(resnet_path)


def _tensors(model):
    convs = [n for n in model.graph if n.op_type == "Conv"]
    return [convs[0].inputs[0].name, convs[1].inputs[0].name, convs[-1].outputs[0].name]


@pytest.mark.parametrize("in_graph", [True, False])
def test_ranges_and_channel_moments_match_numpy(resnet, in_graph):
    names = _tensors(resnet)
    samples = SyntheticSamples(input_specs(resnet), 40, seed=2)
    collector = Collector(resnet, in_graph=in_graph)
    for name in names:
        collector.range(name)
        collector.channel_moments(name, 1)
    got = collector.run(samples, 16)
    assert got.samples == 40

    runner = Runner(expose(resnet, names))
    arrays = {n: [] for n in names}
    for batch in samples.batches(16):
        out = runner.run(batch, names)
        for n in names:
            arrays[n].append(out[n])
    for n in names:
        x = np.concatenate(arrays[n]).astype(np.float64)
        assert got.ranges[n].min == pytest.approx(float(x.min()), abs=0)
        assert got.ranges[n].max == pytest.approx(float(x.max()), abs=0)
        per_channel = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
        np.testing.assert_allclose(
            got.channels[(n, 1)].mean(), per_channel.mean(1), rtol=1e-9, atol=1e-12
        )
        np.testing.assert_allclose(
            got.channels[(n, 1)].std(), per_channel.std(1), rtol=1e-6, atol=1e-9
        )
        assert got.channels[(n, 1)].count == per_channel.shape[1]


def test_histograms_and_channel_sums_in_one_session(resnet, monkeypatch):
    import onnxzip.statistics

    created = []
    real = onnxzip.statistics.Runner

    def counting(model, **kwargs):
        created.append(kwargs.get("name"))
        return real(model, **kwargs)

    monkeypatch.setattr(onnxzip.statistics, "Runner", counting)
    names = _tensors(resnet)
    collector = Collector(resnet, bins=64)
    collector.range(names[0], histogram=True)
    collector.range(names[1])
    collector.channel_moments(names[2], 1, squares=False)
    got = collector.run(SyntheticSamples(input_specs(resnet), 8), 4)
    assert created == ["statistics model"]
    assert got.ranges[names[0]].hist is not None and got.ranges[names[0]].hist.sum() > 0
    assert got.ranges[names[1]].hist is None and got.ranges[names[1]].count == 8
    assert got.channels[(names[2], 1)].mean().shape == (resnet_channels(resnet, names[2]),)


def resnet_channels(model, name):
    value = next(v for n in model.graph for v in n.outputs if v.name == name)
    return value.shape[1]


def test_quantize_defaults_read_the_samples_once_and_run_the_reference_once(
    resnet, calib_npz, monkeypatch
):
    """Calibration ranges and bias correction's input means come from one sweep; the final
    verification reuses the reference outputs the bias-correction decision computed."""
    import importlib

    created = []
    for path in ("onnxzip.statistics", "onnxzip.verify", "onnxzip.quantize"):
        module = importlib.import_module(path)  # the package face exports functions of these names
        real = module.Runner

        def counting(model, _real=real, **kwargs):
            created.append(kwargs.get("name"))
            return _real(model, **kwargs)

        monkeypatch.setattr(module, "Runner", counting)
    samples = NpzSamples(calib_npz, input_specs(resnet))
    _, report = quantize(resnet, samples, QuantizeConfig())
    assert report.bias_correction is not None and "without" in report.bias_correction
    assert report.parity is not None and report.parity.samples > 0
    # one calibration sweep, one reference, the two bias-correction candidates, the result
    assert sorted(created) == sorted(
        ["calibration model", "reference", "candidate", "candidate", "quantized"]
    ), created
