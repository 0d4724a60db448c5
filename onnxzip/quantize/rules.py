"""Per-op quantization rules: each handler only *marks* what to quantize.

Handlers are registered per (domain, op type, opset range) and visited in topological order. They mark
activations (per-tensor, calibrated), weights (per-channel int8 initializers), biases (int32,
scale ``S_x * S_w``), outputs that share their input's parameters (ops that move values without
changing them), and ReLU/Clip nodes folded into their producer's output range. One inserter
(``qdq.py``) then builds every Q/DQ pair from these marks.

The layout is the one onnxruntime fuses: ``DQ(x), DQ(w), DQ(b) -> Conv -> Q`` becomes
QLinearConv; ``Gemm`` becomes QGemm (a float output where nothing reads it quantized); ``MatMul``
becomes QLinearMatMul or MatMulIntegerToFloat; Add/Mul/Concat/AveragePool/GlobalAveragePool/
Sigmoid/Softmax become their QLinear kernels; MaxPool, Resize, Reshape, Flatten, Transpose,
Squeeze and Unsqueeze run directly on 8-bit codes when input and output share parameters.

A node no handler accepts stays in float; the handler's reason goes to the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import onnx_ir as ir

from onnxzip.ir.ops import (
    FLOAT_WEIGHTED_OPS,
    LAYOUT_OPS,
    node_key,
    single_channel_groups,
    weight_channel_axis,
)
from onnxzip.ir.ops import attr as _attr
from onnxzip.ir.registry import Registry
from onnxzip.passes import const_array


@dataclass
class Plan:
    """What to quantize, filled by the handlers."""

    activations: dict[str, str] = field(
        default_factory=dict
    )  # tensor -> tensor whose range it uses
    shared: dict[str, str] = field(default_factory=dict)  # tensor -> tensor whose params it reuses
    weights: dict[tuple[str, int], int | None] = field(
        default_factory=dict
    )  # (node, input) -> axis
    # weights that keep the full int8 range even when pair-safe weights are asked for
    full_range_weights: set[tuple[str, int]] = field(default_factory=set)
    constants: set[tuple[str, int]] = field(default_factory=set)  # constant activation inputs
    biases: dict[tuple[str, int], tuple[str, int]] = field(
        default_factory=dict
    )  # bias -> (x tensor, weight input)
    folded: dict[str, str] = field(
        default_factory=dict
    )  # folded node -> producer output it aliases
    alias: dict[str, str] = field(default_factory=dict)  # folded output -> tensor that replaces it
    quantized_nodes: dict[str, str] = field(default_factory=dict)  # node -> op type
    kept_float: dict[str, str] = field(default_factory=dict)  # node -> reason

    _MARKS = ("activations", "shared", "weights", "full_range_weights", "constants", "biases")

    def marks(self) -> dict:
        """A copy of what handlers mark, for ``restore`` when a handler refuses."""
        return {name: type(getattr(self, name))(getattr(self, name)) for name in self._MARKS}

    def restore(self, marks: dict) -> None:
        for name, value in marks.items():
            setattr(self, name, value)

    def resolve(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name

    def is_marked(self, value: ir.Value | None) -> bool:
        if value is None or value.name is None:
            return False
        name = self.resolve(value.name)
        return name in self.activations or name in self.shared


@dataclass
class Context:
    plan: Plan
    per_channel: bool
    symmetric_activations: bool
    quantize_softmax: bool
    # the transformer preset: MatMul/Gemm weights and their inputs only; outputs stay float
    # (onnxruntime runs DQ -> MatMul as MatMulIntegerToFloat), everything else float
    transformer: bool = False
    # values on the statistics path of a normalisation spelled in primitive ops (see
    # ``normalisation_statistics``): binary ops that read them stay float
    statistics: frozenset[str] = frozenset()

    def mark_activation(self, value: ir.Value, range_from: ir.Value | None = None) -> None:
        name = self.plan.resolve(value.name)
        if name not in self.plan.shared:
            self.plan.activations.setdefault(name, (range_from or value).name)

    def mark_input(self, node: ir.Node, index: int) -> None:
        """An activation input, or a constant input quantized per tensor with its own range."""
        value = node.inputs[index]
        if const_array(value) is not None:
            self.plan.constants.add((node_key(node), index))
        else:
            self.mark_activation(value)


# Reductions whose output is a statistic of an activation (a mean, a sum of squares, a norm)
_REDUCTIONS = (
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL1",
    "ReduceL2",
    "ReduceMax",
    "ReduceMin",
    "ReduceLogSumExp",
)
# ops that carry a statistic on (elementwise on it, or reshaping it) without mixing it back in
_CARRY = (
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Sqrt",
    "Reciprocal",
    "Max",
    "Min",
    "Clip",
    "Exp",
    "Log",
    "Neg",
    "Abs",
    "Identity",
    "Cast",
    "Reshape",
    "Expand",
    "Squeeze",
    "Unsqueeze",
    "Transpose",
    "Tile",
)
STATISTICS_REASON = (
    "normalisation statistics (a mean, a variance, its reciprocal square root) stay float: "
    "one 8-bit scale cannot hold them"
)


def normalisation_statistics(graph: ir.Graph) -> frozenset[str]:
    """The values of ``graph`` on the statistics path of a normalisation written in primitive
    ops, as older torch exports and tf2onnx write LayerNorm (``ReduceMean``, ``Sub``, ``Pow``,
    ``ReduceMean``, ``Add eps``, ``Sqrt``, ``Div``) and RMSNorm, GroupNorm or L2 normalisation.

    A statistic is the output of a reduction of an activation, or of an op from ``_CARRY``
    whose every non-constant input is a statistic (``var + eps``, its ``Sqrt``, ``Reciprocal``,
    broadcasts). The square whose mean is the variance (``Mul(d, d)``, ``Pow(d, 2)`` read only by
    reductions) belongs to the path too. Quantizing these to 8 bits per tensor breaks the
    normalisation: ``1/sigma`` spans orders of magnitude across rows, the squares square the
    activations' range. Binary ops that read or produce them stay float; the normalised
    activation after them is quantized as before.
    """
    stats: set[str] = set()
    for node in graph:  # topological order
        if node.domain not in ("", "ai.onnx") or not node.outputs:
            continue
        # float inputs computed at run time (a broadcast's shape tensor does not count)
        varying = [
            v
            for v in node.inputs
            if v is not None
            and (v.dtype is None or v.dtype.is_floating_point())
            and const_array(v) is None
        ]
        if node.op_type in _REDUCTIONS and node.inputs and node.inputs[0] in varying:
            stats.update(v.name for v in node.outputs if v.name)
        elif node.op_type in _CARRY and varying and all(v.name in stats for v in varying):
            stats.update(v.name for v in node.outputs if v.name)
        elif node.op_type in ("Mul", "Pow") and varying:
            same = node.op_type == "Pow" or (
                len(node.inputs) == 2 and node.inputs[0] is node.inputs[1]
            )
            out = node.outputs[0]
            readers = [user for user, _ in out.uses()]
            if same and readers and all(r.op_type in _REDUCTIONS for r in readers):
                stats.add(out.name)
    return frozenset(stats)


Handler = Callable[[ir.Node, Context], str | None]
QUANTIZATION_RULES: Registry[Handler] = Registry("quantization")
register = QUANTIZATION_RULES.register


def _is_float(value: ir.Value | None) -> bool:
    return (
        value is not None
        and value.dtype is not None
        and value.dtype.is_floating_point()
        and value.dtype.itemsize == 4
    )


# -- weighted ops -------------------------------------------------------------------------------


@register("Conv", "ConvTranspose")
def _conv(node: ir.Node, ctx: Context) -> str | None:
    x, w = node.inputs[0], node.inputs[1]
    if not _is_float(x):
        return "input is not float32"
    weight = const_array(w)
    if weight is None:
        return "weight is not a constant initializer"
    axis = weight_channel_axis(node)
    if node.op_type == "ConvTranspose" and _attr(node, "group", 1) != 1:
        axis = None  # grouped ConvTranspose: a per-channel axis would mix groups
    ctx.mark_activation(x)
    key = node_key(node)
    ctx.plan.weights[(key, 1)] = axis if ctx.per_channel else None
    if single_channel_groups(node, weight.shape):
        # onnxruntime's depthwise kernel adds in 32 bits: no pair-safe weights needed
        ctx.plan.full_range_weights.add((key, 1))
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        if const_array(node.inputs[2]) is None:
            return "bias is not a constant initializer"
        ctx.plan.biases[(key, 2)] = (x.name, 1)
    ctx.mark_activation(node.outputs[0])
    return None


@register("Gemm")
def _gemm(node: ir.Node, ctx: Context) -> str | None:
    a, b = node.inputs[0], node.inputs[1]
    if not _is_float(a):
        return "input is not float32"
    if _attr(node, "transA", 0):
        return "transA=1 has no quantized Gemm kernel"
    weight = const_array(b)
    if weight is None or weight.ndim != 2:
        return "B is not a constant 2-D initializer"
    key = node_key(node)
    ctx.mark_activation(a)
    ctx.plan.weights[(key, 1)] = weight_channel_axis(node) if ctx.per_channel else None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = const_array(node.inputs[2])
        if (
            bias is not None
            and bias.ndim == 1
            and _attr(node, "beta", 1.0) == 1.0
            and _attr(node, "alpha", 1.0) == 1.0
        ):
            ctx.plan.biases[(key, 2)] = (a.name, 1)
    if not ctx.transformer:  # plan._float_outputs drops it where nothing reads it quantized
        ctx.mark_activation(node.outputs[0])
    return None


@register("MatMul")
def _matmul(node: ir.Node, ctx: Context) -> str | None:
    a, b = node.inputs[0], node.inputs[1]
    if not (_is_float(a) and _is_float(b)):
        return "inputs are not float32"
    key = node_key(node)
    ctx.mark_activation(a)
    weight = const_array(b)
    if weight is not None:
        if weight.ndim != 2:
            return "constant B is not 2-D"
        ctx.plan.weights[(key, 1)] = weight_channel_axis(node) % 2 if ctx.per_channel else None
    elif ctx.transformer:
        return "an activation x activation MatMul (attention) stays float in the transformer preset"
    else:
        ctx.mark_activation(b)
    if not ctx.transformer:  # plan._float_outputs drops it where nothing reads it quantized
        ctx.mark_activation(node.outputs[0])
    return None


# -- elementwise and pooling ops with QLinear kernels -------------------------------------------


# ops that only move or reshape what a layer wrote (its bias still applies to each value)
_SHAPE_ONLY = LAYOUT_OPS | {"Slice"}
BIAS_REASON = (
    "a bias the exporter wrote as its own Add after a weighted layer: added in float (an 8-bit "
    "Add would round the constant and the sum once more)"
)


def _bias_after_layer(node: ir.Node) -> bool:
    """An ``Add`` of a constant to what a Conv, ConvTranspose, MatMul or Gemm with a constant
    weight wrote, through ops that only move values (tf2onnx's Conv1D: Conv, Squeeze, Add; a
    Keras Dense on a sequence: MatMul, Add), read by nothing else on the way. Where the Add
    follows the layer directly and fits its bias, preparation has folded it already
    (``passes.fold_conv_affine``, ``passes.fold_matmul_add``)."""
    if node.op_type != "Add":
        return False
    constant = [i for i, v in enumerate(node.inputs) if const_array(v) is not None]
    if len(constant) != 1:
        return False
    value = node.inputs[1 - constant[0]]
    for _ in range(8):
        if value is None or len(value.uses()) != 1 or value.is_graph_output():
            return False
        producer = value.producer()
        if producer is None:
            return False
        if producer.op_type in _SHAPE_ONLY and producer.domain in ("", "ai.onnx"):
            value = producer.inputs[0]
            continue
        return (
            producer.op_type in FLOAT_WEIGHTED_OPS
            and producer.domain in ("", "ai.onnx")
            and len(producer.inputs) > 1
            and const_array(producer.inputs[1]) is not None
        )
    return False


@register("Add", "Mul")
def _binary(node: ir.Node, ctx: Context) -> str | None:
    if not all(_is_float(v) for v in node.inputs):
        return "inputs are not float32"
    if all(const_array(v) is not None for v in node.inputs):
        return "both inputs are constants"
    if _bias_after_layer(node):
        return BIAS_REASON
    if any(v is not None and v.name in ctx.statistics for v in (*node.inputs, *node.outputs)):
        return STATISTICS_REASON
    for i in range(2):
        ctx.mark_input(node, i)
    ctx.mark_activation(node.outputs[0])
    return None


@register("Concat")
def _concat(node: ir.Node, ctx: Context) -> str | None:
    if not all(_is_float(v) for v in node.inputs):
        return "inputs are not float32"
    for i in range(len(node.inputs)):
        ctx.mark_input(node, i)
    ctx.mark_activation(node.outputs[0])
    return None


@register("AveragePool", "GlobalAveragePool", "Sigmoid")
def _unary_qlinear(node: ir.Node, ctx: Context) -> str | None:
    if not _is_float(node.inputs[0]):
        return "input is not float32"
    dilations = node.attributes.get("dilations")
    if dilations is not None and any(d != 1 for d in dilations.as_ints()):
        return "onnxruntime's QLinearAveragePool has no dilations"
    ctx.mark_activation(node.inputs[0])
    ctx.mark_activation(node.outputs[0])
    return None


@register("Softmax")
def _softmax(node: ir.Node, ctx: Context) -> str | None:
    if not ctx.quantize_softmax:
        return "Softmax stays float unless asked (--quantize-softmax)"
    return _unary_qlinear(node, ctx)


# -- ops that move values without changing them -----------------------------------------------


@register("MaxPool", "Resize", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze")
def _passthrough(node: ir.Node, ctx: Context) -> str | None:
    x = node.inputs[0]
    if not ctx.plan.is_marked(x):
        return "input is not quantized; a data-movement op is quantized only to extend a quantized region"
    if node.op_type == "MaxPool" and len(node.outputs) > 1 and node.outputs[1].uses():
        return "MaxPool indices output is used"
    if node.op_type == "Resize" and _attr(node, "mode", "nearest") != "nearest":
        # Linear interpolation creates new values: give the output its own range.
        ctx.mark_activation(node.outputs[0])
        return None
    out = node.outputs[0]
    ctx.plan.shared[out.name] = ctx.plan.resolve(x.name)
    return None


# -- activations folded into their producer's output range ------------------------------------

_FOLD_INTO = {
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "Add",
    "Mul",
    "Concat",
    "AveragePool",
    "GlobalAveragePool",
}


@register("Relu", "Clip")
def _fold_activation(node: ir.Node, ctx: Context) -> str | None:
    x, y = node.inputs[0], node.outputs[0]
    producer = x.producer()
    if ctx.symmetric_activations:
        return "symmetric activations cannot absorb a ReLU (negative codes stay)"
    if (
        producer is None
        or producer.op_type not in _FOLD_INTO
        or node_key(producer) not in ctx.plan.quantized_nodes
    ):
        return "producer is not a quantized op"
    if len(x.uses()) != 1 or x.is_graph_output():
        return "the pre-activation tensor has other uses or is a graph output"
    if any(user.graph is not node.graph for user, _ in y.uses()):
        # Readers inside If/Loop/Scan bodies keep reading float tensors; without the node they
        # would read the producer's output before the activation.
        return "its output is read inside an If/Loop/Scan body"
    if node.op_type == "Clip":
        lo = (
            const_array(node.inputs[1])
            if len(node.inputs) > 1 and node.inputs[1] is not None
            else None
        )
        hi = (
            const_array(node.inputs[2])
            if len(node.inputs) > 2 and node.inputs[2] is not None
            else None
        )
        if len(node.inputs) > 1 and node.inputs[1] is not None and lo is None:
            return "Clip bounds are not constants"
        if len(node.inputs) > 2 and node.inputs[2] is not None and hi is None:
            return "Clip bounds are not constants"
        if lo is not None and float(lo) > 0:
            return "Clip's lower bound is above 0: the quantized range must contain 0"
    name = ctx.plan.resolve(x.name)
    if name not in ctx.plan.activations:
        return "producer output is not quantized"
    # The producer's output is quantized with the activation's output range; saturation at the
    # range ends does what ReLU/Clip did, so the node goes.
    ctx.plan.activations[name] = y.name
    ctx.plan.alias[y.name] = name
    ctx.plan.folded[node_key(node)] = name
    return None
