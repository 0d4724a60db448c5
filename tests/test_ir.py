"""The op table and rule registries: metatypes read by every stage, rules keyed by (domain, op,
opset), and onnxruntime's fused ops (types and shapes inferred through them, channel rules)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest
from oracles import assert_oracle, prepared

from onnxzip import io
from onnxzip.analysis import inspect_model
from onnxzip.data import SyntheticSamples, input_specs
from onnxzip.ir import Registry, ops
from onnxzip.pruning import find_groups
from onnxzip.pruning.rules import CHANNEL_RULES
from onnxzip.quantize import QuantizeConfig, quantize
from onnxzip.quantize.rules import QUANTIZATION_RULES
from onnxzip.runtime import Runner
from testmodels import zoo


def _node(text: str) -> ir.Node:
    proto = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17]>\n' + text)
    return next(iter(io.load_model(proto).graph))


@pytest.mark.parametrize(
    "conv, weight, subtype, single",
    [
        ("Conv <group: int = 1>", [8, 4, 3, 3], "dense", False),
        ("Conv <group: int = 4>", [4, 1, 3, 3], "depthwise", True),
        ("Conv <group: int = 4>", [8, 1, 3, 3], "depthwise", False),  # channel multiplier 2
        ("Conv <group: int = 2>", [8, 2, 3, 3], "grouped", False),
    ],
)
def test_convolution_subtypes_are_decided_once(conv, weight, subtype, single):
    cin = weight[1] * int(conv.split("= ")[1].split(">")[0])
    node = _node(
        f"g (float[1, {cin}, 8, 8] x) => (float[1, {weight[0]}, 6, 6] y)"
        f"<float[{', '.join(map(str, weight))}] w = {{{', '.join(['0'] * int(np.prod(weight)))}}}>"
        f"{{ y = {conv}(x, w) }}"
    )
    assert ops.conv_subtype(node, weight) == subtype
    assert ops.is_depthwise(node, weight) == (subtype == "depthwise")
    assert ops.single_channel_groups(node, weight) == single
    assert ops.weight_channel_axis(node) == 0 and ops.weight_input_axis(node) == 1
    assert ops.output_channels(node, weight) == weight[0]


@pytest.mark.parametrize("trans_b, out_axis, in_axis", [(0, 1, 0), (1, 0, 1)])
def test_gemm_weight_axes_follow_transb(trans_b, out_axis, in_axis):
    shape = [3, 5] if trans_b else [5, 3]
    node = _node(
        f"g (float[2, 5] a) => (float[2, 3] y)<float[{shape[0]}, {shape[1]}] w = "
        f"{{{', '.join(['0'] * 15)}}}>{{ y = Gemm <transB: int = {trans_b}>(a, w) }}"
    )
    assert ops.weight_channel_axis(node) == out_axis
    assert ops.weight_input_axis(node) == in_axis
    assert ops.output_channels(node, shape) == 3
    assert ops.node_macs(node, lambda v: list(v.shape) if v.shape else None) == 2 * 3 * 5


def test_registry_keys_domain_and_opset():
    reg: Registry = Registry("test")
    reg.register("Foo", versions=(13, 17))(lambda: "old")
    reg.register("Foo", versions=(18, 25))(lambda: "new")
    reg.register("Foo", domain="com.microsoft")(lambda: "ms")
    assert reg.lookup("", "Foo", 13)() == "old"
    assert reg.lookup("ai.onnx", "Foo", 20)() == "new"
    assert reg.lookup("", "Foo", 26) is None  # newer than the rules: no rule, the stage blocks
    assert reg.lookup("com.microsoft", "Foo", 1)() == "ms"
    assert reg.lookup("com.other", "Foo", 1) is None


def test_both_stage_registries_cover_the_weighted_ops():
    for op in ops.FLOAT_WEIGHTED_OPS:
        assert CHANNEL_RULES.lookup("", op, 17) is not None, op
        assert QUANTIZATION_RULES.lookup("", op, 17) is not None, op
    assert CHANNEL_RULES.lookup(ops.MS_DOMAIN, "BiasGelu", 1) is not None
    assert CHANNEL_RULES.lookup(ops.MS_DOMAIN, "SkipLayerNormalization", 1) is not None


# -- onnxruntime's fused ops -------------------------------------------------------------------


@pytest.fixture(scope="module")
def fused_bert(tmp_path_factory):
    """The zoo's BERT-style encoder before and after onnxruntime's transformer optimizer, which
    fuses LayerNormalization + residual Add into SkipLayerNormalization and Add + Gelu into
    BiasGelu (com.microsoft)."""
    from onnxruntime.transformers.optimizer import optimize_model

    work = tmp_path_factory.mktemp("fused")
    plain = work / "bert.onnx"
    io.save_model(zoo.bert_encoder(), plain)
    fused = optimize_model(str(plain), model_type="bert", num_heads=4, hidden_size=64, opt_level=0)
    path = work / "bert_fused.onnx"
    fused.save_model_to_file(str(path))
    ops_seen = Counter(n.op_type for n in onnx.load(path).graph.node)
    assert ops_seen["SkipLayerNormalization"] >= 2 and ops_seen["BiasGelu"] >= 1, ops_seen
    return plain, path


def test_types_and_shapes_are_inferred_through_fused_ops(fused_bert):
    plain, path = fused_bert
    model = io.load_model(path)
    untyped = [
        v.name
        for n in model.graph
        for v in n.outputs
        if v.uses() and (v.dtype is None or v.shape is None)
    ]
    assert untyped == []
    # MACs are counted after the fused ops as before them
    assert inspect_model(path).macs == inspect_model(plain).macs > 0


def test_dynamic_quantization_reaches_every_weight_matmul_after_fused_ops(fused_bert):
    _, path = fused_bert
    model = io.load_model(path)
    weight_matmuls = sum(
        1 for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None
    )
    samples = SyntheticSamples(input_specs(model), 8)
    _, report = quantize(model, samples, QuantizeConfig(mode="dynamic"))
    assert report.quantized_ops.get("MatMul", 0) == weight_matmuls
    assert report.parity.outputs[0].cosine_mean > 0.99


def test_ffn_groups_cross_biasgelu_and_satisfy_the_masking_oracle(fused_bert):
    _, path = fused_bert
    model = prepared(io.load_model(path))
    groups = find_groups(model.clone())
    through_gelu = [g for g in groups if not g.blocked and any("Gelu" in m.owner for m in g.slices)]
    assert len(through_gelu) == 2  # one FFN per layer
    skip_blocked = [g for g in groups if g.blocked and "SkipLayerNormalization" in g.reason]
    assert skip_blocked and all(
        "normalises over the channel axis" in g.reason for g in skip_blocked
    )
    assert assert_oracle(model, {g.id for g in through_gelu}) == 2
    # the pruned model runs in onnxruntime with its fused kernels
    batch = next(SyntheticSamples(input_specs(model), 2, seed=3).batches(2))
    assert Runner(model).run(batch)


def _fused_attention_model() -> onnx.ModelProto:
    """X [N, S, 64] -> com.microsoft.Attention (4 heads, packed QKV weight [64, 192]) -> MatMul:
    onnx's inference can type the MatMul only once the Attention output is typed."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.1, (64, 192)).astype(np.float32), "w_qkv"),
        numpy_helper.from_array(np.zeros(192, np.float32), "b_qkv"),
        numpy_helper.from_array(rng.normal(0, 0.1, (64, 32)).astype(np.float32), "w_out"),
    ]
    nodes = [
        helper.make_node(
            "Attention", ["x", "w_qkv", "b_qkv"], ["a"], domain="com.microsoft", num_heads=4
        ),
        helper.make_node("MatMul", ["a", "w_out"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "fused_attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", None])],
        inits,
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
        ir_version=8,
    )


def test_fused_attention_is_typed_counted_and_quantized_around():
    proto = _fused_attention_model()
    model = io.load_model(proto)
    a = next(v for n in model.graph for v in n.outputs if v.name == "a")
    assert a.dtype == ir.DataType.FLOAT and [
        d if isinstance(d, int) else d.value for d in a.shape
    ] == [
        "N",
        "S",
        64,
    ]
    y = model.graph.outputs[0]
    assert y.shape is not None and y.shape[-1] == 32  # onnx's inference went on past it
    report = inspect_model(proto)
    per_op = {m.op_type: m.macs for m in report.macs_per_node}
    assert per_op == {"Attention": 64 * 192, "MatMul": 64 * 32}  # per token
    samples = SyntheticSamples(input_specs(model), 8)
    quantized, qreport = quantize(model, samples, QuantizeConfig(mode="dynamic"))
    assert qreport.quantized_ops == {"MatMul": 1}
    assert qreport.parity.outputs[0].cosine_mean > 0.99


def test_new_initializer_names_stay_unique_inside_and_outside_a_naming_scope():
    """``passes.naming`` replaces the per-call graph scan of ``add_initializer`` by one scan per
    bulk edit: names already in the graph, handed out in the scope, or claimed for node outputs
    the edit names itself are never reused; the scope ends with the edit."""
    from onnxzip import passes

    model = io.load_model(
        onnx.parser.parse_model(
            '<ir_version: 8, opset_import: ["" : 17]>\n'
            "g (float[N,4] x) => (float[N,4] y) { t = Relu (x)\n y = Relu (t) }"
        )
    )
    graph = model.graph
    one = np.ones(4, np.float32)
    with passes.naming(graph):
        a = passes.add_initializer(graph, "t", one)  # a node output's name
        b = passes.add_initializer(graph, "t", one)  # handed out just above
        node = ir.node("Relu", [graph.outputs[0]], name="extra")
        node.outputs[0].name = "z"
        graph.append(node)
        passes.claim(graph, "z")
        c = passes.add_initializer(graph, "z", one)
        with passes.naming(graph):  # nested: the same scope
            d = passes.add_initializer(graph, "x", one)  # a graph input's name
    assert [a.name, b.name, c.name, d.name] == ["t_1", "t_2", "z_1", "x_1"]
    assert graph not in passes._NAMING  # the scope is gone with the edit
    node.outputs[0].name = "w"  # outside a scope every call scans the graph again
    assert passes.add_initializer(graph, "w", one).name == "w_1"
