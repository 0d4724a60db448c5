"""Graph clean-ups that quantization and pruning build on, each exact up to float rounding.

* ``drop_initializer_inputs``: old exporters (IR < 4) list every initializer as a graph input
  too, which makes weights overridable and blocks constant folding. Inference never overrides
  them, so they stop being inputs.
* ``fold_constants``: ops computing only from constants (a Reshape of a weight) are evaluated.
* ``lift_constants``: ``Constant`` nodes become initializers, so every rule reads constants in
  one way.
* ``sum_to_add``: a two-input ``Sum`` is an ``Add`` (onnxruntime has quantized kernels for Add).
* ``fold_batchnorm``: ``BatchNormalization`` after a ``Conv`` (or ``ConvTranspose``) whose output
  feeds nothing else is folded into the convolution's weights and bias. With
  ``s = gamma / sqrt(var + eps)`` per output channel ``c``::

      W'[c] = W[c] * s[c]          b'[c] = (b[c] - mean[c]) * s[c] + beta[c]

  (for ConvTranspose the output channel is axis 1 of ``W``, per group).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import weakref

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from onnxzip.errors import InternalError
from onnxzip.ir.ops import FLOAT_WEIGHTED_OPS, same_dim, tensor_nbytes

logger = logging.getLogger(__name__)


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant data when it is an initializer (not an overridable input)."""
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def dequantized_array(value: ir.Value | None) -> np.ndarray | None:
    """A constant, or the float value of ``DequantizeLinear`` applied to constants
    (``(q - zero_point) * scale``, per axis when the scale is a vector)."""
    array = const_array(value)
    if array is not None or value is None:
        return array
    node = value.producer()
    if node is None or node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return None
    q = const_array(node.inputs[0])
    scale = const_array(node.inputs[1])
    zero = (
        const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    )
    if (
        q is None
        or scale is None
        or (len(node.inputs) > 2 and node.inputs[2] is not None and zero is None)
    ):
        return None
    zero = np.zeros_like(scale, dtype=np.int64) if zero is None else zero.astype(np.int64)
    if scale.ndim == 1 and scale.size > 1:
        axis = _attr_int(node, "axis", 1) % q.ndim
        shape = [1] * q.ndim
        shape[axis] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    if q.dtype.itemsize <= 2 and q.dtype.kind in "iu" and scale.dtype == np.float32:
        # 8- and 16-bit codes: q - zero is exact in float32 and the product of it and a float32
        # scale rounds once either way, so float32 gives the float64 path's bits, 2x faster
        return (q.astype(np.float32) - zero.astype(np.float32)) * scale
    return ((q.astype(np.int64) - zero) * scale.astype(np.float64)).astype(np.float32)


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def _attr_float(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_float()


_NAMING: weakref.WeakKeyDictionary[ir.Graph, set[str]] = weakref.WeakKeyDictionary()


def _taken_names(graph: ir.Graph) -> set[str]:
    taken = set(graph.initializers)
    taken.update(v.name for v in graph.inputs)
    for node in graph:
        taken.update(v.name for v in node.outputs)
    return taken


@contextlib.contextmanager
def naming(graph: ir.Graph):
    """A bulk edit of ``graph``: inside it, ``add_initializer`` checks new names against one
    scan of the graph made on entry plus every name handed out or ``claim``-ed since, instead of
    scanning the whole graph per call (which made every per-node edit loop quadratic). Names
    the edit gives node outputs itself must be ``claim``-ed."""
    if graph in _NAMING:
        yield
        return
    _NAMING[graph] = _taken_names(graph)
    try:
        yield
    finally:
        _NAMING.pop(graph, None)


# Element types of the outputs of ops quantization writes, where the inputs do not say them
_OUTPUT_TYPES = {
    "DynamicQuantizeLinear": (ir.DataType.UINT8, ir.DataType.FLOAT, ir.DataType.UINT8),
    "MatMulInteger": (ir.DataType.INT32,),
    "ConvInteger": (ir.DataType.INT32,),
}
# ops whose output has the element type of their first input
_SAME_TYPE = frozenset(
    {
        "Gather", "Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten",
        "Slice", "Concat", "Mul", "Add", "Sub", "Div", "Relu", "MatMul", "MatMulNBits",
        "Expand", "Tile",
    }
)  # fmt: skip


def type_outputs(model: ir.Model) -> int:
    """Gives the untyped outputs of main-graph nodes their element type where the op and its
    inputs determine it (the nodes quantization adds: DynamicQuantizeLinear, MatMulInteger, Q/DQ,
    Cast, the Gather of int8 table rows, elementwise arithmetic), in graph order, so a model
    quantization wrote is as typed as the one it read (``io.load_model`` takes it as it is,
    without a round trip through a protobuf). Shapes are left to onnx's inference. Returns how
    many outputs were typed."""
    typed = 0
    for node in model.graph:
        if all(v.type is not None or not v.name for v in node.outputs):
            continue
        dtypes: tuple = ()
        first = node.inputs[0] if node.inputs else None
        if node.op_type in _OUTPUT_TYPES:
            dtypes = _OUTPUT_TYPES[node.op_type]
        elif node.op_type == "Cast" and "to" in node.attributes:
            dtypes = (ir.DataType(node.attributes["to"].as_int()),)
        elif node.op_type == "QuantizeLinear":
            zero = node.inputs[2] if len(node.inputs) > 2 else None
            dtypes = (zero.dtype if zero is not None and zero.dtype else ir.DataType.UINT8,)
        elif node.op_type == "DequantizeLinear" and len(node.inputs) > 1:
            dtypes = (node.inputs[1].dtype,)
        elif node.op_type in _SAME_TYPE and first is not None:
            dtypes = (first.dtype,)
        for value, dtype in zip(node.outputs, dtypes, strict=False):
            if value.type is None and value.name and dtype is not None:
                value.type = ir.TensorType(dtype)
                typed += 1
    return typed


def bulk_edit(fn):
    """Runs ``fn(model_or_graph, ...)`` inside a ``naming`` scope of its (main) graph."""

    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        graph = first.graph if isinstance(first, ir.Model) else first
        with naming(graph):
            return fn(first, *args, **kwargs)

    return wrapper


def claim(graph: ir.Graph, name: str) -> None:
    """Records ``name`` as taken inside a ``naming`` scope of ``graph`` (no-op outside one)."""
    taken = _NAMING.get(graph)
    if taken is not None:
        taken.add(name)


def fresh_name(graph: ir.Graph, name: str) -> str:
    """``name``, or ``name_1``, ``name_2``, ...: the first no value of ``graph`` uses, claimed."""
    taken = _NAMING.get(graph)
    if taken is None:
        taken = _taken_names(graph)
    unique, i = name, 1
    while unique in taken or unique in graph.initializers:
        unique = f"{name}_{i}"
        i += 1
    claim(graph, unique)
    return unique


def add_initializer(
    graph: ir.Graph, name: str, array: np.ndarray, *, name_is_unique: bool = False
) -> ir.Value:
    """Registers a new initializer under a name no other value in the graph uses.

    ``name_is_unique`` skips the check when the caller already guarantees it; inside a
    ``naming`` scope the check costs one set lookup.
    """
    unique = name if name_is_unique else fresh_name(graph, name)
    array = np.asarray(array)
    # ir.Tensor directly: ir.tensor's protocol checks cost more than the rest of this function.
    if array.dtype.kind in "OSU":  # strings: onnx_ir's own string tensor
        tensor = ir.StringTensor(array.astype(object), name=unique)
    else:
        tensor = ir.Tensor(array, name=unique)
    value = ir.Value(name=unique, const_value=tensor)
    value.shape = ir.Shape(array.shape)
    value.dtype = tensor.dtype
    graph.register_initializer(value)
    return value


def drop_initializer_inputs(model: ir.Model) -> int:
    before = len(model.graph.inputs)
    ir.passes.common.RemoveInitializersFromInputsPass()(model)
    return before - len(model.graph.inputs)


def is_constant(value: ir.Value | None) -> bool:
    """An initializer or a Constant node's output (an absent optional input counts too)."""
    if value is None:
        return True
    if value.is_graph_input():
        return False
    if value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def weighted_layers(model: ir.Model) -> tuple[dict[str, int], dict[str, int]]:
    """Conv, ConvTranspose, Gemm and MatMul nodes with a constant weight, per op: those of the
    main graph and those inside If/Loop/Scan bodies."""
    main: dict[str, int] = {}
    bodies: dict[str, int] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if (
            node.op_type in FLOAT_WEIGHTED_OPS
            and node.domain in ("", "ai.onnx")
            and len(node.inputs) > 1
            and node.inputs[1] is not None
            and is_constant(node.inputs[1])
        ):
            where = main if node.graph is model.graph else bodies
            where[node.op_type] = where.get(node.op_type, 0) + 1
    return main, bodies


def foldable(node: ir.Node) -> bool:
    return (
        node.op_type != "Constant"
        and bool(node.inputs)
        and all(is_constant(v) for v in node.inputs)
    )


def fold_constants(model: ir.Model) -> int:
    """Evaluates ops whose inputs are all constants (a Reshape or Transpose of a weight, say).

    onnxscript's constant folder does the evaluation; its size limits are lifted because weights
    are large, and its folded values are lifted to initializers afterwards.

    A fold that would add a copy of a weight that something else still reads (a tied embedding
    read by a Gather and, transposed, by the output MatMul) is not made: it would grow the
    model by that weight and untie it. Such nodes are hidden from the folder for the call.
    """
    strings = [node for node in model.graph if foldable(node) and _reads_strings(node)]
    shared = [
        node
        for node in model.graph
        if foldable(node) and node not in strings and _duplicates_weight(node)
    ]
    left_alone = {id(node) for node in shared + strings}
    if not any(foldable(node) for node in model.graph if id(node) not in left_alone):
        return 0  # nothing to fold: skip importing onnxscript's optimizer (0.2 s)
    from onnxscript.optimizer import _constant_folding

    before = model.graph.num_nodes()
    # Hidden by a stand-in input the folder cannot read, put back afterwards.
    hidden = [
        (node, i, value)
        for node in shared
        for i, value in enumerate(node.inputs)
        if value is not None and value.const_value is not None and len(value.uses()) > 1
    ]
    # String tensors: the folder would hand them back as numeric tensors onnx_ir cannot write.
    hidden += [
        (node, i, value)
        for node in strings
        for i, value in enumerate(node.inputs)
        if value is not None and value.const_value is not None
    ]
    stand_ins = []
    for node, i, value in hidden:
        stand_in = ir.Value(name=f"{value.name}__tied", type=value.type, shape=value.shape)
        node.replace_input_with(i, stand_in)
        stand_ins.append((stand_in, value))
    if shared:
        logger.info(
            "not folding %d node(s) that would copy a weight other nodes read (tied weights)",
            len(shared),
        )
    quiet = logging.getLogger("onnx_ir")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it warns about every initializer it leaves alone
    options = {}
    if "should_fold" in inspect.signature(_constant_folding.fold_constants).parameters:
        options["should_fold"] = _fold_small_constant_of_shape
    try:
        _constant_folding.fold_constants(
            model, input_size_limit=2**40, output_size_limit=2**40, **options
        )
    finally:
        quiet.setLevel(level)
        # Every reader of a stand-in, not only the hidden node: the folder forwards an
        # Identity of one to the Identity's readers (a TorchScript export's shared bias).
        for stand_in, value in stand_ins:
            stand_in.replace_all_uses_with(value, replace_graph_outputs=True)
    return before - model.graph.num_nodes()


# ConstantOfShape outputs up to this many elements are folded (the folder keeps every one, so
# that a large zero tensor is not written out): TorchScript exports of ``F.pad`` compute a Pad's
# pads from ``ConstantOfShape`` of a constant, and without folding it neither the pads nor any
# shape after the Pad is known (MACs, pruning and quantization rules all read those shapes).
_SMALL_CONSTANT_OF_SHAPE = 4096


def _fold_small_constant_of_shape(node: ir.Node) -> bool | None:
    """The folder's ``should_fold``: True for a small ConstantOfShape, else its own rules."""
    if node.op_type != "ConstantOfShape" or node.domain not in ("", "ai.onnx"):
        return None
    shape = node.inputs[0].const_value if node.inputs and node.inputs[0] is not None else None
    if shape is None:
        return None
    dims = shape.numpy().reshape(-1)
    return True if np.all(dims >= 0) and int(np.prod(dims)) <= _SMALL_CONSTANT_OF_SHAPE else None


def _reads_strings(node: ir.Node) -> bool:
    return any(
        v is not None and v.dtype == ir.DataType.STRING for v in (*node.inputs, *node.outputs)
    )


def _duplicates_weight(node: ir.Node) -> bool:
    """Folding ``node`` would write a new constant computed from an initializer of at least
    1 KiB that other nodes also read (so the original stays and the data is held twice)."""
    for value in node.inputs:
        if value is None or value.const_value is None or value.is_graph_input():
            continue
        if len(value.uses()) > 1 and tensor_nbytes(value.const_value) >= 1024:
            return True
    return False


def lift_constants(model: ir.Model) -> int:
    before = len(model.graph.initializers)
    ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    return len(model.graph.initializers) - before


def replace_node(
    graph: ir.Graph, node: ir.Node, new_nodes: list[ir.Node], result: ir.Value
) -> None:
    """Puts ``new_nodes`` where ``node`` was; ``result`` takes over the node's output.

    ``result`` gets the output's uses, graph-output slots, type, shape and name, so nothing
    downstream (and no report keyed by tensor name) sees the swap.
    """
    graph.insert_before(node, new_nodes)
    old = node.outputs[0]
    name = old.name
    result.type, result.shape = old.type, old.shape
    old.replace_all_uses_with(result, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    result.name = name


def sum_to_add(model: ir.Model) -> int:
    count = 0
    for node in list(model.graph):
        if node.op_type == "Sum" and node.domain == "" and len(node.inputs) == 2:
            add = ir.node("Add", inputs=list(node.inputs), name=node.name)
            replace_node(model.graph, node, [add], add.outputs[0])
            count += 1
    return count


@bulk_edit
def _absorb(
    graph: ir.Graph,
    conv: ir.Node,
    node: ir.Node,
    weight: np.ndarray | None,
    bias: np.ndarray,
    tags: tuple[str, str],
) -> None:
    """Gives ``conv`` the folded ``weight`` (None: its own stays) and ``bias``, and removes
    ``node``, the per-channel map after it that they absorbed; the Conv's output takes over the
    node's output name, so per-node diffs and graph outputs line up. The new initializers are
    ``<conv>.<tags[0]>`` and ``<conv>.<tags[1]>``."""
    conv_out = conv.outputs[0]
    base = conv.name or conv_out.name or "conv"
    if weight is not None:
        conv.replace_input_with(1, add_initializer(graph, f"{base}.{tags[0]}", weight))
    b_value = add_initializer(graph, f"{base}.{tags[1]}", bias)
    if len(conv.inputs) < 3:
        conv.resize_inputs(3)
    conv.replace_input_with(2, b_value)
    out = node.outputs[0]
    name = out.name
    out.replace_all_uses_with(conv_out, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    conv_out.name = name


def fold_batchnorm(model: ir.Model) -> list[str]:
    """Folds BatchNormalization into the preceding Conv/ConvTranspose; returns folded BN names."""
    graph = model.graph
    folded = []
    for bn in list(graph):
        if bn.op_type != "BatchNormalization" or bn.domain != "" or len(bn.outputs) != 1:
            continue
        if _attr_int(bn, "training_mode", 0):
            continue
        conv = bn.inputs[0].producer() if bn.inputs[0] is not None else None
        if conv is None or conv.op_type not in ("Conv", "ConvTranspose") or conv.domain != "":
            continue
        conv_out = conv.outputs[0]
        if len(conv_out.uses()) != 1 or conv_out.is_graph_output():
            continue
        gamma, beta, mean, var = (const_array(v) for v in bn.inputs[1:5])
        w = const_array(conv.inputs[1])
        if any(a is None for a in (gamma, beta, mean, var, w)):
            continue
        b = (
            const_array(conv.inputs[2])
            if len(conv.inputs) > 2 and conv.inputs[2] is not None
            else None
        )
        if len(conv.inputs) > 2 and conv.inputs[2] is not None and b is None:
            continue
        eps = _attr_float(bn, "epsilon", 1e-5)
        scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
        cout = scale.shape[0]
        if conv.op_type == "Conv":
            w_new = w.astype(np.float64) * scale.reshape(-1, *([1] * (w.ndim - 1)))
        else:
            group = _attr_int(conv, "group", 1)
            per_group = w.shape[1]
            w64 = w.astype(np.float64).reshape(group, w.shape[0] // group, per_group, *w.shape[2:])
            s = scale.reshape(group, 1, per_group, *([1] * (w.ndim - 2)))
            w_new = (w64 * s).reshape(w.shape)
        b0 = np.zeros(cout) if b is None else b.astype(np.float64)
        b_new = (b0 - mean.astype(np.float64)) * scale + beta.astype(np.float64)
        tags = ("weight_bnfold", "bias_bnfold")
        _absorb(graph, conv, bn, w_new.astype(w.dtype), b_new.astype(w.dtype), tags)
        folded.append(bn.name or conv_out.name)
    remove_unused_initializers(model)
    return folded


def fold_conv_affine(model: ir.Model) -> list[str]:
    """Folds a ``Mul``, ``Div``, ``Add`` or ``Sub`` by a constant that is one value or one value
    per output channel (``[C, 1, ..]``, ``[1, C, 1, ..]``) into the preceding Conv's weight and
    bias, as onnxruntime's ConvMulFusion / ConvAddFusion do on the float model: a scale or shift
    after a convolution (a bias tf2onnx writes as its own ``Add``, PP-LCNetV3's learnable
    scalar affine) is then no int8 op of its own with a rounding of its own. Returns the folded
    nodes' names."""
    graph = model.graph
    folded = []
    for node in list(graph):
        if node.op_type not in ("Mul", "Div", "Add", "Sub") or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.inputs) != 2 or any(v is None for v in node.inputs):
            continue
        index = next((i for i, v in enumerate(node.inputs) if const_array(v) is None), None)
        c = const_array(node.inputs[1 - index]) if index is not None else None
        if c is None:
            continue
        if index != 0 and node.op_type in ("Div", "Sub"):
            continue  # c / conv, c - conv: not affine in the conv's output
        conv_out = node.inputs[index]
        conv = conv_out.producer()
        if conv is None or conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx"):
            continue
        if _only_use(conv_out) is not node or len(conv.outputs) != 1:
            continue
        w = const_array(conv.inputs[1])
        has_bias = len(conv.inputs) > 2 and conv.inputs[2] is not None
        b = const_array(conv.inputs[2]) if has_bias else None
        if w is None or (has_bias and b is None) or w.dtype != np.float32:
            continue
        out = node.outputs[0]
        cout = w.shape[0]
        if (
            c.dtype != w.dtype
            or c.ndim > w.ndim
            or (
                out.shape is not None
                and conv_out.shape is not None
                and _differ(out.shape, conv_out.shape)
            )
        ):
            continue  # the constant broadcasts the output to another shape
        if c.size == 1:
            per = np.full(cout, float(c.reshape(())), np.float64)
        else:
            dims = list(c.shape)
            while dims and dims[0] == 1 and len(dims) >= w.ndim:
                dims.pop(0)  # a leading batch axis of 1
            if len(dims) != w.ndim - 1 or dims[0] != cout or any(d != 1 for d in dims[1:]):
                continue
            per = c.reshape(cout).astype(np.float64)
        w64 = w.astype(np.float64)
        b64 = np.zeros(cout) if b is None else b.astype(np.float64)
        if node.op_type == "Mul":
            w64, b64 = w64 * per.reshape(-1, *([1] * (w.ndim - 1))), b64 * per
        elif node.op_type == "Div":
            if not np.all(per != 0):
                continue
            w64, b64 = w64 / per.reshape(-1, *([1] * (w.ndim - 1))), b64 / per
        else:
            b64 = b64 + per if node.op_type == "Add" else b64 - per
        scaled = w64.astype(w.dtype) if node.op_type in ("Mul", "Div") else None
        _absorb(graph, conv, node, scaled, b64.astype(w.dtype), ("weight_scaled", "bias_folded"))
        folded.append(node.name or conv_out.name)
    if folded:
        remove_unused_initializers(model)
    return folded


def _differ(a: ir.Shape, b: ir.Shape) -> bool:
    """Two shapes known to differ: another rank, or two fixed dims that are not equal. Symbolic
    dims may be named per tensor (inference names an exporter's unnamed dims after the tensor
    they belong to: ``y_dim0`` beside ``x_dim0``), so a name alone proves nothing."""
    return len(a) != len(b) or any(
        isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(a, b, strict=True)
    )


def fold_matmul_add(model: ir.Model) -> list[str]:
    """Turns a ``MatMul`` of a rank-2 activation by a constant 2-D weight, followed by an ``Add``
    of a constant bias (``[N]`` or ``[1, N]``) that reads nothing else, into one ``Gemm`` with
    that bias, as onnxruntime's MatMulAddFusion does in the float model (a scikit-learn or
    Keras dense layer): quantized, the bias is then an int32 input of the int8 kernel instead
    of an 8-bit Add with a rounding of its own. Returns the folded Adds' names."""
    graph = model.graph
    folded = []
    for node in list(graph):
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        index = next((i for i, v in enumerate(node.inputs) if const_array(v) is None), None)
        if index is None or node.inputs[1 - index] is None:
            continue
        bias = const_array(node.inputs[1 - index])
        mm_out = node.inputs[index]
        mm = mm_out.producer() if mm_out is not None else None
        if mm is None or mm.op_type != "MatMul" or mm.domain not in ("", "ai.onnx"):
            continue
        if bias is None or _only_use(mm_out) is not node:
            continue
        x, w_value = mm.inputs
        w = const_array(w_value)
        if w is None or w.ndim != 2 or w.dtype != np.float32 or bias.dtype != w.dtype:
            continue
        if x.shape is None or len(x.shape) != 2 or const_array(x) is not None:
            continue
        n = w.shape[1]
        if bias.shape not in ((n,), (1, n)):
            continue
        out = node.outputs[0]
        b_value = add_initializer(
            graph, f"{mm.name or mm_out.name or 'matmul'}.bias", bias.reshape(n).astype(w.dtype)
        )
        gemm = ir.node("Gemm", [x, w_value, b_value], name=mm.name or None)
        gemm.outputs[0].dtype = out.dtype
        gemm.outputs[0].shape = out.shape
        graph.insert_before(mm, gemm)
        name = out.name
        out.replace_all_uses_with(gemm.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        graph.remove(mm, safe=True)
        gemm.outputs[0].name = name
        folded.append(node.name or name)
    if folded:
        remove_unused_initializers(model)
    return folded


def _only_use(value: ir.Value) -> ir.Node | None:
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def remove_dead(graph: ir.Graph, values: list[ir.Value]) -> int:
    """Removes the producers of ``values`` that nothing reads any more, and theirs in turn."""
    removed = 0
    queue = list(values)
    while queue:
        value = queue.pop()
        node = value.producer()
        if value is None or node is None or node.graph is not graph:
            continue
        if any(o.uses() or o.is_graph_output() for o in node.outputs):
            continue
        inputs = [v for v in node.inputs if v is not None]
        graph.remove(node, safe=True)
        removed += 1
        queue.extend(inputs)
    return removed


def unfold_last_axes_transposes(model: ir.Model) -> int:
    """``Reshape(x, [-1, m, n])``, ``Transpose(perm=[0, 2, 1])``, ``Reshape(to [lead.., n, m])``
    becomes ``Transpose(x)`` of its last two axes.

    torch.onnx's dynamo exporter spells the ``K^T`` of scaled-dot-product attention this way:
    the leading axes (batch and heads) are flattened into one, the last two swapped, the leading
    axes restored from ``Shape(x)``. Both forms compute the same tensor when the reshapes keep
    the last two dims and restore the leading ones (checked on the inferred shapes, dim by dim),
    but the flattened form ties the heads to the batch, so no head could ever be removed.
    """
    graph = model.graph
    count = 0
    for node in list(graph):
        if (
            node.graph is not graph
            or node.op_type != "Reshape"
            or node.domain not in ("", "ai.onnx")
        ):
            continue
        x, flat = node.inputs[0], node.outputs[0]
        transpose = _only_use(flat)
        if transpose is None or transpose.op_type != "Transpose":
            continue
        perm = transpose.attributes.get("perm")
        if perm is None or list(perm.as_ints()) != [0, 2, 1]:
            continue
        back = _only_use(transpose.outputs[0])
        if back is None or back.op_type != "Reshape":
            continue
        out = back.outputs[0]
        if x.shape is None or flat.shape is None or out.shape is None:
            continue
        r = len(x.shape)
        if r < 3 or len(flat.shape) != 3 or len(out.shape) != r:
            continue
        want = [*list(x.shape)[: r - 2], x.shape[r - 1], x.shape[r - 2]]
        if not (
            same_dim(flat.shape[1], x.shape[r - 2])
            and same_dim(flat.shape[2], x.shape[r - 1])
            and all(same_dim(a, b) for a, b in zip(out.shape, want, strict=True))
        ):
            continue
        shape_inputs = [v for v in (node.inputs[1], back.inputs[1]) if v is not None]
        swap = ir.node(
            "Transpose",
            [x],
            attributes={"perm": [*range(r - 2), r - 1, r - 2]},
            name=f"{back.name or 'transpose'}_last_axes",
        )
        replace_node(graph, back, [swap], swap.outputs[0])
        graph.remove(transpose, safe=True)
        graph.remove(node, safe=True)
        remove_dead(graph, shape_inputs)
        count += 1
    return count


@bulk_edit
def batchnorm_to_affine(model: ir.Model) -> int:
    """Inference-mode BatchNormalization as ``x * s + t`` with constant ``s``, ``t``.

    ``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``, shaped ``[C, 1, ...]`` to
    broadcast over the channel axis. For training graphs: onnxruntime's gradient builder would
    turn a BatchNormalization node into training-mode BN with batch statistics.
    """
    graph = model.graph
    count = 0
    for bn in list(graph):
        if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
            continue
        gamma, beta, mean, var = (const_array(v) for v in bn.inputs[1:5])
        x = bn.inputs[0]
        if any(a is None for a in (gamma, beta, mean, var)) or x.shape is None:
            continue
        eps = _attr_float(bn, "epsilon", 1e-5)
        scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
        shift = beta.astype(np.float64) - mean.astype(np.float64) * scale
        trailing = [1] * (len(x.shape) - 2)
        base = bn.name or bn.outputs[0].name
        s = add_initializer(
            graph, f"{base}.affine_scale", scale.reshape(-1, *trailing).astype(np.float32)
        )
        t = add_initializer(
            graph, f"{base}.affine_shift", shift.reshape(-1, *trailing).astype(np.float32)
        )
        mul = ir.node("Mul", [x, s], name=f"{base}.affine_mul")
        add = ir.node("Add", [mul.outputs[0], t], name=f"{base}.affine_add")
        mul.outputs[0].name = f"{base}.affine_mul"
        replace_node(graph, bn, [mul, add], add.outputs[0])
        count += 1
    return count


def remove_identities(model: ir.Model) -> int:
    """Removes the main graph's ``Identity`` nodes whose output is no graph output, its readers
    reading the input instead, as onnxruntime's basic optimizer does in the float model.
    paddle2onnx writes one after nearly every op: between a Conv and the scale and shift after
    it they kept the fold out, so each of those ops stayed an 8-bit op with a rounding of its
    own. Returns how many were removed. (onnx_ir's ``IdentityEliminationPass`` also removes one
    that writes a graph output, renaming its input, which breaks a model whose input value is
    itself a graph output under its own name.)"""
    graph = model.graph
    removed = 0
    for node in list(graph):
        if node.op_type != "Identity" or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.inputs) != 1 or len(node.outputs) != 1 or node.inputs[0] is None:
            continue
        source, out = node.inputs[0], node.outputs[0]
        if out.is_graph_output():
            continue
        if source.type is None:
            source.type = out.type
        if source.shape is None:
            source.shape = out.shape
        out.replace_all_uses_with(source)
        graph.remove(node, safe=True)
        removed += 1
    return removed


def remove_unused_initializers(model: ir.Model) -> None:
    graph = model.graph
    for name in list(graph.initializers):
        value = graph.initializers[name]
        if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
            del graph.initializers[name]


# -- the clean-ups as onnx_ir passes, composed into the named pipelines each stage runs ---------


class _Step(onnx_ir.passes.InPlacePass):
    """One clean-up as an in-place pass; ``found`` keeps what it reported (a count or names)."""

    key = ""

    def __init__(self) -> None:
        super().__init__()
        self.found = 0

    def apply(self, model: ir.Model):  # the clean-up function
        raise NotImplementedError

    def call(self, model: ir.Model) -> onnx_ir.passes.PassResult:
        self.found = self.apply(model)
        return onnx_ir.passes.PassResult(model, modified=bool(self.found))


class DropInitializerInputs(_Step):
    key = "initializer_inputs_dropped"

    def apply(self, model):
        return drop_initializer_inputs(model)

    def ensures(self, model):
        left = [v.name for v in model.graph.inputs if v.is_initializer()]
        if left:
            raise onnx_ir.passes.PostconditionError(f"initializers still graph inputs: {left[:3]}")


class FoldConstants(_Step):
    key = "constants_folded"

    def apply(self, model):
        from onnxzip import io

        unknown = any(io.unknown_dims(v.shape) for node in model.graph for v in node.outputs)
        folded = fold_constants(model)
        if folded and unknown:
            # shapes the fold made computable (a Pad's pads, a Reshape's target)
            better = io.refresh_shapes(model)
            if better:
                logger.info("%d shapes known after folding constants", better)
        return folded


class LiftConstants(_Step):
    key = "constants_lifted"

    def apply(self, model):
        return lift_constants(model)


class SumToAdd(_Step):
    key = "sum_to_add"

    def apply(self, model):
        return sum_to_add(model)

    def ensures(self, model):
        if any(n.op_type == "Sum" and n.domain == "" and len(n.inputs) == 2 for n in model.graph):
            raise onnx_ir.passes.PostconditionError("a two-input Sum is left")


class RemoveIdentities(_Step):
    key = "identities_removed"

    def apply(self, model):
        return remove_identities(model)


class FoldBatchNorm(_Step):
    key = "batchnorm_folded"

    def apply(self, model):
        return fold_batchnorm(model)


class FoldConvAffine(_Step):
    key = "conv_affine_folded"

    def apply(self, model):
        return fold_conv_affine(model)


class FoldMatMulAdd(_Step):
    key = "matmul_add_folded"

    def apply(self, model):
        return fold_matmul_add(model)


class UnfoldTransposes(_Step):
    key = "transposes_unfolded"

    def apply(self, model):
        return unfold_last_axes_transposes(model)


class BatchNormToAffine(_Step):
    key = "batchnorm_to_affine"

    def apply(self, model):
        return batchnorm_to_affine(model)


class Pipeline:
    """A named sequence of clean-up passes, each run through onnx_ir's ``PassBase`` protocol
    (``requires``, ``call``, ``ensures``). Calling it edits the model in place and returns what
    each pass did, keyed by the pass's ``key``. Unlike onnx_ir's ``PassManager`` it does not
    wrap errors: a refusal of the user's model stays that (exit 2); a broken post-condition is
    onnxzip's bug (``InternalError``, exit 3)."""

    def __init__(self, name: str, steps: list[type[_Step]]) -> None:
        self.name = name
        self.steps = steps

    def __call__(self, model: ir.Model) -> dict:
        done = {}
        for step in self.steps:
            p = step()
            try:
                p(model)
            except (onnx_ir.passes.PreconditionError, onnx_ir.passes.PostconditionError) as exc:
                cause = exc.__cause__ or exc
                raise InternalError(f"{self.name} pipeline, {type(p).__name__}: {cause}") from exc
            done[p.key] = p.found
        return done


# pruning reads constants one way and needs Sum as Add; BatchNormalization stays (a rule slices it)
PRUNING = Pipeline(
    "pruning", [DropInitializerInputs, FoldConstants, LiftConstants, SumToAdd, UnfoldTransposes]
)
# quantization also drops Identity nodes, folds BatchNormalization, and constant scales and shifts
# per output channel, into the convolutions, and a dense layer's MatMul + Add into a Gemm, as
# onnxruntime would
QUANTIZATION = Pipeline(
    "quantization",
    [*PRUNING.steps, RemoveIdentities, FoldBatchNorm, FoldConvAffine, FoldMatMulAdd],
)
# the trainable twin: BatchNormalization folded or made an affine map (never batch statistics)
TRAINING_TWIN = Pipeline("training twin", [LiftConstants, FoldBatchNorm, BatchNormToAffine])


def prepare_for_inference(model: ir.Model) -> dict:
    """The quantization pipeline: the clean-ups above in order, and what each did."""
    return QUANTIZATION(model)
