"""Recovery after pruning: fine-tune the pruned model on the original's outputs (distillation).

No labels are needed: the original model (the teacher) runs in onnxruntime on each batch and
the pruned model (the student) is trained to reproduce it, with onnxruntime's training
artifacts as the engine (``generate_artifacts`` with AdamW, then ``onnxruntime.training.api``).

The training twin is the student with its loss written into the graph:

* class scores ``s`` (a float output ``[N, C]``) against the teacher's ``t``, at temperature
  ``T``: ``L = -T^2 mean_n sum_c softmax(t / T)[n, c] * log_softmax(s / T)[n, c]``, the
  KL divergence up to the teacher's entropy, a constant (the teacher probabilities arrive as an
  extra input; the reported loss subtracts that constant, so it is the KL divergence itself);
  class scores per position ``[N, T, C]`` and masks ``[N, C, H, W]`` the same over their class
  axis, averaged over samples and positions;
* any other float output: the mean squared error to the teacher's output.

Several outputs add their losses. BatchNormalization after a convolution is folded into it
first (exact), and any other becomes a constant affine ``x * s + t``, so the twin has no
BatchNormalization at all: onnxruntime's gradient builder would otherwise switch it to batch
statistics. Ops without gradient builders are rewritten (``training.differentiable``). The folded
model is checked against the pruned one in onnxruntime before any step. The teacher runs here, in
the user's onnxruntime, once per training batch; the twin trains in the training engine's worker
process (``onnxzip.engine``), drawing those batches in turn with their samples shuffled. The
trained weights are written back by name into the inference model, which keeps every other part
of the graph.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxzip import engine, io, passes, progress, training
from onnxzip import floors as floors_mod
from onnxzip.config import ConfigError, option
from onnxzip.data import Samples
from onnxzip.errors import InputError, ModelError
from onnxzip.ir import ops
from onnxzip.runtime import Runner

logger = logging.getLogger(__name__)

_TRAINABLE_OPS = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (1, 2),
    "MatMul": (1,),
    "Add": (1,),
}


@dataclass
class RecoverConfig:
    """Options of ``recover``: distillation from the original through the training engine."""

    steps: int = option(500, "distillation steps", metavar="N", flag="--recover-steps")
    # AdamW, cosine decay to 0 over the steps
    learning_rate: float | None = option(
        None,
        "AdamW peak learning rate, cosine decay to 0 (default: whichever of 5e-3, 1e-3 and "
        "2e-4 ends a short trial run at the lowest loss)",
        metavar="LR",
        flag="--recover-lr",
    )
    batch_size: int = option(32, cli=False)
    # tried 1, 2, 4, 6 on the digits nets at half the MACs: 4 was best
    temperature: float | None = option(
        None,
        "distillation temperature (default: per output, the largest of 4, 2 and 1 at which the "
        "softened teacher keeps half the mass it gives its top class unsoftened)",
        metavar="T",
        flag="--recover-temperature",
    )
    holdout: float = option(0.2, cli=False)  # the held-out part of the samples is never trained on

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError("steps", f"{{name}} must be at least 1, got {self.steps}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ConfigError(
                "learning_rate", f"{{name}} must be positive, got {self.learning_rate}"
            )
        if self.temperature is not None and not self.temperature > 0:
            raise ConfigError("temperature", f"{{name}} must be positive, got {self.temperature}")
        if not 0 <= self.holdout < 1:
            raise ConfigError("holdout", f"{{name}} must be in [0, 1), got {self.holdout}")


# Without a learning rate given, these peak rates are tried (largest first) for
# ``trial_steps(steps)`` steps each from the pruned weights, and the one whose trial ends at
# the lowest loss runs the schedule. 5e-3 suits the digits nets, trained from scratch; on a
# pretrained text recognizer (PP-OCRv5's, 20 % pruned) AdamW's first step at 5e-3 or 2e-3
# moves every weight so far that the distillation loss jumps from 2.3 to 110 and, at 5e-3,
# stays there; 2e-4 brings it down to 1.3 in 60 steps.
LEARNING_RATES = (5e-3, 1e-3, 2e-4)


def trial_steps(steps: int) -> int:
    """Steps of each learning-rate trial: 1/25 of the run, between 4 and 20."""
    return max(4, min(20, steps // 25))


@dataclass
class RecoverReport:
    steps: int
    samples_seen: int
    trainable_parameters: int
    first_loss: float
    last_loss: float
    seconds: float
    losses: list[float] = field(default_factory=list)
    learning_rate: float = 0.0  # the peak learning rate the schedule ran at
    # each trial's rate -> the twin's mean loss over its second half (teacher entropy included)
    tried: dict[float, float] = field(default_factory=dict)
    temperatures: dict[str, float] = field(default_factory=dict)  # per class-score output

    def describe(self) -> str:
        """One line: steps, samples, learning rate (and how it was chosen), the loss."""
        rate = f"learning rate {self.learning_rate:.2g}"
        if self.tried:
            rate += " (of " + ", ".join(f"{r:.2g}" for r in self.tried) + " after "
            rate += f"{trial_steps(self.steps)} trial steps each)"
        if self.temperatures:
            rate += ", temperature " + ", ".join(
                f"{t:g}" for t in sorted(set(self.temperatures.values()), reverse=True)
            )
        return (
            f"{self.steps} steps on {self.samples_seen} samples, {rate}, distillation loss "
            f"{self.first_loss:.4g} -> {self.last_loss:.4g}"
        )


def _trainable(model: ir.Model) -> list[str]:
    """Weights and biases of the weighted ops (and constant Add operands after a MatMul), but
    not those of a spectral front end (``ops.logarithm_front_end``): fixed signal-processing
    filters, whose gradients would be the costliest part of every step."""
    names = []
    front_end = ops.logarithm_front_end(model.graph)
    for node in model.graph:
        if ops.node_key(node) in front_end:
            continue
        for index in _TRAINABLE_OPS.get(node.op_type, ()):
            if index >= len(node.inputs) or node.inputs[index] is None:
                continue
            value = node.inputs[index]
            if value.const_value is None or value.dtype != ir.DataType.FLOAT or value.name in names:
                continue
            if node.op_type == "Add" and (
                node.inputs[0].producer() is None or node.inputs[0].producer().op_type != "MatMul"
            ):
                continue
            names.append(value.name)
    return names


def _class_scores(value: ir.Value) -> tuple[str, int] | None:
    """How an output enters the distillation loss: class scores (the floors' kinds: per
    sample, per position, per pixel of a mask) as a KL divergence of tempered distributions
    over their class axis, given as ``(form, axis)``: form "probabilities" (a Softmax's output,
    as the floors' part says: its log is the logits up to a constant, which the softmax
    ignores) or "logits" (a LogSoftmax's output too: a constant shift); None for every other
    kind, which is matched by squared error (a box regression through a softmax would only be
    matched up to a shift of all its values). Per position and per pixel the KL is averaged
    over positions: squared error on a text recognizer's probabilities over thousands of
    characters is about 1e-9 at the start, a gradient the optimizer hardly moves on."""
    part = floors_mod.classify(value)
    if part.kind not in (floors_mod.CLASS_SCORES, floors_mod.CLASS_PER_POSITION, floors_mod.MASK):
        return None
    if part.class_axis is None:
        return None
    return ("probabilities" if part.probabilities else "logits", part.class_axis)


def _teacher_distribution(t: np.ndarray, form: tuple[str, int], temperature: float) -> np.ndarray:
    """The tempered target distribution from a teacher output of class scores ``form``."""
    kind, axis = form
    logits = np.log(np.maximum(t, 1e-30)) if kind == "probabilities" else t
    return _softmax(logits.astype(np.float64), temperature, axis)


def _training_twin(
    student: ir.Model,
    temperature: float | dict[str, float],
    weights: dict[str, np.ndarray] | None = None,
    forms: dict[str, tuple[str, int] | None] | None = None,
) -> tuple[ir.Model, list[str]]:
    """The student with its distillation loss as the first output; returns the target inputs.
    ``temperature``: one for every class-score output, or one per output name;
    ``weights``: per output, the per-feature weights of its squared error (``feature_weights``);
    ``forms``: per float output, its ``_class_scores`` (found here when not given)."""
    twin = student.clone()
    graph = twin.graph
    outputs = list(graph.outputs)
    losses, targets = [], []
    for i, out in enumerate(outputs):
        if out.dtype != ir.DataType.FLOAT:
            continue
        target = ir.Value(name=f"distill_target_{i}", type=out.type, shape=out.shape)
        graph.inputs.append(target)
        targets.append(target.name)
        form = forms[out.name] if forms is not None else _class_scores(out)
        if form is not None:
            tau = temperature[out.name] if isinstance(temperature, dict) else temperature
            t = passes.add_initializer(graph, f"distill_temperature_{i}", np.array(tau, np.float32))
            kind, axis = form
            logits, pre = out, []
            if kind == "probabilities":
                tiny = passes.add_initializer(
                    graph, f"distill_tiny_{i}", np.array(1e-30, np.float32)
                )
                floor = ir.node("Max", [out, tiny], name=f"distill_floor_{i}")
                log = ir.node("Log", [floor.outputs[0]], name=f"distill_log_{i}")
                logits, pre = log.outputs[0], [floor, log]
            scaled = ir.node("Div", [logits, t], name=f"distill_scale_{i}")
            logp = ir.node(
                "LogSoftmax",
                [scaled.outputs[0]],
                attributes={"axis": axis},
                name=f"distill_logp_{i}",
            )
            prod = ir.node("Mul", [target, logp.outputs[0]], name=f"distill_prod_{i}")
            axes = passes.add_initializer(graph, f"distill_axes_{i}", np.array([axis], np.int64))
            per_sample = ir.node(
                "ReduceSum",
                [prod.outputs[0], axes],
                attributes={"keepdims": 0},
                name=f"distill_sum_{i}",
            )
            mean = ir.node(
                "ReduceMean",
                [per_sample.outputs[0]],
                attributes={"keepdims": 0},
                name=f"distill_mean_{i}",
            )
            factor = passes.add_initializer(
                graph, f"distill_factor_{i}", np.array(-(tau**2), np.float32)
            )
            loss = ir.node("Mul", [mean.outputs[0], factor], name=f"distill_loss_{i}")
            new = [*pre, scaled, logp, prod, per_sample, mean, loss]
        else:
            diff = ir.node("Sub", [out, target], name=f"distill_diff_{i}")
            sq = ir.node("Mul", [diff.outputs[0], diff.outputs[0]], name=f"distill_sq_{i}")
            new = [diff, sq]
            if out.name in (weights or {}):  # features of very different spreads
                w = passes.add_initializer(graph, f"distill_weight_{i}", weights[out.name])
                new.append(ir.node("Mul", [sq.outputs[0], w], name=f"distill_weighted_{i}"))
            loss = ir.node(
                "ReduceMean",
                [new[-1].outputs[0]],
                attributes={"keepdims": 0},
                name=f"distill_loss_{i}",
            )
            new.append(loss)
        for node in new:
            node.outputs[0].name = node.name
            graph.append(node)
        losses.append(new[-1].outputs[0])
    training.scalar_loss(graph, losses, "recovery")
    return twin, targets


MAX_WEIGHTED_FEATURES = 65536
# Features whose spreads differ by more than this factor (box coordinates in pixels next to
# probabilities in one detector output) are standardised in the loss; below it, plain MSE.
SPREAD_RATIO = 10.0


def feature_weights(target: np.ndarray) -> np.ndarray:
    """Per last-axis feature weight of the squared error: ``1 / var`` (floored at 1e-6 of the
    largest variance: a constant feature does not take the whole loss) when the features' spreads differ by more than ``SPREAD_RATIO``, scaled to
    a mean of 1; else all 1. Without it the largest-valued features (pixel coordinates) are
    all the loss sees, and distillation trades the small ones (the scores) away."""
    flat = target.reshape(-1, target.shape[-1]).astype(np.float64)
    var = flat.var(axis=0)
    floor = 1e-6 * max(float(var.max()), 1e-30)
    std = np.sqrt(np.maximum(var, floor))
    if std.max() <= SPREAD_RATIO * std.min():
        return np.ones(target.shape[-1], np.float32)
    weights = 1.0 / np.maximum(var, floor)
    return (weights / weights.mean()).astype(np.float32)


# Without a temperature given, each class-score output takes the largest of these at which the
# softened teacher's top class keeps at least TOP_MASS of the mass it has unsoftened (means
# over the first training batch). Softening shows the student which other classes the teacher
# finds likely; over thousands of classes it spreads the mass so thin that the top class
# vanishes from the target: PP-OCRv5's recognizer (18,385 characters) has 82 % on its top
# character, 28 % of it at 2 and 0.8 % at 4, and takes 1; the digits nets keep 66 % of 98 % at 4
# (and take 4, as before), as does an unsure teacher whose top class had little to lose.
TEMPERATURES = (4.0, 2.0, 1.0)
TOP_MASS = 0.5


def _temperatures(config, forms, first: dict) -> dict:
    """Per class-score output (``forms``), its distillation temperature; ``first``: the
    teacher's outputs on the first training batch (``_first_outputs``)."""
    names = [name for name, form in forms.items() if form is not None]
    if config.temperature is not None:
        return dict.fromkeys(names, config.temperature)
    chosen = {}
    for name in names:
        axis = forms[name][1]
        top = {
            t: float(np.mean(_teacher_distribution(first[name], forms[name], t).max(axis=axis)))
            for t in (*TEMPERATURES, 1.0)
        }
        chosen[name] = next((t for t in TEMPERATURES if top[t] >= TOP_MASS * top[1.0]), 1.0)
    return chosen


def _weighted(student: ir.Model, forms) -> list[str]:
    """Regression-like outputs (``forms``: None) with a static last axis: those whose squared
    error may need feature weights."""
    return [
        v.name
        for v in student.graph.outputs
        if v.dtype == ir.DataType.FLOAT
        and forms[v.name] is None
        and v.shape is not None
        and len(v.shape)
        and isinstance(v.shape[-1], int)
        and 1 < v.shape[-1] <= MAX_WEIGHTED_FEATURES
    ]


def _first_outputs(teacher_run, samples: Samples, config, forms, student: ir.Model) -> dict:
    """The teacher's outputs on the first training batch that the loss weights and the
    temperatures are chosen from: run once, only for the outputs that need them."""
    names = _weighted(student, forms)
    if config.temperature is None:
        names += [name for name, form in forms.items() if form is not None]
    if not names:
        return {}
    split = "calibration" if config.holdout > 0 else "all"
    batch = next(samples.batches(config.batch_size, split, config.holdout or 0.5))
    return teacher_run.run(batch, names)


def _loss_weights(student: ir.Model, forms, first: dict) -> dict:
    """Per regression-like output with a static last axis, its feature weights from the
    teacher's outputs on the first training batch; only outputs that need them."""
    weights = {name: feature_weights(first[name]) for name in _weighted(student, forms)}
    return {name: w for name, w in weights.items() if not np.all(w == 1)}


def _softmax(x: np.ndarray, temperature: float, axis: int = -1) -> np.ndarray:
    z = x / temperature
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def recover(
    teacher, student: ir.Model, samples: Samples, config: RecoverConfig | None = None
) -> tuple[ir.Model, RecoverReport]:
    """Fine-tunes ``student`` to reproduce ``teacher`` on the samples not held out.

    Returns the fine-tuned inference model (a new object) and a report with the loss curve.

    Raises:
        ModelError: onnxruntime cannot build or run the training graph (the op is named).
    """
    config = config or RecoverConfig()
    config.validate()
    start = time.perf_counter()
    split = "calibration" if config.holdout > 0 else "all"
    size = training.batch_within(samples, config.batch_size, split, config.holdout or 0.5)
    if size != config.batch_size:  # fewer training samples than a batch: one batch of them all
        config = dataclasses.replace(config, batch_size=size)
    teacher_model = io.load_model(teacher, name="teacher")
    original_student = student
    student = student.clone()
    passes.lift_constants(student)
    passes.fold_batchnorm(student)
    _check_same(original_student, student, samples, config)
    base = student.clone()  # the trained weights go back into ``student``, which keeps its ops
    rewritten = training.differentiable(base, samples)
    if rewritten or passes.batchnorm_to_affine(base):
        _check_same(student, base, samples, config)
    trainable = _trainable(student)
    training.unshare_weights(base, trainable)
    fixed = training.fix_batch(base, config.batch_size, samples)
    teacher_run = Runner(teacher_model, name="teacher")
    # how each float output enters the loss: decided once, for the twin and for its targets
    forms = {
        v.name: _class_scores(v) for v in student.graph.outputs if v.dtype == ir.DataType.FLOAT
    }
    opset = student.opset_imports.get("", 1)
    for v in student.graph.outputs:
        form = forms.get(v.name)
        if form is not None and opset < 13 and (v.shape is None or form[1] != len(v.shape) - 1):
            forms[v.name] = None  # LogSoftmax before 13 flattens from its axis on
    first = _first_outputs(teacher_run, samples, config, forms, student)
    weights = _loss_weights(student, forms, first)
    temperatures = _temperatures(config, forms, first)
    twin, targets = _training_twin(base, temperatures, weights, forms)
    if not trainable:
        raise InputError(
            "recovery: the model has no trainable weights (Conv/Gemm/MatMul initializers)"
        )
    frozen = [
        name
        for name, v in twin.graph.initializers.items()
        if name not in trainable and v.dtype is not None and v.dtype.is_floating_point()
    ]

    blocked = training.control_flow_on_gradient_path(twin, trainable)
    if blocked is not None:
        raise engine.WorkerFailed(
            f"recovery: op {blocked} has no gradient in onnxruntime-training (control flow "
            "between the weights and the loss)"
        )

    out_names = [v.name for v in student.graph.outputs]

    entropies: list[float] = []  # the teacher's per batch: subtracted so the loss is the KL
    sizes: list[int] = []

    def feeds_of_batches():
        split = "calibration" if config.holdout > 0 else "all"
        for batch in progress.bar(
            samples.batches(config.batch_size, split, config.holdout or 0.5),
            desc="recover: teacher",
        ):
            teacher_out = teacher_run.run(batch, out_names)
            feeds = {k: np.ascontiguousarray(v) for k, v in batch.inputs.items()}
            entropy = 0.0
            for i, v in enumerate(student.graph.outputs):
                if v.dtype != ir.DataType.FLOAT:
                    continue
                t = teacher_out[v.name]
                if forms[v.name] is not None:
                    p = _teacher_distribution(t, forms[v.name], temperatures[v.name])
                    plogp = (p * np.log(np.maximum(p, 1e-30))).sum(axis=forms[v.name][1])
                    entropy -= temperatures[v.name] ** 2 * float(np.mean(plogp))
                    feeds[f"distill_target_{i}"] = p.astype(np.float32)
                else:
                    feeds[f"distill_target_{i}"] = t
            entropies.append(entropy)
            sizes.append(len(batch))
            yield feeds

    # Cosine decay of the learning rate to zero over the steps.
    peak = config.learning_rate if config.learning_rate is not None else LEARNING_RATES[0]
    rates = [
        peak * 0.5 * (1 + math.cos(math.pi * step / config.steps)) for step in range(config.steps)
    ]
    trials = [] if config.learning_rate is not None else [r / peak for r in LEARNING_RATES]
    try:
        result = engine.run_job(
            twin,
            kind="train",
            requires_grad=trainable,
            frozen=frozen,
            batches=feeds_of_batches(),
            read=trainable,
            learning_rates=rates,
            trials=trials,
            trial_steps=trial_steps(config.steps),
            shuffle_seed=0,  # each drawn batch's samples permuted, as a shuffled pass would
            batch_size=config.batch_size if fixed else None,
            what="recovery",
            desc="recover",
        )
    except ModelError as exc:
        if not sizes:
            raise InputError("recovery: no training samples") from exc
        raise
    losses = [loss - entropies[b] for loss, b in zip(result.losses, result.batches, strict=True)]
    seen = int(sum(sizes[b] for b in result.batches))
    trained = {name: result.arrays[name] for name in trainable}

    for name, array in trained.items():
        value = student.graph.initializers[name]
        value.const_value = ir.tensor(array.astype(np.float32), name=name)
    report = RecoverReport(
        steps=config.steps,
        samples_seen=seen,
        trainable_parameters=int(sum(a.size for a in trained.values())),
        first_loss=losses[0],
        last_loss=losses[-1],
        seconds=time.perf_counter() - start,
        losses=[float(f"{x:.6g}") for x in losses[:: max(1, len(losses) // 50)]],
        learning_rate=peak * result.scale,
        tried=dict(zip(LEARNING_RATES, result.trial_scores, strict=False)),
        temperatures=temperatures,
    )
    logger.info("recovery: %s", report.describe())
    return student, report


def _check_same(before: ir.Model, after: ir.Model, samples: Samples, config: RecoverConfig) -> None:
    """The folded student must compute what the pruned model computes, before any step."""
    batch = next(samples.batches(min(config.batch_size, 8)))
    a = Runner(before, name="pruned model", optimization="none").run(batch)
    b = Runner(after, name="training twin", optimization="none").run(batch)
    for name, x in a.items():
        gap = float(np.max(np.abs(x.astype(np.float64) - b[name])))
        if gap > 1e-3 * (1.0 + float(np.max(np.abs(x)))):
            raise ModelError(
                f"recovery: the prepared model differs from the pruned one on '{name}' by {gap:.3g}"
            )
