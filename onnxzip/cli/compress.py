"""``onnxzip compress``: its options and its run."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from onnxzip.cli.options import (
    batch_axes,
    batch_axis_option,
    cluster_option,
    common,
    emit,
    engine_options,
    fit_memory,
    floor_option,
    fraction,
    memory_option,
    metric_of,
    output_options,
    save,
    state_option,
    stateful,
)
from onnxzip.errors import (
    EXIT_OK,
    EXIT_PARITY,
)

logger = logging.getLogger("onnxzip")


def register(sub) -> None:
    p = sub.add_parser(
        "compress", help="prune, recover, quantize and verify in one go (the main job)"
    )
    p.add_argument("model", type=Path, metavar="MODEL")
    output_options(p)
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        metavar="D",
        help=".npz keyed by input name (optional 'labels'), or a folder of them",
    )
    p.add_argument(
        "--batch-size", type=int, default=32, metavar="B", help="samples per run (default 32)"
    )
    memory_option(p)
    batch_axis_option(p)
    state_option(p)
    p.add_argument(
        "--holdout",
        type=fraction,
        default=0.2,
        metavar="F",
        help="fraction of --data no stage trains or calibrates on; every accuracy decision and the "
        "final parity use it (0.2)",
    )
    c = p.add_argument_group("stages")
    prune_group = c.add_mutually_exclusive_group()
    prune_group.add_argument(
        "--target-macs",
        type=float,
        default=0.5,
        metavar="F",
        help="prune to at most F x the MACs (default 0.5)",
    )
    prune_group.add_argument(
        "--prune",
        type=float,
        metavar="R",
        dest="prune_ratio",
        help="prune this fraction of every channel group instead of a MACs target",
    )
    prune_group.add_argument("--no-prune", action="store_true", help="skip pruning")
    c.add_argument(
        "--criterion",
        default="l1",
        help="pruning criterion (l1, l2, bn, taylor, fisher, grad-stability)",
    )
    c.add_argument(
        "--recover-steps",
        type=int,
        default=500,
        metavar="N",
        help="distillation steps after pruning (default 500; 0 skips recovery)",
    )
    c.add_argument(
        "--quantize",
        choices=["int8", "dynamic", "none"],
        default="int8",
        help="static int8 QDQ (default), dynamic (transformers) or none",
    )
    c.add_argument(
        "--calibration", choices=["minmax", "percentile", "entropy", "mse"], default="minmax"
    )
    c.add_argument(
        "--reduce-range",
        choices=["auto", "on", "off"],
        default="auto",
        help="pair-safe int8 weights for x86 CPUs without VNNI (see quantize --help)",
    )
    b = p.add_argument_group(
        "accuracy budget (the pruning amount is searched; exit 1 if it cannot hold)"
    )
    b.add_argument(
        "--max-drop", type=float, metavar="X", help="at most X top-1 points below the original"
    )
    b.add_argument("--min-cosine", type=float, metavar="C", help="at least this mean output cosine")
    p.add_argument(
        "--verify-data",
        type=Path,
        metavar="V",
        help="samples for every accuracy decision and the final parity "
        "(default: the held-out part of --data)",
    )
    p.add_argument(
        "--no-latency", action="store_true", help="skip the latency measurement in the report"
    )
    floor_option(p)
    engine_options(p)
    cluster_option(p)
    common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from onnxzip import io
    from onnxzip.compress import CompressConfig, compress
    from onnxzip.data import input_specs, open_samples

    model = io.load_model(args.model, name=str(args.model))
    samples = open_samples(input_specs(model), args.data, batch_axes=batch_axes(args))
    config = CompressConfig(
        target_macs=None if args.no_prune or args.prune_ratio is not None else args.target_macs,
        ratio=args.prune_ratio,
        criterion=args.criterion,
        recover_steps=args.recover_steps,
        quantize=args.quantize,
        calibration=args.calibration,
        reduce_range=args.reduce_range,
        max_drop=args.max_drop,
        min_cosine=args.min_cosine,
        holdout=args.holdout,
        batch_size=args.batch_size,
        latency=not args.no_latency,
        target_opset=args.target_opset,
        floors=not args.no_floors,
    )
    metric = metric_of(args)
    verify_samples = None
    if args.verify_data is not None:
        verify_samples = open_samples(
            input_specs(model), args.verify_data, batch_axes=batch_axes(args)
        )
    samples = stateful(model, samples, args, str(args.model))
    verify_samples = stateful(model, verify_samples, args, str(args.model))
    memory = fit_memory(model, samples, args, verify_samples)
    compressed, report = compress(
        model, samples, config, verify_samples=verify_samples, source=str(args.model), metric=metric
    )
    save(compressed, args)
    emit(report, args, memory + report.format() + f"\n\nwrote {args.output}")
    return EXIT_OK if report.parity.passed else EXIT_PARITY
