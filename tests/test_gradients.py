"""Gradient statistics: onnxruntime training gradients against finite differences, criteria."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest
from conftest import run_cli

from onnxzip import io
from onnxzip.data import NpzSamples, SyntheticSamples, input_specs
from onnxzip.gradients import _gated_twin, gradient_statistics
from onnxzip.pruning import PruneConfig, prepared_groups, prune
from onnxzip.runtime import Runner
from onnxzip.verify import verify

TINY = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,6,6] x) => (float[N,4] y) {
    a = Conv <pads=[1,1,1,1]> (x, w1, b1)
    r = Relu (a)
    c = Conv (r, w2, b2)
    s = Sigmoid (c)
    p = GlobalAveragePool (s)
    f = Flatten (p)
    y = Gemm <transB=1> (f, w3, b3)
}
"""


def tiny(seed: int = 0) -> ir.Model:
    proto = onnx.parser.parse_model(TINY)
    rng = np.random.default_rng(seed)
    for name, shape in {
        "w1": (5, 3, 3, 3),
        "b1": (5,),
        "w2": (6, 5, 1, 1),
        "b2": (6,),
        "w3": (4, 6),
        "b3": (4,),
    }.items():
        proto.graph.initializer.append(
            onnx.numpy_helper.from_array(rng.normal(0, 0.6, shape).astype(np.float32), name)
        )
    return io.load_model(proto)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(labels)), labels].mean())


def test_gate_gradients_match_central_finite_differences(tmp_path):
    model = tiny()
    work, groups = prepared_groups(model)
    x = np.random.default_rng(1).normal(size=(6, 3, 6, 6)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 1, 0], dtype=np.int64)
    np.savez(tmp_path / "d.npz", x=x, labels=labels)
    samples = NpzSamples(tmp_path / "d.npz", input_specs(model))
    stats, report = gradient_statistics(work, groups, samples, batch_size=6)
    assert report.loss == "cross-entropy against labels" and report.batches == 1
    twin, gates = _gated_twin(work, groups)
    eps = 1e-2
    checked = 0
    for name, (gid, _root, _axis) in gates.items():
        gate = twin.graph.initializers[name]
        base = gate.const_value.numpy().copy()
        numeric = []
        for c in range(base.shape[0]):
            losses = []
            for sign in (1, -1):
                g = base.copy()
                g[c] += sign * eps
                gate.const_value = ir.tensor(g, name=name)
                logits = Runner(twin, optimization="none").session.run(None, {"x": x})[0]
                losses.append(cross_entropy(logits, labels))
            numeric.append((losses[0] - losses[1]) / (2 * eps))
        gate.const_value = ir.tensor(base, name=name)
        np.testing.assert_allclose(stats[gid].total, numeric, rtol=2e-2, atol=2e-4)
        checked += 1
    assert checked == 2  # the conv1 and conv2 groups (the Gemm's group reaches the output)


def test_own_predictions_are_the_targets_without_labels():
    model = tiny()
    work, groups = prepared_groups(model)
    samples = SyntheticSamples(input_specs(model), 20, seed=3)
    stats, report = gradient_statistics(work, groups, samples, batch_size=8)
    assert report.loss == "cross-entropy against the model's own predictions"
    assert report.batches == 3 and report.samples == 20
    for s in stats.values():
        assert s.batches == 3 and np.all(np.isfinite(s.score("grad-stability")))
        np.testing.assert_allclose(s.score("fisher"), s.squares)


def conv_pair() -> ir.Model:
    """Two 1x1 convolutions with a ReLU between: one prunable group, no class scores."""
    proto = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        "g (float[N,3,4,4] x) => (float[N,2,4,4] y) { a = Conv (x, w1)\n r = Relu (a)\n y = Conv (r, w2) }"
    )
    rng = np.random.default_rng(0)
    for name, shape in {"w1": (4, 3, 1, 1), "w2": (2, 4, 1, 1)}.items():
        proto.graph.initializer.append(
            onnx.numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)
        )
    return io.load_model(proto)


def test_energy_loss_for_models_without_class_scores():
    model = conv_pair()
    work, groups = prepared_groups(model)
    stats, report = gradient_statistics(
        work, groups, SyntheticSamples(input_specs(model), 8), batch_size=8
    )
    assert report.loss.startswith("0.5 * ||outputs||^2") and len(stats) == 1


def test_a_gradient_criterion_beats_l1_before_recovery(mobilenet_path, calib_npz, test_npz):
    """Floor: on the digits nets at half the MACs, some gradient criterion keeps more accuracy than l1."""
    model = io.load_model(mobilenet_path)
    specs = input_specs(model)
    accuracy = {}
    for criterion in ("l1", "taylor", "fisher", "grad-stability"):
        pruned, report = prune(
            model,
            PruneConfig(target_macs=0.5, criterion=criterion),
            samples=NpzSamples(calib_npz, specs),
        )
        assert report.macs_after <= 0.5 * report.macs_before
        accuracy[criterion] = (
            verify(model, pruned, NpzSamples(test_npz, specs)).outputs[0].candidate_accuracy
        )
    assert max(accuracy[c] for c in ("taylor", "fisher", "grad-stability")) > accuracy["l1"], (
        accuracy
    )


def test_cli_stats_and_gradient_criterion(resnet_path, calib_npz, tmp_path, capsys):
    out = tmp_path / "s.npz"
    code, stdout, _ = run_cli(
        ["stats", resnet_path, "-o", out, "--data", calib_npz, "--json", tmp_path / "r.json"],
        capsys,
    )
    assert code == 0 and "cross-entropy against labels" in stdout
    with np.load(out) as data:
        assert data["group0.taylor"].shape == (16,) and int(data["group0.batches"]) == 16
    assert json.loads((tmp_path / "r.json").read_text())["samples"] == 512
    code, _, err = run_cli(
        [
            "prune",
            resnet_path,
            "-o",
            tmp_path / "p.onnx",
            "--ratio",
            "0.3",
            "--criterion",
            "taylor",
        ],
        capsys,
    )
    assert code == 2 and "needs samples" in err
    code, stdout, _ = run_cli(
        [
            "prune",
            resnet_path,
            "-o",
            tmp_path / "p.onnx",
            "--target-macs",
            "0.6",
            "--criterion",
            "fisher",
            "--data",
            calib_npz,
            "--no-floors",  # no recovery: the verdict is not what this test is about
        ],
        capsys,
    )
    assert code == 0 and "gradients" in stdout


EXOTIC = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,4] y) {
    a = Conv <pads=[1,1,1,1]> (x, w1, b1)
    h = HardSwish (a)
    c = Conv (h, w2)
    p = PRelu (c, slope)
    q = HardSigmoid (p)
    s = Sum (q, q, p)
    v = AveragePool <kernel_shape=[2,2], strides=[2,2]> (s)
    g = GlobalAveragePool (v)
    f = Flatten (g)
    y = Gemm <transB=1> (f, w3, b3)
}
"""


def exotic() -> ir.Model:
    proto = onnx.parser.parse_model(EXOTIC)
    rng = np.random.default_rng(0)
    shapes = {
        "w1": (6, 3, 3, 3),
        "b1": (6,),
        "w2": (5, 6, 1, 1),
        "slope": (5, 1, 1),
        "w3": (4, 5),
        "b3": (4,),
    }
    for name, shape in shapes.items():
        proto.graph.initializer.append(
            onnx.numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), name)
        )
    return io.load_model(proto)


def test_ops_without_gradient_builders_are_rewritten_and_averagepool_batch_is_fixed(tmp_path):
    """HardSwish, HardSigmoid, PRelu, Sum of 3 and AveragePool with a symbolic batch all train."""
    from onnxzip.recover import RecoverConfig, recover

    model = exotic()
    samples = SyntheticSamples(input_specs(model), 40, seed=4)
    work, groups = prepared_groups(model)
    stats, report = gradient_statistics(work, groups, samples, batch_size=8)
    assert report.batches == 5 and len(stats) == 2
    assert all(
        np.all(np.isfinite(s.score("taylor"))) and s.score("taylor").any() for s in stats.values()
    )
    pruned, _ = prune(model, PruneConfig(ratio=0.3, criterion="taylor"), samples=samples)
    recovered, rec = recover(model, pruned, samples, RecoverConfig(steps=30, batch_size=8))
    assert rec.last_loss < rec.first_loss
    ops = {n.op_type for n in recovered.graph}
    assert {
        "HardSwish",
        "PRelu",
        "HardSigmoid",
        "AveragePool",
    } <= ops  # the served model keeps its ops
    io.save_model(recovered, tmp_path / "r.onnx")


def test_a_fixed_batch_larger_than_the_samples_shrinks_to_them():
    """An AveragePool fixes the twin's batch; with 16 samples (13 after the held-out part) and
    the default batch of 32 there was no batch of that size, so recovery and the statistics
    stopped ('no batch of the fixed size 32'). The fixed batch is the samples there are."""
    from onnxzip.recover import RecoverConfig, recover

    model = exotic()
    samples = SyntheticSamples(input_specs(model), 16, seed=4)
    work, groups = prepared_groups(model)
    _, report = gradient_statistics(work, groups, samples, batch_size=32)
    assert report.batches == 1
    pruned, _ = prune(model, PruneConfig(ratio=0.3), samples=samples)
    _, rec = recover(model, pruned, samples, RecoverConfig(steps=6, batch_size=32, holdout=0.2))
    assert rec.samples_seen == 6 * 13 and np.isfinite(rec.last_loss)


def test_a_fixed_batch_follows_the_memory_budgets_cap():
    """The memory budget caps batches below the requested size (PP-OCRv4's recognizer: 18 of
    32): the AveragePool twin's fixed batch is the capped size, so recovery distils instead of
    stopping with 'no batch of the fixed size 32', and every step sees a capped batch."""
    from onnxzip.recover import RecoverConfig, recover

    model = exotic()
    samples = SyntheticSamples(input_specs(model), 40, seed=4)
    samples.max_batch = 6
    pruned, _ = prune(model, PruneConfig(ratio=0.3), samples=samples)
    _, rec = recover(model, pruned, samples, RecoverConfig(steps=5, batch_size=32, holdout=0.2))
    assert rec.samples_seen == 5 * 6 and np.isfinite(rec.last_loss)


@pytest.mark.parametrize(
    "pool",
    [
        "MaxPool <kernel_shape=[5,5], pads=[2,2,2,2], strides=[1,1]>",  # YOLOv8's SPPF
        "AveragePool <kernel_shape=[3,3], pads=[1,1,1,1], strides=[1,1]>",
    ],
)
def test_pooling_with_symbolic_height_and_width_trains(pool, tmp_path):
    """onnxruntime-training 1.19's MaxPool and AveragePool gradients crash (SIGSEGV) on
    symbolic spatial dimensions: the twins take them from the samples."""
    from onnxzip.recover import RecoverConfig, recover

    proto = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        "g (float[batch,3,height,width] x) => (float[batch,4] y) {\n"
        " a = Conv <pads=[1,1,1,1]> (x, w1)\n r = Relu (a)\n"
        f" m = {pool} (r)\n c = Conv (m, w2)\n"
        " p = GlobalAveragePool (c)\n f = Flatten (p)\n y = Gemm <transB=1> (f, w3) }"
    )
    rng = np.random.default_rng(0)
    for name, shape in {"w1": (8, 3, 3, 3), "w2": (6, 8, 1, 1), "w3": (4, 6)}.items():
        proto.graph.initializer.append(
            onnx.numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), name)
        )
    model = io.load_model(proto)
    x = rng.normal(size=(24, 3, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    samples = NpzSamples(tmp_path / "x.npz", input_specs(model))
    work, groups = prepared_groups(model)
    stats, report = gradient_statistics(work, groups, samples, batch_size=8)
    assert report.batches == 3 and all(s.score("taylor").any() for s in stats.values())
    pruned, _ = prune(model, PruneConfig(ratio=0.3), samples=samples)
    recovered, rec = recover(model, pruned, samples, RecoverConfig(steps=10, batch_size=8))
    assert rec.steps == 10 and rec.samples_seen > 0 and np.isfinite(rec.losses).all()
    assert recovered.graph.inputs[0].shape[2] == "height"  # the model written stays dynamic
    other = {"x": rng.normal(size=(2, 3, 20, 16)).astype(np.float32)}
    assert Runner(recovered).session.run(None, other)[0].shape == (2, 4)


def test_an_op_without_gradient_is_named_and_prune_falls_back_to_l1():
    proto = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        "g (float[N,3,8,8] x) => (float[N,4] y) { a = Conv (x, w1)\n r = Relu (a)\n c = Conv (r, w2)\n"
        " b = LRN <size=3> (c)\n p = GlobalAveragePool (b)\n f = Flatten (p)\n y = Gemm <transB=1> (f, w3) }"
    )
    rng = np.random.default_rng(0)
    for name, shape in {"w1": (4, 3, 1, 1), "w2": (6, 4, 1, 1), "w3": (4, 6)}.items():
        proto.graph.initializer.append(
            onnx.numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)
        )
    model = io.load_model(proto)
    samples = SyntheticSamples(input_specs(model), 8)
    work, groups = prepared_groups(model)
    from onnxzip.errors import ModelError

    try:
        gradient_statistics(work, groups, samples)
        raise AssertionError("LRN has no gradient builder in onnxruntime-training 1.19")
    except ModelError as exc:
        assert "op LRN has no gradient" in str(exc) and "\n" not in str(exc)
    _, report = prune(model, PruneConfig(ratio=0.3, criterion="fisher"), samples=samples)
    notes = [g.note for g in report.groups if not g.reason]
    assert notes and all("op LRN has no gradient" in n and "scored by l1" in n for n in notes)


@pytest.mark.parametrize(
    "name",
    [
        "resnet50",
        "squeezenet",
        "inception_v1",
        "inception_v2",
        "densenet121",
        "mobilenet_v2",
        "bert_encoder",
    ],
)
def test_stats_on_the_pruning_corpus_or_the_blocking_op_is_named(name):
    from onnxzip.errors import ModelError
    from testmodels import zoo

    builders = {
        "mobilenet_v2": lambda: zoo.mobilenet_v2(resolution=64, classes=16),
        "bert_encoder": zoo.bert_encoder,
    }
    model = builders[name]() if name in builders else zoo.from_light(name)
    work, groups = prepared_groups(model)
    samples = SyntheticSamples(input_specs(model), 2, seed=1)
    if (
        name == "inception_v1"
    ):  # LRN inside the network: onnxruntime-training has no gradient for it
        with pytest.raises(ModelError, match="op LRN has no gradient"):
            gradient_statistics(work, groups, samples, batch_size=2)
        return
    stats, report = gradient_statistics(work, groups, samples, batch_size=2)
    assert len(stats) == len([g for g in groups if not g.blocked and g.roots])
    assert all(np.all(np.isfinite(s.score("fisher"))) for s in stats.values())


def test_custom_onnxblock_loss():
    """An onnxblock MSE (sum) to zero targets is twice the 0.5 * ||y||^2 default: gradients double."""
    model = conv_pair()
    work, groups = prepared_groups(model)
    samples = SyntheticSamples(input_specs(model), 8, seed=2)
    default, _ = gradient_statistics(work, groups, samples, batch_size=8)
    custom, report = gradient_statistics(
        work,
        groups,
        samples,
        batch_size=8,
        custom_loss=("MSELoss", {"reduction": "sum"}),
        extra_feeds=lambda batch: {"target": np.zeros((len(batch), 2, 4, 4), np.float32)},
    )
    assert report.loss == "custom MSELoss"
    np.testing.assert_allclose(custom[0].total, 2 * default[0].total, rtol=1e-4, atol=1e-6)


UPSAMPLING = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,4] y) {
    a = Conv <pads=[1,1,1,1]> (x, w1, b1)
    r = Relu (a)
    u = Resize <mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"> (r, roi, scales)
    c = Conv <pads=[1,1,1,1]> (u, w2)
    g = GlobalAveragePool (c)
    f = Flatten (g)
    y = Gemm <transB=1> (f, w3, b3)
}
"""


def test_nearest_upsampling_trains_through_its_exact_rewrite(tmp_path):
    """onnxruntime-training 1.19 has no CPU kernel for ResizeGrad, so a detector's nearest 2x
    upsampling stopped every recovery. Repeating each element is Unsqueeze, Expand, Reshape:
    the twin trains through that, checked to compute what the Resize computes, and the
    recovered model keeps its Resize."""
    from onnxzip.recover import RecoverConfig, recover
    from onnxzip.training import differentiable

    proto = onnx.parser.parse_model(UPSAMPLING)
    rng = np.random.default_rng(0)
    shapes = {"w1": (6, 3, 3, 3), "b1": (6,), "w2": (5, 6, 3, 3), "w3": (4, 5), "b3": (4,)}
    for name, shape in shapes.items():
        proto.graph.initializer.append(
            onnx.numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), name)
        )
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(0, np.float32), "roi"))
    scales = np.array([1, 1, 2, 3], np.float32)  # unequal factors: each axis on its own
    proto.graph.initializer.append(onnx.numpy_helper.from_array(scales, "scales"))
    model = io.load_model(proto)
    twin = model.clone()
    assert differentiable(twin) == ["Resize"]
    assert "Resize" not in {n.op_type for n in twin.graph}
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    from onnxzip.data import Batch
    from onnxzip.runtime import Runner

    want = Runner(model, optimization="none").run(Batch({"x": x}))["y"]
    got = Runner(twin, optimization="none").run(Batch({"x": x}))["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    samples = SyntheticSamples(input_specs(model), 32, seed=2)
    pruned, _ = prune(model, PruneConfig(ratio=0.3), samples=samples)
    recovered, rec = recover(model, pruned, samples, RecoverConfig(steps=40, batch_size=8))
    # one epoch is 4 batches of different losses: compare the first epoch with the last
    assert len(rec.losses) == 40 and np.mean(rec.losses[-4:]) < np.mean(rec.losses[:4])
    assert "Resize" in {n.op_type for n in recovered.graph}
    io.save_model(recovered, tmp_path / "r.onnx")


@pytest.mark.parametrize(
    "attrs, kernel",
    [
        ("kernel_shape=[2,2], strides=[2,2]", (6, 4, 2, 2)),  # a DB text detector's head
        ("kernel_shape=[4,4], strides=[2,2], pads=[1,1,1,1]", (6, 4, 4, 4)),  # FCN-style
        ("kernel_shape=[3,3], strides=[2,2], pads=[1,0,1,0], output_padding=[1,1]", (6, 4, 3, 3)),
        ("kernel_shape=[4,4], strides=[2,2], pads=[1,1,1,1], group=2", (6, 2, 4, 4)),
        ("kernel_shape=[3,3], strides=[2,2], dilations=[2,2], pads=[0,1,2,0]", (6, 4, 3, 3)),
    ],
)
def test_conv_transpose_trains_through_its_exact_rewrite(attrs, kernel, tmp_path):
    """onnxruntime-training 1.19 has no CPU kernel for ConvTransposeGrad: the twin computes it
    as a stride-1 Conv of the zero-upsampled input with the flipped kernel, checked against
    ConvTranspose in onnxruntime; its gradients match finite differences of the original, and
    the recovered model keeps its ConvTranspose."""
    from onnxzip import engine
    from onnxzip.data import Batch
    from onnxzip.recover import RecoverConfig, recover
    from onnxzip.training import differentiable

    proto = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        "g (float[N,3,height,width] x) => (float[N,4,h2,w2] y) {\n"
        " a = Conv <pads=[1,1,1,1]> (x, w1, b1)\n r = Relu (a)\n"
        f" y = ConvTranspose <{attrs}> (r, w2, b2) }}"
    )
    rng = np.random.default_rng(0)
    out_channels = kernel[1] * (2 if "group=2" in attrs else 1)
    shapes = {"w1": (6, 3, 3, 3), "b1": (6,), "w2": kernel, "b2": (out_channels,)}
    for name, shape in shapes.items():
        proto.graph.initializer.append(
            onnx.numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), name)
        )
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value = out_channels
    model = io.load_model(proto)
    twin = model.clone()
    assert differentiable(twin) == ["ConvTranspose"]
    assert "ConvTranspose" not in {n.op_type for n in twin.graph}
    x = rng.normal(size=(2, 3, 7, 9)).astype(np.float32)
    want = Runner(model, optimization="none").run(Batch({"x": x}))["y"]
    got = Runner(twin, optimization="none").run(Batch({"x": x}))["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    # d sum(y^2) / d w2 from the training engine against central differences of the original
    loss_twin = twin.clone()
    y = loss_twin.graph.outputs[0]
    square = ir.node("Mul", [y, y], name="square")
    total = ir.node("ReduceSum", [square.outputs[0]], attributes={"keepdims": 0}, name="total")
    loss_twin.graph.extend([square, total])
    loss_twin.graph.outputs.clear()
    loss_twin.graph.outputs.append(total.outputs[0])
    total.outputs[0].name, total.outputs[0].dtype = "loss", ir.DataType.FLOAT
    total.outputs[0].shape = ir.Shape([])
    result = engine.run_job(
        loss_twin,
        kind="gradients",
        requires_grad=["w2"],
        frozen=["w1", "b1", "b2"],
        batches=[{"x": x}],
        read=["w2"],
    )
    grad = result.arrays["w2"][0]
    w2 = proto.graph.initializer[2]
    base = onnx.numpy_helper.to_array(w2).astype(np.float64)
    for index in [(0, 0, 0, 0), (5, 1, 1, 1), (3, kernel[1] - 1, 0, 1)]:
        losses = []
        for step in (1e-3, -1e-3):
            shifted = base.copy()
            shifted[index] += step
            variant = onnx.ModelProto()
            variant.CopyFrom(proto)
            variant.graph.initializer[2].CopyFrom(
                onnx.numpy_helper.from_array(shifted.astype(np.float32), "w2")
            )
            out = Runner(io.load_model(variant), optimization="none").run(Batch({"x": x}))["y"]
            losses.append(float((out.astype(np.float64) ** 2).sum()))
        numeric = (losses[0] - losses[1]) / 2e-3
        assert abs(grad[index] - numeric) <= 2e-2 * max(1.0, abs(numeric)), (
            index,
            grad[index],
            numeric,
        )

    samples = SyntheticSamples(input_specs(model), 24, seed=2)
    pruned, _ = prune(model, PruneConfig(ratio=0.3), samples=samples)
    recovered, rec = recover(model, pruned, samples, RecoverConfig(steps=12, batch_size=8))
    assert rec.steps == 12 and np.isfinite(rec.losses).all()
    assert "ConvTranspose" in {n.op_type for n in recovered.graph}
    io.save_model(recovered, tmp_path / "r.onnx")


def test_distillation_standardises_features_of_very_different_spreads():
    """A detector's output row holds box coordinates in pixels and probabilities: with plain
    squared error the loss sees only the boxes. Features whose spreads differ by more than 10x
    are weighted by 1 / variance (mean weight 1); alike features keep plain squared error."""
    from onnxzip.recover import feature_weights

    rng = np.random.default_rng(0)
    boxes = rng.uniform(0, 416, (2, 500, 4))
    scores = rng.uniform(0, 1, (2, 500, 2))
    w = feature_weights(np.concatenate([boxes, scores], axis=-1).astype(np.float32))
    assert w.shape == (6,) and abs(w.mean() - 1) < 1e-5
    assert w[4:].min() > 1000 * w[:4].max()
    weighted = np.concatenate([boxes, scores], -1).reshape(-1, 6).var(0) * w
    np.testing.assert_allclose(weighted, weighted.mean(), rtol=0.05)  # each feature counts alike
    alike = rng.normal(0, 1, (64, 32)) * rng.uniform(0.5, 2, 32)
    np.testing.assert_array_equal(feature_weights(alike.astype(np.float32)), np.ones(32))


def test_control_flow_between_the_weights_and_the_loss_is_refused_by_name(tmp_path):
    """onnxruntime-training 1.19 aborts the process (SIGABRT) building the gradient of an If:
    the twin is refused before, by name, and compress then reconstructs and says why."""
    import onnx.helper as oh

    from onnxzip.engine import WorkerFailed
    from onnxzip.recover import RecoverConfig, recover
    from onnxzip.training import control_flow_on_gradient_path

    branch = lambda op, name: oh.make_graph(  # noqa: E731
        [oh.make_node(op, ["r"], [f"{name}_y"])],
        name,
        [],
        [oh.make_tensor_value_info(f"{name}_y", onnx.TensorProto.FLOAT, None)],
    )
    rng = np.random.default_rng(0)
    graph = oh.make_graph(
        [
            oh.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
            oh.make_node("Relu", ["c"], ["r"]),
            oh.make_node(
                "If",
                ["flag"],
                ["u"],
                then_branch=branch("Relu", "then"),
                else_branch=branch("Neg", "else"),
            ),
            oh.make_node("GlobalAveragePool", ["u"], ["p"]),
            oh.make_node("Flatten", ["p"], ["f"]),
            oh.make_node("Gemm", ["f", "w2"], ["y"], transB=1),
        ],
        "if_net",
        [
            oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8]),
            oh.make_tensor_value_info("flag", onnx.TensorProto.BOOL, []),
        ],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])],
        [
            onnx.numpy_helper.from_array(rng.normal(size=(6, 3, 3, 3)).astype(np.float32), "w"),
            onnx.numpy_helper.from_array(np.zeros(6, np.float32), "b"),
            onnx.numpy_helper.from_array(rng.normal(size=(4, 6)).astype(np.float32), "w2"),
        ],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model = io.load_model(proto)
    assert control_flow_on_gradient_path(model, ["w"]) == "If"
    assert control_flow_on_gradient_path(model, ["w2"]) is None  # downstream of the If
    x = rng.normal(size=(16, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x, flag=np.array(True))
    samples = NpzSamples(tmp_path / "x.npz", input_specs(model))
    with pytest.raises(WorkerFailed, match="op If has no gradient in onnxruntime-training"):
        recover(model, model.clone(), samples, RecoverConfig(steps=2, batch_size=8))


SHARED_NORM = """
<ir_version: 10, opset_import: ["" : 20]>
g (float[N,5,8] x) => (float[N,5,6] y) {
    a = MatMul (x, w1)
    n1 = LayerNormalization <axis=-1> (a, s, b)
    g1 = Gelu (n1)
    c = MatMul (g1, w2)
    d = MatMul (g1, w2)
    e = Add (c, d)
    n2 = LayerNormalization <axis=-1> (e, s, b)
    y = MatMul (n2, w3)
}
"""


def test_norm_weights_shared_by_several_readers_train(tmp_path):
    """The dynamo exporter merges equal initializers, so the LayerNormalizations of a vision
    transformer read one scale and one bias; onnxruntime-training 1.19 then rejects the graph
    ('Duplicate definition of name (s_grad)'). The twin gives every later reader of a frozen
    weight its own copy; a trained weight read twice (tied) stays one weight."""
    from onnxzip.recover import RecoverConfig, recover
    from onnxzip.training import unshare_weights

    proto = onnx.parser.parse_model(SHARED_NORM)
    rng = np.random.default_rng(0)
    shapes = {"w1": (8, 16), "w2": (16, 16), "w3": (16, 6), "s": (16,), "b": (16,)}
    for name, shape in shapes.items():
        proto.graph.initializer.append(
            onnx.numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), name)
        )
    model = io.load_model(proto)
    twin = model.clone()
    assert unshare_weights(twin, ["w1", "w2", "w3"]) == 2
    norms = [n for n in twin.graph if n.op_type == "LayerNormalization"]
    assert len({id(v) for n in norms for v in n.inputs[1:]}) == 4
    readers = [n for n in twin.graph if n.op_type == "MatMul" and n.inputs[1].name == "w2"]
    assert len(readers) == 2  # tied stays tied
    x = rng.normal(size=(2, 5, 8)).astype(np.float32)
    from onnxzip.data import Batch

    want = Runner(model, optimization="none").run(Batch({"x": x}))["y"]
    got = Runner(twin, optimization="none").run(Batch({"x": x}))["y"]
    np.testing.assert_array_equal(got, want)

    samples = SyntheticSamples(input_specs(model), 64, seed=1)
    student = model.clone()  # a damaged student (its norms cap every channel group)
    w3 = student.graph.initializers["w3"]
    w3.const_value = ir.tensor(w3.const_value.numpy() * 0.5, name="w3")
    recovered, rec = recover(model, student, samples, RecoverConfig(steps=16, batch_size=8))
    assert rec.last_loss < 0.5 * rec.first_loss
    assert set(recovered.graph.initializers) == set(model.graph.initializers)
    norms = [n for n in recovered.graph if n.op_type == "LayerNormalization"]
    assert {n.inputs[1].name for n in norms} == {"s"}
    io.save_model(recovered, tmp_path / "r.onnx")


INTERPOLATING = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,H,W] x) => (float[N,4] y) {
    a = Conv <pads=[1,1,1,1]> (x, w1, b1)
    r = Relu (a)
    u = Resize <ATTRS> (r, roi, scales, SIZES)
    c = Conv <pads=[1,1,1,1]> (u, w2)
    g = GlobalAveragePool (c)
    f = Flatten (g)
    y = Gemm <transB=1> (f, w3, b3)
}
"""
RUN_TIME_SIZES = """
    s = Shape <end=2> (r)
    SIZES = Concat <axis=0> (s, hw)
"""


@pytest.mark.parametrize(
    "attrs, scales, sizes",
    [
        ('mode="linear"', [1, 1, 2, 2], None),  # torch bilinear, align_corners=False
        ('mode="linear", coordinate_transformation_mode="align_corners"', None, [12, 20]),
        ('mode="cubic"', [1, 1, 2, 1.5], None),
        ('mode="nearest"', [1, 1, 2, 3], None),  # half_pixel: not a plain repeat
        (
            'mode="linear", coordinate_transformation_mode="pytorch_half_pixel"',
            [1, 1, 0.5, 1],
            None,
        ),
        ('mode="linear"', None, "run time"),  # Concat(Shape(x)[:2], [h, w]), symbolic H, W
    ],
)
def test_interpolating_resize_trains_through_matmuls(attrs, scales, sizes, tmp_path):
    """onnxruntime-training 1.19 has no CPU kernel for ResizeGrad: every recovery of a model
    with bilinear upsampling (a segmentation decoder, a feature pyramid) fell back to
    reconstruction. Any Resize of the last two axes is a linear map per axis: the twin applies
    each axis's interpolation matrix (computed by onnxruntime's own Resize) with a MatMul,
    checked to compute what the Resize computes; sizes the graph leaves open come from the
    samples. Recovery then trains, and the recovered model keeps its Resize."""
    from onnxzip.data import Batch
    from onnxzip.recover import RecoverConfig, recover
    from onnxzip.training import differentiable

    text = INTERPOLATING.replace("ATTRS", attrs)
    if sizes == "run time":
        text = text.replace("    u = Resize", RUN_TIME_SIZES.strip("\n") + "\n    u = Resize")
        text = text.replace("scales, SIZES", ", SIZES")
    elif sizes is None:
        text = text.replace(", SIZES)", ")")
    else:  # constant sizes name every axis: a model of one fixed input shape
        text = text.replace("scales, SIZES", ", sizes").replace("[N,3,H,W]", "[1,3,8,10]")
    proto = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    shapes = {"w1": (6, 3, 3, 3), "b1": (6,), "w2": (5, 6, 3, 3), "w3": (4, 5), "b3": (4,)}
    for name, shape in shapes.items():
        proto.graph.initializer.append(
            onnx.numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), name)
        )
    extra = {"roi": np.zeros(0, np.float32)}
    if scales is not None:
        extra["scales"] = np.array(scales, np.float32)
    if sizes == "run time":
        extra["hw"] = np.array([13, 11], np.int64)
    elif sizes is not None:
        extra["sizes"] = np.array([1, 6, *sizes], np.int64)
    for name, array in extra.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    model = io.load_model(proto)
    np.savez(tmp_path / "x.npz", x=rng.normal(size=(32, 3, 8, 10)).astype(np.float32))
    samples = NpzSamples(tmp_path / "x.npz", input_specs(model))
    twin = model.clone()
    assert differentiable(twin, samples) == ["Resize"]
    assert "Resize" not in {n.op_type for n in twin.graph}
    x = next(samples.batches(1 if isinstance(sizes, list) else 2)).inputs["x"]
    want = Runner(model, optimization="none").run(Batch({"x": x}))["y"]
    got = Runner(twin, optimization="none").run(Batch({"x": x}))["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if isinstance(sizes, list):
        return  # a batch of one: no training batches of 8 through it
    pruned, _ = prune(model, PruneConfig(ratio=0.3), samples=samples)
    recovered, rec = recover(model, pruned, samples, RecoverConfig(steps=24, batch_size=8))
    assert np.mean(rec.losses[-3:]) < np.mean(rec.losses[:3])
    assert "Resize" in {n.op_type for n in recovered.graph}
    io.save_model(recovered, tmp_path / "r.onnx")


NORMALISED = """
<ir_version: 8, opset_import: ["" : OPSET]>
g (float[N,3,8,8] x) => (float[N,4] y) {
    a = Conv <pads=[1,1,1,1]> (x, w1, b1)
    n = InstanceNormalization <epsilon=0.001> (a, gamma, beta)
    r = Relu (n)
    c = Conv <pads=[1,1,1,1]> (r, w2)
    g = GlobalAveragePool (c)
    f = Flatten (g)
    y = Gemm <transB=1> (f, w3, b3)
}
"""


@pytest.mark.parametrize("opset", [13, 18])
def test_instance_normalization_trains_through_its_statistics(opset, tmp_path):
    """InstanceNormalization has no gradient builder in onnxruntime-training 1.19 (a
    GroupNorm exports as one: wav2vec2's feature encoder): the twin spells out its statistics
    (ReduceMean with axes as an attribute before opset 18, as an input from it)."""
    from onnxzip.data import Batch
    from onnxzip.recover import RecoverConfig, recover
    from onnxzip.training import differentiable

    proto = onnx.parser.parse_model(NORMALISED.replace("OPSET", str(opset)))
    rng = np.random.default_rng(1)
    shapes = {
        "w1": (6, 3, 3, 3),
        "b1": (6,),
        "gamma": (6,),
        "beta": (6,),
        "w2": (5, 6, 3, 3),
        "w3": (4, 5),
        "b3": (4,),
    }
    for name, shape in shapes.items():
        proto.graph.initializer.append(
            onnx.numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), name)
        )
    model = io.load_model(proto)
    twin = model.clone()
    assert differentiable(twin) == ["InstanceNormalization"]
    x = rng.normal(size=(4, 3, 8, 8)).astype(np.float32)
    want = Runner(model, optimization="none").run(Batch({"x": x}))["y"]
    got = Runner(twin, optimization="none").run(Batch({"x": x}))["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    samples = SyntheticSamples(input_specs(model), 32, seed=2)
    pruned, _ = prune(model, PruneConfig(ratio=0.3), samples=samples)
    recovered, rec = recover(model, pruned, samples, RecoverConfig(steps=24, batch_size=8))
    # the first Conv reaches the loss only through the normalisation's statistics, and only a
    # gradient moves it (AdamW without weight decay): it trained. (The loss starts at float32
    # noise on this random model: the losses themselves say nothing.)
    before = pruned.graph.initializers["w1"].const_value.numpy()
    after = recovered.graph.initializers["w1"].const_value.numpy()
    assert np.abs(after - before).max() > 1e-6
    assert "InstanceNormalization" in {n.op_type for n in recovered.graph}


# op -> the body between two trained MatMuls ([N, 8] in, m [N, 8] out)
SPELLED = {
    "Softplus": "m = Softplus (a)",
    "Mish": "m = Mish (a)",
    "Elu": "m = Elu <alpha=0.7> (a)",
    "Selu": "m = Selu (a)",
    "Celu": "m = Celu <alpha=1.5> (a)",
    "Softsign": "m = Softsign (a)",
    "ThresholdedRelu": "m = ThresholdedRelu <alpha=0.2> (a)",
    "ReduceMax": "t = ReduceMax <keepdims=1> (a, one)\n m = Sub (a, t)",
    "ReduceMin": "t = ReduceMin <keepdims=0> (a, one)\n u = Unsqueeze (t, one)\n m = Sub (a, u)",
    "ReduceSumSquare": "t = ReduceSumSquare <keepdims=1> (a, one)\n m = Div (a, t)",
    "LpNormalization": "m = LpNormalization <axis=1, p=2> (a)",
    "Pad": 'r = Reshape (a, s3)\n q = Pad <mode="reflect"> (r, pads)\n m = Reshape (q, s2)',
    "DepthToSpace": 'r = Reshape (a, s4)\n q = DepthToSpace <blocksize=2, mode="CRD"> (r)\n'
    " m = Reshape (q, s2)",
    "SpaceToDepth": "r = Reshape (a, s4b)\n q = SpaceToDepth <blocksize=2> (r)\n m = Reshape (q, s2)",
}


@pytest.mark.parametrize("op", list(SPELLED))
def test_ops_without_gradient_builders_are_spelled_in_ops_that_have_them(op, tmp_path):
    """onnxruntime-training 1.19 has no gradient builder for these (Softplus and Mish: YOLO
    activations; ReduceMax: channel attention; reflect padding: image-to-image nets;
    DepthToSpace: pixel shuffle): each rewrite computes what the op computes (ties of a max
    included), and recovery trains through it."""
    from onnxzip.data import Batch
    from onnxzip.recover import RecoverConfig, recover
    from onnxzip.training import differentiable

    text = f"""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[N,8] x) => (float[N,4] y) {{
        a = MatMul (x, w1)
        {SPELLED[op]}
        y = MatMul (m, w2)
    }}
    """
    proto = onnx.parser.parse_model(text)
    rng = np.random.default_rng(3)
    arrays = {
        "w1": rng.normal(0, 0.5, (8, 8)).astype(np.float32),
        "w2": rng.normal(0, 0.5, (8, 4)).astype(np.float32),
        "one": np.array([1], np.int64),
        "s2": np.array([0, 8], np.int64),
        "s3": np.array([0, 2, 4], np.int64),
        "s4": np.array([0, 4, 1, 2], np.int64),
        "s4b": np.array([0, 2, 2, 2], np.int64),
        "pads": np.array([0, 0, 0, 0, 0, -2], np.int64),
    }
    if op == "Pad":  # reflect 2 on the left, crop the same on the right: still [N, 8]
        arrays["pads"] = np.array([0, 0, 2, 0, 0, 0], np.int64)
        text_pad = SPELLED[op].replace(
            "m = Reshape (q, s2)", "v = Slice (q, st, en, ax)\n m = Reshape (v, s2)"
        )
        proto = onnx.parser.parse_model(text.replace(SPELLED[op], text_pad))
        arrays.update(
            st=np.array([0], np.int64), en=np.array([4], np.int64), ax=np.array([2], np.int64)
        )
    used = {i for n in proto.graph.node for i in n.input}
    for name, array in arrays.items():
        if name in used:
            proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    model = io.load_model(proto)
    twin = model.clone()
    assert differentiable(twin) == [op]
    if op not in ("ReduceMax", "ReduceMin"):  # those still find the extreme, off the gradient
        assert op not in {n.op_type for n in twin.graph}
    x = rng.normal(size=(16, 8)).astype(np.float32)
    x[0] = 0.0  # ties for ReduceMax / ReduceMin, zeros for the activations
    want = Runner(model, optimization="none").run(Batch({"x": x}))["y"]
    got = Runner(twin, optimization="none").run(Batch({"x": x}))["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    samples = SyntheticSamples(input_specs(model), 32, seed=2)
    student = model.clone()
    w1 = student.graph.initializers["w1"]
    w2 = student.graph.initializers["w2"]
    for w in (w1, w2):  # noise, not a scale: normalisations do not see a scale
        damaged = w.const_value.numpy() * (1 + 0.5 * rng.normal(size=w.const_value.shape))
        w.const_value = ir.tensor(damaged.astype(np.float32), name=w.name)
    _, rec = recover(model, student, samples, RecoverConfig(steps=16, batch_size=8))
    assert all(np.isfinite(rec.losses))
    assert np.mean(rec.losses[-4:]) < np.mean(rec.losses[:4])


@pytest.mark.parametrize(
    "equation, a_shape, b_shape",
    [
        ("bi,ij->bj", [8], [8, 5]),  # a dense layer (tf2onnx's EinsumDense)
        ("bhid,bhjd->bhij", [2, 3, 8], "a"),  # attention scores: batch, free, contracted
        ("bhij,bhjd->bhid", [2, 3, 8], [1, 2, 8, 4]),  # broadcast batch axis of 1
        ("bi,bj->bij", [8], "a"),  # outer product: nothing contracted
        ("bsk,ck->bcs", [3, 8], [4, 8]),  # output in another order
        ("bxyk,kj->bjxy", [2, 3, 8], [8, 5]),  # two free letters merged, then split
        ("bik,kj->bj", [3, 8], [8, 5]),  # a letter of one operand alone: summed first
    ],
)
def test_einsum_trains_through_transposes_and_a_matmul(equation, a_shape, b_shape):
    """Einsum has no gradient builder in onnxruntime-training 1.19 (TorchScript exports of
    torch.einsum, tf2onnx's EinsumDense): a two-operand Einsum becomes Transposes, Reshapes
    and one MatMul, checked against onnxruntime's Einsum, and recovery trains through it."""
    import onnx.helper as oh

    from onnxzip.data import Batch
    from onnxzip.recover import RecoverConfig, recover
    from onnxzip.training import differentiable

    rng = np.random.default_rng(5)
    k = a_shape[-1]
    nodes = [oh.make_node("MatMul", ["x", "w1"], ["a"])]
    inits = [onnx.numpy_helper.from_array(rng.normal(0, 0.5, (k, k)).astype(np.float32), "w1")]
    if b_shape == "a":  # two activations: the second from its own trained weight
        nodes.append(oh.make_node("MatMul", ["x", "w2"], ["b"]))
        w2 = rng.normal(0, 0.5, (k, k)).astype(np.float32)
        inits.append(onnx.numpy_helper.from_array(w2, "w2"))
    else:
        b = rng.normal(0, 0.5, b_shape).astype(np.float32)
        inits.append(onnx.numpy_helper.from_array(b, "b"))
    nodes.append(oh.make_node("Einsum", ["a", "b"], ["y"], equation=equation))
    b_dims = [2, *a_shape] if b_shape == "a" else b_shape
    out = np.einsum(equation, np.zeros([2, *a_shape]), np.zeros(b_dims)).shape
    graph = oh.make_graph(
        nodes,
        "einsum",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", *a_shape])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", *out[1:]])],
        inits,
    )
    model = io.load_model(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]))
    twin = model.clone()
    assert differentiable(twin) == ["Einsum"]
    assert "Einsum" not in {n.op_type for n in twin.graph}
    x = rng.normal(size=(2, *a_shape)).astype(np.float32)
    want = Runner(model, optimization="none").run(Batch({"x": x}))["y"]
    got = Runner(twin, optimization="none").run(Batch({"x": x}))["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    samples = SyntheticSamples(input_specs(model), 32, seed=2)
    student = model.clone()
    w1 = student.graph.initializers["w1"]
    damaged = w1.const_value.numpy() * (1 + 0.5 * rng.normal(size=w1.const_value.shape))
    w1.const_value = ir.tensor(damaged.astype(np.float32), name="w1")
    _, rec = recover(model, student, samples, RecoverConfig(steps=16, batch_size=8))
    assert np.mean(rec.losses[-4:]) < np.mean(rec.losses[:4])
