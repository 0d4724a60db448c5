"""Shared plumbing for the trainable twins of ``gradients.py`` and ``recover.py``.

* ``scalar_loss``: adds the loss terms of a twin into one scalar and makes it the twin's only
  output (``generate_artifacts`` with ``loss=None`` takes the first output as the loss).
* ``differentiable`` and ``fix_batch``: rewrites that onnxruntime-training 1.19 needs.

The twins run in the training engine's worker process (``onnxzip.engine.run_job``).
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir

from onnxzip.errors import InputError, ModelError
from onnxzip.ir import ops
from onnxzip.ir.ops import attr
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


def differentiable(model: ir.Model, samples=None) -> list[str]:
    """Rewrites ops onnxruntime-training 1.19 has no gradient builder for into ops it has.

    HardSwish(x) = x * Clip(x + 3, 0, 6) / 6; HardSigmoid(x) = Clip(alpha x + beta, 0, 1);
    PRelu(x, s) = Relu(x) - s * Relu(-x); Sum of n > 2 inputs = a chain of Add; nearest
    Resize by integer factors = Unsqueeze, Expand, Reshape (element i reads i // f); any other
    Resize of the last two axes (bilinear, bicubic, nearest at any scale or coordinate mode) =
    one MatMul per resized axis with its interpolation matrix (``_resize_as_matmuls``; sizes
    from the graph, else from the first sample of ``samples``, whose height and width the
    twin's inputs then take); InstanceNormalization = its statistics in ReduceMean, Sub, Mul,
    Sqrt, Div (no gradient builder in 1.19; GroupNorm exports as one); a LayerNormalization
    with one output gets its mean and inverse-deviation outputs declared; ConvTranspose = a
    stride-1 Conv of the zero-upsampled input with the flipped, transposed kernel
    (``ConvTransposeGrad`` has no CPU kernel in 1.19).
    Returns the rewritten op types. Exact up to float rounding; callers check the outputs.
    """
    observed = _observed_resize_inputs(model, samples)
    return _differentiable(model, observed)


@bulk_edit
def _differentiable(model: ir.Model, observed: dict) -> list[str]:
    graph = model.graph
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
    done = []
    used_observed = False
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
        elif op == "Resize" and (made := _resize_as_matmuls(graph, node, p, opset, observed)):
            replace_node(graph, node, *made[:2])
            used_observed |= made[2]
        elif op == "ConvTranspose" and (made := _conv_transpose_as_conv(graph, node, p)):
            replace_node(graph, node, *made)
        elif op in _SPELLED and (made := _SPELLED[op](_Spell(graph, p, opset), node)):
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
    if used_observed:  # the matrices hold the samples' sizes: so do the twin's inputs
        _fix_inputs(model, observed.get(_INPUT_SHAPES, {}))
    return done


_INPUT_SHAPES = object()  # key of the observed graph-input shapes in ``observed``
_RESIZE_MODES = ("nearest", "linear", "cubic")


def _resize_candidate(node: ir.Node) -> bool:
    """Whether ``_resize_as_matmuls`` may rewrite this Resize (the integer-nearest rewrite
    aside): a mode whose map is linear in the input, over the axes the inputs name."""
    if node.op_type != "Resize" or node.domain not in ("", "ai.onnx"):
        return False
    if _integer_nearest(node) is not None or len(node.inputs) < 3:
        return False
    if attr(node, "mode", "nearest") not in _RESIZE_MODES:
        return False
    if attr(node, "coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize":
        return False  # extrapolates a constant outside the box: affine, not linear
    if "axes" in node.attributes:
        return False
    return attr(node, "keep_aspect_ratio_policy", "stretch") == "stretch"


def _observed_resize_inputs(model: ir.Model, samples) -> dict:
    """Shapes of the inputs of the Resizes whose sizes the graph leaves open, seen on one
    sample (with the graph inputs' shapes under ``_INPUT_SHAPES``); empty without samples."""
    wanted = []
    for n in model.graph:
        if not _resize_candidate(n) or n.inputs[0] is None or not n.inputs[0].name:
            continue
        x = n.inputs[0]
        if x.shape is None or not all(isinstance(d, int) for d in list(x.shape)[-2:]):
            wanted.append(x.name)
        if _resize_spec(n) is None and n.outputs[0].name:  # sizes computed at run time
            wanted.append(n.outputs[0].name)
    if not wanted or samples is None:
        return {}
    from onnxzip.runtime import Runner  # a session of its own, only when needed

    first = next(iter(samples.batches(1)), None)
    if first is None:
        return {}
    probe = model.clone()
    values = {v.name: v for n in probe.graph for v in n.outputs if v.name}
    values.update({v.name: v for v in probe.graph.inputs})
    existing = {v.name for v in probe.graph.outputs}
    for name in wanted:
        if name in values and name not in existing:
            probe.graph.outputs.append(values[name])
    try:
        out = Runner(probe, name="resize sizes", optimization="none").run(first, wanted)
    except ModelError:  # no observation: those Resizes stay (and the recovery says why)
        return {}
    observed = {name: tuple(np.shape(array)) for name, array in out.items()}
    observed[_INPUT_SHAPES] = {k: np.shape(v) for k, v in first.inputs.items()}
    return observed


def _resize_spec(node: ir.Node) -> tuple[bool, list] | None:
    """(True, sizes) or (False, scales) of a Resize whose sizes or scales are constants."""
    scales = const_array(node.inputs[2]) if node.inputs[2] is not None else None
    sizes = (
        const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    )
    if sizes is not None and sizes.size:
        return True, [int(v) for v in sizes]
    if scales is not None and scales.size:
        return False, [float(v) for v in scales]
    return None


def _interpolation(node: ir.Node, opset: int, length: int, spec: float, by_sizes: bool):
    """The matrix ``A^T`` ([length, out]) of ``node``'s Resize along one axis of ``length``:
    onnxruntime's own Resize, with the node's attributes, applied to the unit vectors (an input
    ``[1, L, 1, L]`` holding the identity, only the last axis resized by ``spec``, a scale or
    an output size). Nearest, linear and cubic interpolation are separable, so the Resize of
    several axes is the product of these per-axis maps. One session per distinct map: a feature
    pyramid's Resizes, and every recovery attempt of a search, ask for the same few."""
    key = tuple(
        sorted(
            (a.name, a.type, tuple(a.value) if isinstance(a.value, list) else a.value)
            for a in node.attributes.values()
        )
    )
    return _interpolation_matrix(key, opset, length, spec, by_sizes).copy()


@functools.lru_cache(maxsize=64)
def _interpolation_matrix(attributes: tuple, opset: int, length: int, spec, by_sizes: bool):
    from onnxzip.runtime import Runner

    x = ir.Value(
        name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, length, 1, length])
    )
    if by_sizes:
        extra = [
            None,
            None,
            ir.Value(name="sizes", const_value=ir.tensor(np.array([1, length, 1, int(spec)]))),
        ]
    else:
        scales = np.array([1, 1, 1, spec], np.float32)
        extra = [
            ir.Value(name="roi", const_value=ir.tensor(np.zeros(0, np.float32))),
            ir.Value(name="scales", const_value=ir.tensor(scales)),
        ]
    resize = ir.Node("", "Resize", [x, *extra], [ir.Attr(*a) for a in attributes], name="resize")
    resize.outputs[0].name = "y"
    graph = ir.Graph(
        [x],
        [resize.outputs[0]],
        nodes=[resize],
        initializers=[v for v in extra if v is not None],
        opset_imports={"": opset},
    )
    model = ir.Model(graph, ir_version=8 if opset < 19 else 9)
    from onnxzip.data import Batch

    eye = np.eye(length, dtype=np.float32).reshape(1, length, 1, length)
    y = Runner(model, name="interpolation", optimization="none").run(Batch({"x": eye}))["y"]
    return np.ascontiguousarray(y[0, :, 0, :])


def _resize_as_matmuls(graph: ir.Graph, node: ir.Node, p: str, opset: int, observed: dict):
    """``Resize(x)`` of the last two axes as ``A_h @ x @ A_w^T`` (MatMul broadcasts ``A_h``
    over the leading axes), with the interpolation matrices of ``_interpolation``; None where
    the rewrite does not apply (another mode, other axes, sizes unknown). onnxruntime-training
    1.19 has no CPU kernel for ``ResizeGrad``: every recovery of a model with bilinear
    upsampling (segmentation decoders, feature pyramids) stopped there. Returns (nodes, output,
    whether the sizes came from the samples)."""
    if opset < 11 or not _resize_candidate(node):
        return None
    x = node.inputs[0]
    dims = list(x.shape) if x.shape is not None else None
    from_samples = False
    if dims is None or not all(isinstance(d, int) for d in dims[-2:]):
        seen = observed.get(x.name)
        if seen is None:
            return None
        dims, from_samples = list(seen), True
    rank = len(dims)
    if rank < 3:
        return None
    given = _resize_spec(node)
    if given is None:  # sizes computed at run time (Concat of Shape reads and constants)
        seen = observed.get(node.outputs[0].name)
        if seen is None or len(seen) != rank:
            return None
        given, from_samples = (True, [int(v) for v in seen]), True
    by_sizes, spec = given
    if len(spec) != rank:
        return None
    # only the last two axes may change (leading dims may be symbolic: the twin's outputs
    # are checked against the model's before any step)
    for a in range(rank - 2):
        if by_sizes and isinstance(dims[a], int) and spec[a] != dims[a]:
            return None
        if not by_sizes and spec[a] != 1.0:
            return None
    nodes, current = [], x
    for a in (rank - 1, rank - 2):  # the last axis first
        matrix = _interpolation(node, opset, int(dims[a]), spec[a], by_sizes)  # [L, L']
        if matrix.shape[0] == matrix.shape[1] and np.array_equal(matrix, np.eye(len(matrix))):
            continue  # this axis keeps its size and its values (a Resize to the same size)
        if a == rank - 1:
            w = add_initializer(graph, f"{p}_interp_w", matrix)
            mm = ir.node("MatMul", [current, w], name=f"{p}_matmul_w")
        else:
            h = add_initializer(graph, f"{p}_interp_h", np.ascontiguousarray(matrix.T))
            mm = ir.node("MatMul", [h, current], name=f"{p}_matmul_h")
        nodes.append(mm)
        current = mm.outputs[0]
    if not nodes:
        nodes.append(ir.node("Identity", [x], name=f"{p}_identity"))
        current = nodes[0].outputs[0]
    return nodes, current, from_samples


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
        for attribute in node.attributes.values():  # bodies read outer values by reference
            bodies = (
                [attribute.as_graph()]
                if attribute.type == ir.AttributeType.GRAPH
                else list(attribute.as_graphs())
                if attribute.type == ir.AttributeType.GRAPHS
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


class _Spell:
    """Builds the ops of one rewrite: ``op`` adds a node and returns its output, ``c`` a
    constant; ``done(out)`` hands (nodes, output) to ``replace_node``."""

    def __init__(self, graph: ir.Graph, prefix: str, opset: int):
        self.graph, self.prefix, self.opset = graph, prefix, opset
        self.nodes: list[ir.Node] = []

    def op(self, op_type: str, *inputs: ir.Value, **attributes) -> ir.Value:
        name = f"{self.prefix}_{op_type.lower()}{len(self.nodes)}"
        node = ir.node(op_type, list(inputs), attributes=attributes or None, name=name)
        self.nodes.append(node)
        return node.outputs[0]

    def c(self, value, dtype=np.float32) -> ir.Value:
        return add_initializer(self.graph, f"{self.prefix}_const", np.array(value, dtype))

    def reduce(self, op_type: str, x: ir.Value, axes, keepdims: int) -> ir.Value:
        """A Reduce op in the form of this opset (axes as an input from 18; ReduceSum's from
        13); ``axes`` None reduces every axis."""
        if axes is None:
            return self.op(op_type, x, keepdims=keepdims)
        if ops.axes_as_input(op_type, self.opset):
            return self.op(op_type, x, self.c(list(axes), np.int64), keepdims=keepdims)
        return self.op(op_type, x, axes=list(axes), keepdims=keepdims)

    def done(self, out: ir.Value):
        return self.nodes, out


def _softplus(s: _Spell, x: ir.Value) -> ir.Value:
    # log(1 + e^x) = relu(x) + log(1 + e^-|x|): no overflow for large |x|
    tail = s.op("Log", s.op("Add", s.c(1.0), s.op("Exp", s.op("Neg", s.op("Abs", x)))))
    return s.op("Add", s.op("Relu", x), tail)


def _elu_tail(s: _Spell, x: ir.Value, alpha: float, inner: float = 1.0) -> ir.Value:
    """``alpha (e^(min(x, 0) / inner) - 1)``: Elu's, Selu's and Celu's negative side, 0 at x >= 0."""
    low = s.op("Min", x, s.c(0.0))
    if inner != 1.0:
        low = s.op("Div", low, s.c(inner))
    return s.op("Mul", s.c(alpha), s.op("Sub", s.op("Exp", low), s.c(1.0)))


def _spell_softplus(s: _Spell, node: ir.Node):
    return s.done(_softplus(s, node.inputs[0]))


def _spell_mish(s: _Spell, node: ir.Node):
    x = node.inputs[0]
    return s.done(s.op("Mul", x, s.op("Tanh", _softplus(s, x))))


def _spell_elu(s: _Spell, node: ir.Node):
    x, alpha = node.inputs[0], attr(node, "alpha", 1.0)
    return s.done(s.op("Add", s.op("Relu", x), _elu_tail(s, x, alpha)))


def _spell_selu(s: _Spell, node: ir.Node):
    x = node.inputs[0]
    alpha = attr(node, "alpha", 1.67326319217681884765625)
    gamma = attr(node, "gamma", 1.05070102214813232421875)
    elu = s.op("Add", s.op("Relu", x), _elu_tail(s, x, alpha))
    return s.done(s.op("Mul", s.c(gamma), elu))


def _spell_celu(s: _Spell, node: ir.Node):
    x, alpha = node.inputs[0], attr(node, "alpha", 1.0)
    return s.done(s.op("Add", s.op("Relu", x), _elu_tail(s, x, alpha, inner=alpha)))


def _spell_softsign(s: _Spell, node: ir.Node):
    x = node.inputs[0]
    return s.done(s.op("Div", x, s.op("Add", s.c(1.0), s.op("Abs", x))))


def _spell_thresholded_relu(s: _Spell, node: ir.Node):
    x, alpha = node.inputs[0], attr(node, "alpha", 1.0)
    return s.done(s.op("Where", s.op("Greater", x, s.c(alpha)), x, s.c(0.0)))


def _reduce_axes(node: ir.Node):
    """(axes or None for all, keepdims) of a Reduce node in either opset form; None where
    the axes are computed at run time or an empty list means no reduction."""
    keepdims = attr(node, "keepdims", 1)
    if "axes" in node.attributes:
        axes = list(attr(node, "axes", []))
    elif len(node.inputs) > 1 and node.inputs[1] is not None:
        given = const_array(node.inputs[1])
        if given is None:
            return None
        axes = [int(a) for a in given.reshape(-1)]
    else:
        axes = []
    if not axes:
        if attr(node, "noop_with_empty_axes", 0):
            return None
        axes = None
    return axes, keepdims


def _spell_sum_square(s: _Spell, node: ir.Node):
    found = _reduce_axes(node)
    if found is None:
        return None
    x = node.inputs[0]
    return s.done(s.reduce("ReduceSum", s.op("Mul", x, x), *found))


def _spell_extreme(s: _Spell, node: ir.Node):
    """ReduceMax / ReduceMin (no gradient builders in 1.19) as the mean of the elements equal
    to the extreme: ``sum(x * M) / sum(M)``, ``M = (x == extreme)`` (a boolean mask, through
    which no gradient flows). The same value; the gradient goes to the extreme element, split
    evenly between ties."""
    found = _reduce_axes(node)
    if found is None:
        return None
    axes, keepdims = found
    x = node.inputs[0]
    if x.dtype is None or not x.dtype.is_floating_point():
        return None  # shape arithmetic on integers: nothing to differentiate
    extreme = s.reduce(node.op_type, x, axes, 1)
    mask = s.op("Cast", s.op("Equal", x, extreme), to=x.dtype)
    total = s.reduce("ReduceSum", s.op("Mul", x, mask), axes, keepdims)
    return s.done(s.op("Div", total, s.reduce("ReduceSum", mask, axes, keepdims)))


def _spell_lp_norm(s: _Spell, node: ir.Node):
    x = node.inputs[0]
    axis, order = attr(node, "axis", -1), attr(node, "p", 2)
    if order == 2:
        norm = s.reduce("ReduceL2", x, [axis], 1)
    elif order == 1:
        norm = s.reduce("ReduceSum", s.op("Abs", x), [axis], 1)
    else:
        return None
    # a zero vector stays zero (onnxruntime's LpNormalization), not 0 / 0
    return s.done(s.op("Div", x, s.op("Max", norm, s.c(1e-30))))


def _spell_pad(s: _Spell, node: ir.Node):
    """Reflect and edge padding (no gradient builder for those modes in 1.19) as a Gather of
    each padded axis with constant indices (reflect: ``p, ..., 1, 0, 1, ..., L-1, L-2, ...``;
    edge: the first and last index repeated); needs the padded axes' lengths."""
    mode = attr(node, "mode", "constant")
    x = node.inputs[0]
    if mode not in ("reflect", "edge") or x.shape is None:
        return None
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        return None  # axes given: rare, not spelled out here
    if "pads" in node.attributes:
        pads = list(attr(node, "pads", []))
    elif len(node.inputs) > 1 and (given := const_array(node.inputs[1])) is not None:
        pads = [int(v) for v in given.reshape(-1)]
    else:
        return None
    rank = len(x.shape)
    if len(pads) != 2 * rank or any(v < 0 for v in pads):
        return None
    current = x
    for axis in range(rank):
        before, after = pads[axis], pads[axis + rank]
        if not before and not after:
            continue
        length = x.shape[axis]
        if not isinstance(length, int) or (mode == "reflect" and max(before, after) >= length):
            return None
        inner = list(range(length))
        if mode == "reflect":
            index = inner[before:0:-1] + inner + inner[-2 : -2 - after : -1]
        else:
            index = [0] * before + inner + [length - 1] * after
        current = s.op("Gather", current, s.c(index, np.int64), axis=axis)
    return s.done(current)


def _spell_depth_space(s: _Spell, node: ir.Node):
    """DepthToSpace (DCR or CRD) and SpaceToDepth as Reshape, Transpose, Reshape (their
    definitions); needs static channels, height and width."""
    x = node.inputs[0]
    if x.shape is None or len(x.shape) != 4:
        return None
    _, c, h, w = x.shape
    if not all(isinstance(d, int) for d in (c, h, w)):
        return None
    b = attr(node, "blocksize", 1)
    if node.op_type == "DepthToSpace":
        if attr(node, "mode", "DCR") == "DCR":
            split, perm = [0, b, b, c // (b * b), h, w], [0, 3, 4, 1, 5, 2]
        else:
            split, perm = [0, c // (b * b), b, b, h, w], [0, 1, 4, 2, 5, 3]
        final = [0, c // (b * b), h * b, w * b]
    else:
        split, perm = [0, c, h // b, b, w // b, b], [0, 3, 5, 1, 2, 4]
        final = [0, c * b * b, h // b, w // b]
    # a 0 in a Reshape target copies the batch
    parts = s.op("Reshape", x, s.c(split, np.int64))
    moved = s.op("Transpose", parts, perm=perm)
    return s.done(s.op("Reshape", moved, s.c(final, np.int64)))


def _spell_instance_norm(s: _Spell, node: ir.Node):
    """``InstanceNormalization(x, scale, B)`` over the axes after the channel axis:
    ``(x - mean) / sqrt(mean((x - mean)^2) + eps) * scale[c] + B[c]`` (no gradient builder in
    1.19; a GroupNorm exports as one); None where the rank or the parameters are unknown."""
    x = node.inputs[0]
    gamma, beta = const_array(node.inputs[1]), const_array(node.inputs[2])
    if x.shape is None or len(x.shape) < 3 or gamma is None or beta is None:
        return None
    axes = list(range(2, len(x.shape)))
    per_channel = [len(gamma)] + [1] * len(axes)
    centred = s.op("Sub", x, s.reduce("ReduceMean", x, axes, 1))
    var = s.reduce("ReduceMean", s.op("Mul", centred, centred), axes, 1)
    std = s.op("Sqrt", s.op("Add", var, s.c(attr(node, "epsilon", 1e-5))))
    normed = s.op("Div", centred, std)
    scaled = s.op("Mul", normed, s.c(gamma.reshape(per_channel)))
    return s.done(s.op("Add", scaled, s.c(beta.reshape(per_channel))))


def _spell_einsum(s: _Spell, node: ir.Node):
    """A two-operand Einsum (no gradient builder in 1.19) as Transposes, Reshapes and one
    MatMul: letters in both operands and the output are batch axes (kept, leading), letters in
    both operands only are contracted, letters of one operand and the output are its free axes;
    a letter of one operand alone is summed first. Each operand becomes ``[batch.., F, K]`` /
    ``[batch.., K, G]`` (the free and contracted groups merged by a Reshape, which needs their
    sizes when a group has several letters), the product is split back and put in the output's
    order. None for one or three operands, ellipses, repeated letters or unknown sizes."""
    if len(node.inputs) != 2 or "equation" not in node.attributes:
        return None
    equation = attr(node, "equation", "").replace(" ", "")
    if "..." in equation or "->" not in equation:
        return None
    lhs, out = equation.split("->")
    terms = lhs.split(",")
    if len(terms) != 2 or any(len(set(t)) != len(t) for t in (*terms, out)):
        return None
    a_letters, b_letters = terms
    a, b = node.inputs
    sizes: dict[str, int | None] = {}
    for value, letters in ((a, a_letters), (b, b_letters)):
        if value.shape is None or len(value.shape) != len(letters):
            return None
        for letter, dim in zip(letters, value.shape, strict=True):
            if isinstance(dim, int):
                sizes[letter] = dim
            else:
                sizes.setdefault(letter, None)
    batch = [c for c in out if c in a_letters and c in b_letters]
    contracted = [c for c in a_letters if c in b_letters and c not in out]
    free_a = [c for c in a_letters if c in out and c not in b_letters]
    free_b = [c for c in b_letters if c in out and c not in a_letters]

    def target(groups) -> list[int] | None:
        """Reshape target: the batch copied (0), then each group's size (at most one group
        with a size known at run time only: -1)."""
        dims = []
        for g in groups:
            if any(sizes.get(c) is None for c in g):
                dims.append(-1)  # the one group of a size known at run time only
            else:
                dims.append(int(np.prod([sizes[c] for c in g])))
        return [0] * len(batch) + dims if dims.count(-1) <= 1 else None

    reshapes = {
        "left": target([free_a, contracted]),
        "right": target([contracted, free_b]),
        "split": target([[c] for c in free_a + free_b]),
    }
    if any(t is None for t in reshapes.values()):
        return None

    def prepared(value, letters, groups, reshape):
        """``value`` with letters only it has summed, in the order ``batch + groups``, each
        group of ``groups`` merged into one axis (a lone letter as it is, none as size 1)."""
        lone = [i for i, c in enumerate(letters) if c not in out and c not in contracted]
        if lone:
            value = s.reduce("ReduceSum", value, lone, 0)
            letters = "".join(c for i, c in enumerate(letters) if i not in lone)
        order = batch + [c for g in groups for c in g]
        perm = [letters.index(c) for c in order]
        if perm != list(range(len(perm))):
            value = s.op("Transpose", value, perm=perm)
        if any(len(g) != 1 for g in groups):
            value = s.op("Reshape", value, s.c(reshape, np.int64))
        return value

    left = prepared(a, a_letters, [free_a, contracted], reshapes["left"])
    right = prepared(b, b_letters, [contracted, free_b], reshapes["right"])
    product = s.op("MatMul", left, right)  # [batch.., F, G]
    order = batch + free_a + free_b
    if len(free_a) != 1 or len(free_b) != 1:
        product = s.op("Reshape", product, s.c(reshapes["split"], np.int64))
    perm = [order.index(c) for c in out]
    if perm != list(range(len(perm))):
        product = s.op("Transpose", product, perm=perm)
    return s.done(product)


_SPELLED = {
    "InstanceNormalization": _spell_instance_norm,
    "Einsum": _spell_einsum,
    "Softplus": _spell_softplus,
    "Mish": _spell_mish,
    "Elu": _spell_elu,
    "Selu": _spell_selu,
    "Celu": _spell_celu,
    "Softsign": _spell_softsign,
    "ThresholdedRelu": _spell_thresholded_relu,
    "ReduceSumSquare": _spell_sum_square,
    "ReduceMax": _spell_extreme,
    "ReduceMin": _spell_extreme,
    "LpNormalization": _spell_lp_norm,
    "Pad": _spell_pad,
    "DepthToSpace": _spell_depth_space,
    "SpaceToDepth": _spell_depth_space,
}


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
    if attr(node, "mode", "nearest") != "nearest" or len(node.inputs) < 3:
        return None
    if attr(node, "coordinate_transformation_mode", "half_pixel") != "asymmetric":
        return None
    if attr(node, "nearest_mode", "round_prefer_floor") not in ("floor", "round_prefer_floor"):
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


def batch_within(samples, batch: int, split: str, holdout: float) -> int:
    """The size of the batches ``samples.batches(batch, ...)`` yields (the memory budget's cap
    and a batch the model fixes applied), or the number of samples in ``split`` when there are
    fewer: a twin whose batch is fixed (``fix_batch``) then still gets a batch of its size (with
    16 samples and the default 32, every recovery of a model with an AveragePool had none; with
    batches capped to 18 by the memory budget, PP-OCRv4's recognizer had none of 32)."""
    batch = samples.batch_size_for(batch)
    kept = samples.count_in(split, holdout)
    return batch if not kept else min(batch, kept)


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
    return _fix_inputs(model, observed, batch if "AveragePool" in pools else None)


def _fix_inputs(model: ir.Model, observed: dict, batch: int | None = None) -> bool:
    """Gives the graph inputs the non-batch dimensions ``observed`` (input name -> shape of a
    sample) and, with ``batch``, a fixed batch; returns whether the batch was fixed."""
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
        if batch is not None and not isinstance(dims[0], int):
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
