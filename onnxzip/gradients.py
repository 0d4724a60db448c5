"""Per-channel gradient statistics with onnxruntime's training artifacts as the gradient engine.

The trainable twin is the inference model with BatchNormalization folded into the preceding
convolutions (exact; the training graph would otherwise switch it to batch statistics) and a
per-channel *gate* after every pruning group's producer: ``y' = y * g`` with ``g = 1``. The gate
changes nothing in the forward pass, and its gradient is exactly

    dL/dg_c = sum over samples and positions of  y_c * dL/dy'_c

the first-order Taylor estimate of how the loss changes when channel ``c`` is removed. Only the
gates are trainable (``generate_artifacts`` with ``optimizer=None``); every weight is frozen.

Loss: cross-entropy against ``labels`` when the data carry them, else against the model's own
predictions (argmax of the original's class scores on the same batch). A model without class
scores uses ``0.5 * ||y||^2`` of its float outputs: the gradient then measures each channel's
contribution to the output's energy.

Statistics per group channel, streamed batch by batch (count, sum, sum of squares of the gate
gradient ``G_b`` of each batch, summed over the group's producers and the channel's positions):

* ``taylor``: ``|sum_b G_b|``;
* ``fisher``: ``sum_b G_b^2`` (per batch, not per sample);
* ``grad-stability``: ``|mean_b G_b| + std_b G_b`` — a channel whose gradient stays near zero
  with a small spread matters little.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxzip import engine, passes, progress, training
from onnxzip.data import Samples
from onnxzip.engine import cluster
from onnxzip.errors import InputError, ModelError
from onnxzip.ir import ops
from onnxzip.ir.ops import node_key
from onnxzip.pruning.groups import Group
from onnxzip.runtime import Runner
from onnxzip.verify import is_classifier

logger = logging.getLogger(__name__)


@dataclass
class ChannelGradients:
    """Streamed statistics of one group's per-channel gate gradients."""

    batches: int
    total: np.ndarray  # sum_b G_b
    squares: np.ndarray  # sum_b G_b^2

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.batches, 1)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(np.maximum(self.squares / max(self.batches, 1) - self.mean**2, 0.0))

    def score(self, criterion: str) -> np.ndarray:
        if criterion == "taylor":
            return np.abs(self.total)
        if criterion == "fisher":
            return self.squares
        if criterion == "grad-stability":
            return np.abs(self.mean) + self.std
        raise KeyError(criterion)

    def merge(self, other: ChannelGradients) -> ChannelGradients:
        return ChannelGradients(
            self.batches + other.batches, self.total + other.total, self.squares + other.squares
        )


@dataclass
class GradientReport:
    loss: str
    batches: int
    samples: int
    groups: int
    seconds: float = 0.0
    step_seconds: float = 0.0  # median per batch: the training step plus gradient bookkeeping


def _gated_twin(
    model: ir.Model, groups: list[Group]
) -> tuple[ir.Model, dict[str, tuple[int, str, int]]]:
    """BN folded, a gate after each root producer; gate name -> (group id, root, axis)."""
    twin = model.clone()
    passes.TRAINING_TWIN(twin)  # BN folded, the rest affine: constants, never batch statistics

    nodes = {node_key(n): n for n in twin.graph}
    gates = {}
    with passes.naming(twin.graph):
        _add_gates(twin, groups, nodes, gates)
    return twin, gates


def _add_gates(twin: ir.Model, groups: list[Group], nodes: dict, gates: dict) -> None:
    for group in groups:
        if group.blocked:
            continue
        for root in group.roots:
            node = nodes.get(root)
            if node is None:
                continue
            out = node.outputs[0]
            if out.shape is None:
                continue
            rank = len(out.shape)
            axis = ops.activation_channel_axis(node, rank)
            size = out.shape[axis]
            shape = [size] + [1] * (rank - axis - 1)
            name = f"gate_{len(gates)}"
            gate = passes.add_initializer(twin.graph, name, np.ones(shape, np.float32))
            mul = ir.node("Mul", [out, gate], name=f"{name}_mul")
            mul.outputs[0].name = f"{name}_out"
            passes.claim(twin.graph, mul.outputs[0].name)
            mul.outputs[0].type, mul.outputs[0].shape = out.type, out.shape
            twin.graph.insert_after(node, mul)
            for use in list(out.uses()):
                if use.node is not mul:
                    use.node.replace_input_with(use.idx, mul.outputs[0])
            if out.is_graph_output():
                continue
            gates[name] = (group.id, root, axis)


def _with_energy_loss(twin: ir.Model) -> ir.Model:
    """0.5 * sum of squares of the float outputs, as the first (and only) output."""
    graph = twin.graph
    terms = []
    for i, out in enumerate(list(graph.outputs)):
        if out.dtype != ir.DataType.FLOAT:
            continue
        sq = ir.node("Mul", [out, out], name=f"energy_sq_{i}")
        total = ir.node(
            "ReduceSum", [sq.outputs[0]], attributes={"keepdims": 0}, name=f"energy_sum_{i}"
        )
        for n in (sq, total):
            n.outputs[0].name = n.name
            graph.append(n)
        terms.append(total.outputs[0])
    total = training.scalar_loss(graph, terms, "energy")
    half = passes.add_initializer(graph, "energy_half", np.array(0.5, np.float32))
    scaled = ir.node("Mul", [total, half], name="energy_loss")
    scaled.outputs[0].name = "energy_loss"
    graph.append(scaled)
    scaled.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    scaled.outputs[0].shape = ir.Shape([])
    graph.outputs.clear()
    graph.outputs.append(scaled.outputs[0])
    return twin


SHARD_SAMPLES = 512  # samples per training-engine job on a cluster (each job starts a worker)


def _gradients_of(
    twin: ir.Model, job: dict, feeds, samples: Samples, batch_size: int, split, holdout
):
    """The gradients of every batch of ``feeds``: one training-engine job here, or, on an
    engine with several workers, one job per shard of ``SHARD_SAMPLES`` samples on each
    worker. Each batch's gradient is its own training step whatever job runs it (and the same
    bits at any thread count), and the shards come back in order, so the statistics made
    from them are the same."""
    active = cluster.active()
    if active.workers <= 1:
        return engine.run_job(twin, batches=feeds, **job)
    per_shard = max(1, math.ceil(SHARD_SAMPLES / batch_size))
    total = samples.batch_count(batch_size, split, holdout)
    parts = list(
        active.map(
            _gradient_shard,
            cluster.shards(feeds, per_shard),
            (twin, job, engine.current()),
            total=None if total is None else math.ceil(total / per_shard),
            desc="gradients: shards",
            unit="shard",
        )
    )
    if not parts:
        raise ModelError("gradients: no batches to run")
    return engine.JobResult(
        {name: np.concatenate([p.arrays[name] for p in parts]) for name in job["read"]},
        [x for p in parts for x in p.losses],
        [x for p in parts for x in p.step_seconds],
    )


def _gradient_shard(context, shard: list[dict]) -> engine.JobResult:
    """One shard's batches through the training engine (a piece on the active engine)."""
    twin, job, training = context
    engine.use(training)
    return engine.run_job(twin, batches=iter(shard), **job)


def _check_twin(model: ir.Model, twin: ir.Model, samples: Samples, batch_size: int) -> None:
    """The rewritten, gated twin computes what the model computes (gates are 1)."""
    batch = next(samples.batches(min(batch_size, 8)))
    a = Runner(model, name="model", optimization="none").run(batch)
    b = Runner(twin, name="gradient twin", optimization="none").run(batch, list(a))
    for name, x in a.items():
        gap = float(np.max(np.abs(x.astype(np.float64) - b[name])))
        if gap > 1e-3 * (1.0 + float(np.max(np.abs(x)))):
            raise ModelError(
                f"gradients: the prepared twin differs from the model on '{name}' by {gap:.3g}"
            )


def gradient_statistics(
    model: ir.Model,
    groups: list[Group],
    samples: Samples,
    *,
    batch_size: int = 32,
    use_labels: bool = True,
    split: str = "all",
    holdout: float = 0.0,
    custom_loss=None,
    extra_feeds=None,
) -> tuple[dict[int, ChannelGradients], GradientReport]:
    """Gate-gradient statistics per group channel over the samples (see the module docstring).

    ``custom_loss`` is ``(NAME, options)`` naming an ``onnxruntime.training.onnxblock.loss``
    block (``("MSELoss", {"reduction": "sum"})``) applied to the model's outputs instead of the
    default loss; ``extra_feeds(batch) -> dict`` supplies the inputs it adds (targets, weights).
    The training engine runs in its own process (``onnxzip.engine``).

    Raises:
        ModelError: onnxruntime cannot build a gradient for some op (the message names it).
        EngineUnavailable: there is no training engine here.
    """
    start = time.perf_counter()
    twin, gates = _gated_twin(model, groups)
    if not gates:
        raise InputError("gradients: no prunable group to score")
    if training.differentiable(twin, samples):
        _check_twin(model, twin, samples, batch_size)
    training.unshare_weights(twin, gates)
    blocked = training.control_flow_on_gradient_path(twin, list(gates))
    if blocked is not None:
        raise engine.WorkerFailed(
            f"gradients: op {blocked} has no gradient in onnxruntime-training (control flow "
            "between the channels and the loss)"
        )
    batch_size = training.batch_within(samples, batch_size, split, holdout or 0.5)
    fixed = training.fix_batch(twin, batch_size, samples)
    outputs = [v for v in twin.graph.outputs]
    classifier = next((v for v in outputs if is_classifier(v)), None)
    labelled = use_labels and samples.has_labels and classifier is not None
    if custom_loss is not None:
        loss = {"block": custom_loss[0], "options": dict(custom_loss[1])}
        loss_name = f"custom {custom_loss[0]}"
        classifier = None
    elif classifier is not None:
        twin.graph.outputs.clear()
        twin.graph.outputs.append(classifier)
        loss = "cross-entropy"
        loss_name = "cross-entropy against " + (
            "labels" if labelled else "the model's own predictions"
        )
    else:
        twin = _with_energy_loss(twin)
        loss = None
        loss_name = "0.5 * ||outputs||^2 (no class scores)"
    frozen = [
        n
        for n, v in twin.graph.initializers.items()
        if n not in gates and v.dtype is not None and v.dtype.is_floating_point()
    ]
    by_id = {g.id: g for g in groups}
    # Per gate: which group channel each gate position belongs to, for one bincount per batch.
    scatter = {}
    for name, (gid, root, _axis) in gates.items():
        member = next((m for m in by_id[gid].slices if m.owner == root and m.role == "out"), None)
        if member is None:
            continue
        flat = np.concatenate(member.positions)
        owner = np.repeat(np.arange(len(member.positions)), [len(p) for p in member.positions])
        scatter[name] = (gid, flat, owner, len(member.positions))

    teacher = Runner(model, name="model") if classifier is not None and not labelled else None
    seen = 0

    def feeds_of_batches():
        nonlocal seen
        for batch in progress.bar(
            samples.batches(batch_size, split, holdout or 0.5), desc="gradients: batches"
        ):
            if fixed and len(batch) != batch_size:
                continue  # the twin's batch is fixed (AveragePool): partial batches are skipped
            feeds = {k: np.ascontiguousarray(v) for k, v in batch.inputs.items()}
            if classifier is not None:
                if labelled:
                    feeds["labels"] = batch.labels.astype(np.int64)
                else:
                    scores = teacher.run(batch, [classifier.name])[classifier.name]
                    feeds["labels"] = scores.argmax(axis=-1).astype(np.int64)
            if extra_feeds is not None:
                feeds.update(extra_feeds(batch))
            seen += len(batch)
            yield feeds

    job = {
        "kind": "gradients",
        "requires_grad": list(gates),
        "frozen": frozen,
        "read": list(scatter),
        "loss": loss,
        "what": "gradients",
    }
    result = _gradients_of(
        twin, job, feeds_of_batches(), samples, batch_size, split, holdout or 0.5
    )
    totals: dict[int, np.ndarray] = {}
    squares: dict[int, np.ndarray] = {}
    batches = len(result.losses)
    for b in range(batches):
        per_group: dict[int, np.ndarray] = {}
        for name, (gid, flat, owner, channels) in scatter.items():
            grad = result.arrays[name][b].reshape(-1)
            g = np.bincount(owner, weights=grad[flat], minlength=channels)
            per_group[gid] = per_group[gid] + g if gid in per_group else g
        for gid, g in per_group.items():
            totals[gid] = totals.get(gid, 0) + g
            squares[gid] = squares.get(gid, 0) + g * g
    step_times = result.step_seconds
    stats = {gid: ChannelGradients(batches, totals[gid], squares[gid]) for gid in totals}
    report = GradientReport(
        loss_name,
        batches,
        seen,
        len(stats),
        seconds=time.perf_counter() - start,
        step_seconds=float(np.median(step_times)) if step_times else 0.0,
    )
    return stats, report
