"""Shared plumbing for the trainable twins of ``gradients.py`` and ``recover.py``.

* ``scalar_loss``: adds the loss terms of a twin into one scalar and makes it the twin's only
  output (``generate_artifacts`` with ``loss=None`` takes the first output as the loss).
* ``differentiable`` and ``fix_batch``: rewrites that onnxruntime-training 1.19 needs.

The twins run in the training engine's worker process (``onnxzip.engine.run_job``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxzip.errors import InputError
from onnxzip.passes import add_initializer, bulk_edit, const_array, replace_node


def scalar_loss(graph: ir.Graph, terms: list[ir.Value], prefix: str) -> ir.Value:
    """Sums ``terms`` and makes the sum the graph's only output."""
    if not terms:
        raise InputError(f"{prefix}: the model has no float output to take a loss on")
    total = terms[0]
    for j, term in enumerate(terms[1:]):
        add = ir.node("Add", [total, term], name=f"{prefix}_total_{j}")
        add.outputs[0].name = add.name
        graph.append(add)
        total = add.outputs[0]
    total.type = ir.TensorType(ir.DataType.FLOAT)
    total.shape = ir.Shape([])
    graph.outputs.clear()
    graph.outputs.append(total)
    return total


def _const(graph: ir.Graph, name: str, value: float) -> ir.Value:
    return add_initializer(graph, name, np.array(value, np.float32))


@bulk_edit
def differentiable(model: ir.Model) -> list[str]:
    """Rewrites ops onnxruntime-training 1.19 has no gradient builder for into ops it has.

    HardSwish(x) = x * Clip(x + 3, 0, 6) / 6; HardSigmoid(x) = Clip(alpha x + beta, 0, 1);
    PRelu(x, s) = Relu(x) - s * Relu(-x); Sum of n > 2 inputs = a chain of Add; nearest
    Resize by integer factors = Unsqueeze, Expand, Reshape (element i reads i // f); a
    LayerNormalization with one output gets its mean and inverse-deviation outputs declared;
    ConvTranspose = a stride-1 Conv of the zero-upsampled input with the flipped, transposed
    kernel (``ConvTransposeGrad`` has no CPU kernel in 1.19).
    Returns the rewritten op types. Exact up to float rounding; callers check the outputs.
    """
    graph = model.graph
    done = []
    for i, node in enumerate(list(graph)):
        if node.domain not in ("", "ai.onnx"):
            continue
        op = node.op_type
        p = f"grad_rewrite_{i}"
        if op == "HardSwish":
            x = node.inputs[0]
            shifted = ir.node("Add", [x, _const(graph, f"{p}_3", 3.0)], name=f"{p}_add")
            clipped = ir.node(
                "Clip",
                [shifted.outputs[0], _const(graph, f"{p}_0", 0.0), _const(graph, f"{p}_6", 6.0)],
                name=f"{p}_clip",
            )
            scaled = ir.node(
                "Mul",
                [clipped.outputs[0], _const(graph, f"{p}_sixth", 1.0 / 6.0)],
                name=f"{p}_scale",
            )
            out = ir.node("Mul", [x, scaled.outputs[0]], name=f"{p}_mul")
            replace_node(graph, node, [shifted, clipped, scaled, out], out.outputs[0])
        elif op == "HardSigmoid":
            alpha = node.attributes["alpha"].as_float() if "alpha" in node.attributes else 0.2
            beta = node.attributes["beta"].as_float() if "beta" in node.attributes else 0.5
            mul = ir.node(
                "Mul", [node.inputs[0], _const(graph, f"{p}_alpha", alpha)], name=f"{p}_mul"
            )
            add = ir.node(
                "Add", [mul.outputs[0], _const(graph, f"{p}_beta", beta)], name=f"{p}_add"
            )
            out = ir.node(
                "Clip",
                [add.outputs[0], _const(graph, f"{p}_0", 0.0), _const(graph, f"{p}_1", 1.0)],
                name=f"{p}_clip",
            )
            replace_node(graph, node, [mul, add, out], out.outputs[0])
        elif op == "PRelu":
            x, slope = node.inputs[0], node.inputs[1]
            pos = ir.node("Relu", [x], name=f"{p}_pos")
            neg_x = ir.node("Neg", [x], name=f"{p}_negx")
            neg = ir.node("Relu", [neg_x.outputs[0]], name=f"{p}_neg")
            scaled = ir.node("Mul", [slope, neg.outputs[0]], name=f"{p}_scaled")
            out = ir.node("Sub", [pos.outputs[0], scaled.outputs[0]], name=f"{p}_sub")
            replace_node(graph, node, [pos, neg_x, neg, scaled, out], out.outputs[0])
        elif op == "LayerNormalization" and len(node.outputs) == 1:
            # Its gradient builder reads the mean and inverse deviation outputs: declare them.
            node.resize_outputs(3)
            node.outputs[1].name = f"{p}_mean"
            node.outputs[2].name = f"{p}_inv_std"
        elif op == "Resize" and _integer_nearest(node) is not None:
            # Nearest upsampling by integer factors repeats each element: Unsqueeze an axis of
            # size 1 after each scaled axis, Expand it to the factor, Reshape to the product.
            # Expand and Reshape have gradients (ResizeGrad has no CPU kernel in 1.19).
            x, factors = node.inputs[0], _integer_nearest(node)
            scaled = [a for a, f in enumerate(factors) if f > 1]
            after = [a + 1 + k for k, a in enumerate(scaled)]
            unsq = ir.node(
                "Unsqueeze",
                [x, add_initializer(graph, f"{p}_axes", np.array(after, np.int64))],
                name=f"{p}_unsqueeze",
            )
            repeat = [1] * (len(factors) + len(scaled))
            for k, a in enumerate(scaled):
                repeat[a + 1 + k] = factors[a]
            expand = ir.node(
                "Expand",
                [
                    unsq.outputs[0],
                    add_initializer(graph, f"{p}_repeat", np.array(repeat, np.int64)),
                ],
                name=f"{p}_expand",
            )
            shape = ir.node("Shape", [x], name=f"{p}_shape")
            target = ir.node(
                "Mul",
                [
                    shape.outputs[0],
                    add_initializer(graph, f"{p}_factors", np.array(factors, np.int64)),
                ],
                name=f"{p}_target",
            )
            out = ir.node("Reshape", [expand.outputs[0], target.outputs[0]], name=f"{p}_reshape")
            replace_node(graph, node, [unsq, expand, shape, target, out], out.outputs[0])
        elif op == "ConvTranspose" and (made := _conv_transpose_as_conv(graph, node, p)):
            replace_node(graph, node, *made)
        elif op == "Sum" and len(node.inputs) > 2:
            adds, total = [], node.inputs[0]
            for j, term in enumerate(node.inputs[1:]):
                add = ir.node("Add", [total, term], name=f"{p}_add{j}")
                adds.append(add)
                total = add.outputs[0]
            replace_node(graph, node, adds, total)
        else:
            continue
        done.append(op)
    for node in graph:
        for value in node.outputs:
            if value.name is None:
                value.name = f"{node.name}_out"
    return done


@bulk_edit
def unshare_weights(model: ir.Model, trainable) -> int:
    """Gives every reader but the first of a frozen float initializer read more than once its
    own copy of it, as a separate initializer.

    onnxruntime-training 1.19 names the gradient outputs of ops whose gradient node emits every
    input's gradient at once (``LayerNormalizationGrad``: dX, dScale, dBias) after the input
    itself, once per reader: a scale shared by several LayerNormalizations (the dynamo exporter
    merges equal initializers, so every freshly initialised norm of a vision transformer reads
    one tensor) makes a graph with ``Duplicate definition of name (W_grad)``, frozen or not.
    ``Identity`` copies do not help: onnxruntime merges identical nodes before it builds the
    gradient. A frozen weight is never written back, so separate copies are exact; trainable
    weights (``trainable``) stay shared, so tied weights stay tied. Returns the copies made.
    """
    graph = model.graph
    keep = set(trainable)
    made = 0
    for name, value in list(graph.initializers.items()):
        if name in keep or value.dtype is None or not value.dtype.is_floating_point():
            continue
        if value.const_value is None:
            continue
        uses = [(node, i) for node, i in value.uses() if node.graph is graph]
        for node, i in uses[1:]:
            copy = add_initializer(graph, f"{name}_copy", value.const_value.numpy())
            node.replace_input_with(i, copy)
            made += 1
    return made


CONTROL_FLOW = ("If", "Loop", "Scan")


def control_flow_on_gradient_path(model: ir.Model, trainable: list[str]) -> str | None:
    """The first If/Loop/Scan of the main graph that reads (itself, or from a body) a value
    computed from the ``trainable`` weights, or None. onnxruntime-training 1.19 has no gradient
    for control flow, and its gradient builder aborts the process on one (SIGABRT) instead of
    refusing it: such a twin is refused here, by name."""
    graph = model.graph
    reached = {id(graph.initializers[n]) for n in trainable if n in graph.initializers}
    for node in graph:  # topological order
        reads = list(node.inputs)
        for attr in node.attributes.values():  # bodies read outer values by reference
            bodies = (
                [attr.as_graph()]
                if attr.type == ir.AttributeType.GRAPH
                else list(attr.as_graphs())
                if attr.type == ir.AttributeType.GRAPHS
                else []
            )
            for body in bodies:
                reads += [
                    v for inner in ir.traversal.RecursiveGraphIterator(body) for v in inner.inputs
                ]
        if any(v is not None and id(v) in reached for v in reads):
            if node.op_type in CONTROL_FLOW and node.domain in ("", "ai.onnx"):
                return node.op_type
            reached.update(id(v) for v in node.outputs)
    return None


def _ints(node: ir.Node, name: str, default: list[int]) -> list[int]:
    a = node.attributes.get(name)
    return list(a.as_ints()) if a is not None else default


def _conv_transpose_as_conv(graph: ir.Graph, node: ir.Node, p: str):
    """``ConvTranspose(x, W, B)`` as ops that have gradient builders, or None where the
    attributes are outside what the rewrite spells (auto_pad, output_shape).

    Along each spatial axis of stride ``s``, kernel ``k``, dilation ``d``, pads ``b, e`` and
    output padding ``o``: insert ``s - 1`` zeros after every input element (Unsqueeze an axis
    of 1 after it, Pad it to ``s``, Reshape the pair into one axis), keep ``d (k - 1) - b``
    zeros before and ``d (k - 1) - e + o - (s - 1)`` after (Pad where positive, Slice where
    negative), then a stride-1 Conv with dilation ``d`` whose kernel is ``W`` with input and
    output channels swapped per group and every spatial axis reversed (Reshape, Transpose,
    Gather with reversed indices: the trained weight stays ``W``). The output length is
    ``s (L - 1) + 1 + 2 d (k - 1) - b - e + o - d (k - 1)``, ConvTranspose's.
    """
    x, w = node.inputs[0], node.inputs[1]
    kernel = const_array(w)
    if x is None or x.shape is None or kernel is None or kernel.ndim < 3:
        return None
    if "output_shape" in node.attributes:
        return None
    auto_pad = node.attributes.get("auto_pad")
    if auto_pad is not None and auto_pad.as_string() not in ("NOTSET", ""):
        return None
    rank = kernel.ndim - 2
    if len(x.shape) != rank + 2:
        return None
    k = list(kernel.shape[2:])
    strides = _ints(node, "strides", [1] * rank)
    dilations = _ints(node, "dilations", [1] * rank)
    pads = _ints(node, "pads", [0] * (2 * rank))
    extra = _ints(node, "output_padding", [0] * rank)
    group = node.attributes["group"].as_int() if "group" in node.attributes else 1
    ci, co_g = kernel.shape[0], kernel.shape[1]
    if ci % group:
        return None
    made: list[ir.Node] = []

    def add(op, inputs, **attributes):
        n = ir.node(op, inputs, attributes=attributes or None, name=f"{p}_{len(made)}")
        made.append(n)
        return n.outputs[0]

    def const(name, values):
        return add_initializer(graph, f"{p}_{name}", np.asarray(values, np.int64))

    # zero insertion: [N, C, L1, ..] -> [N, C, L1, 1, L2, 1, ..] -> pad each 1 to s -> merge
    y = x
    if any(s > 1 for s in strides):
        axes = [3 + 2 * i for i in range(rank)]
        y = add("Unsqueeze", [y, const("axes", axes)])
        pad_end = [0] * (2 + 2 * rank)
        for i, s in enumerate(strides):
            pad_end[3 + 2 * i] = s - 1
        y = add("Pad", [y, const("zeros", [0] * (2 + 2 * rank) + pad_end)])
        shape = add("Shape", [x])
        target = add("Mul", [shape, const("strides", [1, 1, *strides])])
        y = add("Reshape", [y, target])
    before = [d * (kk - 1) - pads[i] for i, (d, kk) in enumerate(zip(dilations, k, strict=True))]
    after = [
        d * (kk - 1) - pads[rank + i] + extra[i] - (s - 1)
        for i, (d, kk, s) in enumerate(zip(dilations, k, strides, strict=True))
    ]
    crop_begin = [max(0, -v) for v in before]
    crop_end = [max(0, -v) for v in after]
    if any(crop_begin) or any(crop_end):
        axes = list(range(2, rank + 2))
        ends = [-v if v else np.iinfo(np.int64).max for v in crop_end]
        y = add("Slice", [y, const("starts", crop_begin), const("ends", ends), const("sax", axes)])
    grow = [max(0, v) for v in before] + [max(0, v) for v in after]
    if any(grow):
        y = add("Pad", [y, const("pads", [0, 0] + grow[:rank] + [0, 0] + grow[rank:])])
    # kernel: [Ci, Co/g, k..] -> [g, Ci/g, Co/g, k..] -> [g, Co/g, Ci/g, k..] -> [Co, Ci/g, k..]
    kern = add("Reshape", [w, const("wsplit", [group, ci // group, co_g, *k])])
    kern = add("Transpose", [kern], perm=[0, 2, 1, *range(3, rank + 3)])
    kern = add("Reshape", [kern, const("wmerge", [group * co_g, ci // group, *k])])
    for i, kk in enumerate(k):
        if kk > 1:
            kern = add("Gather", [kern, const(f"flip{i}", list(range(kk - 1, -1, -1)))], axis=2 + i)
    inputs = [y, kern]
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        inputs.append(node.inputs[2])
    out = add("Conv", inputs, dilations=dilations, group=group)
    return made, out


def _integer_nearest(node: ir.Node) -> list[int] | None:
    """The integer factors of a Resize that repeats each element: nearest mode, constant
    integer scales, and a coordinate mapping under which output ``i`` reads input ``i // f``
    (asymmetric with floor or round-prefer-floor rounding); None otherwise."""

    def attr(name: str, default: str) -> str:
        a = node.attributes.get(name)
        return a.as_string() if a is not None else default

    if attr("mode", "nearest") != "nearest" or len(node.inputs) < 3:
        return None
    if attr("coordinate_transformation_mode", "half_pixel") != "asymmetric":
        return None
    if attr("nearest_mode", "round_prefer_floor") not in ("floor", "round_prefer_floor"):
        return None
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        return None  # sizes given: factors are not spelled out
    scales = const_array(node.inputs[2])
    if scales is None or scales.size == 0 or node.inputs[0].shape is None:
        return None
    if scales.size != len(node.inputs[0].shape):
        return None
    factors = [int(round(float(v))) for v in scales]
    if any(f < 1 or abs(f - float(v)) > 1e-6 for f, v in zip(factors, scales, strict=True)):
        return None
    if all(f == 1 for f in factors):
        return None
    return factors


def fix_batch(model: ir.Model, batch: int, samples=None) -> bool:
    """Fixes the graph inputs' dimensions that onnxruntime-training 1.19's pooling gradients
    need static: MaxPool's and AveragePool's gradients crash (SIGSEGV) on symbolic spatial
    dimensions, and AveragePool's mis-sizes a symbolic batch (even crashing with SIGFPE). The
    non-batch dimensions are taken from ``samples`` (their first batch), the batch is fixed to
    ``batch`` where an AveragePool needs it. Returns whether the batch was fixed."""
    pools = {n.op_type for n in model.graph if n.domain in ("", "ai.onnx")}
    pools &= {"MaxPool", "AveragePool"}
    if not pools:
        return False
    observed = {}
    if samples is not None:
        first = next(iter(samples.batches(1)), None)
        if first is not None:
            observed = {k: np.shape(v) for k, v in first.inputs.items()}
    changed = batch_fixed = False
    for value in model.graph.inputs:
        if value.shape is None or not len(value.shape):
            continue
        dims = list(value.shape)
        seen = observed.get(value.name)
        if seen is not None and len(seen) == len(dims):
            for axis in range(1, len(dims)):
                if not isinstance(dims[axis], int):
                    dims[axis] = int(seen[axis])
        if "AveragePool" in pools and not isinstance(dims[0], int):
            dims[0] = batch
            batch_fixed = True
        if dims != list(value.shape):
            value.shape = ir.Shape(dims)
            changed = True
    if changed:  # stale symbolic shapes downstream would contradict the fixed dimensions
        for node in model.graph:
            for value in node.outputs:
                if not value.is_graph_output():
                    value.shape = None
    return batch_fixed
