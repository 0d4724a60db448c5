"""verify: parity numbers against hand-computed values, thresholds, the per-node diff."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from conftest import parse

from onnxzip import io
from onnxzip.data import InputSpec, NpzSamples, SyntheticSamples, input_specs
from onnxzip.errors import InputError
from onnxzip.verify import Thresholds, verify

SCALE = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 6] x) => (float[N, 6] y) {{
    s = Constant <value = float {{{s}}}> ()
    y = Mul (x, s)
}}
"""


def perturbed(path, tmp_path, tensor="s1.conv2.weight", channel=3, delta=0.5):
    proto = onnx.load(str(path))
    for init in proto.graph.initializer:
        if init.name == tensor:
            w = onnx.numpy_helper.to_array(init).copy()
            w[channel] += delta
            init.CopyFrom(onnx.numpy_helper.from_array(w, tensor))
    out = tmp_path / "perturbed.onnx"
    onnx.save(proto, str(out))
    return out


def test_model_against_itself_is_exact(resnet_path, test_npz):
    model = io.load_model(resnet_path)
    report = verify(resnet_path, resnet_path, NpzSamples(test_npz, input_specs(model)))
    (out,) = report.outputs
    assert report.passed and report.samples == 360 and not report.synthetic
    assert out.max_abs_error == 0 and out.mean_abs_error == 0
    assert out.cosine_mean == 1.0 and out.cosine_min == 1.0
    assert math.isinf(out.snr_db)
    assert out.top1_agreement == 1.0
    assert out.reference_accuracy == out.candidate_accuracy


def test_metrics_match_hand_computed_values():
    ref = parse(SCALE.format(s=1.0))
    cand = parse(SCALE.format(s=1.01))
    specs = [InputSpec("x", np.dtype("float32"), ("N", 6))]
    samples = SyntheticSamples(specs, 100, seed=5)
    x = np.concatenate([b.inputs["x"] for b in samples.batches(100)]).astype(np.float64)
    report = verify(ref, cand, samples, optimization="none")
    (out,) = report.outputs
    # c = 1.01 r: the error is 0.01 |r|, the SNR 10 log10(1 / 0.01^2) = 40 dB, the cosine 1.
    assert out.snr_db == pytest.approx(40.0, abs=1e-3)
    assert out.cosine_mean == pytest.approx(1.0, abs=1e-6)
    expected = 0.01 * np.abs(x * np.float32(1.0))
    assert out.max_abs_error == pytest.approx(expected.max(), rel=1e-3)
    assert out.mean_abs_error == pytest.approx(expected.mean(), rel=1e-3)
    assert out.top1_agreement == 1.0  # scaling never changes the argmax
    assert report.synthetic


def test_cosine_sign_flip_and_thresholds():
    ref = parse(SCALE.format(s=1.0))
    cand = parse(SCALE.format(s=-1.0))
    samples = SyntheticSamples([InputSpec("x", np.dtype("float32"), ("N", 6))], 20)
    report = verify(
        ref, cand, samples, thresholds=Thresholds(min_cosine=0.99, min_snr_db=10, min_top1=0.5)
    )
    (out,) = report.outputs
    assert out.cosine_mean == pytest.approx(-1.0) and out.cosine_min == pytest.approx(-1.0)
    assert out.snr_db == pytest.approx(10 * math.log10(1 / 4), abs=1e-6)
    assert not report.passed
    assert len(report.failures) == 3


def test_perturbed_weight_fails_and_per_node_names_the_node(resnet_path, test_npz, tmp_path):
    bad = perturbed(resnet_path, tmp_path)
    model = io.load_model(resnet_path)
    samples = NpzSamples(test_npz, input_specs(model))
    report = verify(
        resnet_path, bad, samples, thresholds=Thresholds(min_cosine=0.9999), per_node=True
    )
    assert not report.passed
    per = report.per_node
    assert per.first_diverging.node == "s1.conv2" and per.first_diverging.op_type == "Conv"
    upstream = [n for n in per.nodes if n.node in ("stem.conv", "stem.bn", "s1.conv1", "s1.relu1")]
    assert len(upstream) == 4 and all(n.max_abs_error == 0 for n in upstream)
    assert per.worst is not None and per.worst.snr_db <= per.first_diverging.snr_db


def test_accuracy_threshold_needs_labels(resnet_path):
    model = io.load_model(resnet_path)
    samples = SyntheticSamples(input_specs(model), 8)
    report = verify(
        resnet_path, resnet_path, samples, thresholds=Thresholds(max_accuracy_drop=0.01)
    )
    assert not report.passed and "labels" in report.failures[0]


def test_models_with_different_inputs_are_refused(resnet_path):
    other = parse(SCALE.format(s=1.0))
    samples = SyntheticSamples(input_specs(io.load_model(resnet_path)), 4)
    with pytest.raises(InputError, match="inputs"):
        verify(resnet_path, other, samples)


def test_fixed_batch_light_model_against_itself():
    from conftest import ONNX_DATA

    path = ONNX_DATA / "light" / "light_squeezenet.onnx"
    model = io.load_model(path)
    samples = SyntheticSamples(input_specs(model), 3)
    report = verify(path, path, samples, batch_size=8, thresholds=Thresholds(min_cosine=1.0))
    assert report.passed and report.samples == 3  # batch fixed at 1 in the model: three runs


def test_snr_of_an_overflowed_candidate_is_minus_infinity():
    """A quantized Reciprocal of a zero variance gives inf: the per-node diff of a real
    classifier then ended in 'math domain error' (exit 3) instead of naming that node."""
    import math

    from onnxzip.verify import snr_db

    assert snr_db(1.0, math.inf) == -math.inf
    assert snr_db(math.inf, math.inf) == -math.inf
    assert snr_db(1e-300, 1e300) == -math.inf  # underflows to 0
    assert snr_db(0.0, 1.0) == -math.inf and snr_db(1.0, 0.0) == math.inf
    assert snr_db(100.0, 1.0) == 20.0


def test_per_node_ranks_the_node_where_the_error_grows_not_the_first_rounded_one(tmp_path):
    """Both MatMuls carry the same small weight error (as int8 weights would); their difference
    cancels most of the signal, so the Sub loses far more SNR than its inputs brought: the
    per-node diff ranks it first, while the first diverging tensor is just the first MatMul."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(16, 16)).astype(np.float32)
    w2 = (w1 + 0.01 * rng.normal(size=w1.shape)).astype(np.float32)

    def model(a, b):
        h = onnx.helper
        graph = h.make_graph(
            [
                h.make_node("MatMul", ["x", "w1"], ["p"], name="p"),
                h.make_node("MatMul", ["x", "w2"], ["q"], name="q"),
                h.make_node("Sub", ["p", "q"], ["d"], name="d"),
                h.make_node("Relu", ["d"], ["y"], name="y"),
            ],
            "g",
            [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 16])],
            [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 16])],
            [onnx.numpy_helper.from_array(a, "w1"), onnx.numpy_helper.from_array(b, "w2")],
        )
        return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])

    noisy = [(w + 1e-3 * rng.normal(size=w.shape)).astype(np.float32) for w in (w1, w2)]
    samples = SyntheticSamples([InputSpec("x", np.dtype("float32"), ("N", 16))], 64, seed=1)
    report = verify(model(w1, w2), model(*noisy), samples, per_node=True, floors=False)
    p = report.per_node
    assert p.first_diverging.op_type == "MatMul"
    top = p.largest_losses[0]
    assert top.op_type == "Sub" and top.snr_lost_db > 20.0, p.largest_losses
    matmul = next(n for n in p.nodes if n.op_type == "MatMul")
    assert math.isfinite(matmul.rounding_snr_db) and matmul.rounding_snr_db > 30.0
    assert "where the error grows" in report.format()
