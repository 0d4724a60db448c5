"""Removing channels: slice every member, fix attributes and shape constants, re-infer shapes.

Given, per group, the group channels to remove, every slice member loses the positions those
channels occupy on its axis (``np.delete`` along the axis). An initializer read by nodes that
slice it differently (or by nodes outside the group) is copied per reader first, so no reader
sees another's cut. Then:

* a depthwise Conv's ``group`` becomes its new input channel count;
* a Reshape target that spells out a pruned dimension shrinks by the positions removed there;
* Split sizes shrink likewise;
* every intermediate shape is cleared and shape inference runs again in strict mode, so a rule
  that got a shape wrong fails here, loudly, instead of producing a broken model.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from onnxzip import io
from onnxzip.errors import InternalError, ModelError
from onnxzip.ir.ops import node_key
from onnxzip.passes import (
    add_initializer,
    bulk_edit,
    claim,
    const_array,
    dequantized_array,
    remove_dead,
    remove_unused_initializers,
)
from onnxzip.pruning.groups import Group


def cut_members(groups: list[Group], removal: dict[int, np.ndarray]):
    """(group, its removed channels, member) for every member of a group losing channels."""
    for group in groups:
        channels = removal.get(group.id)
        if channels is None or not len(channels):
            continue
        for member in group.slices:
            yield group, channels, member


def removed_positions(group: Group, channels: np.ndarray, positions: list) -> np.ndarray:
    if len(channels) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.concatenate([positions[c] for c in channels]))


@bulk_edit
def apply(
    model: ir.Model,
    groups: list[Group],
    removal: dict[int, np.ndarray],
    means: dict[tuple[str, int], np.ndarray] | None = None,
    compensated: dict[int, np.ndarray] | None = None,
    slices: dict | None = None,
) -> ir.Model:
    """Removes ``removal[group.id]`` channels from each group; returns the re-inferred model.

    With ``means`` (the mean of each consumed channel position over sample data), each consumer
    adds what the removed channels contributed on average to its bias (see ``compensate``): for
    the channels in ``compensated`` when given (e.g. only the dead ones), else for all removed.

    ``slices`` (a dict kept by the caller) shares the cut arrays between rewrites of clones of
    one model: a tensor cut the same way again is the array cut before, not a second copy of
    it (two rewrites that differ only in their biases hold the weights once). Each full tensor's
    memory-mapped pages are let go once it is cut.
    """
    graph = model.graph
    nodes = {node_key(n): n for n in graph}
    if means:
        compensate(model, nodes, groups, removal if compensated is None else compensated, means)
    # (initializer name) -> (node name) -> axis -> positions to delete
    cuts: dict[str, dict[str, dict[int, set]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(set))
    )
    values: dict[str, ir.Value] = {}
    removed_in_space: dict[tuple[str, int], int] = defaultdict(int)
    depthwise: dict[str, int] = {}
    for group in groups:
        channels = removal.get(group.id)
        if channels is None or len(channels) == 0:
            continue
        if group.blocked:
            raise InternalError(f"group {group.id} is blocked and cannot be pruned")
        for member in group.slices:
            cuts[member.value.name][member.node][member.axis].update(
                removed_positions(group, channels, member.positions).tolist()
            )
            values[member.value.name] = member.value
        for key, positions in group.spaces.items():
            removed_in_space[key] += int(sum(len(positions[c]) for c in channels))
        for name in group.depthwise:
            node = nodes[name]
            w = dequantized_array(node.inputs[1])
            depthwise[name] = w.shape[0] // node.attributes["group"].as_int()

    slices = {} if slices is None else slices
    for name, per_node in cuts.items():
        value = values[name]
        full = value.const_value
        specs = {
            n: tuple(sorted((a, tuple(sorted(p))) for a, p in axes.items()))
            for n, axes in per_node.items()
        }

        def cut(spec, axes, value=value, full=full):
            key = (id(full), spec)
            if key not in slices:  # the tensor is held with its slice, so its id stays its own
                slices[key] = (full, _cut(const_array(value), axes))
            return slices[key][1]

        readers = {node_key(u.node) for u in value.uses()}
        if len(set(specs.values())) == 1 and readers <= set(specs):
            owner = next(iter(per_node))
            sliced = cut(specs[owner], per_node[owner])
            value.const_value = ir.tensor(sliced, name=value.name)
            value.shape = ir.Shape(sliced.shape)
        else:
            for owner, axes in per_node.items():
                node = nodes[owner]
                copy = add_initializer(graph, f"{name}_{owner}", cut(specs[owner], axes))
                for i, inp in enumerate(node.inputs):
                    if inp is value:
                        node.replace_input_with(i, copy)
        io.drop_pages(full)  # cut: the full tensor's pages may go

    for name, multiplier in depthwise.items():
        node = nodes[name]
        cout = dequantized_array(node.inputs[1]).shape[0]
        node.attributes["group"] = ir.AttrInt64("group", cout // multiplier)

    from onnxzip.pruning.rules import shape_source

    for node in list(graph):
        if node.op_type in ("Reshape", "Expand"):
            # Reshape: -1 and 0 follow the input; Expand: 1 follows it. Other values shrink.
            follows = 0 if node.op_type == "Reshape" else 1
            out = node.outputs[0]
            changes = {a: n for (v, a), n in removed_in_space.items() if v == out.name and n}
            if changes and const_array(node.inputs[1]) is not None:
                shape = const_array(node.inputs[1]).copy()
                rank = _rank(out)
                if rank is None:  # Reshape: the target's length; Expand: at least that
                    rank = max(shape.size, _rank(node.inputs[0]) or 0)
                offset = rank - shape.size  # Expand's shape may be shorter
                for a, n in changes.items():
                    if shape[a - offset] > follows:
                        shape[a - offset] -= n
                node.replace_input_with(
                    1, add_initializer(graph, f"{out.name}_shape", shape.astype(np.int64))
                )
            elif changes and not (node.op_type == "Reshape" and shape_source(node.inputs[1])):
                # (a target read whole from another tensor's shape follows it by itself)
                _shrink_runtime_target(graph, node, changes, follows)
        elif node.op_type == "Split" and len(node.inputs) > 1 and node.inputs[1] is not None:
            axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 0
            rank = next((r for r in (_rank(v) for v in (node.inputs[0], *node.outputs)) if r), None)
            if rank is None and axis < 0:
                raise InternalError(f"pruning rewrite: {node_key(node)}: Split of unknown rank")
            axis = axis % rank if rank else axis
            removed = [removed_in_space.get((out.name, axis), 0) for out in node.outputs]
            if any(removed):
                sizes = const_array(node.inputs[1]).copy() - np.asarray(removed, dtype=np.int64)
                node.replace_input_with(
                    1, add_initializer(graph, f"{node_key(node)}_split", sizes.astype(np.int64))
                )

    remove_unused_initializers(model)
    try:
        return io.reinfer_shapes(model)
    except ModelError as exc:  # the rewrite, not the user's model, is inconsistent
        raise InternalError(f"pruning rewrite: {exc}") from exc


def _rank(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)


def _shrink_runtime_target(
    graph: ir.Graph, node: ir.Node, changes: dict[int, int], follows: int
) -> None:
    """A Reshape or Expand whose target is ``Concat(run-time dims, constant dims)``: the
    constant pieces that spell the pruned axes shrink (values up to ``follows`` take the input's
    dim and stay). The node gets a Concat of its own (exporters share one between the q, k and
    v reshapes, and between layers), so no other reader of the old one changes."""
    from onnxzip.pruning.rules import target_concat, target_pieces

    old_target = node.inputs[1]
    concat = target_concat(old_target)
    pieces = target_pieces(node.inputs[1])
    inputs = list(concat.inputs)
    skew = (_rank(node.outputs[0]) or len(pieces)) - len(pieces)
    for a, n in changes.items():
        _, k, offset = pieces[a - skew]
        array = const_array(inputs[k])  # inputs[k]: with any earlier change to it
        if array is None:
            continue  # read from a pruned tensor's shape at run time: it follows by itself
        array = array.copy()
        if array[offset] > follows:
            array[offset] -= n
        inputs[k] = add_initializer(graph, f"{node_key(node)}_target_{a}", array.astype(np.int64))
    new = ir.node("Concat", inputs, attributes={"axis": 0}, name=f"{node_key(node)}_target")
    new.outputs[0].name = f"{node_key(node)}_target_shape"
    claim(graph, new.outputs[0].name)
    graph.insert_before(node, new)
    node.replace_input_with(1, new.outputs[0])
    remove_dead(graph, [old_target])


_OUT_AXIS = {"Conv": 0, "MatMul": 1}


def _out_axis(node: ir.Node) -> int:
    if node.op_type == "Gemm":
        trans_b = "transB" in node.attributes and node.attributes["transB"].as_int()
        return 0 if trans_b else 1
    return _OUT_AXIS[node.op_type]


@bulk_edit
def compensate(
    model: ir.Model,
    nodes: dict[str, ir.Node],
    groups: list[Group],
    removal: dict[int, np.ndarray],
    means: dict[tuple[str, int], np.ndarray],
) -> None:
    """Folds the removed channels' mean contribution into each consumer's bias.

    A consumer ``y = W x + b`` loses ``sum_p W[:, p] x_p`` over the removed positions ``p``.
    Replacing ``x_p`` by its mean ``mu_p`` over the samples keeps the first-order behaviour:
    ``b' = b + sum_p W[:, p] mu_p`` (summed over the kernel window for a Conv). This is exact
    for Gemm/MatMul, and for Conv away from zero padding; for a dead channel (constant on the
    samples, a ReLU that never fires) it restores exactly what removal took away.
    """
    graph = model.graph
    deltas: dict[str, np.ndarray] = {}
    for group, channels, m in cut_members(groups, removal):
        if m.role != "in" or m.source not in means:
            continue
        node = nodes[m.node]
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        w = const_array(m.value).astype(np.float64)
        positions = removed_positions(group, channels, m.positions)
        mu = means[m.source][positions]
        taken = np.take(w, positions, axis=m.axis)  # the removed slices, axis m.axis
        moved = np.moveaxis(taken, m.axis, -1)  # [... , removed]
        contribution = moved @ mu  # the input axis contracted with the means
        out_axis = _out_axis(node)
        # Sum what is left besides the output axis (a Conv's kernel window).
        remaining_out = out_axis if out_axis < m.axis else out_axis - 1
        contribution = (
            np.moveaxis(contribution, remaining_out, 0)
            .reshape(contribution.shape[remaining_out], -1)
            .sum(axis=1)
        )
        deltas[m.node] = deltas.get(m.node, 0) + contribution
    for name, delta in deltas.items():
        node = nodes[name]
        out_axis = _out_axis(node)
        w_value = node.inputs[1]
        bias_index = 2
        reader = name  # the node that reads the new bias
        if node.op_type == "MatMul":
            old = node.outputs[0]
            bias = add_initializer(graph, f"{name}_pruning_bias", delta.astype(np.float32))
            add = ir.node("Add", [old, bias], name=f"{name}_pruning_bias")
            graph.insert_after(node, add)
            out_name = old.name
            old.replace_all_uses_with(add.outputs[0], replace_graph_outputs=True)
            add.replace_input_with(0, old)  # the line above redirected the Add's own input too
            old.name = f"{out_name}_before_bias"
            add.outputs[0].name = out_name
            claim(graph, old.name)
            new_bias = bias
            reader = node_key(add)
            nodes[reader] = add
        else:
            existing = node.inputs[bias_index] if len(node.inputs) > bias_index else None
            base = (
                const_array(existing) if existing is not None else np.zeros(delta.shape, np.float32)
            )
            if base.ndim != 1 or base.shape[0] != delta.shape[0]:
                continue  # a broadcast Gemm C: leave the bias alone
            new_bias = add_initializer(
                graph, f"{name}_bias_compensated", (base + delta).astype(np.float32)
            )
            if len(node.inputs) <= bias_index:
                node.resize_inputs(bias_index + 1)
            node.replace_input_with(bias_index, new_bias)
        # The new bias follows the node's output channels in every group that holds them, not
        # only in the groups compensated here (a consumer whose own outputs are pruned for
        # another reason would keep a bias of the old size).
        for group in groups:
            for m in list(group.slices):
                if m.node == name and m.role == "out" and m.value is w_value and m.axis == out_axis:
                    if not any(s.node == reader and s.value is new_bias for s in group.slices):
                        group.slices.append(
                            type(m)(reader, new_bias, 0, m.positions, "out", None, name)
                        )
                    old_bias = [
                        s
                        for s in group.slices
                        if s.node == name
                        and s.role == "out"
                        and s.value is not w_value
                        and s.value is not new_bias
                    ]
                    for s in old_bias:
                        group.slices.remove(s)


def _cut(array: np.ndarray, axes: dict[int, set]) -> np.ndarray:
    out = array
    for axis, positions in axes.items():
        out = np.delete(out, sorted(positions), axis=axis)
    return np.ascontiguousarray(out)
