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
from onnxzip.pruning.groups import GroupBuilder, Positions

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


@register("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "Where")
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
        return b.block(
            node,
            "Split into equal parts along the channel axis (the parts would differ after pruning)",
        )
    if const_array(node.inputs[1]) is None:
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


def _heads(b: GroupBuilder, node: ir.Node, pos: Positions, head: int) -> Positions | None:
    """Positions of whole heads of ``head`` features, merging the group's channels into heads."""
    heads_of = []
    for p in pos:
        h = np.unique(p // head)
        if len(h) != 1:
            b.block(node, "a channel spans two attention heads")
            return None
        heads_of.append(int(h[0]))
    order = sorted(set(heads_of))
    partition = [np.array([c for c, h in enumerate(heads_of) if h == k]) for k in order]
    if any(len(part) > 1 for part in partition):
        merge = b.coarsen(partition)
        pos = merge(pos)
    narrowed = narrow(pos, head)
    if narrowed is None:
        b.block(node, "attention heads are not removed whole")
    return narrowed


def target_pieces(shape: ir.Value) -> list[tuple[ir.Value, int, int]] | None:
    """Per output axis of a Reshape: (the 1-D tensor that spells it, its position among the
    Concat's inputs, the index inside it); a constant target is one piece at position -1. None
    when the target is neither a constant nor a Concat of 1-D pieces of static length
    (exporters write ``Concat(Shape gathers, [heads], [head size])`` for dynamic axes)."""
    const = const_array(shape)
    if const is not None:
        return [(shape, -1, i) for i in range(const.size)]
    node = shape.producer()
    if node is None or node.op_type != "Concat" or node.domain not in ("", "ai.onnx"):
        return None
    if _attr(node, "axis", 0) not in (0, -1):
        return None
    pieces = []
    for k, value in enumerate(node.inputs):
        length = _dim(value, 0) if value is not None and _rank(value) == 1 else None
        if length is None:
            return None
        pieces += [(value, k, i) for i in range(length)]
    return pieces


@register("Reshape")
def _reshape(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    """Reshapes that keep the dims before the channel axis and regroup only the ones after it.

    * ``[.., C, X..] -> [.., C, Y..]`` with the same product of the rest: channels stay put;
    * ``[.., C, r..] -> [.., C * prod(r)]`` (Flatten-like, or attention heads merged back into
      features): channel ``c`` becomes the block ``[c k, (c + 1) k)``;
    * ``[.., D] -> [.., H, Dh..]`` (features split into heads, or a flattened feature axis seen
      from the Gemm side): whole blocks of ``Dh`` features become one position on the new axis;
      when the group's channels are single features they are merged into heads first.
    """
    x, out = node.inputs[0], node.outputs[0]
    pieces = target_pieces(node.inputs[1])
    if pieces is None:
        return b.block(
            node,
            "Reshape target shape is neither constant nor a Concat of run-time and constant dims",
        )
    if any(const_array(value) is None for value, _, _ in pieces[axis:]):
        return b.block(
            node, "Reshape target dims from the channel axis on are computed at run time"
        )
    forward = port[0] == "in"
    here_value, there_value = (x, out) if forward else (out, x)
    here = [_dim(here_value, d) for d in range(_rank(here_value))]
    there = [_dim(there_value, d) for d in range(_rank(there_value))]
    a = axis
    if any(d is None for d in here[a:]) or any(d is None for d in there[a:]):
        return b.block(node, "Reshape with symbolic dims from the channel axis on")
    if len(there) <= a or here[:a] != there[:a]:
        return b.block(node, "Reshape changes the dims before the channel axis")
    tail_here, tail_there = here[a:], there[a:]
    target_port = None if forward else ("in", 0)
    if tail_there[0] == tail_here[0] and math.prod(tail_there[1:]) == math.prod(tail_here[1:]):
        return b.visit(there_value, a, pos, node, target_port)
    if len(tail_there) == 1 and tail_there[0] == math.prod(tail_here):
        return b.visit(there_value, a, widen(pos, math.prod(tail_here[1:])), node, target_port)
    if len(tail_here) == 1 and len(tail_there) >= 2 and math.prod(tail_there) == tail_here[0]:
        narrowed = _heads(b, node, pos, math.prod(tail_there[1:]))
        if narrowed is not None:
            b.visit(there_value, a, narrowed, node, target_port)
        return None
    return b.block(node, "Reshape mixes the channel axis with other axes")


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


@register("Shape", "Size")
def _shape(b: GroupBuilder, node: ir.Node, port, axis, pos) -> None:
    b.block(node, "the tensor's shape is read at run time; pruning would change what it computes")


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
