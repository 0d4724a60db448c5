"""compress: the whole job on the shipped digits model, budgets, the command line."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import run_cli

from onnxzip import PruneConfig, QuantizeConfig, RecoverConfig, io
from onnxzip.compress import CompressConfig, compress
from onnxzip.data import NpzSamples, input_specs


def test_bare_compress_halves_macs_quantizes_and_keeps_accuracy(resnet_path, calib_npz, test_npz):
    specs = input_specs(io.load_model(resnet_path))
    model, report = compress(
        resnet_path,
        NpzSamples(calib_npz, specs),
        CompressConfig(latency=False),
        verify_samples=NpzSamples(test_npz, specs),
    )
    out = report.parity.outputs[0]
    assert report.after["macs"] <= 0.5 * report.before["macs"]
    assert report.after["file_bytes"] < 0.35 * report.before["file_bytes"]
    assert out.reference_accuracy - out.candidate_accuracy <= 0.01  # within a point, no labels used
    ops = {n.op_type for n in model.graph}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "BatchNormalization" not in ops
    assert report.recovery.steps == 500 and report.quantize.quantized_ops["Conv"] == 6


def test_budget_searches_milder_pruning(resnet_path, calib_npz, test_npz):
    specs = input_specs(io.load_model(resnet_path))
    config = CompressConfig(
        prune=PruneConfig(target_macs=0.3),
        recover=RecoverConfig(steps=150),
        max_drop=0.3,
        latency=False,
    )
    _, report = compress(
        resnet_path,
        NpzSamples(calib_npz, specs),
        config,
        verify_samples=NpzSamples(test_npz, specs),
    )
    targets = [a.target_macs for a in report.attempts]
    # the requested amount, the mildest, then the ones between from the requested one up
    assert targets[0] == 0.3 and (len(targets) == 1 or targets[1] == 0.9)
    assert targets[2:] == sorted(targets[2:]) and all(0.3 < t < 0.9 for t in targets[2:])
    fitting = [a for a in report.attempts if a.fits]
    if fitting:
        taken = next((a for a in report.attempts if a.fits and a.target_macs != 0.9), fitting[0])
        assert taken.accuracy_drop <= 0.3
        assert report.prune.macs_after / report.prune.macs_before == taken.macs
    else:
        assert len(targets) == 2 and report.prune is None  # even the mildest broke the budget


def test_search_tries_the_mildest_second_and_stops_when_it_fails(mobilenet_path, calib_npz):
    """A budget no amount holds costs two attempts (the requested one and the mildest); one
    only the mildest holds tries every amount and takes the mildest."""
    specs = input_specs(io.load_model(mobilenet_path))
    samples = NpzSamples(calib_npz, specs)

    def search(target, **budget):
        config = CompressConfig(
            prune=PruneConfig(target_macs=target),
            recover=None,
            quantize=None,
            latency=False,
            **budget,
        )
        model, report = compress(mobilenet_path, samples, config)
        return model, report

    _, report = search(0.5, min_cosine=1.0)
    assert [a.target_macs for a in report.attempts] == [0.5, 0.9]
    assert report.prune is None and not any(a.fits for a in report.attempts)
    _, pair = search(0.8, min_cosine=1.0)  # two amounts: tried in order
    assert [a.target_macs for a in pair.attempts] == [0.8, 0.9]
    c8, c9 = (a.cosine for a in pair.attempts)
    assert c8 < c9
    model, report = search(0.5, min_cosine=(c8 + c9) / 2)
    assert [a.target_macs for a in report.attempts] == [0.5, 0.9, 0.6, 0.7, 0.8]
    assert [a.fits for a in report.attempts] == [False, True, False, False, False]
    assert report.prune.macs_after / report.prune.macs_before == report.attempts[1].macs


def test_fixed_ratio_is_one_attempt_reported_as_a_ratio(resnet_path, calib_npz):
    specs = input_specs(io.load_model(resnet_path))
    config = CompressConfig(
        prune=PruneConfig(ratio=0.25), recover=None, quantize=None, latency=False
    )
    _, report = compress(resnet_path, NpzSamples(calib_npz, specs), config)
    (attempt,) = report.attempts
    assert attempt.target_macs is None and attempt.ratio == 0.25
    assert 0.3 < attempt.macs < 0.9 and report.prune is not None
    assert "0.25 of each group" in report.format() and "MACs <=" not in report.format()


@pytest.mark.parametrize("quantize", ["none", "dynamic"])
def test_stages_can_be_switched(quantize, mobilenet_path, calib_npz):
    specs = input_specs(io.load_model(mobilenet_path))
    config = CompressConfig(
        prune=None,
        quantize=None if quantize == "none" else QuantizeConfig(mode=quantize),
        latency=False,
    )
    model, report = compress(mobilenet_path, NpzSamples(calib_npz, specs), config)
    assert report.prune is None and report.attempts == []
    if quantize == "none":
        assert report.quantize is None and report.parity.outputs[0].max_abs_error == 0
    else:
        assert report.quantize.quantized_ops == {"Gemm": 1}


def test_cli_compress_writes_model_and_json(resnet_path, calib_npz, test_npz, tmp_path, capsys):
    out = tmp_path / "small.onnx"
    code, stdout, _ = run_cli(
        [
            "compress",
            resnet_path,
            "-o",
            out,
            "--data",
            calib_npz,
            "--verify-data",
            test_npz,
            "--recover-steps",
            "300",
            "--json",
            tmp_path / "r.json",
        ],
        capsys,
    )
    assert code == 0, stdout
    onnx.checker.check_model(str(out), full_check=True)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["after"]["macs"] <= 0.5 * data["before"]["macs"]
    assert data["latency_ms"]["original"] > 0 and data["parity"]["samples"] == 360
    assert "latency ms" in stdout and "wrote" in stdout
    code, _, err = run_cli(
        ["compress", resnet_path, "-o", out, "--data", calib_npz, "--quantize", "fp4"], capsys
    )
    assert code == 2 and err.count("\n") == 1


@pytest.mark.parametrize(
    "middle, why",
    [
        ("LRN", "op LRN has no gradient"),  # refused while building the gradient graph
        ("Resize", "Could not find an implementation for ResizeGrad"),  # when opening it
    ],
)
def test_compress_goes_on_without_recovery_when_the_model_cannot_be_trained(
    middle, why, tmp_path, calib_npz
):
    """onnxruntime-training cannot train the model (LRN has no gradient builder, ResizeGrad no
    CPU kernel): compress still prunes and quantizes, recovers by least-squares reconstruction
    instead, and its report says so and why (it used to stop, ResizeGrad with exit 3)."""
    import onnx.helper
    import onnx.numpy_helper

    rng = np.random.default_rng(0)
    nodes = [
        onnx.helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        onnx.helper.make_node("Relu", ["c1"], ["r1"]),
        onnx.helper.make_node("LRN", ["r1"], ["n1"], size=3)
        if middle == "LRN"
        # crop-and-resize extrapolates outside its box: affine, no exact rewrite for the twin
        else onnx.helper.make_node(
            "Resize",
            ["r1", "roi", "scales"],
            ["n1"],
            mode="nearest",
            coordinate_transformation_mode="tf_crop_and_resize",
        ),
        onnx.helper.make_node("Conv", ["n1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        onnx.helper.make_node("Relu", ["c2"], ["r2"]),
        onnx.helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        onnx.helper.make_node("Flatten", ["p"], ["f"]),
        onnx.helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"], transB=1),
    ]
    tensors = {
        "w1": rng.normal(0, 0.5, (16, 1, 3, 3)),
        "b1": np.zeros(16),
        "w2": rng.normal(0, 0.2, (16, 16, 3, 3)),
        "b2": np.zeros(16),
        "w3": rng.normal(0, 0.3, (10, 16)),
        "b3": np.zeros(10),
        "scales": np.array([1.0, 1.0, 2.0, 2.0]),
        "roi": np.array([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]),
    }
    graph = onnx.helper.make_graph(
        nodes,
        "lrn_net",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 1, 8, 8])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 10])],
        [onnx.numpy_helper.from_array(v.astype(np.float32), k) for k, v in tensors.items()],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = io.load_model(proto)
    samples = NpzSamples(calib_npz, input_specs(model))
    small, report = compress(
        model,
        samples,
        CompressConfig(
            prune=PruneConfig(ratio=0.25), recover=RecoverConfig(steps=5), latency=False
        ),
    )
    assert report.recovery is None
    assert why in report.recovery_skipped
    text = report.format()
    assert "NOT FINE-TUNED" in text and "recovery  gradient-free instead:" in text
    assert report.prune.reconstruction  # the affected layers were refitted instead
    assert report.after["parameters"] < report.before["parameters"]
    io.save_model(small, tmp_path / "small.onnx")


def test_pruning_that_breaks_the_floors_once_quantized_is_dropped(
    resnet_path, calib_npz, test_npz, monkeypatch
):
    """The pruned model holds the floors, quantization holds them against the pruned model,
    but together they break them (here: a quantizer that ruins whatever pruned model it is
    given): compress quantizes the unpruned model instead and says so."""
    import importlib

    compress_mod = importlib.import_module("onnxzip.compress")
    real = compress_mod.quantize

    def ruin_pruned(model, samples, config, **kwargs):
        quantized, report = real(model, samples, config, **kwargs)
        if model is not original[0]:  # the pruned model: its classifier weights shuffled
            for value in quantized.graph.initializers.values():
                array = value.const_value.numpy()
                if array.dtype == np.int8 and array.ndim == 2:
                    shuffled = np.random.default_rng(0).permutation(array.reshape(-1))
                    value.const_value = io_tensor(shuffled.reshape(array.shape), value.name)
        return quantized, report

    def io_tensor(array, name):
        import onnx_ir as ir

        return ir.Tensor(array, name=name)

    specs = input_specs(io.load_model(resnet_path))
    original = [None]
    real_load = compress_mod.io.load_model

    def load(model, *args, **kwargs):
        loaded = real_load(model, *args, **kwargs)
        if original[0] is None:
            original[0] = loaded
        return loaded

    monkeypatch.setattr(compress_mod, "quantize", ruin_pruned)
    monkeypatch.setattr(compress_mod.io, "load_model", load)
    model, report = compress(
        resnet_path,
        NpzSamples(calib_npz, specs),
        CompressConfig(latency=False, recover=RecoverConfig(steps=100)),
        verify_samples=NpzSamples(test_npz, specs),
    )
    assert report.attempts and report.attempts[-1].fits  # a pruning held the floors alone
    assert report.pruning_dropped is not None and "quantized alone it holds them" in (
        report.pruning_dropped
    )
    assert report.prune is None and report.parity.passed
    assert report.after["macs"] == report.before["macs"]  # the model is not pruned
    assert "pruning   DROPPED: pruned to" in report.format()


def test_the_summary_groups_the_layers_kept_in_float_by_why():
    """A detector's guard kept 23 layers in float, each with its own cost in dB: the summary
    printed them as one line of 3,000 characters. Grouped by reason, six named per reason."""
    from onnxzip.quantize import KeptFloat, kept_float_lines

    kept = [
        KeptFloat(
            f"Conv_{i}",
            "Conv",
            f"accuracy guard (default floors): quantizing it alone "
            f"cost {i / 3:.2f} dB on output[0:4 on axis 2]",
        )
        for i in range(9)
    ] + [KeptFloat("Concat_9", "Concat", "its inputs need scales 21x apart")]
    lines = kept_float_lines(kept)
    assert lines[0] == "kept in float: 10 layers"
    assert lines[1] == (
        "  accuracy guard (default floors): what quantizing it alone cost on output[0:4 on "
        "axis 2]: Conv_0, Conv_1, Conv_2, Conv_3, Conv_4, Conv_5 (+3 more)"
    )
    assert lines[2] == "  its inputs need scales 21x apart: Concat_9"
    assert len(lines) == 3
