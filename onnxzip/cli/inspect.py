"""``onnxzip inspect``: its options and its run."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from onnxzip.cli.options import (
    batch_axes,
    common,
    emit,
)
from onnxzip.errors import (
    EXIT_OK,
    InputError,
)

logger = logging.getLogger("onnxzip")


def register(sub) -> None:
    p = sub.add_parser(
        "inspect", help="opsets, inputs/outputs, op histogram, parameters, size, MACs"
    )
    p.add_argument("model", type=Path, metavar="MODEL")
    p.add_argument(
        "--per-node", action="store_true", help="list MACs of every Conv/Gemm/MatMul node"
    )
    p.add_argument(
        "--groups",
        action="store_true",
        help="list the coupled-channel groups pruning would see, and what blocks each blocked one",
    )
    shapes = p.add_mutually_exclusive_group()
    shapes.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=DIMS",
        help="count MACs at this input shape (e.g. image=1x3x736x736; repeat per input) where "
        "the model's own dimensions are symbolic",
    )
    shapes.add_argument(
        "--data",
        type=Path,
        metavar="D",
        help="count MACs at the input shapes of the first sample of D",
    )
    common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from onnxzip.analysis import inspect_model, sample_shapes

    shapes = {}
    for item in args.input_shape:
        name, _, dims = item.partition("=")
        try:
            shapes[name] = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            raise InputError(
                f"--input-shape '{item}': expected NAME=DIMS with DIMS like 1x3x224x224"
            ) from None
        if not name or any(d < 1 for d in shapes[name]):
            raise InputError(f"--input-shape '{item}': a name and positive dimensions are needed")
    if args.data is None:
        report = inspect_model(args.model, input_shapes=shapes or None)
    else:  # the model is loaded once: for its inputs' specs and for the report
        from onnxzip import io
        from onnxzip.data import input_specs, open_samples

        model = io.load_model(args.model, name=str(args.model))
        shapes = sample_shapes(
            open_samples(input_specs(model), args.data, batch_axes=batch_axes(args))
        )
        report = inspect_model(model, source=str(args.model), input_shapes=shapes)
        report.file_bytes = io.file_size(args.model)
    text = report.format(per_node=args.per_node)
    if args.groups:
        from onnxzip.pruning import analyse, format_groups

        report.groups = analyse(args.model)
        text += "\n\n" + format_groups(report.groups)
    emit(report, args, text)
    return EXIT_OK
