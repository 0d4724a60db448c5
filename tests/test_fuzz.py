"""Fuzzing: random small CNN / MLP graphs through ``prune`` and ``quantize``.

hypothesis draws chains of Conv (plain, strided, grouped, depthwise), BatchNormalization, Relu,
Sigmoid, residual Add, channel Concat, MaxPool, then Flatten, Reshape or GlobalAveragePool, an
optional hidden Gemm or MatMul+Add layer, and a Gemm or MatMul head, with random shapes and
attributes. Every model goes through the CLI in-process:

* ``prune --ratio R``: exit 0 with a valid model whose output shape is the original's and which
  satisfies the masking oracle on every unblocked group (zeroing a group's channels in the
  original gives the pruned model's outputs, to 2e-5 relative), or exit 2 with one line;
* ``quantize --synthetic 64``: exit 0 with a valid model whose outputs on fresh random inputs
  have cosine >= 0.98 to the original's, or a max abs error within 5 % of the largest output (a
  near-constant output has no direction for the cosine to judge), or exit 2 with one line.

The budget is bounded (``max_examples``) so CI stays fast; a failing example is shrunk and
printed by hypothesis.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from conftest import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from oracles import assert_oracle, prepared

from onnxzip import io

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI failures reproduce
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@st.composite
def graphs(draw) -> onnx.ModelProto:
    """A random valid model: a body of channel-preserving or channel-changing layers, a head."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    channels = draw(st.integers(1, 6))
    size = draw(st.integers(4, 9))
    nodes, inits = [], []
    counter = iter(range(10_000))

    def name(prefix: str) -> str:
        return f"{prefix}{next(counter)}"

    def weight(shape, scale=0.4) -> str:
        n = name("w")
        inits.append(numpy_helper.from_array(rng.normal(0, scale, shape).astype(np.float32), n))
        return n

    x, c, s = "x", channels, size
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(
            st.sampled_from(
                ["conv", "depthwise", "grouped", "bn", "act", "residual", "concat", "pool"]
            )
        )
        out = name("t")
        if kind in ("conv", "depthwise", "grouped"):
            k = draw(st.sampled_from([1, 3]))
            stride = draw(st.sampled_from([1, 1, 2])) if s >= 6 else 1
            if kind == "depthwise":
                cout, group = c * draw(st.integers(1, 2)), c
            elif kind == "grouped" and c % 2 == 0:
                cout, group = 2 * draw(st.integers(1, 3)), 2
            else:
                cout, group = draw(st.integers(1, 8)), 1
            inputs = [x, weight((cout, c // group, k, k))]
            if draw(st.booleans()):
                inputs.append(weight((cout,), 0.1))
            nodes.append(
                helper.make_node(
                    "Conv", inputs, [out], pads=[k // 2] * 4, strides=[stride] * 2, group=group
                )
            )
            c, s = cout, (s + 2 * (k // 2) - k) // stride + 1
        elif kind == "bn":
            scale = numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), name("g"))
            bias = numpy_helper.from_array(rng.normal(0, 0.1, c).astype(np.float32), name("b"))
            mean = numpy_helper.from_array(rng.normal(0, 0.1, c).astype(np.float32), name("m"))
            var = numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), name("v"))
            inits += [scale, bias, mean, var]
            nodes.append(
                helper.make_node(
                    "BatchNormalization",
                    [x, scale.name, bias.name, mean.name, var.name],
                    [out],
                )
            )
        elif kind == "act":
            nodes.append(helper.make_node(draw(st.sampled_from(["Relu", "Sigmoid"])), [x], [out]))
        elif kind == "residual":
            mid = name("t")
            nodes.append(helper.make_node("Conv", [x, weight((c, c, 3, 3))], [mid], pads=[1] * 4))
            nodes.append(helper.make_node("Add", [x, mid], [out]))
        elif kind == "concat":
            extra = draw(st.integers(1, 4))
            mid = name("t")
            nodes.append(helper.make_node("Conv", [x, weight((extra, c, 1, 1))], [mid]))
            nodes.append(helper.make_node("Concat", [x, mid], [out], axis=1))
            c += extra
        else:  # pool
            if s < 2:
                continue
            nodes.append(
                helper.make_node("MaxPool", [x], [out], kernel_shape=[2, 2], strides=[2, 2])
            )
            s //= 2
        x = out
    classes = draw(st.integers(2, 10))
    head = draw(st.sampled_from(["flatten", "reshape", "pool"]))
    flat = name("t")
    if head == "pool":
        pooled = name("t")
        nodes.append(helper.make_node("GlobalAveragePool", [x], [pooled]))
        nodes.append(helper.make_node("Flatten", [pooled], [flat]))
        features = c
    elif head == "reshape":
        shape = numpy_helper.from_array(np.array([0, -1], np.int64), name("shape"))
        inits.append(shape)
        nodes.append(helper.make_node("Reshape", [x, shape.name], [flat]))
        features = c * s * s
    else:
        nodes.append(helper.make_node("Flatten", [x], [flat]))
        features = c * s * s
    if draw(st.booleans()):  # a hidden MLP layer: Gemm or MatMul + Add, then an activation
        hidden, pre, act = draw(st.integers(2, 12)), name("t"), name("t")
        if draw(st.booleans()):
            nodes.append(
                helper.make_node(
                    "Gemm",
                    [flat, weight((hidden, features)), weight((hidden,), 0.1)],
                    [pre],
                    transB=1,
                )
            )
        else:
            mm = name("t")
            nodes.append(helper.make_node("MatMul", [flat, weight((features, hidden))], [mm]))
            nodes.append(helper.make_node("Add", [mm, weight((hidden,), 0.1)], [pre]))
        nodes.append(helper.make_node(draw(st.sampled_from(["Relu", "Sigmoid"])), [pre], [act]))
        flat, features = act, hidden
    if draw(st.booleans()):
        nodes.append(
            helper.make_node(
                "Gemm",
                [flat, weight((classes, features)), weight((classes,), 0.1)],
                ["y"],
                transB=1,
            )
        )
    else:
        nodes.append(helper.make_node("MatMul", [flat, weight((features, classes))], ["y"]))
    out_shape = ["N", classes]
    graph = helper.make_graph(
        nodes,
        "fuzz",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _refused_cleanly(code: int, err: str) -> bool:
    lines = err.strip().splitlines()
    return code == 2 and len(lines) == 1 and lines[0].startswith("onnxzip: error:")


def _outputs(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@FUZZ
@given(model=graphs(), ratio=st.sampled_from([0.2, 0.5, 0.8]))
def test_fuzz_prune(model, ratio, tmp_path_factory, capsys):
    tmp = tmp_path_factory.mktemp("fuzz")
    src, out = tmp / "m.onnx", tmp / "p.onnx"
    onnx.save(model, src)
    code, _, err = run_cli(["prune", src, "-o", out, "--ratio", ratio, "--quiet"], capsys)
    if code != 0:
        assert _refused_cleanly(code, err), err
        assert not out.exists()
        return
    onnx.checker.check_model(onnx.load(out), full_check=True)
    x = (
        np.random.default_rng(0)
        .normal(
            size=(2, *[d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]])
        )
        .astype(np.float32)
    )
    assert _outputs(out, x).shape == _outputs(src, x).shape
    assert_oracle(prepared(io.load_model(model)))


@FUZZ
@given(model=graphs())
def test_fuzz_quantize(model, tmp_path_factory, capsys):
    tmp = tmp_path_factory.mktemp("fuzz")
    src, out = tmp / "m.onnx", tmp / "q.onnx"
    onnx.save(model, src)
    # --no-floors: a random graph has no task; the cosine tolerance below is the check
    code, _, err = run_cli(
        ["quantize", src, "-o", out, "--synthetic", "64", "--quiet", "--no-floors"], capsys
    )
    if code != 0:
        assert _refused_cleanly(code, err), err
        assert not out.exists()
        return
    onnx.checker.check_model(onnx.load(out), full_check=True)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = np.random.default_rng(5).normal(size=(4, *dims)).astype(np.float32)
    a, b = _outputs(src, x).ravel(), _outputs(out, x).ravel()
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
    assert cosine >= 0.98 or np.abs(a - b).max() <= 0.05 * (np.abs(a).max() + 1e-6), cosine
