"""SmoothQuant for static int8 transformers (Xiao et al. 2023; NNCF's ``SmoothQuant`` pass).

Transformer activations carry a few channels far larger than the rest (LayerNorm outputs, the
FFN's GELU output): one per-tensor int8 scale sized for them rounds every other channel to a
handful of levels. For a MatMul (or Gemm) ``Y = X W`` with a constant weight ``W [K, N]``, a per-channel
factor ``s_k`` moves that spread into the weight, exactly in float:

    Y = (X / s) (diag(s) W),    s_k = max|X_k|^a / max|W_k,:|^(1 - a)

The weight is quantized per output channel, so scaled rows cost it little. MatMuls that read the
same activation (Q, K, V) share one ``s`` (their rows' maxima are pooled). The strength ``a`` is
chosen per activation from ``ALPHAS`` (``None``: no smoothing) by the error of the quantized
product on rows sampled from the calibration samples: activation per tensor, asymmetric uint8 over
its calibrated range, weight per channel, symmetric int8 — the scheme the model is then quantized
with.

Where ``X`` is read by those MatMuls alone and made by a normalisation with a constant scale (and
bias) or by a Mul by a constant vector (a decomposed RMSNorm's weight), ``1 / s`` is folded into
those constants (pre-norm decoders: no new op). Otherwise ``X / s`` is a ``Mul`` by ``1 / s`` on
the path to those MatMuls only (other readers of ``X``, such as a residual ``Add``, keep ``X``);
onnxruntime runs it as one cheap elementwise op before the activation's QuantizeLinear. (Folding ``1 / s`` into a per-channel QuantizeLinear scale instead is
exact too, but onnxruntime's per-axis QuantizeLinear made MiniLM 4x slower.)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxzip import passes
from onnxzip.ir import ops
from onnxzip.passes import const_array
from onnxzip.quantize import params as qp
from onnxzip.statistics import Collector

logger = logging.getLogger(__name__)

ALPHAS: tuple[float | None, ...] = (None, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
SEARCH_ROWS = 512  # activation rows the strength search evaluates per activation
SCALE_LIMITS = (1e-4, 1e4)
NAME_PREFIX = "smooth_quant/"  # the smoothing Muls' names
NORMALIZATIONS = {
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "RMSNormalization",
}


@dataclass
class SmoothReport:
    activations: int = 0  # activations whose MatMuls were smoothed
    matmuls: int = 0
    alphas: dict[str, float | None] = field(default_factory=dict)  # activation -> strength
    seconds: float = 0.0

    def describe(self) -> str:
        chosen = [a for a in self.alphas.values() if a is not None]
        spread = f"strength {min(chosen):g}-{max(chosen):g}" if chosen else "no strength helped"
        return (
            f"SmoothQuant on {self.activations} of {len(self.alphas)} MatMul inputs "
            f"({self.matmuls} MatMuls; {spread}, searched per input on the calibration samples)"
        )


def weight_kn(node: ir.Node) -> np.ndarray | None:
    """The constant float weight of a MatMul or Gemm as ``[K, N]`` (what ``X [.., K]``
    multiplies), or None."""
    if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
        return None
    if len(node.inputs) < 2 or (node.op_type == "Gemm" and ops.attr(node, "transA", 0)):
        return None
    weight = const_array(node.inputs[1])
    if weight is None or weight.ndim != 2 or weight.dtype != np.float32:
        return None
    return weight.T if node.op_type == "Gemm" and ops.attr(node, "transB", 0) else weight


def _store_kn(node: ir.Node, w_kn: np.ndarray) -> np.ndarray:
    """``w_kn`` in the layout the node's weight input has."""
    return w_kn.T if node.op_type == "Gemm" and ops.attr(node, "transB", 0) else w_kn


def weight_matmul(node: ir.Node) -> bool:
    """A MatMul (or Gemm) of a float activation by a constant 2-D float weight."""
    x = node.inputs[0] if node.inputs else None
    return (
        weight_kn(node) is not None
        and x is not None
        and const_array(x) is None
        and x.dtype == ir.DataType.FLOAT
        and x.shape is not None
        and len(x.shape) >= 2
    )


def is_transformer(model: ir.Model) -> bool:
    """Softmax attention, a normalisation over the hidden size, and more weight MatMuls/Gemms
    than convolutions: what the transformer preset is for (BERT, GPT, Llama, ViT exports, plain
    or after onnxruntime's transformer optimizer)."""
    types = [n.op_type for n in model.graph]
    if "Softmax" not in types and not {"Attention", "MultiHeadAttention"} & set(types):
        return False
    if not (NORMALIZATIONS & set(types) or "ReduceMean" in types):
        return False
    weighted = sum(1 for n in model.graph if weight_matmul(n))
    return weighted >= 2 and weighted > types.count("Conv")


def _groups(model: ir.Model, exclude) -> dict[str, list[ir.Node]]:
    groups: dict[str, list[ir.Node]] = {}
    for node in model.graph:
        if weight_matmul(node) and not exclude(node):
            groups.setdefault(node.inputs[0].name, []).append(node)
    return groups


def _quantize_activation(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``x`` through Q/DQ with the per-tensor uint8 parameters of the range ``[lo, hi]``."""
    params = qp.activation_params(lo, hi)
    return qp.dequantize(qp.quantize(x, params), params)


def _quantize_weight(w: np.ndarray, pair_safe: bool) -> np.ndarray:
    """A ``[K, N]`` weight through Q/DQ, symmetric int8 per output column, in the range the
    build will store it in (``pair_safe``: see onnxzip.quantize.params)."""
    params = qp.weight_params(w, axis=1, pair_safe=pair_safe)
    return qp.dequantize(qp.quantize(w, params, symmetric_weight=True), params)


def _factors(absmax: np.ndarray, wmax: np.ndarray, alpha: float | None) -> np.ndarray:
    if alpha is None:
        return np.ones_like(wmax)
    s = np.maximum(absmax, 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1.0 - alpha)
    return np.clip(s, *SCALE_LIMITS)


def _search(rows, lo, hi, weights, alphas, pair_safe) -> tuple[float | None, np.ndarray]:
    """The strength whose quantized product is closest to the float one on ``rows``."""
    x = rows.astype(np.float32)
    ws = [w.astype(np.float32) for w in weights]
    exact = [x @ w for w in ws]
    absmax = np.maximum(np.abs(lo), np.abs(hi)).astype(np.float32)
    wmax = np.max([np.abs(w).max(axis=1) for w in ws], axis=0)
    best = None
    plain = None
    for alpha in alphas:
        s = _factors(absmax, wmax, alpha).astype(np.float32)
        xq = _quantize_activation(x / s, float((lo / s).min()), float((hi / s).max()))
        error = sum(
            float(
                np.square(
                    xq @ _quantize_weight(s[:, None] * w, pair_safe) - y, dtype=np.float64
                ).sum()
            )
            for w, y in zip(ws, exact, strict=True)
        )
        if alpha is None:
            plain = error
        if best is None or error < best[0]:
            best = (error, alpha, s)
    logger.debug("smoothing gain %.3f at %s", best[0] / plain if plain else 1.0, best[1])
    return best[1], best[2]


def smooth(
    model: ir.Model,
    samples,
    *,
    batch_size: int,
    holdout: float,
    alpha: float | None = None,
    pair_safe: bool = False,
    exclude=lambda node: False,
) -> tuple[ir.Model, SmoothReport]:
    """A copy of ``model`` with SmoothQuant factors moved into its weight MatMuls (see the
    module docstring); ``alpha`` fixes the strength instead of searching it; ``pair_safe``
    scores the strengths with the weight range the build stores (reduce range on)."""
    start = time.perf_counter()
    report = SmoothReport()
    groups = _groups(model, exclude)
    if not groups:
        return model, report
    collector = Collector(model, in_graph=False)
    for name in groups:
        collector.channel_rows(name, SEARCH_ROWS)
    stats = collector.run(
        samples, batch_size, "calibration", holdout, desc="SmoothQuant: activations"
    )
    model = model.clone()
    groups = _groups(model, exclude)
    alphas = ALPHAS if alpha is None else (alpha,)
    with passes.naming(model.graph):
        for name, nodes in groups.items():
            found = stats.rows.get(name)
            if found is None or found.rows is None:
                continue
            weights = [weight_kn(n) for n in nodes]
            if found.lo.shape != (weights[0].shape[0],):
                continue  # not a [..., K] activation
            chosen, s = _search(found.rows, found.lo, found.hi, weights, alphas, pair_safe)
            report.alphas[name] = chosen
            if chosen is None:
                continue
            _apply(model, nodes, weights, s.astype(np.float32))
            report.activations += 1
            report.matmuls += len(nodes)
    passes.remove_unused_initializers(model)
    report.seconds = time.perf_counter() - start
    return model, report


def _fold_into_producer(x: ir.Value, nodes: list[ir.Node], s: np.ndarray, graph) -> bool:
    """``X / s`` without a new op, where ``X`` is read by these MatMuls alone and made by a
    normalisation with a constant scale (and bias), or by a Mul by a constant over the last
    axis (a decomposed RMSNorm's weight): those constants are divided by ``s``."""
    producer = x.producer()
    if producer is None or x.is_graph_output():
        return False
    if {id(use[0]) for use in x.uses()} != {id(n) for n in nodes}:
        return False  # another reader (a residual Add) needs X itself
    k = s.shape[0]
    if producer.op_type in NORMALIZATIONS - {
        "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization",
    }:
        if len(producer.outputs) > 1 and any(o.uses() for o in producer.outputs[1:]):
            return False
        positions = [
            i for i in (1, 2) if i < len(producer.inputs) and producer.inputs[i] is not None
        ]
    elif producer.op_type == "Mul":
        positions = [i for i in (0, 1) if const_array(producer.inputs[i]) is not None][:1]
    else:
        return False
    if not positions:
        return False
    arrays = [const_array(producer.inputs[i]) for i in positions]
    if any(
        a is None or a.dtype != np.float32 or a.shape[-1:] != (k,) or a.size != k for a in arrays
    ):
        return False
    for i, a in zip(positions, arrays, strict=True):
        name = f"{producer.inputs[i].name}_smoothed"
        producer.replace_input_with(
            i, passes.add_initializer(graph, name, (a / s.reshape(a.shape)).astype(np.float32))
        )
    return True


def _apply(model: ir.Model, nodes: list[ir.Node], weights: list[np.ndarray], s) -> None:
    graph = model.graph
    x = nodes[0].inputs[0]
    if not _fold_into_producer(x, nodes, s, graph):
        inverse = passes.add_initializer(
            graph, f"{x.name}_smooth_inverse", (1.0 / s).astype(np.float32)
        )
        mul = ir.node("Mul", [x, inverse], name=f"{NAME_PREFIX}{x.name}")
        out = mul.outputs[0]
        out.name = f"{x.name}_smoothed"
        passes.claim(graph, out.name)
        out.dtype, out.shape = x.dtype, x.shape
        graph.insert_before(nodes[0], mul)
        for node in nodes:
            node.replace_input_with(0, out)
    for node, w in zip(nodes, weights, strict=True):
        scaled = passes.add_initializer(
            graph,
            f"{node.inputs[1].name}_smoothed",
            _store_kn(node, (s[:, None] * w).astype(np.float32)),
        )
        node.replace_input_with(1, scaled)


__all__ = ["ALPHAS", "SmoothReport", "is_transformer", "smooth"]
