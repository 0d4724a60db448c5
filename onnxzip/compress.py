"""The one-command job: prune (with gradient statistics when asked), recover, quantize, verify.

``compress(model, samples, config) -> (model, CompressReport)``. The samples are split once: a
held-out fraction (``holdout``, default 0.2) that no stage ever trains or calibrates on, used for
every accuracy decision and for the final parity against the original; the rest feeds the
statistics, the recovery fine-tuning and the calibration.

With an accuracy budget (``max_drop`` top-1 points, measured against labels when the samples
have them, else against the original's predictions; or ``min_cosine``), the pruning amount is
searched: the requested MACs target first, then the mildest (0.9: when even that one breaks
the budget nothing is pruned, and no other is tried), then the ones between, from the
requested one up, each pruned, recovered and measured on the held-out samples, until one fits
the budget (the mildest when none of those does); what remains of the
budget goes to quantization, whose accuracy guard keeps harmful layers in float. Without a
budget the default quality floors of the outputs' kinds (``onnxzip.floors``) are the budget:
the same search runs until a pruned model holds them. The report says what was tried.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxzip import engine, io, metrics
from onnxzip.analysis import inspect_model, shapes_for_macs
from onnxzip.config import ConfigError, option
from onnxzip.data import Samples
from onnxzip.engine import EngineUnavailable, cluster
from onnxzip.errors import InputError
from onnxzip.pruning import (
    PruneConfig,
    PruneReport,
    prune,
    reconstruction_summary,
    unprunable_because,
)
from onnxzip.quantize import QuantizeConfig, QuantizeReport, kept_float_lines, quantize
from onnxzip.recover import RecoverConfig, RecoverReport, recover
from onnxzip.report import table
from onnxzip.runtime import session_options
from onnxzip.verify import OutputParity, Thresholds, VerifyReport, verify

logger = logging.getLogger(__name__)

MILDER = (0.5, 0.6, 0.7, 0.8, 0.9)  # MACs targets tried, from the requested one up, under a budget


def _default_prune() -> PruneConfig:
    return PruneConfig(target_macs=0.5)


@dataclass
class CompressConfig:
    """Options of ``compress``: one config per stage, and the job's own options.

    ``prune`` (None: no pruning) gives the criterion, the scope and what is left alone, and
    how much: a ``target_macs`` (searched milder under a budget or the floors) or a fixed
    ``ratio``; ``recover`` (None: no recovery at all) the distillation; ``quantize`` (None: no
    quantization) the mode and everything else of the quantizer. The job's ``holdout``,
    ``batch_size`` and ``target_opset``, and its budget (``max_drop``, ``min_cosine``), hold
    for every stage and replace the stage configs' fields of those names.
    """

    prune: PruneConfig | None = field(default_factory=_default_prune)
    recover: RecoverConfig | None = field(default_factory=RecoverConfig)
    quantize: QuantizeConfig | None = field(default_factory=QuantizeConfig)
    max_drop: float | None = option(None, "at most X top-1 points below the original", metavar="X")
    min_cosine: float | None = option(None, "at least this mean output cosine", metavar="C")
    holdout: float = option(
        0.2,
        "fraction of the samples no stage trains or calibrates on; every accuracy decision "
        "and the final parity use it",
        metavar="F",
    )
    batch_size: int = option(32, cli=False)
    latency: bool = option(
        True,
        "measure latency for the report",
        negate="--no-latency",
        negate_help="skip the latency measurement in the report",
    )
    target_opset: int | None = option(None, cli=False)  # see QuantizeConfig.target_opset
    # without a budget, the default floor of each output's kind is the budget (onnxzip.floors)
    floors: bool = option(True, cli=False)

    def validate(self) -> None:
        if self.max_drop is not None and self.max_drop < 0:
            raise ConfigError("max_drop", f"{{name}} must be at least 0, got {self.max_drop}")
        if self.min_cosine is not None and not -1 <= self.min_cosine <= 1:
            raise ConfigError("min_cosine", f"{{name}} must be in [-1, 1], got {self.min_cosine}")
        if not 0 < self.holdout < 1:
            raise ConfigError("holdout", f"{{name}} must be in (0, 1), got {self.holdout}")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"{{name}} must be at least 1, got {self.batch_size}")
        for stage in (self.prune, self.recover, self.quantize):
            if stage is not None:
                self.stage(stage).validate()

    def stage(self, config):
        """A stage's config with the job's own fields in place of its copies."""
        own = {"batch_size": self.batch_size, "holdout": self.holdout}
        if isinstance(config, QuantizeConfig):
            own.update(
                target_opset=self.target_opset, max_drop=self.max_drop, min_cosine=self.min_cosine
            )
        if isinstance(config, PruneConfig):
            own.pop("holdout")
        return dataclasses.replace(config, **own)

    @property
    def pruning(self) -> bool:
        p = self.prune
        return p is not None and (
            p.ratio is not None or (p.target_macs is not None and p.target_macs < 1)
        )


@dataclass
class Attempt:
    target_macs: float | None  # None when a fixed ratio was pruned
    macs: float
    accuracy_drop: float | None
    cosine: float
    fits: bool
    ratio: float | None = None  # fraction of every group pruned (--prune R)
    failing: str | None = None  # the first default floor it broke, when floors are the budget


@dataclass
class CompressReport:
    source: str
    config: CompressConfig
    data: str
    synthetic: bool
    before: dict
    after: dict
    attempts: list[Attempt] = field(default_factory=list)
    prune: PruneReport | None = None
    recovery: RecoverReport | None = None
    recovery_skipped: str | None = None  # why no recovery ran although steps were asked for
    recovery_not_kept: str | None = None  # distillation ran but did worse on held-out samples
    prune_skipped: str | None = None  # why pruning was asked for but could remove nothing
    pruning_dropped: str | None = None  # why the pruning found was not kept after quantizing
    quantize: QuantizeReport | None = None
    parity: VerifyReport | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def format(self) -> str:
        b, a = self.before, self.after
        rows = [
            [
                "file bytes",
                b["file_bytes"],
                a["file_bytes"],
                _ratio(a["file_bytes"], b["file_bytes"]),
            ],
            [
                "parameters",
                b["parameters"],
                a["parameters"],
                _ratio(a["parameters"], b["parameters"]),
            ],
            ["MACs", b["macs"], a["macs"], _ratio(a["macs"], b["macs"])],
        ]
        if self.latency_ms:
            lb, la = self.latency_ms["original"], self.latency_ms["compressed"]
            rows.append(
                ["latency ms (batch 1, 2 threads)", round(lb, 4), round(la, 4), _ratio(la, lb)]
            )
        out = self.parity.outputs[0] if self.parity and self.parity.outputs else None
        if out is not None and out.reference_accuracy is not None:
            rows.append(
                [
                    "accuracy %",
                    round(100 * out.reference_accuracy, 2),
                    round(100 * out.candidate_accuracy, 2),
                    None,
                ]
            )
        lines = [
            f"model     {self.source}",
            f"data      {self.data}{' (SYNTHETIC)' if self.synthetic else ''}; "
            f"{int(100 * self.config.holdout)} % held out from training and calibration",
            "",
            table(["", "original", "compressed", "ratio"], rows),
        ]
        if self.attempts:
            lines += [
                "",
                "pruning amounts tried (top-1 drop and cosine on the verification samples):",
                table(
                    ["amount", "MACs", "top-1 drop points", "cosine", "fits"]
                    + (["first floor broken"] if any(t.failing for t in self.attempts) else []),
                    [
                        [
                            f"MACs <= {t.target_macs}"
                            if t.target_macs is not None
                            else f"{t.ratio} of each group",
                            round(t.macs, 3),
                            None if t.accuracy_drop is None else round(t.accuracy_drop, 2),
                            round(t.cosine, 5),
                            t.fits,
                        ]
                        + ([t.failing or ""] if any(a.failing for a in self.attempts) else [])
                        for t in self.attempts
                    ],
                ),
            ]
        if self.prune_skipped is not None:
            lines += ["", f"pruning   none: {self.prune_skipped}"]
        if self.pruning_dropped is not None:
            lines += ["", f"pruning   DROPPED: {self.pruning_dropped}"]
        if self.recovery_skipped is not None:
            lines += ["", f"NOT FINE-TUNED: no distillation ({self.recovery_skipped})"]
            fits = self.prune.reconstruction if self.prune is not None else None
            if fits is not None:
                lines.append("recovery  gradient-free instead: " + reconstruction_summary(fits))
        elif self.recovery_not_kept is not None:
            lines += [
                "",
                f"recovery  distillation NOT KEPT: it did worse on the held-out samples "
                f"({self.recovery_not_kept}); later attempts reconstruct instead",
            ]
            fits = self.prune.reconstruction if self.prune is not None else None
            if fits is not None:
                lines.append("recovery  gradient-free: " + reconstruction_summary(fits))
        elif self.recovery is not None:
            r = self.recovery
            lines += [
                "",
                f"recovery  {r.describe()}",
            ]
        if self.quantize is not None and self.quantize.kept_float:
            lines += ["", *kept_float_lines(self.quantize.kept_float)]
        nothing = self.nothing_done()
        if nothing is not None:
            lines += ["", f"NOTHING COMPRESSED: {nothing} (no parity verdict)"]
        elif self.parity is not None:
            lines += ["", self.parity.format()]
        lines += ["", "time      " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())]
        return "\n".join(lines)

    def nothing_done(self) -> str | None:
        """Why the model written computes what the input did (no channel removed, no layer
        quantized), or None when something was compressed."""
        pruned = self.prune is not None and self.prune.unchanged_because is None
        quantized = self.quantize is not None and bool(self.quantize.quantized_ops)
        if pruned or quantized:
            return None
        if self.prune_skipped is not None:
            why = [f"nothing was pruned ({self.prune_skipped})"]
        elif self.prune is not None:  # the pruning taken removed nothing
            why = [f"nothing was pruned ({self.prune.unchanged_because})"]
        elif self.attempts:  # none was taken
            budget = "accuracy budget" if self.config.max_drop is not None else "quality floors"
            why = [f"no pruning amount held the {budget}"]
        else:
            why = ["pruning was not asked for"]
        if self.quantize is None:
            why.append("quantization was not asked for")
        else:
            why.append(
                "quantization quantized nothing"
                + (f" ({self.quantize.nothing_because})" if self.quantize.nothing_because else "")
            )
        return "; ".join(why) + "; the model written is the input model"


def _ratio(a, b):
    return None if not b else round(a / b, 3)


def _summary(model: ir.Model, shapes: dict | None = None) -> dict:
    info = inspect_model(model, input_shapes=shapes, strict_shapes=False)
    return {
        "file_bytes": len(io.model_bytes(model)),
        "parameters": info.parameters,
        "macs": info.macs,
    }


def _drop(out: OutputParity) -> float | None:
    if out.reference_accuracy is not None:
        return 100.0 * (out.reference_accuracy - out.candidate_accuracy)
    if out.top1_agreement is not None:
        return 100.0 * (1.0 - out.top1_agreement)
    return None


def _first_failing(check) -> str | None:
    """``part: metric value (floor ...)`` of the first default floor a check broke."""
    broken = next((c for c in (check.floors or []) if not c.passed), None)
    if broken is None:
        return None
    unit = " dB" if broken.floor.metric == "snr_db" else ""
    value = "n/a" if broken.value is None else f"{broken.value:.4g}{unit}"
    return f"{broken.part}: {value} (floor {broken.floor.describe()})"


def _fits(report: VerifyReport, config: CompressConfig) -> bool:
    out = report.outputs[0]
    drop = _drop(out)
    ok = True
    if config.max_drop is not None:
        ok &= drop is not None and drop <= config.max_drop + 1e-9
    if config.min_cosine is not None:
        ok &= min(o.cosine_mean for o in report.outputs) >= config.min_cosine
    return ok


def _latency(
    models: dict[str, ir.Model],
    samples: Samples,
    rounds: int = 3,
    seconds: float = 0.3,
    max_runs: int = 1000,
) -> dict:
    """Median batch-1 latency per model in ms: the models alternate for ``rounds`` rounds of
    ``seconds`` each, a round ending early after ``max_runs`` runs (a model of microseconds has
    a stable median long before: 3,000 runs of the digits nets take 0.1 s instead of 1.8 s)."""
    import onnxruntime as ort

    batch = next(samples.batches(1))
    sessions = {}
    for key, model in models.items():
        options = session_options("all", threads=2)
        sessions[key] = ort.InferenceSession(
            io.model_bytes(model), options, providers=["CPUExecutionProvider"]
        )
    feeds = {k: {i.name: batch.inputs[i.name] for i in s.get_inputs()} for k, s in sessions.items()}
    times = {k: [] for k in sessions}
    for key, s in sessions.items():
        for _ in range(3):
            s.run(None, feeds[key])
    for _ in range(rounds):
        for key, s in sessions.items():
            end = time.perf_counter() + seconds
            for _ in range(max_runs):
                t0 = time.perf_counter()
                s.run(None, feeds[key])
                times[key].append(time.perf_counter() - t0)
                if t0 >= end:
                    break
    return {k: 1000 * float(np.median(v)) for k, v in times.items()}


@cluster.accepts_engine
def compress(
    model,
    samples: Samples,
    config: CompressConfig | None = None,
    *,
    verify_samples: Samples | None = None,
    source: str | None = None,
    metric=None,
) -> tuple[ir.Model, CompressReport]:
    """Prunes, recovers, quantizes and verifies ``model`` (see the module docstring).

    ``verify_samples``, when given, replaces the held-out part of ``samples`` for every
    accuracy decision and the final parity (the held-out part is still never trained on).
    ``metric`` (``onnxzip.metrics``), when given, replaces the default floors everywhere they
    decide: the pruning search, quantization's guard and the final verdict. ``engine``
    (keyword, see ``onnxzip.quantize``) runs the sample statistics and the guard on Ray.
    """
    config = config or CompressConfig()
    config.validate()
    metric = metrics.as_metric(metric)
    source = source or (str(model) if not isinstance(model, ir.Model) else "model")
    timings: dict[str, float] = {}
    original = io.at_opset(io.load_model(model, name=source), config.target_opset, source)
    shapes = shapes_for_macs(original, samples)  # MACs at the samples' shapes where symbolic
    report = CompressReport(
        source, config, samples.describe(), samples.synthetic, _summary(original, shapes), {}
    )
    current = original
    budget = config.max_drop is not None or config.min_cosine is not None
    # Without an explicit budget the default floors are the budget: a pruning amount whose
    # result no longer holds them is not taken, a milder one is tried.
    # (A fixed ratio asked for is pruned whatever it costs; the final verdict says so.)
    floor_budget = (
        config.floors and not budget and (config.prune is None or config.prune.ratio is None)
    )
    check_samples, check_split = (
        (verify_samples, "all") if verify_samples is not None else (samples, "holdout")
    )

    pruning = config.pruning
    if pruning:
        # A model none of whose groups can lose a channel: no search, no training engine.
        report.prune_skipped = unprunable_because(original, source=source)
        pruning = report.prune_skipped is None
    if pruning and config.recover is not None:
        # Found (or created, on first use) before the stages, so its time is not recovery's.
        t0 = time.perf_counter()
        try:
            engine.current()
        except EngineUnavailable as exc:
            report.recovery_skipped = str(exc)
            logger.warning("compress: no fine-tuning, recovering by reconstruction: %s", exc)
        if time.perf_counter() - t0 > 1.0:
            timings["training engine setup"] = time.perf_counter() - t0
    if pruning:
        if config.prune.ratio is not None:  # a fixed amount: nothing to search
            targets = [None]
        else:
            asked = config.prune.target_macs
            milder = [t for t in MILDER if t > asked] if budget or floor_budget else []
            # the mildest second: a model that cannot hold the budget even at 0.9 of its MACs
            # (a pretrained recognizer on a few hundred samples) costs two attempts, not five
            targets = [asked] + milder[-1:] + milder[:-1]
        search = _Search(
            original,
            samples,
            config,
            source,
            check_samples,
            check_split,
            budget,
            floor_budget,
            metric,
            None
            if report.recovery_skipped is not None or config.recover is None
            else engine.current(),
        )
        # Attempts run in order; on an engine with W workers the next W run at once, each
        # under the recovery mode known when it starts. When an attempt changes the mode
        # (distillation unavailable, or worse than reconstruction) the later ones of its round
        # are taken as reconstructed (what a distilling attempt also computes), or run again
        # where one cannot be: the outcome is the one-at-a-time search's.
        taken = None  # the outcome kept: the first between that fits, else the mildest's
        mildest = targets[1] if len(targets) > 2 else None
        t_search = time.perf_counter()
        i = 0
        width = max(1, cluster.active().workers)
        stop = False
        while i < len(targets) and not stop:
            mode = _mode(config, report)
            batch = targets[i : i + width]
            outcomes = cluster.active().map(
                _attempt,
                [(t, mode) for t in batch],
                search,
                total=len(batch),
                desc="compress: pruning amounts",
                unit="attempt",
            )
            for target, ran in zip(batch, outcomes, strict=False):
                now = _mode(config, report)
                outcome = ran if now == mode else ran.under_refit() if now == "refit" else None
                if outcome is None:
                    break  # ran under the old mode, and nothing of it holds under this one
                i += 1
                for stage, seconds in outcome.seconds.items():
                    timings[stage] = timings.get(stage, 0.0) + seconds
                if outcome.skipped is not None:
                    report.recovery_skipped = outcome.skipped
                    logger.warning(
                        "compress: recovering by reconstruction instead: %s", outcome.skipped
                    )
                if outcome.distilled:
                    # once a distillation did worse than no recovery, later attempts refit
                    report.recovery_not_kept = outcome.not_kept
                out = outcome.check.outputs[0]
                report.attempts.append(
                    Attempt(
                        target,
                        outcome.prune_report.macs_after / max(outcome.prune_report.macs_before, 1),
                        _drop(out),
                        out.cosine_mean,
                        outcome.fits,
                        ratio=config.prune.ratio if target is None else None,
                        failing=_first_failing(outcome.check),
                    )
                )
                if mildest is not None and target == mildest:
                    stop = not outcome.fits  # nothing milder: the others would not fit either
                    taken = outcome if outcome.fits else None
                elif outcome.fits:
                    taken, stop = outcome, True
                if stop:
                    break
            outcomes.close()
        if taken is not None:
            current = taken.pruned
            report.prune, report.recovery = taken.prune_report, taken.recovery
        timings["pruning search"] = time.perf_counter() - t_search
        if taken is None:
            logger.warning(
                "no pruning amount fits the %s: the model is not pruned",
                "accuracy budget" if budget else "default quality floors",
            )

    if config.quantize is not None:
        t0 = time.perf_counter()
        remaining = None
        if config.max_drop is not None:
            used = (
                report.attempts[-1].accuracy_drop
                if report.attempts and report.attempts[-1].fits
                else 0.0
            )
            remaining = max(0.0, config.max_drop - (used or 0.0))
        qconfig = dataclasses.replace(config.stage(config.quantize), max_drop=remaining)
        current, report.quantize = quantize(
            current,
            samples,
            qconfig,
            source=source,
            verify_samples=verify_samples,
            floors=config.floors,
            metric=metric,
        )
        timings["quantize"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    thresholds = Thresholds(
        min_cosine=config.min_cosine,
        max_accuracy_drop=None if config.max_drop is None else config.max_drop / 100,
    )

    def final(model: ir.Model) -> VerifyReport:
        return verify(
            original,
            model,
            check_samples,
            thresholds=thresholds,
            batch_size=config.batch_size,
            split=check_split,
            holdout=config.holdout,
            reference_name=source,
            candidate_name="compressed",
            floors=config.floors,
            metric=metric,
        )

    report.parity = final(current)
    timings["verify"] = time.perf_counter() - t0
    if (
        not report.parity.passed
        and report.prune is not None
        and report.prune.unchanged_because is None
        and config.quantize is not None
        and config.prune.ratio is None  # a fixed ratio asked for is kept whatever it costs
        and (budget or floor_budget)
    ):
        # The pruning held the budget alone, and quantization held it against the pruned
        # model, but both together break it: quantized alone, the model may still hold it.
        t0 = time.perf_counter()
        broke = "; ".join(report.parity.failures)
        alone, alone_report = quantize(
            original,
            samples,
            dataclasses.replace(qconfig, max_drop=config.max_drop),
            source=source,
            verify_samples=verify_samples,
            floors=config.floors,
            metric=metric,
        )
        alone_parity = final(alone)
        timings["quantize"] += time.perf_counter() - t0
        if alone_parity.passed:
            report.pruning_dropped = (
                f"pruned to {report.attempts[-1].macs:.3g} of the MACs and quantized, the model "
                f"broke the {'accuracy budget' if budget else 'quality floors'} ({broke}); "
                "quantized alone it holds them"
            )
            current, report.quantize, report.parity = alone, alone_report, alone_parity
            report.prune = report.recovery = None
            report.recovery_not_kept = None
    report.after = _summary(current, shapes)
    if config.latency:
        t0 = time.perf_counter()
        report.latency_ms = _latency({"original": original, "compressed": current}, samples)
        timings["latency"] = time.perf_counter() - t0
    report.seconds = timings
    return current, report


@dataclass
class _Search:
    """What every attempt of the pruning search needs (one piece on the active engine)."""

    original: ir.Model
    samples: Samples
    config: CompressConfig
    source: str
    check_samples: Samples
    check_split: str
    budget: bool
    floor_budget: bool
    metric: object
    training: engine.Engine | None  # the driver's training engine, for distillation


@dataclass
class _Outcome:
    pruned: ir.Model
    prune_report: PruneReport
    recovery: RecoverReport | None
    check: VerifyReport
    fits: bool
    seconds: dict[str, float]
    skipped: str | None = None  # distillation was refused here: why (then reconstructed)
    distilled: bool = False  # a distillation ran and was compared
    not_kept: str | None = None  # it did worse than no recovery or reconstruction: the numbers
    refit: _Outcome | None = None  # a distillation's attempt: the same amount reconstructed

    def under_refit(self) -> _Outcome | None:
        """What this attempt gives under the "refit" mode, where it ran under "distill": a
        distillation computes the reconstructed alternative to compare with (and a refused one
        reconstructs instead), so an attempt that ran beside the one that changed the mode
        need not run again."""
        if self.skipped is not None:
            return dataclasses.replace(self, skipped=None)
        return self.refit  # None where no distillation ran (its seconds are this attempt's)


def _mode(config: CompressConfig, report: CompressReport) -> str:
    """How an attempt recovers: "distill", "refit" (least squares: distillation was refused,
    or did worse than no recovery) or "none"."""
    if config.recover is None:
        return "none"
    lost = report.recovery_skipped is not None or report.recovery_not_kept is not None
    return "refit" if lost else "distill"


def _attempt(search: _Search, job: tuple) -> _Outcome:
    """One pruning amount: pruned, recovered as ``mode`` says, checked on the held-out samples."""
    target, mode = job
    s, config = search, search.config
    seconds: dict[str, float] = {}
    if mode == "distill" and s.training is not None:
        engine.use(s.training)

    def pruned_at(refit: bool):
        t0 = time.perf_counter()
        result = prune(
            s.original,
            dataclasses.replace(
                config.stage(config.prune),
                ratio=config.prune.ratio if target is None else None,
                target_macs=target,
                reconstruct=refit,
            ),
            samples=_Split(s.samples, config.holdout, "calibration"),
            source=s.source,
        )
        seconds["prune"] = seconds.get("prune", 0.0) + time.perf_counter() - t0
        return result

    def checked(model):
        result = verify(
            s.original,
            model,
            s.check_samples,
            batch_size=config.batch_size,
            split=s.check_split,
            holdout=config.holdout,
            floors=s.floor_budget,
            metric=s.metric if s.floor_budget else None,
        )
        ok = _fits(result, config) if s.budget else result.passed or not s.floor_budget
        return result, ok

    # Without fine-tuning (no engine here, or a model it cannot train) the recovery is the
    # gradient-free least-squares reconstruction of the affected layers.
    pruned, prune_report = pruned_at(mode == "refit")
    before_recovery = pruned
    recovery = None
    skipped = None
    if mode == "distill":
        t0 = time.perf_counter()
        try:
            pruned, recovery = recover(
                s.original,
                pruned,
                s.samples,
                config.stage(config.recover),
            )
        except InputError as exc:
            # No engine, or onnxruntime-training cannot train this model (an op without a
            # gradient or a CPU kernel): pruned again with reconstruction, and the report says
            # so in its main output. (prune keeps what reconstruction needs to itself, so this
            # prunes twice; once per run, as later attempts refit.)
            skipped = str(exc)
            pruned, prune_report = pruned_at(True)
        seconds["recover"] = time.perf_counter() - t0
    check, fits = checked(pruned)
    outcome = _Outcome(pruned, prune_report, recovery, check, fits, seconds, skipped)
    if recovery is not None:
        # Distillation on few samples can do worse on held-out ones than the pruned model it
        # started from, or than the gradient-free reconstruction (a detector's scores traded for
        # its boxes): the best of the three is kept, the report says so, and once distillation
        # has lost, later attempts reconstruct instead.
        outcome.distilled = True
        plain, plain_fits = checked(before_recovery)
        refitted, refit_report = pruned_at(True)
        rcheck, rfits = checked(refitted)
        outcome.refit = _Outcome(refitted, refit_report, None, rcheck, rfits, seconds)
        with_cos = check.outputs[0].cosine_mean
        without_cos, refit_cos = plain.outputs[0].cosine_mean, rcheck.outputs[0].cosine_mean
        best = max((fits, with_cos), (plain_fits, without_cos), (rfits, refit_cos))
        if best != (fits, with_cos):
            outcome.not_kept = (
                f"held-out cosine {with_cos:.4f} with it, {without_cos:.4f} without, "
                f"{refit_cos:.4f} with least-squares reconstruction"
            )
            outcome.recovery = None
            if best == (rfits, refit_cos):
                outcome.pruned, outcome.check, outcome.fits = refitted, rcheck, rfits
                outcome.prune_report = refit_report
            else:
                outcome.pruned, outcome.check, outcome.fits = before_recovery, plain, plain_fits
    return outcome


class _Split(Samples):
    """A view of one split of ``samples`` as a Samples object of its own."""

    def __init__(self, samples: Samples, holdout: float, split: str):
        super().__init__(samples.specs)
        self.inner, self.holdout, self.split = samples, holdout, split
        self.synthetic, self.has_labels = samples.synthetic, samples.has_labels

    def describe(self) -> str:
        return f"{self.inner.describe()} ({self.split} split)"

    def chunks(self):
        return self.inner.batches(256, self.split, self.holdout)
