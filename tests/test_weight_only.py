"""Weight-only block-wise int4/int8 (``quantize --mode weight-only``): codes against onnxruntime's
own MatMulNBits quantizer, both encodings run in onnxruntime, the fused kernel in the optimised
graph, data-aware clipping, and the command on exported decoders."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ROOT
from onnx import TensorProto
from onnx import helper as oh
from onnxruntime.capi._pybind_state import quantize_matmul_4bits

from onnxzip import io
from onnxzip.quantize import weight_only as wo

EXPORTED = ROOT / "tests" / "data" / "exported"


def _matmul_model(w: np.ndarray, opset: int) -> onnx.ModelProto:
    k, n = w.shape
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["B", k])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["B", n])],
        [onnx.numpy_helper.from_array(w, "W")],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def _session(proto: onnx.ModelProto, level, path=None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    if path is not None:
        options.optimized_model_filepath = str(path)
    return ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


@pytest.mark.parametrize("k,n,block", [(64, 24, 32), (128, 8, 64), (256, 16, 128)])
def test_symmetric_codes_are_byte_identical_to_onnxruntimes_quantizer(k, n, block):
    """onnxruntime's ``quantize_matmul_4bits`` (MLAS, what MatMulNBitsQuantizer's RTN calls)
    and onnxzip's round to nearest write the same packed nibbles and scales."""
    w = np.random.default_rng(k).standard_normal((k, n)).astype(np.float32)
    blocks = k // block
    packed = np.zeros((n, blocks, block // 2), np.uint8)
    zeros = np.zeros((n, (blocks + 1) // 2), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    quantize_matmul_4bits(packed, w, scales, zeros, block, n, k, True)
    ours, our_scales, our_zeros = wo.pack_nbits(wo.quantize_blocks(w, 4, block, True))
    np.testing.assert_array_equal(ours, packed)
    np.testing.assert_array_equal(our_scales, scales.reshape(-1))
    assert our_zeros is None


def test_asymmetric_codes_and_zero_points_match_onnxruntimes_quantizer():
    w = np.random.default_rng(3).standard_normal((96, 16)).astype(np.float32) + 0.3
    packed = np.zeros((16, 3, 16), np.uint8)
    zeros = np.zeros((16, 2), np.uint8)
    scales = np.zeros((16, 3), np.float32)
    quantize_matmul_4bits(packed, w, scales, zeros, 32, 16, 96, False)
    ours, our_scales, our_zeros = wo.pack_nbits(wo.quantize_blocks(w, 4, 32, False))
    np.testing.assert_array_equal(ours, packed)
    np.testing.assert_allclose(our_scales, scales.reshape(-1), rtol=1e-6)
    np.testing.assert_array_equal(our_zeros, zeros.reshape(-1))


def test_block_codes_use_every_level_and_keep_zero_exact():
    w = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    w[5, 3] = 0.0
    sym = wo.quantize_blocks(w, 4, 32, True)
    assert sym.codes.min() == -8 and sym.codes.max() <= 7
    deq = sym.dequantized()
    # each block's value of largest magnitude is reproduced exactly (it lands on -8)
    for b in range(2):
        rows = slice(32 * b, 32 * (b + 1))
        i = np.abs(w[rows]).argmax(axis=0)
        np.testing.assert_allclose(deq[rows][i, range(8)], w[rows][i, range(8)], rtol=1e-6)
    asym = wo.quantize_blocks(w, 4, 32, False)
    assert asym.codes.min() >= 0 and asym.codes.max() <= 15
    assert asym.dequantized()[5, 3] == 0.0
    int8 = wo.quantize_blocks(w, 8, 32, True)
    assert np.abs(int8.dequantized() - w).max() < np.abs(deq - w).max() / 8


@pytest.mark.parametrize("fmt,opset", [("qdq", 21), ("nbits", 17)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_both_encodings_compute_the_dequantized_weights_in_onnxruntime(fmt, opset, symmetric):
    w = np.random.default_rng(1).standard_normal((70, 12)).astype(np.float32)  # a partial block
    model = io.load_model(_matmul_model(w, opset))
    result = wo.quantize_weights(
        model, bits=4, block_size=16, symmetric=symmetric, fmt=fmt, accuracy_level=0
    )  # float compute inside MatMulNBits: exact
    assert result.quantized == {"y": "MatMul"} and result.format == fmt
    proto = io.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert ops == (["DequantizeLinear", "MatMul"] if fmt == "qdq" else ["MatMulNBits"])
    x = np.random.default_rng(2).standard_normal((5, 70)).astype(np.float32)
    got = _session(proto, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, {"x": x})[0]
    want = x @ wo.quantize_blocks(w, 4, 16, symmetric).dequantized()
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_blocked_dequantize_is_fused_into_matmulnbits(tmp_path):
    """The standard encoding is what onnxruntime turns into its int4 kernel: after its
    extended optimisations the graph holds MatMulNBits and no DequantizeLinear."""
    w = np.random.default_rng(4).standard_normal((128, 32)).astype(np.float32)
    model = io.load_model(_matmul_model(w, 21))
    wo.quantize_weights(model, bits=4, block_size=32, fmt="qdq")
    path = tmp_path / "optimised.onnx"
    _session(io.to_proto(model), ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, path)
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops == ["MatMulNBits"]


def test_clipping_by_input_energy_lowers_the_weighted_error():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((128, 16)).astype(np.float32)
    w[rng.integers(0, 128, 12), rng.integers(0, 16, 12)] *= 8  # outliers stretch the ranges
    energy = rng.gamma(0.5, 1.0, 128).astype(np.float32)

    def weighted(blocks):
        return float((energy[:, None] * (blocks.dequantized() - w) ** 2).sum())

    rtn = wo.quantize_blocks(w, 4, 32, True)
    clipped = wo.quantize_blocks(w, 4, 32, True, importance=energy)
    assert weighted(clipped) < 0.9 * weighted(rtn)
    assert weighted(wo.quantize_blocks(w, 4, 32, True, importance=np.ones(128))) <= weighted(rtn)


def _run(args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "onnxzip", *map(str, args)], capture_output=True, text=True, cwd=cwd
    )


def test_weight_only_command_on_an_exported_decoder(tmp_path):
    out = tmp_path / "int4.onnx"
    source = EXPORTED / "llama_dynamo.onnx"
    data = EXPORTED / "llama_ids.npz"
    run = _run(
        ["quantize", source, "-o", out, "--mode", "weight-only", "--data", data, "--no-floors"],
        tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert "weight-only int4, blocks of 32" in run.stdout and "MatMulNBits" in run.stdout
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulNBits") == 15  # every projection and the output head (opset 18)
    assert io.weights_nbytes(io.load_model(out)) < 0.3 * io.weights_nbytes(io.load_model(source))
    feeds = {k: v[-4:] for k, v in np.load(data).items()}
    want = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)
    a, b = want[0].reshape(-1, want[0].shape[-1]), got[0].reshape(-1, got[0].shape[-1])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.98


def _tied(table: np.ndarray, extra: str | None = None) -> onnx.ModelProto:
    """A table read by a Gather (the token embedding) and a MatMul (a tied output head), and
    optionally by another op that has no quantized form."""
    nodes = [
        oh.make_node("Gather", ["table", "ids"], ["e"]),
        oh.make_node("MatMul", ["h", "table"], ["y"]),
        oh.make_node("Add", ["e", "y"], ["out"]),
    ]
    outputs = [oh.make_tensor_value_info("out", TensorProto.FLOAT, ["B", 128])]
    if extra:
        nodes.append(oh.make_node(extra, ["table"], ["t"]))
        outputs.append(oh.make_tensor_value_info("t", TensorProto.FLOAT, [128, 128]))
    graph = oh.make_graph(
        nodes,
        "tied",
        [
            oh.make_tensor_value_info("ids", TensorProto.INT64, ["B"]),
            oh.make_tensor_value_info("h", TensorProto.FLOAT, ["B", 128]),
        ],
        outputs,
        [onnx.numpy_helper.from_array(table, "table")],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def test_a_tied_embedding_is_quantized_for_both_readers_and_never_stored_twice():
    """A table read by the embedding Gather and the output MatMul: int8 rows for the first,
    int4 blocks for the second, the float table gone; with a third reader that has no
    quantized form, everything stays float (with the reason) rather than grow the model.
    (torch.onnx writes GPT-2's tied head as its own transposed copy: an ordinary weight.)"""
    table = np.random.default_rng(6).standard_normal((128, 128)).astype(np.float32)
    model = io.load_model(_tied(table))
    result = wo.quantize_weights(model, bits=4, block_size=32)
    assert sorted(result.quantized.values()) == ["Gather", "MatMul"]
    assert io.weights_nbytes(model) < 0.5 * table.nbytes
    ids = np.array([3, 77], np.int64)
    h = np.random.default_rng(7).standard_normal((2, 128)).astype(np.float32)
    got = _session(io.to_proto(model), ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(
        None, {"ids": ids, "h": h}
    )[0]
    want = table[ids] + h @ table
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()

    shared = io.load_model(_tied(table, extra="Neg"))
    result = wo.quantize_weights(shared, bits=4, block_size=32)
    assert result.quantized == {} and "tied weight" in result.kept_float["y"]
    assert io.weights_nbytes(shared) == table.nbytes


def test_qdq_encoding_below_opset_21_is_refused_in_one_line(tmp_path):
    source = EXPORTED / "bert_ts.onnx"  # opset 17
    run = _run(
        ["quantize", source, "-o", tmp_path / "x.onnx", "--mode", "weight-only"]
        + ["--weight-format", "qdq", "--synthetic", "16"],
        tmp_path,
    )
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1 and "opset 21" in run.stderr
    assert list(tmp_path.iterdir()) == []


def test_gptq_lowers_the_layers_output_error_below_round_to_nearest():
    """GPTQ minimises ||X W - X W^||^2 for the inputs X it saw: on correlated inputs its output
    error is well below round to nearest's (the same block scales), on held-out inputs too; an
    input feature that is always 0 gets the weight 0."""
    rng = np.random.default_rng(7)
    k, n = 128, 48
    mix = rng.standard_normal((k, k)) / np.sqrt(k)
    scale = rng.gamma(1.0, 1.0, k)
    x = (rng.standard_normal((2048, k)) @ mix * scale).astype(np.float32)
    x[:, 5] = 0.0
    held = (rng.standard_normal((512, k)) @ mix * scale).astype(np.float32)  # same distribution
    held[:, 5] = 0.0
    w = rng.standard_normal((k, n)).astype(np.float32)
    hessian = x.T.astype(np.float64) @ x / len(x)
    rtn = wo.quantize_blocks(w, 4, 32, True)
    gptq = wo.quantize_gptq(w, hessian, 4, 32, True)
    assert gptq.codes.shape == (k, n) and gptq.codes.min() >= -8 and gptq.codes.max() <= 7
    assert np.all(gptq.dequantized()[5] == 0)

    def error(blocks, inputs):
        return float(((inputs @ w - inputs @ blocks.dequantized()) ** 2).sum())

    assert error(gptq, x) < 0.7 * error(rtn, x), (error(gptq, x), error(rtn, x))
    assert error(gptq, held) < error(rtn, held)
    asym = wo.quantize_gptq(w, hessian, 4, 32, False)
    assert asym.zero_points is not None and asym.codes.max() <= 15
    assert error(asym, x) < error(wo.quantize_blocks(w, 4, 32, False), x)


def test_gptq_command_on_an_exported_decoder_beats_round_to_nearest(tmp_path):
    source, data = EXPORTED / "llama_dynamo.onnx", EXPORTED / "llama_ids.npz"
    base = ["quantize", source, "--mode", "weight-only", "--data", data, "--no-floors"]
    snr = {}
    for method in ("rtn", "gptq"):
        report = tmp_path / f"{method}.json"
        run = _run(
            [*base, "-o", tmp_path / f"{method}.onnx", "--weight-method", method, "--json", report],
            tmp_path,
        )
        assert run.returncode == 0, run.stderr
        snr[method] = json.loads(report.read_text())["parity"]["outputs"][0]["snr_db"]
    assert "GPTQ with E[x x^T] on" in run.stdout
    assert snr["gptq"] > snr["rtn"] + 0.5, snr
