"""Model I/O: normalisation to what the installed onnxruntime runs, checked atomic saves, external data."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import parse, save

from onnxzip import io
from onnxzip.errors import InputError, ModelError

RELU_CONV = """
<ir_version: {ir}, opset_import: ["" : {opset}]>
g (float[N, 2, 5, 5] x) => (float[N, 3, 5, 5] y) {{
    c = Conv <pads = [1, 1, 1, 1]> (x, w)
    y = Relu (c)
}}
"""


def relu_conv(opset: int, ir_version: int = 8) -> onnx.ModelProto:
    model = onnx.parser.parse_model(RELU_CONV.format(opset=opset, ir=ir_version))
    w = np.random.default_rng(0).normal(size=(3, 2, 3, 3)).astype(np.float32)
    model.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    return model


def ort_run(model: onnx.ModelProto | bytes, x: np.ndarray) -> np.ndarray:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]


X = np.random.default_rng(1).normal(size=(2, 2, 5, 5)).astype(np.float32)


@pytest.mark.parametrize(
    "opset,expected", [(9, 13), (11, 13), (13, 13), (17, 17), (21, 21), (23, 23), (25, 25)]
)
def test_opset_kept_when_the_installed_runtime_runs_it(opset, expected):
    proto = relu_conv(opset, ir_version=11 if opset > 21 else 8)
    model = io.load_model(proto)
    assert model.opset_imports[""] == expected
    assert model.ir_version <= io.max_ir_version()
    # onnxruntime runs the normalised model, and it computes the same thing.
    reference = ort_run(relu_conv(min(opset, 21), 8), X)
    np.testing.assert_allclose(ort_run(io.model_bytes(model), X), reference, rtol=0, atol=0)


def test_runtime_limits_are_read_from_the_installed_onnxruntime():
    assert io.max_opset() >= 21 and io.max_ir_version() >= 10  # onnxruntime >= 1.20
    assert io.runtime_has_kernel("Relu", 14) and not io.runtime_has_kernel("NoSuchOp", 14)


def test_ir_version_kept_up_to_what_the_runtime_reads():
    model = io.load_model(relu_conv(21, ir_version=12))
    assert model.ir_version == min(12, io.max_ir_version())


@pytest.fixture
def runtime_of_opset_21(monkeypatch):
    """Pretends the installed onnxruntime runs opset <= 21 (as 1.20 does)."""
    monkeypatch.setitem(io._LIMITS, "opset", 21)


def test_opset_above_the_runtime_is_lowered_with_same_outputs(runtime_of_opset_21):
    model = io.load_model(relu_conv(23, ir_version=11))
    assert model.opset_imports[""] == 21
    reference = ort_run(relu_conv(21, 8), X)
    np.testing.assert_allclose(ort_run(io.model_bytes(model), X), reference, rtol=0, atol=0)


RMS = """
    <ir_version: 11, opset_import: ["" : 23]>
    g (float[1, 4, 8] x, float[8] s) => (float[1, 4, 8] y) {
        y = RMSNormalization (x, s)
    }
    """


def test_opset_above_the_runtime_with_new_op_is_refused_naming_the_op(runtime_of_opset_21):
    with pytest.raises(ModelError) as err:
        io.load_model(onnx.parser.parse_model(RMS))
    message = str(err.value)
    assert "RMSNormalization" in message and "23" in message
    assert "\n" not in message


def test_new_ops_the_runtime_runs_are_accepted():
    model = io.load_model(onnx.parser.parse_model(RMS))
    assert model.opset_imports[""] == 23
    x = np.random.default_rng(0).normal(size=(1, 4, 8)).astype(np.float32)
    s = np.ones(8, np.float32)
    sess = ort.InferenceSession(io.model_bytes(model), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x, "s": s})
    expected = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_target_opset_converts_for_older_runtimes_with_same_outputs():
    model = io.load_model(relu_conv(23, ir_version=11))
    older = io.convert_opset(model, 21)
    assert older.opset_imports[""] == 21 and older.ir_version <= 10
    assert model.opset_imports[""] == 23  # the input is not changed
    np.testing.assert_allclose(
        ort_run(io.model_bytes(older), X), ort_run(io.model_bytes(model), X), rtol=0, atol=0
    )
    with pytest.raises(ModelError, match="target opset 12 is outside"):
        io.convert_opset(model, 12)


def test_shapes_are_inferred_on_load(resnet_path):
    model = io.load_model(resnet_path)
    shapes = {v.name: v.shape for n in model.graph for v in n.outputs}
    assert [d if isinstance(d, int) else "N" for d in shapes["s2.conv1"]] == ["N", 32, 4, 4]
    assert [d if isinstance(d, int) else "N" for d in shapes["logits"]] == ["N", 10]


@pytest.mark.parametrize(
    "content,needle",
    [
        (None, "no such file"),
        ("dir", "is a directory"),
        (os.urandom(4096), "ONNX model"),
        (b"", "ONNX model"),
    ],
)
def test_bad_model_paths_raise_one_line(tmp_path, content, needle):
    path = tmp_path / "m.onnx"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelError) as err:
        io.load_model(path)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_truncated_model_is_refused(tmp_path, resnet_path):
    data = resnet_path.read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError):
        io.load_model(path)


def test_model_failing_checker_is_refused(tmp_path):
    proto = relu_conv(17)
    proto.graph.node[1].input[0] = "does_not_exist"
    with pytest.raises(ModelError, match="onnx.checker"):
        io.load_model(save(proto, tmp_path / "bad.onnx"))


def test_save_round_trip_is_checked_and_equal(tmp_path, resnet_path):
    model = io.load_model(resnet_path)
    out = io.save_model(model, tmp_path / "copy.onnx")
    onnx.checker.check_model(str(out), full_check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.onnx"]  # no temporary left behind
    x = np.load(Path(resnet_path).parent / "digits_test.npz")["input"][:16]
    a = ort.InferenceSession(str(resnet_path), providers=["CPUExecutionProvider"]).run(
        None, {"input": x}
    )[0]
    b = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[
        0
    ]
    np.testing.assert_array_equal(a, b)


def test_save_refuses_invalid_model_and_writes_nothing(tmp_path):
    model = io.load_model(relu_conv(17))
    relu = [n for n in model.graph if n.op_type == "Relu"][0]
    relu.domain = "not.a.domain"  # unknown domain without an opset import: the checker refuses
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(ModelError, match="onnx.checker"):
        io.save_model(model, target)
    assert target.read_bytes() == b"previous"  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_save_into_missing_folder_is_input_error(tmp_path):
    model = io.load_model(relu_conv(17))
    with pytest.raises(InputError, match="does not exist"):
        io.save_model(model, tmp_path / "nope" / "out.onnx")


def test_save_into_unwritable_folder_is_input_error():
    # /proc refuses new files even to root, so this holds whoever runs the tests.
    with pytest.raises(InputError, match="cannot write"):
        io.save_model(io.load_model(relu_conv(17)), Path("/proc/onnxzip-out.onnx"))


def test_large_weights_go_to_external_data_and_load_back(tmp_path):
    model = io.load_model(relu_conv(17))
    out = io.save_model(model, tmp_path / "ext.onnx", external_data_threshold=16)
    (data,) = io.external_data_files(out)
    assert data.parent == tmp_path and re.fullmatch(r"ext\.onnx\.[0-9a-f]{8}\.data", data.name)
    proto = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    reloaded = io.load_model(out)
    np.testing.assert_array_equal(ort_run(io.model_bytes(reloaded), X), ort_run(relu_conv(17), X))
    assert io.file_size(out) == out.stat().st_size + data.stat().st_size


def test_model_and_data_are_published_as_a_pair_and_never_overwrite_other_data(tmp_path):
    """Each write gets a data name of its own: another model's 'ext.onnx.data' is never
    touched, and rewriting the target removes only the data its old version referenced."""
    other = tmp_path / "ext.onnx.data"
    other.write_bytes(b"another model's weights")
    model = io.load_model(relu_conv(17))
    first = io.save_model(model, tmp_path / "ext.onnx", external_data_threshold=16)
    (data_1,) = io.external_data_files(first)
    second = io.save_model(model, tmp_path / "ext.onnx", external_data_threshold=16)
    (data_2,) = io.external_data_files(second)
    assert data_2 != data_1 and data_2.is_file() and not data_1.exists()
    assert other.read_bytes() == b"another model's weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ext.onnx", "ext.onnx.data", data_2.name]
    )
    np.testing.assert_array_equal(
        ort_run(io.model_bytes(io.load_model(second)), X), ort_run(relu_conv(17), X)
    )


def test_missing_external_data_file_is_named(tmp_path):
    model = io.load_model(relu_conv(17))
    out = io.save_model(model, tmp_path / "ext.onnx", external_data_threshold=16)
    (data,) = io.external_data_files(out)
    data.unlink()
    with pytest.raises(ModelError, match=re.escape(data.name)):
        io.load_model(out)


def test_loading_never_changes_the_input_file(tmp_path):
    path = save(relu_conv(11), tmp_path / "old.onnx")
    before = path.read_bytes()
    io.load_model(path)
    assert path.read_bytes() == before


def test_ir_model_and_proto_inputs_accepted():
    proto = parse(
        RELU_CONV.format(opset=17, ir=8).replace(
            "float[N, 2, 5, 5] x", "float[N, 2, 5, 5] x, float[3, 2, 3, 3] w"
        )
    )
    before = proto.SerializeToString()
    model = io.load_model(proto)
    # the caller's message is read, not edited (inference added value_info to a copy)
    assert proto.SerializeToString() == before and not proto.graph.value_info
    assert {v.name for v in model.graph.inputs} == {"x", "w"}
    again = io.load_model(model)
    assert isinstance(again, ir.Model)
    assert [n.op_type for n in again.graph] == ["Conv", "Relu"]


def test_every_tensor_in_external_data_as_exporters_write_it(tmp_path, capsys):
    """torch.onnx's dynamo exporter puts every tensor, shape constants included, into
    model.onnx.data: shape inference needs the small ones' values (here the Reshape target), and
    every command must work on such a model."""
    from conftest import run_cli

    text = """
    <ir_version: 10, opset_import: ["" : 20]>
    g (float[N, 8] x) => (float[N, 2, 4] y) {
        h = MatMul (x, w)
        y = Reshape (h, shape)
    }
    """
    proto = onnx.parser.parse_model(text)
    w = np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32)
    proto.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(w, "w"),
            onnx.numpy_helper.from_array(np.array([-1, 2, 4], np.int64), "shape"),
        ]
    )
    path = tmp_path / "model.onnx"
    onnx.save(
        proto, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0
    )
    stored = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in stored.graph.initializer)
    model = io.load_model(path)
    reshape = next(n for n in model.graph if n.op_type == "Reshape")
    assert list(reshape.outputs[0].shape)[1:] == [2, 4]
    data = tmp_path / "x.npz"
    np.savez(data, x=np.random.default_rng(1).normal(size=(16, 8)).astype(np.float32))
    for mode in ("dynamic", "static"):
        out = tmp_path / f"q_{mode}.onnx"
        code, _, err = run_cli(
            ["quantize", path, "-o", out, "--data", data, "--mode", mode], capsys
        )
        assert code == 0, err
        onnx.checker.check_model(str(out), full_check=True)
    code, _, err = run_cli(["verify", path, path, "--data", data, "--per-node"], capsys)
    assert code == 0, err


def test_dimensions_stored_as_minus_one_are_symbolic(tmp_path, capsys):
    """Paddle's exporter writes dynamic dimensions as dim_value -1: they must read as symbolic
    (random samples and batches used to get a negative or zero size)."""
    from conftest import run_cli

    w = np.random.default_rng(0).normal(size=(4, 3, 1, 1)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [-1, 3, -1, -1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [-1, 4, -1, -1])],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    proto.ir_version = 8
    path = save(proto, tmp_path / "paddle.onnx")
    io.load_model(proto)  # a ModelProto given by the caller is read, never rewritten
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1
    model = io.load_model(path)
    assert [isinstance(d, int) for d in model.graph.inputs[0].shape] == [False, True, False, False]
    for command in (
        ["quantize", "--synthetic", "8"],
        ["prune", "--ratio", "0.5", "--synthetic", "4"],
    ):
        out = tmp_path / f"{command[0]}.onnx"
        code, _, err = run_cli([command[0], path, "-o", out, *command[1:]], capsys)
        assert code == 0, err
        onnx.checker.check_model(str(out), full_check=True)
    x = np.random.default_rng(2).normal(size=(2, 3, 5, 7)).astype(np.float32)
    (y,) = ort.InferenceSession(
        str(tmp_path / "quantize.onnx"), providers=["CPUExecutionProvider"]
    ).run(None, {"x": x})
    assert y.shape == (2, 4, 5, 7)


def test_a_batch_stored_as_zero_is_symbolic(tmp_path, capsys):
    """Some exporters write a dynamic batch as dim_value 0: it reads as symbolic, so samples
    are batched (never a batch of 0), and the output keeps it dynamic."""
    from conftest import run_cli

    w = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [0, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [0, 4])],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    proto.ir_version = 8
    path = save(proto, tmp_path / "zero.onnx")
    model = io.load_model(path)
    assert not isinstance(model.graph.inputs[0].shape[0], int)
    data = tmp_path / "x.npz"
    np.savez(data, x=np.random.default_rng(1).normal(size=(12, 8)).astype(np.float32))
    out = tmp_path / "q.onnx"
    code, text, err = run_cli(
        ["quantize", path, "-o", out, "--data", data, "--holdout", "0.25"], capsys
    )
    assert code == 0, err
    assert "on 9 samples" in text  # 12 samples, 3 held out: batches were not empty
    (y,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.ones((5, 8), np.float32)}
    )
    assert y.shape == (5, 4)


def test_onnxruntime_default_domain_norms_are_read_as_standard_onnx(tmp_path):
    """onnxruntime's transformer optimizer writes LayerNormalization into opset-14 models (its
    own schema before ONNX adopted it at 17) and SimplifiedLayerNormalization (RMSNorm, in no
    ONNX opset): onnx's checker refused every command on such a model. They are read as
    standard ONNX: the opset raised to 17, RMSNorm spelled out; outputs as onnxruntime
    computes them from the file as shipped."""
    import onnx.helper as oh
    import onnxruntime as ort

    from onnxzip.data import Batch
    from onnxzip.runtime import Runner

    rng = np.random.default_rng(0)
    graph = oh.make_graph(
        [
            oh.make_node("MatMul", ["x", "w"], ["a"]),
            oh.make_node("LayerNormalization", ["a", "g", "b"], ["n"], axis=-1, epsilon=1e-5),
            oh.make_node("Relu", ["n"], ["r"]),
            oh.make_node("SimplifiedLayerNormalization", ["r", "s"], ["y"], axis=-1, epsilon=1e-6),
        ],
        "ort_norms",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 5, 8])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 5, 16])],
        [
            onnx.numpy_helper.from_array(rng.normal(size=(8, 16)).astype(np.float32), "w"),
            onnx.numpy_helper.from_array(rng.uniform(0.5, 2, 16).astype(np.float32), "g"),
            onnx.numpy_helper.from_array(rng.normal(size=16).astype(np.float32), "b"),
            onnx.numpy_helper.from_array(rng.uniform(0.5, 2, 16).astype(np.float32), "s"),
        ],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 14)])
    proto.ir_version = 8
    path = tmp_path / "optimized.onnx"
    path.write_bytes(proto.SerializeToString())  # as the optimizer saves it: no checker
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(proto)
    model = io.load_model(path)
    assert model.opset_imports[""] == 17
    types = [n.op_type for n in model.graph]
    assert "LayerNormalization" in types and "SimplifiedLayerNormalization" not in types
    x = rng.normal(size=(3, 5, 8)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = session.run(None, {"x": x})[0]
    got = Runner(model, optimization="none").run(Batch({"x": x}))["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    io.save_model(model, tmp_path / "standard.onnx")  # passes the full check
    # the same with its weights in an external data file (as large models are saved)
    folder = tmp_path / "external"
    folder.mkdir()
    onnx.save(
        proto,
        folder / "m.onnx",
        save_as_external_data=True,
        size_threshold=0,
        location="m.onnx.data",
    )
    external = io.load_model(folder / "m.onnx")
    assert external.opset_imports[""] == 17
    got = Runner(external, optimization="none").run(Batch({"x": x}))["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in folder.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_dropping_the_pages_of_memory_mapped_weights_keeps_their_values(tmp_path):
    """After madvise(MADV_DONTNEED) a memory-mapped external tensor reads the same values (the
    pages come back from the file), and a tensor held in memory is left alone."""
    rng = np.random.default_rng(0)
    big = rng.normal(size=(256, 256)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 256])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 256])],
        [onnx.numpy_helper.from_array(big, "w")],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    onnx.save(proto, path, save_as_external_data=True, location="m.data", size_threshold=0)
    model = io.load_model(path)
    tensor = model.graph.initializers["w"].const_value
    first = tensor.numpy().copy()
    io.drop_resident_pages(model)
    np.testing.assert_array_equal(tensor.numpy(), first)
    np.testing.assert_array_equal(first, big)
    io.drop_pages(ir.Tensor(big))  # in memory: nothing to drop, no error


def test_quantized_models_are_typed_and_taken_as_they_are():
    """Every value quantization adds has its element type, so io.load_model returns the model
    itself (no round trip through a protobuf: a 2.3 GB model's verification held a second copy)."""
    from onnxzip.data import SyntheticSamples, input_specs
    from onnxzip.quantize import QuantizeConfig, quantize
    from testmodels import zoo

    model = zoo.bert_encoder(layers=1)
    for mode in ("static", "dynamic", "weight-only"):
        samples = SyntheticSamples(input_specs(model), 8, seed=0)
        quantized, _ = quantize(model, samples, QuantizeConfig(mode=mode), floors=False)
        untyped = [v.name for n in quantized.graph for v in n.outputs if v.name and v.type is None]
        assert untyped == [], (mode, untyped[:5])
        assert io.load_model(quantized) is quantized
