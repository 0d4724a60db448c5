"""``onnxzip quantize``: its options and its run."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from onnxzip.cli.options import (
    add_config_options,
    batch_axes,
    cluster_option,
    common,
    config_kwargs,
    data_options,
    emit,
    fit_memory,
    fit_synthetic,
    metric_of,
    output_options,
    stateful,
    threshold_options,
    thresholds_of,
    write_result,
)
from onnxzip.errors import (
    EXIT_OK,
    EXIT_PARITY,
)

logger = logging.getLogger("onnxzip")

# QuantizeConfig's fields that are options of this command, in --help's order
QUANTIZATION = [
    "mode",
    "calibration",
    "percentile",
    "bins",
    "per_channel",
    "activation_type",
    "symmetric_activations",
    "exclude",
    "quantize_softmax",
    "floor_guard",
    "preset",
    "smooth_quant",
    "smooth_alpha",
    "bias_correction",
    "reduce_range",
    "max_drop",
]
WEIGHT_ONLY = [
    "weight_bits",
    "block_size",
    "weight_zero_point",
    "weight_format",
    "accuracy_level",
    "weight_method",
]


def register(sub) -> None:
    p = sub.add_parser(
        "quantize", help="int8 QDQ quantization calibrated on samples, verified on held-out ones"
    )
    p.add_argument("model", type=Path, metavar="MODEL")
    output_options(p)
    data_options(p)
    p.add_argument(
        "--verify-data",
        type=Path,
        metavar="V",
        help="verify on these samples instead of a held-out part of --data",
    )
    from onnxzip.quantize.config import QuantizeConfig

    add_config_options(p, p.add_argument_group("quantization"), QuantizeConfig, QUANTIZATION)
    add_config_options(
        p, p.add_argument_group("weight-only (--mode weight-only)"), QuantizeConfig, WEIGHT_ONLY
    )
    threshold_options(p)
    cluster_option(p)
    common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from onnxzip import io
    from onnxzip.data import input_specs, open_samples
    from onnxzip.quantize import QuantizeConfig, quantize

    holdout = QuantizeConfig.holdout if args.holdout is None else args.holdout
    metric = metric_of(args)  # a bad --metric is refused before any work
    model = io.load_model(args.model, name=str(args.model))
    specs = input_specs(model)
    samples = open_samples(specs, args.data, args.synthetic, args.seed, batch_axes=batch_axes(args))
    fit_synthetic(model, samples)
    verify_samples = (
        open_samples(specs, args.verify_data, batch_axes=batch_axes(args))
        if args.verify_data is not None
        else None
    )
    samples = stateful(model, samples, args, str(args.model))
    verify_samples = stateful(model, verify_samples, args, str(args.model))
    memory = fit_memory(model, samples, args, verify_samples)
    config = QuantizeConfig(
        **config_kwargs(QuantizeConfig, args, QUANTIZATION + WEIGHT_ONLY),
        batch_size=args.batch_size,
        holdout=holdout,
        min_cosine=args.min_cosine,
        target_opset=args.target_opset,
    )
    quantized, report = quantize(
        model,
        samples,
        config,
        verify_samples=verify_samples,
        thresholds=thresholds_of(args),
        source=str(args.model),
        floors=not args.no_floors,
        metric=metric,
    )
    passed = report.parity is None or report.parity.passed
    written = write_result(quantized, args, passed)
    emit(report, args, memory + report.format() + f"\n\n{written}")
    return EXIT_OK if passed else EXIT_PARITY
