"""Empirical bias correction of the weight-quantization error.

A layer ``y = W x + b`` whose weights are stored as ``W_q`` shifts its output mean by
``(W - W_q) E[x]`` per output channel (summed over a convolution's kernel window); adding that
to the bias, ``b' = b + (W - W_q) E[x]``, removes the shift. ``E[x]`` per input channel comes
from the calibration sweep. Whether it is kept is decided on held-out samples (``auto``).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from onnxzip import passes
from onnxzip.data import Samples
from onnxzip.ir import ops
from onnxzip.ir.ops import node_key
from onnxzip.quantize.config import QuantizeConfig
from onnxzip.quantize.rules import (
    Plan,
)
from onnxzip.runtime import channel_moments

logger = logging.getLogger(__name__)


# -- bias correction ------------------------------------------------------------------------------


def _bias_layers(model: ir.Model, plan: Plan):
    """The quantized layers bias correction can correct: ungrouped Conv, Gemm without transA."""
    for n in model.graph:
        if (
            n.op_type in ("Conv", "Gemm")
            and ops.domain_of(n) == ""
            and node_key(n) in plan.quantized_nodes
            and ops.groups(n) == 1  # grouped: per-channel input means would need the layout
            and not ops.attr(n, "transA", 0)
        ):
            yield n


def correct_biases(
    prepared: ir.Model,
    quantized: ir.Model,
    plan: Plan,
    samples: Samples,
    config: QuantizeConfig,
    holdout: float,
    means: dict[tuple[str, int], np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Empirical bias correction of the weight-quantization error.

    A layer ``y = W x + b`` quantized to ``W_q`` shifts its output mean by
    ``E[(W - W_q) x] = (W - W_q) E[x]`` per output channel (summed over a Conv's kernel window).
    ``E[x]`` per input channel comes from the calibration samples (``means``, collected in the
    calibration sweep; any missing are computed here); the result maps each quantized Conv/Gemm
    with a per-channel input mean to ``b' = b + (W - W_q) E[x]`` (applied by ``_apply_biases``).
    Each layer's correction depends only on its own weights, so one pass suffices.
    """
    q_nodes = {node_key(n): n for n in quantized.graph}
    layers = []
    for n in _bias_layers(prepared, plan):
        key = node_key(n)
        if key in q_nodes:
            layers.append((n, q_nodes[key]))
    if not layers:
        return {}
    # Conv inputs are NCHW, Gemm inputs [N, K]: the input channel is axis 1 for both.
    means = dict(means or {})
    missing = {(n.inputs[0].name, 1) for n, _ in layers} - set(means)
    if missing:
        split = "calibration" if holdout > 0 else "all"
        moments = channel_moments(
            prepared,
            missing,
            samples,
            batch_size=config.batch_size,
            split=split,
            holdout=holdout or 0.5,
            name="bias correction",
        )
        means.update({key: m[0] for key, m in moments.items()})
    corrected = {}
    for layer, q_layer in layers:  # one layer's difference in memory at a time
        w = passes.const_array(layer.inputs[1])
        w_q = passes.dequantized_array(q_layer.inputs[1])
        if w is None or w_q is None or w.shape != w_q.shape:
            continue
        diff = _difference(w, w_q)
        mean = means[(layer.inputs[0].name, 1)]
        if layer.op_type == "Conv":
            diff = diff.reshape(diff.shape[0], diff.shape[1], -1).sum(axis=2)
        elif not ops.attr(layer, "transB", 0):
            diff = diff.T
        # numpy's own loops, not BLAS: a BLAS call leaves OpenBLAS's threads spinning for a
        # while after it returns, taking a core from the onnxruntime sessions that run next
        # (about 0.4 s of CPU on ResNet-50's 54 layers, on two cores).
        delta = np.einsum("oi,i->o", diff, mean)
        bias = layer.inputs[2] if len(layer.inputs) > 2 else None
        base = passes.const_array(bias) if bias is not None else np.zeros(delta.shape, np.float32)
        if base is None or base.ndim != 1 or base.shape[0] != delta.shape[0]:
            continue
        corrected[node_key(layer)] = (base + delta).astype(np.float32)
    return corrected


def _difference(w: np.ndarray, w_q: np.ndarray) -> np.ndarray:
    """``w - w_q`` in float64, without two float64 copies of the weights when the float32
    difference is already exact (1.2 s of ResNet-50's bias correction went to those copies).
    For weights rounded to a grid it is: ``w_q = 0`` gives ``w``, and otherwise
    ``|w - w_q| <= s / 2 <= |w_q| / 2`` keeps ``w`` within a factor of two of ``w_q``
    (Sterbenz). Checked, not assumed: Knuth's two-sum gives the float32 subtraction's exact
    rounding error, and only where it is zero everywhere is the difference converted alone (the
    same bits as converting both and subtracting)."""
    if w.dtype == np.float32 and w_q.dtype == np.float32:
        with np.errstate(all="ignore"):
            diff = w - w_q
            bv = diff - w
            error = (w - (diff - bv)) + (-w_q - bv)
        if not np.any(error):
            return diff.astype(np.float64)
    return w.astype(np.float64) - w_q.astype(np.float64)


@passes.bulk_edit
def _apply_biases(model: ir.Model, biases: dict[str, np.ndarray]) -> None:
    """Gives each node keyed in ``biases`` that bias (a new initializer), in place."""
    if not biases:
        return
    for node in model.graph:
        key = node_key(node)
        if key not in biases:
            continue
        value = passes.add_initializer(model.graph, f"{key}.bias_corrected", biases[key])
        if len(node.inputs) < 3:
            node.resize_inputs(3)
        node.replace_input_with(2, value)
    passes.remove_unused_initializers(model)
