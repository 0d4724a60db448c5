"""``onnxzip prune``: its options and its run."""

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
    emit,
    engine_options,
    fit_memory,
    fit_synthetic,
    floor_option,
    fraction,
    metric_of,
    output_options,
    run_options,
    stateful,
    write_result,
)
from onnxzip.errors import (
    EXIT_OK,
    EXIT_PARITY,
    InputError,
)
from onnxzip.pruning.config import PruneConfig
from onnxzip.recover import RecoverConfig

logger = logging.getLogger("onnxzip")

# PruneConfig's fields that are options of this command, besides how much
PRUNING = ["criterion", "scope", "max_group_ratio", "round_to", "exclude"]


def register(sub) -> None:
    p = sub.add_parser(
        "prune", help="remove whole channels: smaller weights and shapes, a dense model"
    )
    p.add_argument("model", type=Path, metavar="MODEL")
    output_options(p)
    how = p.add_mutually_exclusive_group(required=True)
    add_config_options(p, how, PruneConfig, ["ratio", "target_macs"])
    add_config_options(p, p, PruneConfig, PRUNING)
    p.add_argument(
        "--data",
        type=Path,
        metavar="D",
        help="samples: dead channels go for free, biases absorb what is removed, parity reported",
    )
    p.add_argument("--synthetic", type=int, metavar="N", help="verify on N random samples instead")
    run_options(p)
    p.add_argument("--seed", type=int, default=0, help="seed for --synthetic (default 0)")
    add_config_options(p, p, PruneConfig, ["reconstruct"])
    r = p.add_argument_group("recovery (distillation from the original, no labels needed)")
    add_config_options(
        p,
        r,
        RecoverConfig,
        ["steps", "learning_rate", "temperature"],
        defaults={"steps": 0},
    )
    r.add_argument(
        "--holdout",
        type=fraction,
        default=0.2,
        metavar="F",
        help="fraction of --data never trained on, for the parity report (0.2)",
    )
    floor_option(p)
    engine_options(p)
    cluster_option(p)
    common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from onnxzip import io, runtime
    from onnxzip.data import input_specs, open_samples
    from onnxzip.pruning import prune
    from onnxzip.verify import REFERENCE_BYTES, ReferenceOutputs

    if args.data is not None and args.synthetic is not None:
        raise InputError("give either --data or --synthetic, not both")
    metric = metric_of(args)  # a bad --metric is refused before any work
    model = io.at_opset(
        io.load_model(args.model, name=str(args.model)), args.target_opset, str(args.model)
    )
    samples = None
    memory = ""
    if args.data is not None or args.synthetic is not None:
        samples = open_samples(
            input_specs(model), args.data, args.synthetic, args.seed, batch_axes=batch_axes(args)
        )
        fit_synthetic(model, samples)
        samples = stateful(model, samples, args, str(args.model))
        memory = fit_memory(model, samples, args)
    config = PruneConfig(
        **config_kwargs(PruneConfig, args, ["ratio", "target_macs", *PRUNING, "reconstruct"]),
        batch_size=args.batch_size,
    )
    if args.reconstruct and samples is None:
        raise InputError("--reconstruct needs --data (or --synthetic) to fit on")
    reference_outputs = None
    if (
        samples is not None
        and not args.steps
        and not getattr(samples, "pairs", None)  # a stream: each model on its own state
        and runtime.feeds_weights(model)
    ):
        # A large model: its outputs now, while it is the only model in memory (the pruning
        # decision and the final verification both compare against them)
        reference_outputs = ReferenceOutputs(
            model, samples, args.batch_size, name=str(args.model), max_bytes=REFERENCE_BYTES
        )
        io.drop_resident_pages(model)
    pruned, report = prune(
        model, config, samples=samples, source=str(args.model), reference_outputs=reference_outputs
    )
    text = report.format()
    split, holdout = "all", 0.0
    if args.steps and samples is None:
        raise InputError("--recover-steps needs --data (or --synthetic) to train on")
    if args.steps and report.unchanged_because is None:
        from onnxzip.recover import recover

        recovery = RecoverConfig(
            **config_kwargs(RecoverConfig, args, ["steps", "learning_rate", "temperature"]),
            batch_size=args.batch_size,
            holdout=args.holdout,
        )
        pruned, report.recovery = recover(model, pruned, samples, recovery)
        r = report.recovery
        text += f"\n\nrecovery    {r.describe()}, {r.seconds:.1f} s"
        split, holdout = ("holdout", args.holdout) if args.holdout > 0 else ("all", 0.0)
    if report.unchanged_because is not None:
        text += (
            f"\n\nNOTHING PRUNED: {report.unchanged_because}; the model written is the input "
            "model (no parity verdict)"
        )
    elif samples is not None:
        from onnxzip.verify import verify

        report.parity = verify(
            model,
            pruned,
            samples,
            batch_size=args.batch_size,
            split=split,
            holdout=holdout,
            reference_name=str(args.model),
            candidate_name=str(args.output),
            floors=not args.no_floors,
            metric=metric,
            reference_outputs=reference_outputs,
        )
        text += "\n\n" + report.parity.format()

    passed = report.parity is None or report.parity.passed
    written = write_result(pruned, args, passed)
    emit(report, args, memory + text + f"\n\n{written}")
    return EXIT_OK if passed else EXIT_PARITY
