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
from onnxzip.errors import ModelError
from onnxzip.passes import add_initializer, const_array, remove_unused_initializers
from onnxzip.pruning.groups import Group, node_name


def removed_positions(group: Group, channels: np.ndarray, positions: list) -> np.ndarray:
    if len(channels) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.concatenate([positions[c] for c in channels]))


def apply(model: ir.Model, groups: list[Group], removal: dict[int, np.ndarray]) -> ir.Model:
    """Removes ``removal[group.id]`` channels from each group; returns the re-inferred model."""
    graph = model.graph
    nodes = {node_name(n): n for n in graph}
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
            raise ModelError(f"internal: group {group.id} is blocked and cannot be pruned")
        for member in group.slices:
            cuts[member.value.name][member.node][member.axis].update(
                removed_positions(group, channels, member.positions).tolist()
            )
            values[member.value.name] = member.value
        for key, positions in group.spaces.items():
            removed_in_space[key] += int(sum(len(positions[c]) for c in channels))
        for name in group.depthwise:
            node = nodes[name]
            w = const_array(node.inputs[1])
            depthwise[name] = w.shape[0] // node.attributes["group"].as_int()

    for name, per_node in cuts.items():
        value = values[name]
        array = const_array(value)
        specs = {
            n: tuple(sorted((a, tuple(sorted(p))) for a, p in axes.items()))
            for n, axes in per_node.items()
        }
        readers = {node_name(u.node) for u in value.uses()}
        if len(set(specs.values())) == 1 and readers <= set(specs):
            sliced = _cut(array, per_node[next(iter(per_node))])
            value.const_value = ir.tensor(sliced, name=value.name)
            value.shape = ir.Shape(sliced.shape)
            continue
        for node_key, axes in per_node.items():
            node = nodes[node_key]
            sliced = _cut(array, axes)
            copy = add_initializer(graph, f"{name}_{node_key}", sliced)
            for i, inp in enumerate(node.inputs):
                if inp is value:
                    node.replace_input_with(i, copy)

    for name, multiplier in depthwise.items():
        node = nodes[name]
        cout = const_array(node.inputs[1]).shape[0]
        node.attributes["group"] = ir.AttrInt64("group", cout // multiplier)

    for node in graph:
        if node.op_type == "Reshape":
            out = node.outputs[0]
            changes = {a: n for (v, a), n in removed_in_space.items() if v == out.name and n}
            if changes:
                shape = const_array(node.inputs[1]).copy()
                for a, n in changes.items():
                    if shape[a] > 0:
                        shape[a] -= n
                node.replace_input_with(
                    1, add_initializer(graph, f"{out.name}_shape", shape.astype(np.int64))
                )
        elif node.op_type == "Split" and len(node.inputs) > 1 and node.inputs[1] is not None:
            axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 0
            rank = len(node.inputs[0].shape)
            sizes = const_array(node.inputs[1]).copy()
            changed = False
            for j, out in enumerate(node.outputs):
                n = removed_in_space.get((out.name, axis % rank), 0)
                if n:
                    sizes[j] -= n
                    changed = True
            if changed:
                node.replace_input_with(
                    1, add_initializer(graph, f"{node_name(node)}_split", sizes.astype(np.int64))
                )

    remove_unused_initializers(model)
    return io.reinfer_shapes(model)


def _cut(array: np.ndarray, axes: dict[int, set]) -> np.ndarray:
    out = array
    for axis, positions in axes.items():
        out = np.delete(out, sorted(positions), axis=axis)
    return np.ascontiguousarray(out)
