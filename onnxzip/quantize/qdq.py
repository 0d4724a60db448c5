"""The one place that builds QuantizeLinear/DequantizeLinear nodes, from a ``Plan``.

For an activation ``t`` with parameters ``(S, Z)``: ``t -> Q -> t_q -> DQ -> t_dq`` is inserted
after ``t``'s producer and every consumer of ``t`` reads ``t_dq`` instead (one pair shared by all
consumers). When ``t`` is a graph output, the output keeps its name and becomes the DQ result.

For a weight ``W`` (an initializer): the int8 codes are stored as a new initializer and one
``DequantizeLinear`` (per-channel ``axis``) feeds every consumer that quantizes ``W`` the same
way. A bias ``b`` becomes int32 codes with scale ``S_x * S_w`` and zero-point 0. ReLU/Clip nodes
folded into their producer's range are removed before anything is inserted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxzip.passes import add_initializer, const_array, remove_unused_initializers
from onnxzip.quantize import params as qp
from onnxzip.quantize.rules import Plan, node_key

logger = logging.getLogger(__name__)


@dataclass
class InsertResult:
    qdq_pairs: int
    weights: int
    biases: int
    bias_saturated: int


class _Names:
    def __init__(self, graph: ir.Graph):
        self.taken = set(graph.initializers)
        self.taken.update(v.name for v in graph.inputs if v.name)
        for node in ir.traversal.RecursiveGraphIterator(graph):
            self.taken.update(v.name for v in node.outputs if v.name)
            if node.name:
                self.taken.add(node.name)

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name = f"{base}_{i}"
            i += 1
        self.taken.add(name)
        return name


def _scalar_init(graph: ir.Graph, names: _Names, base: str, array: np.ndarray) -> ir.Value:
    return add_initializer(graph, names.fresh(base), np.asarray(array), name_is_unique=True)


def insert_qdq(
    model: ir.Model,
    plan: Plan,
    activation_params: dict[str, qp.QParams],
    activation_type: str = "uint8",
    pair_safe: bool = False,
    weight_codes: dict | None = None,
) -> InsertResult:
    """Edits ``model`` in place. ``activation_params`` maps every planned tensor to its params;
    ``pair_safe`` picks the weight scales of ``params.weight_params(pair_safe=True)`` for every
    weight the rules did not mark as full-range (a depthwise Conv's). ``weight_codes`` (a dict
    the caller keeps across builds of one prepared model) holds each weight's parameters and
    int8 codes: a rebuild takes a weight's parameters, and its codes under the same scales,
    from there."""
    graph = model.graph
    names = _Names(graph)
    nodes = {node_key(n): n for n in graph}
    values = {}
    for v in graph.inputs:
        values[v.name] = v
    for n in graph:
        for v in n.outputs:
            if v.name:
                values[v.name] = v

    # 1. Folded activations disappear: their consumers read the producer's output.
    for key, target in plan.folded.items():
        node = nodes[key]
        folded_out, producer_out = node.outputs[0], values[target]
        output_name = folded_out.name if folded_out.is_graph_output() else None
        folded_out.replace_all_uses_with(producer_out, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        if output_name is not None:
            producer_out.name = output_name  # a graph output keeps its name

    # 2. Activations: one Q/DQ pair per tensor, shared by all its consumers.
    pairs = 0
    planned = list(plan.activations) + [t for t in plan.shared if t not in plan.activations]
    for tensor in planned:
        value = values[tensor]
        p = activation_params[tensor]
        scale = _scalar_init(graph, names, f"{tensor}_scale", p.scale)
        zero = _scalar_init(graph, names, f"{tensor}_zero_point", p.zero_point)
        q = ir.node(
            "QuantizeLinear", [value, scale, zero], name=names.fresh(f"{tensor}_QuantizeLinear")
        )
        dq = ir.node(
            "DequantizeLinear",
            [q.outputs[0], scale, zero],
            name=names.fresh(f"{tensor}_DequantizeLinear"),
        )
        q.outputs[0].name = names.fresh(f"{tensor}_quantized")
        q.outputs[0].dtype = ir.DataType.from_numpy(p.dtype)
        q.outputs[0].shape = value.shape
        dq.outputs[0].dtype = value.dtype
        dq.outputs[0].shape = value.shape
        producer = value.producer()
        if producer is None:
            graph.insert_before(next(iter(graph)), [q, dq])
        else:
            graph.insert_after(producer, [q, dq])
        for node, index in list(value.uses()):
            # Subgraphs (If/Loop/Scan bodies) keep reading the float tensor: they stay as written.
            if node is not q and node.graph is graph:
                node.replace_input_with(index, dq.outputs[0])
        if value.is_graph_output():
            # The output keeps its name and now carries the quantized result.
            original = value.name
            value.name = names.fresh(f"{original}_float")
            for i, out in enumerate(graph.outputs):
                if out is value:
                    graph.outputs[i] = dq.outputs[0]
            dq.outputs[0].name = original
        else:
            dq.outputs[0].name = names.fresh(f"{tensor}_dequantized")
        pairs += 1

    # 3. Weights: int8 codes, per-channel scales, one DQ per (initializer, axis); a weight
    # read by one layer gets scales its int32 bias fits (params.fit_bias).
    weight_params: dict[tuple[str, int], qp.QParams] = {}
    shared_dq: dict[tuple[str, int | None, bool], tuple[ir.Value, qp.QParams]] = {}
    bias_of = {
        (key, w_index): (index, x_name) for (key, index), (x_name, w_index) in plan.biases.items()
    }
    raised = 0
    for (key, index), axis in plan.weights.items():
        node = nodes[key]
        w_value = node.inputs[index]
        safe = pair_safe and (key, index) not in plan.full_range_weights
        cache = (w_value.name, axis, safe)
        if cache not in shared_dq:
            w = const_array(w_value)
            p = _weight_params(weight_codes, w_value, w, axis, safe)
            bias = bias_of.get((key, index))
            x_params = activation_params.get(plan.resolve(bias[1])) if bias else None
            if x_params is not None and len(w_value.uses()) == 1:
                p, n = qp.fit_bias(p, x_params.scale, const_array(node.inputs[bias[0]]))
                raised += n
            codes = _weight_codes(weight_codes, w_value, w, axis, p)
            q_init = _scalar_init(graph, names, f"{w_value.name}_quantized", codes)
            s_init = _scalar_init(graph, names, f"{w_value.name}_scale", p.scale)
            z_init = _scalar_init(graph, names, f"{w_value.name}_zero_point", p.zero_point)
            attrs = {"axis": int(axis)} if axis is not None else None
            dq = ir.node(
                "DequantizeLinear",
                [q_init, s_init, z_init],
                attributes=attrs,
                name=names.fresh(f"{w_value.name}_DequantizeLinear"),
            )
            dq.outputs[0].name = names.fresh(f"{w_value.name}_dequantized")
            dq.outputs[0].dtype = w_value.dtype
            dq.outputs[0].shape = w_value.shape
            graph.insert_before(node, dq)
            shared_dq[cache] = (dq.outputs[0], p)
        else:
            _ensure_before(
                graph, shared_dq[cache][0].producer(), node
            )  # shared with an earlier consumer
        out, p = shared_dq[cache]
        node.replace_input_with(index, out)
        weight_params[(key, index)] = p

    # Constant inputs of Add/Mul/Concat: per-tensor codes of the activation type, own range.
    for key, index in sorted(plan.constants):
        node = nodes[key]
        c_value = node.inputs[index]
        c = const_array(c_value)
        p = qp.activation_params(float(c.min()), float(c.max()), activation_type)
        codes = qp.quantize(c, p)
        q_init = _scalar_init(graph, names, f"{c_value.name}_quantized", codes)
        s_init = _scalar_init(graph, names, f"{c_value.name}_scale", p.scale)
        z_init = _scalar_init(graph, names, f"{c_value.name}_zero_point", p.zero_point)
        dq = ir.node(
            "DequantizeLinear",
            [q_init, s_init, z_init],
            name=names.fresh(f"{c_value.name}_DequantizeLinear"),
        )
        dq.outputs[0].name = names.fresh(f"{c_value.name}_dequantized")
        dq.outputs[0].dtype = c_value.dtype
        dq.outputs[0].shape = c_value.shape
        graph.insert_before(node, dq)
        node.replace_input_with(index, dq.outputs[0])

    # 4. Biases: int32 codes with scale S_x * S_w[c].
    saturated = 0
    biases = 0
    for (key, index), (x_name, w_index) in plan.biases.items():
        node = nodes[key]
        x_params = activation_params.get(plan.resolve(x_name))
        w_params = weight_params.get((key, w_index))
        if x_params is None or w_params is None:
            continue
        b_value = node.inputs[index]
        b = const_array(b_value)
        p = qp.bias_params(x_params.scale, w_params)
        if p.scale.ndim == 0 or p.scale.shape[0] != b.shape[0]:
            p = qp.QParams(
                np.broadcast_to(p.scale, b.shape).astype(np.float32).copy(),
                np.zeros(b.shape, dtype=np.int32),
                0,
            )
        codes, sat = qp.quantize_bias(b, p)
        saturated += sat
        q_init = _scalar_init(graph, names, f"{b_value.name}_quantized", codes)
        s_init = _scalar_init(graph, names, f"{b_value.name}_scale", p.scale)
        z_init = _scalar_init(graph, names, f"{b_value.name}_zero_point", p.zero_point)
        dq = ir.node(
            "DequantizeLinear",
            [q_init, s_init, z_init],
            attributes={"axis": 0},
            name=names.fresh(f"{b_value.name}_DequantizeLinear"),
        )
        dq.outputs[0].name = names.fresh(f"{b_value.name}_dequantized")
        dq.outputs[0].dtype = b_value.dtype
        dq.outputs[0].shape = b_value.shape
        graph.insert_before(node, dq)
        node.replace_input_with(index, dq.outputs[0])
        biases += 1
    if raised:
        logger.info("%d weight channels' scales raised so that their int32 biases fit", raised)
    if saturated:
        logger.warning(
            "%d bias values saturated int32: their layers' input scales are tiny", saturated
        )

    remove_unused_initializers(model)
    return InsertResult(pairs, len(shared_dq), biases, saturated)


def _cached(cache: dict | None, key: tuple, value: ir.Value, compute):
    """``compute()``, or what it gave before for ``key`` on the very tensor object of ``value``
    (a cache that travelled to another process never serves a different tensor of the same
    name); ``cache`` None: no caching."""
    if cache is None:
        return compute()
    hit = cache.get(key)
    if hit is not None and hit[0] is value.const_value:
        return hit[1]
    result = compute()
    cache[key] = (value.const_value, result)
    return result


def _weight_params(
    cache: dict | None, value: ir.Value, w: np.ndarray, axis: int | None, safe: bool
) -> qp.QParams:
    """``params.weight_params`` of ``w`` (they depend on the weight and the axis alone)."""
    key = ("params", value.name, axis, safe)
    return _cached(cache, key, value, lambda: qp.weight_params(w, axis, pair_safe=safe))


def _weight_codes(
    cache: dict | None, value: ir.Value, w: np.ndarray, axis: int | None, p: qp.QParams
) -> np.ndarray:
    """``w``'s symmetric int8 codes under ``p`` (the same codes for the same scales)."""
    zero = np.asarray(p.zero_point)
    key = (value.name, axis, p.axis, np.asarray(p.scale).tobytes(), zero.tobytes(), zero.dtype.str)
    return _cached(cache, key, value, lambda: qp.quantize(w, p, symmetric_weight=True))


def _ensure_before(graph: ir.Graph, producer: ir.Node | None, consumer: ir.Node) -> None:
    """A DQ shared by several consumers must precede all of them in the node order."""
    if producer is None:
        return
    order = {id(n): i for i, n in enumerate(graph)}
    if order[id(producer)] > order[id(consumer)]:
        graph.remove(producer)
        graph.insert_before(consumer, producer)
