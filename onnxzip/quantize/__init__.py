"""Static int8 quantization with QDQ: prepare, plan, calibrate, insert, verify.

``quantize(model, samples, config) -> (model, QuantizeReport)``:

1. prepare: initializer inputs dropped, two-input Sum as Add, BatchNormalization folded into
   the preceding convolution (``onnxzip.passes``);
2. plan: per-op rules (``rules.py``) mark activations, weights and biases, fold ReLU/Clip into
   their producer's range, and give a reason for every weighted node kept in float;
3. calibrate: one onnxruntime session exposes every planned activation; each batch is reduced
   to mergeable statistics (``calibrate.py``) and the chosen method turns them into ranges;
4. insert: one inserter (``qdq.py``) builds all Q/DQ pairs, int8 weights and int32 biases;
5. verify: the quantized model against the original on held-out samples calibration never saw.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxzip import floors as floors_mod
from onnxzip import io, passes
from onnxzip import metrics as metrics_mod
from onnxzip.data import Samples
from onnxzip.engine import cluster
from onnxzip.errors import DataError, InputError, InternalError, ModelError, NoSamplesError
from onnxzip.ir import ops
from onnxzip.ir.ops import node_key
from onnxzip.quantize import calibrate as cal
from onnxzip.quantize import dynamic as dynamic_mod
from onnxzip.quantize import params as qp
from onnxzip.quantize import smooth, weight_only
from onnxzip.quantize.dynamic import quantize_dynamic
from onnxzip.quantize.qdq import InsertResult, insert_qdq
from onnxzip.quantize.rules import (
    QUANTIZATION_RULES,
    Context,
    Plan,
    normalisation_statistics,
)
from onnxzip.report import table
from onnxzip.runtime import Runner, channel_moments, expose, int8_pairs_saturate
from onnxzip.statistics import Collector
from onnxzip.verify import (
    OutputAccumulator,
    ReferenceOutputs,
    Thresholds,
    VerifyReport,
    is_classifier,
    snr_db,
    verify,
)

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
# A Concat whose inputs need scales this many times apart stays float (each input keeps its
# own scale): one shared scale would leave the narrowest input 1/8 of the levels (3 bits).
MIXED_RANGE_RATIO = 8.0


def _calibration_run(config: QuantizeConfig, samples: Samples, histogram: bool) -> int:
    per_sample = max(
        1,
        sum(math.prod(d for d in s.shape[1:] if isinstance(d, int)) for s in samples.specs),
    )
    budget = HISTOGRAM_RUN_ELEMENTS if histogram else MINMAX_RUN_ELEMENTS
    return max(1, min(config.batch_size, budget // per_sample))


@dataclass
class QuantizeConfig:
    """Options of ``quantize``; the defaults are what ``onnxzip quantize`` does with no flags."""

    calibration: str = "minmax"
    percentile: float = 99.99
    bins: int = cal.DEFAULT_BINS
    per_channel: bool = True
    activation_type: str = "uint8"
    symmetric_activations: bool = False
    exclude: tuple[str, ...] = ()
    quantize_softmax: bool = False
    batch_size: int = 32
    holdout: float = 0.2  # fraction of the samples kept for verification; 0 calibrates on all
    # static: calibrated QDQ; dynamic: int8 MatMul weights, activations quantized at run time;
    # weight-only: block-wise int4/int8 MatMul weights, float activations (decoders)
    mode: str = "static"
    weight_bits: int = 4  # weight-only: 4 or 8
    block_size: int = 32  # weight-only: rows of K per scale
    weight_zero_point: bool = False  # weight-only: asymmetric blocks (a zero point each)
    weight_format: str = "auto"  # weight-only: qdq (opset 21 DequantizeLinear), nbits, auto
    weight_method: str = "mse"  # weight-only: rtn, or mse (clipping weighted by E[x^2])
    accuracy_level: int = 4  # weight-only nbits: MatMulNBits compute (4: int8, 0: float)
    max_drop: float | None = None  # accuracy guard: top-1 points (against labels, else agreement)
    min_cosine: float | None = None  # accuracy guard: minimum mean output cosine
    guard_samples: int = 512  # held-out samples the guard scores candidates on
    # when the result breaks the default floors (and no explicit guard target is set), keep the
    # layers that break them in float until the floors hold (onnxzip.floors)
    floor_guard: bool = True
    bias_correction: str = "auto"  # auto: kept when it raises the held-out SNR; on; off
    # on: weight scales keep onnxruntime's 16-bit pair sums on x86 CPUs without VNNI from
    # saturating (params.weight_params); auto: on when this machine is such a CPU; off
    reduce_range: str = "auto"
    # write this default-domain opset (for runtimes older than the installed onnxruntime);
    # None keeps the model's own
    target_opset: int | None = None
    # static: "transformer" quantizes MatMul/Gemm weights and inputs only, with SmoothQuant;
    # "default" every op with a QLinear kernel; "auto" chooses by the graph (smooth.is_transformer)
    preset: str = "auto"
    smooth_quant: str = "auto"  # auto: on in the transformer preset; on; off
    smooth_alpha: float | None = None  # SmoothQuant strength; None: searched per MatMul input

    @property
    def guarded(self) -> bool:
        return self.max_drop is not None or self.min_cosine is not None

    def validate(self) -> None:
        if self.bias_correction not in ("auto", "on", "off"):
            raise InputError(
                f"bias correction must be auto, on or off, got '{self.bias_correction}'"
            )
        if self.reduce_range not in ("auto", "on", "off"):
            raise InputError(f"reduce range must be auto, on or off, got '{self.reduce_range}'")
        if self.mode not in ("static", "dynamic", "weight-only"):
            raise InputError(f"unknown mode '{self.mode}' (choose static, dynamic or weight-only)")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise InputError(f"accuracy level must be 0 to 4, got {self.accuracy_level}")
        if self.weight_bits not in (4, 8):
            raise InputError(f"weight bits must be 4 or 8, got {self.weight_bits}")
        if self.block_size not in weight_only.BLOCK_SIZES:
            raise InputError(
                f"block size must be one of {', '.join(map(str, weight_only.BLOCK_SIZES))}, "
                f"got {self.block_size}"
            )
        if self.weight_format not in weight_only.FORMATS:
            raise InputError(
                f"weight format must be one of {', '.join(weight_only.FORMATS)}, "
                f"got '{self.weight_format}'"
            )
        if self.weight_method not in weight_only.METHODS:
            raise InputError(
                f"weight method must be one of {', '.join(weight_only.METHODS)}, "
                f"got '{self.weight_method}'"
            )
        if self.calibration not in cal.METHODS:
            raise InputError(
                f"unknown calibration method '{self.calibration}' (choose from {', '.join(cal.METHODS)})"
            )
        if not 0 < self.percentile <= 100:
            raise InputError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.activation_type not in ("uint8", "int8"):
            raise InputError(f"activation type must be uint8 or int8, got '{self.activation_type}'")
        if not 0 <= self.holdout < 1:
            raise InputError(f"held-out fraction must be in [0, 1), got {self.holdout}")
        if self.max_drop is not None and self.max_drop < 0:
            raise InputError(f"--max-drop must be at least 0, got {self.max_drop}")
        if self.min_cosine is not None and not -1 <= self.min_cosine <= 1:
            raise InputError(f"--min-cosine must be in [-1, 1], got {self.min_cosine}")
        if self.bins < 16:
            raise InputError(f"histogram bins must be at least 16, got {self.bins}")
        if self.preset not in ("auto", "transformer", "default"):
            raise InputError(
                f"unknown preset '{self.preset}' (choose auto, transformer or default)"
            )
        if self.smooth_quant not in ("auto", "on", "off"):
            raise InputError(f"SmoothQuant must be auto, on or off, got '{self.smooth_quant}'")
        if self.smooth_alpha is not None and not 0 <= self.smooth_alpha <= 1:
            raise InputError(f"SmoothQuant strength must be in [0, 1], got {self.smooth_alpha}")


@dataclass
class TensorRange:
    tensor: str
    observed_min: float
    observed_max: float
    range_min: float
    range_max: float
    scale: float
    zero_point: int


@dataclass
class KeptFloat:
    node: str
    op_type: str
    reason: str


@dataclass
class QuantizeReport:
    config: QuantizeConfig
    source: str
    data: str
    synthetic: bool
    calibration_samples: int
    prepared: dict
    quantized_ops: dict[str, int]
    folded_activations: list[str]
    kept_float: list[KeptFloat]
    qdq_pairs: int
    weights_quantized: int
    biases_quantized: int
    weight_bytes_before: int
    weight_bytes_after: int
    ranges: list[TensorRange] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    guard: GuardReport | None = None
    bias_correction: str | None = None
    parity: VerifyReport | None = None
    weight_range: str = ""  # why the weights use the full or the pair-safe range
    fallback: str | None = None  # why the mode asked for was replaced (the floors broke)
    smooth_quant: str | None = None  # what SmoothQuant did (static, transformer preset)
    weight_format: str | None = None  # weight-only: qdq or nbits, as written
    subgraph_nodes: list[str] = field(default_factory=list)  # inside If/Loop/Scan bodies
    nothing_because: str | None = None  # why nothing was quantized, when nothing was

    def _mode_lines(self) -> list[str]:
        c = self.config
        if c.mode == "weight-only":
            layout = (
                "DequantizeLinear with block_size (opset 21), fused into MatMulNBits by onnxruntime"
                if self.weight_format == "qdq"
                else "com.microsoft MatMulNBits (onnxruntime)"
            )
            method = (
                f"clipping by E[x^2] on {self.calibration_samples} samples of {self.data}"
                f"{' (SYNTHETIC)' if self.synthetic else ''}"
                if c.weight_method == "mse" and self.calibration_samples
                else "round to nearest (no E[x^2]: the weighted inputs' shapes are unknown)"
                if c.weight_method == "mse"
                else "round to nearest"
            )
            return [
                f"mode         weight-only int{c.weight_bits}, blocks of {c.block_size} rows, "
                f"{'asymmetric (zero points)' if c.weight_zero_point else 'symmetric'}; {method}",
                f"format       {layout}; activations stay float",
            ]
        if c.mode == "dynamic":
            return [
                f"mode         dynamic (no calibration); verified on {self.data}",
                "weights      int8 per output column; activations uint8, quantized at run time",
            ]
        preset = (
            [
                "preset       transformer: MatMul/Gemm weights and inputs int8, outputs, "
                "attention, softmax and normalisation float"
                + (f"; {self.smooth_quant}" if self.smooth_quant else "")
            ]
            if c.preset == "transformer"
            else [f"smoothing    {self.smooth_quant}"]
            if self.smooth_quant
            else []
        )
        return preset + [
            "calibration  none (nothing to calibrate)"
            if not self.quantized_ops
            else f"calibration  {c.calibration}{f' {c.percentile}' if c.calibration == 'percentile' else ''} on "
            f"{self.calibration_samples} samples of {self.data}{' (SYNTHETIC)' if self.synthetic else ''}",
            f"activations  {c.activation_type} {'symmetric' if c.symmetric_activations else 'asymmetric'}, "
            f"weights int8 {'per-channel' if c.per_channel else 'per-tensor'} symmetric, bias int32",
        ]

    def format(self) -> str:
        lines = [
            f"model        {self.source}",
            *self._mode_lines(),
            *([f"weight range {self.weight_range}"] if self.config.mode != "weight-only" else []),
            *([f"fallback     {self.fallback}"] if self.fallback else []),
            "quantized    "
            + (
                ", ".join(f"{op} x{n}" for op, n in sorted(self.quantized_ops.items()))
                if self.quantized_ops
                else f"NOTHING: {self.nothing_because or 'no node was quantized'}"
            ),
            *(
                [
                    f"subgraphs    {len(self.subgraph_nodes)} weights inside If/Loop/Scan bodies "
                    "quantized weight-only (int8 per output column; their activations stay float)"
                ]
                if self.subgraph_nodes
                else []
            ),
            f"folded       {len(self.folded_activations)} ReLU/Clip into their producers' ranges",
            f"Q/DQ         {self.qdq_pairs} activation pairs, {self.weights_quantized} weights, "
            f"{self.biases_quantized} biases",
            f"weights      {self.weight_bytes_before:,} -> {self.weight_bytes_after:,} bytes",
            "time         " + ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items()),
        ]
        if self.kept_float:
            lines.append("")
            lines.append("kept in float:")
            lines.append(
                table(
                    ["node", "op", "reason"],
                    [[k.node, k.op_type, k.reason] for k in self.kept_float],
                )
            )
        if self.bias_correction:
            lines.append(f"bias correction  {self.bias_correction}")
        if self.guard is not None:
            g = self.guard
            lines.append("")
            state = "met" if g.met else "NOT met"
            if g.target == FLOOR_TARGET:
                measure = f"failing floor checks {g.metric_before:g} -> {g.metric_after:g}"
            else:
                measure = f"metric {g.metric_before:.4f} -> {g.metric_after:.4f}"
            lines.append(
                f"accuracy guard: {g.target}: {state}; {measure} "
                f"on {g.evaluated_samples} held-out samples, {len(g.kept_float)} of {g.candidates} layers kept in float"
            )
            if g.candidates and len(g.kept_float) > g.candidates / 2:
                lines.append(
                    "               most layers stay float: expect little or no speed-up over "
                    "fp32 (Q/DQ between float layers costs time); measure before serving it"
                )
        if not self.quantized_ops:
            lines += [
                "",
                f"NOTHING QUANTIZED: {self.nothing_because or 'no node was quantized'}; the "
                "model written is the float model (no parity verdict)",
            ]
        elif self.parity is not None:
            lines.append("")
            lines.append(self.parity.format())
        return "\n".join(lines)


# the weighted layers each mode quantizes (embedding tables aside)
MODE_OPS = {"dynamic": ("Gemm", "MatMul"), "weight-only": ("Gemm", "MatMul")}


def nothing_quantized_because(model: ir.Model, mode: str, kept_float: list) -> str:
    """Why a build of ``model`` in ``mode`` quantized nothing, in one clause."""
    main, bodies = passes.weighted_layers(model)
    handled = MODE_OPS.get(mode)
    if handled is not None and main and not any(op in main for op in handled):
        found = ", ".join(f"{op} x{n}" for op, n in sorted(main.items()))
        return (
            f"{mode} mode quantizes {' and '.join(handled)} weights; this model's weighted "
            f"layers are {found}, which static int8 (mode static, the default) quantizes"
        )
    if kept_float:
        return "every candidate layer was kept in float (see 'kept in float')"
    if bodies and not main:
        return (
            f"the model's {sum(bodies.values())} weighted layers all sit inside If/Loop/Scan "
            "bodies, whose activations calibration does not observe"
        )
    return "no layer with a quantizable weight or activation"


def _excluded(node: ir.Node, exclude: tuple[str, ...]) -> bool:
    return bool(exclude) and (
        node.name in exclude or node.op_type in exclude or node_key(node) in exclude
    )


def plan_quantization(
    model: ir.Model, config: QuantizeConfig, statistics: frozenset[str] | None = None
) -> tuple[Plan, list[KeptFloat]]:
    """Runs the per-op rules over the main graph in topological order. ``statistics``: the
    model's ``normalisation_statistics`` when the caller has them (a builder plans one prepared
    model many times), else found here."""
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
        if _excluded(node, config.exclude):
            kept.append(KeptFloat(key, node.op_type, "excluded by the user"))
            continue
        before = plan.marks()
        try:
            reason = _empty_tensor(node) or handler(node, ctx)
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
    return plan, kept


def _empty_tensor(node: ir.Node) -> str | None:
    """A tensor with a zero-sized dimension has no range to calibrate (and onnxruntime's
    ReduceMin/ReduceMax refuse it)."""
    for value in (*node.inputs, *node.outputs):
        if value is not None and value.shape is not None and 0 in value.shape:
            return f"tensor '{value.name}' is empty (shape {list(value.shape)})"
    return None


def calibrate(
    model: ir.Model,
    tensors: list[str],
    samples: Samples,
    config: QuantizeConfig,
    holdout: float = 0.0,
    in_numpy: bool = False,
    channel_means: list[tuple[str, int]] = (),
) -> tuple[dict[str, cal.TensorStats], int, dict[tuple[str, int], np.ndarray]]:
    """Streams the samples not held out once through one session (``onnxzip.statistics``).

    For ``minmax`` the session itself reduces each tensor to its min and max, so only scalars
    leave onnxruntime. The histogram methods need every value: the tensors are fetched whole
    and reduced by numpy. ``in_numpy`` does the same for ``minmax`` (onnxruntime's reductions
    refuse empty tensors). ``channel_means`` (tensor, axis) are collected in the same sweep,
    for bias correction. Returns the statistics, the samples seen and the channel means.
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
    return collected.ranges, collected.samples, means


def _resolve_shared(plan: Plan, tensor: str) -> str:
    seen = set()
    while tensor in plan.shared and tensor not in seen:
        seen.add(tensor)
        tensor = plan.resolve(plan.shared[tensor])
    return tensor


class _Builder:
    """Plans and inserts Q/DQ on copies of the prepared model, reusing calibration statistics.

    The accuracy guard rebuilds the model with different layers left in float; ranges come from
    the float model, so statistics computed once serve every rebuild (a rebuild that needs a
    tensor not yet seen calibrates just that tensor).
    """

    def __init__(
        self, prepared: ir.Model, samples: Samples, config: QuantizeConfig, holdout: float
    ):
        self.prepared = prepared
        self.samples = samples
        self.config = config
        self.holdout = holdout
        # found once: every build plans a clone of ``prepared`` (the guard builds many)
        self.statistics = normalisation_statistics(prepared.graph)
        self.stats: dict[str, cal.TensorStats] = {}
        self.calibrated = 0
        self.params: dict[str, tuple[qp.QParams, float, float]] = {}
        self.nonfinite_nodes: frozenset[str] = frozenset()
        # Concats whose inputs need scales that differ by more than MIXED_RANGE_RATIO: node ->
        # ratio; they stay float so that each input keeps its own scale
        self.mixed_joins: dict[str, float] = {}
        # Bias correction (node key -> corrected bias), applied to the quantized layers only:
        # it compensates their weights' quantization error, which layers kept in float lack.
        self.biases: dict[str, np.ndarray] = {}
        # When bias correction will run, the first calibration sweep also collects the
        # per-channel input means of the layers it corrects (no second pass over the samples).
        self.collect_means = False
        # Set when the accuracy guard will run: the first sweep also calibrates what its
        # one-layer-in-float rebuilds read.
        self.anticipate_guard = False
        self.means: dict[tuple[str, int], np.ndarray] = {}
        # weight-only: E[x^2] per input feature of each weighted MatMul, and the format written
        self.importance: dict[str, np.ndarray] | None = None
        self.weight_format: str | None = None
        self.block_codes: dict = {}  # weight-only: each weight's codes, kept across rebuilds
        # nodes inside If/Loop/Scan bodies whose weights were quantized (weight-only int8)
        self.subgraph_nodes: list[str] = []

    def _ensure_stats(self, sources: list[str], means: list[tuple[str, int]] = ()) -> None:
        missing = [s for s in sources if s not in self.stats]
        means = [k for k in means if k not in self.means]
        if missing or means:

            def sweep(in_numpy: bool):
                return calibrate(
                    self.prepared,
                    missing,
                    self.samples,
                    self.config,
                    self.holdout,
                    in_numpy=in_numpy,
                    channel_means=means,
                )

            try:
                stats, count, found = sweep(False)
            except ModelError as exc:
                if self.config.calibration != "minmax":
                    raise
                # onnxruntime's ReduceMin/ReduceMax refuse empty tensors: reduce in numpy instead.
                logger.info("in-graph min/max failed (%s); exposing the tensors instead", exc)
                stats, count, found = sweep(True)
            self.stats.update(stats)
            self.means.update(found)
            self.calibrated = max(self.calibrated, count)

    def _params(self, src: str) -> tuple[qp.QParams, float, float]:
        if src not in self.params:
            c = self.config
            try:
                p, (lo, hi) = cal.params_for(
                    self.stats[src],
                    c.calibration,
                    percentile=c.percentile,
                    dtype=c.activation_type,
                    symmetric=c.symmetric_activations,
                )
            except qp.RangeError as exc:
                raise DataError(f"tensor '{src}': {exc}") from exc
            self.params[src] = (p, lo, hi)
        return self.params[src]

    def _excluding(self, keep_float: frozenset[str]) -> tuple[frozenset[str], QuantizeConfig]:
        """The layers a build keeps in float (asked for, NaN-touching, mixed-range joins) and
        the config that excludes them."""
        keep_float = keep_float | self.nonfinite_nodes | frozenset(self.mixed_joins)
        if not keep_float:
            return keep_float, self.config
        exclude = tuple(self.config.exclude) + tuple(sorted(keep_float))
        return keep_float, dataclasses.replace(self.config, exclude=exclude)

    def _settle(self, model: ir.Model, plan: Plan) -> bool:
        """Marks the layers ``plan`` would quantize though their ranges are not finite, or
        that join inputs of scales too far apart, to stay float; True if it marked any (the
        plan must then be made again)."""
        nonfinite = self._touching_nonfinite(model, plan)
        if nonfinite:
            if nonfinite <= self.nonfinite_nodes:
                raise InternalError(f"cannot keep {sorted(nonfinite)} in float")
            # -inf attention masks and the like: no finite range exists; those layers stay float.
            self.nonfinite_nodes |= nonfinite
            return True
        mixed = self._mixed_range_joins(model, plan)
        self.mixed_joins.update(mixed)
        return bool(mixed)

    def build(self, keep_float: frozenset[str] = frozenset()):
        model = self.prepared.clone()
        keep_float, config = self._excluding(keep_float)
        _apply_biases(model, {k: b for k, b in self.biases.items() if k not in keep_float})
        if config.mode == "dynamic":
            return self._build_dynamic(model, config, keep_float)
        if config.mode == "weight-only":
            return self._build_weight_only(model, config, keep_float)
        plan, kept = plan_quantization(model, config, self.statistics)
        means = []
        if self.collect_means and not self.means:
            means = sorted({(n.inputs[0].name, 1) for n in _bias_layers(model, plan)})
        sources = set(plan.activations.values())
        if self.anticipate_guard and not self.stats:
            # The guard's rebuilds, each with one layer in float, read a few tensors the full
            # plan does not (a range a folded activation used to cover): calibrated now, in the
            # first sweep, not in a second one when the guard starts.
            sources |= self._rebuild_sources([frozenset([k]) for k in plan.quantized_nodes])
        self._ensure_stats(sorted(sources), means)
        if self._settle(model, plan):
            return self.build(keep_float)
        act_params: dict[str, qp.QParams] = {}
        ranges = []
        for tensor, src in plan.activations.items():
            p, lo, hi = self._params(src)
            act_params[tensor] = p
            s = self.stats[src]
            ranges.append(
                TensorRange(tensor, s.min, s.max, lo, hi, float(p.scale), int(p.zero_point))
            )
        for tensor in plan.shared:
            root = _resolve_shared(plan, tensor)
            if root not in act_params:
                raise InternalError(f"shared tensor '{tensor}' has no calibrated source")
            act_params[tensor] = act_params[root]
        inserted = insert_qdq(
            model, plan, act_params, config.activation_type, config.reduce_range == "on"
        )
        if config.preset == "transformer":
            self._embedding_tables(model, plan, config, keep_float)
        for k in kept:
            if k.node in self.nonfinite_nodes:
                k.reason = "NaN/Inf (or no values) in its activations on the calibration samples"
            elif k.node in self.mixed_joins:
                k.reason = (
                    f"its inputs need scales {self.mixed_joins[k.node]:.0f}x apart: the join stays "
                    "float and each input keeps its own scale"
                )
            elif k.node in keep_float:
                k.reason = "kept in float by the accuracy guard"
        self._subgraph_weights(model, plan, config)
        return model, plan, kept, inserted, ranges

    def _rebuild_plans(self, keep_sets: list[frozenset[str]]) -> list[tuple[ir.Model, Plan]]:
        plans = []
        for keep in keep_sets:
            model = self.prepared.clone()
            config = self._excluding(keep)[1]
            plans.append((model, plan_quantization(model, config, self.statistics)[0]))
        return plans

    def _rebuild_sources(self, keep_sets: list[frozenset[str]]) -> set[str]:
        return {s for _, p in self._rebuild_plans(keep_sets) for s in p.activations.values()}

    def prepare_rebuilds(self, keep_sets: list[frozenset[str]]) -> None:
        """Calibrates, in one sweep, every tensor the builds with ``keep_sets`` in float will
        need, and settles the layers those builds would find NaN-touching or mixed-range; so
        that the builds themselves (pieces on any engine, each on its own copy of this builder)
        never calibrate or change the builder, and give the same model wherever they run."""
        if self.config.mode != "static" or not keep_sets:
            return
        while True:
            plans = self._rebuild_plans(keep_sets)
            self._ensure_stats(sorted({s for _, p in plans for s in p.activations.values()}))
            if not any([self._settle(model, plan) for model, plan in plans]):
                return

    def _subgraph_weights(self, model: ir.Model, plan: Plan, config: QuantizeConfig) -> None:
        """Weights inside If/Loop/Scan bodies: int8 weight-only (no activation there is
        calibrated); counted with the quantized nodes, named in ``subgraph_nodes``."""
        found = weight_only.quantize_subgraph_weights(model, tuple(config.exclude))
        plan.quantized_nodes.update(found)
        self.subgraph_nodes = sorted(found)

    def _mixed_range_joins(self, model: ir.Model, plan: Plan) -> dict[str, float]:
        """Quantized Concats whose activation inputs need scales more than MIXED_RANGE_RATIO
        apart (box coordinates in pixels joined with probabilities): one output scale would
        cost the narrow inputs that many levels."""
        found = {}
        for node in model.graph:
            key = node_key(node)
            if node.op_type != "Concat" or key not in plan.quantized_nodes:
                continue
            scales = []
            for i, value in enumerate(node.inputs):
                if value is None or (key, i) in plan.constants:
                    continue
                name = _resolve_shared(plan, plan.resolve(value.name))
                src = plan.activations.get(name)
                if src is None or src not in self.stats:
                    continue
                scales.append(float(self._params(src)[0].scale))
            if len(scales) >= 2 and min(scales) > 0:
                ratio = max(scales) / min(scales)
                if ratio > MIXED_RANGE_RATIO:
                    found[key] = ratio
        return found

    def _touching_nonfinite(self, model: ir.Model, plan: Plan) -> frozenset[str]:
        """Quantized nodes reading or writing a planned tensor whose range is not finite."""
        bad = {
            t
            for t, src in plan.activations.items()
            if self.stats[src].nonfinite or not self.stats[src].count
        }
        bad |= {t for t in plan.shared if _resolve_shared(plan, t) in bad}
        if not bad:
            return frozenset()
        keys = set()
        for node in model.graph:
            key = node_key(node)
            if key not in plan.quantized_nodes:
                continue
            names = {plan.resolve(v.name) for v in (*node.inputs, *node.outputs) if v is not None}
            if names & bad:
                keys.add(key)
        if not keys:
            raise InternalError(f"tensors {sorted(bad)} hold NaN/Inf but no node owns them")
        return frozenset(keys)

    def _embedding_tables(self, model, plan: Plan, config: QuantizeConfig, keep_float) -> None:
        """Embedding tables (``Gather`` from a constant table) as int8 rows with a scale per
        column, as dynamic mode stores them: most of an encoder's bytes."""
        with passes.naming(model.graph):
            for node in list(model.graph):
                key = node_key(node)
                if (
                    node.op_type != "Gather"
                    or node.domain not in ("", "ai.onnx")
                    or key in keep_float
                    or _excluded(node, config.exclude)
                ):
                    continue
                if dynamic_mod.quantize_table(model.graph, node, key) is None:
                    plan.quantized_nodes[key] = "Gather"
        passes.remove_unused_initializers(model)  # the float tables

    def _build_dynamic(self, model: ir.Model, config: QuantizeConfig, keep_float: frozenset[str]):
        result = quantize_dynamic(model, tuple(config.exclude), config.reduce_range == "on")
        built = self._weights_built(model, result, keep_float)
        self._subgraph_weights(model, built[1], config)
        return built

    def _weights_built(self, model: ir.Model, result, keep_float: frozenset[str]):
        plan = Plan(quantized_nodes=dict(result.quantized))
        ops = {n.name or n.outputs[0].name: n.op_type for n in self.prepared.graph}
        kept = []
        for key, reason in result.kept_float.items():
            if key in keep_float:
                reason = "kept in float by the accuracy guard"
            kept.append(KeptFloat(key, ops.get(key, "?"), reason))
        return model, plan, kept, InsertResult(0, len(result.quantized), 0, 0), []

    def _build_weight_only(
        self, model: ir.Model, config: QuantizeConfig, keep_float: frozenset[str]
    ):
        if config.weight_method == "mse" and self.importance is None:
            # E[x^2] per input feature of every weighted MatMul: one sweep, computed once
            collector = Collector(self.prepared)
            names = weight_only.input_features(self.prepared)
            ranks = {
                v.name: len(v.shape)
                for n in self.prepared.graph
                for v in n.inputs
                if v is not None and v.shape is not None
            }
            for name in names:
                if name in ranks:
                    collector.channel_moments(name, ranks[name] - 1)
            found = (
                collector.run(
                    self.samples,
                    config.batch_size,
                    "calibration" if self.holdout > 0 else "all",
                    self.holdout,
                    desc="weight statistics",
                )
                if collector
                else None
            )
            self.calibrated = max(self.calibrated, found.samples if found else 0)
            self.importance = {
                name: np.asarray(sums.squares, np.float64) / max(1, sums.count)
                for (name, _), sums in (found.channels.items() if found else [])
            }
        result = weight_only.quantize_weights(
            model,
            bits=config.weight_bits,
            block_size=config.block_size,
            symmetric=not config.weight_zero_point,
            fmt=config.weight_format,
            importance=self.importance if config.weight_method == "mse" else None,
            exclude=tuple(config.exclude),
            accuracy_level=config.accuracy_level,
            codes=self.block_codes,
        )
        self.weight_format = result.format
        built = self._weights_built(model, result, keep_float)
        self._subgraph_weights(model, built[1], config)
        return built


def _resolve_reduce_range(config: QuantizeConfig) -> tuple[QuantizeConfig, str]:
    """Turns ``reduce_range="auto"`` into on or off for this machine; says why."""
    if config.reduce_range == "on":
        return config, "pair-safe (--reduce-range on)"
    if config.reduce_range == "off":
        return config, "full int8 (--reduce-range off)"
    why = int8_pairs_saturate()
    if why is None:
        return dataclasses.replace(config, reduce_range="off"), (
            "full int8 (this CPU's int8 kernels add in 32 bits; to serve on x86 CPUs without "
            "VNNI, quantize with --reduce-range on)"
        )
    logger.info("pair-safe weight range: %s", why)
    return dataclasses.replace(config, reduce_range="on"), f"pair-safe ({why})"


@cluster.accepts_engine
def quantize(
    model,
    samples: Samples,
    config: QuantizeConfig | None = None,
    *,
    verify_samples: Samples | None = None,
    thresholds: Thresholds | None = None,
    source: str | None = None,
    floors: bool = True,
    metric=None,
) -> tuple[ir.Model, QuantizeReport]:
    """Quantizes ``model`` (path, ModelProto or onnx_ir.Model) to int8 QDQ.

    Args:
        samples: calibration data; unless ``verify_samples`` is given, a held-out fraction
            ``config.holdout`` of it is kept out of calibration and used for verification.
        config: options (``QuantizeConfig()`` by default). With ``max_drop`` or
            ``min_cosine`` set, the accuracy guard keeps the most harmful layers in float until
            the target holds on the verification samples.
        verify_samples: separate verification data.
        thresholds: parity requirements recorded in the report's ``parity`` (given, they
            replace the default floors).
        floors: check each output against the default floor of its kind (``onnxzip.floors``).
        metric: a task metric (``onnxzip.metrics``) that replaces the default floors in the
            verification and in the floor guard.
        engine: (keyword) where the sample sweeps and the guard's per-layer rebuilds run: None
            (this process, or the engine made active by ``onnxzip.engine.cluster.using``),
            ``"ray"`` (a private Ray instance), ``"auto"`` or a Ray address, or a
            ``cluster.RayCluster``; the model written is the same bits wherever they ran.

    Returns:
        The quantized model (a new object; the input is not modified) and its report.

    Raises:
        InputError: bad options, data or model.
    """
    config = config or QuantizeConfig()
    config.validate()
    metric = metrics_mod.as_metric(metric)
    config, weight_range = _resolve_reduce_range(config)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    source = source or (str(model) if not isinstance(model, ir.Model) else "model")
    original = io.at_opset(io.load_model(model, name=source), config.target_opset, source)
    # Tensors are shared, never written: the caller's model stays as it was.
    prepared = original.clone()
    weight_before = io.weights_nbytes(original)
    opset = prepared.opset_imports.get("", 0)
    if config.mode == "weight-only" and config.weight_format == "qdq" and opset < 21:
        raise InputError(
            f"weight format qdq (DequantizeLinear with block_size) needs opset 21; the model "
            f"is at opset {opset}: choose nbits (MatMulNBits) or auto, or convert it"
        )
    prepared_info = passes.prepare_for_inference(prepared)
    prepared, config = _avoid_opset21_matmul(prepared, config, source)
    holdout = 0.0 if verify_samples is not None else config.holdout
    split = "all" if verify_samples is not None else "holdout"
    verifying = verify_samples is not None or holdout > 0
    if holdout > 0 and not _both_splits_hold_samples(samples, config.batch_size, holdout):
        logger.warning(
            "%s: too few samples to hold %g of them out; calibrating and verifying on all of them",
            samples.describe(),
            holdout,
        )
        holdout, split = 0.0, "all"
    if config.preset == "auto":
        chosen = (
            "transformer"
            if config.mode == "static" and smooth.is_transformer(prepared)
            else "default"
        )
        config = dataclasses.replace(config, preset=chosen)
    plain = prepared  # without SmoothQuant: what the dynamic fallback quantizes
    smoothing = None
    if config.mode == "static" and (
        config.smooth_quant == "on"
        or (config.smooth_quant == "auto" and config.preset == "transformer")
    ):
        t_smooth = time.perf_counter()
        prepared, smoothing = smooth.smooth(
            prepared,
            samples,
            batch_size=config.batch_size,
            holdout=holdout,
            alpha=config.smooth_alpha,
            pair_safe=config.reduce_range == "on",
            exclude=lambda node: _excluded(node, config.exclude),
        )
        timings["smooth"] = time.perf_counter() - t_smooth
    wanted = config.bias_correction == "on" or (config.bias_correction == "auto" and verifying)

    def new_builder(model: ir.Model) -> _Builder:
        made = _Builder(model, samples, config, holdout)
        made.collect_means = config.mode == "static" and wanted
        made.anticipate_guard = config.mode == "static" and config.guarded
        return made

    builder = new_builder(prepared)
    timings["prepare"] = time.perf_counter() - t0 - timings.get("smooth", 0.0)

    t0 = time.perf_counter()
    work, plan, kept, inserted, ranges = builder.build()
    timings["calibrate+insert"] = time.perf_counter() - t0

    data = verify_samples or samples
    bias_note = None
    evaluator = None  # reference outputs on the verification samples, computed once when needed
    smooth_note = smoothing.describe() if smoothing is not None else None
    if smoothing is not None and smoothing.activations and config.smooth_quant == "auto":
        if verifying:
            # The strength search judges each MatMul alone: kept only when the whole model is
            # closer on the held-out samples with it than without (as bias correction's auto).
            t0 = time.perf_counter()
            evaluator = _Evaluator(original, data, split, config)
            unsmoothed = new_builder(plain)
            candidate = unsmoothed.build()
            with_snr = evaluator.score(work, config)[1]
            without_snr = evaluator.score(candidate[0], config)[1]
            if without_snr >= with_snr:
                builder, (work, plan, kept, inserted, ranges) = unsmoothed, candidate
                smooth_note = (
                    f"SmoothQuant not kept: held-out output SNR {with_snr:.2f} dB with it, "
                    f"{without_snr:.2f} dB without"
                )
            else:
                smooth_note += (
                    f"; held-out output SNR {with_snr:.2f} dB ({without_snr:.2f} without)"
                )
            timings["smooth"] += time.perf_counter() - t0
    if config.mode == "static" and wanted:
        t0 = time.perf_counter()
        # the builder's float model: the unsmoothed one when SmoothQuant was not kept
        biases = correct_biases(
            builder.prepared, work, plan, samples, config, holdout, builder.means
        )
        layers = len(biases)
        if layers:
            builder.biases = biases
            candidate = builder.build()
            use = config.bias_correction == "on"
            if config.bias_correction == "auto" and verifying:
                evaluator = evaluator or _Evaluator(original, data, split, config)
                before = evaluator.score(work, config)[1]
                after = evaluator.score(candidate[0], config)[1]
                use = after > before
                bias_note = (
                    f"{'applied' if use else 'not applied'}: output SNR {before:.2f} dB without, "
                    f"{after:.2f} dB with, on the verification samples ({layers} layers)"
                )
            elif use:
                bias_note = f"applied to {layers} layers"
            if use:
                work, plan, kept, inserted, ranges = candidate
            else:
                builder.biases = {}
        timings["bias correction"] = time.perf_counter() - t0
    guard_report = None
    if config.guarded:
        if not verifying:
            raise InputError(
                "the accuracy guard needs verification samples: --verify-data or --holdout > 0"
            )
        t0 = time.perf_counter()
        evaluator = evaluator or _Evaluator(original, data, split, config)
        work, plan, kept, inserted, ranges, guard_report = _guard(
            builder, (work, plan, kept, inserted, ranges), evaluator, config
        )
        timings["guard"] = time.perf_counter() - t0

    report = QuantizeReport(
        config=config,
        source=source,
        data=samples.describe(),
        synthetic=samples.synthetic,
        calibration_samples=builder.calibrated,
        prepared=prepared_info,
        weight_bytes_before=weight_before,
        seconds=timings,
        **_built_fields(work, plan, kept, inserted, ranges),
        guard=guard_report,
        bias_correction=bias_note,
        smooth_quant=smooth_note,
        weight_range=weight_range,
        weight_format=builder.weight_format,
        subgraph_nodes=builder.subgraph_nodes,
    )
    if verifying:  # also when nothing was quantized: it checks that the outputs can be compared
        t0 = time.perf_counter()

        def final_verify(model):
            return verify(
                original,
                model,
                data,
                thresholds=thresholds,
                batch_size=config.batch_size,
                split=split,
                holdout=holdout,
                reference_name=source,
                candidate_name="quantized",
                reference_outputs=evaluator.runs if evaluator is not None else None,
                floors=floors,
                metric=metric,
            )

        report.parity = final_verify(work)
        timings["verify"] = time.perf_counter() - t0
        floors_failed = report.parity.floors is not None and not all(
            c.passed for c in report.parity.floors
        )
        if floors_failed and config.floor_guard and not config.guarded and plan.quantized_nodes:
            # Defaults that keep the task: dynamic int8 when it holds the floors (recognizers,
            # transformers: static activation ranges are what break them), else the layers that
            # break the floors go back to float.
            t0 = time.perf_counter()
            # the reference outputs do not depend on the metric: reuse them
            evaluator = evaluator or _Evaluator(original, data, split, config)
            evaluator.metric = metric
            failed = "; ".join(c.describe() for c in report.parity.floors if not c.passed)
            dynamic = _dynamic_fallback(plain, samples, config, holdout, evaluator)
            if dynamic is not None:
                builder, result = dynamic
                work, plan, kept, inserted, ranges = result
                report.fallback = (
                    f"dynamic int8: static int8 broke the default floors ({failed}), dynamic "
                    "int8 holds every floor on the held-out samples"
                )
                report.config = builder.config
            else:
                work, plan, kept, inserted, ranges, report.guard = _floor_guard(
                    builder, (work, plan, kept, inserted, ranges), evaluator, config
                )
                # The guard kept every static layer in float: dynamic int8 with its own guard
                # may still keep some weights int8 (a text recognizer whose every static
                # layer breaks a whole-sequence floor, while most of its MatMuls do not).
                guarded = (
                    _dynamic_guarded(plain, samples, config, holdout, evaluator)
                    if not plan.quantized_nodes
                    else None
                )
                if guarded is not None:
                    builder, (work, plan, kept, inserted, ranges, report.guard) = guarded
                    report.fallback = (
                        f"dynamic int8: static int8 broke the default floors ({failed}) and its "
                        "accuracy guard kept every layer in float; dynamic int8 holds them with "
                        "the layers its own guard keeps in float"
                    )
                    report.config = builder.config
            for name, value in _built_fields(work, plan, kept, inserted, ranges).items():
                setattr(report, name, value)
            timings["guard"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            report.parity = final_verify(work)
            timings["verify"] += time.perf_counter() - t0
    if not report.quantized_ops:
        report.nothing_because = nothing_quantized_because(
            prepared, report.config.mode, report.kept_float
        )
    return work, report


def _built_fields(work, plan, kept, inserted, ranges) -> dict:
    """The report's fields that describe one built model."""
    return {
        "quantized_ops": dict(Counter(plan.quantized_nodes.values())),
        "folded_activations": sorted(plan.folded),
        "kept_float": kept,
        "qdq_pairs": inserted.qdq_pairs,
        "weights_quantized": inserted.weights,
        "biases_quantized": inserted.biases,
        "weight_bytes_after": io.weights_nbytes(work),
        "ranges": ranges,
    }


def _avoid_opset21_matmul(
    model: ir.Model, config: QuantizeConfig, source: str
) -> tuple[ir.Model, QuantizeConfig]:
    """onnxruntime up to 1.19 fuses a QDQ MatMul of an opset-21 model into QLinearMatMul(21), for
    which it has no CPU kernel: such a model would not load. When the model is written at opset
    21 for such a runtime (``target_opset=21``, or the installed onnxruntime lacks the kernel),
    quantize at opset 20 instead, or, where the model does not convert down, leave MatMul in
    float. Newer runtimes have the kernel: the model keeps its opset."""
    if model.opset_imports.get("", 0) != 21 or config.mode != "static":
        return model, config
    if config.target_opset is None and io.runtime_has_kernel("QLinearMatMul", 21):
        return model, config
    if not any(n.op_type == "MatMul" and n.domain in ("", "ai.onnx") for n in model.graph):
        return model, config
    try:
        converted = io.convert_opset(model, 20, source)
    except InputError as exc:
        logger.warning(
            "%s: MatMul stays in float: onnxruntime has no QLinearMatMul kernel for opset 21 and "
            "the model does not convert to opset 20 (%s)",
            source,
            exc,
        )
        return model, dataclasses.replace(config, exclude=(*config.exclude, "MatMul"))
    logger.info("%s: quantizing at opset 20 (no QLinearMatMul kernel for opset 21)", source)
    return converted, config


def _both_splits_hold_samples(samples: Samples, batch_size: int, holdout: float) -> bool:
    for split in ("holdout", "calibration"):
        try:
            next(iter(samples.batches(batch_size, split, holdout)))
        except NoSamplesError:
            return False
    return True


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
        if key not in q_nodes:
            continue
        w = passes.const_array(n.inputs[1])
        w_q = passes.dequantized_array(q_nodes[key].inputs[1])
        if w is None or w_q is None or w.shape != w_q.shape:
            continue
        layers.append((n, w.astype(np.float64) - w_q.astype(np.float64)))
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
    for layer, diff in layers:
        mean = means[(layer.inputs[0].name, 1)]
        if layer.op_type == "Conv":
            delta = diff.reshape(diff.shape[0], diff.shape[1], -1).sum(axis=2) @ mean
        else:
            delta = diff @ mean if ops.attr(layer, "transB", 0) else diff.T @ mean
        bias = layer.inputs[2] if len(layer.inputs) > 2 else None
        base = passes.const_array(bias) if bias is not None else np.zeros(delta.shape, np.float32)
        if base is None or base.ndim != 1 or base.shape[0] != delta.shape[0]:
            continue
        corrected[node_key(layer)] = (base + delta).astype(np.float32)
    return corrected


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


# -- accuracy guard -------------------------------------------------------------------------------


@dataclass
class GuardStep:
    node: str
    op_type: str
    snr_gain_db: float  # how much reverting this layer alone raised the output SNR
    metric_after: float


@dataclass
class GuardReport:
    target: str
    metric_before: float
    metric_after: float
    met: bool
    evaluated_samples: int
    candidates: int
    kept_float: list[GuardStep] = field(default_factory=list)
    # wall seconds of its phases: rebuilds prepared, per-layer sensitivity, search over prefixes
    seconds: dict[str, float] = field(default_factory=dict)


class _Evaluator:
    """Reference outputs computed once; candidates scored on the same held-out batches."""

    def __init__(
        self,
        original: ir.Model,
        data: Samples,
        split: str,
        config: QuantizeConfig,
        metric: metrics_mod.TaskMetric | None = None,
    ):
        self.metric = metric
        self.data, self.split = data, split
        self.batch_size, self.holdout = config.batch_size, config.holdout or 0.5
        self.runs = ReferenceOutputs(
            original,
            data,
            config.batch_size,
            split,
            config.holdout or 0.5,
            limit=config.guard_samples,
        )
        self.names = self.runs.names
        self.batches, self.reference = self.runs.batches, self.runs.outputs
        self.classifier = {v.name: is_classifier(v) for v in original.graph.outputs}
        self.samples = self.runs.samples
        self.has_labels = all(b.labels is not None for b in self.batches)
        self.outputs = [v for v in original.graph.outputs if v.name in self.names]
        if config.max_drop is not None and not any(self.classifier.values()):
            raise InputError(
                "--max-drop needs an output of class scores ([N, C]); use --min-cosine instead"
            )

    def floor_checks(self, model: ir.Model) -> tuple[list, dict[str, float]]:
        """The default floors (or the task metric's) on the held-out batches, and per checked
        part a level to raise: its SNR in dB, or the task metric's score."""
        run = Runner(model, name="candidate", optimization="all")
        judge = floors_mod.Judge(self.outputs, self.metric)
        fed = iter(self.batches)
        pairs = getattr(self.data, "pairs", None)
        if pairs:  # a stream: the candidate runs on its own carried state, as verify runs it
            from onnxzip.stateful import StatefulSamples

            own = StatefulSamples(self.data.base, model, pairs, "candidate")
            own.max_batch = self.data.max_batch
            fed = own.batches(self.batch_size, self.split, self.holdout)
        for batch, ref, feed in zip(self.batches, self.reference, fed, strict=False):
            judge.add(ref, run.run(feed, self.names), batch)
        return judge.checks(), judge.levels()

    def local_losses(
        self, reference: ir.Model, candidate: ir.Model, keys: list[str]
    ) -> dict[str, float]:
        """Per node of ``keys`` (nodes of ``reference``, the float model the candidate was built
        from): the SNR in dB its output has lost against its inputs' in ``candidate``, from one
        run of each model on the held-out batches with those tensors fetched. Tensors the
        candidate no longer has (folded away) count as exact."""
        nodes = {node_key(n): n for n in reference.graph}
        present = {v.name for n in candidate.graph for v in n.outputs}  # graph inputs: exact
        present &= {v.name for n in reference.graph for v in n.outputs}
        ends: dict[str, tuple[list[str], list[str]]] = {}
        for key in keys:
            node = nodes[key]
            ins = [
                v.name
                for v in node.inputs
                if v is not None and v.const_value is None and v.name in present
            ]
            outs = [v.name for v in node.outputs if v.name in present]
            ends[key] = (ins, outs)
        names = sorted({t for ins, outs in ends.values() for t in ins + outs})
        signal = dict.fromkeys(names, 0.0)
        noise = dict.fromkeys(names, 0.0)
        ref_run = Runner(expose(reference, names), name="reference", optimization="all")
        cand_run = Runner(expose(candidate, names), name="candidate", optimization="all")
        for batch in self.batches:
            ref, out = ref_run.run(batch, names), cand_run.run(batch, names)
            for t in names:
                a, b = ref[t], out[t]
                if a.shape != b.shape or not np.issubdtype(a.dtype, np.floating):
                    continue
                a = a.astype(np.float64)
                signal[t] += float(np.sum(a * a))
                noise[t] += float(np.sum((a - b.astype(np.float64)) ** 2))

        def snr(t: str) -> float:
            if not np.isfinite(noise[t]):
                return -200.0
            return float(np.clip(snr_db(signal[t], noise[t]), -200.0, 200.0))

        losses = {}
        for key, (ins, outs) in ends.items():
            before = min((snr(t) for t in ins), default=200.0)
            after = min((snr(t) for t in outs), default=before)
            losses[key] = before - after
        return losses

    def score(self, model: ir.Model, config: QuantizeConfig) -> tuple[float, float, bool]:
        """(target metric, mean output SNR in dB, target met)."""
        run = Runner(model, name="candidate", optimization="all")
        acc = {n: OutputAccumulator(self.classifier[n]) for n in self.names}
        for batch, ref in zip(self.batches, self.reference, strict=True):
            out = run.run(batch, self.names)
            for n in self.names:
                acc[n].add(ref[n], out[n], batch.labels, batch.count)
        results = [acc[n].result(n) for n in self.names]
        snr = float(np.mean([min(r.snr_db, 200.0) for r in results]))
        met = True
        metric = snr
        if config.max_drop is not None:
            r = next(r for r in results if r.top1_agreement is not None)
            if self.has_labels:
                metric = 100.0 * (r.reference_accuracy - r.candidate_accuracy)
            else:
                metric = 100.0 * (1.0 - r.top1_agreement)
            met &= metric <= config.max_drop + 1e-9
        if config.min_cosine is not None:
            cos = min(r.cosine_mean for r in results)
            if config.max_drop is None:
                metric = cos
            met &= cos >= config.min_cosine
        return metric, snr, met


def _guard(builder: _Builder, first, evaluator: _Evaluator, config: QuantizeConfig):
    """Keeps the layers whose quantization hurts most in float until the target holds."""
    target = " and ".join(
        t
        for t in (
            f"top-1 drop <= {config.max_drop} points" if config.max_drop is not None else "",
            f"cosine >= {config.min_cosine}" if config.min_cosine is not None else "",
        )
        if t
    )

    def judge(model: ir.Model) -> tuple[float, float, bool]:
        metric, snr, met = evaluator.score(model, config)
        return snr, metric, met

    def reason(step: GuardStep) -> str:
        return f"accuracy guard: quantizing it alone cost {step.snr_gain_db:.2f} dB of output SNR"

    candidates = list(first[1].quantized_nodes)
    return _search_guard(builder, first, evaluator, target, candidates, judge, reason)


def _dynamic_build(prepared, samples, config, holdout):
    """(builder, build) of dynamic int8 in place of static, when it quantizes something; None
    otherwise (or when the mode asked for is not static)."""
    if config.mode != "static":
        return None
    builder = _Builder(prepared, samples, dataclasses.replace(config, mode="dynamic"), holdout)
    result = builder.build()
    return (builder, result) if result[1].quantized_nodes else None


def _holds(evaluator, model) -> bool:
    checks, _ = evaluator.floor_checks(model)
    return all(c.passed for c in checks)


def _dynamic_fallback(prepared, samples, config, holdout, evaluator):
    """(builder, build result) of dynamic int8 when it quantizes something and holds every
    default floor on the evaluator's held-out batches; None otherwise."""
    built = _dynamic_build(prepared, samples, config, holdout)
    if built is None or not _holds(evaluator, built[1][0]):
        return None
    logger.info("static int8 broke the default floors; dynamic int8 holds them")
    return built


def _dynamic_guarded(prepared, samples, config, holdout, evaluator):
    """(builder, guarded build) of dynamic int8 with the floor guard, when it keeps some layer
    int8 and holds every default floor; None otherwise (or when the mode is not static)."""
    built = _dynamic_build(prepared, samples, config, holdout)
    if built is None:
        return None
    builder, first = built
    guarded = _floor_guard(builder, first, evaluator, builder.config)
    if not guarded[1].quantized_nodes or not _holds(evaluator, guarded[0]):
        return None
    logger.info("static int8 kept nothing; dynamic int8 with its guard holds the floors")
    return builder, guarded


KEPT_SHOWN = 6  # layers named per reason in the summary (the JSON report lists every one)


def kept_float_lines(kept) -> list[str]:
    """The layers quantization kept in float, grouped by why (the per-layer cost the guards'
    ``reason`` functions write left out of the grouping), at most ``KEPT_SHOWN`` named per
    reason: a one-glance summary for ``compress`` (the JSON report has each reason)."""
    groups: dict[str, list[str]] = {}
    for k in kept:
        why = re.sub(
            r"quantizing it alone cost -?[\d.]+ dB", "what quantizing it alone cost", k.reason
        )
        groups.setdefault(why, []).append(k.node)
    lines = [f"kept in float: {len(kept)} layer{'s' if len(kept) != 1 else ''}"]
    for why, nodes in groups.items():
        named = ", ".join(nodes[:KEPT_SHOWN])
        more = f" (+{len(nodes) - KEPT_SHOWN} more)" if len(nodes) > KEPT_SHOWN else ""
        lines.append(f"  {why}: {named}{more}")
    return lines


FLOOR_TARGET = "the default floors of the outputs' kinds"

# Up to this many candidate layers, a layer's sensitivity is measured by reverting it alone
# (one build and one evaluation each); above it, from one run of the reference and one of the
# quantized model (the SNR each layer loses between its inputs and its output), so the guard's
# cost grows with the graph, not with its square.
EXACT_SENSITIVITY_LAYERS = 96


def _floor_guard(builder: _Builder, first, evaluator: _Evaluator, config: QuantizeConfig):
    """Keeps the layers whose quantization hurts the failing floors most in float until every
    default floor holds on the held-out samples (``onnxzip.floors``).

    Sensitivity of a layer: how much the SNR of the failing parts (outputs or slices) recovers
    when that layer alone stays float (see ``_search_guard``)."""
    work, plan, *_ = first
    checks, snrs = evaluator.floor_checks(work)
    watched = sorted({c.part for c in checks if not c.passed})

    def level(values: dict[str, float]) -> float:
        return float(np.mean([min(values[p], 200.0) for p in watched])) if watched else 0.0

    def judge(model: ir.Model) -> tuple[float, float, bool]:
        checks, values = evaluator.floor_checks(model)
        left = sum(not c.passed for c in checks)
        return level(values), float(left), left == 0

    def reason(step: GuardStep) -> str:
        return (
            "accuracy guard (default floors): quantizing it alone cost "
            f"{step.snr_gain_db:.2f} dB on {', '.join(watched)}"
        )

    if watched:
        logger.info(
            "default floors fail on %s: searching layers to keep in float", ", ".join(watched)
        )
    # Ops that only move 8-bit codes (their output shares its input's parameters) add no error
    # of their own: not worth a sensitivity run each.
    moves = {
        node_key(n)
        for n in builder.prepared.graph
        if n.outputs
        and all(o.name in plan.shared for o in n.outputs if o.uses() or o.is_graph_output())
    }
    candidates = [k for k in plan.quantized_nodes if k not in moves]
    first_verdict = (level(snrs), float(sum(not c.passed for c in checks)))
    return _search_guard(
        builder, first, evaluator, FLOOR_TARGET, candidates, judge, reason, first_verdict
    )


def _search_guard(
    builder: _Builder,
    first,
    evaluator: _Evaluator,
    target: str,
    candidates: list[str],
    judge,
    reason,
    first_verdict: tuple[float, float] | None = None,
):
    """The fewest most-sensitive layers to keep in float for ``judge`` to hold.

    ``judge(model)`` gives (level to raise, reported metric, target met). Layers are ordered by
    how much keeping each in float raises the level (``_sensitivities``); the fewest of that
    order that make the target hold are found by binary search over its prefixes (more layers
    in float never costs accuracy, up to noise; with every layer reverted the model computes
    what the original does). The result is the model of the prefix found, checked."""
    work, plan, *_ = first
    if first_verdict is None:
        base, metric, met = judge(work)
    else:
        (base, metric), met = first_verdict, first_verdict[1] == 0
    report = GuardReport(target, metric, metric, met, evaluator.samples, len(candidates))
    if met or not candidates:
        return (*first, report)
    gains = _sensitivities(builder, work, candidates, evaluator, judge, base, report.seconds)
    t0 = time.perf_counter()
    order = sorted(candidates, key=lambda k: -gains[k])
    tried: dict[int, tuple] = {}

    def attempt(k: int):
        if k not in tried:
            built = builder.build(frozenset(order[:k]))
            tried[k] = (built, judge(built[0]))
        return tried[k]

    lo, hi = 1, len(order)
    while lo < hi:
        mid = (lo + hi) // 2
        if attempt(mid)[1][2]:
            hi = mid
        else:
            lo = mid + 1
    best, (_, metric, met) = attempt(lo)
    kept = set(order[:lo])
    for key in order[:lo]:
        report.kept_float.append(GuardStep(key, plan.quantized_nodes[key], gains[key], metric))
    report.seconds["search"] = time.perf_counter() - t0
    logger.info("guard: %d layers kept in float, metric %.4f", lo, metric)
    report.metric_after = metric
    report.met = met
    steps = {s.node: s for s in report.kept_float}
    for k in best[2]:
        if k.node in kept:
            k.reason = reason(steps[k.node])
    return (*best, report)


def _sensitivities(
    builder: _Builder,
    work: ir.Model,
    candidates: list[str],
    evaluator: _Evaluator,
    judge,
    base,
    seconds: dict[str, float],
) -> dict[str, float]:
    """Per candidate layer, how much keeping it alone in float raises the judge's level (few
    layers), or the SNR in dB it loses between its inputs and its output in the quantized model
    (many layers: one run of each model, see ``EXACT_SENSITIVITY_LAYERS``). Records the wall
    seconds of its phases in ``seconds`` ("prepare", "sensitivity")."""
    if len(candidates) > EXACT_SENSITIVITY_LAYERS:
        logger.info("guard: %d layers, sensitivity from one run of each model", len(candidates))
        t0 = time.perf_counter()
        gains = evaluator.local_losses(builder.prepared, work, candidates)
        seconds["sensitivity"] = time.perf_counter() - t0
        return gains
    # One piece per layer on the active engine (this process or Ray tasks), results in order;
    # what the pieces' builds need is calibrated here first, so no piece changes the builder.
    t0 = time.perf_counter()
    builder.prepare_rebuilds([frozenset([key]) for key in candidates])
    t1 = time.perf_counter()
    gains = cluster.active().map(
        _layer_gain,
        candidates,
        (builder, judge, base),
        total=len(candidates),
        desc="guard: sensitivity",
        unit="layer",
    )
    gains = dict(zip(candidates, gains, strict=True))
    seconds["prepare"], seconds["sensitivity"] = t1 - t0, time.perf_counter() - t1
    return gains


def _layer_gain(context, key: str) -> float:
    """How much keeping layer ``key`` alone in float raises the judge's level."""
    builder, judge, base = context
    model, *_ = builder.build(frozenset([key]))
    return judge(model)[0] - base


__all__ = ["QuantizeConfig", "QuantizeReport", "quantize", "plan_quantization", "calibrate"]
