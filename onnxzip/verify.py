"""Parity between a reference model and a candidate, measured with onnxruntime.

Both models run on the same batches. For every output, with ``r`` the reference and ``c`` the
candidate values:

* max and mean absolute error: ``max |r - c|`` and ``mean |r - c|`` over all elements;
* cosine similarity per sample, ``<r, c> / (|r| |c|)`` over the sample's flattened output,
  reported as mean and minimum over samples (two all-zero vectors count as 1);
* SNR in dB: ``10 log10(sum r^2 / sum (r - c)^2)`` over all elements (+inf when equal);
* for class scores (a float output of shape ``[N, C]`` with ``C >= 2``): top-1 agreement, the
  fraction of samples whose argmax is the same, and accuracy against ``labels`` when present.

All statistics are accumulated batch by batch, so memory does not grow with the sample count
(apart from one cosine per sample).

Per-node mode exposes every intermediate tensor that both models share by name and compares
them on a few batches, in the reference's topological order; the first tensor whose relative
error ``max |r - c| / max |r|`` exceeds a tolerance names the first diverging node, and the
tensor with the lowest SNR names the worst. Every quantized layer diverges that way, so the
diff also ranks nodes by what quantization does not explain. One int8 rounding of a tensor
costs about ``10 log10(12 E[r^2] / step^2)`` of SNR with ``step = (max r - min r) / 255`` (the
range holding 0); a node's loss is ``min(SNR of its compared inputs, that rounding SNR) - SNR
of its output`` in dB, at least 0. A node losing far more than that is where the error
grows (a saturating activation, a division, a head whose output range is narrow), and the
output slices that break their floors are named by the floors themselves.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxzip import floors as floors_mod
from onnxzip import io, runtime
from onnxzip import metrics as metrics_mod
from onnxzip.data import Samples, input_specs
from onnxzip.engine import cluster
from onnxzip.errors import InputError
from onnxzip.report import table
from onnxzip.runtime import Runner, expose

logger = logging.getLogger(__name__)


@dataclass
class Thresholds:
    """Parity requirements; ``None`` means not checked. Fractions are in [0, 1]."""

    min_cosine: float | None = None
    min_snr_db: float | None = None
    max_abs_error: float | None = None
    min_top1: float | None = None
    max_accuracy_drop: float | None = None


@dataclass
class OutputParity:
    name: str
    elements: int
    max_abs_error: float
    mean_abs_error: float
    cosine_mean: float
    cosine_min: float
    snr_db: float
    top1_agreement: float | None = None
    reference_accuracy: float | None = None
    candidate_accuracy: float | None = None


@dataclass
class NodeParity:
    tensor: str
    node: str
    op_type: str
    max_abs_error: float
    relative_error: float
    cosine: float
    snr_db: float
    # SNR lost at this node beyond what quantization explains: the lower of its compared
    # inputs' SNRs and one int8 rounding of its own values, minus its output's SNR (0 or more)
    snr_lost_db: float = 0.0
    # the SNR one uint8 rounding of the reference values gives (what quantizing this tensor
    # alone is expected to cost)
    rounding_snr_db: float = math.inf


@dataclass
class PerNodeReport:
    samples: int
    tolerance: float
    compared: int
    skipped_shape_mismatch: list[str]
    first_diverging: NodeParity | None
    worst: NodeParity | None
    nodes: list[NodeParity] = field(default_factory=list)
    # the nodes that lose the most SNR between their inputs and their output, most first
    largest_losses: list[NodeParity] = field(default_factory=list)


@dataclass
class VerifyReport:
    """Result of ``verify``: per-output parity, threshold failures, optional per-node diff."""

    reference: str
    candidate: str
    data: str
    synthetic: bool
    samples: int
    outputs: list[OutputParity]
    thresholds: Thresholds
    failures: list[str]
    per_node: PerNodeReport | None = None
    # the default floor of every output's kind (or of every slice), when floors were checked
    floors: list[floors_mod.FloorCheck] | None = None
    floors_note: str = ""  # why no floors were checked
    task_metric: str | None = None  # the name of the task metric given, and its mean score
    task_score: float | None = None

    @property
    def passed(self) -> bool:
        return not self.failures

    def format(self) -> str:
        lines = [
            f"reference  {self.reference}",
            f"candidate  {self.candidate}",
            f"data       {self.data} ({self.samples} samples{', SYNTHETIC: not real data' if self.synthetic else ''})",
            "",
        ]
        rows = []
        for o in self.outputs:
            rows.append(
                [
                    o.name,
                    o.max_abs_error,
                    o.mean_abs_error,
                    o.cosine_mean,
                    o.cosine_min,
                    o.snr_db,
                    _pct(o.top1_agreement),
                    _pct(o.reference_accuracy),
                    _pct(o.candidate_accuracy),
                ]
            )
        lines.append(
            table(
                [
                    "output",
                    "max abs",
                    "mean abs",
                    "cosine",
                    "min cos",
                    "SNR dB",
                    "top-1 agree %",
                    "ref acc %",
                    "cand acc %",
                ],
                rows,
            )
        )
        if self.floors:
            lines.append("")
            lines.append(
                table(
                    ["part", "kind", "metric", "value", "floor", "holds"],
                    [
                        [
                            c.part,
                            c.kind,
                            floors_mod.METRIC_NAMES[c.floor.metric],
                            "n/a" if c.value is None else round(c.value, 4),
                            ("<= " if c.floor.at_most else ">= ") + f"{c.floor.bound:g}",
                            "yes" if c.passed else "NO",
                        ]
                        for c in self.floors
                    ],
                )
            )
            notes = (
                (
                    "ties       ",
                    [
                        f"{c.part}: {c.ties} of {c.count} rows differ only between classes both "
                        "models score as tied"
                        for c in self.floors
                        if c.ties
                    ],
                    f" (within {floors_mod.TIE_LOG_RATIO:.3g} in log-probability, float16's "
                    "resolution), counted as agreeing",
                ),
                (
                    "evidence   too few rows to show ",
                    [
                        f"{c.part} {floors_mod.METRIC_NAMES[c.floor.metric]} >= "
                        f"{c.floor.bound:g} ({c.count} counted, {c.rows_needed} needed)"
                        for c in self.floors
                        if c.weak
                    ],
                    ": with none differing, n rows bound the differing rate only below 3/n "
                    "(95 % confidence); verify on more samples",
                ),
            )
            for head, items, tail in notes:
                if items:
                    lines += ["", head + "; ".join(items) + tail]
        elif self.floors_note:
            lines.append("")
            lines.append(f"floors     {self.floors_note}")
        if self.task_metric is not None and not self.floors:
            lines.append(f"metric     {self.task_metric}: {self.task_score:.4f} (no floor given)")
        if self.per_node is not None:
            p = self.per_node
            lines.append("")
            lines.append(
                f"per-node: {p.compared} shared tensors compared on {p.samples} samples "
                f"(relative tolerance {p.tolerance:g})"
            )
            if p.skipped_shape_mismatch:
                lines.append(
                    f"  skipped {len(p.skipped_shape_mismatch)} tensors whose shapes differ"
                )
            if p.first_diverging is None:
                lines.append("  no node diverges")
            else:
                for label, n in (("first diverging", p.first_diverging), ("worst", p.worst)):
                    lines.append(
                        f"  {label}: node '{n.node}' ({n.op_type}) output '{n.tensor}': max abs "
                        f"{n.max_abs_error:.4g}, relative {n.relative_error:.3g}, SNR {n.snr_db:.1f} dB"
                    )
            if p.largest_losses:
                lines.append(
                    "  where the error grows (SNR lost beyond its inputs' SNR and one int8 "
                    "rounding of its own values, which costs what 'rounding' says):"
                )
                lines.append(
                    table(
                        ["node", "op", "SNR in dB", "lost dB", "rounding dB"],
                        [
                            [
                                n.node,
                                n.op_type,
                                round(n.snr_db, 1),
                                round(n.snr_lost_db, 1),
                                round(n.rounding_snr_db, 1),
                            ]
                            for n in p.largest_losses
                        ],
                    )
                )
        lines.append("")
        if not self.passed:
            lines.append("FAIL: " + "; ".join(self.failures))
        elif self.weak_evidence:
            lines.append("PASS on too few samples to show every floor (see evidence above)")
        else:
            lines.append("PASS")
        return "\n".join(lines)

    @property
    def weak_evidence(self) -> bool:
        """Every floor held, but some on fewer rows than could show it."""
        return any(c.weak for c in self.floors or ())


def _pct(x: float | None) -> float | None:
    return None if x is None else round(100.0 * x, 2)


class OutputAccumulator:
    """Streaming parity statistics for one output."""

    def __init__(self, classifier: bool, probabilities: bool = False):
        self.classifier = classifier
        # class scores that are a Softmax's probabilities: ties are judged on their logs
        self.probabilities = probabilities
        self.elements = 0
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.sum_ref2 = 0.0
        self.sum_diff2 = 0.0
        self.cosines: list[np.ndarray] = []
        self.agree = 0
        self.samples = 0
        self.ref_correct = 0
        self.cand_correct = 0
        self.labelled = 0

    def add(
        self, ref: np.ndarray, cand: np.ndarray, labels: np.ndarray | None, rows: int | None = None
    ) -> None:
        """Adds one batch; ``rows`` = 1 for a model without a batch axis (one feed, one sample)."""
        rows = rows if rows is not None else len(ref) if np.ndim(ref) else 1
        if np.size(ref) == 0:  # an empty output: nothing to compare, still a sample seen
            self.samples += rows
            return
        ref, cand = np.asarray(ref), np.asarray(cand)
        if ref.dtype.kind in "OSU" or cand.dtype.kind in "OSU":
            # Strings: compared for equality; a differing element counts as an error of 1.
            ref, cand = np.ones(ref.shape), np.where(ref == cand, 1.0, 0.0)
        r = ref.astype(np.float64).reshape(rows, -1)
        c = cand.astype(np.float64).reshape(rows, -1)
        diff = np.abs(r - c)
        self.elements += diff.size
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.nanmax(diff)))
        self.sum_abs += float(diff.sum())
        self.sum_ref2 += float((r * r).sum())
        self.sum_diff2 += float((diff * diff).sum())
        self.cosines.append(floors_mod.cosine_rows(r, c))
        self.samples += len(r)
        if self.classifier:
            ra, ca = r.argmax(axis=1), c.argmax(axis=1)
            # a row whose argmaxes differ only between classes both models score as tied agrees,
            # as the default top-1 floor counts it (floors.tied_rows): --min-top1 and --max-drop
            # judge the same number the floors do
            tied = floors_mod.tied_rows(r, c, ra, ca, 1, self.probabilities)
            self.agree += int((ra == ca).sum()) + int(tied.sum())
            if labels is not None:
                self.ref_correct += int((ra == labels).sum())
                self.cand_correct += int((ca == labels).sum())
                self.labelled += len(labels)

    def merge(self, other: OutputAccumulator) -> None:
        """Folds in the statistics of the batches after these."""
        self.elements += other.elements
        self.max_abs = max(self.max_abs, other.max_abs)
        self.sum_abs += other.sum_abs
        self.sum_ref2 += other.sum_ref2
        self.sum_diff2 += other.sum_diff2
        self.cosines.extend(other.cosines)
        self.agree += other.agree
        self.samples += other.samples
        self.ref_correct += other.ref_correct
        self.cand_correct += other.cand_correct
        self.labelled += other.labelled

    def result(self, name: str) -> OutputParity:
        cos = np.concatenate(self.cosines) if self.cosines else np.ones(1)
        return OutputParity(
            name=name,
            elements=self.elements,
            max_abs_error=self.max_abs,
            mean_abs_error=self.sum_abs / max(self.elements, 1),
            cosine_mean=float(cos.mean()),
            cosine_min=float(cos.min()),
            snr_db=snr_db(self.sum_ref2, self.sum_diff2),
            top1_agreement=self.agree / self.samples if self.classifier and self.samples else None,
            reference_accuracy=self.ref_correct / self.labelled if self.labelled else None,
            candidate_accuracy=self.cand_correct / self.labelled if self.labelled else None,
        )


def snr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise): inf for no noise, -inf for no signal."""
    if noise == 0:
        return math.inf
    ratio = signal / noise
    # no signal, one that underflows against infinite noise, or inf / inf (an overflowed
    # candidate, NaN)
    if not ratio > 0:
        return -math.inf
    return 10.0 * math.log10(ratio)


def output_accumulator(value: ir.Value) -> OutputAccumulator:
    """The accumulator for one graph output: class scores or not, probabilities or logits."""
    classifier = is_classifier(value)
    return OutputAccumulator(classifier, classifier and floors_mod.classify(value).probabilities)


def is_classifier(value: ir.Value) -> bool:
    """A float ``[N, C]`` output of class scores; an L2-normalised one is an embedding instead."""
    if value.dtype is None or not value.dtype.is_floating_point() or value.shape is None:
        return False
    if len(value.shape) != 2:
        return False
    classes = value.shape[1]
    return isinstance(classes, int) and classes >= 2 and not floors_mod.is_l2_normalised(value)


def _check_compatible(
    reference: ir.Model, candidate: ir.Model, ref_name: str, cand_name: str
) -> None:
    ref_in = {s.name: s for s in input_specs(reference)}
    cand_in = {s.name: s for s in input_specs(candidate)}
    if set(ref_in) != set(cand_in):
        raise InputError(
            f"{cand_name}: inputs {sorted(cand_in)} differ from the reference's {sorted(ref_in)}"
        )
    for name, spec in ref_in.items():
        if cand_in[name].dtype != spec.dtype:
            raise InputError(
                f"{cand_name}: input '{name}' is {cand_in[name].dtype}, the reference's is {spec.dtype}"
            )
    ref_out = [v.name for v in reference.graph.outputs]
    cand_out = {v.name for v in candidate.graph.outputs}
    missing = [n for n in ref_out if n not in cand_out]
    if missing:
        raise InputError(
            f"{cand_name}: has no output '{missing[0]}' (the reference's outputs: {ref_out})"
        )


def _failures(outputs: list[OutputParity], t: Thresholds) -> list[str]:
    failures = []
    for o in outputs:
        if t.min_cosine is not None and not o.cosine_mean >= t.min_cosine:
            failures.append(f"{o.name}: cosine {o.cosine_mean:.6f} < {t.min_cosine}")
        if t.min_snr_db is not None and not o.snr_db >= t.min_snr_db:
            failures.append(f"{o.name}: SNR {o.snr_db:.2f} dB < {t.min_snr_db} dB")
        if t.max_abs_error is not None and not o.max_abs_error <= t.max_abs_error:
            failures.append(f"{o.name}: max abs error {o.max_abs_error:.6g} > {t.max_abs_error}")
        if (
            t.min_top1 is not None
            and o.top1_agreement is not None
            and not o.top1_agreement >= t.min_top1
        ):
            failures.append(f"{o.name}: top-1 agreement {o.top1_agreement:.4f} < {t.min_top1}")
        if (
            t.max_accuracy_drop is not None
            and o.reference_accuracy is not None
            and o.candidate_accuracy is not None
            and o.reference_accuracy - o.candidate_accuracy > t.max_accuracy_drop
        ):
            drop = o.reference_accuracy - o.candidate_accuracy
            failures.append(f"{o.name}: accuracy drop {drop:.4f} > {t.max_accuracy_drop}")
    if t.min_top1 is not None and not any(o.top1_agreement is not None for o in outputs):
        failures.append("--min-top1 given but no output holds class scores")
    if t.max_accuracy_drop is not None and not any(
        o.reference_accuracy is not None for o in outputs
    ):
        failures.append(
            "--max-accuracy-drop given but the data have no labels or no output holds class scores"
        )
    return failures


class ReferenceOutputs:
    """The reference model's tensor outputs on the batches of one split, computed once, so that
    every candidate scored against them sees the same samples and the reference runs once.

    ``limit`` stops after the batch that reaches that many samples, ``max_bytes`` after the
    batch whose outputs pass that many bytes; ``complete`` says whether every batch of the
    split is held (only then can ``verify`` use it in place of a new run).
    """

    def __init__(
        self,
        model: ir.Model,
        samples: Samples,
        batch_size: int,
        split: str = "all",
        holdout: float = 0.0,
        *,
        limit: int | None = None,
        optimization: str = "all",
        name: str = "reference",
        max_bytes: int | None = None,
    ):
        runner = Runner(model, name=name, optimization=optimization)
        self.key = self._key(samples, batch_size, split, holdout, optimization)
        self.names = [
            v.name
            for v in model.graph.outputs
            if v.type is None or isinstance(v.type, ir.TensorType)
        ]
        self.batches: list = []
        self.outputs: list[dict[str, np.ndarray]] = []
        self.complete = True
        seen = held = 0
        for batch in samples.batches(batch_size, split, holdout):
            if (limit is not None and seen >= limit) or (
                max_bytes is not None and held > max_bytes
            ):
                self.complete = False  # one more batch exists: not every sample is held
                break
            self.batches.append(batch)
            self.outputs.append(runner.run(batch, self.names) if self.names else {})
            held += sum(a.nbytes for a in self.outputs[-1].values())
            seen += len(batch)
        self.samples = seen

    @staticmethod
    def _key(samples: Samples, batch_size: int, split: str, holdout: float, opt: str) -> tuple:
        return (id(samples), batch_size, split, holdout if split != "all" else None, opt)

    def serves(
        self, samples: Samples, batch_size: int, split: str, holdout: float, opt: str
    ) -> bool:
        return self.complete and self._key(samples, batch_size, split, holdout, opt) == self.key


# Outputs of a large reference computed before its candidate runs, at most (see verify)
REFERENCE_BYTES = 1 << 30


@cluster.accepts_engine
def verify(
    reference,
    candidate,
    samples: Samples,
    *,
    thresholds: Thresholds | None = None,
    batch_size: int = 32,
    per_node: bool = False,
    per_node_samples: int = 32,
    node_tolerance: float = 1e-4,
    optimization: str = "all",
    split: str = "all",
    holdout: float = 0.0,
    reference_name: str | None = None,
    candidate_name: str | None = None,
    reference_outputs: ReferenceOutputs | None = None,
    floors: bool = True,
    metric=None,
    states: list[tuple[str, str]] | None = None,
    candidate_outputs: list[dict[str, np.ndarray]] | None = None,
) -> VerifyReport:
    """Runs ``reference`` and ``candidate`` in onnxruntime on ``samples`` and compares outputs.

    Args:
        reference, candidate: paths, ``ModelProto`` or ``onnx_ir.Model``.
        samples: from ``onnxzip.data.open_samples``; every sample is used.
        thresholds: parity requirements; failures are listed in the report (``passed`` False).
        batch_size: samples per onnxruntime run.
        per_node: also compare every intermediate tensor both models share by name.
        per_node_samples: how many samples the per-node comparison uses.
        node_tolerance: relative error above which a tensor counts as diverging.
        optimization: onnxruntime graph optimisation level for the output comparison
            ("all", as served, by default); the per-node pass always runs unoptimised.
        split, holdout: which samples to use (``"all"``, or ``"holdout"`` for the held-out
            fraction ``holdout`` that calibration never sees; see ``onnxzip.data``).
        reference_outputs: the reference's outputs on these very batches, already computed
            (used only when it holds every batch of the same samples, split and batch size).
        candidate_outputs: the candidate's outputs on the batches of ``reference_outputs``,
            already computed (a decision that scored it): used with them, not run again.
        floors: check every output (or slice) against the default floor of its kind
            (``onnxzip.floors``); explicit ``thresholds`` replace the floors.
        metric: a task metric (``onnxzip.metrics``: a name, ``module:function``, a callable
            ``f(reference, candidate, batch) -> float`` or a ``TaskMetric``); given, its mean
            over the samples is checked against its floor instead of the default floors.
        states: (state input, state output) pairs of a streaming model: the samples are the
            steps of one stream, and each model runs over it on its own carried state
            (``onnxzip.stateful``).

    Returns:
        A ``VerifyReport``.

    Raises:
        InputError: the models do not take the same inputs or lack each other's outputs.
        ModelError: a model cannot be loaded or run.
    """
    thresholds = thresholds or Thresholds()
    states = states or getattr(samples, "pairs", None)  # a stream: each model on its own state
    ref_name = reference_name or (
        str(reference) if not isinstance(reference, ir.Model) else "reference"
    )
    cand_name = candidate_name or (
        str(candidate) if not isinstance(candidate, ir.Model) else "candidate"
    )
    ref_model = io.load_model(reference, name=ref_name)
    cand_model = io.load_model(candidate, name=cand_name)
    _check_compatible(ref_model, cand_model, ref_name, cand_name)

    cached = (
        not states
        and reference_outputs is not None
        and reference_outputs.serves(samples, batch_size, split, holdout, optimization)
    )
    if not cached and not states and runtime.feeds_weights(ref_model):
        # A model whose weights are fed to its session (hundreds of MB and more): its outputs
        # first, then its weights' pages dropped, then the candidate, so that the two never
        # hold their weights at once (when the outputs fit REFERENCE_BYTES)
        reference_outputs = ReferenceOutputs(
            ref_model,
            samples,
            batch_size,
            split,
            holdout,
            optimization=optimization,
            name=ref_name,
            max_bytes=REFERENCE_BYTES,
        )
        io.drop_resident_pages(ref_model)
        cached = reference_outputs.complete
    outputs = [
        v for v in ref_model.graph.outputs if v.type is None or isinstance(v.type, ir.TensorType)
    ]
    if not outputs:
        raise InputError(f"{ref_name}: no tensor outputs to compare (sequences, maps, optionals)")
    names = [v.name for v in outputs]
    explicit = any(getattr(thresholds, f.name) is not None for f in dataclasses.fields(thresholds))
    task = metrics_mod.as_metric(metric)
    judging = task is not None or (floors and not explicit)
    known = cached and candidate_outputs is not None
    if known:
        pairs = zip(
            reference_outputs.batches, reference_outputs.outputs, candidate_outputs, strict=True
        )
        batches = len(reference_outputs.batches)
    elif cached:
        pairs = zip(reference_outputs.batches, reference_outputs.outputs, strict=True)
        batches = len(reference_outputs.batches)
    elif states:
        from onnxzip.stateful import StatefulSamples

        # each model on its own carried state: the candidate's drift through it is measured
        own = [
            StatefulSamples(getattr(samples, "base", samples), m, states, n)
            for m, n in ((ref_model, ref_name), (cand_model, cand_name))
        ]
        for stream in own:
            stream.max_batch = samples.max_batch
        streams = [s.batches(batch_size, split, holdout) for s in own]
        pairs = ((r, None, c) for r, c in zip(*streams, strict=True))
        batches = samples.batch_count(batch_size, split, holdout)
    else:
        pairs = ((b, None) for b in samples.batches(batch_size, split, holdout))
        batches = samples.batch_count(batch_size, split, holdout)
    per_shard, total = cluster.shard_plan(samples.batch_size_for(batch_size), batches)
    # Shards of consecutive batches on the active engine (this process or Ray tasks), their
    # sums merged in stream order: the same numbers wherever they ran.
    context = _Comparison(
        cluster.new_key(),
        None if cached else ref_model,
        None if known else cand_model,
        ref_name,
        cand_name,
        optimization,
        outputs,
        task,
        judging,
    )
    parity = _Parity(
        {v.name: output_accumulator(v) for v in outputs},
        floors_mod.Judge(outputs, task) if judging else None,
    )
    try:
        for part in cluster.active().map(
            _compare_shard,
            cluster.shards(pairs, per_shard),
            context,
            total=total,
            desc="verify",
            unit="shard",
        ):
            parity.merge(part)
    finally:
        cluster.forget(context.key + "/reference")
        cluster.forget(context.key + "/candidate")
    accumulators, judge, count = parity.accumulators, parity.judge, parity.samples
    results = [accumulators[n].result(n) for n in names]
    report = VerifyReport(
        reference=ref_name,
        candidate=cand_name,
        data=(getattr(samples, "base", samples) if states else samples).describe()
        + ("" if split == "all" else f" ({split} split, fraction {holdout:g})")
        + (
            f"; each model on its own state ({', '.join(f'{i}<-{o}' for i, o in states)})"
            if states
            else ""
        ),
        synthetic=samples.synthetic,
        samples=count,
        outputs=results,
        thresholds=thresholds,
        failures=_failures(results, thresholds),
    )
    if task is not None:
        report.task_metric, report.task_score = task.name, judge.task_score
        report.floors_note = f"replaced by the task metric {task.name}"
    checks = judge.checks() if judge is not None else []
    if checks:
        report.floors = checks
        report.failures += [c.describe() for c in report.floors if not c.passed]
    elif task is None:
        report.floors_note = (
            "replaced by the thresholds given" if explicit else "not checked (floors off)"
        )
    if per_node:
        report.per_node = compare_nodes(
            ref_model,
            cand_model,
            samples,
            batch_size=batch_size,
            max_samples=per_node_samples,
            tolerance=node_tolerance,
        )
    for failure in report.failures:
        logger.info("parity check failed: %s", failure)
    return report


@dataclass
class _Comparison:
    """What every shard of one comparison needs."""

    key: str  # names this comparison's sessions in a worker's cache
    reference: ir.Model | None  # None: the reference outputs travel with the batches
    candidate: ir.Model | None  # None: so do the candidate's
    reference_name: str
    candidate_name: str
    optimization: str
    outputs: list[ir.Value]
    task: object
    judging: bool


@dataclass
class _Parity:
    """The parity sums of some consecutive batches."""

    accumulators: dict[str, OutputAccumulator]
    judge: floors_mod.Judge | None
    samples: int = 0

    def merge(self, other: _Parity) -> None:
        """Folds in the sums of the batches after these (``other``'s shard)."""
        for name, acc in self.accumulators.items():
            acc.merge(other.accumulators[name])
        if self.judge is not None:
            self.judge.merge(other.judge)
        self.samples += other.samples


def _compare_shard(context: _Comparison, pairs: list) -> _Parity:
    """Both models on one shard of (batch, reference outputs or None) pairs."""
    c = context
    names = [v.name for v in c.outputs]
    ref_run = None
    if c.reference is not None:
        ref_run = cluster.cached(
            c.key + "/reference",
            lambda: Runner(c.reference, name=c.reference_name, optimization=c.optimization),
        )
    cand_run = None
    if c.candidate is not None:
        cand_run = cluster.cached(
            c.key + "/candidate",
            lambda: Runner(c.candidate, name=c.candidate_name, optimization=c.optimization),
        )
    part = _Parity(
        {v.name: output_accumulator(v) for v in c.outputs},
        floors_mod.Judge(c.outputs, c.task) if c.judging else None,
    )
    # the third item: the candidate's batch (its carried states), or its outputs already known
    for batch, ref_out, *own in pairs:
        if ref_out is None:
            ref_out = ref_run.run(batch, names)
        if cand_run is None:
            cand_out = own[0]
        else:
            cand_out = cand_run.run(own[0] if own else batch, names)
        for name in names:
            r, o = ref_out[name], cand_out[name]
            if r.shape != o.shape:
                raise InputError(
                    f"{c.candidate_name}: output '{name}' has shape {list(o.shape)}, the "
                    f"reference's is {list(r.shape)}"
                )
            part.accumulators[name].add(r, o, batch.labels, batch.count)
        if part.judge is not None:
            part.judge.add(ref_out, cand_out, batch)
        part.samples += len(batch)
    return part


def _expose_all(model: ir.Model) -> tuple[ir.Model, dict[str, ir.Node]]:
    """A copy of ``model`` whose every typed main-graph node output is also a graph output, and
    the producing node of each such tensor (in graph order, which is topological)."""
    producers = {
        value.name: node
        for node in model.graph
        for value in node.outputs
        if value.name and isinstance(value.type, ir.TensorType)
    }
    return expose(model, producers), producers


# The share of a run's batch (``samples.max_batch``) the per-node comparison uses: its two
# sessions expose every tensor (about twice the intermediate bytes each, outputs plus arena, where
# ``analysis.RUN_OVERHEAD`` allows three for one run).
PER_NODE_BATCH_SHARE = 0.375


def compare_nodes(
    reference: ir.Model,
    candidate: ir.Model,
    samples: Samples,
    *,
    batch_size: int = 32,
    max_samples: int = 32,
    tolerance: float = 1e-4,
    split: str = "all",
    holdout: float = 0.0,
) -> PerNodeReport:
    """Compares every intermediate tensor the two models share by name (see module docstring)."""
    ref_exposed, ref_producers = _expose_all(reference)
    cand_exposed, _ = _expose_all(candidate)
    ref_run = Runner(ref_exposed, name="reference (all tensors)", optimization="none")
    cand_run = Runner(cand_exposed, name="candidate (all tensors)", optimization="none")
    cand_names = set(cand_run.output_names)
    # ref_producers was filled in graph order, which is topological: "first" means upstream-most.
    shared = [n for n in ref_producers if n in cand_names]
    stats: dict[str, list[float]] = {
        n: [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, math.inf, -math.inf, 0.0] for n in shared
    }
    # max_abs, max_ref, sum_ref2, sum_diff2, dot, sum_cand2, shape_mismatch, min_r, max_r, count
    seen = 0
    # Both models hold every tensor at once here, with no buffer reuse, where one plain run
    # holds a few: the batch is PER_NODE_BATCH_SHARE of the one the memory budget allows a run.
    size = samples.batch_size_for(min(batch_size, max_samples))
    size = max(1, int(size * PER_NODE_BATCH_SHARE))
    for batch in samples.batches(size, split, holdout):
        ref_out = ref_run.run(batch, shared)
        cand_out = cand_run.run(batch, shared)
        for name in shared:
            s = stats[name]
            r, c = ref_out.pop(name), cand_out.pop(name)
            if r.shape != c.shape or r.dtype.kind not in "fiub" or c.dtype.kind not in "fiub":
                s[6] = 1.0
                continue
            r = r.astype(np.float64)
            c = c.astype(np.float64)
            d = r - c
            if d.size:
                s[0] = max(s[0], float(np.max(np.abs(d))))
                s[1] = max(s[1], float(np.max(np.abs(r))))
                s[7] = min(s[7], float(np.min(r)))
                s[8] = max(s[8], float(np.max(r)))
                s[9] += r.size
            s[2] += float((r * r).sum())
            s[3] += float((d * d).sum())
            s[4] += float((r * c).sum())
            s[5] += float((c * c).sum())
        seen += len(batch)
        if seen >= max_samples:
            break
    nodes, skipped = [], []
    for name in shared:
        max_abs, max_ref, ref2, diff2, dot, cand2, mismatch, lo, hi, count = stats[name]
        if mismatch:
            skipped.append(name)
            continue
        node = ref_producers[name]
        denom = math.sqrt(ref2 * cand2)
        cosine = 1.0 if ref2 == 0 and cand2 == 0 else (dot / denom if denom else 0.0)
        nodes.append(
            NodeParity(
                tensor=name,
                node=node.name or name,
                op_type=node.op_type,
                max_abs_error=max_abs,
                relative_error=max_abs / max_ref
                if max_ref > 0
                else (0.0 if max_abs == 0 else math.inf),
                cosine=cosine,
                snr_db=snr_db(ref2, diff2),
                rounding_snr_db=_rounding_snr(ref2 / count if count else 0.0, lo, hi),
            )
        )
    by_tensor = {n.tensor: n for n in nodes}
    for n in nodes:
        if not math.isfinite(n.snr_db):
            continue
        ins = [
            by_tensor[v.name] for v in ref_producers[n.tensor].inputs if v and v.name in by_tensor
        ]
        # What quantization explains: the error its inputs brought, or one rounding of its own
        # values (a layer reading exact inputs loses what its int8 output costs, no more).
        explained = min([n.rounding_snr_db, *(i.snr_db for i in ins)])
        if math.isfinite(explained):
            n.snr_lost_db = max(0.0, explained - n.snr_db)
    ranked = sorted((n for n in nodes if n.snr_lost_db > 0), key=lambda n: -n.snr_lost_db)
    diverging = [n for n in nodes if n.relative_error > tolerance]
    first = diverging[0] if diverging else None
    worst = min(diverging, key=lambda n: (n.snr_db, -n.relative_error)) if diverging else None
    return PerNodeReport(
        samples=min(seen, max_samples),
        tolerance=tolerance,
        compared=len(nodes),
        skipped_shape_mismatch=skipped,
        first_diverging=first,
        worst=worst,
        nodes=nodes,
        largest_losses=ranked[:LOSSES_SHOWN],
    )


LOSSES_SHOWN = 5  # nodes the per-node report lists by SNR lost


def _rounding_snr(mean_square: float, lo: float, hi: float) -> float:
    """SNR in dB of one uint8 rounding of values with this mean square over [lo, hi] (the
    range widened to hold 0, as activation quantization does): noise step^2 / 12."""
    step = (max(hi, 0.0) - min(lo, 0.0)) / 255.0
    if step <= 0 or mean_square <= 0 or not math.isfinite(step):
        return math.inf
    return 10.0 * math.log10(12.0 * mean_square / (step * step))
