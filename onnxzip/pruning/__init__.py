"""Structured channel pruning: find coupled-channel groups, score them, remove channels.

``prune(model, config) -> (model, PruneReport)``:

1. prepare: the same exact clean-ups as quantization (constants lifted, Sum as Add); BatchNorm
   stays, its parameters are pruned with the channels;
2. groups (``groups.py`` + ``rules.py``): from every channel producer, the closure of coupled
   spaces and slices, or a blocked group naming its blocker;
3. scores (``importance.py``): one score per group channel;
4. selection: the same ratio in every group (local), or one threshold over scores normalised by
   each group's mean (global) with a per-group cap; counts rounded to multiples of ``round_to``;
   ``target_macs`` searches the ratio whose pruned model has at most that fraction of the MACs,
   computed analytically from the weight slices without rewriting;
5. rewrite (``rewrite.py``): slices, attributes, shape constants, strict shape inference.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxzip import io, passes
from onnxzip.analysis import inspect_model, shapes_for_macs
from onnxzip.data import Samples
from onnxzip.engine import cluster
from onnxzip.errors import InputError, ModelError
from onnxzip.ir import ops
from onnxzip.ir.ops import node_key
from onnxzip.pruning import importance, reconstruct, rewrite
from onnxzip.pruning.config import GRADIENT_CRITERIA, PruneConfig
from onnxzip.pruning.groups import Group, GroupBuilder, identity
from onnxzip.pruning.rules import rule_for
from onnxzip.report import table
from onnxzip.runtime import Runner, channel_moments
from onnxzip.verify import REFERENCE_BYTES, OutputAccumulator, ReferenceOutputs, snr_db

logger = logging.getLogger(__name__)


@dataclass
class GroupReport:
    id: int
    roots: list[str]
    members: list[str]
    channels: int
    kept: int
    blocked_by: str | None = None
    reason: str | None = None
    score_min: float | None = None
    score_median: float | None = None
    score_max: float | None = None
    note: str | None = None


@dataclass
class PruneReport:
    source: str
    config: PruneConfig
    groups: list[GroupReport]
    macs_before: int
    macs_after: int
    parameters_before: int
    parameters_after: int
    weight_bytes_before: int
    weight_bytes_after: int
    ratio_used: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    recovery: object | None = None  # a RecoverReport after --recover-steps
    parity: object | None = None  # a VerifyReport when samples were given
    unchanged_because: str | None = None  # why no channel was removed, when none was
    compensation: str | None = None  # whether mean compensation was kept, and why
    target_met: bool | None = None  # with target_macs: whether the pruned MACs reach it
    reconstruction: list | None = None  # reconstruct.LayerFit per affected layer, when run
    body_weights: int = 0  # weighted nodes inside If/Loop/Scan bodies (never pruned)
    fused_quantized: int = 0  # layers already in fused quantized kernels (QLinearConv, ...)

    def format(self) -> str:
        pruned = [g for g in self.groups if g.kept < g.channels]
        blocked = [g for g in self.groups if g.reason]
        lines = [
            f"model       {self.source}",
            f"groups      {len(self.groups)} ({len(blocked)} blocked, {len(pruned)} pruned)",
            f"MACs        {self.macs_before:,} -> {self.macs_after:,} "
            f"({100 * self.macs_after / max(self.macs_before, 1):.1f} %)",
            f"parameters  {self.parameters_before:,} -> {self.parameters_after:,} "
            f"({100 * self.parameters_after / max(self.parameters_before, 1):.1f} %)",
            f"weights     {self.weight_bytes_before:,} -> {self.weight_bytes_after:,} bytes",
            "time        " + ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items()),
        ]
        if self.target_met is not None:
            reached = self.macs_after / max(self.macs_before, 1)
            lines.append(
                f"target      MACs <= {self.config.target_macs:g} of the original: "
                + (
                    f"met ({reached:.3f})"
                    if self.target_met
                    else f"NOT MET, reached {reached:.3f}: {len(blocked)} of {len(self.groups)} "
                    f"groups are blocked and no group loses more than "
                    f"{self.config.max_group_ratio:g} of its channels"
                )
            )
        if self.compensation:
            lines.append(
                f"compensate  mean of the removed channels into the biases: {self.compensation}"
            )
        if self.reconstruction is not None:
            lines.append(f"reconstruct {reconstruction_summary(self.reconstruction)}")
        if not pruned:
            lines.append(f"unchanged   {self.nothing_pruned_because()}")
        lines += ["", format_groups(self.groups)]
        return "\n".join(lines)

    def nothing_pruned_because(self) -> str | None:
        """Why the model came out unchanged, or None when channels were removed."""
        if any(g.kept < g.channels for g in self.groups):
            return None
        unprunable = _unprunable_because(self.groups, self.body_weights, self.fused_quantized)
        if unprunable is not None:
            return unprunable
        return "the ratio or target leaves every group whole"


def _unprunable_because(groups, body_weights: int, fused_quantized: int = 0) -> str | None:
    """Why no group of a model can lose a channel, or None when one can."""
    if not groups:
        if body_weights:
            return (
                f"no prunable channel group: the {body_weights} Conv/Gemm/MatMul "
                "weights all sit inside If/Loop/Scan bodies, which are not pruned"
            )
        if fused_quantized:
            return (
                f"no prunable channel group: the model is already quantized ({fused_quantized} "
                f"layer{'s' if fused_quantized != 1 else ''} in fused int8/int4 kernels such as "
                "QLinearConv); prune its float original, then quantize"
            )
        return "no prunable channel group (no Conv, ConvTranspose, Gemm or MatMul weights)"
    if all(g.reason for g in groups):
        return f"all {len(groups)} groups are blocked (see inspect --groups)"
    return None


def unprunable_because(model, *, source: str | None = None) -> str | None:
    """Why pruning cannot remove any channel of ``model`` (no group, or every group blocked),
    or None when some group can be pruned: known from the graph alone, before any statistics."""
    source = source or (str(model) if not isinstance(model, ir.Model) else "model")
    loaded = io.load_model(model, name=source)  # once: analyse takes the loaded model as it is
    return _unprunable_because(
        analyse(loaded, source=source), _body_weights(loaded), _fused_quantized(loaded)
    )


def _body_weights(model: ir.Model) -> int:
    """Weighted nodes inside If/Loop/Scan bodies."""
    return sum(passes.weighted_layers(model)[1].values())


def _fused_quantized(model: ir.Model) -> int:
    """Layers whose weights sit quantized inside a fused kernel (``ops.FUSED_QUANTIZED_OPS``)."""
    return sum(
        n.op_type in ops.FUSED_QUANTIZED_OPS and n.domain in ("", "ai.onnx", "com.microsoft")
        for n in model.graph
    )


def format_groups(groups: list[GroupReport]) -> str:
    rows = []
    for g in groups:
        members = ", ".join(g.members[:4]) + (
            f" (+{len(g.members) - 4})" if len(g.members) > 4 else ""
        )
        state = f"blocked by {g.blocked_by or 'input'}: {g.reason}" if g.reason else (g.note or "")
        rows.append([g.id, members, g.channels, g.kept, state])
    return table(["group", "members", "channels", "kept", "notes"], rows)


# -- analysis ---------------------------------------------------------------------------------------


def _is_producer(node: ir.Node) -> tuple[int, int] | None:
    """(output axis, channels) when the node creates a fresh channel space: a float weighted
    op with a constant weight (a depthwise Conv's channels are its input's)."""
    if node.op_type not in ops.FLOAT_WEIGHTED_OPS or ops.domain_of(node) != "" or not node.outputs:
        return None
    out = node.outputs[0]
    if out.shape is None:
        return None
    w = passes.dequantized_array(node.inputs[1])
    if w is None:
        return None
    if node.op_type in ("Gemm", "MatMul") and w.ndim != 2:
        return None
    if ops.is_depthwise(node, w.shape):
        return None
    return ops.activation_channel_axis(node, len(out.shape)), ops.output_channels(node, w.shape)


def find_groups(model: ir.Model) -> list[Group]:
    """Every channel group of the main graph, blocked ones included."""
    graph = model.graph
    find = rule_for(model.opset_imports)
    groups: list[Group] = []
    claimed: set[str] = set()
    for node in graph:
        producer = _is_producer(node)
        if producer is None or node_key(node) in claimed:
            continue
        axis, channels = producer
        group = Group(id=len(groups), size=channels)
        builder = GroupBuilder(graph, group)
        rule = find(node)
        if rule is None:  # no rule at this model's opset (the rules cover RULE_OPSETS)
            builder.block(node, f"no channel rule for {node.op_type} at this model's opset")
        else:
            rule(builder, node, ("out", 0), axis, identity(channels))
            builder.visit(node.outputs[0], axis, identity(channels), node)
            builder.run(find)
        group.roots = [
            m.owner for m in group.slices if m.role == "out" and m.owner not in group.depthwise
        ]
        group.roots = list(dict.fromkeys(group.roots)) or [node_key(node)]
        claimed.update(group.roots)
        groups.append(group)
    return groups


# -- selection --------------------------------------------------------------------------------------


def round_to_for(channels: int, config: PruneConfig) -> int:
    """Channel counts that are multiples of the SIMD width run at full speed in onnxruntime's
    kernels (measured on ResNet-50 at half the MACs: 0.70x the latency with any counts, 0.57x
    with multiples of 16)."""
    if config.round_to:
        return config.round_to
    return 16 if channels >= 64 else 8 if channels >= 32 else 1


def _keep_count(channels: int, remove: int, config: PruneConfig) -> int:
    keep = max(1, channels - remove)
    keep = max(keep, channels - math.floor(config.max_group_ratio * channels))
    step = round_to_for(channels, config)
    if step > 1:
        if channels <= step:
            return channels
        keep = max(step, int(round(keep / step)) * step)
    return min(channels, keep)


def select(
    groups: list[Group], scores: dict[int, np.ndarray], ratio: float, config: PruneConfig
) -> dict[int, np.ndarray]:
    """Group channels to remove for an overall ``ratio``."""
    removal: dict[int, np.ndarray] = {}
    if config.scope == "local" or not scores:
        for gid, s in scores.items():
            keep = _keep_count(len(s), math.floor(ratio * len(s)), config)
            removal[gid] = np.sort(np.argsort(s, kind="stable")[: len(s) - keep])
        return removal
    normalised = {gid: s / (s.mean() if s.mean() > 0 else 1.0) for gid, s in scores.items()}
    everything = np.concatenate(list(normalised.values()))
    threshold = np.quantile(everything, ratio) if ratio > 0 else -np.inf
    for gid, s in normalised.items():
        below = int(np.count_nonzero(s < threshold))
        keep = _keep_count(len(s), below, config)
        removal[gid] = np.sort(np.argsort(s, kind="stable")[: len(s) - keep])
    return removal


def estimate_macs(
    model: ir.Model, groups: list[Group], removal: dict[int, np.ndarray], base: dict[str, int]
) -> int:
    """MACs after ``removal``: each weighted node scales by the kept fraction of its weight's axes."""
    cut: dict[tuple[str, int], int] = {}
    for _, channels, m in rewrite.cut_members(groups, removal):
        if m.role in ("out", "in") and m.axis in (0, 1):
            key = (m.owner, m.axis)
            cut[key] = cut.get(key, 0) + int(sum(len(m.positions[c]) for c in channels))
    total = 0
    for node in model.graph:
        macs = base.get(node_key(node))
        if not macs:
            continue
        w = passes.dequantized_array(node.inputs[1])
        factor = 1.0
        for axis in (0, 1):
            n = cut.get((node_key(node), axis), 0)
            if (
                n
                and w is not None
                and w.ndim > axis
                and not (axis == 1 and ops.is_depthwise(node, w.shape))
            ):
                factor *= 1 - n / w.shape[axis]
        total += int(macs * factor)
    return total


# -- the API ----------------------------------------------------------------------------------------


def channel_statistics(
    model: ir.Model, groups: list[Group], samples: Samples, batch_size: int = 32
) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """Mean and standard deviation of every position the groups' consumers read, over samples.

    Streamed: per batch only sums and sums of squares per position are kept.
    """
    keys = {
        m.source for g in groups if not g.blocked for m in g.slices if m.role == "in" and m.source
    }
    return channel_moments(model, keys, samples, batch_size=batch_size)


def dead_channels(group: Group, stats: dict) -> np.ndarray:
    """Channels constant on every sample wherever the group's consumers read them."""
    dead = np.ones(group.size, dtype=bool)
    seen = False
    for m in group.slices:
        if m.role != "in" or m.source not in stats:
            continue
        seen = True
        mean, std = stats[m.source]
        for c, positions in enumerate(m.positions):
            if np.any(std[positions] > 1e-6 * (1.0 + np.abs(mean[positions]))):
                dead[c] = False
    return np.nonzero(dead)[0] if seen else np.zeros(0, dtype=np.int64)


@cluster.accepts_engine
def prune(
    model,
    config: PruneConfig,
    *,
    samples: Samples | None = None,
    source: str | None = None,
    reference_outputs: ReferenceOutputs | None = None,
) -> tuple[ir.Model, PruneReport]:
    """Prunes ``model`` (path, ModelProto or onnx_ir.Model); the input is not modified.

    With ``samples``, channels that are constant on them (dead) are removed on top of the
    selection, and every consumer's bias absorbs the mean contribution of what was removed.
    ``reference_outputs``: the model's outputs on every sample (split "all", optimisation
    "all", ``config.batch_size``), when the caller has them (``verify`` can use the same).

    Raises:
        InputError: bad options or model.
        ModelError: the rewritten model fails shape inference (a rule is wrong: a bug).
    """
    config.validate()
    timings = {}
    t0 = time.perf_counter()
    source = source or (str(model) if not isinstance(model, ir.Model) else "model")
    original = io.load_model(model, name=source)
    work = original.clone()
    passes.PRUNING(work)
    plain = work.clone() if samples is not None and config.compensation == "auto" else None
    # With samples, MACs (and the --target-macs search) use their shapes where the model's
    # spatial or sequence dimensions are symbolic.
    shapes = shapes_for_macs(work, samples)
    before = inspect_model(work, source=source, input_shapes=shapes, strict_shapes=False)
    shapes = before.macs_shapes  # None when they did not infer: the model's own shapes count
    groups = find_groups(work)
    timings["analyse"] = time.perf_counter() - t0

    gradients = None
    gradients_failed = None
    if config.criterion in GRADIENT_CRITERIA:
        if samples is None:
            raise InputError(
                f"criterion '{config.criterion}' needs samples (--data) for its gradients"
            )
        from onnxzip.gradients import gradient_statistics

        t0 = time.perf_counter()
        try:
            gradients, _ = gradient_statistics(work, groups, samples, batch_size=config.batch_size)
        except ModelError as exc:
            # No gradient for some op: every group falls back to l1, and the report says why.
            logger.warning("%s; scoring by l1 instead of %s", exc, config.criterion)
            gradients_failed = str(exc)
        timings["gradients"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    by_key = {node_key(n): n for n in work.graph} if config.exclude else {}
    scores, notes = {}, {}
    for g in groups:
        if g.blocked:
            continue
        keys = set(g.members()) | {m.node for m in g.slices} | {m.owner for m in g.slices}
        if config.exclude and any(
            config.exclude.matches_name(k) or (k in by_key and config.exclude.matches(by_key[k]))
            for k in keys
        ):
            notes[g.id] = "excluded by the user"
            continue
        s, note = importance.score(g, config.criterion, gradients)
        if gradients_failed and note:
            note = f"{gradients_failed}: scored by l1"
        scores[g.id] = s
        if note:
            notes[g.id] = note
    # Per node, as ``before`` counted them (at the samples' shapes when they were used).
    base = {
        m.node: m.macs or 0
        for m in before.macs_per_node
        if m.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
    }
    macs0 = sum(base.values())
    if config.target_macs is not None:
        lo, hi = 0.0, 0.999
        ratio = hi
        for _ in range(25):
            mid = (lo + hi) / 2
            if (
                estimate_macs(work, groups, select(groups, scores, mid, config), base)
                <= config.target_macs * macs0
            ):
                ratio, hi = mid, mid
            else:
                lo = mid
        if (
            estimate_macs(work, groups, select(groups, scores, ratio, config), base)
            > config.target_macs * macs0
        ):
            logger.warning(
                "MACs cannot reach %.2f of the original: the prunable groups are capped",
                config.target_macs,
            )
    else:
        ratio = config.ratio
    removal = select(groups, scores, ratio, config)
    timings["select"] = time.perf_counter() - t0
    io.drop_resident_pages(work)  # scoring read every weight once: let their pages go

    means = None
    dead_count = {}
    dead_only: dict[int, np.ndarray] = {}  # removed channels that are dead: compensated exactly
    if samples is not None and scores:  # no group scored: no channel can go, dead or not
        t0 = time.perf_counter()
        stats = channel_statistics(work, groups, samples, config.batch_size)
        io.drop_resident_pages(work)  # that sweep's session read every weight
        means = {k: v[0] for k, v in stats.items()}
        for g in groups:
            if g.id not in scores:
                continue
            dead = dead_channels(g, stats)
            if len(dead):
                merged = np.union1d(removal.get(g.id, []), dead).astype(np.int64)
                if len(merged) >= g.size:  # keep at least one channel
                    merged = merged[: g.size - 1]
                removal[g.id] = merged
                dead_count[g.id] = len(dead)
                dead_only[g.id] = np.intersect1d(merged, dead)
        timings["statistics"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if not any(len(v) for v in removal.values()):
        plain = None  # nothing removed: nothing to compensate, no decision to make
    if plain is not None and (
        reference_outputs is None
        or not reference_outputs.serves(samples, config.batch_size, "all", 0.0, "all")
    ):
        # The original's outputs for the compensation decision, before any sliced copy of the
        # weights exists: the original's weights and the pruned ones are never resident at once
        reference_outputs = ReferenceOutputs(
            original,
            samples,
            config.batch_size,
            name="original",
            # held only while it costs less than the weights' second copy it saves
            max_bytes=min(REFERENCE_BYTES, max(io.weights_nbytes(original), 16 << 20)),
        )
        io.drop_resident_pages(original)
    refit = config.reconstruct and samples is not None
    reference = work.clone() if refit else None  # the rewrite below slices work's tensors
    kept = weight_kept(work, groups, removal) if refit else None
    compensated = dead_only if config.compensation == "off" else None  # None: every removed one
    slices: dict = {}  # the cut weights, shared by the two candidates of the decision
    pruned = rewrite.apply(work, groups, removal, means, compensated, slices)
    compensation_note = None
    if plain is not None:
        # Mean compensation is first-order: on some models (a transformer whose activations
        # have rare, huge outliers) the shifted biases hurt more than they help downstream.
        # The alternative differs in its biases only: it shares every cut weight with ``pruned``.
        alternative = rewrite.apply(plain, find_groups(plain), removal, means, dead_only, slices)
        plain = None
        with_db, without_db = _output_snr(
            original, [pruned, alternative], samples, config, reference_outputs
        )
        if without_db > with_db:
            pruned = alternative
        del alternative  # the one not taken goes now, not when prune returns
        compensation_note = (
            f"{'applied' if with_db >= without_db else 'not applied'}: output SNR "
            f"{with_db:.2f} dB with, {without_db:.2f} dB without, on the samples"
        )
    elif means is not None and config.compensation == "on":
        compensation_note = "applied"
    del slices
    timings["rewrite"] = time.perf_counter() - t0
    fits = None
    if refit:
        t0 = time.perf_counter()
        pruned, fits = reconstruct.reconstruct(
            reference, pruned, kept, samples, batch_size=config.batch_size
        )
        timings["reconstruct"] = time.perf_counter() - t0
    after = inspect_model(pruned, source=source, input_shapes=shapes, strict_shapes=False)

    reports = []
    for g in groups:
        s = scores.get(g.id)
        removed = len(removal.get(g.id, []))
        reports.append(
            GroupReport(
                id=g.id,
                roots=g.roots,
                members=g.members(),
                channels=g.size,
                kept=g.size - removed,
                blocked_by=g.blocked_by,
                reason=g.reason,
                score_min=None if s is None else float(s.min()),
                score_median=None if s is None else float(np.median(s)),
                score_max=None if s is None else float(s.max()),
                note="; ".join(
                    n
                    for n in (
                        notes.get(g.id),
                        f"{dead_count[g.id]} dead" if g.id in dead_count else None,
                    )
                    if n
                )
                or None,
            )
        )
    report = PruneReport(
        source=source,
        config=config,
        groups=reports,
        macs_before=before.macs,
        macs_after=after.macs,
        parameters_before=before.parameters,
        parameters_after=after.parameters,
        weight_bytes_before=before.weight_bytes,
        weight_bytes_after=after.weight_bytes,
        ratio_used=ratio,
        seconds=timings,
        body_weights=_body_weights(original),
        fused_quantized=_fused_quantized(original),
    )
    report.unchanged_because = report.nothing_pruned_because()
    report.compensation = compensation_note
    if config.target_macs is not None:
        report.target_met = after.macs <= config.target_macs * before.macs
    report.reconstruction = fits
    return pruned, report


def weight_kept(
    model: ir.Model, groups: list[Group], removal: dict[int, np.ndarray]
) -> dict[str, dict[int, np.ndarray]]:
    """For each weighted node whose weight loses positions: node -> axis -> the original
    positions it keeps (for reconstruction, which fits the kept part against the original)."""
    nodes = {node_key(n): n for n in model.graph}
    removed: dict[str, dict[int, set]] = {}
    sizes: dict[tuple[str, int], int] = {}
    for group, channels, m in rewrite.cut_members(groups, removal):
        node = nodes.get(m.node)
        if node is None or len(node.inputs) < 2 or node.inputs[1] is not m.value:
            continue
        array = passes.const_array(m.value)
        if array is None:
            continue
        cut = rewrite.removed_positions(group, channels, m.positions)
        removed.setdefault(m.node, {}).setdefault(m.axis, set()).update(cut.tolist())
        sizes[(m.node, m.axis)] = array.shape[m.axis]
    return {
        node: {
            axis: np.setdiff1d(np.arange(sizes[(node, axis)]), sorted(cut)).astype(np.int64)
            for axis, cut in axes.items()
        }
        for node, axes in removed.items()
    }


def reconstruction_summary(fits: list) -> str:
    """One line: how many layers were refitted and how their output error moved."""
    done = [f for f in fits if f.error_after is not None]
    if not fits:
        return "no layer lost inputs that least squares can refit"
    if not done:
        return f"{len(fits)} layers tried, none improved ({fits[0].note})"
    before = float(np.mean([f.error_before for f in done]))
    after = float(np.mean([f.error_after for f in done]))
    return (
        f"{len(done)} of {len(fits)} layers refitted by least squares, mean relative layer "
        f"error {before:.3f} -> {after:.3f} on held-out rows"
    )


def _output_snr(
    original: ir.Model,
    candidates: list[ir.Model],
    samples: Samples,
    config: PruneConfig,
    reference: ReferenceOutputs,
) -> list[float]:
    """Output SNR (dB, float outputs pooled) of each candidate against the original on samples.

    With every reference output at hand, the candidates run one after the other (one session
    at a time); otherwise all three models run batch by batch."""
    if reference.complete:
        scores = []
        for candidate in candidates:
            runner = Runner(candidate, name="candidate")
            acc = OutputAccumulator(classifier=False)
            for batch, want in zip(reference.batches, reference.outputs, strict=True):
                got = runner.run(batch)
                for name, w in want.items():
                    if w.dtype.kind == "f":
                        acc.add(w, got[name], None, batch.count)
            del runner
            io.drop_resident_pages(candidate)  # its uncut weights, still memory-mapped
            scores.append(snr_db(acc.sum_ref2, acc.sum_diff2))
        return scores
    original_runner = Runner(original, name="original")
    runners = [Runner(c, name="candidate") for c in candidates]
    pooled = [OutputAccumulator(classifier=False) for _ in candidates]
    for batch in samples.batches(config.batch_size):
        want = {n: w for n, w in original_runner.run(batch).items() if w.dtype.kind == "f"}
        for acc, runner in zip(pooled, runners, strict=True):
            got = runner.run(batch)
            for name, w in want.items():
                acc.add(w, got[name], None, batch.count)
    return [snr_db(acc.sum_ref2, acc.sum_diff2) for acc in pooled]


def prepared_groups(model) -> tuple[ir.Model, list[Group]]:
    """The prepared copy pruning works on, and its groups."""
    work = io.load_model(model).clone()
    passes.PRUNING(work)
    return work, find_groups(work)


def analyse(model, *, source: str | None = None) -> list[GroupReport]:
    """The channel groups of a model, for ``inspect --groups``."""
    source = source or (str(model) if not isinstance(model, ir.Model) else "model")
    work = io.load_model(model, name=source).clone()
    passes.PRUNING(work)
    return [
        GroupReport(g.id, g.roots, g.members(), g.size, g.size, g.blocked_by, g.reason)
        for g in find_groups(work)
    ]


__all__ = [
    "PruneConfig",
    "PruneReport",
    "GroupReport",
    "prune",
    "analyse",
    "find_groups",
    "select",
    "unprunable_because",
]
