"""``onnxzip stats``: its options and its run."""

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
    engine_options,
    fit_memory,
    fit_synthetic,
    write_npz,
)
from onnxzip.errors import (
    EXIT_OK,
    InputError,
)

logger = logging.getLogger("onnxzip")


def register(sub) -> None:
    p = sub.add_parser(
        "stats", help="per-channel gradient statistics from onnxruntime training artifacts"
    )
    p.add_argument("model", type=Path, metavar="MODEL")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        metavar="STATS.npz",
        help="where to write the statistics",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="allow OUT to be the input model's path"
    )
    data_options(p)
    p.add_argument(
        "--no-labels",
        action="store_true",
        help="ignore 'labels' in the data: use the model's own predictions as targets",
    )
    engine_options(p)
    cluster_option(p)
    common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from onnxzip import io
    from onnxzip.data import input_specs, open_samples
    from onnxzip.gradients import gradient_statistics
    from onnxzip.pruning import prepared_groups
    from onnxzip.report import table

    if args.output.suffix != ".npz":
        raise InputError(f"{args.output}: statistics are written as .npz")
    model = io.load_model(args.model, name=str(args.model))
    samples = open_samples(
        input_specs(model), args.data, args.synthetic, args.seed, batch_axes=batch_axes(args)
    )
    fit_synthetic(model, samples)
    fit_memory(model, samples, args)
    work, groups = prepared_groups(model)
    stats, report = gradient_statistics(
        work, groups, samples, batch_size=args.batch_size, use_labels=not args.no_labels
    )
    arrays = {}
    rows = []
    for g in groups:
        s = stats.get(g.id)
        if s is None:
            continue
        arrays[f"group{g.id}.taylor"] = s.score("taylor")
        arrays[f"group{g.id}.fisher"] = s.score("fisher")
        arrays[f"group{g.id}.grad_mean"] = s.mean
        arrays[f"group{g.id}.grad_std"] = s.std
        arrays[f"group{g.id}.batches"] = np.array(s.batches)
        taylor = s.score("taylor")
        rows.append(
            [
                g.id,
                ", ".join(g.roots[:3]),
                g.size,
                float(taylor.min()),
                float(np.median(taylor)),
                float(taylor.max()),
            ]
        )
    write_npz(args.output, arrays)
    text = (
        f"loss        {report.loss}\nsamples     {report.samples} in {report.batches} batches"
        f"{' (SYNTHETIC)' if samples.synthetic else ''}\ntime        {report.seconds:.2f} s\n\n"
        + table(
            ["group", "producers", "channels", "taylor min", "taylor median", "taylor max"], rows
        )
        + f"\n\nwrote {args.output}"
    )
    emit(report, args, text)
    return EXIT_OK
