"""The accuracy guard: the fewest layers to keep in float for a target to hold.

Targets: an explicit one (top-1 drop in points, mean cosine; ``_guard``) or the default floors
of the outputs' kinds (``_floor_guard``). A layer's sensitivity is how much the judged level
(output SNR in dB, or the failing parts' SNR) rises when that layer alone stays float; with
many layers it is the SNR each layer loses between its inputs and its output in one run of
each model. Layers sorted by sensitivity, the shortest prefix that makes the target hold is
found by binary search (more layers in float never costs accuracy, up to noise). When static
int8 breaks the floors, dynamic int8 (alone, or with its own guard) is tried first.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import onnx_ir as ir

from onnxzip import floors as floors_mod
from onnxzip import metrics as metrics_mod
from onnxzip.data import Samples
from onnxzip.engine import cluster
from onnxzip.errors import InputError
from onnxzip.ir.ops import node_key
from onnxzip.quantize.builder import Built, Guarded, _Builder
from onnxzip.quantize.config import QuantizeConfig
from onnxzip.quantize.report import FLOOR_TARGET, GuardReport, GuardStep
from onnxzip.runtime import Runner, expose
from onnxzip.verify import (
    ReferenceOutputs,
    is_classifier,
    output_accumulator,
    snr_db,
)

logger = logging.getLogger(__name__)


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
        # the outputs of the last models scored, so the final verification need not rerun the
        # one kept (model id -> (model, outputs per batch))
        self.scored: dict[int, tuple[ir.Model, list[dict[str, np.ndarray]]]] = {}
        if config.max_drop is not None and not any(self.classifier.values()):
            raise InputError(
                "--max-drop needs an output of class scores ([N, C]); use --min-cosine instead"
            )

    def outputs_of(self, model: ir.Model) -> list[dict[str, np.ndarray]] | None:
        """The outputs ``score`` computed for this very model, if it is one of the last two."""
        found = self.scored.get(id(model))
        return found[1] if found is not None and found[0] is model else None

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
        acc = {v.name: output_accumulator(v) for v in self.outputs}
        outs = []
        for batch, ref in zip(self.batches, self.reference, strict=True):
            out = run.run(batch, self.names)
            outs.append(out)
            for n in self.names:
                acc[n].add(ref[n], out[n], batch.labels, batch.count)
        self.scored[id(model)] = (model, outs)
        while len(self.scored) > 2:
            self.scored.pop(next(iter(self.scored)))
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


def _guard(
    builder: _Builder, first: Built, evaluator: _Evaluator, config: QuantizeConfig
) -> Guarded:
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

    candidates = list(first.plan.quantized_nodes)
    return _search_guard(builder, first, evaluator, target, candidates, judge, reason)


def _dynamic_build(prepared, samples, config, holdout) -> tuple[_Builder, Built] | None:
    """(builder, built) of dynamic int8 in place of static, when it quantizes something; None
    otherwise (or when the mode asked for is not static)."""
    if config.mode != "static":
        return None
    builder = _Builder(prepared, samples, dataclasses.replace(config, mode="dynamic"), holdout)
    result = builder.build()
    return (builder, result) if result.plan.quantized_nodes else None


def _holds(evaluator, model) -> bool:
    checks, _ = evaluator.floor_checks(model)
    return all(c.passed for c in checks)


def _dynamic_fallback(
    prepared, samples, config, holdout, evaluator
) -> tuple[_Builder, Built] | None:
    """(builder, built) of dynamic int8 when it quantizes something and holds every
    default floor on the evaluator's held-out batches; None otherwise."""
    built = _dynamic_build(prepared, samples, config, holdout)
    if built is None or not _holds(evaluator, built[1].model):
        return None
    logger.info("static int8 broke the default floors; dynamic int8 holds them")
    return built


def _dynamic_guarded(
    prepared, samples, config, holdout, evaluator
) -> tuple[_Builder, Guarded] | None:
    """(builder, guarded) of dynamic int8 with the floor guard, when it keeps some layer
    int8 and holds every default floor; None otherwise (or when the mode is not static)."""
    built = _dynamic_build(prepared, samples, config, holdout)
    if built is None:
        return None
    builder, first = built
    guarded = _floor_guard(builder, first, evaluator, builder.config)
    if not guarded.built.plan.quantized_nodes or not _holds(evaluator, guarded.built.model):
        return None
    logger.info("static int8 kept nothing; dynamic int8 with its guard holds the floors")
    return builder, guarded


# Up to this many candidate layers, a layer's sensitivity is measured by reverting it alone
# (one build and one evaluation each); above it, from one run of the reference and one of the
# quantized model (the SNR each layer loses between its inputs and its output), so the guard's
# cost grows with the graph, not with its square.
EXACT_SENSITIVITY_LAYERS = 96


def _floor_guard(
    builder: _Builder, first: Built, evaluator: _Evaluator, config: QuantizeConfig
) -> Guarded:
    """Keeps the layers whose quantization hurts the failing floors most in float until every
    default floor holds on the held-out samples (``onnxzip.floors``).

    Sensitivity of a layer: how much the SNR of the failing parts (outputs or slices) recovers
    when that layer alone stays float (see ``_search_guard``)."""
    work, plan = first.model, first.plan
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
    first: Built,
    evaluator: _Evaluator,
    target: str,
    candidates: list[str],
    judge,
    reason,
    first_verdict: tuple[float, float] | None = None,
) -> Guarded:
    """The fewest most-sensitive layers to keep in float for ``judge`` to hold.

    ``judge(model)`` gives (level to raise, reported metric, target met). Layers are ordered by
    how much keeping each in float raises the level (``_sensitivities``); the fewest of that
    order that make the target hold are found by binary search over its prefixes (more layers
    in float never costs accuracy, up to noise; with every layer reverted the model computes
    what the original does). The result is the model of the prefix found, checked."""
    work, plan = first.model, first.plan
    if first_verdict is None:
        base, metric, met = judge(work)
    else:
        (base, metric), met = first_verdict, first_verdict[1] == 0
    report = GuardReport(target, metric, metric, met, evaluator.samples, len(candidates))
    if met or not candidates:
        return Guarded(first, report)
    gains = _sensitivities(builder, work, candidates, evaluator, judge, base, report.seconds)
    t0 = time.perf_counter()
    order = sorted(candidates, key=lambda k: -gains[k])
    tried: dict[int, tuple] = {}

    def attempt(k: int):
        if k not in tried:
            built = builder.build(frozenset(order[:k]))
            tried[k] = (built, judge(built.model))
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
    for k in best.kept:
        if k.node in kept:
            k.reason = reason(steps[k.node])
    return Guarded(best, report)


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
    model = builder.build(frozenset([key])).model
    return judge(model)[0] - base
