"""Planning and calibration: which tensors a static int8 model quantizes, and their ranges.

``plan_quantization`` asks the per-op rules (``rules.py``) to mark activations, weights and
biases, folding ReLU/Clip into their producer's range, and gives a reason for every weighted
node it keeps in float. ``calibrate_sweep`` streams the calibration samples once through one
onnxruntime session (``onnxzip.statistics``): min/max reduced in the graph, histograms in numpy,
and bias correction's per-channel input means in the same sweep.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxzip.data import Samples
from onnxzip.ir import ops
from onnxzip.ir.ops import (
    ISLAND_REASON,
    LOGARITHM_REASON,
    activation_islands,
    logarithm_front_end,
    node_key,
)
from onnxzip.quantize import calibrate as cal
from onnxzip.quantize.config import QuantizeConfig
from onnxzip.quantize.report import KeptFloat
from onnxzip.quantize.rules import (
    QUANTIZATION_RULES,
    Context,
    Plan,
    normalisation_statistics,
)
from onnxzip.statistics import Collector

logger = logging.getLogger(__name__)


# Input elements per calibration run when every activation is fetched whole (histogram
# methods): one 224x224 RGB image, which bounds the memory of the exposed activations
# (MobileNetV2: 366 MiB peak against 460 MiB in runs of two, same time); small inputs (the
# 8x8 digits) run whole batches (256 runs of 2 took 0.3 s of a 0.85 s run, 16 runs of 32 0.1 s).
HISTOGRAM_RUN_ELEMENTS = 3 * 224 * 224


# Input elements per in-graph min/max calibration run: beyond this, bigger runs only get slower
# (MobileNetV2 at 224x224, 32 samples: 0.28 s in runs of 4, 0.31 s in runs of 8, 0.52 s in one
# run of 32; the 8x8 digits nets get faster up to runs of 32).
MINMAX_RUN_ELEMENTS = 600_000


def _calibration_run(config: QuantizeConfig, samples: Samples, histogram: bool) -> int:
    fixed = all(isinstance(d, int) for s in samples.specs for d in s.shape[1:])
    if fixed or getattr(samples, "pairs", None):  # a stream's samples come from running it
        per_sample = sum(
            math.prod(d for d in s.shape[1:] if isinstance(d, int)) for s in samples.specs
        )
    else:  # symbolic image sizes or sequence lengths: one real sample's size
        from onnxzip.analysis import sample_shapes

        per_sample = sum(math.prod(dims) for dims in sample_shapes(samples).values())
    per_sample = max(1, per_sample)
    budget = HISTOGRAM_RUN_ELEMENTS if histogram else MINMAX_RUN_ELEMENTS
    return max(1, min(config.batch_size, budget // per_sample))


def plan_quantization(
    model: ir.Model,
    config: QuantizeConfig,
    statistics: frozenset[str] | None = None,
    front_end: frozenset[str] | None = None,
    islands: frozenset[str] | None = None,
) -> tuple[Plan, list[KeptFloat]]:
    """Runs the per-op rules over the main graph in topological order. ``statistics``,
    ``front_end`` and ``islands``: the model's ``normalisation_statistics``,
    ``logarithm_front_end`` and ``activation_islands`` when the caller has them (a builder plans
    one prepared model many times), else found here."""
    plan = Plan()
    transformer = config.preset == "transformer"
    ctx = Context(
        plan,
        config.per_channel,
        config.symmetric_activations,
        config.quantize_softmax,
        transformer,
        statistics=normalisation_statistics(model.graph) if statistics is None else statistics,
    )
    if front_end is None:
        front_end = logarithm_front_end(model.graph)
    if islands is None:
        islands = activation_islands(model.graph)
    find = QUANTIZATION_RULES.finder(model.opset_imports)
    kept = []
    for node in model.graph:
        key = node_key(node)
        handler = find(node)
        if handler is None:
            continue
        if transformer and node.op_type not in ("MatMul", "Gemm"):
            plan.kept_float[key] = "the transformer preset quantizes MatMul/Gemm inputs only"
            continue
        if config.exclude.matches(node):
            kept.append(KeptFloat(key, node.op_type, "excluded by the user"))
            continue
        before = plan.marks()
        try:
            reason = (
                (LOGARITHM_REASON if key in front_end else None)
                or (ISLAND_REASON if key in islands else None)
                or _empty_tensor(node)
                or handler(node, ctx)
            )
        except (TypeError, ValueError, IndexError, KeyError, ZeroDivisionError) as exc:
            # A rule that meets shapes it was not written for keeps the node in float (and
            # says why) instead of ending the run.
            logger.warning(
                "%s: the %s rule failed: %s: %s", key, node.op_type, type(exc).__name__, exc
            )
            reason = f"the {node.op_type} rule cannot handle this node ({type(exc).__name__})"
        if reason is None:
            if key not in plan.folded:
                plan.quantized_nodes[key] = node.op_type
        else:
            plan.restore(before)  # a refusing handler leaves no half-made marks behind
            plan.kept_float[key] = reason
            if node.op_type in ops.FLOAT_WEIGHTED_OPS or node.op_type in ("Add", "Mul", "Concat"):
                kept.append(KeptFloat(key, node.op_type, reason))
    _float_outputs(model, plan)
    return plan, kept


def _float_outputs(model: ir.Model, plan: Plan) -> None:
    """Drops the output pair of a quantized Gemm or MatMul that nothing reads quantized: its
    kernel can write float, and a pair there only rounds the result to 256 levels before
    float ops (a classifier's logits before a float Softmax: two classes closer than one step
    of the logits' range came out exactly tied, decided by their index)."""
    # tensors whose range another tensor borrows, or whose parameters another reuses
    lent = {plan.resolve(src) for t, src in plan.activations.items() if t != src}
    lent |= set(plan.alias.values()) | set(plan.shared.values())
    for node in model.graph:
        m = ops.metatype(node)
        if m is None or not m.float_output or node_key(node) not in plan.quantized_nodes:
            continue
        out = node.outputs[0]
        name = out.name
        if plan.activations.get(name) != name or name in lent:
            continue
        if any(node_key(use.node) in plan.quantized_nodes for use in out.uses()):
            continue
        del plan.activations[name]


def _empty_tensor(node: ir.Node) -> str | None:
    """A tensor with a zero-sized dimension has no range to calibrate (and onnxruntime's
    ReduceMin/ReduceMax refuse it)."""
    for value in (*node.inputs, *node.outputs):
        if value is not None and value.shape is not None and 0 in value.shape:
            return f"tensor '{value.name}' is empty (shape {list(value.shape)})"
    return None


@dataclass
class Calibrated:
    """What one calibration sweep found."""

    ranges: dict[str, cal.TensorStats]
    samples: int  # samples seen
    means: dict[tuple[str, int], np.ndarray]  # (tensor, axis) -> per-channel mean


def calibrate_sweep(
    model: ir.Model,
    tensors: list[str],
    samples: Samples,
    config: QuantizeConfig,
    holdout: float = 0.0,
    in_numpy: bool = False,
    channel_means: list[tuple[str, int]] = (),
) -> Calibrated:
    """Streams the samples not held out once through one session (``onnxzip.statistics``).

    For ``minmax`` the session itself reduces each tensor to its min and max, so only scalars
    leave onnxruntime. The histogram methods need every value: the tensors are fetched whole
    and reduced by numpy. ``in_numpy`` does the same for ``minmax`` (onnxruntime's reductions
    refuse empty tensors). ``channel_means`` (tensor, axis) are collected in the same sweep,
    for bias correction.
    """
    histogram = config.calibration != "minmax"
    collector = Collector(model, bins=config.bins, in_graph=not (in_numpy or histogram))
    for name in tensors:
        collector.range(name, histogram=histogram)
    for key in channel_means:
        collector.channel_moments(*key, squares=False)
    # Histogram methods fetch every exposed tensor whole: runs sized by input elements keep
    # onnxruntime's arena (all activations alive at once) small (see HISTOGRAM_RUN_ELEMENTS).
    split = "calibration" if holdout > 0 else "all"
    collected = collector.run(
        samples,
        _calibration_run(config, samples, histogram),
        split,
        holdout or 0.5,
        name="calibration model",
        desc="calibrate",
    )
    means = {key: sums.mean() for key, sums in collected.channels.items()}
    return Calibrated(collected.ranges, collected.samples, means)


def _resolve_shared(plan: Plan, tensor: str) -> str:
    seen = set()
    while tensor in plan.shared and tensor not in seen:
        seen.add(tensor)
        tensor = plan.resolve(plan.shared[tensor])
    return tensor
