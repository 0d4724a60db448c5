"""Dynamic quantization of MatMul/Gemm with constant weights (transformer projections, FFNs),
and of embedding tables (``Gather`` from a constant table: int8 rows, one scale per column).

Weights are quantized once, per output column, symmetric int8: ``W = S_w[n] Wq[:, n]``.
Activations are quantized at run time, per tensor, by ``DynamicQuantizeLinear`` (uint8, range
from the current batch, so no calibration). With ``x = S_x (xq - Z_x)``::

    x @ W = S_x S_w[n] * ((xq - Z_x) @ Wq[:, n])

which is ``MatMulInteger(xq, Wq, Z_x, 0)`` (an int32 accumulator), cast to float and scaled by
``S_x * S_w``. onnxruntime fuses the pattern into ``DynamicQuantizeMatMul``. One
``DynamicQuantizeLinear`` serves every projection that reads the same activation (Q, K and V
share their input). A Gemm with ``transA = 0`` and ``alpha = beta = 1`` is handled as a MatMul
followed by the Add of its bias.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxzip import io
from onnxzip.config import IgnoredScope
from onnxzip.ir.ops import LOGARITHM_REASON, logarithm_front_end
from onnxzip.passes import (
    add_initializer,
    bulk_edit,
    const_array,
    remove_unused_initializers,
    replace_node,
)
from onnxzip.quantize import params as qp

logger = logging.getLogger(__name__)


@dataclass
class DynamicResult:
    quantized: dict[str, str] = field(default_factory=dict)  # node -> op type
    kept_float: dict[str, str] = field(default_factory=dict)  # node -> reason


def _float32(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == ir.DataType.FLOAT


def _weight_matrix(node: ir.Node) -> tuple[np.ndarray | None, str | None]:
    b = const_array(node.inputs[1])
    if b is None or b.ndim != 2 or b.dtype != np.float32:
        return None, "weight is not a constant 2-D float32 initializer"
    if node.op_type == "Gemm":
        attrs = {k: v.value for k, v in node.attributes.items()}
        if (
            attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
        ):
            return None, "Gemm with transA, alpha or beta other than the defaults"
        if attrs.get("transB", 0):
            b = np.ascontiguousarray(b.T)
    return b, None


def float_weight(node: ir.Node) -> tuple[np.ndarray | None, str | None]:
    """The ``[K, N]`` weight of a MatMul/Gemm whose input is float32, or why there is none."""
    if not _float32(node.inputs[0]):
        return None, "input is not float32"
    return _weight_matrix(node)


MIN_TABLE = 4096  # elements: smaller Gather tables (index maps, shape helpers) stay as they are


def quantize_table(graph: ir.Graph, node: ir.Node, key: str) -> str | None:
    """An embedding lookup ``Gather(table, ids)`` on axis 0 of a constant float table becomes
    ``DequantizeLinear(Gather(table_q, ids), s, 0, axis=-1)``: rows are gathered as int8 codes and
    dequantized with one symmetric scale per column (the embedding feature). Returns why not."""
    table = const_array(node.inputs[0])
    axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 0
    if table is None or table.dtype != np.float32 or table.ndim != 2 or table.size < MIN_TABLE:
        return "not a constant 2-D float32 table"
    if axis != 0:
        return "gathers along another axis than the rows"
    params = qp.weight_params(table, axis=1)
    codes = qp.quantize(table, params, symmetric_weight=True)
    io.drop_pages(node.inputs[0].const_value)  # read once: its pages may go
    t_q = add_initializer(graph, f"{key}.table_quantized", codes)
    t_scale = add_initializer(graph, f"{key}.table_scale", params.scale.astype(np.float32))
    t_zp = add_initializer(graph, f"{key}.table_zero_point", np.zeros(table.shape[1], np.int8))
    gather = ir.node("Gather", [t_q, node.inputs[1]], attributes={"axis": 0}, name=f"{key}_codes")
    gather.outputs[0].name = f"{key}_codes"
    dq = ir.node(
        "DequantizeLinear",
        [gather.outputs[0], t_scale, t_zp],
        attributes={"axis": -1},
        name=f"{key}_DequantizeLinear",
    )
    dq.outputs[0].name = f"{key}_DequantizeLinear"
    replace_node(graph, node, [gather, dq], dq.outputs[0])
    return None


@bulk_edit
def quantize_dynamic(
    model: ir.Model, exclude: IgnoredScope | tuple[str, ...] = (), pair_safe: bool = False
) -> DynamicResult:
    """Rewrites eligible MatMul/Gemm nodes of ``model`` in place; ``pair_safe`` as in
    ``params.weight_params`` (embedding tables are only gathered, so they keep the full range)."""
    graph = model.graph
    exclude = IgnoredScope.of(exclude)
    result = DynamicResult()
    activations: dict[int, tuple[ir.Value, ir.Value, ir.Value]] = {}
    front_end = logarithm_front_end(graph)
    for node in list(graph):
        if node.op_type not in ("MatMul", "Gemm", "Gather") or node.domain not in ("", "ai.onnx"):
            continue
        key = node.name or node.outputs[0].name
        if exclude.matches(node):
            result.kept_float[key] = "excluded by the user"
            continue
        if key in front_end:
            # dynamic int8 quantizes the activation per tensor: the same absolute step
            result.kept_float[key] = LOGARITHM_REASON
            continue
        if node.op_type == "Gather":
            reason = quantize_table(graph, node, key)
            if reason is None:
                result.quantized[key] = "Gather"
            continue
        w, reason = float_weight(node)
        if w is None:
            result.kept_float[key] = reason
            continue
        bias = None
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = node.inputs[2]
        params = qp.weight_params(w, axis=1, pair_safe=pair_safe)
        codes = qp.quantize(w, params, symmetric_weight=True)
        io.drop_pages(node.inputs[1].const_value)  # read once: its pages may go
        base = key
        w_q = add_initializer(graph, f"{base}.weight_quantized", codes)
        w_zp = add_initializer(graph, f"{base}.weight_zero_point", np.zeros(w.shape[1], np.int8))
        w_scale = add_initializer(graph, f"{base}.weight_scale", params.scale.astype(np.float32))

        x = node.inputs[0]
        new_nodes = []
        if id(x) not in activations:
            dql = ir.node(
                "DynamicQuantizeLinear", [x], num_outputs=3, name=f"{base}_DynamicQuantizeLinear"
            )
            for out, suffix in zip(dql.outputs, ("quantized", "scale", "zero_point"), strict=True):
                out.name = f"{x.name}_dynamic_{suffix}"
            new_nodes.append(dql)
            activations[id(x)] = tuple(dql.outputs)
        x_q, x_scale, x_zp = activations[id(x)]
        mm = ir.node("MatMulInteger", [x_q, w_q, x_zp, w_zp], name=f"{base}_MatMulInteger")
        cast = ir.node(
            "Cast", [mm.outputs[0]], attributes={"to": ir.DataType.FLOAT}, name=f"{base}_Cast"
        )
        scale = ir.node("Mul", [x_scale, w_scale], name=f"{base}_scale")
        out = ir.node("Mul", [cast.outputs[0], scale.outputs[0]], name=f"{base}_output")
        new_nodes += [mm, cast, scale, out]
        result_value = out.outputs[0]
        if bias is not None:
            add = ir.node("Add", [out.outputs[0], bias], name=f"{base}_bias")
            new_nodes.append(add)
            result_value = add.outputs[0]
        for n in new_nodes:
            for v in n.outputs:
                if v.name is None:
                    v.name = n.name
        replace_node(graph, node, new_nodes, result_value)
        result.quantized[key] = node.op_type
    remove_unused_initializers(model)
    return result
