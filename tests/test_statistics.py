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
from onnxzip.verify import verify


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
    verification reuses the reference outputs the bias-correction decision computed, and the
    outputs of the candidate it kept."""
    import importlib

    created = []
    for path in ("onnxzip.statistics", "onnxzip.verify", "onnxzip.quantize.guard"):
        module = importlib.import_module(path)
        real = module.Runner

        def counting(model, _real=real, **kwargs):
            created.append(kwargs.get("name"))
            return _real(model, **kwargs)

        monkeypatch.setattr(module, "Runner", counting)
    samples = NpzSamples(calib_npz, input_specs(resnet))
    quantized, report = quantize(resnet, samples, QuantizeConfig())
    assert report.bias_correction is not None and "without" in report.bias_correction
    assert report.parity is not None and report.parity.samples > 0
    # one calibration sweep, one reference, the two bias-correction candidates (the one kept
    # is not run again for the final verification)
    assert sorted(created) == sorted(
        ["calibration model", "reference", "candidate", "candidate"]
    ), created
    # the final verdict is the one a fresh verification of the result gives
    fresh = verify(
        resnet,
        quantized,
        samples,
        split="holdout",
        holdout=0.2,
        batch_size=32,
    )
    mine, theirs = report.parity.outputs[0], fresh.outputs[0]
    assert (mine.snr_db, mine.cosine_mean, mine.top1_agreement) == (
        theirs.snr_db,
        theirs.cosine_mean,
        theirs.top1_agreement,
    )
    assert report.parity.passed == fresh.passed


def test_ranges_of_ranks_two_to_four_and_float32_partial_means_match_numpy(resnet):
    """Ranges are reduced in the graph over the axes after the first two (rank 3 and 4) or the
    last (rank 2) and finished in numpy: the same min and max as numpy's over the whole tensor.
    Means without variances sum the axes after the channel in float32 first."""
    from testmodels import zoo

    bert = zoo.bert_encoder(pooling=True)
    samples = SyntheticSamples(input_specs(bert), 24, seed=3)
    hidden = [n.outputs[0].name for n in bert.graph if n.op_type == "LayerNormalization"][:2]
    pooled = bert.graph.outputs[0].name  # [N, hidden]
    names = [*hidden, pooled]
    collector = Collector(bert)
    for name in names:
        collector.range(name)
    collector.channel_moments(hidden[0], 1, squares=False)  # [N, S, H] by sequence position
    got = collector.run(samples, 8)
    runner = Runner(expose(bert, names))
    arrays = {
        n: np.concatenate([runner.run(b, names)[n] for b in samples.batches(8)]) for n in names
    }
    for n in names:
        assert got.ranges[n].min == float(arrays[n].min()) and got.ranges[n].max == float(
            arrays[n].max()
        )
    x = arrays[hidden[0]].astype(np.float64)
    np.testing.assert_allclose(
        got.channels[(hidden[0], 1)].mean(), x.mean(axis=(0, 2)), rtol=1e-6, atol=1e-7
    )

    # four-dimensional: per-channel means of Conv inputs, as bias correction asks for them
    names = _tensors(resnet)
    samples = SyntheticSamples(input_specs(resnet), 40, seed=2)
    collector = Collector(resnet)
    for name in names:
        collector.channel_moments(name, 1, squares=False)
    got = collector.run(samples, 16)
    runner = Runner(expose(resnet, names))
    for n in names:
        x = np.concatenate([runner.run(b, names)[n] for b in samples.batches(16)])
        per_channel = np.moveaxis(x.astype(np.float64), 1, 0).reshape(x.shape[1], -1)
        np.testing.assert_allclose(
            got.channels[(n, 1)].mean(), per_channel.mean(1), rtol=1e-6, atol=1e-7
        )


def test_runner_hands_large_initializers_over_and_leaves_the_model_as_it_was(resnet):
    """Initializers of 64 KiB and more reach onnxruntime as arrays, not in the serialised
    model: the outputs are those of a session made from the whole model's bytes, and the
    model keeps its tensors."""
    import onnx_ir as ir
    import onnxruntime as ort

    from onnxzip import runtime
    from onnxzip.passes import add_initializer

    model = resnet.clone()
    graph = model.graph
    big = np.random.default_rng(0).normal(size=(128, 256)).astype(np.float32)  # 128 KiB
    node = ir.node(
        "ReduceSum", [add_initializer(graph, "big", big)], attributes={"keepdims": 0}, name="s"
    )
    out = node.outputs[0]
    out.name, out.type, out.shape = "big_sum", ir.TensorType(ir.DataType.FLOAT), ir.Shape([])
    graph.append(node)
    graph.outputs.append(out)
    add_initializer(graph, "unused", big)  # onnxruntime drops it before any handover
    before = {k: v.const_value for k, v in graph.initializers.items()}
    runner = Runner(model)
    assert {k: v.const_value for k, v in graph.initializers.items()} == before
    data, handed = runtime._graph_bytes(model, ort.SessionOptions())
    # the weight a node reads went over as an array; the unused one stayed in the bytes
    assert big.nbytes < len(data) < 2 * big.nbytes
    assert sum(a.shape == big.shape for a in handed[0]) == 1
    whole = ort.InferenceSession(io.model_bytes(model), providers=["CPUExecutionProvider"])
    batch = next(SyntheticSamples(input_specs(model), 4, seed=1).batches(4))
    got = runner.run(batch)
    names = [o.name for o in whole.get_outputs()]
    for name, value in zip(names, whole.run(None, batch.inputs), strict=True):
        np.testing.assert_array_equal(got[name], value)


def test_a_model_over_the_message_limit_runs_by_handover_or_from_a_file(resnet, monkeypatch):
    """Weights over protobuf's limit reach onnxruntime as arrays beside a small graph; a graph
    that alone is over the limit goes through a temporary file. Same outputs either way."""
    from onnxzip import runtime

    batch = next(SyntheticSamples(input_specs(resnet), 4, seed=3).batches(4))
    want = Runner(resnet).run(batch)
    saved = []
    real_save = runtime.io.save_model
    monkeypatch.setattr(
        runtime.io, "save_model", lambda *a, **k: saved.append(1) or real_save(*a, **k)
    )
    monkeypatch.setattr(runtime.io, "EXTERNAL_DATA_THRESHOLD", 64 * 1024)  # weights are over it
    monkeypatch.setattr(runtime, "HANDED_OVER_BYTES", 1024)
    for name, value in Runner(resnet).run(batch).items():
        np.testing.assert_array_equal(value, want[name])
    assert saved == []  # handed over: no file
    monkeypatch.setattr(runtime.io, "EXTERNAL_DATA_THRESHOLD", 1000)  # the graph alone is over
    for name, value in Runner(resnet).run(batch).items():
        np.testing.assert_array_equal(value, want[name])
    assert saved == [1]


def test_large_float_weights_are_fed_as_inputs_and_quantized_ones_stay_initializers(
    resnet, calib_npz, monkeypatch
):
    """Above LARGE_WEIGHTS_BYTES of float weights a session takes them as inputs fed with every
    run (onnxruntime keeps no copy): the same outputs up to float rounding, the model left with
    its initializers in their order; the int8 weights of a QDQ model stay initializers, so its
    int8 kernels are fused as served."""
    from onnxzip import runtime

    batch = next(SyntheticSamples(input_specs(resnet), 8, seed=4).batches(8))
    want = Runner(resnet).run(batch)
    before = [(k, id(v)) for k, v in resnet.graph.initializers.items()]
    inputs_before = [v.name for v in resnet.graph.inputs]
    monkeypatch.setattr(runtime, "HANDED_OVER_BYTES", 1024)
    monkeypatch.setattr(runtime, "LARGE_WEIGHTS_BYTES", 1)
    fed = Runner(resnet)
    assert len(fed.weights) > 3 and all(a.dtype == np.float32 for a in fed.weights.values())
    assert [(k, id(v)) for k, v in resnet.graph.initializers.items()] == before
    assert [v.name for v in resnet.graph.inputs] == inputs_before
    for name, value in fed.run(batch).items():
        np.testing.assert_allclose(value, want[name], rtol=1e-4, atol=1e-5)
    quantized, _ = quantize(resnet, NpzSamples(calib_npz, input_specs(resnet)), QuantizeConfig())
    runner = Runner(quantized)
    dequantized = {n.inputs[0].name for n in quantized.graph if n.op_type == "DequantizeLinear"}
    assert not dequantized & set(runner.weights)
