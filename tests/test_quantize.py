"""QDQ placement on every supported op: parity with onnxruntime and fused int8 kernels."""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
from collections import Counter

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import run_cli

from onnxzip import io, passes
from onnxzip.data import NpzSamples, SyntheticSamples, input_specs
from onnxzip.errors import InputError
from onnxzip.ir import ops as ops_mod
from onnxzip.quantize import QuantizeConfig, quantize
from onnxzip.quantize import params as qp
from onnxzip.verify import verify
from testmodels import zoo

H = '<ir_version: 8, opset_import: ["" : 17]>\n'
FLOAT_COMPUTE = {
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "Add",
    "Mul",
    "Concat",
    "AveragePool",
    "GlobalAveragePool",
    "Sigmoid",
    "Softmax",
    "Relu",
    "Clip",
}

# name: (graph text, weight shapes, kernels the optimised session must contain)
CASES = {
    "conv_bias_relu": (
        "g (float[N,4,8,8] x) => (float[N,6,8,8] y) { c = Conv <pads=[1,1,1,1]> (x, w, b)\n y = Relu(c) }",
        {"w": (6, 4, 3, 3), "b": (6,)},
        {"QLinearConv": 1},
    ),
    "conv_no_bias_grouped": (
        "g (float[N,4,8,8] x) => (float[N,8,8,8] y) { y = Conv <pads=[1,1,1,1], group=2> (x, w) }",
        {"w": (8, 2, 3, 3)},
        {"QLinearConv": 1},
    ),
    "depthwise_multiplier_clip6": (
        "g (float[N,4,8,8] x) => (float[N,8,8,8] y) { lo = Constant<value=float {0.0}>()\n"
        " hi = Constant<value=float {6.0}>()\n c = Conv <pads=[1,1,1,1], group=4> (x, w)\n y = Clip(c, lo, hi) }",
        {"w": (8, 1, 3, 3)},
        {"QLinearConv": 1},
    ),
    "gemm_graph_output": (
        "g (float[N,16] x) => (float[N,5] y) { y = Gemm <transB=1> (x, w, b) }",
        {"w": (5, 16), "b": (5,)},
        {"QGemm": 1},
    ),
    "gemm_no_trans_then_relu": (
        "g (float[N,16] x) => (float[N,5] y) { m = Gemm (x, w, b)\n y = Relu(m) }",
        {"w": (16, 5), "b": (5,)},
        {"QGemm": 1},
    ),
    "matmul_weight": (
        "g (float[N,7,16] x) => (float[N,7,5] y) { m = MatMul (x, w)\n y = Relu(m) }",
        {"w": (16, 5)},
        {"QLinearMatMul": 1},
    ),
    "matmul_activations_sigmoid": (
        "g (float[N,7,16] x, float[N,16,3] z) => (float[N,7,3] y) { m = MatMul (x, z)\n y = Sigmoid(m) }",
        {},
        {"QLinearMatMul": 1, "QLinearSigmoid": 1},
    ),
    "add_mul_concat": (
        "g (float[N,4,8,8] x) => (float[N,8,8,8] y) { a = Conv (x, w1)\n b = Conv (x, w2)\n s = Add(a, b)\n"
        " p = Mul(s, b)\n y = Concat <axis=1> (s, p) }",
        {"w1": (4, 4, 1, 1), "w2": (4, 4, 1, 1)},
        {"QLinearConv": 2, "QLinearAdd": 1, "QLinearMul": 1, "QLinearConcat": 1},
    ),
    "add_constant": (
        # (after a Relu: a constant Add right after the Conv is folded into it)
        "g (float[N,4,8,8] x) => (float[N,4,8,8] y) { a = Conv (x, w)\n r = Relu (a)\n"
        " y = Add(r, c) }",
        {"w": (4, 4, 1, 1), "c": (1, 4, 1, 1)},
        {"QLinearConv": 1, "QLinearAdd": 1},
    ),
    "pools_reshape_transpose_flatten": (
        "g (float[N,4,8,8] x) => (float[N,24] y) { c = Conv (x, w)\n r = Relu(c)\n"
        " m = MaxPool <kernel_shape=[2,2], strides=[2,2]> (r)\n a = AveragePool <kernel_shape=[2,2], strides=[2,2]> (m)\n"
        " t = Transpose <perm=[0,1,3,2]> (a)\n y = Flatten (t) }",
        {"w": (6, 4, 1, 1)},
        {"QLinearConv": 1, "QLinearAveragePool": 1},
    ),
    "gap_resize": (
        "g (float[N,4,8,8] x) => (float[N,6,1,1] y, float[N,6,16,16] z) { c = Conv (x, w)\n y = GlobalAveragePool(c)\n"
        ' sc = Constant<value=float[4] {1.0,1.0,2.0,2.0}>()\n z = Resize <mode="nearest"> (c, , sc) }',
        {"w": (6, 4, 1, 1)},
        {"QLinearConv": 1, "QLinearGlobalAveragePool": 1, "Resize": 1},
    ),
    "reshape_softmax": (
        "g (float[N,16] x) => (float[N,5] y) { g = Gemm <transB=1> (x, w)\n s = Constant<value=int64[2] {0, 5}>()\n"
        " r = Reshape(g, s)\n y = Softmax(r) }",
        {"w": (5, 16)},
        {"QGemm": 1, "QLinearSoftmax": 1},
    ),
}


def build(text: str, weights: dict) -> onnx.ModelProto:
    model = onnx.parser.parse_model(H + text)
    rng = np.random.default_rng(0)
    for name, shape in weights.items():
        model.graph.initializer.append(
            onnx.numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)
        )
    onnx.checker.check_model(model, full_check=True)
    return model


def optimized_ops(model, tmp_path) -> tuple[Counter, onnx.GraphProto]:
    """What onnxruntime runs after its default (serving) optimisations."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = os.path.join(tmp_path, "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(io.model_bytes(model), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    return Counter(n.op_type for n in graph.node), graph


@pytest.mark.parametrize("case", sorted(CASES))
def test_placement_fuses_into_int8_kernels_with_parity(case, tmp_path):
    text, weights, kernels = CASES[case]
    proto = build(text, weights)
    specs = input_specs(io.load_model(proto))
    config = QuantizeConfig(holdout=0, quantize_softmax=True)
    quantized, report = quantize(proto, SyntheticSamples(specs, 256, seed=1), config)
    assert not report.kept_float
    saved = io.save_model(quantized, tmp_path / "q.onnx")  # passes the checker's full check
    ops, _ = optimized_ops(quantized, tmp_path)
    for kernel, count in kernels.items():
        assert ops[kernel] == count, (case, dict(ops))
    assert not FLOAT_COMPUTE & set(ops), (case, dict(ops))  # nothing fell back to float kernels
    # Parity on samples calibration never saw; QDQ error is bounded, not zero.
    parity = verify(proto, saved, SyntheticSamples(specs, 64, seed=2))
    for out in parity.outputs:
        assert out.cosine_mean > 0.995, (case, out)


def test_fused_kernels_compute_what_the_qdq_graph_says(tmp_path):
    """Optimised (fused int8 kernels) and unoptimised (reference QDQ semantics) runs agree."""
    text, weights, _ = CASES["add_mul_concat"]
    proto = build(text, weights)
    specs = input_specs(io.load_model(proto))
    quantized, _ = quantize(proto, SyntheticSamples(specs, 128), QuantizeConfig(holdout=0))
    x = {"x": next(SyntheticSamples(specs, 8, seed=3).batches(8)).inputs["x"]}
    data = io.model_bytes(quantized)
    none = ort.SessionOptions()
    none.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(data, none, providers=["CPUExecutionProvider"]).run(None, x)[0]
    out = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, x)[0]
    # Fused kernels requantize in one step; the difference stays within one output step.
    assert np.max(np.abs(ref - out)) <= 2 * np.max(np.abs(ref)) / 255 + 1e-6
    r, o = (
        ref.reshape(len(ref), -1).astype(np.float64),
        out.reshape(len(out), -1).astype(np.float64),
    )
    cosine = (r * o).sum(1) / (np.linalg.norm(r, axis=1) * np.linalg.norm(o, axis=1))
    assert cosine.min() > 0.999


@pytest.mark.parametrize("arch", ["digits_resnet", "digits_mobilenet"])
def test_digits_models_keep_accuracy_and_run_int8_kernels(arch, calib_npz, test_npz, tmp_path):
    path = calib_npz.parent / f"{arch}.onnx"
    specs = input_specs(io.load_model(path))
    quantized, report = quantize(
        path,
        NpzSamples(calib_npz, specs),
        QuantizeConfig(),
        verify_samples=NpzSamples(test_npz, specs),
    )
    (out,) = report.parity.outputs
    assert out.reference_accuracy - out.candidate_accuracy <= 0.005  # at most half a point
    assert out.cosine_mean > 0.999 and out.snr_db > 25
    assert report.weight_bytes_after < 0.4 * report.weight_bytes_before
    ops, _ = optimized_ops(quantized, tmp_path)
    assert (
        ops["Conv"] == 0
        and ops["QLinearConv"]
        == Counter(n.op_type for n in onnx.load(str(path)).graph.node)["Conv"]
    )
    assert ops["BatchNormalization"] == 0 and ops["QGemm"] == 1


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
@pytest.mark.parametrize(
    "options",
    [{}, {"per_channel": False}, {"activation_type": "int8", "symmetric_activations": True}],
)
def test_every_method_and_option_gives_a_valid_model(
    method, options, resnet_path, calib_npz, tmp_path
):
    specs = input_specs(io.load_model(resnet_path))
    config = QuantizeConfig(calibration=method, **options)
    quantized, report = quantize(resnet_path, NpzSamples(calib_npz, specs), config)
    io.save_model(quantized, tmp_path / "q.onnx")
    assert report.calibration_samples == 410 and report.parity.samples == 102  # 20 % held out
    (out,) = report.parity.outputs
    assert out.top1_agreement > 0.9 and out.cosine_mean > 0.9
    scales = [
        t for t in quantized.graph.initializers.values() if t.name.endswith("weight_bnfold_scale")
    ]
    assert scales and all(
        (s.const_value.numpy().ndim == 0) == (not config.per_channel) for s in scales
    )
    zero_points = [
        n.inputs[2].const_value.numpy() for n in quantized.graph if n.op_type == "QuantizeLinear"
    ]
    assert all(z.dtype == np.dtype(config.activation_type) for z in zero_points)
    if config.symmetric_activations:
        assert all(int(z) == 0 for z in zero_points)
    assert report.folded_activations == (
        []
        if config.symmetric_activations
        else ["s1.relu1", "s1.relu2", "s2.relu1", "s2.relu2", "stem.relu"]
    )


def test_exclude_by_name_and_op_type_keeps_float_with_reason(resnet_path, calib_npz):
    specs = input_specs(io.load_model(resnet_path))
    config = QuantizeConfig(exclude=("s2.conv2", "Gemm"), holdout=0)
    quantized, report = quantize(resnet_path, NpzSamples(calib_npz, specs), config)
    kept = {k.node: k.reason for k in report.kept_float}
    assert kept == {"s2.conv2": "excluded by the user", "fc": "excluded by the user"}
    conv2 = next(n for n in quantized.graph if n.name == "s2.conv2")
    assert (
        conv2.inputs[1].const_value is not None and conv2.inputs[1].dtype == onnx.TensorProto.FLOAT
    )


def test_all_zero_activation_gets_valid_parameters(tmp_path):
    proto = build(
        "g (float[N,4,8,8] x) => (float[N,4,8,8] y) { c = Conv (x, w)\n r = Relu(c)\n y = Conv (r, w2) }",
        {"w": (4, 4, 1, 1), "w2": (4, 4, 1, 1)},
    )
    proto.graph.initializer[0].CopyFrom(
        onnx.numpy_helper.from_array(np.zeros((4, 4, 1, 1), np.float32), "w")
    )
    specs = input_specs(io.load_model(proto))
    quantized, report = quantize(proto, SyntheticSamples(specs, 16), QuantizeConfig(holdout=0))
    for r in report.ranges:
        assert np.isfinite(r.scale) and r.scale > 0
    out = verify(proto, quantized, SyntheticSamples(specs, 8, seed=4)).outputs[0]
    assert out.max_abs_error == 0  # zeros quantize exactly


def test_layer_with_nan_activations_stays_float_and_says_why():
    # Log of negative samples gives NaN: no finite range exists for 'l', so the Gemm reading it
    # stays in float (as -inf attention masks do), named in the report, and the model is valid.
    proto = build(
        "g (float[N,4] x) => (float[N,3] y) { l = Log(x)\n y = Gemm <transB=1> (l, w) }",
        {"w": (3, 4)},
    )
    specs = input_specs(io.load_model(proto))
    quantized, report = quantize(proto, SyntheticSamples(specs, 16), QuantizeConfig(holdout=0))
    assert [k.op_type for k in report.kept_float] == ["Gemm"]
    assert "NaN/Inf" in report.kept_float[0].reason
    assert not [n for n in quantized.graph if n.op_type == "QuantizeLinear"]
    for r in report.ranges:
        assert np.isfinite(r.scale)


def test_cli_quantize_writes_checked_model_and_report(
    resnet_path, calib_npz, test_npz, tmp_path, capsys
):
    out = tmp_path / "q.onnx"
    code, stdout, _ = run_cli(
        [
            "quantize",
            resnet_path,
            "-o",
            out,
            "--data",
            calib_npz,
            "--verify-data",
            test_npz,
            "--calibration",
            "percentile",
            "--max-accuracy-drop",
            "0.005",
            "--json",
            tmp_path / "r.json",
        ],
        capsys,
    )
    assert code == 0, stdout
    onnx.checker.check_model(str(out), full_check=True)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["parity"]["samples"] == 360 and data["calibration_samples"] == 512
    assert data["quantized_ops"]["Conv"] == 6 and data["config"]["calibration"] == "percentile"


def test_cli_quantize_refuses_to_overwrite_its_input(resnet_path, calib_npz, tmp_path, capsys):
    copy = tmp_path / "m.onnx"
    copy.write_bytes(resnet_path.read_bytes())
    code, _, err = run_cli(["quantize", copy, "-o", copy, "--data", calib_npz], capsys)
    assert code == 2 and "--overwrite" in err
    assert copy.read_bytes() == resnet_path.read_bytes()


def test_cli_quantize_parity_failure_exits_1(resnet_path, calib_npz, tmp_path, capsys):
    code, stdout, _ = run_cli(
        [
            "quantize",
            resnet_path,
            "-o",
            tmp_path / "q.onnx",
            "--data",
            calib_npz,
            "--min-snr",
            "80",
        ],
        capsys,
    )
    assert code == 1 and "FAIL" in stdout


def test_accuracy_guard_keeps_harmful_layers_in_float_until_the_target_holds(
    mobilenet_path, calib_npz
):
    specs = input_specs(io.load_model(mobilenet_path))
    samples = NpzSamples(calib_npz, specs)
    # Per-tensor weights: depthwise layers lose most, so a few layers carry most of the error.
    # Pair-safe weights make bias correction pay off here on every CPU, so layers the guard
    # keeps in float must also take back their uncorrected biases.
    options = dict(per_channel=False, reduce_range="on")
    _, plain = quantize(mobilenet_path, samples, QuantizeConfig(**options))
    assert plain.bias_correction.startswith("applied")
    before = plain.parity.outputs[0].cosine_mean
    target = round(1 - (1 - before) / 2, 6)  # halve the distance to a perfect cosine
    config = QuantizeConfig(**options, min_cosine=target)
    quantized, report = quantize(mobilenet_path, samples, config)
    assert report.bias_correction.startswith("applied")
    guard = report.guard
    assert (
        guard.met and guard.metric_before == pytest.approx(before) and guard.metric_after >= target
    )
    assert 1 <= len(guard.kept_float) < guard.candidates
    gains = [s.snr_gain_db for s in guard.kept_float]
    assert gains == sorted(gains, reverse=True)  # the most harmful layers go first
    kept = {k.node for k in report.kept_float if k.reason.startswith("accuracy guard")}
    assert kept == {s.node for s in guard.kept_float}
    weighted = 0
    for name in kept:  # those layers really run in float: float weights, float output
        node = next(n for n in quantized.graph if n.name == name)
        assert not any(u.node.op_type == "QuantizeLinear" for u in node.outputs[0].uses())
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            weighted += 1
            assert node.inputs[1].producer() is None
            assert node.inputs[1].dtype == onnx.TensorProto.FLOAT
    assert weighted >= 1
    assert report.parity.outputs[0].cosine_mean >= target  # same held-out samples the guard scored


def test_accuracy_guard_on_many_layers_ranks_them_from_one_run_of_each_model(
    mobilenet_path, calib_npz, monkeypatch
):
    """Above EXACT_SENSITIVITY_LAYERS candidates the guard ranks layers by the SNR each loses
    between its inputs and its output (one run of the reference and of the quantized model)
    instead of one build per layer, and finds how many to keep by binary search: the builds
    grow with the log of the layer count, and the target still holds."""
    q = importlib.import_module("onnxzip.quantize.guard")

    specs = input_specs(io.load_model(mobilenet_path))
    samples = NpzSamples(calib_npz, specs)
    options = dict(per_channel=False, reduce_range="on")
    _, plain = quantize(mobilenet_path, samples, QuantizeConfig(**options))
    before = plain.parity.outputs[0].cosine_mean
    target = round(1 - (1 - before) / 2, 6)
    monkeypatch.setattr(q, "EXACT_SENSITIVITY_LAYERS", 0)
    builds = []
    original_build = q._Builder.build

    def counting_build(self, keep_float=frozenset()):
        builds.append(len(keep_float))
        return original_build(self, keep_float)

    monkeypatch.setattr(q._Builder, "build", counting_build)
    _, report = quantize(mobilenet_path, samples, QuantizeConfig(**options, min_cosine=target))
    guard = report.guard
    assert guard.met and guard.metric_after >= target
    assert 1 <= len(guard.kept_float) < guard.candidates
    losses = [s.snr_gain_db for s in guard.kept_float]
    assert losses == sorted(losses, reverse=True) and losses[0] > 0
    searched = [k for k in builds if k > 0]  # builds with layers kept in float: the search only
    assert len(searched) <= math.ceil(math.log2(guard.candidates)) + 1
    assert report.parity.outputs[0].cosine_mean >= target


def test_accuracy_guard_with_labels_and_without_verification_data(resnet_path, calib_npz, test_npz):
    specs = input_specs(io.load_model(resnet_path))
    config = QuantizeConfig(max_drop=0.0)
    _, report = quantize(
        resnet_path,
        NpzSamples(calib_npz, specs),
        config,
        verify_samples=NpzSamples(test_npz, specs),
    )
    out = report.parity.outputs[0]
    assert report.guard.met and out.reference_accuracy - out.candidate_accuracy <= 0
    with pytest.raises(InputError, match="verification samples"):
        quantize(resnet_path, NpzSamples(calib_npz, specs), QuantizeConfig(max_drop=0.5, holdout=0))


DYNAMIC_FFN = (
    "g (float[N,S,16] x) => (float[N,S,16] y) { h = MatMul (x, w1)\n h2 = Add (h, b1)\n a = Relu (h2)\n"
    " q = MatMul (x, wq)\n k = MatMul (x, wk)\n s = Add (q, k)\n t = Add (a, s)\n y = MatMul (t, w2) }"
)


def test_dynamic_mode_quantizes_matmul_weights_and_shares_activation_quantization(tmp_path):
    proto = build(
        DYNAMIC_FFN, {"w1": (16, 32), "b1": (32,), "wq": (16, 32), "wk": (16, 32), "w2": (32, 16)}
    )
    specs = input_specs(io.load_model(proto))
    config = QuantizeConfig(mode="dynamic", holdout=0)
    quantized, report = quantize(
        proto,
        SyntheticSamples(specs, 8),
        config,
        verify_samples=SyntheticSamples(specs, 16, seed=5),
    )
    assert report.quantized_ops == {"MatMul": 4} and report.weights_quantized == 4
    ops = Counter(n.op_type for n in quantized.graph)
    # x feeds three projections through one DynamicQuantizeLinear; t has its own.
    assert ops["DynamicQuantizeLinear"] == 2 and ops["MatMulInteger"] == 4 and ops["MatMul"] == 0
    weights = [
        v.const_value.numpy()
        for k, v in quantized.graph.initializers.items()
        if k.endswith("weight_quantized")
    ]
    assert len(weights) == 4 and all(w.dtype == np.int8 for w in weights)
    io.save_model(quantized, tmp_path / "d.onnx")
    fused, _ = optimized_ops(quantized, tmp_path)
    assert fused["DynamicQuantizeMatMul"] + fused["MatMulIntegerToFloat"] == 4, dict(fused)
    assert report.parity.outputs[0].cosine_mean > 0.999


def test_dynamic_mode_gemm_with_transposed_weight_and_bias():
    proto = build(
        "g (float[N,16] x) => (float[N,5] y) { y = Gemm <transB=1> (x, w, b) }",
        {"w": (5, 16), "b": (5,)},
    )
    specs = input_specs(io.load_model(proto))
    quantized, report = quantize(
        proto,
        SyntheticSamples(specs, 8),
        QuantizeConfig(mode="dynamic", holdout=0),
        verify_samples=SyntheticSamples(specs, 64, seed=3),
    )
    assert report.quantized_ops == {"Gemm": 1}
    assert [
        n.op_type for n in quantized.graph if n.op_type in ("Gemm", "MatMulInteger", "Add")
    ] == ["MatMulInteger", "Add"]
    out = report.parity.outputs[0]
    assert out.cosine_mean > 0.999 and out.top1_agreement > 0.95


@pytest.mark.parametrize("arch", ["digits_resnet", "digits_mobilenet"])
def test_bias_correction_raises_held_out_snr_and_auto_keeps_it(arch, calib_npz, test_npz):
    path = calib_npz.parent / f"{arch}.onnx"
    specs = input_specs(io.load_model(path))
    snr = {}
    for mode in ("off", "on", "auto"):
        _, report = quantize(
            path,
            NpzSamples(calib_npz, specs),
            QuantizeConfig(bias_correction=mode),
            verify_samples=NpzSamples(test_npz, specs),
        )
        snr[mode] = report.parity.outputs[0].snr_db
        if mode == "auto":
            assert report.bias_correction.startswith("applied")
        if mode == "off":
            assert report.bias_correction is None
    assert snr["on"] > snr["off"] + 1.0
    assert snr["auto"] == pytest.approx(snr["on"])


def test_dynamic_mode_quantizes_embedding_tables_per_column(tmp_path):
    # Gather from a constant table: int8 rows gathered, then one DequantizeLinear per column.
    model = zoo.bert_encoder(layers=1, hidden=32, heads=4, ffn=64, vocab=300)
    specs = input_specs(model)
    quantized, report = quantize(
        model,
        SyntheticSamples(specs, 8),
        QuantizeConfig(mode="dynamic", holdout=0),
        verify_samples=SyntheticSamples(specs, 16, seed=2),
    )
    assert report.quantized_ops["Gather"] == 1
    gathers = [n for n in quantized.graph if n.op_type == "Gather"]
    table = gathers[0].inputs[0].const_value.numpy()
    assert table.dtype == np.int8 and table.shape == (300, 32)
    dq = gathers[0].outputs[0].uses()[0].node
    assert dq.op_type == "DequantizeLinear" and dq.inputs[1].const_value.numpy().shape == (32,)
    assert report.parity.outputs[0].cosine_mean > 0.995
    io.save_model(quantized, tmp_path / "q.onnx")
    assert io.file_size(tmp_path / "q.onnx") < 0.5 * len(io.model_bytes(model))


PAIR_CASES = {
    "MatMul": ("g (float[N,64] x) => (float[N,16] y) { y = MatMul(x, w) }", (64, 16)),
    "Conv": ("g (float[N,8,6,6] x) => (float[N,16,4,4] y) { y = Conv(x, w) }", (16, 8, 3, 3)),
    "Conv_grouped": (
        "g (float[N,16,6,6] x) => (float[N,16,4,4] y) { y = Conv<group=4>(x, w) }",
        (16, 4, 3, 3),
    ),
    # onnxruntime's depthwise kernel adds in 32 bits: full-range weights stay exact.
    "Conv_depthwise": (
        "g (float[N,16,6,6] x) => (float[N,16,4,4] y) { y = Conv<group=16>(x, w) }",
        (16, 1, 3, 3),
    ),
}


@pytest.mark.parametrize("op", sorted(PAIR_CASES))
def test_pair_safe_weights_keep_fused_int8_kernels_exact(op, tmp_path):
    """Large same-sign weights and inputs that fill the uint8 range are what saturates the 16-bit
    pair sums of onnxruntime's int8 kernels on x86 CPUs without VNNI. With --reduce-range on,
    the fused kernels compute what the QDQ graph says, on any CPU."""
    text, shape = PAIR_CASES[op]
    model = onnx.parser.parse_model(H + text)
    w = np.random.default_rng(0).normal(1.0, 0.05, shape).astype(np.float32)
    model.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    specs = input_specs(io.load_model(model))
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (64, *specs[0].shape[1:])).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    quantized, report = quantize(
        model, NpzSamples(tmp_path / "x.npz", specs), QuantizeConfig(holdout=0, reduce_range="on")
    )
    assert report.weight_range.startswith("pair-safe")
    codes = next(
        passes.const_array(n.inputs[0])
        for n in quantized.graph
        if n.op_type == "DequantizeLinear"
        if n.inputs[0].dtype == onnx.TensorProto.INT8
    ).astype(np.int64)
    rows = np.moveaxis(codes, 1 if op == "MatMul" else 0, 0).reshape(16, -1)
    top2 = np.sort(np.abs(rows), axis=1)[:, -2:].sum(axis=1)
    if op == "Conv_depthwise":
        assert (np.abs(rows).max(axis=1) == 127).all()  # full range kept
    else:
        assert top2.max() <= 128 and top2.max() >= 120  # safe, yet no range wasted
    feed = {"x": x[:8]}
    data = io.model_bytes(quantized)
    none = ort.SessionOptions()
    none.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(data, none, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    out = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    ops, _ = optimized_ops(quantized, tmp_path)
    # A MatMul feeding the graph output fuses into MatMulIntegerToFloat (no output Q).
    assert ops[op.split("_")[0]] == 0
    assert ops["MatMulIntegerToFloat" if op == "MatMul" else "QLinearConv"] == 1
    assert np.max(np.abs(ref - out)) <= 2 * np.max(np.abs(ref)) / 255 + 1e-6


def test_dynamic_mode_pair_safe_weights_match_the_integer_arithmetic():
    """MatMulInteger with pair-safe int8 weights equals exact integer arithmetic in numpy."""
    model = onnx.parser.parse_model(H + "g (float[N,64] x) => (float[N,16] y) { y = MatMul(x, w) }")
    w = np.random.default_rng(0).normal(1.0, 0.05, (64, 16)).astype(np.float32)
    model.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    specs = input_specs(io.load_model(model))
    quantized, report = quantize(
        model,
        SyntheticSamples(specs, 8),
        QuantizeConfig(mode="dynamic", holdout=0, reduce_range="on"),
    )
    assert report.weight_range.startswith("pair-safe")
    x = np.random.default_rng(1).uniform(0, 1, (8, 64)).astype(np.float32)
    out = ort.InferenceSession(io.model_bytes(quantized), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    p = qp.weight_params(w, axis=1, pair_safe=True)
    codes = qp.quantize(w, p, symmetric_weight=True).astype(np.int64)
    # DynamicQuantizeLinear: uint8 over [min(x, 0), max(x, 0)]
    sx = np.float32((max(x.max(), 0) - min(x.min(), 0)) / 255)
    zx = np.clip(np.rint(-min(x.min(), 0) / sx), 0, 255)
    xq = np.clip(np.rint(x / sx) + zx, 0, 255).astype(np.int64)
    exact = ((xq - int(zx)) @ codes).astype(np.float64) * sx * p.scale.astype(np.float64)
    np.testing.assert_allclose(out, exact, rtol=1e-5, atol=1e-4 * np.abs(exact).max())


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_inspect_tells_which_int8_weights_can_saturate(mode):
    from onnxzip.analysis import inspect_model

    text, shape = PAIR_CASES["MatMul"]
    model = onnx.parser.parse_model(H + text)
    w = np.random.default_rng(0).normal(1.0, 0.05, shape).astype(np.float32)
    w[:, 0], w[0, 0] = 0.001, 1.0  # one dominant weight: no pair of codes passes 128
    model.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    assert inspect_model(model).int8_weights is None
    samples = SyntheticSamples(input_specs(io.load_model(model)), 16)
    for reduce_range, risky in (("off", 1), ("on", 0)):
        config = QuantizeConfig(mode=mode, holdout=0, reduce_range=reduce_range)
        quantized, _ = quantize(model, samples, config)
        report = inspect_model(quantized)
        assert report.int8_weights == (1, risky)
        assert ("can saturate" in report.format()) == bool(risky)
    codes = qp.quantize(w, qp.weight_params(w, axis=1), symmetric_weight=True)
    assert qp.pair_overflow_channels(codes, axis=1) == shape[1] - 1


def test_weights_in_constant_nodes_count_as_weights(tmp_path, capsys):
    """Exporters may store weights as Constant nodes: the report counts their bytes (it said
    '0 -> N bytes')."""
    import onnx.helper
    import onnx.numpy_helper

    w = np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Constant", [], ["w"], value=onnx.numpy_helper.from_array(w)),
            onnx.helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    proto.ir_version = 8
    path = tmp_path / "const.onnx"
    onnx.save(proto, str(path))
    assert io.weights_nbytes(io.load_model(path)) == w.nbytes
    code, out, err = run_cli(
        ["quantize", path, "-o", tmp_path / "q.onnx", "--synthetic", "8"], capsys
    )
    assert code == 0, err
    assert f"weights      {w.nbytes} -> " in out


def _if_model(tmp_path, with_weight: bool):
    """An If whose then-branch holds a MatMul weight read from the main graph (as exporters
    write control flow), or nothing to quantize at all."""
    import onnx.helper
    import onnx.numpy_helper

    w = onnx.numpy_helper.from_array(
        np.random.default_rng(0).normal(0, 0.3, (32, 16)).astype(np.float32), "w"
    )
    body = (
        [onnx.helper.make_node("MatMul", ["x", "w"], ["t"])]
        if with_weight
        else [onnx.helper.make_node("Slice", ["x", "lo", "hi", "ax"], ["t"])]
    )
    then_g = onnx.helper.make_graph(
        body,
        "then",
        [],
        [onnx.helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, ["N", 16])],
    )
    else_g = onnx.helper.make_graph(
        [onnx.helper.make_node("Slice", ["x", "hi", "end", "ax"], ["e"])],
        "else",
        [],
        [onnx.helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, ["N", 16])],
    )
    consts = {"z": np.array(0.0, np.float32), "lo": np.array([0]), "hi": np.array([16])}
    consts.update({"end": np.array([32]), "ax": np.array([1])})
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            onnx.helper.make_node("Greater", ["s", "z"], ["c"]),
            onnx.helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g),
        ],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 32])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 16])],
        ([w] if with_weight else [])
        + [onnx.numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    proto.ir_version = 8
    path = tmp_path / "if.onnx"
    onnx.save(proto, str(path))
    return path


def test_a_model_with_nothing_to_quantize_says_so_instead_of_pass(tmp_path, capsys):
    """No weight anywhere: the report says NOTHING instead of a calibration on 0 samples and
    a PASS."""
    path = _if_model(tmp_path, with_weight=False)
    code, out, err = run_cli(
        ["quantize", path, "-o", tmp_path / "q.onnx", "--synthetic", "16"], capsys
    )
    assert code == 0, err
    assert "quantized    NOTHING" in out and "NOTHING QUANTIZED" in out
    assert "PASS" not in out and "on 0 samples" not in out


@pytest.mark.parametrize("mode", ["static", "dynamic", "weight-only"])
def test_weights_inside_if_branches_are_quantized_weight_only(tmp_path, capsys, mode):
    """Calibration cannot observe activations inside an If branch: its MatMul weight becomes
    int8 per output column (DequantizeLinear in the branch, where onnxruntime's fusions find
    it), the activations there stay float, and the report says so in every mode."""
    path = _if_model(tmp_path, with_weight=True)
    out_path = tmp_path / "q.onnx"
    data = tmp_path / "x.npz"
    np.savez(data, x=np.random.default_rng(1).normal(0.2, 1, (40, 32)).astype(np.float32))
    code, out, err = run_cli(
        ["quantize", path, "-o", out_path, "--data", data, "--mode", mode, "--no-floors"], capsys
    )
    assert code == 0, err
    assert "subgraphs    1 weights inside If/Loop/Scan bodies quantized weight-only" in out
    assert "NOTHING" not in out
    proto = onnx.load(str(out_path))
    onnx.checker.check_model(proto, full_check=True)
    (if_node,) = [n for n in proto.graph.node if n.op_type == "If"]
    then_g = next(a.g for a in if_node.attribute if a.name == "then_branch")
    assert [n.op_type for n in then_g.node] == ["DequantizeLinear", "MatMul"]
    assert {t.data_type for t in then_g.initializer} >= {onnx.TensorProto.INT8}
    assert io.weights_nbytes(io.load_model(out_path)) < 0.4 * 32 * 16 * 4
    x = np.random.default_rng(2).normal(0.5, 1, (6, 32)).astype(np.float32)  # takes "then"
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )
    assert np.abs(got[0] - want[0]).max() < 0.02 * np.abs(want[0]).max()


def test_concat_of_mixed_ranges_stays_float_so_each_part_keeps_its_scale(monkeypatch):
    """Box coordinates (x100) joined with sigmoid probabilities: one shared output scale leaves
    the probabilities no levels (0 dB); the join kept float keeps them at their own scale."""
    import importlib

    qmod = importlib.import_module("onnxzip.quantize.builder")
    rng = np.random.default_rng(0)
    proto = onnx.parser.parse_model(
        H + "g (float[N, 4, 8, 8] x) => (float[N, 6, 8, 8] y) { b = Conv (x, wb)\n"
        " boxes = Mul (b, k)\n c = Conv (x, wc)\n p = Sigmoid (c)\n y = Concat <axis = 1> (boxes, p) }"
    )
    for name, array in {
        "wb": rng.normal(0, 1, (4, 4, 1, 1)),
        "wc": rng.normal(0, 1, (2, 4, 1, 1)),
        "k": np.array(100.0),
    }.items():
        proto.graph.initializer.append(
            onnx.numpy_helper.from_array(np.asarray(array, np.float32), name)
        )
    model = io.load_model(proto)
    samples = SyntheticSamples(input_specs(model), 64, seed=1)

    def probabilities_snr(report):
        (check,) = [
            c
            for c in report.parity.floors
            if c.part == "y[4:6 on axis 1]" and c.floor.metric == "snr_db"
        ]
        return check.value

    quantized, report = quantize(model, samples, QuantizeConfig(floor_guard=False))
    (kept,) = [k for k in report.kept_float if k.op_type == "Concat"]
    assert "scales" in kept.reason and "apart" in kept.reason
    assert report.parity.passed and probabilities_snr(report) > 30
    # the join reads each part dequantized with its own scale and writes float
    (concat,) = [n for n in quantized.graph if n.op_type == "Concat"]
    readers = [v.producer() for v in concat.inputs]
    assert [r.op_type for r in readers] == ["DequantizeLinear", "DequantizeLinear"]
    scales = [r.inputs[1].const_value.numpy().item() for r in readers]
    assert max(scales) / min(scales) > 8
    assert not any(u.node.op_type == "QuantizeLinear" for u in concat.outputs[0].uses())
    monkeypatch.setattr(qmod, "MIXED_RANGE_RATIO", 1e9)  # the join quantized with one scale
    _, shared = quantize(model, samples, QuantizeConfig(floor_guard=False))
    assert probabilities_snr(shared) < 5 and not shared.parity.passed


def test_an_activation_read_inside_an_if_body_is_not_folded_away(tmp_path, capsys):
    """Folding a ReLU into its Conv's range removes the node; a reader inside an If body keeps
    reading float tensors, so it would see the Conv's output before the ReLU (negative values:
    a VAD's decoder read its encoder that way and its state output fell to cosine 0.13). The
    ReLU stays when a body reads it, and the output keeps the float model's values."""
    proto = onnx.parser.parse_model(
        H + "g (float[N, 4, 8] x, bool c) => (float[N, 8, 8] y) {\n"
        " a = Conv <pads = [1, 1]> (x, w)\n r = Relu (a)\n"
        " y = If (c) <then_branch = t () => (float[N, 8, 8] yt) { yt = Identity (r) },\n"
        "  else_branch = e () => (float[N, 8, 8] ye) { ye = Neg (r) }> }"
    )
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.5, (8, 4, 3)).astype(np.float32)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    path, out_path, data = tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "d.npz"
    onnx.save(proto, str(path))
    x = rng.normal(0, 1, (32, 4, 8)).astype(np.float32)
    np.savez(data, x=x, c=np.array(True))
    code, out, err = run_cli(
        ["quantize", path, "-o", out_path, "--data", data, "--no-floors"], capsys
    )
    assert code == 0, err
    q = onnx.load(str(out_path))
    assert "Relu" in [n.op_type for n in q.graph.node]
    assert "QuantizeLinear" in [n.op_type for n in q.graph.node]
    feed = {"x": x, "c": np.array(True)}
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
    got = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"]).run(None, feed)
    assert want[0].min() >= 0 and got[0].min() >= 0  # the ReLU still applies in the branch
    assert 10 * np.log10((want[0] ** 2).sum() / ((want[0] - got[0]) ** 2).sum()) > 30


def test_prune_of_a_model_whose_weights_sit_in_if_bodies_says_nothing_pruned(tmp_path, capsys):
    """Every weight inside an If branch: prune names that and says NOTHING PRUNED, not PASS."""
    path = _if_model(tmp_path, with_weight=True)
    data = tmp_path / "x.npz"
    np.savez(data, x=np.random.default_rng(1).normal(0.2, 1, (16, 32)).astype(np.float32))
    code, out, err = run_cli(
        ["prune", path, "-o", tmp_path / "p.onnx", "--ratio", "0.3", "--data", data], capsys
    )
    assert code == 0, err
    assert "weights all sit inside If/Loop/Scan bodies" in out
    assert "NOTHING PRUNED" in out and "PASS" not in out


def test_compress_of_a_model_with_nothing_to_compress_says_so_instead_of_pass(tmp_path, capsys):
    """No weight anywhere: compress names why nothing was pruned or quantized, no PASS."""
    path = _if_model(tmp_path, with_weight=False)
    data = tmp_path / "x.npz"
    np.savez(data, x=np.random.default_rng(1).normal(0.2, 1, (16, 32)).astype(np.float32))
    code, out, err = run_cli(
        ["compress", path, "-o", tmp_path / "c.onnx", "--data", data, "--no-latency"], capsys
    )
    assert code == 0, err
    assert "NOTHING COMPRESSED: nothing was pruned (no prunable channel group" in out
    # known from the graph: no pruning search, no training engine started
    assert "pruning   none: no prunable channel group" in out
    assert "pruning amounts tried" not in out and "training engine" not in out
    assert "quantization quantized nothing" in out and "PASS" not in out


def test_dynamic_mode_on_a_conv_net_names_the_mode_as_why_nothing_was_quantized(tmp_path):
    """Dynamic int8 quantizes MatMul/Gemm weights: on a network of Convs it quantizes nothing,
    and says that static int8 is the mode for those layers."""
    proto = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        "g (float[N, 3, 16, 16] x) => (float[N, 8, 16, 16] y) "
        "{ c = Conv <pads = [1, 1, 1, 1]> (x, w) y = Relu (c) }"
    )
    rng = np.random.default_rng(0)
    proto.graph.initializer.append(
        onnx.numpy_helper.from_array(rng.normal(0, 1, (8, 3, 3, 3)).astype(np.float32), "w")
    )
    samples = SyntheticSamples(input_specs(io.load_model(proto)), 16, seed=0)
    _, report = quantize(proto, samples, QuantizeConfig(mode="dynamic"))
    assert report.quantized_ops == {}
    assert report.nothing_because.startswith(
        "dynamic mode quantizes Gemm and MatMul weights; this model's weighted layers are Conv x1"
    )
    assert "NOTHING QUANTIZED: dynamic mode quantizes" in report.format()
    _, static = quantize(proto, samples, QuantizeConfig())
    assert static.quantized_ops.get("Conv") == 1 and static.nothing_because is None


def test_a_bias_too_large_for_its_weight_scale_raises_the_weight_scale_instead_of_saturating():
    """A channel with near-zero weights and a large (folded BatchNorm) bias: ``b / (S_x S_w)``
    overflows int32, and saturated, the channel's output loses its bias. The weight scale is
    raised so that the bias fits; the channel keeps its value."""
    proto = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        "g (float[N, 4, 6, 6] x) => (float[N, 3, 6, 6] y) { c = Conv (x, w, b) y = Relu (c) }"
    )
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.5, (3, 4, 1, 1)).astype(np.float32)
    w[1] = 1e-9  # a dead channel
    b = np.array([0.1, 10.0, -0.2], np.float32)
    for name, array in {"w": w, "b": b}.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    samples = SyntheticSamples(input_specs(io.load_model(proto)), 32, seed=0)
    quantized, report = quantize(
        proto, samples, QuantizeConfig(bias_correction="off"), floors=False
    )
    assert report.quantized_ops.get("Conv") == 1
    x = rng.uniform(0, 1, (4, 4, 6, 6)).astype(np.float32)
    got = ort.InferenceSession(
        ir.to_proto(quantized).SerializeToString(), providers=["CPUExecutionProvider"]
    ).run(None, {"x": x})[0]
    np.testing.assert_allclose(got[:, 1], 10.0, rtol=1e-3)  # saturated, it read about 0
    want = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    assert 10 * np.log10((want**2).sum() / ((want - got) ** 2).sum()) > 30


DECOMPOSED_NORM = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N,32] x) => (float[N,8] y) {
    a = MatMul (x, w1)
    mu = ReduceMean <axes=[-1]> (a)
    d = Sub (a, mu)
    sq = Mul (d, d)
    var = ReduceMean <axes=[-1]> (sq)
    ve = Add (var, eps)
    sd = Sqrt (ve)
    n = Div (d, sd)
    g1 = Mul (n, gamma)
    b1 = Add (g1, beta)
    r = Relu (b1)
    y = MatMul (r, w2)
}
"""


def test_a_layernorm_spelled_in_primitive_ops_keeps_its_statistics_in_float(tmp_path, monkeypatch):
    """tf2onnx and torch exports below opset 17 write LayerNorm as ReduceMean, Sub, a square,
    ReduceMean, Add eps, Sqrt, Div. Quantizing the square and the variance per tensor broke a
    real file-type classifier (top-1 agreement 0.25 with every Add/Mul quantized): the
    statistics path stays float, the normalised activation around it is quantized as before."""
    from onnxzip.quantize import plan_quantization
    from onnxzip.quantize.rules import STATISTICS_REASON

    proto = onnx.parser.parse_model(DECOMPOSED_NORM)
    rng = np.random.default_rng(0)
    tensors = {
        "w1": rng.normal(0, 0.3, (32, 16)),
        "w2": rng.normal(0, 0.3, (16, 8)),
        "eps": np.array(1e-5),
        "gamma": rng.uniform(0.5, 1.5, 16),
        "beta": rng.normal(0, 0.2, 16),
    }
    for name, array in tensors.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array.astype(np.float32), name))
    model = io.load_model(proto)
    plan, _ = plan_quantization(model, QuantizeConfig())
    kept = sorted(k for k, why in plan.kept_float.items() if why == STATISTICS_REASON)
    assert kept == ["sq", "ve"], plan.kept_float  # the square and var + eps
    assert {"a", "g1", "b1", "y"} <= set(plan.quantized_nodes)  # gamma and beta still int8

    # rows whose scales differ by a factor of up to 100: 1/sigma spans that too
    x = rng.normal(size=(400, 32)) * 10.0 ** rng.uniform(-1, 1, (400, 1))
    np.savez(tmp_path / "x.npz", x=x.astype(np.float32))
    samples = NpzSamples(tmp_path / "x.npz", input_specs(model))
    kept, quantized = _snr_with_and_without(model, samples, monkeypatch, "normalisation_statistics")
    assert kept > quantized + 10.0 and kept > 8.0, (kept, quantized)  # measured 11.4 / -1.9


def _snr_with_and_without(model, samples, monkeypatch, finder: str) -> tuple[float, float]:
    """Output SNR of static int8 (no floor guard) with the builder's structural rule ``finder``
    and with it finding nothing."""
    config = QuantizeConfig(floor_guard=False)
    _, report = quantize(model, samples, config)
    monkeypatch.setattr(sys.modules["onnxzip.quantize.builder"], finder, lambda graph: frozenset())
    _, every = quantize(model, samples, config)
    return report.parity.outputs[0].snr_db, every.parity.outputs[0].snr_db


def _quantize_beyond_calibration(graph, rng, tmp_path):
    """Quantizes ``graph`` (input ``x`` of [N, 6, 8]) with the defaults, calibrated on samples
    20x smaller than the held-out ones it is verified on: static ranges break there."""
    import onnx.helper as oh

    model = io.load_model(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]))
    x = np.abs(rng.normal(size=(200, 6, 8))).astype(np.float32)
    np.savez(tmp_path / "cal.npz", x=x[:100] * 0.05)
    np.savez(tmp_path / "ver.npz", x=x[100:])
    calibration = NpzSamples(tmp_path / "cal.npz", input_specs(model))
    held_out = NpzSamples(tmp_path / "ver.npz", input_specs(model))
    return quantize(model, calibration, QuantizeConfig(), verify_samples=held_out)


def test_when_the_static_guard_keeps_everything_float_dynamic_int8_with_its_guard_is_tried(
    tmp_path,
):
    """A text recognizer (PP-OCR) whose every static layer breaks its whole-sequence floor
    came back as NOTHING QUANTIZED, while dynamic int8 with its own guard held the floors with
    most MatMuls int8. Here static breaks on calibration ranges the verification data exceeds,
    plain dynamic breaks on one weight whose column outliers round the rest away; dynamic with
    the guard keeps that one float and the other int8."""
    import onnx.helper as oh

    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.5, (8, 16)).astype(np.float32)
    w1[:, 15] = -5.0  # channel 15 is dead after the Relu...
    w2 = rng.normal(0, 0.3, (16, 12)).astype(np.float32)
    w2[15, :] = 60.0  # ...and holds each column's outlier
    graph = oh.make_graph(
        [
            oh.make_node("MatMul", ["x", "w1"], ["a"]),
            oh.make_node("Relu", ["a"], ["r"]),
            oh.make_node("MatMul", ["r", "w2"], ["l"]),
            oh.make_node("Softmax", ["l"], ["y"], axis=-1),
        ],
        "per_position",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 6, 8])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 6, 12])],
        [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2")],
    )
    quantized, report = _quantize_beyond_calibration(graph, rng, tmp_path)
    assert report.config.mode == "dynamic"
    assert "kept every layer in float" in report.fallback
    assert report.quantized_ops == {"MatMul": 1} and report.parity.passed
    assert [k.node for k in report.kept_float if "accuracy guard" in k.reason] == ["l"]
    assert "MatMulInteger" in {n.op_type for n in quantized.graph} or "DynamicQuantizeLinear" in {
        n.op_type for n in quantized.graph
    }
    io.save_model(quantized, tmp_path / "q.onnx")


def test_when_the_static_guard_keeps_most_layers_float_dynamic_int8_is_taken_if_it_keeps_more(
    tmp_path,
):
    """PP-OCRv5's recognizer: static int8 lost the task (every layer amplifies the noise of the
    one before), its guard kept 141 of 143 layers float and wrote that as the result, with two
    small layers int8, while dynamic int8 with its own guard held the floors with more weights
    int8. Here one clipped branch quantizes well statically (its range is the clip's) and the
    rest breaks: the static guard keeps 3 of 4 layers float, dynamic keeps two MatMuls int8."""
    import onnx.helper as oh

    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.5, (8, 16)).astype(np.float32)
    w1[:, 15] = -5.0
    w2 = rng.normal(0, 0.3, (16, 12)).astype(np.float32)
    w2[15, :] = 60.0
    w3 = rng.normal(0, 1.0, (8, 12)).astype(np.float32)
    constants = {"w1": w1, "w2": w2, "w3": w3, "lo": np.float32(0), "hi": np.float32(0.02)}
    graph = oh.make_graph(
        [
            oh.make_node("MatMul", ["x", "w1"], ["a"]),
            oh.make_node("Relu", ["a"], ["r"]),
            oh.make_node("MatMul", ["r", "w2"], ["l"]),
            oh.make_node("Clip", ["x", "lo", "hi"], ["c"]),
            oh.make_node("MatMul", ["c", "w3"], ["m"]),
            oh.make_node("Add", ["l", "m"], ["s"]),
            oh.make_node("Softmax", ["s"], ["y"], axis=-1),
        ],
        "per_position",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 6, 8])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 6, 12])],
        [onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items()],
    )
    _, report = _quantize_beyond_calibration(graph, rng, tmp_path)
    assert report.config.mode == "dynamic" and report.parity.passed
    assert "kept 3 of 4 layers in float" in report.fallback
    assert report.quantized_ops == {"MatMul": 2}
    assert [k.node for k in report.kept_float if "accuracy guard" in k.reason] == ["l"]


def test_the_report_counts_layers_kept_float_for_one_shared_reason_instead_of_listing_them():
    """A transformer's attention MatMuls read no weight: every one is kept in float for the same
    reason. The printed table names the first few and counts the rest; the report keeps all."""
    from onnxzip.quantize.report import KEPT_SHOWN
    from testmodels import zoo

    model = zoo.bert_encoder(layers=4)
    samples = SyntheticSamples(input_specs(model), 16, seed=0)
    _, report = quantize(model, samples, QuantizeConfig(mode="dynamic"), floors=False)
    reasons = [k.reason for k in report.kept_float]
    shared = max(set(reasons), key=reasons.count)
    assert reasons.count(shared) == 8 > KEPT_SHOWN
    text = report.format()
    assert f"(+{8 - KEPT_SHOWN} more)" in text
    assert text.count(shared) == KEPT_SHOWN + 1


def _conv_affine_model() -> onnx.ModelProto:
    """Conv -> Mul [1,C,1,1] -> Add [C,1,1] -> Relu -> Conv -> Sub scalar -> Div scalar, beside
    affine ops that must stay: a Mul along the width, a Conv read twice, a constant minus a
    Conv."""
    text = (
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        "g (float[N,3,8,8] x) => (float[N,4,8,8] y, float[N,4,8,8] z, float[N,4,8,8] u) {\n"
        " a = Conv <pads=[1,1,1,1]> (x, w1)\n s = Mul (a, c1)\n t = Add (s, c2)\n r = Relu (t)\n"
        " b = Conv (r, w2, b2)\n d = Sub (b, c3)\n y = Div (d, c4)\n"
        " e = Conv (r, w3)\n z = Mul (e, cw)\n"
        " f = Conv (r, w4)\n g2 = Add (f, c2)\n h = Mul (f, c1)\n u0 = Add (g2, h)\n"
        " k = Conv (r, w5)\n v = Sub (c3, k)\n u = Add (u0, v)\n}"
    )
    rng = np.random.default_rng(0)
    tensors = {
        "w1": rng.normal(0, 0.5, (4, 3, 3, 3)),
        "c1": rng.uniform(0.2, 2.0, (1, 4, 1, 1)),
        "c2": rng.normal(0, 1.0, (4, 1, 1)),
        "w2": rng.normal(0, 0.5, (4, 4, 1, 1)),
        "b2": rng.normal(0, 0.5, (4,)),
        "c3": np.array(0.3),
        "c4": np.array(-1.7),
        "w3": rng.normal(0, 0.5, (4, 4, 1, 1)),
        "cw": rng.uniform(0.5, 1.5, (8,)),
        "w4": rng.normal(0, 0.5, (4, 4, 1, 1)),
        "w5": rng.normal(0, 0.5, (4, 4, 1, 1)),
    }
    proto = onnx.parser.parse_model(text)
    for name, array in tensors.items():
        proto.graph.initializer.append(
            onnx.numpy_helper.from_array(np.asarray(array, np.float32), name)
        )
    onnx.checker.check_model(proto, full_check=True)
    return proto


def test_constant_scales_and_shifts_per_channel_fold_into_the_preceding_conv():
    """Per output channel (or scalar) Mul/Add/Sub/Div by a constant after a Conv read only by
    it go into the Conv's weight and bias, as onnxruntime folds them in the float model: the
    prepared model computes what the original does (onnxruntime, 1e-5 relative), and the ops
    that are not such a map stay (a scale along the width, a Conv read twice, c - conv)."""
    proto = _conv_affine_model()
    model = io.load_model(proto)
    done = passes.QUANTIZATION(model)
    assert len(done["conv_affine_folded"]) == 4
    ops = Counter(n.op_type for n in model.graph)
    assert ops["Sub"] == 1 and ops["Div"] == 0  # c3 - k stays
    assert ops["Mul"] == 2  # the width scale and the Mul of the Conv read twice
    assert ops["Add"] == 3  # f + c2 (f read twice), u0 + v, and the sum
    assert {n.op_type for n in model.graph if n.outputs[0].name in ("y", "t")} == {"Conv"}
    x = np.random.default_rng(1).normal(size=(5, 3, 8, 8)).astype(np.float32)
    want = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})
    got = ort.InferenceSession(io.model_bytes(model)).run(None, {"x": x})
    for a, b in zip(want, got, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(np.abs(a).max()))


def test_a_bias_add_folds_into_its_conv_when_the_exporter_wrote_dims_as_minus_one():
    """paddle2onnx writes dynamic dims as -1 or "?"; they are read as symbols named after their
    tensor (the output's ``y_dim0`` beside the Conv's ``x_dim0``), and the fold refused the Add
    because the two shapes were not the same symbols (every squeeze-excitation bias of PP-OCR's
    direction classifier stayed an Add of its own). Dims not known to differ do not block it."""
    rng = np.random.default_rng(4)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    b = rng.normal(size=(1, 4, 1, 1)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            onnx.helper.make_node("Add", ["c", "b"], ["y"]),
        ],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [-1, 3, "?", "?"])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [-1, 4, -1, -1])],
        [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b, "b")],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = io.load_model(proto)
    c = next(n for n in model.graph if n.op_type == "Conv").outputs[0]
    assert not ops_mod.same_dim(c.shape[0], model.graph.outputs[0].shape[0])  # the premise
    done = passes.QUANTIZATION(model)
    assert len(done["conv_affine_folded"]) == 1
    assert [n.op_type for n in model.graph] == ["Conv"]
    x = rng.normal(size=(2, 3, 6, 7)).astype(np.float32)
    (want,) = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})
    (got,) = ort.InferenceSession(io.model_bytes(model)).run(None, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_identity_nodes_go_so_a_scale_and_shift_behind_them_fold_into_the_conv():
    """paddle2onnx writes an Identity after nearly every op: Conv, Identity, Mul by a scalar,
    Identity, Add of a scalar (PP-LCNetV3's learnable affine) kept the fold out, each op an
    8-bit op of its own. The Identities go (one that writes a graph output stays), the scale
    and shift fold, and the prepared model computes what the original does."""
    proto = onnx.parser.parse_model(
        H
        + """g (float[N,3,8,8] x) => (float[N,4,8,8] y, float[N,4,8,8] z) {
            c = Conv <pads = [1, 1, 1, 1]> (x, w)
            c1 = Identity (c)
            m = Mul (c1, s)
            m1 = Identity (m)
            y = Add (m1, t)
            z = Identity (y)
        }"""
    )
    rng = np.random.default_rng(5)
    for name, array in {"w": rng.normal(size=(4, 3, 3, 3)), "s": 0.37, "t": -0.2}.items():
        proto.graph.initializer.append(
            onnx.numpy_helper.from_array(np.asarray(array, np.float32), name)
        )
    model = io.load_model(proto)
    done = passes.QUANTIZATION(model)
    assert done["identities_removed"] == 2
    assert [n.op_type for n in model.graph] == ["Conv", "Identity"]  # z is a graph output
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    want = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})
    got = ort.InferenceSession(io.model_bytes(model)).run(None, {"x": x})
    for a, b in zip(want, got, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(np.abs(a).max()))


def test_folded_conv_affine_quantizes_as_one_int8_conv(tmp_path):
    """After the fold no QLinearMul/QLinearAdd is left for the scale and shift: the int8 model
    runs the first Conv (its scale and shift inside) as one quantized Conv, and stays close to
    the float model."""
    proto = _conv_affine_model()
    rng = np.random.default_rng(2)
    samples = SyntheticSamples(input_specs(io.load_model(proto)), 32, seed=3)
    q, report = quantize(proto, samples, QuantizeConfig(holdout=0.0, bias_correction="off"))
    qops = Counter(n.op_type for n in q.graph)
    assert qops["Div"] == 0 and qops["Mul"] == 2  # the width scale and the twice-read Conv's
    assert qops["QuantizeLinear"] > 0 and report.quantized_ops.get("Conv") == 5
    x = rng.normal(size=(4, 3, 8, 8)).astype(np.float32)
    want = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})
    got = ort.InferenceSession(io.model_bytes(q)).run(None, {"x": x})
    for a, b in zip(want, got, strict=True):
        cos = float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))
        assert cos > 0.99


def test_dynamic_mode_names_the_verification_data_it_was_verified_on(tmp_path, capsys):
    """With --verify-data the dynamic report's mode line names that file (it named the
    calibration file, which dynamic mode does not even read for ranges)."""
    proto = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        "g (float[N,8] x) => (float[N,4] y) { m = MatMul (x, w1)\n r = Relu (m)\n"
        " y = MatMul (r, w2) }"
    )
    rng = np.random.default_rng(0)
    for name, shape in {"w1": (8, 16), "w2": (16, 4)}.items():
        proto.graph.initializer.append(
            onnx.numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)
        )
    model, calib, check = tmp_path / "mlp.onnx", tmp_path / "calib.npz", tmp_path / "check.npz"
    onnx.save(proto, model)
    np.savez(calib, x=rng.normal(size=(32, 8)).astype(np.float32))
    np.savez(check, x=rng.normal(size=(32, 8)).astype(np.float32))
    args = ["quantize", model, "-o", tmp_path / "q.onnx", "--data", calib, "--mode", "dynamic"]
    code, out, err = run_cli([*args, "--verify-data", check, "--no-floors"], capsys)
    assert code == 0, err
    assert f"verified on {check}" in out


def test_a_dense_layers_matmul_and_bias_add_fold_into_one_gemm(tmp_path):
    """A rank-2 activation times a constant weight plus a constant bias ([N] or [1, N]) becomes
    one Gemm, as onnxruntime fuses it in the float model; a 3-D MatMul (a transformer's), a
    MatMul whose output is read twice and an Add of two activations stay. The prepared model
    computes what the original does (onnxruntime, 1e-5), and int8 runs the dense layers as
    QGemm with int32 biases."""
    text = (
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        "g (float[N,8] x, float[N,3,8] s) => (float[N,4] y, float[N,3,4] t, float[N,4] u) {\n"
        " m1 = MatMul (x, w1)\n a1 = Add (m1, b1)\n r = Relu (a1)\n m2 = MatMul (r, w2)\n"
        " y = Add (b2, m2)\n"
        " m3 = MatMul (s, w2b)\n t = Add (m3, b3)\n"
        " m4 = MatMul (r, w2)\n a4 = Add (m4, b3)\n u = Add (a4, m4)\n}"
    )
    rng = np.random.default_rng(0)
    tensors = {
        "w1": rng.normal(size=(8, 16)),
        "b1": rng.normal(size=(16,)),
        "w2": rng.normal(size=(16, 4)),
        "b2": rng.normal(size=(1, 4)),
        "w2b": rng.normal(size=(8, 4)),
        "b3": rng.normal(size=(4,)),
    }
    proto = onnx.parser.parse_model(text)
    for name, array in tensors.items():
        proto.graph.initializer.append(
            onnx.numpy_helper.from_array(np.asarray(array, np.float32), name)
        )
    onnx.checker.check_model(proto, full_check=True)
    model = io.load_model(proto)
    done = passes.QUANTIZATION(model)
    assert len(done["matmul_add_folded"]) == 2
    ops = Counter(n.op_type for n in model.graph)
    assert ops["Gemm"] == 2 and ops["MatMul"] == 2 and ops["Add"] == 3
    feeds = {
        "x": rng.normal(size=(5, 8)).astype(np.float32),
        "s": rng.normal(size=(5, 3, 8)).astype(np.float32),
    }
    want = ort.InferenceSession(proto.SerializeToString()).run(None, feeds)
    got = ort.InferenceSession(io.model_bytes(model)).run(None, feeds)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(np.abs(a).max()))
    samples = SyntheticSamples(input_specs(io.load_model(proto)), 32, seed=3)
    q, report = quantize(proto, samples, QuantizeConfig(holdout=0.0, bias_correction="off"))
    assert report.quantized_ops.get("Gemm") == 2 and report.biases_quantized >= 2
    optimized = ort.SessionOptions()
    optimized.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    optimized.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(io.model_bytes(q), optimized)
    fused = Counter(n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node)
    assert fused["QGemm"] == 2


SPECTRAL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,1,512] x) => (float[N,10] y) {
    re = Conv <strides=[32]> (x, w_re)
    im = Conv <strides=[32]> (x, w_im)
    re2 = Mul (re, re)
    im2 = Mul (im, im)
    pw = Add (re2, im2)
    pe = Add (pw, eps)
    lg = Log (pe)
    h = Conv <pads=[1, 1]> (lg, w1, b1)
    r = Relu (h)
    p = GlobalAveragePool (r)
    f = Flatten (p)
    y = Gemm (f, w2, b2)
}
"""


def _spectral_model(rng):
    """An audio classifier exported with its feature extraction: a 64-bin Fourier transform
    written as two strided Convs (cos, sin), power, + eps, Log; then a learned Conv and Gemm."""
    proto = onnx.parser.parse_model(SPECTRAL)
    t = np.arange(64)
    freqs = np.arange(32)[:, None] * (2 * np.pi / 64)
    window = np.hanning(64)
    tensors = {
        "w_re": (np.cos(freqs * t) * window)[:, None, :],
        "w_im": (np.sin(freqs * t) * window)[:, None, :],
        "eps": np.array(1e-10),
        "w1": rng.normal(0, 0.1, (16, 32, 3)),
        "b1": rng.normal(0, 0.1, 16),
        "w2": rng.normal(0, 0.3, (10, 16)),
        "b2": np.zeros(10),
    }
    proto.graph.node[-1].attribute.append(onnx.helper.make_attribute("transB", 1))
    for name, array in tensors.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array.astype(np.float32), name))
    return io.load_model(proto)


def _quiet_and_loud_tones(rng, n):
    """Frames of a few tones each, at levels spread over 60 dB, with a faint noise floor."""
    t = np.arange(512)
    x = np.zeros((n, 1, 512))
    for i in range(n):
        for _ in range(3):
            x[i, 0] += np.sin(2 * np.pi * rng.uniform(0.01, 0.45) * t + rng.uniform(0, 6))
        x[i, 0] *= 10.0 ** rng.uniform(-3, 0)
    return (x + rng.normal(0, 1e-5, x.shape)).astype(np.float32)


def test_a_spectral_front_end_before_a_logarithm_stays_float_and_the_network_after_it_is_int8(
    tmp_path, monkeypatch
):
    """basic-pitch (a tf2onnx export on PyPI) computes its constant-Q transform inside the
    graph: Convs, magnitude, Log. Static int8 of those Convs gave 7.7 dB on its note outputs
    and the guard then kept all 54 layers float; with the front end float the network after
    the Log quantizes and holds its floors (34 dB). Here: a Fourier transform as Conv."""
    from onnxzip.ir.ops import LOGARITHM_REASON
    from onnxzip.quantize import plan_quantization

    rng = np.random.default_rng(0)
    model = _spectral_model(rng)
    plan, _ = plan_quantization(model, QuantizeConfig())
    front = sorted(k for k, why in plan.kept_float.items() if why == LOGARITHM_REASON)
    assert front == ["im", "im2", "pe", "pw", "re", "re2"], plan.kept_float
    assert {"h", "y"} <= set(plan.quantized_nodes)  # the learned layers after the Log

    np.savez(tmp_path / "x.npz", x=_quiet_and_loud_tones(rng, 160))
    samples = NpzSamples(tmp_path / "x.npz", input_specs(model))
    kept, quantized = _snr_with_and_without(model, samples, monkeypatch, "logarithm_front_end")
    assert kept > quantized + 10.0 and kept > 25.0, (kept, quantized)  # measured 44.1 / 2.4


def test_a_log_after_a_learned_activation_keeps_nothing_before_it_float():
    """The search stops at a nonlinearity: Log(Relu(conv) + eps) leaves the Conv int8."""
    from onnxzip.quantize import plan_quantization

    proto = onnx.parser.parse_model(
        H
        + """g (float[N,4,8,8] x) => (float[N,6,8,8] y) {
            c = Conv <pads=[1, 1, 1, 1]> (x, w)
            r = Relu (c)
            e = Add (r, eps)
            l = Log (e)
            y = Conv (l, w2)
        }"""
    )
    rng = np.random.default_rng(1)
    for name, array in {
        "w": rng.normal(0, 0.3, (6, 4, 3, 3)),
        "eps": np.array(1e-3),
        "w2": rng.normal(0, 0.3, (6, 6, 1, 1)),
    }.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array.astype(np.float32), name))
    plan, _ = plan_quantization(io.load_model(proto), QuantizeConfig())
    assert {"c", "y"} <= set(plan.quantized_nodes), plan.kept_float


@pytest.mark.parametrize(
    "mode, min_snr",
    [("dynamic", 30.0), ("weight-only", 20.0)],  # measured 43.7 and 23.5 (-0.4 without the rule)
)
def test_a_mel_filter_bank_before_a_logarithm_stays_float(tmp_path, mode, min_snr):
    """A mel filter bank as MatMul on a power spectrum: dynamic int8 quantizes its input per
    tensor, which zeroes the quiet bins the Log then magnifies, and 4-bit weights let loud bins
    leak into quiet bands; it stays float (by the rule, not the floor guard), the learned
    MatMul after the Log is quantized."""
    proto = onnx.parser.parse_model(
        H
        + """g (float[N,65] x) => (float[N,10] y) {
            m = MatMul (x, mel)
            e = Add (m, eps)
            l = Log (e)
            y = MatMul (l, w)
        }"""
    )
    rng = np.random.default_rng(2)
    mel = np.maximum(0, 1 - np.abs(np.arange(65)[:, None] / 3.0 - np.arange(20)[None, :]))
    for name, array in {
        "mel": mel,
        "eps": np.array(1e-10),
        "w": rng.normal(0, 0.3, (20, 10)),
    }.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array.astype(np.float32), name))
    model = io.load_model(proto)
    power = (rng.uniform(size=(64, 65)) * 10.0 ** rng.uniform(-6, 0, (64, 65))).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=power)
    samples = NpzSamples(tmp_path / "x.npz", input_specs(model))
    _, report = quantize(model, samples, QuantizeConfig(mode=mode, floor_guard=False))
    assert report.quantized_ops == {"MatMul": 1}
    kept = {k.node: k.reason for k in report.kept_float}
    assert "spectral front end" in kept["m"], kept
    assert report.parity.outputs[0].snr_db > min_snr, report.parity.outputs[0].snr_db


def test_recovery_trains_the_network_after_a_spectral_front_end_not_its_filters():
    """Distillation freezes the front end's filter banks: fixed signal processing, and the
    costliest gradients of a step (basic-pitch's constant-Q Convs read the raw audio)."""
    from onnxzip.recover import _trainable

    model = _spectral_model(np.random.default_rng(0))
    assert sorted(_trainable(model)) == ["b1", "b2", "w1", "w2"]


def test_distillation_matches_class_scores_by_kl_and_raw_heads_by_squared_error():
    """Every [N, C] output used to be distilled as logits through a tempered softmax: a box head
    then only had to match up to a shift of its four values (MTCNN's refinement net: held-out
    box cosine 0.89 before distillation, 0.36 after; now 0.87), and a Softmax output was taken
    for logits (the softmax of probabilities over 4 is nearly uniform: little to learn)."""
    import onnx.helper as oh

    from onnxzip.recover import _class_scores, _teacher_distribution, _training_twin

    graph = oh.make_graph(
        [
            oh.make_node("Gemm", ["x", "ws"], ["s"]),
            oh.make_node("Softmax", ["s"], ["face"], axis=1),
            oh.make_node("Gemm", ["x", "wb"], ["box"]),
            oh.make_node("Gemm", ["x", "wl"], ["logits"]),
        ],
        "heads",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8])],
        [
            oh.make_tensor_value_info("face", onnx.TensorProto.FLOAT, ["N", 2]),
            oh.make_tensor_value_info("box", onnx.TensorProto.FLOAT, ["N", 4]),
            oh.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 5]),
        ],
        [
            onnx.numpy_helper.from_array(np.ones((8, k), np.float32), n)
            for n, k in (("ws", 2), ("wb", 4), ("wl", 5))
        ],
    )
    model = io.load_model(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]))
    forms = {v.name: _class_scores(v) for v in model.graph.outputs}
    assert forms == {"face": ("probabilities", 1), "box": None, "logits": None}  # beside a Softmax
    twin, _ = _training_twin(model, 4.0)
    ops = [n.op_type for n in twin.graph]
    assert ops.count("LogSoftmax") == 1 and ops.count("Log") == 1  # the face score only
    # a Softmax output's target is the tempered distribution of its logits
    logits = np.array([[2.0, -1.0]])
    p = np.exp(logits) / np.exp(logits).sum()
    expected = np.exp(logits / 4) / np.exp(logits / 4).sum()
    np.testing.assert_allclose(
        _teacher_distribution(p, ("probabilities", 1), 4.0), expected, rtol=1e-9
    )


@pytest.mark.parametrize("shape", [(3, 7, 6), (3, 6, 4, 5)])
def test_distillation_of_class_scores_per_position_is_the_mean_kl_over_the_class_axis(shape):
    """A recognizer's [N, T, C] Softmax (and a segmenter's [N, C, H, W] mask logits) are
    distilled as a KL divergence over the class axis averaged over positions. They used to
    be matched by squared error on the probabilities (PP-OCRv5's recognizer: a loss of 1e-9 at
    the start over 18,385 characters, nothing learnt); a sum over axis 1 would sum positions.
    The twin's loss, run in onnxruntime, equals the KL computed here plus the teacher's
    entropy."""
    from onnxzip.recover import _class_scores, _teacher_distribution, _training_twin

    rank, rng = len(shape), np.random.default_rng(0)
    if rank == 3:
        n, t, c = shape
        text = (
            f"g (float[N,{t},8] x) => (float[N,{t},{c}] y) {{ m = MatMul (x, w)\n y = Softmax(m) }}"
        )
        weights, axis, feeds = {"w": (8, c)}, 2, rng.normal(size=(n, t, 8))
    else:
        n, c, h, w = shape
        text = (
            f"g (float[N,3,{h},{w}] x) => (float[N,{c},{h},{w}] y) "
            "{ y = Conv <kernel_shape=[1,1]> (x, w) }"
        )
        weights, axis, feeds = {"w": (c, 3, 1, 1)}, 1, rng.normal(size=(n, 3, h, w))
    model = io.load_model(build(text, weights))
    out = model.graph.outputs[0]
    form = _class_scores(out)
    assert form == ("probabilities" if rank == 3 else "logits", axis)
    twin, targets = _training_twin(model, 4.0, forms={out.name: form})
    feeds = feeds.astype(np.float32)
    session = ort.InferenceSession(io.to_proto(model).SerializeToString())
    student = session.run(None, {"x": feeds})[0].astype(np.float64)
    # the teacher: the student's scores moved a little
    teacher = student + rng.normal(scale=0.3, size=student.shape)
    if rank == 3:
        teacher = np.exp(teacher) / np.exp(teacher).sum(axis=axis, keepdims=True)
    p = _teacher_distribution(teacher, form, 4.0)
    loss = ort.InferenceSession(io.to_proto(twin).SerializeToString()).run(
        None, {"x": feeds, targets[0]: p.astype(np.float32)}
    )[0]
    logits = np.log(student) if rank == 3 else student
    z = logits / 4.0
    logq = z - z.max(axis=axis, keepdims=True)
    logq = logq - np.log(np.exp(logq).sum(axis=axis, keepdims=True))
    kl = (p * (np.log(p) - logq)).sum(axis=axis).mean()
    entropy = -(p * np.log(p)).sum(axis=axis).mean()
    assert float(loss) == pytest.approx(16.0 * (kl + entropy), rel=1e-4)


@pytest.mark.parametrize(
    ("classes", "scale", "expected"), [(10, 8.0, 4.0), (10, 0.2, 4.0), (3000, 1.5, 1.0)]
)
def test_distillation_temperature_keeps_the_teachers_top_class_visible(classes, scale, expected):
    """Without a temperature given, each class-score output takes the largest of 4, 2 and 1 at
    which the softened teacher keeps half the mass it gives its top class unsoftened: over
    thousands of confident classes 4 spreads it so thin that the target no longer says which
    class won; an unsure teacher (small logits) keeps 4."""
    from onnxzip.recover import (
        TEMPERATURES,
        TOP_MASS,
        RecoverConfig,
        _class_scores,
        _first_outputs,
        _teacher_distribution,
        _temperatures,
    )
    from onnxzip.runtime import Runner

    text = (
        f"g (float[N,5,8] x) => (float[N,5,{classes}] y) {{ m = MatMul (x, w)\n y = Softmax(m) }}"
    )
    proto = build(text, {"w": (8, classes)})
    w = proto.graph.initializer[0]
    rng = np.random.default_rng(0)
    w.CopyFrom(
        onnx.numpy_helper.from_array(
            (scale * rng.normal(size=(8, classes))).astype(np.float32), "w"
        )
    )
    model = io.load_model(proto)
    samples = SyntheticSamples(input_specs(model), 16, seed=0)
    forms = {v.name: _class_scores(v) for v in model.graph.outputs}
    run = Runner(model, name="teacher")
    config = RecoverConfig(batch_size=16, holdout=0)
    first = _first_outputs(run, samples, config, forms, model)
    scores = run.run(next(samples.batches(16, "all", 0.5)), ["y"])["y"]
    np.testing.assert_array_equal(first["y"], scores)  # the first batch's
    t = _temperatures(config, forms, first)["y"]

    def top(tau):
        return float(np.mean(_teacher_distribution(scores, forms["y"], tau).max(axis=2)))

    assert t in TEMPERATURES
    assert top(t) >= TOP_MASS * top(1.0)
    assert all(top(tau) < TOP_MASS * top(1.0) for tau in TEMPERATURES if tau > t)
    assert t == expected  # the wide head is softened less
    given = RecoverConfig(batch_size=16, holdout=0, temperature=3.0)
    assert _first_outputs(run, samples, given, forms, model) == {}  # nothing to choose: no run
    assert _temperatures(given, forms, {}) == {"y": 3.0}  # a temperature given is taken as it is


@pytest.mark.parametrize(
    ("text", "weights", "kernel"),
    [
        (
            "g (float[N,16] x) => (float[N,5] y) { g = Gemm <transB=1> (x, w, b)\n y = Softmax(g) }",
            {"w": (5, 16), "b": (5,)},
            "QGemm",
        ),
        (
            "g (float[N,7,16] x) => (float[N,7,5] y) { m = MatMul (x, w)\n y = Softmax(m) }",
            {"w": (16, 5)},
            "MatMulIntegerToFloat",
        ),
    ],
)
def test_a_gemm_or_matmul_read_only_by_float_ops_writes_float(text, weights, kernel, tmp_path):
    """Logits before a float Softmax: the int8 kernel writes float (QGemm without an output
    scale, MatMulIntegerToFloat) instead of rounding them to 256 levels first, so nothing is
    dequantized after it; parity against the float model is better than with the pair."""
    proto = build(text, weights)
    specs = input_specs(io.load_model(proto))
    quantized, report = quantize(
        proto, SyntheticSamples(specs, 256, seed=1), QuantizeConfig(holdout=0)
    )
    ops, graph = optimized_ops(quantized, tmp_path)
    assert ops[kernel] == 1 and ops["Softmax"] == 1, dict(ops)
    assert ops["DequantizeLinear"] == 0 and ops["QuantizeLinear"] == 1, dict(ops)  # x's only
    logits = next(n for n in graph.node if n.op_type == kernel).output[0]
    assert next(n for n in graph.node if n.op_type == "Softmax").input[0] == logits
    parity = verify(proto, quantized, SyntheticSamples(specs, 64, seed=2))
    assert parity.outputs[0].cosine_mean > 0.999, parity.outputs[0]


def test_reference_outputs_made_beside_calibration_give_the_same_model_and_verdict(monkeypatch):
    """The verification reference made in a thread while calibration runs (small models) and
    made when first needed (large ones) give the same model bytes and the same parity numbers,
    and the caller's model object is left as it was."""
    from onnxzip.quantize import pipeline

    model = zoo.mobilenet_v2(resolution=64, classes=10, width=0.5)
    specs = input_specs(io.load_model(model))
    samples = SyntheticSamples(specs, 40, seed=4)
    before = io.model_bytes(io.load_model(model))
    results = []
    for limit in (pipeline.REFERENCE_THREAD_BYTES, 0):
        monkeypatch.setattr(pipeline, "REFERENCE_THREAD_BYTES", limit)
        original = io.load_model(model)
        quantized, report = quantize(original, samples, QuantizeConfig(holdout=0.25))
        assert io.model_bytes(original) == before
        results.append((io.model_bytes(quantized), report.parity.outputs, report.bias_correction))
    assert results[0] == results[1]


GELU_TANH = """
g (float[N,8,32] x) => (float[N,10] y) {
    m = MatMul (x, w1)
    h = Add (m, b1)
    c1 = Mul (k1, h)
    c2 = Mul (h, c1)
    c3 = Mul (h, c2)
    u = Add (h, c3)
    v = Mul (k2, u)
    t = Tanh (v)
    o = Add (one, t)
    hf = Mul (half, o)
    g = Mul (h, hf)
    p = ReduceMax <axes=[1], keepdims=0> (g)
    y = Gemm <transB=1> (p, w2, b2)
}
"""


def _gelu_model(rng, text=GELU_TANH):
    """A dense layer, a GELU in tf2onnx's tanh form (nine elementwise ops), a max over the
    positions and a classifier."""
    proto = onnx.parser.parse_model(H + text)
    tensors = {
        "w1": rng.normal(0, 0.6, (32, 64)),
        "b1": rng.normal(0, 0.3, 64),
        "k1": np.array(0.044715),
        "k2": np.array(0.7978846),
        "one": np.array(1.0),
        "half": np.array(0.5),
        "w2": rng.normal(0, 0.3, (10, 64)),
        "b2": np.zeros(10),
    }
    for name, array in tensors.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array.astype(np.float32), name))
    return io.load_model(proto)


def test_a_gelu_spelled_in_elementwise_ops_stays_float_and_its_neighbours_are_int8(
    tmp_path, monkeypatch
):
    """magika (Google's file-type classifier on PyPI, a tf2onnx export) writes each GELU as
    nine Mul/Add/Tanh ops: static int8 rounded x^3 and tanh's input to 8 bits each (12 dB on its
    class scores, 19.5 dB with the GELUs float). The GELU's nodes stay float, named; the
    MatMul before it and the Gemm after it are int8, and the output is closer to fp32."""
    from onnxzip.ir.ops import ISLAND_REASON
    from onnxzip.quantize import plan_quantization

    rng = np.random.default_rng(0)
    model = _gelu_model(rng)
    plan, _ = plan_quantization(model, QuantizeConfig())
    island = sorted(k for k, why in plan.kept_float.items() if why == ISLAND_REASON)
    # (Tanh has no quantization rule: float either way)
    assert island == ["c1", "c2", "c3", "g", "hf", "o", "u", "v"], plan.kept_float
    assert {"m", "y"} <= set(plan.quantized_nodes) and "t" not in plan.quantized_nodes

    x = rng.normal(0, 1, (160, 8, 32)).astype(np.float32)
    x[:, :, :4] *= 4.0  # a few loud input features, as real activations have
    np.savez(tmp_path / "x.npz", x=x)
    samples = NpzSamples(tmp_path / "x.npz", input_specs(model))
    kept, quantized = _snr_with_and_without(model, samples, monkeypatch, "activation_islands")
    assert kept > quantized + 10.0, (kept, quantized)  # measured 35.5 / 20.0


def test_a_hardswish_spelled_in_bounded_ops_is_quantized_as_before():
    """x * clip(x + 3, 0, 6) / 6 (paddle2onnx's HardSwish, 94 of them in PP-PicoDet) keeps
    bounded ranges and quantizes well: no curving op, no island."""
    from onnxzip.ir.ops import activation_islands

    proto = onnx.parser.parse_model(
        H
        + """g (float[N,4,8,8] x) => (float[N,4,8,8] y) {
            c = Conv <pads=[1, 1, 1, 1]> (x, w)
            a = Add (c, three)
            r = Clip (a, zero, six)
            m = Mul (c, r)
            y = Div (m, six)
        }"""
    )
    for name, array in {
        "w": np.random.default_rng(0).normal(0, 0.3, (4, 4, 3, 3)),
        "three": np.array(3.0),
        "zero": np.array(0.0),
        "six": np.array(6.0),
    }.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array.astype(np.float32), name))
    assert activation_islands(io.load_model(proto).graph) == frozenset()
