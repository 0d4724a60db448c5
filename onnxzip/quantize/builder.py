"""The builder: one prepared float model, its statistics gathered once, and a quantized model
built from them for any set of layers kept in float.

Every candidate a decision compares (bias correction on or off, SmoothQuant kept or not, each
prefix the accuracy guard tries) is ``_Builder.build(keep_float)``: the plan of the prepared
model without those layers, Q/DQ pairs from the ranges already calibrated (a range a rebuild
needs that the first plan did not is calibrated once, in the first sweep when a guard is
anticipated), weights quantized as ``q = clip(round(w / S) + Z)``. Returns ``Built``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import NamedTuple

import numpy as np
import onnx_ir as ir

from onnxzip import io, passes
from onnxzip.data import Samples
from onnxzip.errors import DataError, InternalError, ModelError
from onnxzip.ir.ops import activation_islands, logarithm_front_end, node_key
from onnxzip.quantize import calibrate as cal
from onnxzip.quantize import dynamic as dynamic_mod
from onnxzip.quantize import params as qp
from onnxzip.quantize import weight_only
from onnxzip.quantize.bias_correction import _apply_biases, _bias_layers
from onnxzip.quantize.config import QuantizeConfig
from onnxzip.quantize.dynamic import quantize_dynamic
from onnxzip.quantize.plan import _resolve_shared, calibrate_sweep, plan_quantization
from onnxzip.quantize.qdq import InsertResult, insert_qdq
from onnxzip.quantize.report import GuardReport, KeptFloat, TensorRange
from onnxzip.quantize.rules import (
    Plan,
    normalisation_statistics,
)
from onnxzip.statistics import Collector

logger = logging.getLogger(__name__)


# A Concat whose inputs need scales this many times apart stays float (each input keeps its
# own scale): one shared scale would leave the narrowest input 1/8 of the levels (3 bits).
MIXED_RANGE_RATIO = 8.0


class Built(NamedTuple):
    """One quantized model the builder made, with what describes it."""

    model: ir.Model
    plan: Plan
    kept: list[KeptFloat]  # weighted layers left float, each with its reason
    inserted: InsertResult
    ranges: list[TensorRange]

    def fields(self) -> dict:
        """The report's fields that describe this model."""
        return {
            "quantized_ops": dict(Counter(self.plan.quantized_nodes.values())),
            "folded_activations": sorted(self.plan.folded),
            "kept_float": self.kept,
            "qdq_pairs": self.inserted.qdq_pairs,
            "weights_quantized": self.inserted.weights,
            "biases_quantized": self.inserted.biases,
            "weight_bytes_after": io.weights_nbytes(self.model),
            "ranges": self.ranges,
        }


class Guarded(NamedTuple):
    """What an accuracy guard chose: the model built with its layers in float, and why."""

    built: Built
    report: GuardReport


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
        self.front_end = logarithm_front_end(prepared.graph)
        self.islands = activation_islands(prepared.graph)
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
        self.weight_codes: dict = {}  # static int8: each weight's codes, kept across rebuilds
        # nodes inside If/Loop/Scan bodies whose weights were quantized (weight-only int8)
        self.subgraph_nodes: list[str] = []

    def _ensure_stats(self, sources: list[str], means: list[tuple[str, int]] = ()) -> None:
        missing = [s for s in sources if s not in self.stats]
        means = [k for k in means if k not in self.means]
        if missing or means:

            def sweep(in_numpy: bool):
                return calibrate_sweep(
                    self.prepared,
                    missing,
                    self.samples,
                    self.config,
                    self.holdout,
                    in_numpy=in_numpy,
                    channel_means=means,
                )

            try:
                found = sweep(False)
            except ModelError as exc:
                if self.config.calibration != "minmax":
                    raise
                # onnxruntime's ReduceMin/ReduceMax refuse empty tensors: reduce in numpy instead.
                logger.info("in-graph min/max failed (%s); exposing the tensors instead", exc)
                found = sweep(True)
            self.stats.update(found.ranges)
            self.means.update(found.means)
            self.calibrated = max(self.calibrated, found.samples)

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
        exclude = self.config.exclude.with_names(*sorted(keep_float))
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

    def build(self, keep_float: frozenset[str] = frozenset()) -> Built:
        """The prepared model quantized with the layers ``keep_float`` left float, every new
        value typed (``passes.type_outputs``)."""
        built = self._build(keep_float)
        passes.type_outputs(built.model)
        return built

    def _build(self, keep_float: frozenset[str]) -> Built:
        model = self.prepared.clone()
        keep_float, config = self._excluding(keep_float)
        _apply_biases(model, {k: b for k, b in self.biases.items() if k not in keep_float})
        if config.mode == "dynamic":
            return self._build_dynamic(model, config, keep_float)
        if config.mode == "weight-only":
            return self._build_weight_only(model, config, keep_float)
        plan, kept = plan_quantization(model, config, self.statistics, self.front_end, self.islands)
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
            model,
            plan,
            act_params,
            config.activation_type,
            config.reduce_range == "on",
            weight_codes=self.weight_codes,
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
        return Built(model, plan, kept, inserted, ranges)

    def _rebuild_plans(self, keep_sets: list[frozenset[str]]) -> list[tuple[ir.Model, Plan]]:
        plans = []
        for keep in keep_sets:
            model = self.prepared.clone()
            config = self._excluding(keep)[1]
            plans.append(
                (
                    model,
                    plan_quantization(model, config, self.statistics, self.front_end, self.islands)[
                        0
                    ],
                )
            )
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
        found = weight_only.quantize_subgraph_weights(model, config.exclude)
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
                    or config.exclude.matches(node)
                ):
                    continue
                if dynamic_mod.quantize_table(model.graph, node, key) is None:
                    plan.quantized_nodes[key] = "Gather"
        passes.remove_unused_initializers(model)  # the float tables

    def _build_dynamic(self, model: ir.Model, config: QuantizeConfig, keep_float: frozenset[str]):
        result = quantize_dynamic(model, config.exclude, config.reduce_range == "on")
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
        return Built(model, plan, kept, InsertResult(0, len(result.quantized), 0, 0), [])

    def _build_weight_only(
        self, model: ir.Model, config: QuantizeConfig, keep_float: frozenset[str]
    ):
        gptq = config.weight_method == "gptq"
        if config.weight_method in ("mse", "gptq") and self.importance is None:
            # E[x^2] per input feature (mse) or E[x x^T] (gptq) of every weighted MatMul's
            # input: one sweep, computed once
            collector = Collector(self.prepared)
            names = weight_only.input_features(self.prepared)
            ranks = {
                v.name: len(v.shape)
                for n in self.prepared.graph
                for v in n.inputs
                if v is not None and v.shape is not None
            }
            for name in names:
                if gptq:
                    collector.covariance(name)
                elif name in ranks:
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
            io.drop_resident_pages(self.prepared)  # the sweep read every weight: let them go
            self.importance = {
                name: np.asarray(sums.squares, np.float64) / max(1, sums.count)
                for (name, _), sums in (found.channels.items() if found else [])
            }
            for name, cov in found.covariances.items() if found else []:
                if cov.mean() is not None:
                    self.importance[name] = cov.mean()
        result = weight_only.quantize_weights(
            model,
            bits=config.weight_bits,
            block_size=config.block_size,
            symmetric=not config.weight_zero_point,
            fmt=config.weight_format,
            importance=self.importance if config.weight_method in ("mse", "gptq") else None,
            exclude=config.exclude,
            accuracy_level=config.accuracy_level,
            codes=self.block_codes,
            front_end=self.front_end,
        )
        self.weight_format = result.format
        built = self._weights_built(model, result, keep_float)
        self._subgraph_weights(model, built[1], config)
        return built
