"""``quantize``: prepare, plan, calibrate, insert, correct, guard and verify (the steps are
described in the package docstring); the decisions between candidates (SmoothQuant, bias
correction, the guards, the dynamic fallback) are taken on held-out samples calibration never
saw, against reference outputs computed once."""

from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

import onnx_ir as ir

from onnxzip import io, passes
from onnxzip import metrics as metrics_mod
from onnxzip.data import Samples
from onnxzip.engine import cluster
from onnxzip.errors import InputError, NoSamplesError
from onnxzip.quantize import smooth
from onnxzip.quantize.bias_correction import correct_biases
from onnxzip.quantize.builder import _Builder
from onnxzip.quantize.config import QuantizeConfig
from onnxzip.quantize.guard import (
    _dynamic_fallback,
    _dynamic_guarded,
    _Evaluator,
    _floor_guard,
    _guard,
)
from onnxzip.quantize.report import QuantizeReport, nothing_quantized_because
from onnxzip.runtime import int8_pairs_saturate
from onnxzip.verify import (
    Thresholds,
    verify,
)

logger = logging.getLogger(__name__)


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
            exclude=config.exclude.matches,
        )
        timings["smooth"] = time.perf_counter() - t_smooth
    wanted = config.bias_correction == "on" or (config.bias_correction == "auto" and verifying)

    def new_builder(model: ir.Model) -> _Builder:
        made = _Builder(model, samples, config, holdout)
        made.collect_means = config.mode == "static" and wanted
        made.anticipate_guard = config.mode == "static" and config.guarded
        return made

    builder = new_builder(prepared)
    # the reference's outputs on the verification samples, computed while calibration runs
    reference = _Reference(original, verify_samples or samples, split, config, verifying)
    timings["prepare"] = time.perf_counter() - t0 - timings.get("smooth", 0.0)

    t0 = time.perf_counter()
    built = builder.build()
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
            evaluator = reference.get()
            unsmoothed = new_builder(plain)
            candidate = unsmoothed.build()
            with_snr = evaluator.score(built.model, config)[1]
            without_snr = evaluator.score(candidate.model, config)[1]
            if without_snr >= with_snr:
                builder, built = unsmoothed, candidate
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
            builder.prepared, built.model, built.plan, samples, config, holdout, builder.means
        )
        layers = len(biases)
        if layers:
            builder.biases = biases
            candidate = builder.build()
            use = config.bias_correction == "on"
            if config.bias_correction == "auto" and verifying:
                evaluator = evaluator or reference.get()
                before = evaluator.score(built.model, config)[1]
                after = evaluator.score(candidate.model, config)[1]
                use = after > before
                bias_note = (
                    f"{'applied' if use else 'not applied'}: output SNR {before:.2f} dB without, "
                    f"{after:.2f} dB with, on the verification samples ({layers} layers)"
                )
            elif use:
                bias_note = f"applied to {layers} layers"
            if use:
                built = candidate
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
        evaluator = evaluator or reference.get()
        built, guard_report = _guard(builder, built, evaluator, config)
        timings["guard"] = time.perf_counter() - t0

    report = QuantizeReport(
        config=config,
        source=source,
        data=samples.describe(),
        verified_on=verify_samples.describe() if verify_samples is not None else None,
        synthetic=samples.synthetic,
        calibration_samples=builder.calibrated,
        prepared=prepared_info,
        weight_bytes_before=weight_before,
        seconds=timings,
        **built.fields(),
        guard=guard_report,
        bias_correction=bias_note,
        smooth_quant=smooth_note,
        weight_range=weight_range,
        weight_format=builder.weight_format,
        subgraph_nodes=builder.subgraph_nodes,
    )
    if verifying:  # also when nothing was quantized: it checks that the outputs can be compared
        t0 = time.perf_counter()
        evaluator = evaluator or reference.started()

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
                candidate_outputs=evaluator.outputs_of(model) if evaluator is not None else None,
            )

        report.parity = final_verify(built.model)
        timings["verify"] = time.perf_counter() - t0
        floors_failed = report.parity.floors is not None and not all(
            c.passed for c in report.parity.floors
        )
        if (
            floors_failed
            and config.floor_guard
            and not config.guarded
            and built.plan.quantized_nodes
        ):
            # Defaults that keep the task: dynamic int8 when it holds the floors (recognizers,
            # transformers: static activation ranges are what break them), else the layers that
            # break the floors go back to float.
            t0 = time.perf_counter()
            # the reference outputs do not depend on the metric: reuse them
            evaluator = evaluator or reference.get()
            evaluator.metric = metric
            failed = "; ".join(c.describe() for c in report.parity.floors if not c.passed)
            dynamic = _dynamic_fallback(plain, samples, config, holdout, evaluator)
            if dynamic is not None:
                builder, built = dynamic
                report.fallback = (
                    f"dynamic int8: static int8 broke the default floors ({failed}), dynamic "
                    "int8 holds every floor on the held-out samples"
                )
                report.config = builder.config
            else:
                built, report.guard = _floor_guard(builder, built, evaluator, config)
                # The guard kept every static layer in float, or most of them: dynamic int8
                # with its own guard may keep more weights int8 (a text recognizer whose every
                # static layer breaks a whole-sequence floor, while most of its MatMuls do
                # not). It is taken when it holds the floors with fewer weight bytes (more of
                # the same model's weights stored as 8-bit codes).
                guard = report.guard
                mostly_float = guard is not None and 2 * len(guard.kept_float) > guard.candidates
                guarded = (
                    _dynamic_guarded(plain, samples, config, holdout, evaluator)
                    if not built.plan.quantized_nodes or mostly_float
                    else None
                )
                if guarded is not None and (
                    not built.plan.quantized_nodes
                    or io.weights_nbytes(guarded[1].built.model) < io.weights_nbytes(built.model)
                ):
                    static_kept = (
                        "kept every layer in float"
                        if not built.plan.quantized_nodes
                        else f"kept {len(guard.kept_float)} of {guard.candidates} layers in "
                        "float, with more weight bytes than dynamic int8 keeps"
                    )
                    builder, (built, report.guard) = guarded
                    report.fallback = (
                        f"dynamic int8: static int8 broke the default floors ({failed}) and its "
                        f"accuracy guard {static_kept}; dynamic int8 holds them with the layers "
                        "its own guard keeps in float"
                    )
                    report.config = builder.config
            for name, value in built.fields().items():
                setattr(report, name, value)
            timings["guard"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            report.parity = final_verify(built.model)
            timings["verify"] += time.perf_counter() - t0
    if not report.quantized_ops:
        report.nothing_because = nothing_quantized_because(
            prepared, report.config.mode, report.kept_float
        )
    return built.model, report


# Models up to this many bytes of weights get their reference outputs computed in a thread
# beside calibration (two sessions alive at once); larger ones compute them when needed.
REFERENCE_THREAD_BYTES = 256 << 20


class _Reference:
    """The guard's evaluator (reference outputs on the verification samples), made once.

    When verifying a model of at most ``REFERENCE_THREAD_BYTES`` of weights, it is made in a
    background thread from a clone of the original (onnxruntime releases the GIL while it
    builds and runs sessions), so the reference session and runs overlap calibration's graph
    surgery, Q/DQ insertion and bias correction (ResNet-50: 0.6 s of a 6 s run). The outputs
    are the same bits either way: the same model, samples and session options."""

    def __init__(self, original: ir.Model, data: Samples, split: str, config, verifying: bool):
        self._args = (original, data, split, config)
        self._value: _Evaluator | None = None
        self._future: Future | None = None
        if verifying and io.weights_nbytes(original) <= REFERENCE_THREAD_BYTES:
            # a clone: a session's making swaps the original's initializers for a moment
            args = (original.clone(), data, split, config)
            pool = ThreadPoolExecutor(1, thread_name_prefix="onnxzip-reference")
            self._future = pool.submit(_Evaluator, *args)
            pool.shutdown(wait=False)

    def get(self) -> _Evaluator:
        """The evaluator, waiting for the thread (its errors raised here) or made now."""
        if self._value is None:
            if self._future is not None:
                self._value = self._future.result()
            else:
                self._value = _Evaluator(*self._args)
        return self._value

    def started(self) -> _Evaluator | None:
        """The evaluator when it was made or is being made (then waited for), else None."""
        if self._value is None and self._future is not None:
            try:
                return self.get()
            except Exception:  # the final verification runs its own reference and says why
                self._future = None
                return None
        return self._value


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
        return model, dataclasses.replace(config, exclude=config.exclude.with_types("MatMul"))
    logger.info("%s: quantizing at opset 20 (no QLinearMatMul kernel for opset 21)", source)
    return converted, config


def _both_splits_hold_samples(samples: Samples, batch_size: int, holdout: float) -> bool:
    for split in ("holdout", "calibration"):
        try:
            next(iter(samples.batches(batch_size, split, holdout)))
        except NoSamplesError:
            return False
    return True
