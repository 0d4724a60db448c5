"""``onnxzip quantize``: its options and its run."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from onnxzip.cli.options import (
    batch_axes,
    cluster_option,
    common,
    data_options,
    emit,
    fit_memory,
    metric_of,
    output_options,
    save,
    stateful,
    threshold_options,
    thresholds_of,
)
from onnxzip.errors import (
    EXIT_OK,
    EXIT_PARITY,
    InputError,
)

logger = logging.getLogger("onnxzip")


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
    q = p.add_argument_group("quantization")
    q.add_argument(
        "--calibration",
        choices=["minmax", "percentile", "entropy", "mse"],
        default="minmax",
        help="how activation ranges are chosen (default minmax)",
    )
    q.add_argument(
        "--percentile",
        type=float,
        default=99.99,
        metavar="P",
        help="for --calibration percentile (99.99)",
    )
    q.add_argument(
        "--bins", type=int, default=2048, metavar="B", help="histogram bins per sign (2048)"
    )
    q.add_argument(
        "--per-tensor",
        action="store_true",
        help="one weight scale per tensor instead of per channel",
    )
    q.add_argument(
        "--activation-type",
        choices=["uint8", "int8"],
        default="uint8",
        help="activation codes (uint8)",
    )
    q.add_argument(
        "--symmetric-activations", action="store_true", help="zero-point 0 (int8) or 128 (uint8)"
    )
    q.add_argument(
        "--exclude",
        nargs="+",
        default=[],
        metavar="NAME_OR_OP",
        help="node names or op types to keep in float",
    )
    q.add_argument("--quantize-softmax", action="store_true", help="also quantize Softmax")
    q.add_argument(
        "--no-floor-guard",
        action="store_true",
        help="when the result breaks a default floor, write it anyway (exit 1) instead of keeping "
        "the layers that break it in float",
    )
    q.add_argument(
        "--preset",
        choices=["auto", "transformer", "default"],
        default="auto",
        help="static int8 layout: transformer quantizes only MatMul/Gemm weights and their "
        "inputs (outputs, attention, softmax and normalisation stay float) with SmoothQuant; "
        "default every op with an int8 kernel; auto picks transformer for graphs with softmax "
        "attention, a normalisation and more weight MatMuls than convolutions (default)",
    )
    q.add_argument(
        "--smooth-quant",
        choices=["auto", "on", "off"],
        default="auto",
        help="SmoothQuant: per-channel factors move activation outliers into the MatMul "
        "weights (exact in float); auto: on in the transformer preset (default)",
    )
    q.add_argument(
        "--smooth-alpha",
        type=float,
        metavar="A",
        help="SmoothQuant strength in [0, 1] (default: searched per MatMul input from the "
        "quantized product's error on the calibration samples)",
    )
    q.add_argument(
        "--bias-correction",
        choices=["auto", "on", "off"],
        default="auto",
        help="empirical per-channel bias correction from the calibration samples; auto keeps it when "
        "the held-out output SNR improves (default)",
    )
    q.add_argument(
        "--reduce-range",
        choices=["auto", "on", "off"],
        default="auto",
        help="on: weight scales chosen so that onnxruntime's 16-bit sums of two products on x86 "
        "CPUs without VNNI cannot saturate (costs at most one bit); auto: on when this machine is "
        "such a CPU (default); use on when the serving machines may be",
    )
    q.add_argument(
        "--mode",
        choices=["static", "dynamic", "weight-only"],
        default="static",
        help="static: calibrated QDQ (default); dynamic: int8 MatMul/Gemm weights, activations "
        "quantized at run time (transformers); weight-only: block-wise int4/int8 MatMul "
        "weights, float activations (decoders, served as MatMulNBits)",
    )
    w = p.add_argument_group("weight-only (--mode weight-only)")
    w.add_argument("--weight-bits", type=int, choices=[4, 8], default=4, help="default 4")
    w.add_argument(
        "--block-size",
        type=int,
        choices=[16, 32, 64, 128, 256],
        default=32,
        help="rows of the weight per scale (default 32)",
    )
    w.add_argument(
        "--weight-zero-point",
        action="store_true",
        help="asymmetric blocks, a zero point each (default symmetric)",
    )
    w.add_argument(
        "--weight-format",
        choices=["auto", "qdq", "nbits"],
        default="auto",
        help="qdq: DequantizeLinear with block_size (standard ONNX, opset 21+; onnxruntime fuses "
        "it into MatMulNBits); nbits: com.microsoft MatMulNBits directly; auto (default): qdq at "
        "opset 21+, else nbits",
    )
    w.add_argument(
        "--accuracy-level",
        type=int,
        choices=[0, 1, 2, 3, 4],
        default=4,
        help="MatMulNBits compute (nbits format): 4 (default) int8 inside the kernel, as "
        "onnxruntime picks for the fused qdq form; 0 float",
    )
    w.add_argument(
        "--weight-method",
        choices=["rtn", "mse"],
        default="mse",
        help="rtn: round to nearest; mse (default): each block's range clipped to minimise "
        "the output error weighted by the inputs' E[x^2] on the samples",
    )
    q.add_argument(
        "--max-drop",
        type=float,
        metavar="X",
        help="accuracy guard: keep the most harmful layers in float until top-1 drops by at most X points "
        "(against labels, else agreement with the original); --min-cosine works as a guard target too",
    )
    threshold_options(p)
    cluster_option(p)
    common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from onnxzip import io
    from onnxzip.data import input_specs, open_samples
    from onnxzip.quantize import QuantizeConfig, quantize

    holdout = 0.2 if args.holdout is None else args.holdout
    if holdout >= 1:
        raise InputError("--holdout must be below 1")
    metric = metric_of(args)  # a bad --metric is refused before any work
    model = io.load_model(args.model, name=str(args.model))
    specs = input_specs(model)
    samples = open_samples(specs, args.data, args.synthetic, args.seed, batch_axes=batch_axes(args))
    verify_samples = (
        open_samples(specs, args.verify_data, batch_axes=batch_axes(args))
        if args.verify_data is not None
        else None
    )
    samples = stateful(model, samples, args, str(args.model))
    verify_samples = stateful(model, verify_samples, args, str(args.model))
    memory = fit_memory(model, samples, args, verify_samples)
    config = QuantizeConfig(
        calibration=args.calibration,
        percentile=args.percentile,
        bins=args.bins,
        per_channel=not args.per_tensor,
        activation_type=args.activation_type,
        symmetric_activations=args.symmetric_activations,
        exclude=tuple(args.exclude),
        quantize_softmax=args.quantize_softmax,
        batch_size=args.batch_size,
        holdout=holdout,
        max_drop=args.max_drop,
        mode=args.mode,
        weight_bits=args.weight_bits,
        block_size=args.block_size,
        weight_zero_point=args.weight_zero_point,
        weight_format=args.weight_format,
        weight_method=args.weight_method,
        accuracy_level=args.accuracy_level,
        bias_correction=args.bias_correction,
        min_cosine=args.min_cosine,
        reduce_range=args.reduce_range,
        target_opset=args.target_opset,
        floor_guard=not args.no_floor_guard,
        preset=args.preset,
        smooth_quant=args.smooth_quant,
        smooth_alpha=args.smooth_alpha,
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
    save(quantized, args)
    emit(report, args, memory + report.format() + f"\n\nwrote {args.output}")
    return EXIT_OK if report.parity is None or report.parity.passed else EXIT_PARITY
