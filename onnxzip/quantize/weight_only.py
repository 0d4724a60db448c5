"""Weight-only block-wise quantization of MatMul weights (int4 or int8), as decoders are served.

A weight ``W [K, N]`` (``y = x W``) is cut along ``K`` into blocks of ``block_size`` rows; each
(block, column) gets a scale ``s`` (and, asymmetric, a zero point ``z``)::

    symmetric:  W ~ s q,        q in [-2^(b-1), 2^(b-1) - 1],  s = m / -2^(b-1)
    asymmetric: W ~ s (q - z),  q in [0, 2^b - 1],  s = (hi - lo) / (2^b - 1),  z = round(-lo / s)

with ``m`` the block's value of largest magnitude (it lands exactly on the most negative code,
so all ``2^b`` levels are used: MLAS's convention) and ``[lo, hi]`` the block's range widened to
hold 0. Codes are rounded to nearest (ties to even) and clipped to their range.

GPTQ (``method="gptq"``, ``quantize_gptq``) uses the whole Hessian ``E[x x^T]`` instead: each
row's rounding error is compensated by the rows after it.

Data-aware clipping (``method="mse"``): each (block, column) range is shrunk by the factor
``c`` in ``CLIP_GRID`` that minimises ``sum_k E[x_k^2] (w_k - w^_k)^2``, the expected output error
of that block when the inputs are uncorrelated (the diagonal of the layer's Hessian ``E[x x^T]``;
GPTQ uses all of it). ``E[x_k^2]`` comes from the calibration samples in one sweep. Without
samples every ``E[x_k^2]`` is 1 and this is the weight's own mean squared error.

Two encodings of the result:

* ``qdq``: ``DequantizeLinear(codes [K, N] int4/int8, scales [ceil(K/bs), N], axis=0,
  block_size=bs)`` feeding the MatMul: standard ONNX (opset 21), which onnxruntime fuses into
  its ``MatMulNBits`` kernel at its extended optimisation level;
* ``nbits``: ``com.microsoft.MatMulNBits`` directly (any opset; onnxruntime only): codes as
  unsigned nibbles packed two per byte ``[N, blocks, bs / 2]`` (low nibble first), symmetric
  codes offset by 8 (its default zero point), scales ``[N * blocks]``; ``accuracy_level`` 4
  (activations quantized to int8 per block inside the kernel, what onnxruntime also picks
  when it fuses the ``qdq`` form) by default, 0 for float compute.

Embedding tables (``Gather`` of a constant 2-D table) become int8 rows with one scale per column
(as in dynamic mode), standard ONNX either way. A table tied to an output MatMul is quantized
for both readers (int8 rows and int4 blocks), so its float copy goes; a constant another op
also reads stays float for every reader.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import ml_dtypes
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
from onnxzip.quantize.dynamic import MIN_TABLE, _weight_matrix, float_weight, quantize_table

logger = logging.getLogger(__name__)

CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclass
class BlockCodes:
    """One weight in blocks: ``codes [K, N]`` (signed for symmetric, unsigned otherwise),
    ``scales`` and ``zero_points`` ``[blocks, N]`` (zero points None when symmetric)."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int

    def dequantized(self) -> np.ndarray:
        k = self.codes.shape[0]
        s = np.repeat(self.scales, self.block_size, axis=0)[:k]
        q = self.codes.astype(np.float32)
        if self.zero_points is not None:
            q = q - np.repeat(self.zero_points, self.block_size, axis=0)[:k].astype(np.float32)
        return (q * s).astype(np.float32)


def _blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    """``[K, N]`` zero-padded to ``[blocks, block_size, N]``."""
    k, n = w.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), np.float32)
    padded[:k] = w
    return padded.reshape(blocks, block_size, n)


def _encode(x: np.ndarray, clip: np.ndarray, bits: int, symmetric: bool):
    """Codes, scales and zero points of ``x [blocks, bs, N]`` with ranges shrunk by ``clip``."""
    if symmetric:
        low = -(2 ** (bits - 1))
        index = np.abs(x).argmax(axis=1)[:, None, :]
        extreme = np.take_along_axis(x, index, axis=1)[:, 0, :] * clip
        scale = extreme / low
        scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
        q = np.clip(np.rint(x / scale[:, None, :]), low, -low - 1)
        return q, scale, None
    top = 2**bits - 1
    lo = np.minimum(x.min(axis=1), 0) * clip
    hi = np.maximum(x.max(axis=1), 0) * clip
    scale = ((hi - lo) / top).astype(np.float32)
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    zero = np.clip(np.rint(-lo / scale), 0, top)
    q = np.clip(np.rint(x / scale[:, None, :]) + zero[:, None, :], 0, top)
    return q, scale, zero


def quantize_blocks(
    w: np.ndarray,
    bits: int = 4,
    block_size: int = 32,
    symmetric: bool = True,
    importance: np.ndarray | None = None,
) -> BlockCodes:
    """Block-wise codes of ``w [K, N]``; with ``importance`` (``E[x_k^2]`` per row) each
    (block, column) range is clipped to minimise the importance-weighted squared error."""
    k, n = w.shape
    x = _blocks(w.astype(np.float32), block_size)
    weight = np.ones((x.shape[0], block_size, 1), np.float32)
    if importance is not None:
        weight = _blocks(np.asarray(importance, np.float32).reshape(k, 1), block_size)
    best = None
    grid = CLIP_GRID if importance is not None else (1.0,)
    for c in grid:
        clip = np.full((x.shape[0], n), c, np.float32)
        q, scale, zero = _encode(x, clip, bits, symmetric)
        deq = (q - (zero[:, None, :] if zero is not None else 0)) * scale[:, None, :]
        err = (weight * (deq - x) ** 2).sum(axis=1)  # [blocks, N]
        if best is None:
            best = [err, q, scale, zero]
            continue
        better = err < best[0]
        best[0] = np.where(better, err, best[0])
        best[1] = np.where(better[:, None, :], q, best[1])
        best[2] = np.where(better, scale, best[2])
        if zero is not None:
            best[3] = np.where(better, zero, best[3])
    _, q, scale, zero = best
    codes = q.reshape(-1, n)[:k]
    dtype = np.int8 if symmetric else np.uint8
    return BlockCodes(
        codes.astype(dtype),
        scale.astype(np.float32),
        zero.astype(np.uint8) if zero is not None else None,
        bits,
        block_size,
    )


GPTQ_DAMP = 0.01  # added to the Hessian's diagonal, times its mean (GPTQ's default)
GPTQ_BATCH = 128  # rows quantized between two updates of the rest (a multiple of the block)


def quantize_gptq(
    w: np.ndarray,
    hessian: np.ndarray,
    bits: int = 4,
    block_size: int = 32,
    symmetric: bool = True,
) -> BlockCodes:
    """Block-wise codes of ``w [K, N]`` by GPTQ (Frantar et al., 2022): rows (input features)
    are quantized one after another, and each row's rounding error is spread over the rows not
    yet quantized so that the layer's output error ``(W - W^)^T H (W - W^)`` stays small, with
    ``H = E[x x^T]`` from the calibration samples.

    With ``U`` the upper Cholesky factor of ``H^-1`` (after damping ``H += d mean(diag H) I``),
    quantizing row ``i`` to ``q_i`` gives the error ``e = (w_i - q_i) / U_ii`` and the update
    ``w_j -= U_ij e`` for every later row ``j``; rows go in batches of ``GPTQ_BATCH`` whose
    updates to the rest are applied at once (one matrix product). A block's scales (and zero
    points) are chosen from its rows as updated when the block is reached, as the codes of
    ``quantize_blocks`` without clipping. An input feature that is always 0 (``H_ii = 0``)
    gets the weight 0.
    """
    k, n = w.shape
    W = w.astype(np.float64).copy()
    H = np.asarray(hessian, np.float64).copy()
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    W[dead] = 0.0
    H[np.diag_indices(k)] += GPTQ_DAMP * float(np.mean(np.diag(H)))
    try:
        U = np.linalg.cholesky(np.linalg.inv(H)).T
    except np.linalg.LinAlgError:  # not positive definite even damped: round to nearest
        return quantize_blocks(w, bits, block_size, symmetric)
    blocks = -(-k // block_size)
    codes = np.zeros((k, n), np.float64)
    scales = np.ones((blocks, n), np.float32)
    zeros = np.zeros((blocks, n), np.float64) if not symmetric else None
    step = max(block_size, GPTQ_BATCH // block_size * block_size)
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        W1 = W[i1:i2].copy()
        errors = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            row = i1 + i
            if row % block_size == 0:
                group = W1[i : i + block_size].astype(np.float32)
                padded = np.zeros((1, block_size, n), np.float32)
                padded[0, : len(group)] = group
                _, scale, zero = _encode(padded, np.ones((1, n), np.float32), bits, symmetric)
                scales[row // block_size] = scale[0]
                if zeros is not None:
                    zeros[row // block_size] = zero[0]
            g = row // block_size
            s = scales[g].astype(np.float64)
            if symmetric:
                low = -(2 ** (bits - 1))
                q = np.clip(np.rint(W1[i] / s), low, -low - 1)
                deq = q * s
            else:
                z = zeros[g]
                q = np.clip(np.rint(W1[i] / s) + z, 0, 2**bits - 1)
                deq = (q - z) * s
            codes[row] = q
            err = (W1[i] - deq) / U1[i, i]
            W1[i:] -= np.outer(U1[i, i:], err)
            errors[i] = err
        W[i2:] -= U[i1:i2, i2:].T @ errors
    return BlockCodes(
        codes.astype(np.int8 if symmetric else np.uint8),
        scales,
        zeros.astype(np.uint8) if zeros is not None else None,
        bits,
        block_size,
    )


def pack_nbits(blocks: BlockCodes) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """MatMulNBits' inputs: packed codes ``[N, blocks, bs * bits / 8]`` uint8, scales
    ``[N * blocks]`` and packed zero points (asymmetric only)."""
    bits, bs = blocks.bits, blocks.block_size
    k, n = blocks.codes.shape
    count = -(-k // bs)
    offset = 2 ** (bits - 1) if blocks.zero_points is None else 0
    q = np.full((count * bs, n), offset, np.int32)
    q[:k] = blocks.codes.astype(np.int32) + offset
    q = q.T.reshape(n, count, bs).astype(np.uint8)  # unsigned codes, column-major blocks
    if bits == 8:
        packed = q
    else:
        packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    scales = np.ascontiguousarray(blocks.scales.T).reshape(-1)
    zeros = None
    if blocks.zero_points is not None:
        z = blocks.zero_points.T.astype(np.uint8)  # [N, blocks]
        if bits == 8:
            zeros = z.reshape(-1)
        else:
            if count % 2:  # an odd block count: the last byte's high nibble is unused (8)
                z = np.concatenate([z, np.full((n, 1), 8, np.uint8)], axis=1)
            zeros = (z[:, 0::2] | (z[:, 1::2] << 4)).reshape(-1).astype(np.uint8)
    return packed, scales, zeros


@dataclass
class WeightOnlyResult:
    quantized: dict[str, str] = field(default_factory=dict)  # node -> op type
    kept_float: dict[str, str] = field(default_factory=dict)  # node -> reason
    format: str = "qdq"


def resolve_format(model: ir.Model, requested: str) -> str:
    """``auto``: ``qdq`` when the model's opset has blocked DequantizeLinear (21+), else
    onnxruntime's ``MatMulNBits``."""
    if requested != "auto":
        return requested
    return "qdq" if model.opset_imports.get("", 0) >= 21 else "nbits"


@bulk_edit
def quantize_weights(
    model: ir.Model,
    *,
    bits: int = 4,
    block_size: int = 32,
    symmetric: bool = True,
    fmt: str = "auto",
    importance: dict[str, np.ndarray] | None = None,
    exclude: IgnoredScope | tuple[str, ...] = (),
    accuracy_level: int = 4,
    tables: bool = True,
    codes: dict[str, BlockCodes] | None = None,
    front_end: frozenset[str] | None = None,
) -> WeightOnlyResult:
    """Rewrites every MatMul (and default-attribute Gemm) with a constant float32 weight of
    ``model`` in place, and (``tables``) every embedding Gather. ``importance`` maps an input
    tensor name to ``E[x^2]`` per feature (data-aware clipping) or to the Hessian
    ``E[x x^T]`` (GPTQ). ``front_end``: the model's ``logarithm_front_end`` when the caller has
    it (a builder quantizes one prepared model many times), else found here."""
    graph = model.graph
    exclude = IgnoredScope.of(exclude)
    fmt = resolve_format(model, fmt)
    result = WeightOnlyResult(format=fmt)
    if tables:
        # Embedding tables first, as int8 rows (a tied table read by a MatMul too is then
        # quantized for both readers; the float copy goes).
        for node in list(graph):
            if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
                continue
            key = node.name or node.outputs[0].name
            if exclude.matches(node):
                continue
            table = node.inputs[0]
            if any(not _handled(u.node, u.idx) for u in table.uses()):
                continue  # some reader would keep the float table: storing it twice
            if quantize_table(graph, node, key) is None:
                result.quantized[key] = "Gather"
    if fmt == "qdq" and model.opset_imports.get("", 0) < 21:
        raise ValueError("blocked DequantizeLinear needs opset 21")
    encoded: dict[int, tuple[BlockCodes, ir.Value | None]] = {}
    # A filter bank feeding a logarithm keeps its weights: a tap off by half a 4-bit step lets
    # a loud bin leak into a quiet band by more than the band holds, and the logarithm turns
    # that into a large error (a mel bank on a power spectrum: output SNR -0.4 dB, 23.5 kept).
    if front_end is None:
        front_end = logarithm_front_end(graph)
    for node in list(graph):
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        key = node.name or node.outputs[0].name
        if exclude.matches(node):
            result.kept_float[key] = "excluded by the user"
            continue
        if key in front_end:
            result.kept_float[key] = LOGARITHM_REASON
            continue
        x = node.inputs[0]
        w, reason = float_weight(node)
        if w is None:
            result.kept_float[key] = reason
            continue
        value = node.inputs[1]
        readers = {id(u.node) for u in value.uses()}
        if len(readers) > 1 and not all(_handled(u.node, u.idx) for u in value.uses()):
            result.kept_float[key] = "weight shared with a node that stays float (tied weight)"
            continue
        if node.op_type == "Gemm" and node.attributes.get("transB") is not None:
            if node.attributes["transB"].as_int() and len(readers) > 1:
                result.kept_float[key] = "transposed weight shared with other nodes"
                continue
        k, n = w.shape
        if k < block_size // 2:
            result.kept_float[key] = f"fewer than {block_size // 2} input features"
            continue
        if fmt == "nbits" and (k < 16 or n < 1):
            result.kept_float[key] = "too small for MatMulNBits"
            continue
        rows = importance.get(x.name) if importance else None
        if rows is not None and rows.shape not in ((k,), (k, k)):
            rows = None
        cache = id(value) if node.op_type == "MatMul" else id(node)
        if cache not in encoded:
            # ``codes`` keeps them across calls on copies of one model (the accuracy guard's
            # rebuilds): the clipping search runs once per weight.
            name = value.name if node.op_type == "MatMul" else f"{value.name}@{key}"
            found = codes.get(name) if codes is not None else None
            if found is None and rows is not None and rows.ndim == 2:  # a Hessian: GPTQ
                found = quantize_gptq(w, rows, bits, block_size, symmetric)
            elif found is None:
                found = quantize_blocks(w, bits, block_size, symmetric, rows)
                if codes is not None:
                    codes[name] = found
            encoded[cache] = (found, None)
        blocks, shared = encoded[cache]
        io.drop_pages(value.const_value)  # read once: its pages may go
        bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
        if fmt == "qdq":
            if shared is None:
                shared = _dequantize_node(graph, node, key, blocks)
                encoded[cache] = (blocks, shared)
            mm = ir.node("MatMul", [x, shared], name=f"{key}_weight_only")
            new_nodes = [mm]
        else:
            packed, scales, zeros = pack_nbits(blocks)
            inputs = [
                x,
                add_initializer(graph, f"{key}.weight_packed", packed),
                add_initializer(graph, f"{key}.weight_scales", scales.astype(np.float32)),
            ]
            if zeros is not None:
                inputs.append(add_initializer(graph, f"{key}.weight_zero_points", zeros))
            mm = ir.node(
                "MatMulNBits",
                inputs,
                attributes={
                    "K": k,
                    "N": n,
                    "bits": bits,
                    "block_size": block_size,
                    "accuracy_level": accuracy_level,
                },
                domain="com.microsoft",
                name=f"{key}_MatMulNBits",
            )
            new_nodes = [mm]
        out = mm.outputs[0]
        out.name = f"{key}_weight_only"
        if bias is not None:
            add = ir.node("Add", [out, bias], name=f"{key}_bias")
            add.outputs[0].name = f"{key}_bias"
            new_nodes.append(add)
            out = add.outputs[0]
        replace_node(graph, node, new_nodes, out)
        result.quantized[key] = node.op_type
    if fmt == "nbits" and result.quantized and "com.microsoft" not in model.opset_imports:
        model.opset_imports["com.microsoft"] = 1
    remove_unused_initializers(model)
    return result


def _handled(node: ir.Node, index: int) -> bool:
    """This reader of a constant gets a quantized copy: a MatMul/Gemm reading it as its weight,
    or a Gather reading it as an embedding table (rows on axis 0)."""
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type in ("MatMul", "Gemm"):
        return index == 1 and _weight_matrix(node)[0] is not None
    if node.op_type == "Gather":
        axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 0
        table = const_array(node.inputs[0])
        return (
            index == 0
            and axis == 0
            and table is not None
            and table.ndim == 2
            and table.size >= MIN_TABLE
        )
    return False


def _dequantize_node(graph: ir.Graph, node: ir.Node, key: str, blocks: BlockCodes) -> ir.Value:
    """``DequantizeLinear`` of the blocked codes, placed before ``node``; its output."""
    narrow = ml_dtypes.int4 if blocks.zero_points is None else ml_dtypes.uint4
    if blocks.bits == 8:
        narrow = np.int8 if blocks.zero_points is None else np.uint8
    codes = add_initializer(graph, f"{key}.weight_codes", blocks.codes.astype(narrow))
    inputs = [codes, add_initializer(graph, f"{key}.weight_scales", blocks.scales)]
    if blocks.zero_points is not None:
        inputs.append(
            add_initializer(graph, f"{key}.weight_zero_points", blocks.zero_points.astype(narrow))
        )
    dq = ir.node(
        "DequantizeLinear",
        inputs,
        attributes={"axis": 0, "block_size": blocks.block_size},
        name=f"{key}_DequantizeLinear",
    )
    dq.outputs[0].name = f"{key}.weight_dequantized"
    graph.insert_before(node, dq)
    return dq.outputs[0]


@bulk_edit
def quantize_subgraph_weights(
    model: ir.Model, exclude: IgnoredScope | tuple[str, ...] = ()
) -> dict[str, str]:
    """Weights of MatMul/Gemm inside If/Loop/Scan bodies, whose activations calibration does
    not observe, as int8 per output column: ``DequantizeLinear(codes, scale, axis=1)`` feeds
    the op (opset 13+), activations stay float. Returns the quantized nodes (key -> op)."""
    from onnxzip.quantize import params as qp

    exclude = IgnoredScope.of(exclude)
    done: dict[str, str] = {}
    encoded: dict[tuple[int, int], ir.Value] = {}
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        body = node.graph
        if body is model.graph:
            continue
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        key = node.name or node.outputs[0].name
        if exclude.matches(node):
            continue
        w, _ = float_weight(node)
        value = node.inputs[1]
        if w is None or not all(_handled(u.node, u.idx) for u in value.uses()):
            continue
        transposed = node.op_type == "Gemm" and "transB" in node.attributes
        transposed = transposed and node.attributes["transB"].as_int() == 1
        if (id(body), id(value)) not in encoded:
            params = qp.weight_params(w, axis=1)
            codes = qp.quantize(w, params, symmetric_weight=True)
            if transposed:
                codes = np.ascontiguousarray(codes.T)
            dq = ir.node(
                "DequantizeLinear",
                [
                    add_initializer(body, f"{key}.weight_codes", codes),
                    add_initializer(body, f"{key}.weight_scale", params.scale.astype(np.float32)),
                    add_initializer(body, f"{key}.weight_zero", np.zeros(w.shape[1], np.int8)),
                ],
                attributes={"axis": 0 if transposed else 1},
                name=f"{key}_DequantizeLinear",
            )
            dq.outputs[0].name = f"{key}.weight_dequantized"
            body.insert_before(node, dq)
            encoded[(id(body), id(value))] = dq.outputs[0]
        node.replace_input_with(1, encoded[(id(body), id(value))])
        done[key] = node.op_type
    if done:
        remove_unused_initializers(model)
    return done


def input_features(model: ir.Model) -> list[str]:
    """The activations whose per-feature second moments data-aware clipping uses."""
    names = []
    for node in model.graph:
        if node.op_type in ("MatMul", "Gemm") and node.domain in ("", "ai.onnx"):
            if const_array(node.inputs[1]) is not None and node.inputs[0] is not None:
                if node.inputs[0].name not in names:
                    names.append(node.inputs[0].name)
    return names
