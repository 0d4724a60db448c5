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
    LayerNormalization with one output gets its mean and inverse-deviation outputs declared.
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
