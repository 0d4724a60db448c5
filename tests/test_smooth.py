"""Static int8 for transformers: the transformer preset and SmoothQuant (onnxzip.quantize.smooth).

Parity is measured by onnxruntime; the encoder gets a few LayerNorm channels far larger than the
rest (x100), the activation outliers real transformers have and that per-tensor int8 scales break on.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ROOT

from onnxzip import io
from onnxzip.data import NpzSamples, SyntheticSamples, input_specs
from onnxzip.errors import InputError
from onnxzip.quantize import QuantizeConfig, quantize, smooth
from onnxzip.runtime import Runner
from testmodels import zoo

EXPORTED = ROOT / "tests" / "data" / "exported"


def _encoder_with_outliers(scale: float = 100.0) -> object:
    model = zoo.bert_encoder(layers=2, hidden=64, heads=4, ffn=256, vocab=300, seed=1)
    for node in model.graph:
        if node.op_type == "LayerNormalization":
            gamma = node.inputs[1].const_value.numpy().copy()
            gamma[[3, 17, 40]] *= scale
            node.inputs[1].const_value = io_tensor(gamma, node.inputs[1].name)
    return model


def io_tensor(array, name):
    import onnx_ir as ir

    return ir.Tensor(array.astype(np.float32), name=name)


def _samples(model, n=96):
    return SyntheticSamples(input_specs(model), n, seed=0)


def test_smoothing_is_exact_in_float_and_touches_only_the_matmul_paths():
    model = _encoder_with_outliers()
    samples = _samples(model)
    smoothed, report = smooth.smooth(model, samples, batch_size=16, holdout=0.2)
    muls = [n for n in smoothed.graph if n.name.startswith(smooth.NAME_PREFIX)]
    assert report.activations == len(muls) >= 6  # q/k/v, ffn in, ffn out, attention out
    assert report.matmuls > report.activations  # q, k and v share one factor
    # every smoothing Mul feeds weight MatMuls only: residual readers keep the raw tensor
    for mul in muls:
        assert {use[0].op_type for use in mul.outputs[0].uses()} == {"MatMul"}
    batch = next(samples.batches(32))
    a = Runner(model, optimization="none").run(batch)
    b = Runner(smoothed, optimization="none").run(batch)
    for name, x in a.items():
        np.testing.assert_allclose(b[name], x, rtol=1e-4, atol=1e-4 * float(np.abs(x).max()))


def _snr(model, config, samples):
    _, report = quantize(model, samples, config, floors=False)
    return report, report.parity.outputs[0].snr_db


def test_smoothquant_raises_the_static_int8_snr_on_outlier_channels():
    # x30 outliers: at x100 the final LayerNorm's own outlier channels carry nearly all of the
    # output's energy, so the output SNR hardly sees the other channels the outliers squeeze.
    # Pair-safe weights (reduce range on) run the same arithmetic on every CPU; the strength
    # search scores them in that range.
    model = _encoder_with_outliers(30.0)
    samples = _samples(model, 128)
    base = QuantizeConfig(preset="transformer", reduce_range="on")
    off, snr_off = _snr(model, dataclasses.replace(base, smooth_quant="off"), samples)
    on, snr_on = _snr(model, base, samples)
    assert off.smooth_quant is None and "SmoothQuant on" in on.smooth_quant
    assert snr_on > snr_off + 6.0, (snr_off, snr_on)
    # a fixed strength is taken as given
    fixed, _ = _snr(model, dataclasses.replace(base, smooth_quant="on", smooth_alpha=0.5), samples)
    assert "strength 0.5-0.5" in fixed.smooth_quant


def test_transformer_preset_runs_int8_matmul_kernels_and_keeps_the_rest_float(tmp_path):
    model = _encoder_with_outliers()
    samples = _samples(model)
    quantized, report = quantize(model, samples, QuantizeConfig(), floors=False)
    assert report.config.preset == "transformer"  # chosen by the graph
    weight_matmuls = sum(1 for n in model.graph if smooth.weight_matmul(n))
    tables = sum(1 for n in model.graph if n.op_type == "Gather")
    # the weight MatMuls, and the embedding table as int8 rows (as dynamic mode stores it)
    assert report.quantized_ops == {"MatMul": weight_matmuls, "Gather": tables}
    # each QuantizeLinear is read (through its DequantizeLinear) by weight MatMuls only
    for node in quantized.graph:
        producer = node.inputs[0].producer()
        if (
            node.op_type == "DequantizeLinear"
            and producer is not None
            and producer.op_type != "Gather"
        ):
            readers = {use[0].op_type for use in node.outputs[0].uses()}
            assert readers == {"MatMul"}, (node.name, readers)
    path = tmp_path / "q.onnx"
    io.save_model(quantized, path)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(
        n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node
    )
    assert ops["MatMulIntegerToFloat"] == weight_matmuls, ops
    assert ops["DequantizeLinear"] == tables  # only the gathered table rows


def test_the_preset_is_chosen_by_the_graph():
    assert smooth.is_transformer(zoo.bert_encoder(layers=1, hidden=32, heads=4, ffn=64, vocab=50))
    assert not smooth.is_transformer(io.load_model(ROOT / "models" / "digits_resnet.onnx"))
    for name in ("bert_dynamo", "llama_ts", "gpt2_dynamo"):
        assert smooth.is_transformer(io.load_model(EXPORTED / f"{name}.onnx")), name
    # a CNN keeps the default layout: Conv outputs and residual Adds quantized
    model = io.load_model(ROOT / "models" / "digits_resnet.onnx")
    samples = NpzSamples(ROOT / "models" / "digits_calib.npz", input_specs(model))
    _, report = quantize(model, samples, QuantizeConfig(), floors=False)
    assert report.config.preset == "default" and report.smooth_quant is None
    assert "Add" in report.quantized_ops


@pytest.mark.parametrize("name", ["bert_dynamo", "bert_ts"])
def test_exported_encoder_static_int8_is_closer_with_the_transformer_preset(name):
    model = io.load_model(EXPORTED / f"{name}.onnx")
    samples = NpzSamples(EXPORTED / "bert_ids.npz", input_specs(model))
    default, snr_default = _snr(model, QuantizeConfig(preset="default"), samples)
    preset, snr_preset = _snr(model, QuantizeConfig(), samples)
    assert preset.config.preset == "transformer"
    assert snr_preset > snr_default + 3.0, (snr_default, snr_preset)
    assert preset.parity.outputs[0].cosine_mean > 0.99


def test_bad_smoothquant_options_are_refused():
    with pytest.raises(InputError, match="strength must be in"):
        QuantizeConfig(smooth_alpha=1.5).validate()
    with pytest.raises(InputError, match="preset must be one of"):
        QuantizeConfig(preset="llm").validate()


def test_smoothquant_that_does_not_bring_the_whole_model_closer_is_not_kept():
    """The strength search judges each MatMul alone; auto keeps the result only when the held-out
    outputs are closer with it. On the random-weight Llama-style export (no outlier channels)
    it is not, and the model written is the one without it."""
    model = io.load_model(EXPORTED / "llama_dynamo.onnx")
    samples = NpzSamples(EXPORTED / "llama_ids.npz", input_specs(model))
    plain, off = quantize(model, samples, QuantizeConfig(smooth_quant="off"), floors=False)
    chosen, auto = quantize(model, samples, QuantizeConfig(), floors=False)
    assert auto.smooth_quant.startswith("SmoothQuant not kept: held-out output SNR")
    assert io.model_bytes(chosen) == io.model_bytes(plain)
    assert auto.parity.outputs[0].snr_db == off.parity.outputs[0].snr_db


def test_smoothing_of_gemm_projections_is_exact_in_float():
    """GPT-2's exported projections are Gemms (weights [K, N], no transB): smoothed too."""
    model = io.load_model(EXPORTED / "gpt2_dynamo.onnx")
    samples = NpzSamples(EXPORTED / "gpt2_ids.npz", input_specs(model))
    smoothed, report = smooth.smooth(model, samples, batch_size=8, holdout=0.2)
    gemms = sum(1 for n in model.graph if n.op_type == "Gemm" and smooth.weight_matmul(n))
    assert gemms >= 4 and report.matmuls >= gemms
    batch = next(samples.batches(4))
    a = Runner(model, optimization="none").run(batch)
    b = Runner(smoothed, optimization="none").run(batch)
    for name, x in a.items():
        np.testing.assert_allclose(b[name], x, rtol=1e-4, atol=1e-5 * float(np.abs(x).max()))


def test_a_fixed_strength_on_a_transposed_gemm_keeps_its_outputs():
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.3, (8, 16)).astype(np.float32)  # transB=1: [N, K]
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "c"], ["y"], transB=1, alpha=0.5)],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.ones(8, np.float32), "c")],
    )
    model = io.load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    samples = SyntheticSamples(input_specs(model), 64, seed=1)
    smoothed, report = smooth.smooth(model, samples, batch_size=16, holdout=0.2, alpha=0.5)
    assert report.matmuls == 1
    gemm = next(n for n in smoothed.graph if n.op_type == "Gemm")
    assert gemm.inputs[1].const_value.numpy().shape == (8, 16)  # still [N, K]
    assert not np.array_equal(gemm.inputs[1].const_value.numpy(), w)
    batch = next(samples.batches(16))
    a = Runner(model, optimization="none").run(batch)["y"]
    b = Runner(smoothed, optimization="none").run(batch)["y"]
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
