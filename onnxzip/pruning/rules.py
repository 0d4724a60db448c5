"""Per-op channel rules: how a group's channels cross each op, registered per op type and opset.

A rule is called with the op, the port the channels arrived on (``("in", i)`` or
``("out", j)``), the axis they occupy there and their positions. It records the slices to take
(weights, biases, per-channel parameters), continues the group on the spaces the channels reach
(``b.visit``), or blocks the group with a reason (``b.block``). A rule never guesses: anything it
cannot prove channel-wise blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxzip.ir import ops
from onnxzip.ir.ops import attr as _attr
from onnxzip.ir.ops import dim as _dim
from onnxzip.ir.ops import node_key
from onnxzip.ir.ops import rank as _rank
from onnxzip.ir.registry import Registry
from onnxzip.passes import const_array, dequantized_array
from onnxzip.pruning.groups import GroupBuilder, Positions, same_positions

Rule = Callable[[GroupBuilder, ir.Node, tuple, int, Positions], None]
CHANNEL_RULES: Registry[Rule] = Registry("channel")
register = CHANNEL_RULES.register


def rule_for(opsets) -> Callable[[ir.Node], Rule | None]:
    """The channel rule of each node for a model with these opset imports."""
    return CHANNEL_RULES.finder(opsets)


def shift(positions: Positions, offset: int) -> Positions:
    return [p + offset for p in positions]


def widen(positions: Positions, block: int) -> Positions:
    """Position p becomes the block [p * block, (p + 1) * block)."""
    return [(p[:, None] * block + np.arange(block)).reshape(-1) for p in positions]


def narrow(positions: Positions, block: int) -> Positions | None:
    """The inverse of ``widen``: None unless every channel covers whole blocks."""
    out = []
    for p in positions:
        if len(p) % block:
            return None
        blocks = np.unique(p // block)
        if not np.array_equal(np.sort(p), (blocks[:, None] * block + np.arange(block)).reshape(-1)):
            return None
        out.append(blocks)
    return out


# -- weighted ops ---------------------------------------------------------------------------------


@register("Conv")
def _conv(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    x, w = node.inputs[0], node.inputs[1]
    weight = dequantized_array(w)
    if weight is None:
        return b.block(node, "Conv weight is not a constant initializer")
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and dequantized_array(bias) is None:
        return b.block(node, "Conv bias is not a constant initializer")
    group = _attr(node, "group", 1)
    cin = _dim(x, 1)
    cout = weight.shape[0]
    depthwise = ops.is_depthwise(node, weight.shape)
    if axis != 1 or port[0] == "in" and port[1] != 0:
        return b.block(
            node, "channels reach a Conv on something other than the channel axis of its input"
        )
    if group > 1 and not depthwise:
        return b.block(
            node,
            f"grouped Conv (group={group}, {cin} input channels) keeps equal channels per group",
        )
    mult = cout // group if depthwise else 1
    if port[0] == "out":
        if depthwise:
            inner = narrow(pos, mult)
            if inner is None:
                return b.block(node, "channels split a depthwise Conv's multiplier block")
            b.take(node, w, 0, pos, "out")
            if bias is not None:
                b.take(node, bias, 0, pos, "out")
            b.group.depthwise.append(node_key(node))
            return b.visit(x, 1, inner, node, ("in", 0))
        b.take(node, w, 0, pos, "out")
        if bias is not None:
            b.take(node, bias, 0, pos, "out")
        return None
    # Entered on the input's channel axis.
    if depthwise:
        outer = widen(pos, mult)
        b.take(node, w, 0, outer, "out")
        if bias is not None:
            b.take(node, bias, 0, outer, "out")
        b.group.depthwise.append(node_key(node))
        return b.visit(node.outputs[0], 1, outer, node)
    b.take(node, w, 1, pos, "in", (node.inputs[0].name, axis))
    return None


@register("ConvTranspose")
def _conv_transpose(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    w = node.inputs[1]
    if dequantized_array(w) is None:
        return b.block(node, "ConvTranspose weight is not a constant initializer")
    if _attr(node, "group", 1) != 1:
        return b.block(node, "grouped ConvTranspose")
    if axis != 1 or port == ("in", 1) or port == ("in", 2):
        return b.block(
            node, "channels reach a ConvTranspose on something other than its channel axis"
        )
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if port[0] == "out":
        if bias is not None and dequantized_array(bias) is None:
            return b.block(node, "ConvTranspose bias is not a constant initializer")
        b.take(node, w, 1, pos, "out")
        if bias is not None:
            b.take(node, bias, 0, pos, "out")
        return None
    b.take(node, w, 0, pos, "in", (node.inputs[0].name, axis))
    return None


@register("Gemm")
def _gemm(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    w = node.inputs[1]
    weight = dequantized_array(w)
    if weight is None or weight.ndim != 2:
        return b.block(node, "Gemm B is not a constant 2-D initializer")
    if _attr(node, "transA", 0):
        return b.block(node, "Gemm with transA=1")
    if port[0] == "in" and port[1] != 0 or axis != 1:
        return b.block(node, "channels reach a Gemm on something other than A's feature axis")
    trans_b = _attr(node, "transB", 0)
    if port[0] == "out":
        b.take(node, w, 0 if trans_b else 1, pos, "out")
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = dequantized_array(node.inputs[2])
            if c is None:
                return b.block(node, "Gemm C is not a constant initializer")
            if c.ndim >= 1 and c.shape[-1] == weight.shape[0 if trans_b else 1] and c.shape[-1] > 1:
                b.take(node, node.inputs[2], c.ndim - 1, pos, "out")
            elif c.ndim == 2 and c.shape[0] > 1:
                return b.block(node, "Gemm C varies along the batch axis")
        return None
    b.take(node, w, 1 if trans_b else 0, pos, "in", (node.inputs[0].name, axis))
    return None


@register("MatMul")
def _matmul(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    a, w = node.inputs[0], node.inputs[1]
    weight = dequantized_array(w)
    if weight is None and w.producer() is not None:
        return _batched_matmul(b, node, port, axis, pos)
    if weight is None or weight.ndim != 2:
        return b.block(node, "MatMul B is not a constant 2-D initializer")
    if port[0] == "out":
        if axis != _rank(node.outputs[0]) - 1:
            return b.block(node, "channels reach a MatMul output on a non-feature axis")
        b.take(node, w, 1, pos, "out")
        return None
    if port[1] != 0 or axis != _rank(a) - 1:
        return b.block(node, "channels reach a MatMul on something other than A's last axis")
    b.take(node, w, 0, pos, "in", (node.inputs[0].name, axis))
    return None


def _batched_matmul(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    """A MatMul of two activations (attention): its batch axes behave elementwise."""
    out = node.outputs[0]
    out_rank = _rank(out)
    ranks = [_rank(v) for v in node.inputs]
    if out_rank is None or None in ranks:
        return b.block(node, "MatMul operand ranks unknown")
    out_axis = axis if port[0] == "out" else axis + (out_rank - ranks[port[1]])
    if out_axis >= out_rank - 2 or out_axis < 0:
        return b.block(node, "channels reach a MatMul of two activations on a matrix axis")
    size = _dim(out, out_axis)
    for i, operand in enumerate(node.inputs):
        if port == ("in", i):
            continue
        a = out_axis - (out_rank - ranks[i])
        dim = operand.shape[a] if a >= 0 else 1
        if dim == 1:
            continue
        if dim != size:
            return b.block(
                node, f"MatMul operand {i} has {dim} on a batch axis where the output has {size}"
            )
        b.visit(operand, a, pos, node, ("in", i))
    if port[0] == "in":
        b.visit(out, out_axis, pos, node)
    return None


# -- per-channel normalisation --------------------------------------------------------------------


def _through(b: GroupBuilder, node: ir.Node, port, axis, pos, data_input: int = 0) -> None:
    """Channels cross ``node`` unchanged from its data input to its first output."""
    if port[0] == "in":
        if port[1] != data_input:
            return b.block(node, f"channels reach {node.op_type} through a parameter input")
        return b.visit(node.outputs[0], axis, pos, node)
    if port[1] != 0:
        return b.block(node, f"channels come out of {node.op_type}'s secondary output")
    return b.visit(node.inputs[data_input], axis, pos, node, ("in", data_input))


@register("BatchNormalization")
def _batchnorm(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    if axis != 1:
        return b.block(node, "channels reach BatchNormalization off its channel axis")
    if _attr(node, "training_mode", 0) or len([o for o in node.outputs if o.uses()]) > 1:
        return b.block(node, "BatchNormalization in training mode")
    for i in range(1, 5):
        if const_array(node.inputs[i]) is None:
            return b.block(node, "BatchNormalization parameters are not constant")
        b.take(node, node.inputs[i], 0, pos, "param")
    return _through(b, node, port, axis, pos)


@register("InstanceNormalization")
def _instancenorm(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    if axis != 1:
        return b.block(node, "channels reach InstanceNormalization off its channel axis")
    for i in (1, 2):
        if const_array(node.inputs[i]) is None:
            return b.block(node, "InstanceNormalization parameters are not constant")
        b.take(node, node.inputs[i], 0, pos, "param")
    return _through(b, node, port, axis, pos)


# -- ops that keep channels where they are ---------------------------------------------------------

_UNARY = (
    "Relu",
    "LeakyRelu",
    "PRelu",
    "Elu",
    "Selu",
    "Celu",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Softplus",
    "Softsign",
    "Gelu",
    "Erf",
    "Mish",
    "ThresholdedRelu",
    "Abs",
    "Neg",
    "Exp",
    "Log",
    "Sqrt",
    "Reciprocal",
    "Floor",
    "Ceil",
    "Round",
    "Sign",
    "Identity",
    "Dropout",
    "Cast",
    "IsNaN",
    "IsInf",
    "Not",
    "Sin",
    "Cos",
    "BitwiseNot",
)


@register(*_UNARY)
def _unary(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    if node.op_type == "Dropout" and len(node.outputs) > 1 and node.outputs[1].uses():
        return b.block(node, "Dropout mask is used")
    if node.op_type == "PRelu":
        if port == ("in", 1):
            return b.block(node, "channels reach PRelu's slope")
        slope = const_array(node.inputs[1])
        if slope is None:
            return b.block(node, "PRelu slope is not constant")
        out_rank = _rank(node.outputs[0])
        slope_axis = axis - (out_rank - slope.ndim)
        if slope_axis >= 0 and slope.shape[slope_axis] > 1:
            b.take(node, node.inputs[1], slope_axis, pos, "param")
    return _through(b, node, port, axis, pos)


@register("Clip")
def _clip(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    for bound in node.inputs[1:]:
        if bound is not None and (const_array(bound) is None or const_array(bound).size != 1):
            return b.block(node, "Clip bounds are not constant scalars")
    return _through(b, node, port, axis, pos)


@register("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool")
def _pool(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    if axis != 1:
        return b.block(node, f"channels reach {node.op_type} off its channel axis")
    if len(node.outputs) > 1 and node.outputs[1].uses():
        return b.block(node, "MaxPool indices are used")
    return _through(b, node, port, axis, pos)


@register("Pad")
def _pad(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    pads = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if pads is None:
        return b.block(node, "Pad amounts are not constant")
    axes = (
        const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    )
    rank = _rank(node.inputs[0])
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
    half = len(pads) // 2
    for i, a in enumerate(axes):
        if a == axis and (pads[i] != 0 or pads[i + half] != 0):
            return b.block(node, "Pad pads the channel axis")
    return _through(b, node, port, axis, pos)


@register("Resize", "Upsample")
def _resize(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    if node.op_type == "Resize" and len(node.inputs) > 3 and node.inputs[3] is not None:
        return b.block(node, "Resize by explicit sizes (the channel count is spelled out)")
    scale_input = 2 if node.op_type == "Resize" else 1
    scales = const_array(node.inputs[scale_input]) if len(node.inputs) > scale_input else None
    if scales is None or scales.size <= axis or scales[axis] != 1:
        return b.block(
            node, f"{node.op_type} scales the channel axis or its scales are not constant"
        )
    return _through(b, node, port, axis, pos)


@register("Transpose")
def _transpose(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    rank = _rank(node.inputs[0])
    perm = _attr(node, "perm", list(range(rank))[::-1])
    if port[0] == "in":
        return b.visit(node.outputs[0], list(perm).index(axis), pos, node)
    return b.visit(node.inputs[0], perm[axis], pos, node, ("in", 0))


# -- elementwise ops joining branches ------------------------------------------------------------


_BINARY = (
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Max",
    "Min",
    "Sum",
    "Mean",
    "Pow",
    "Where",
    "Equal",
    "Less",
    "LessOrEqual",
    "Greater",
    "GreaterOrEqual",
    "And",
    "Or",
    "Xor",
)


@register(*_BINARY)
def _elementwise(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    out = node.outputs[0]
    out_rank = _rank(out)
    if out_rank is None:
        return b.block(node, "output rank unknown")
    out_axis = axis if port[0] == "out" else axis + (out_rank - _rank(node.inputs[port[1]]))
    size = _dim(out, out_axis)
    for i, operand in enumerate(node.inputs):
        if port == ("in", i) or operand is None:
            continue
        rank = _rank(operand)
        if rank is None:
            return b.block(node, f"operand {i} has an unknown rank")
        a = out_axis - (out_rank - rank)
        dim = operand.shape[a] if a >= 0 else 1
        if dim == 1:
            continue  # broadcast along the channel axis: every channel reads the same value
        if dim != size:
            return b.block(node, f"operand {i} has {dim} channels where the output has {size}")
        if const_array(operand) is not None and operand.producer() is None:
            b.take(node, operand, a, pos, "param")
            continue
        b.visit(operand, a, pos, node, ("in", i))
    if port[0] == "in":
        b.visit(out, out_axis, pos, node)


# -- ops that move channels ---------------------------------------------------------------------


@register("Concat")
def _concat(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    out = node.outputs[0]
    rank = _rank(out)
    cat = _attr(node, "axis", 0) % rank
    if axis != cat:
        return _elementwise_same(b, node, port, axis, pos)
    sizes = [_dim(v, cat) for v in node.inputs]
    if any(s is None for s in sizes):
        return b.block(node, "Concat inputs without a static size on the concatenated axis")
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if port[0] == "in":
        return b.visit(out, cat, shift(pos, int(offsets[port[1]])), node)
    # From the output: each input receives the positions that fall inside it.
    for i, value in enumerate(node.inputs):
        lo, hi = offsets[i], offsets[i + 1]
        inside = [p[(p >= lo) & (p < hi)] - lo for p in pos]
        if any(len(x) for x in inside):
            if any(len(x) != len(p) for x, p in zip(inside, pos, strict=True) if len(x)):
                return b.block(node, "a channel straddles two Concat inputs")
            b.visit(value, cat, inside, node, ("in", i))


def _elementwise_same(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    """Every input and the output share the channel axis (Concat/Split along another axis)."""
    for i, value in enumerate(node.inputs):
        if port != ("in", i) and value is not None and _rank(value) == _rank(node.outputs[0]):
            b.visit(value, axis, pos, node, ("in", i))
    for j, value in enumerate(node.outputs):
        if port != ("out", j):
            b.visit(value, axis, pos, node)


@register("Split")
def _split(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    rank = _rank(node.inputs[0])
    split_axis = _attr(node, "axis", 0) % rank
    if axis != split_axis:
        if (
            len(node.inputs) > 1
            and node.inputs[1] is not None
            and const_array(node.inputs[1]) is None
        ):
            return b.block(node, "Split sizes are not constant")
        return _elementwise_same(b, node, port, axis, pos)
    sizes = [_dim(v, axis) for v in node.outputs]
    if any(s is None for s in sizes):
        return b.block(node, "Split outputs without static sizes")
    if len(node.inputs) < 2 or node.inputs[1] is None:
        # Equal parts stay equal when every channel has as many positions in each part (GPT-2's
        # fused q|k|v projection once its heads are tied across the three): checked at the end.
        if len(set(sizes)) != 1:
            return b.block(node, "Split into unequal parts without sizes")
        outs = [v.name for v in node.outputs]

        def equal_parts(spaces):
            parts = [spaces.get((name, axis)) for name in outs]
            if any(p is None for p in parts) or any(
                len({len(p[c]) for p in parts}) != 1 for c in range(len(parts[0]))
            ):
                return "Split into equal parts along the channel axis (the parts would differ after pruning)"
            return None

        b.check_at_end(node, equal_parts)
    elif const_array(node.inputs[1]) is None:
        return b.block(node, "Split sizes are not constant")
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if port[0] == "out":
        return b.visit(node.inputs[0], axis, shift(pos, int(offsets[port[1]])), node, ("in", 0))
    for j, value in enumerate(node.outputs):
        lo, hi = offsets[j], offsets[j + 1]
        inside = [p[(p >= lo) & (p < hi)] - lo for p in pos]
        if any(len(x) for x in inside):
            if any(len(x) != len(p) for x, p in zip(inside, pos, strict=True) if len(x)):
                return b.block(node, "a channel straddles two Split outputs")
            b.visit(value, axis, inside, node)


@register("Flatten")
def _flatten(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    x = node.inputs[0]
    rank = _rank(x)
    f = _attr(node, "axis", 1) % rank if rank else 1
    if port[0] == "in":
        if axis < f:
            return b.block(node, "Flatten folds the channel axis into the batch axis")
        inner = [_dim(x, a) for a in range(axis + 1, rank)]
        between = [_dim(x, a) for a in range(f, axis)]
        if any(d is None for d in inner + between) or between and math.prod(between) != 1:
            return b.block(
                node, "Flatten over dims without static sizes, or with dims before the channel axis"
            )
        return b.visit(node.outputs[0], 1, widen(pos, math.prod(inner)), node)
    inner = [_dim(x, a) for a in range(f + 1, rank)]
    if axis != 1 or any(d is None for d in inner):
        return b.block(node, "channels reach Flatten's output off the feature axis")
    narrowed = narrow(pos, math.prod(inner))
    if narrowed is None:
        return b.block(node, "features of a flattened channel are not removed together")
    return b.visit(x, f, narrowed, node, ("in", 0))


def _merge_by_head(b: GroupBuilder, node: ir.Node, pos: Positions, head_of) -> Positions | None:
    """The group's channels merged so that each holds one head (``head_of(positions)`` gives
    each position's head); channels with no position here stay as they are. None (blocked)
    when a channel spans two heads."""
    heads_of: list[int | None] = []
    for p in pos:
        h = np.unique(head_of(p))
        if len(h) > 1:
            b.block(node, "a channel spans two attention heads")
            return None
        heads_of.append(int(h[0]) if len(h) else None)
    parts: dict = {}
    for c, h in enumerate(heads_of):
        parts.setdefault(("head", h) if h is not None else ("alone", c), []).append(c)
    partition = sorted((np.array(cs) for cs in parts.values()), key=lambda cs: cs[0])
    if any(len(part) > 1 for part in partition):
        pos = b.coarsen(partition)(pos)
    return pos


def _heads(b: GroupBuilder, node: ir.Node, pos: Positions, head: int) -> Positions | None:
    """Positions of whole heads of ``head`` features, merging the group's channels into heads.
    Channels with no position here (the key and value features of a fused q|k|v projection,
    seen on the query's heads) stay as they are."""
    pos = _merge_by_head(b, node, pos, lambda p: p // head)
    if pos is None:
        return None
    narrowed = narrow(pos, head)
    if narrowed is None:
        b.block(node, "attention heads are not removed whole")
    return narrowed


_SHAPE_ARITHMETIC = ("Gather", "Unsqueeze", "Squeeze", "Cast", "Identity", "Concat", "Slice", "Mul")
# the TorchScript exporter's guard of expand(-1): Where(Equal(t, -1), ConstantOfShape(...), t)
_SHAPE_GUARD = ("Where", "Equal", "Shape", "ConstantOfShape")


def channel_count_entry(value: ir.Value) -> tuple[ir.Value, int, int] | None:
    """``(T, axis, k)`` when the one-element shape vector ``value`` is ``k`` times the run-time
    size of ``T``'s ``axis`` (``Unsqueeze(Gather(Shape(T), axis))``, maybe times a constant,
    as the TorchScript exporter writes GQA's ``num_key_value_heads * n_rep``)."""
    factor = 1
    for _ in range(16):
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type in ("Unsqueeze", "Squeeze", "Cast", "Identity") or (
            node.op_type == "Concat" and len(node.inputs) == 1
        ):
            value = node.inputs[0]
        elif node.op_type in ("Mul", "Div"):
            constants = [const_array(v) for v in node.inputs]
            if node.op_type == "Div":
                return None
            k = next((c for c in constants if c is not None and c.size == 1), None)
            if k is None or constants.count(None) != 1:
                return None
            factor *= int(k.reshape(-1)[0])
            value = node.inputs[constants.index(None)]
        elif node.op_type in ("Gather", "Slice") and _attr(node, "axis", 0) == 0:
            index = const_array(node.inputs[1])
            shape = node.inputs[0].producer()
            if index is None or index.size != 1 or shape is None or shape.op_type != "Shape":
                return None
            if node.op_type == "Slice" and (
                _dim(node.outputs[0], 0) != 1 or len(node.inputs) > 4 and node.inputs[4] is not None
            ):
                return None  # one entry, read with step 1 from its start
            tensor = shape.inputs[0]
            rank = _rank(tensor)
            if rank is None:
                return None
            start = _attr(shape, "start", 0)
            start = start + rank if start < 0 else start
            return tensor, (start + int(index.reshape(-1)[0])) % rank, factor
        else:
            return None
    return None


def _follows_channels(node: ir.Node, piece: ir.Value, out: ir.Value, out_axis: int, b):
    """A run-time target dim on the channel axis is fine when it reads the channel count of a
    tensor in the same group (``k`` times it, and each channel takes ``k`` times the positions
    there): pruning then changes both alike. Checked once the group is complete."""
    entry = channel_count_entry(piece)
    if entry is None:
        return False
    tensor, axis, k = entry

    def check(spaces):
        source, here = spaces.get((tensor.name, axis)), spaces.get((out.name, out_axis))
        if source is None or here is None:
            return f"{node.op_type} target reads the size of '{tensor.name}' outside the group"
        if any(len(h) != k * len(s) for h, s in zip(here, source, strict=True)):
            return f"{node.op_type} target reads a size that does not follow the channels"
        return None

    b.check_at_end(node, check)
    return True


def _others_fixed(node: ir.Node, pieces, skip: int, b) -> None:
    """No other target dim may read a channel count of the group at run time: pruning would
    change a dim that must stay (checked once the group is complete)."""
    reads = []
    for i, (value, _, _) in enumerate(pieces):
        if i != skip and const_array(value) is None:
            entry = channel_count_entry(value)
            if entry is not None:
                reads.append((entry[0].name, entry[1]))
    if reads:
        b.check_at_end(
            node,
            lambda spaces: next(
                (
                    f"{node.op_type} target reads the channel count of '{name}' on another axis"
                    for name, ax in reads
                    if (name, ax) in spaces
                ),
                None,
            ),
        )


def _target_dim_follows(b, node: ir.Node, pieces, index: int, out: ir.Value, out_axis: int) -> bool:
    """The Reshape/Expand target dim ``pieces[index]`` that spells the output's channel axis is
    a constant or a run-time read that follows the channels, and no other target dim reads a
    channel count of the group (both checked when the group is complete); blocks otherwise."""
    piece = pieces[index][0]
    if const_array(piece) is None and not (
        _rank(piece) == 1
        and _dim(piece, 0) == 1
        and _follows_channels(node, piece, out, out_axis, b)
    ):
        b.block(node, f"{node.op_type} target dim on the channel axis is computed at run time")
        return False
    _others_fixed(node, pieces, index, b)
    return True


def target_pieces(shape: ir.Value) -> list[tuple[ir.Value, int, int]] | None:
    """Per output axis of a Reshape: (the 1-D tensor that spells it, its position among the
    Concat's inputs, the index inside it); a constant target is one piece at position -1. None
    when the target is neither a constant nor a Concat of 1-D pieces of static length
    (exporters write ``Concat(Shape gathers, [heads], [head size])`` for dynamic axes)."""
    const = const_array(shape)
    if const is not None:
        return [(shape, -1, i) for i in range(const.size)]
    node = target_concat(shape)
    if node is None:
        return None
    pieces = []
    for k, value in enumerate(node.inputs):
        length = _dim(value, 0) if value is not None and _rank(value) == 1 else None
        if length is None:
            return None
        pieces += [(value, k, i) for i in range(length)]
    return pieces


def _node_of(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
        return None
    return node


def target_concat(shape: ir.Value) -> ir.Node | None:
    """The ``Concat`` along axis 0 that spells a shape, seen through the TorchScript exporter's
    guard for ``expand(-1)``: ``Where(Equal(t, -1), ones, t)`` of ``Reshape(t, [-1])``. The
    guard is the identity when no piece can be negative (constants >= 0 and dims read with
    ``Shape``), which is then required."""
    where = _node_of(shape, "Where")
    if where is not None:
        equal = _node_of(where.inputs[0], "Equal")
        if equal is None or equal.inputs[0] is not where.inputs[2]:
            return None
        shape = where.inputs[2]
        flat = _node_of(shape, "Reshape")
        if flat is not None and _rank(flat.inputs[0]) == 1:
            shape = flat.inputs[0]
    node = _node_of(shape, "Concat")
    if node is None or _attr(node, "axis", 0) not in (0, -1):
        return None
    if where is not None:
        for value in node.inputs:
            c = const_array(value)
            if c is None and channel_count_entry(value) is None or c is not None and (c < 0).any():
                return None
    return node


def _proved_same(here: list, there: list) -> bool:
    """Dims before the channel axis are the same on both sides of a Reshape: pairwise provably
    equal, except at most one pair (equal too, since the element counts and the rest agree)."""
    if len(here) != len(there):
        return False
    return sum(not ops.same_dim(a, c) for a, c in zip(here, there, strict=True)) <= 1


@register("Reshape")
def _reshape(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    """Reshapes that keep the dims before the channel axis and regroup only the ones after it.

    After the dims both sides end with (the sequence and head-size axes of attention, static or
    the same symbol) are set aside, what is left from the channel axis on must be static:

    * ``[.., C, X..] -> [.., C, Y..]`` with the same product of the rest: channels stay put;
    * ``[.., C, r..] -> [.., C * prod(r)]`` (Flatten-like, attention heads merged back into
      features, or GQA's key/value heads repeated for their query heads): channel ``c``
      becomes the block ``[c k, (c + 1) k)``;
    * ``[.., D] -> [.., H, Dh..]`` (features split into heads, or a flattened feature axis seen
      from the Gemm side): whole blocks of ``Dh`` features become one position on the new axis;
      when the group's channels are single features they are merged into heads first.

    The output dim on the channel axis is the one that shrinks, so the target must spell it as
    a constant (or ``-1``, or ``0`` copying it); the other pieces may be computed at run time.
    """
    x, out = node.inputs[0], node.outputs[0]
    if port == ("in", 1):
        return b.block(node, "channels reach Reshape's target shape")
    like = shape_source(node.inputs[1])
    if like is not None:
        return _reshape_like(b, node, port, axis, pos, like)
    pieces = target_pieces(node.inputs[1])
    if pieces is None:
        return b.block(
            node,
            "Reshape target shape is neither constant nor a Concat of run-time and constant dims",
        )
    forward = port[0] == "in"
    here_value, there_value = (x, out) if forward else (out, x)
    a = axis
    if len(pieces) != _rank(out):
        return b.block(node, "Reshape target length differs from the output rank")

    def spelled(out_axis: int) -> bool:
        return _target_dim_follows(b, node, pieces, out_axis, out, out_axis)

    here, there = list(here_value.shape), list(there_value.shape)
    target_port = None if forward else ("in", 0)
    # The channel axis and everything after it unchanged (right-aligned), whatever happens to
    # the dims before it (GPT-2's Conv1D flattens batch and sequence around its Gemm).
    k = len(here) - a
    moved = len(there) - k
    if moved >= 0 and all(ops.same_dim(here[a + i], there[moved + i]) for i in range(k)):
        if spelled(moved if forward else a):
            b.visit(there_value, moved, pos, node, target_port)
        return None
    if len(there) > a and _proved_same(here[:a], there[:a]):
        a2 = a
    elif not forward and (split := _split_from(here, there, a)) is not None:
        # back from a middle axis of a split: [.., P, H, I] on H -> [.., P * H * I]
        if spelled(a):
            b.visit(there_value, split, _slabs(pos, here[split:], a - split), node, target_port)
        return None
    else:
        # The dims before the channel axis regrouped too (batch and sequence flattened around
        # a Gemm): the static tail from the channel axis on must match a static tail there,
        # element for element; the element count then makes the leading blocks agree.
        total = math.prod(here[a:]) if all(isinstance(d, int) for d in here[a:]) else None
        fits = [
            k
            for k in range(len(there))
            if total is not None
            and all(isinstance(d, int) for d in there[k:])
            and math.prod(there[k:]) == total
        ]
        if not fits:
            return b.block(node, "Reshape changes the dims before the channel axis")
        a2 = fits[-1]
    if not spelled(a2 if forward else a):
        return None
    tail_here, tail_there = here[a:], there[a2:]
    while (
        len(tail_here) > 1 and len(tail_there) > 1 and ops.same_dim(tail_here[-1], tail_there[-1])
    ):
        tail_here, tail_there = tail_here[:-1], tail_there[:-1]
    if not all(isinstance(d, int) for d in tail_here + tail_there):
        return b.block(node, "Reshape with symbolic dims from the channel axis on")
    if tail_there[0] == tail_here[0] and math.prod(tail_there[1:]) == math.prod(tail_here[1:]):
        return b.visit(there_value, a2, pos, node, target_port)
    if len(tail_there) == 1 and tail_there[0] == math.prod(tail_here):
        return b.visit(there_value, a2, widen(pos, math.prod(tail_here[1:])), node, target_port)
    if len(tail_here) == 1 and len(tail_there) >= 2 and math.prod(tail_there) == tail_here[0]:
        # The heads' axis: the first of the split dims, unless parts are picked along it
        # (``[3, H, Dh]`` of a fused q|k|v projection, sliced, gathered or split into q, k and
        # v after a Transpose): then the next one.
        j = 0
        while forward and j < len(tail_there) - 2 and _parts_taken(there_value, a2 + j):
            j += 1
        if j == 0:
            narrowed = _heads(b, node, pos, math.prod(tail_there[1:]))
        elif spelled(a2 + j):
            narrowed = _middle_heads(b, node, pos, tail_there, j)
        else:
            return None
        if narrowed is not None:
            b.visit(there_value, a2 + j, narrowed, node, target_port)
        return None
    return b.block(node, "Reshape mixes the channel axis with other axes")


def _slab(dims: list[int], j: int, h: int) -> np.ndarray:
    """The flat positions of index ``h`` on axis ``j`` of ``dims``, every other index taken."""
    inner = math.prod(dims[j + 1 :])
    outer = np.arange(math.prod(dims[:j]))[:, None] * dims[j] * inner
    return (outer + h * inner + np.arange(inner)).reshape(-1)


def _slabs(pos: Positions, dims: list[int], j: int) -> Positions:
    """Positions on axis ``j`` of ``dims`` as flat positions over all of them."""
    return [
        np.sort(np.concatenate([_slab(dims, j, int(h)) for h in p]))
        if len(p)
        else np.array([], np.int64)
        for p in pos
    ]


def _middle_heads(b: GroupBuilder, node: ir.Node, pos: Positions, dims: list[int], j: int):
    """Flat features split as ``dims`` with the heads on axis ``j`` (``[3, H, Dh]``, j = 1):
    the group's channels merge by head; each must then hold its head's whole slab (its
    features in every part). Their positions on the heads' axis, or None (blocked)."""
    inner = math.prod(dims[j + 1 :])
    pos = _merge_by_head(b, node, pos, lambda p: (p // inner) % dims[j])
    if pos is None:
        return None
    out = []
    for p in pos:
        if not len(p):
            out.append(p)
            continue
        h = int((p[0] // inner) % dims[j])
        if not np.array_equal(np.sort(p), _slab(dims, j, h)):
            b.block(node, "attention heads are not removed whole")
            return None
        out.append(np.array([h], np.int64))
    return out


def _split_from(here: list, there: list, a: int) -> int | None:
    """The axis ``s`` when ``there`` is ``here`` with its static dims ``s..`` (the channel axis
    ``a`` inside them, not first) flattened into its last one."""
    for s in range(a - 1, -1, -1):
        dims = here[s:]
        if (
            len(there) == s + 1
            and all(isinstance(d, int) for d in dims)
            and there[s] == math.prod(dims)
            and _proved_same(here[:s], there[:s])
        ):
            return s
    return None


def _parts_taken(value: ir.Value, axis: int, depth: int = 4) -> bool:
    """Whether a Slice, Gather or Split reading ``value`` (maybe through Transposes and
    elementwise ops) picks parts along ``axis``."""
    for use in value.uses():
        node = use.node
        rank = _rank(node.inputs[0])
        if use.idx != 0 or node.domain not in ("", "ai.onnx") or rank is None:
            continue
        if node.op_type == "Transpose" and depth:
            perm = list(_attr(node, "perm", list(range(rank))[::-1]))
            if _parts_taken(node.outputs[0], perm.index(axis), depth - 1):
                return True
        elif node.op_type in (*_UNARY, *_BINARY) and depth and _rank(node.outputs[0]) == rank:
            if _parts_taken(node.outputs[0], axis, depth - 1):
                return True
        elif node.op_type in ("Gather", "Split") and _attr(node, "axis", 0) % rank == axis:
            return True
        elif node.op_type == "Slice":
            axes_value = ops.optional_input(node, 3)
            axes = (
                const_array(axes_value)
                if axes_value is not None
                else np.arange(_dim(node.inputs[1], 0) or 0)
            )
            if axes is not None and axis in {int(v) % rank for v in axes.reshape(-1)}:
                return True
    return False


def shape_source(target: ir.Value) -> ir.Value | None:
    """``T`` when a Reshape target is ``Shape(T)``, the whole of it (a reshape to the shape of
    another tensor, as paddle2onnx writes after a scaling)."""
    node = target.producer()
    if node is None or node.op_type != "Shape" or node.domain not in ("", "ai.onnx"):
        return None
    rank = _rank(node.inputs[0])
    if rank is None or _attr(node, "start", 0) != 0 or _attr(node, "end", rank) < rank:
        return None
    return node.inputs[0]


def _reshape_like(b: GroupBuilder, node: ir.Node, port, axis, pos, like: ir.Value) -> None:
    """``Reshape(X, Shape(T))`` where ``X`` and ``T`` have provably the same dims: no change
    of shape, and ``T`` must carry the same channels on that axis (checked once the group is
    complete), so both shrink alike."""
    x, out = node.inputs[0], node.outputs[0]
    if x.shape is None or like.shape is None or out.shape is None:
        return b.block(node, "Reshape to another tensor's shape, of unknown rank")
    if len(x.shape) != len(like.shape) or not all(
        ops.same_dim(d, e) for d, e in zip(x.shape, like.shape, strict=True)
    ):
        return b.block(node, "Reshape to the shape of a tensor whose dims may differ")

    def check(spaces):
        seen = spaces.get((like.name, axis))
        if seen is None or not same_positions(seen, pos):
            return f"Reshape takes its shape from '{like.name}', outside the group"
        return None

    b.check_at_end(node, check)
    if port[0] == "in":
        return b.visit(out, axis, pos, node)
    return b.visit(x, axis, pos, node, ("in", 0))


@register("Gather")
def _gather(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    """Picking along another axis keeps the channels, whatever the indices hold (q, k and v
    taken from a stacked projection; token rows of an embedding table, its features the
    channels); along the channel axis, or channels in the indices, blocks."""
    if port == ("in", 1):
        return b.block(node, "channels reach Gather's indices")
    rank = _rank(node.inputs[0])
    g = _attr(node, "axis", 0) % rank
    index_rank = _rank(node.inputs[1])
    extra = index_rank - 1  # a scalar index removes the axis, k-D indices add k - 1
    if port[0] == "in":
        if axis == g:
            return b.block(node, "Gather picks along the channel axis")
        return b.visit(node.outputs[0], axis if axis < g else axis + extra, pos, node)
    if g <= axis < g + index_rank:
        return b.block(node, "channels on the axes of Gather's indices")
    return b.visit(node.inputs[0], axis if axis < g else axis - extra, pos, node, ("in", 0))


@register("Expand")
def _expand(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    """Broadcasting to a larger shape: channels stay on their axis (counted from the right)
    unless Expand broadcasts that axis itself. The target's dim there must be a constant (the
    rewrite shrinks it, or it is 1 and follows the input)."""
    x, out = node.inputs[0], node.outputs[0]
    if port == ("in", 1):
        return b.block(node, "channels reach Expand's shape")
    offset = _rank(out) - _rank(x)
    out_axis = axis + offset if port[0] == "in" else axis
    in_axis = out_axis - offset
    if in_axis < 0 or _dim(x, in_axis) != _dim(out, out_axis):
        return b.block(node, "Expand broadcasts the channel axis")
    pieces = target_pieces(node.inputs[1])
    index = out_axis - (_rank(out) - len(pieces)) if pieces is not None else -1
    if pieces is None or not 0 <= index < len(pieces):
        return b.block(node, "Expand shape is neither constant nor a Concat of 1-D pieces")
    if not _target_dim_follows(b, node, pieces, index, out, out_axis):
        return None
    if port[0] == "in":
        return b.visit(out, out_axis, pos, node)
    return b.visit(x, in_axis, pos, node, ("in", 0))


@register("Slice")
def _slice(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    """Slicing other axes (rotary embeddings split the head size in halves) keeps the channels;
    slicing the channel axis itself blocks."""
    if port[0] == "in" and port[1] != 0:
        return b.block(node, "channels reach Slice's bounds")
    rank = _rank(node.inputs[0])
    axes_value = ops.optional_input(node, 3)
    if axes_value is not None:
        axes = const_array(axes_value)
        if axes is None:
            return b.block(node, "Slice axes are not constant")
        axes = [int(v) % rank for v in axes.reshape(-1)]
    else:
        count = _dim(node.inputs[1], 0)
        if count is None:
            return b.block(node, "Slice slices an unknown number of axes")
        axes = range(count)
    if axis in axes:
        return b.block(node, "Slice cuts the channel axis")
    return _through(b, node, port, axis, pos)


@register("Squeeze", "Unsqueeze")
def _squeeze(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    x, out = node.inputs[0], node.outputs[0]
    axes = (
        const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    )
    if axes is None:
        return b.block(node, f"{node.op_type} axes are not constant")
    in_rank, out_rank = _rank(x), _rank(out)
    if node.op_type == "Squeeze":
        removed = sorted(int(a) % in_rank for a in axes)
        keep = [i for i in range(in_rank) if i not in removed]
        if port[0] == "in":
            if axis in removed:
                return b.block(node, "Squeeze removes the channel axis")
            return b.visit(out, keep.index(axis), pos, node)
        return b.visit(x, keep[axis], pos, node, ("in", 0))
    added = sorted(int(a) % out_rank for a in axes)
    kept = [i for i in range(out_rank) if i not in added]
    if port[0] == "in":
        return b.visit(out, kept[axis], pos, node)
    if axis in added:
        return b.block(node, "channels on an axis Unsqueeze created")
    return b.visit(x, kept.index(axis), pos, node, ("in", 0))


@register(
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "ReduceMin",
    "ReduceL2",
    "ReduceL1",
    "ReduceProd",
    "ReduceSumSquare",
    "ReduceLogSumExp",
)
def _reduce(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    x = node.inputs[0]
    rank = _rank(x)
    axes_value = node.inputs[1] if len(node.inputs) > 1 else None
    axes = const_array(axes_value) if axes_value is not None else _attr(node, "axes", None)
    if axes is None:
        return b.block(node, f"{node.op_type} reduces over every axis, the channels included")
    axes = [int(a) % rank for a in np.atleast_1d(axes)]
    if (axis if port[0] == "in" else axis) in axes and port[0] == "in":
        return b.block(node, f"{node.op_type} reduces over the channel axis")
    if not _attr(node, "keepdims", 1):
        return b.block(node, f"{node.op_type} with keepdims=0")
    return _through(b, node, port, axis, pos)


@register("Softmax", "LogSoftmax", "LayerNormalization", "LRN", "Hardmax")
def _across_one_axis(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    rank = _rank(node.inputs[0])
    if node.op_type == "LRN":
        if axis == 1:
            return b.block(node, "LRN normalises across channels")
        return _through(b, node, port, axis, pos)
    norm_axis = _attr(node, "axis", -1) % rank
    if node.op_type == "LayerNormalization":
        if axis >= norm_axis:
            return b.block(node, "LayerNormalization normalises over the channel axis")
        if len([o for o in node.outputs if o.uses()]) > 1:
            return b.block(node, "LayerNormalization statistics outputs are used")
        return _through(b, node, port, axis, pos)
    if axis == norm_axis:
        return b.block(node, f"{node.op_type} normalises over the channel axis")
    return _through(b, node, port, axis, pos)


def _entries_read(value: ir.Value) -> set[int] | None:
    """The entries of a 1-D shape vector its readers pick (``Gather`` or ``Slice`` of constant
    indices), or None when some reader takes it whole."""
    length = _dim(value, 0)
    if length is None or value.is_graph_output():
        return None
    read: set[int] = set()
    for use in value.uses():
        node = use.node
        if use.idx != 0 or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Gather" and _attr(node, "axis", 0) == 0:
            index = const_array(node.inputs[1])
            if index is None:
                return None
            read.update(int(i) % length for i in index.reshape(-1))
        elif node.op_type == "Slice":
            bounds = [const_array(v) if v is not None else None for v in node.inputs[1:]]
            if len(bounds) < 2 or bounds[0] is None or bounds[1] is None:
                return None
            if len(bounds) > 2 and bounds[2] is not None and int(bounds[2][0]) not in (0, -1):
                return None
            step = int(bounds[3][0]) if len(bounds) > 3 and bounds[3] is not None else 1
            read.update(range(length)[slice(int(bounds[0][0]), int(bounds[1][0]), step)])
        else:
            return None
    return read


@register("Shape", "Size")
def _shape(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    """Reading a tensor's shape is harmless unless the channel count is read: exporters take
    the batch, sequence or head size of attention tensors to spell later reshapes."""
    if node.op_type == "Shape":
        rank = _rank(node.inputs[0])
        start = _attr(node, "start", 0)
        end = _attr(node, "end", rank)
        start, end = (max(0, min(rank, v + rank if v < 0 else v)) for v in (start, end))
        if not start <= axis < end:
            return None
        read = _entries_read(node.outputs[0])
        if read is not None and axis - start not in read:
            return None
        ends = _shape_readers(node.outputs[0])
        if ends:
            # Read to spell the target of Reshapes/Expands (GQA's repeat of key/value heads):
            # fine when they are in the group and their target dims follow the channels.
            def check(spaces):
                for reader in ends:
                    if not any((reader.outputs[0].name, ax) in spaces for ax in range(8)):
                        return (
                            f"the channel count is read for '{node_key(reader)}', outside the group"
                        )
                return None

            b.check_at_end(node, check)
            return None
    b.block(node, "the channel count is read at run time; pruning would change what it computes")


def _shape_readers(value: ir.Value) -> list[ir.Node] | None:
    """The Reshape/Expand nodes whose targets a shape vector reaches through shape arithmetic
    (Gather, Unsqueeze, Concat, Mul, ...), or None when it reaches anything else."""
    ends: list[ir.Node] = []
    queue, seen = [value], set()
    while queue:
        v = queue.pop()
        if v.is_graph_output():
            return None
        for use in v.uses():
            node = use.node
            if node.domain not in ("", "ai.onnx") or id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in ("Reshape", "Expand") and use.idx == 1:
                ends.append(node)
            elif len(seen) < 256 and (
                node.op_type in (*_SHAPE_ARITHMETIC, *_SHAPE_GUARD)
                or node.op_type == "Reshape"
                and _rank(node.inputs[0]) == 1
            ):
                queue.extend(node.outputs)
            else:
                return None
    return ends


@register("QuantizeLinear", "DequantizeLinear")
def _qdq(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    """Quantized activations: codes keep their channels; per-channel scales follow them."""
    if port[0] == "in" and port[1] != 0:
        return b.block(node, f"channels reach {node.op_type}'s scale or zero-point")
    scale = const_array(node.inputs[1])
    if scale is None:
        return b.block(node, f"{node.op_type} scale is not constant")
    if scale.size > 1:
        rank = _rank(node.inputs[0])
        attr = node.attributes.get("axis")
        if (attr.as_int() if attr is not None else 1) % rank != axis:
            return b.block(node, f"{node.op_type} is per channel on another axis")
        b.take(node, node.inputs[1], 0, pos, "param")
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            b.take(node, node.inputs[2], 0, pos, "param")
    return _through(b, node, port, axis, pos)


# -- onnxruntime's fused ops (com.microsoft) -----------------------------------------------------


@register("BiasGelu", "FastGelu", "BiasAdd", domain=ops.MS_DOMAIN)
def _bias_activation(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    """``act(X + B)`` with ``B`` over the last (hidden) axis; BiasAdd adds a full-shape skip
    input too. Channels on the hidden axis take the bias slice; the skip input follows them."""
    x, out = node.inputs[0], node.outputs[0]
    last = _rank(out) - 1
    if port[0] == "in" and port[1] == 1:
        return b.block(node, f"channels reach {node.op_type}'s bias")
    bias = ops.optional_input(node, 1)
    if bias is not None and axis == last:
        if const_array(bias) is None:
            return b.block(node, f"{node.op_type} bias is not constant")
        b.take(node, bias, 0, pos, "param")
    skip = ops.optional_input(node, 2) if node.op_type == "BiasAdd" else None
    if skip is not None and port != ("in", 2):
        b.visit(skip, axis, pos, node, ("in", 2))
    if port[0] == "in":
        return b.visit(out, axis, pos, node)
    return b.visit(x, axis, pos, node, ("in", 0))


@register("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", domain=ops.MS_DOMAIN)
def _skip_layer_norm(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    """``LayerNorm(input + skip + bias)`` over the last (hidden) axis; output 3 (when present)
    is the sum before normalisation. The hidden axis is normalised over and stays whole, so
    channels may cross only on the other axes, from the input or skip to both outputs."""
    out = node.outputs[0]
    if axis == _rank(out) - 1:
        return b.block(node, f"{node.op_type} normalises over the channel axis")
    if port[0] == "in" and port[1] > 1 or port[0] == "out" and port[1] in (1, 2):
        return b.block(node, f"channels reach {node.op_type}'s parameters or statistics")
    if any(len(node.outputs) > j and node.outputs[j].uses() for j in (1, 2)):
        return b.block(node, f"{node.op_type} statistics outputs are used")
    for i in (0, 1):
        if port != ("in", i):
            b.visit(node.inputs[i], axis, pos, node, ("in", i))
    for j in (0, 3):
        if port != ("out", j) and len(node.outputs) > j:
            b.visit(node.outputs[j], axis, pos, node)
    return None
