"""Sample data: validation against model inputs, streaming, batching and the held-out split."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from conftest import run_cli

from onnxzip.data import InputSpec, NpzSamples, SyntheticSamples, holdout_count, open_samples
from onnxzip.errors import DataError

IMAGE = [InputSpec("input", np.dtype("float32"), ("N", 1, 8, 8))]
TWO = [
    InputSpec("ids", np.dtype("int64"), ("batch", "seq")),
    InputSpec("mask", np.dtype("int64"), ("batch", "seq")),
]


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 8, 8), dtype=np.float32)


@pytest.mark.parametrize(
    "arrays,needle",
    [
        ({"pixels": images(4)}, "'pixels' is not a model input"),
        ({"input": images(4).astype(np.float64)}, "dtype float64"),
        ({"input": images(4)[:, 0]}, "rank 3"),
        ({"input": np.zeros((4, 1, 8, 7), np.float32)}, "axis 3 must be 8"),
        ({"input": images(4), "labels": np.arange(3)}, "3 labels for 4 samples"),
        ({"input": images(4), "labels": np.zeros(4, np.float32)}, "1-D integer"),
        ({"input": images(0)}, "empty"),
    ],
)
def test_invalid_npz_gives_one_line_naming_file_and_problem(tmp_path, arrays, needle):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError) as err:
        NpzSamples(path, IMAGE)
    assert needle in str(err.value)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_input_array(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, ids=np.zeros((2, 5), np.int64))
    with pytest.raises(DataError, match="no array for model input 'mask'"):
        NpzSamples(path, TWO)


def test_nan_in_samples_is_refused_when_read(tmp_path):
    x = images(6)
    x[4, 0, 2, 2] = np.nan
    path = tmp_path / "d.npz"
    np.savez(path, input=x)
    samples = NpzSamples(path, IMAGE)
    with pytest.raises(DataError, match="NaN or Inf \\(first at sample 4\\)"):
        list(samples.batches(4))


def test_not_an_npz_file(tmp_path):
    path = tmp_path / "d.npz"
    path.write_bytes(b"not a zip archive at all")
    with pytest.raises(DataError, match="not a readable .npz"):
        NpzSamples(path, IMAGE)


def test_folder_is_streamed_and_batches_cross_file_boundaries(tmp_path):
    x = images(23)
    y = np.arange(23) % 10
    for i, (a, b) in enumerate([(0, 5), (5, 17), (17, 23)]):
        np.savez(tmp_path / f"part{i}.npz", input=x[a:b], labels=y[a:b])
    samples = NpzSamples(tmp_path, IMAGE)
    assert samples.count == 23 and samples.has_labels
    batches = list(samples.batches(8))
    assert [len(b) for b in batches] == [8, 8, 7]
    np.testing.assert_array_equal(np.concatenate([b.inputs["input"] for b in batches]), x)
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), y)


def test_holdout_split_is_disjoint_complete_and_stable(tmp_path):
    x = images(50)
    x[:, 0, 0, 0] = np.arange(50)  # tag every sample with its index
    path = tmp_path / "d.npz"
    np.savez(path, input=x)
    samples = NpzSamples(path, IMAGE)

    def ids(split):
        return [
            int(v) for b in samples.batches(7, split, 0.2) for v in b.inputs["input"][:, 0, 0, 0]
        ]

    calib, held = ids("calibration"), ids("holdout")
    assert set(calib).isdisjoint(held)
    assert sorted(calib + held) == list(range(50))
    assert len(held) == holdout_count(50, 0.2) == 10
    # Streaming the same samples in several files gives the same split.
    folder = tmp_path / "parts"
    folder.mkdir()
    for i in range(0, 50, 13):
        np.savez(folder / f"p{i:02d}.npz", input=x[i : i + 13])
    parts = NpzSamples(folder, IMAGE)
    assert [
        int(v) for b in parts.batches(7, "holdout", 0.2) for v in b.inputs["input"][:, 0, 0, 0]
    ] == held


def test_fixed_batch_dimension_overrides_batch_size(tmp_path):
    spec = [InputSpec("input", np.dtype("float32"), (1, 1, 8, 8))]
    path = tmp_path / "d.npz"
    np.savez(path, input=images(5))
    batches = list(NpzSamples(path, spec).batches(32))
    assert [len(b) for b in batches] == [1] * 5


def test_files_with_different_symbolic_lengths_are_not_concatenated(tmp_path):
    np.savez(tmp_path / "a.npz", ids=np.ones((3, 5), np.int64), mask=np.ones((3, 5), np.int64))
    np.savez(tmp_path / "b.npz", ids=np.ones((2, 9), np.int64), mask=np.ones((2, 9), np.int64))
    batches = list(NpzSamples(tmp_path, TWO).batches(4))
    assert [b.inputs["ids"].shape for b in batches] == [(3, 5), (2, 9)]


def test_synthetic_samples_follow_the_specs():
    specs = IMAGE
    samples = SyntheticSamples(specs, 10, seed=3)
    batches = list(samples.batches(4))
    assert [b.inputs["input"].shape for b in batches] == [(4, 1, 8, 8), (4, 1, 8, 8), (2, 1, 8, 8)]
    assert samples.synthetic and batches[0].labels is None
    again = list(SyntheticSamples(specs, 10, seed=3).batches(4))
    np.testing.assert_array_equal(batches[0].inputs["input"], again[0].inputs["input"])
    ints = list(SyntheticSamples(TWO, 3).batches(8))[0]
    assert ints.inputs["ids"].shape == (3, 16) and ints.inputs["ids"].dtype == np.int64


def test_open_samples_requires_exactly_one_source(tmp_path):
    with pytest.raises(DataError, match="either --data or --synthetic"):
        open_samples(IMAGE, tmp_path / "x.npz", 4)
    with pytest.raises(DataError, match="no samples"):
        open_samples(IMAGE)
    with pytest.raises(DataError, match="no such file"):
        open_samples(IMAGE, tmp_path / "missing.npz")


def _streaming_model(tmp_path):
    """A voice-activity-style streaming model: audio ``input [N, 64]``, a recurrent ``state
    [2, N, 16]`` carrying the batch on axis 1, and a scalar sample rate every sample shares;
    outputs the speech probability ``[N, 1]`` and the next state."""
    import onnx
    from onnx import TensorProto
    from onnx import helper as oh

    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.normal(0, 0.3, (64, 16)).astype(np.float32), "w")
    v = onnx.numpy_helper.from_array(rng.normal(0, 0.3, (16, 1)).astype(np.float32), "v")
    zero = onnx.numpy_helper.from_array(np.array([0], np.int64), "zero")
    scale = onnx.numpy_helper.from_array(np.array(1 / 16000, np.float32), "scale")
    nodes = [
        oh.make_node("MatMul", ["input", "w"], ["h"]),
        oh.make_node("Unsqueeze", ["h", "zero"], ["h1"]),
        oh.make_node("Add", ["state", "h1"], ["s"]),
        oh.make_node("Tanh", ["s"], ["stateN"]),
        oh.make_node("ReduceMean", ["stateN", "zero"], ["m"], keepdims=0),
        oh.make_node("MatMul", ["m", "v"], ["logit"]),
        oh.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
        oh.make_node("Mul", ["srf", "scale"], ["k"]),
        oh.make_node("Mul", ["logit", "k"], ["z"]),
        oh.make_node("Sigmoid", ["z"], ["output"]),
    ]
    graph = oh.make_graph(
        nodes,
        "vad",
        [
            oh.make_tensor_value_info("input", TensorProto.FLOAT, [None, 64]),
            oh.make_tensor_value_info("state", TensorProto.FLOAT, [2, None, 16]),
            oh.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            oh.make_tensor_value_info("output", TensorProto.FLOAT, [None, 1]),
            oh.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, None, 16]),
        ],
        [w, v, zero, scale],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)])
    model.ir_version = 9
    path = tmp_path / "vad.onnx"
    onnx.save(model, path)
    data = tmp_path / "vad.npz"
    np.savez(
        data,
        input=rng.normal(0, 1, (40, 64)).astype(np.float32),
        state=rng.normal(0, 0.5, (2, 40, 16)).astype(np.float32),
        sr=np.array(16000, np.int64),
    )
    return path, data


def test_a_state_input_carries_its_batch_on_axis_1_and_a_scalar_is_shared(tmp_path):
    """The natural layout of a streaming model's samples: state ``[2, S, 16]`` next to input
    ``[S, 64]`` and one sample rate. Batches cut the state along axis 1, keep the scalar, and
    every command runs on them."""
    import subprocess
    import sys

    import onnxruntime as ort

    from onnxzip import io
    from onnxzip.data import input_specs

    path, data = _streaming_model(tmp_path)
    samples = open_samples(input_specs(io.load_model(path)), data)
    assert not samples.unbatched and samples.count == 40
    batches = list(samples.batches(16))
    assert [len(b) for b in batches] == [16, 16, 8]
    assert batches[2].inputs["state"].shape == (2, 8, 16) and batches[2].inputs["sr"].shape == ()
    with np.load(data) as archive:
        np.testing.assert_array_equal(batches[1].inputs["state"], archive["state"][:, 16:32])
    held = list(samples.batches(8, "holdout", 0.25))
    assert sum(len(b) for b in held) == 10 and held[0].inputs["state"].shape[1] == len(held[0])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, batches[0].inputs)
    assert out[0].shape == (16, 1) and out[1].shape == (2, 16, 16)
    for argv in (
        ["quantize", path, "-o", tmp_path / "q.onnx", "--data", data, "--no-floors"],
        ["verify", path, path, "--data", data],
        ["quantize", path, "-o", tmp_path / "q2.onnx", "--data", data, "--no-floors"]
        + ["--batch-axis", "state=1", "--batch-axis", "sr=none"],
    ):
        run = subprocess.run(
            [sys.executable, "-m", "onnxzip", *map(str, argv)], capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "onnxzip", "verify", str(path), str(path), "--data", str(data)]
        + ["--batch-axis", "state=7"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "batch axis 7" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def _kernel_model(path, k: int, hidden: bool = False) -> None:
    """[N, 3, H, W] -> a k x k Conv without padding: it runs only where H and W are >= k.
    ``hidden``: four channels, a Relu and a 1 x 1 Conv after it (a group to prune)."""
    body = "h = Conv (x, w)\n r = Relu (h)\n y = Conv (r, w2)" if hidden else "y = Conv (x, w)"
    proto = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        f"g (float[N,3,H,W] x) => (float[N,2,A,B] y) {{ {body} }}"
    )
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4 if hidden else 2, 3, k, k)).astype(np.float32)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    if hidden:
        w2 = rng.normal(size=(2, 4, 1, 1)).astype(np.float32)
        proto.graph.initializer.append(onnx.numpy_helper.from_array(w2, "w2"))
    onnx.save(proto, path)


def test_synthetic_samples_take_the_first_size_the_model_runs_at(tmp_path, capsys):
    """16 x 16 random images are too small for a 17 x 17 kernel: the command line tries the
    next size (32) on one sample before calibrating, and says so; a model that runs at none of
    the sizes is refused in one line (exit 2), nothing written."""
    model = tmp_path / "big_kernel.onnx"
    _kernel_model(model, 17)
    code, out, err = run_cli(
        ["quantize", model, "-o", tmp_path / "q.onnx", "--synthetic", "8", "--no-floors"], capsys
    )
    assert code == 0, err
    assert "8 synthetic samples, symbolic dimensions 32" in out
    assert (tmp_path / "q.onnx").exists()
    code, out, err = run_cli(["verify", model, tmp_path / "q.onnx", "--synthetic", "4"], capsys)
    assert code in (0, 1) and "symbolic dimensions 32" in out, err
    # prune as well (it ran its samples at 16 and stopped in onnxruntime with exit 2)
    two = tmp_path / "two_convs.onnx"
    _kernel_model(two, 17, hidden=True)
    code, out, err = run_cli(
        ["prune", two, "-o", tmp_path / "p.onnx", "--ratio", "0.5", "--synthetic", "4"]
        + ["--no-floors"],
        capsys,
    )
    assert code == 0 and "symbolic dimensions 32" in out, err
    assert "1 pruned" in out

    huge = tmp_path / "huge_kernel.onnx"
    _kernel_model(huge, 700)
    code, out, err = run_cli(
        ["quantize", huge, "-o", tmp_path / "h.onnx", "--synthetic", "8"], capsys
    )
    assert code == 2
    assert "runs at none of the sizes 16-640" in err and "(H, W)" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "h.onnx").exists()
