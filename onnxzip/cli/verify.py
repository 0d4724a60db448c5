"""``onnxzip verify``: its options and its run."""

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
    fit_synthetic,
    metric_of,
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
        "verify", help="compare a candidate model's outputs with a reference's in onnxruntime"
    )
    p.add_argument("reference", type=Path, metavar="REFERENCE")
    p.add_argument("candidate", type=Path, metavar="CANDIDATE")
    data_options(p)
    threshold_options(p)
    d = p.add_argument_group("debugging")
    d.add_argument(
        "--per-node",
        action="store_true",
        help="compare every intermediate tensor both models share; name the first and worst diverging node",
    )
    d.add_argument(
        "--per-node-samples",
        type=int,
        default=32,
        metavar="N",
        help="samples for --per-node (default 32)",
    )
    d.add_argument(
        "--node-tolerance",
        type=float,
        default=1e-4,
        metavar="T",
        help="relative error above which a tensor diverges (default 1e-4)",
    )
    d.add_argument(
        "--optimization",
        choices=["none", "basic", "extended", "all"],
        default="all",
        help="onnxruntime graph optimisation for the comparison (default all, as served)",
    )
    cluster_option(p)
    common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from onnxzip import io
    from onnxzip.data import input_specs, open_samples
    from onnxzip.verify import verify

    if args.per_node_samples < 1:
        raise InputError("--per-node-samples must be at least 1")
    reference = io.load_model(args.reference, name=str(args.reference))
    samples = open_samples(
        input_specs(reference), args.data, args.synthetic, args.seed, batch_axes=batch_axes(args)
    )
    fit_synthetic(reference, samples)
    samples = stateful(reference, samples, args, str(args.reference))
    memory = fit_memory(reference, samples, args)
    thresholds = thresholds_of(args)
    report = verify(
        reference,
        args.candidate,
        samples,
        thresholds=thresholds,
        batch_size=args.batch_size,
        per_node=args.per_node,
        per_node_samples=args.per_node_samples,
        node_tolerance=args.node_tolerance,
        optimization=args.optimization,
        split="all" if args.holdout is None else "holdout",
        holdout=args.holdout or 0.0,
        reference_name=str(args.reference),
        candidate_name=str(args.candidate),
        floors=not args.no_floors,
        metric=metric_of(args),
    )
    emit(report, args, memory + report.format())
    return EXIT_OK if report.passed else EXIT_PARITY
