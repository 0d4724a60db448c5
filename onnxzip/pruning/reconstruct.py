"""Gradient-free recovery after pruning: least-squares reconstruction of each affected layer.

After channels are removed, every consumer of a pruned group reads fewer inputs. Layer by layer,
in graph order, each such Conv (2-D, ungrouped), Gemm or MatMul (2-D constant weight) gets new
weights and bias fitted by ridge-regularised least squares, so that on the samples its output
(the kept output channels) matches what the unpruned layer computed from the unpruned inputs:

    min_{W, b}  || [X' 1] [W; b] - Y ||^2 + lambda sum_j ||x'_j||^2 ||W_j||^2

with ``X'`` the layer's inputs in the pruned model (already reconstructed upstream, so errors do
not pile up) and ``Y`` the reference layer's outputs (He, Zhang and Sun, "Channel Pruning for
Accelerating Very Deep Neural Networks", 2017; the mean compensation of the biases is its
zeroth-order case). Convolutions are fitted on patches at sampled output positions. A fit is
kept only when it lowers the layer's error on rows it was not fitted on. No gradients and no
training engine are involved: this is the recovery wherever onnxruntime-training cannot run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from onnxzip import progress
from onnxzip.data import Samples
from onnxzip.ir import ops
from onnxzip.ir.ops import attr as _attr
from onnxzip.ir.ops import node_key
from onnxzip.passes import add_initializer, const_array
from onnxzip.runtime import Runner, expose

logger = logging.getLogger(__name__)


@dataclass
class LayerFit:
    node: str
    op_type: str
    rows: int
    error_before: float  # relative error of the layer output on held-out rows, before the fit
    error_after: float | None  # None when the fit was not kept (or not tried)
    note: str = ""


def _layout(node: ir.Node) -> tuple[int, int] | None:
    """(input axis, output axis) of the node's float weight, or None when it cannot be refitted
    (grouped or auto-padded Conv, scaled or transposed-A Gemm, batched MatMul weights)."""
    w = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if w is None or w.dtype != np.float32:
        return None
    if node.op_type == "Conv":
        if ops.groups(node) != 1 or w.ndim != 4:
            return None
        if _attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return None
    elif node.op_type == "Gemm":
        if (
            _attr(node, "transA", 0)
            or _attr(node, "alpha", 1.0) != 1
            or _attr(node, "beta", 1.0) != 1
        ):
            return None
    elif node.op_type != "MatMul" or w.ndim != 2:
        return None
    return ops.weight_input_axis(node) % w.ndim, ops.weight_channel_axis(node) % w.ndim


def _as_matrix(node: ir.Node, w: np.ndarray, out_axis: int) -> np.ndarray:
    """The weight as an [inputs, outputs] matrix over the row layout (a Conv's patches)."""
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], -1).T
    return w if out_axis == 1 else w.T


def _from_matrix(node: ir.Node, m: np.ndarray, shape: tuple, out_axis: int) -> np.ndarray:
    if node.op_type == "Conv":
        return m.T.reshape(shape)
    return m if out_axis == 1 else m.T


def _bias_problem(node: ir.Node) -> str | None:
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and (const_array(bias) is None or const_array(bias).ndim != 1):
        return "bias not a constant vector"
    return None


def _pick(node: ir.Node, y: np.ndarray, picks: int, rng) -> np.ndarray:
    """Which output rows of this batch to fit on: flat indices into (sample, height, width) for a
    Conv, into every leading axis for Gemm/MatMul."""
    if node.op_type == "Conv":
        total = y.shape[0] * y.shape[2] * y.shape[3]
    else:
        total = int(np.prod(y.shape[:-1]))
    return rng.choice(total, size=min(picks, total), replace=False)


def _out_rows(node: ir.Node, y: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """The layer's output rows at the picked positions."""
    if node.op_type != "Conv":
        return y.reshape(-1, y.shape[-1])[flat]
    ni, rest = np.divmod(flat, y.shape[2] * y.shape[3])
    hi, wi = np.divmod(rest, y.shape[3])
    return y[ni, :, hi, wi]


def _in_rows(node: ir.Node, x: np.ndarray, flat: np.ndarray, out_hw: tuple) -> np.ndarray:
    """The layer's input rows at the picked positions: for a Conv, the patch each picked output
    position reads (``out_hw``: the output's height and width)."""
    if node.op_type != "Conv":
        return x.reshape(-1, x.shape[-1])[flat]
    kh, kw = const_array(node.inputs[1]).shape[2:]
    sh, sw = _attr(node, "strides", [1, 1])
    dh, dw = _attr(node, "dilations", [1, 1])
    pads = _attr(node, "pads", [0, 0, 0, 0])
    oh, ow = out_hw
    ni, rest = np.divmod(flat, oh * ow)
    hi, wi = np.divmod(rest, ow)
    # input coordinates of each patch element; those in the padding read zero (the input is
    # indexed where it is, not padded whole: a large feature map would be copied per layer)
    rows_h = (hi * sh - pads[0])[:, None] + (np.arange(kh) * dh)[None, :]  # [R, kh]
    rows_w = (wi * sw - pads[1])[:, None] + (np.arange(kw) * dw)[None, :]  # [R, kw]
    inside_h = (rows_h >= 0) & (rows_h < x.shape[2])
    inside_w = (rows_w >= 0) & (rows_w < x.shape[3])
    patches = x[ni[:, None, None, None], np.arange(x.shape[1])[None, :, None, None],
                np.clip(rows_h, 0, x.shape[2] - 1)[:, None, :, None],
                np.clip(rows_w, 0, x.shape[3] - 1)[:, None, None, :]]  # fmt: skip
    inside = inside_h[:, None, :, None] & inside_w[:, None, None, :]
    return np.where(inside, patches, 0).reshape(len(flat), -1).astype(np.float64)


def _relative_error(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.linalg.norm(pred - target) / (np.linalg.norm(target) + 1e-12))


def reconstruct(
    reference: ir.Model,
    pruned: ir.Model,
    kept: dict[str, dict[int, np.ndarray]],
    samples: Samples,
    *,
    batch_size: int = 32,
    split: str = "all",
    holdout: float = 0.0,
    max_samples: int = 256,
    rows_per_layer: int = 8192,
    ridge: float = 1e-4,
    seed: int = 0,
) -> tuple[ir.Model, list[LayerFit]]:
    """Refits the affected layers of ``pruned`` (see the module text), in place and returned.

    ``reference`` is the unpruned model with the same node names (prepared the same way);
    ``kept[node][axis]`` are the original positions each weight kept on each cut axis.
    """
    rng = np.random.default_rng(seed)
    ref_nodes = {node_key(n): n for n in reference.graph}
    todo = []
    fits: list[LayerFit] = []
    for node in pruned.graph:
        name = node_key(node)
        layout = _layout(node)
        if name not in kept or name not in ref_nodes or layout is None:
            continue
        in_axis, out_axis = layout
        if in_axis not in kept[name]:
            continue  # its inputs are whole: nothing upstream was removed
        problem = _bias_problem(node)
        if problem is not None:  # known before any run: not fitted
            fits.append(LayerFit(name, node.op_type, 0, float("nan"), None, problem))
            continue
        todo.append((node, in_axis, out_axis))
    if not todo:
        return pruned, fits
    # One pass of the reference: each layer's target rows at positions picked per batch.
    targets = [ref_nodes[node_key(n)].outputs[0].name for n, _, _ in todo]
    teacher = Runner(expose(reference, targets), name="reference", optimization="none")
    # (picked positions, output height and width) per batch, and the target rows there
    picked: dict[str, list[tuple[np.ndarray, tuple]]] = {node_key(n): [] for n, _, _ in todo}
    wanted: dict[str, list[np.ndarray]] = {node_key(n): [] for n, _, _ in todo}
    seen = 0
    for batch in samples.batches(batch_size, split, holdout or 0.5):
        out = teacher.run(batch, targets)
        share = max(1, rows_per_layer * len(batch) // max_samples)
        for node, _, out_axis in todo:
            name = node_key(node)
            y = out[ref_nodes[name].outputs[0].name]
            keep_out = kept[name].get(out_axis)
            if keep_out is not None:
                y = np.take(y, keep_out, axis=1 if node.op_type == "Conv" else -1)
            flat = _pick(node, y, share, rng)
            picked[name].append((flat, tuple(y.shape[2:4])))
            wanted[name].append(_out_rows(node, y, flat).astype(np.float64))
        del out
        seen += len(batch)
        if seen >= max_samples:
            break
    # Layers in graph order; the next layers none of which reads another's output (sibling
    # heads, parallel branches) get their inputs from one pass: each input depends only on
    # the layers upstream of it, already refitted, so the fits are those of one pass each.
    upstream = _upstream_layers(pruned, [n for n, _, _ in todo])
    rows: dict[str, np.ndarray] = {}
    for index, (node, _in_axis, out_axis) in enumerate(
        progress.bar(todo, desc="reconstruct", unit="layer")
    ):
        name = node_key(node)
        if name not in rows:
            group = [todo[index][0]]
            for later, _, _ in todo[index + 1 :]:
                if any(id(g) in upstream[id(later)] for g in group):
                    break
                group.append(later)
            rows.update(
                _layer_rows(pruned, group, picked, samples, batch_size, split, holdout or 0.5)
            )
        x_rows = rows.pop(name)
        y_rows = np.concatenate(wanted[name])
        order = rng.permutation(len(x_rows))
        cut = max(1, len(order) // 5)
        test, train = order[:cut], order[cut:]
        w = const_array(node.inputs[1]).astype(np.float64)
        matrix = _as_matrix(node, w, out_axis)
        b = (
            const_array(node.inputs[2])
            if len(node.inputs) > 2 and node.inputs[2] is not None
            else None
        )
        if b is None and node.op_type == "MatMul":
            add = _compensation_add(node)
            b = const_array(add.inputs[1]) if add is not None else None
        bias = np.zeros(matrix.shape[1]) if b is None else b.astype(np.float64)
        before = _relative_error(x_rows[test] @ matrix + bias, y_rows[test])
        if len(train) < x_rows.shape[1] // 4:
            fits.append(LayerFit(name, node.op_type, len(x_rows), before, None, "too few rows"))
            continue
        a = np.concatenate([x_rows[train], np.ones((len(train), 1))], axis=1)
        gram = a.T @ a
        # Each weight is shrunk relative to its own input's energy (a column 100x smaller must
        # not be penalised 10,000x more), and the intercept not at all.
        reg = ridge * np.diag(gram) + 1e-12
        reg[-1] = 0.0
        theta = np.linalg.solve(gram + np.diag(reg), a.T @ y_rows[train])
        new_matrix, new_bias = theta[:-1], theta[-1]
        after = _relative_error(x_rows[test] @ new_matrix + new_bias, y_rows[test])
        if not after < before:
            fits.append(LayerFit(name, node.op_type, len(x_rows), before, None, "fit not better"))
            continue
        new_w = _from_matrix(node, new_matrix, w.shape, out_axis)
        _set_weights(pruned.graph, node, new_w.astype(np.float32), new_bias.astype(np.float32))
        fits.append(LayerFit(name, node.op_type, len(x_rows), before, after))
        logger.info("reconstruct %s: relative error %.4f -> %.4f", name, before, after)
    return pruned, fits


def _prefix(model: ir.Model, names: list[str]) -> ir.Model:
    """A copy of ``model`` that computes only the tensors ``names``: the nodes they depend on
    (a layer early in the graph is refitted at the cost of the graph up to it, not of all)."""
    exposed = expose(model, names)
    graph = exposed.graph
    targets = [next(v for v in graph.outputs if v.name == name) for name in names]
    graph.outputs.clear()
    graph.outputs.extend(targets)
    onnx_ir.passes.common.RemoveUnusedNodesPass()(exposed)
    return exposed


def _upstream_layers(model: ir.Model, layers: list[ir.Node]) -> dict[int, set[int]]:
    """Per layer (by id), the ids of the other ``layers`` its input depends on."""
    wanted = {id(n) for n in layers}
    memo: dict[int, frozenset[int]] = {}
    for node in model.graph:  # topological: every producer is seen before its readers
        found: set[int] = set()
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and id(producer) in memo:
                found |= memo[id(producer)]
                if id(producer) in wanted:
                    found.add(id(producer))
        memo[id(node)] = frozenset(found)
    result = {}
    for layer in layers:
        producer = layer.inputs[0].producer()
        above = set(memo.get(id(producer), frozenset())) if producer is not None else set()
        if producer is not None and id(producer) in wanted:
            above.add(id(producer))
        result[id(layer)] = above
    return result


def _layer_rows(pruned, group, picked, samples, batch_size, split, holdout) -> dict:
    """The picked input rows of every layer of ``group`` in the pruned model, from one pass
    over the same batches the targets came from (the stream is deterministic)."""
    names = list(dict.fromkeys(n.inputs[0].name for n in group))
    student = Runner(_prefix(pruned, names), name="pruned model", optimization="none")
    xs: dict[str, list[np.ndarray]] = {node_key(n): [] for n in group}
    stream = samples.batches(batch_size, split, holdout)
    for k, batch in enumerate(stream):
        if k >= max(len(picked[node_key(n)]) for n in group):
            break
        out = student.run(batch, names)
        for n in group:
            if k < len(picked[node_key(n)]):
                flat, out_hw = picked[node_key(n)][k]
                xs[node_key(n)].append(
                    _in_rows(n, out[n.inputs[0].name], flat, out_hw).astype(np.float64)
                )
    return {key: np.concatenate(parts) for key, parts in xs.items()}


def _compensation_add(node: ir.Node) -> ir.Node | None:
    """The Add that mean compensation put after a MatMul (rewrite.compensate), if any."""
    for use in node.outputs[0].uses():
        if use.node.op_type == "Add" and use.node.name == f"{node_key(node)}_pruning_bias":
            return use.node
    return None


def _set_weights(graph: ir.Graph, node: ir.Node, w: np.ndarray, b: np.ndarray) -> None:
    name = node_key(node)
    node.replace_input_with(1, add_initializer(graph, f"{name}_reconstructed_w", w))
    if node.op_type == "MatMul":
        add = _compensation_add(node)
        bias = add_initializer(graph, f"{name}_reconstructed_b", b)
        if add is not None:  # the mean compensation's bias: the fitted intercept replaces it
            add.replace_input_with(1, bias)
        else:
            out = node.outputs[0]
            new = ir.node("Add", [out, bias], name=f"{name}_reconstructed_bias")
            graph.insert_after(node, new)
            out_name = out.name
            out.replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
            new.replace_input_with(0, out)
            out.name = f"{out_name}_before_bias"
            new.outputs[0].name = out_name
            new.outputs[0].type, new.outputs[0].shape = out.type, out.shape
        return
    if len(node.inputs) <= 2:
        node.resize_inputs(3)
    node.replace_input_with(2, add_initializer(graph, f"{name}_reconstructed_b", b))
