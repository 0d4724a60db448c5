"""What ``quantize`` reports: the calibrated ranges, the layers kept in float and why, the
accuracy guard's steps, and the verdict against the original."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import onnx_ir as ir

from onnxzip import passes
from onnxzip.quantize.config import QuantizeConfig
from onnxzip.report import table
from onnxzip.verify import (
    VerifyReport,
)

logger = logging.getLogger(__name__)


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
    verified_on: str | None = None  # the verification samples, when not ``data``'s held-out part

    def _mode_lines(self) -> list[str]:
        c = self.config
        if c.mode == "weight-only":
            layout = (
                "DequantizeLinear with block_size (opset 21), fused into MatMulNBits by onnxruntime"
                if self.weight_format == "qdq"
                else "com.microsoft MatMulNBits (onnxruntime)"
            )
            data = f"{self.calibration_samples} samples of {self.data}" + (
                " (SYNTHETIC)" if self.synthetic else ""
            )
            method = (
                f"clipping by E[x^2] on {data}"
                if c.weight_method == "mse" and self.calibration_samples
                else f"GPTQ with E[x x^T] on {data}"
                if c.weight_method == "gptq" and self.calibration_samples
                else "round to nearest (no input statistics: the weighted inputs' shapes are "
                "unknown)"
                if c.weight_method in ("mse", "gptq")
                else "round to nearest"
            )
            return [
                f"mode         weight-only int{c.weight_bits}, blocks of {c.block_size} rows, "
                f"{'asymmetric (zero points)' if c.weight_zero_point else 'symmetric'}; {method}",
                f"format       {layout}; activations stay float",
            ]
        if c.mode == "dynamic":
            return [
                f"mode         dynamic (no calibration); verified on {self.verified_on or self.data}",
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
            # a reason shared word for word by many layers (the attention MatMuls of a
            # transformer, which read no weight) shows its first few and a count
            count: dict[str, int] = {}
            rows = []
            for k in self.kept_float:
                count[k.reason] = count.get(k.reason, 0) + 1
                if count[k.reason] <= KEPT_SHOWN:
                    rows.append([k.node, k.op_type, k.reason])
            for why, n in count.items():
                if n > KEPT_SHOWN:
                    rows.append([f"(+{n - KEPT_SHOWN} more)", "", why])
            lines.append(table(["node", "op", "reason"], rows))
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
