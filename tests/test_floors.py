"""Default quality floors: output kinds from the graph, per-slice checks of concatenated heads,
PASS only when every floor holds, explicit thresholds replacing them, --no-floors."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from conftest import run_cli

from onnxzip import floors, io
from onnxzip.data import NpzSamples, SyntheticSamples, input_specs
from onnxzip.verify import Thresholds, verify

H = '<ir_version: 8, opset_import: ["" : 17]>\n'


def _model(text: str, tensors: dict | None = None) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(H + text)
    for name, array in (tensors or {}).items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(array), name))
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _parts(proto) -> dict[str, list[floors.Part]]:
    model = io.load_model(proto)
    return {v.name: floors.parts_of(v) for v in model.graph.outputs}


@pytest.mark.parametrize(
    "graph, kind",
    [
        ("g (float[N, 8] x) => (float[N, 8] y) { y = Relu (x) }", floors.CLASS_SCORES),
        (
            "g (float[N, 8] x) => (float[N, 8] y) { y = LpNormalization <p = 2> (x) }",
            floors.EMBEDDING,
        ),
        ("g (float[N, 8] x) => (float[N, 8] y) { y = Sigmoid (x) }", floors.PROBABILITIES),
        ("g (float[N, 1] x) => (float[N, 1] y) { y = Relu (x) }", floors.ONE_VALUE),
        ("g (float[N, 1] x) => (float[N, 1] y) { y = Sigmoid (x) }", floors.PROBABILITIES),
        (
            "g (float[N, 5, 7] x) => (float[N, 5, 7] y) { y = Softmax <axis = -1> (x) }",
            floors.CLASS_PER_POSITION,
        ),
        ("g (float[N, 5, 32] x) => (float[N, 5, 32] y) { y = Relu (x) }", floors.EMBEDDING),
        ("g (float[N, 5, 4] x) => (float[N, 5, 4] y) { y = Relu (x) }", floors.REGRESSION),
        (
            "g (float[N, 8] x) => (int64[N] y) { y = ArgMax <axis = 1, keepdims = 0> (x) }",
            floors.INTEGER,
        ),
        (
            "g (float[N, 3, 4, 4] x) => (float[N, 3, 4, 4] y) { y = Softmax <axis = 1> (x) }",
            floors.MASK,
        ),
    ],
)
def test_output_kinds_from_the_graph(graph, kind):
    (parts,) = _parts(_model(graph)).values()
    assert [p.kind for p in parts] == [kind]
    assert parts[0].floors == floors.DEFAULT_FLOORS[kind]


# MTCNN's refinement net: a face score made probabilities by the model's own Softmax, beside raw
# box offsets and landmarks from the same trunk.
TWO_HEADS = """
g (float[N, 8] x) => (float[N, 2] face, float[N, 4] box, float[N, 10] points) {
    s = Gemm (x, ws)
    face = Softmax <axis = 1> (s)
    box = Gemm (x, wb)
    points = Gemm (x, wp)
}
"""


def test_raw_heads_beside_a_softmax_head_are_regressions_not_class_scores():
    """The argmax of four box offsets decides nothing: judged as class scores, MTCNN's box
    head failed static int8 on top-1 agreement 0.94 (a dynamic fallback with only its Gemms
    int8); as a regression it holds 21.2 dB and every Conv is int8."""
    rng = np.random.default_rng(0)
    weights = {
        n: rng.normal(size=(8, k)).astype(np.float32) for n, k in (("ws", 2), ("wb", 4), ("wp", 10))
    }
    kinds = {
        name: [p.kind for p in parts] for name, parts in _parts(_model(TWO_HEADS, weights)).items()
    }
    assert kinds == {
        "face": [floors.CLASS_SCORES],
        "box": [floors.REGRESSION],
        "points": [floors.REGRESSION],
    }
    # without the Softmax head, an [N, C] output is still class scores (logits)
    alone = _model(TWO_HEADS.replace("face = Softmax <axis = 1> (s)", "face = Relu (s)"), weights)
    assert [p.kind for p in _parts(alone)["box"]] == [floors.CLASS_SCORES]


# A detector head as exporters write it: boxes in pixels (0..320) and class probabilities in one
# output, concatenated along the last axis.
DETECTOR = """
g (float[N, 16] x) => (float[N, 10, 6] y) {
    b = MatMul (x, wb)
    b3 = Reshape (b, sb)
    boxes = Mul (b3, px)
    s = MatMul (x, ws)
    s3 = Reshape (s, ss)
    scores = Sigmoid (s3)
    y = Concat <axis = 2> (boxes, scores)
}
"""


def _detector(score_weights: np.ndarray) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    return _model(
        DETECTOR,
        {
            "wb": rng.normal(0, 0.3, (16, 40)).astype(np.float32),
            "sb": np.array([-1, 10, 4], np.int64),
            "px": np.array(160.0, np.float32),
            "ws": score_weights.astype(np.float32),
            "ss": np.array([-1, 10, 2], np.int64),
        },
    )


def test_concatenated_head_is_measured_slice_by_slice():
    rng = np.random.default_rng(1)
    parts = _parts(_detector(rng.normal(0, 1.0, (16, 20))))["y"]
    assert [(p.kind, p.axis, p.start, p.stop) for p in parts] == [
        (floors.REGRESSION, 2, 0, 4),
        (floors.PROBABILITIES, 2, 4, 6),
    ]


def test_broken_scores_fail_although_the_whole_output_looks_fine(tmp_path, capsys):
    """The scores slice loses its task (weights perturbed) while the boxes dominate the whole
    output's cosine: the verdict names the slice and exits 1."""
    rng = np.random.default_rng(1)
    ws = rng.normal(0, 1.0, (16, 20))
    reference = _detector(ws)
    candidate = _detector(ws + rng.normal(0, 1.0, ws.shape))
    ref_path, cand_path = tmp_path / "ref.onnx", tmp_path / "cand.onnx"
    onnx.save(reference, ref_path)
    onnx.save(candidate, cand_path)
    model = io.load_model(reference)
    samples = SyntheticSamples(input_specs(model), 64, seed=3)
    report = verify(reference, candidate, samples, floors=False)
    assert report.passed and report.outputs[0].cosine_mean > 0.99  # what PASS used to mean
    report = verify(reference, candidate, samples)
    failed = [c for c in report.floors if not c.passed]
    assert failed and all(c.part == "y[4:6 on axis 2]" for c in failed)
    assert {c.kind for c in failed} == {floors.PROBABILITIES}
    assert not report.passed
    assert all(c.passed for c in report.floors if c.part == "y[0:4 on axis 2]")

    code, out, err = run_cli(["verify", ref_path, cand_path, "--synthetic", "64"], capsys)
    assert code == 1
    assert "FAIL: y[4:6 on axis 2] (probabilities)" in out
    code, out, err = run_cli(
        ["verify", ref_path, cand_path, "--synthetic", "64", "--no-floors"], capsys
    )
    assert code == 0 and "floors     not checked (floors off)" in out and "\nPASS" in out


def test_explicit_thresholds_replace_the_floors():
    rng = np.random.default_rng(1)
    ws = rng.normal(0, 1.0, (16, 20))
    reference, candidate = _detector(ws), _detector(ws + rng.normal(0, 1.0, ws.shape))
    samples = SyntheticSamples(input_specs(io.load_model(reference)), 32, seed=3)
    report = verify(reference, candidate, samples, thresholds=Thresholds(min_cosine=0.9))
    assert report.passed and report.floors is None
    assert report.floors_note == "replaced by the thresholds given"


def test_identical_models_hold_every_floor(resnet_path, test_npz):
    model = io.load_model(resnet_path)
    report = verify(resnet_path, resnet_path, NpzSamples(test_npz, input_specs(model)))
    assert report.passed
    assert {(c.kind, c.floor.metric) for c in report.floors} == {
        (floors.CLASS_SCORES, "top1"),
        (floors.CLASS_SCORES, "accuracy_drop"),
    }
    assert all(c.value is not None for c in report.floors)  # the test digits carry labels


def test_a_pass_on_too_few_samples_to_show_a_floor_says_so():
    """No disagreement in n samples bounds the disagreement rate only below 3/n (95 %): a
    0.98 top-1 floor needs 150 samples before a perfect score can show it."""
    proto = _model("g (float[N, 8] x) => (float[N, 8] y) { y = Relu (x) }")
    specs = input_specs(io.load_model(proto))
    few = verify(proto, proto, SyntheticSamples(specs, 20, seed=0))
    (top1,) = [c for c in few.floors if c.floor.metric == "top1"]
    assert few.passed and top1.value == 1.0 and top1.count == 20 and top1.rows_needed == 150
    assert few.weak_evidence and top1.weak
    text = few.format()
    assert "(20 counted, 150 needed)" in text
    assert text.endswith("PASS on too few samples to show every floor (see evidence above)")
    enough = verify(proto, proto, SyntheticSamples(specs, 160, seed=0))
    assert enough.passed and not enough.weak_evidence
    assert enough.format().endswith("\nPASS") and "evidence" not in enough.format()


def test_accuracy_floor_with_labels_fails_a_model_that_lost_its_task(
    resnet_path, test_npz, tmp_path
):
    """A digits ResNet whose classifier weights are shuffled keeps producing class scores of the
    same range but no longer classifies: both class-score floors fail."""
    proto = onnx.load(resnet_path)
    gemm = next(n for n in proto.graph.node if n.op_type == "Gemm")
    weight = next(t for t in proto.graph.initializer if t.name == gemm.input[1])
    array = onnx.numpy_helper.to_array(weight).copy()
    np.random.default_rng(0).shuffle(array.reshape(-1))
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    model = io.load_model(resnet_path)
    report = verify(resnet_path, proto, NpzSamples(test_npz, input_specs(model)))
    failed = {c.floor.metric for c in report.floors if not c.passed}
    assert failed == {"top1", "accuracy_drop"}
    assert not report.passed


def test_integer_outputs_need_exact_agreement():
    graph = "g (float[N, 8] x) => (int64[N] y) { s = Mul (x, k) y = ArgMax <axis = 1, keepdims = 0> (s) }"
    reference = _model(graph, {"k": np.ones(8, np.float32)})
    candidate = _model(graph, {"k": np.linspace(0.5, 1.5, 8).astype(np.float32)})
    samples = SyntheticSamples(input_specs(io.load_model(reference)), 64, seed=0)
    report = verify(reference, candidate, samples)
    (check,) = report.floors
    assert check.kind == floors.INTEGER and check.value < 0.99 and not report.passed


def test_slices_are_found_through_transpose_reshape_and_per_scale_concats():
    """A YOLOX-style head: per scale Concat(boxes, objectness, class) on the channel axis,
    Reshape to [N, 6, HW], Concat of the scales along the anchors, Transpose to [N, A, 6]."""
    text = """
    g (float[N, 8, 4, 4] a, float[N, 8, 2, 2] b) => (float[N, 20, 6] y) {
        ba = Conv (a, wb)
        oa = Sigmoid (ca)
        ca = Conv (a, wo)
        pa = Concat <axis = 1> (ba, oa)
        ra = Reshape (pa, s16)
        bb = Conv (b, wb)
        cb = Conv (b, wo)
        ob = Sigmoid (cb)
        pb = Concat <axis = 1> (bb, ob)
        rb = Reshape (pb, s4)
        cat = Concat <axis = 2> (ra, rb)
        y = Transpose <perm = [0, 2, 1]> (cat)
    }
    """
    text = text.replace(
        "oa = Sigmoid (ca)\n        ca = Conv (a, wo)",
        "ca = Conv (a, wo)\n        oa = Sigmoid (ca)",
    )
    rng = np.random.default_rng(0)
    proto = _model(
        text,
        {
            "wb": rng.normal(0, 1, (4, 8, 1, 1)).astype(np.float32),
            "wo": rng.normal(0, 1, (2, 8, 1, 1)).astype(np.float32),
            "s16": np.array([-1, 6, 16], np.int64),
            "s4": np.array([-1, 6, 4], np.int64),
        },
    )
    parts = _parts(proto)["y"]
    assert [(p.kind, p.axis, p.start, p.stop) for p in parts] == [
        (floors.REGRESSION, 2, 0, 4),
        (floors.PROBABILITIES, 2, 4, 6),
    ]


CTC = """
g (float[T, N, 8] x) => (float[T, N, 12] y) {
    h = MatMul (x, w)
    y = Add (h, bias)
}
"""


def test_projection_logits_per_position_need_whole_sequences_to_agree():
    """CTC-style logits [T, N, C] from a final projection to more features than it reads: one
    changed argmax in a line is a different line, so most sequences must agree whole (the batch
    axis is found by size). A projection to fewer features is hidden features, not classes."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (8, 12)).astype(np.float32)
    bias = np.zeros(12, np.float32)
    reference = _model(CTC, {"w": w, "bias": bias})
    (part,) = _parts(reference)["y"]
    assert part.kind == floors.CLASS_PER_POSITION and part.class_axis == 2
    narrowing = CTC.replace("float[T, N, 8] x", "float[T, N, 32] x")
    (hidden,) = _parts(_model(narrowing, {"w": np.zeros((32, 12), np.float32), "bias": bias}))["y"]
    assert hidden.kind == floors.REGRESSION
    candidate = _model(
        CTC, {"w": w + rng.normal(0, 0.15, w.shape).astype(np.float32), "bias": bias}
    )
    x = rng.normal(0, 1, (24, 40, 8)).astype(np.float32)  # 24 positions, 40 samples
    acc = floors.PartAccumulator(part)
    import onnxruntime as ort

    ref = ort.InferenceSession(reference.SerializeToString()).run(None, {"x": x})[0]
    cand = ort.InferenceSession(candidate.SerializeToString()).run(None, {"x": x})[0]
    acc.add(ref, cand, None, None, samples=40)
    m = acc.metrics()
    same = (ref.argmax(2) == cand.argmax(2)).all(axis=0).mean()  # per sample (axis 1 is N)
    assert m["sequence"] == pytest.approx(same)
    assert m["top1"] == pytest.approx((ref.argmax(2) == cand.argmax(2)).mean())
    assert m["sequence"] < m["top1"]


def test_a_stale_declared_output_shape_gives_way_to_the_observed_one():
    """Exporters sometimes declare an output shape the model does not produce ([1, seqlen] for
    [T, 1, C] logits behind a run-time Reshape, which inference cannot check): the kind comes
    from the observed rank."""
    import onnx_ir as ir

    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (8, 12)).astype(np.float32)
    model = io.load_model(_model(CTC, {"w": w, "bias": np.zeros(12, np.float32)}))
    model.graph.outputs[0].shape = ir.Shape([1, "seqlen"])  # what the exporter declared
    (part,) = floors.parts_of(model.graph.outputs[0])
    assert part.kind != floors.CLASS_PER_POSITION  # from the declared rank alone
    samples = SyntheticSamples(input_specs(model), 3, seed=0)
    report = verify(model, model, samples)
    assert {c.kind for c in report.floors} == {floors.CLASS_PER_POSITION}
    assert report.passed


def test_static_int8_that_breaks_the_floors_falls_back_to_dynamic_and_says_so(monkeypatch):
    """Logits [N, T, C] whose one class spans a huge range, with its bias as an Add after the
    MatMul. Static int8 adds the bias in float to the MatMul's float output (the MatMul's int8
    kernel writes float): every floor holds. Quantizing that Add too (the rule before) rounds
    the logits with one coarse scale and the other classes' argmax is lost; dynamic int8 keeps
    the MatMul output in float and holds every floor, so the defaults choose it and say why."""
    from onnxzip.quantize import QuantizeConfig, quantize, rules

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (8, 16)).astype(np.float32)
    w[:, 0] *= 400
    b = np.zeros(16, np.float32)
    b[0] = -60
    proto = _model(
        "g (float[N, 6, 8] x) => (float[N, 6, 16] y) { h = MatMul (x, w)\n y = Add (h, b) }",
        {"w": w, "b": b},
    )
    model = io.load_model(proto)
    samples = SyntheticSamples(input_specs(model), 64, seed=1)
    # pair-safe weights on every CPU: exact in onnxruntime's int8 kernels with or without VNNI,
    # so the outcome does not depend on the machine (full-range weights saturate without VNNI)
    config = QuantizeConfig(floor_guard=False, reduce_range="on")
    _, static = quantize(model, samples, config)
    assert static.parity.passed and static.quantized_ops == {"MatMul": 1}
    assert {k.node: k.reason for k in static.kept_float}["y"] == rules.BIAS_REASON

    monkeypatch.setattr(rules, "_bias_after_layer", lambda node: False)
    _, static = quantize(model, samples, config)
    assert not static.parity.passed and static.config.mode == "static"
    quantized, report = quantize(model, samples, QuantizeConfig(reduce_range="on"))
    assert report.config.mode == "dynamic" and report.quantized_ops == {"MatMul": 1}
    assert report.fallback.startswith("dynamic int8: static int8 broke the default floors (y")
    assert report.parity.passed and "fallback     dynamic int8" in report.format()
    assert any(n.op_type == "MatMulInteger" for n in quantized.graph)


def test_a_softmax_below_opset_13_over_the_last_axis_is_class_scores_per_position():
    """Paddle exports (opset 11/12) write a CTC recognizer's last op as Softmax(axis=2) on
    [N, T, C]; loading rewrites it as Reshape-Softmax-Reshape, and its output is still class
    scores per position (top-1 agreement per position), not independent probabilities."""
    proto = onnx.parser.parse_model(
        '<ir_version: 7, opset_import: ["" : 11]>\n'
        "g (float[N, 5, 7] x) => (float[N, 5, 7] y) { y = Softmax <axis = 2> (x) }"
    )
    (parts,) = _parts(proto).values()
    assert [p.kind for p in parts] == [floors.CLASS_PER_POSITION]
    assert parts[0].class_axis == 2


def test_a_flip_between_classes_both_models_score_as_tied_counts_as_agreeing():
    """Class scores whose top two differ by less than float16 can resolve (in log-probability)
    in the reference and in the candidate are a tie: the row agrees, and the check counts it.
    A candidate that puts another class clearly first (0.05 in log-probability) still differs,
    whether the scores are logits or a Softmax's probabilities; so does a candidate that ties
    classes the reference tells clearly apart."""
    eps = floors.TIE_LOG_RATIO
    reference = np.array([[2.0, 2.0 - eps / 4, 0.0], [1.0, 0.5, 0.0], [3.0, 3.0 - eps / 2, 1.0]])
    tied = np.array([[2.0, 2.0 + eps / 4, 0.0], [1.0, 0.5, 0.0], [3.0, 3.0 + 0.05, 1.0]])
    for probabilities in (False, True):
        part = floors.Part(
            "y",
            floors.CLASS_SCORES,
            "test",
            class_axis=1,
            floors=floors.DEFAULT_FLOORS[floors.CLASS_SCORES],
            probabilities=probabilities,
        )

        def scores(logits, probabilities=probabilities):
            if not probabilities:
                return logits
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            return e / e.sum(axis=1, keepdims=True)

        acc = floors.PartAccumulator(part)
        acc.add(scores(reference), scores(tied), None, None)
        assert acc.ties == 1  # row 0; row 2's candidate prefers class 1 by 0.05
        assert acc.metrics()["top1"] == pytest.approx(2 / 3)
        (top1, _) = floors.check([acc])
        assert top1.ties == 1 and not top1.passed
        # a candidate that ties two classes the reference tells apart by 0.5 is no tie
        flat = np.array([[2.0, 2.0 - eps / 4, 0.0], [0.9, 0.9 + eps / 8, 0.0], [3.0, 2.0, 1.0]])
        acc = floors.PartAccumulator(part)
        acc.add(scores(reference), scores(flat), None, None)
        assert acc.ties == 0 and acc.metrics()["top1"] == pytest.approx(2 / 3)


def test_verify_reports_the_rows_it_counted_as_ties(tmp_path):
    """A candidate that only swaps two classes the reference scores within float16's resolution
    passes the top-1 floor, and the report says how many rows were ties."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (8, 4)).astype(np.float32)
    text = "g (float[N,8] x) => (float[N,4] y) { m = MatMul(x, w)\n y = Add(m, b) }"
    # columns 0 and 1 compute the same score up to a shift far below float16's resolution
    w[:, 1] = w[:, 0]
    big = np.array([0.0, 0.0, -50.0, -50.0], np.float32)
    ref = _model(text, {"w": w, "b": big})
    cand = _model(text, {"w": w, "b": big + np.array([0, 1e-4, 0, 0], np.float32)})
    samples = SyntheticSamples(input_specs(io.load_model(ref)), 32, seed=0)
    report = verify(ref, cand, samples)
    (top1,) = [c for c in report.floors if c.floor.metric == "top1"]
    assert top1.value == 1.0 and top1.ties == 32 and report.passed
    assert "32 of 32 rows differ only between classes both models score as tied" in (
        report.format()
    )
    # the table's top-1 agreement and an explicit --min-top1 count the same rows as agreeing
    assert report.outputs[0].top1_agreement == 1.0
    assert verify(ref, cand, samples, thresholds=Thresholds(min_top1=0.98)).passed
    # a candidate that clearly prefers another class is still a disagreement
    clear = _model(text, {"w": w, "b": big + np.array([0, 0.5, 0, 0], np.float32)})
    assert verify(ref, clear, samples).outputs[0].top1_agreement == 0.0
