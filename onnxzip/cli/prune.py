"""``onnxzip prune``: its options and its run."""

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
    InputError,
)

logger = logging.getLogger("onnxzip")


def register(sub) -> None:
    p = sub.add_parser(
        "prune", help="remove whole channels: smaller weights and shapes, a dense model"
    )
    p.add_argument("model", type=Path, metavar="MODEL")
    output_options(p)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--ratio",
        type=float,
        metavar="R",
        help="fraction of prunable channels to remove, in [0, 1)",
    )
    how.add_argument(
        "--target-macs", type=float, metavar="F", help="prune until MACs <= F x the original's"
    )
    p.add_argument(
        "--criterion",
        default="l1",
        help="channel importance: l1, l2, bn, or from gradients (needs --data): taylor, fisher, "
        "grad-stability (default l1)",
    )
    p.add_argument(
        "--scope",
        choices=["global", "local"],
        default="global",
        help="one threshold over normalised scores (global, default) or the same ratio per group",
    )
    p.add_argument(
        "--max-group-ratio",
        type=float,
        default=0.9,
        metavar="F",
        help="never remove more than this fraction of one group (0.9)",
    )
    p.add_argument(
        "--round-to",
        type=int,
        default=0,
        metavar="N",
        help="keep channel counts multiples of N (default 0 = automatic: 16 for groups of 64+ "
        "channels, 8 from 32, else any count)",
    )
    p.add_argument(
        "--exclude",
        nargs="+",
        default=[],
        metavar="NODE",
        help="leave the groups of these nodes alone",
    )
    p.add_argument(
        "--data",
        type=Path,
        metavar="D",
        help="samples: dead channels go for free, biases absorb what is removed, parity reported",
    )
    p.add_argument("--synthetic", type=int, metavar="N", help="verify on N random samples instead")
    p.add_argument(
        "--batch-size", type=int, default=32, metavar="B", help="samples per run (default 32)"
    )
    memory_option(p)
    batch_axis_option(p)
    state_option(p)
    p.add_argument("--seed", type=int, default=0, help="seed for --synthetic (default 0)")
    p.add_argument(
        "--reconstruct",
        action="store_true",
        help="with --data: refit every layer whose inputs lost channels by least squares on the "
        "samples (gradient-free recovery; no training engine needed)",
    )
    r = p.add_argument_group("recovery (distillation from the original, no labels needed)")
    r.add_argument(
        "--recover-steps",
        type=int,
        default=0,
        metavar="N",
        help="fine-tune the pruned model for N steps on --data (default 0: no recovery)",
    )
    r.add_argument(
        "--recover-lr", type=float, default=5e-3, metavar="LR", help="AdamW learning rate (5e-3)"
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
    from onnxzip import io
    from onnxzip.data import input_specs, open_samples
    from onnxzip.pruning import PruneConfig, prune

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
        samples = stateful(model, samples, args, str(args.model))
        memory = fit_memory(model, samples, args)
    config = PruneConfig(
        ratio=args.ratio,
        target_macs=args.target_macs,
        criterion=args.criterion,
        scope=args.scope,
        max_group_ratio=args.max_group_ratio,
        round_to=args.round_to,
        exclude=tuple(args.exclude),
        batch_size=args.batch_size,
        reconstruct=args.reconstruct,
    )
    if args.reconstruct and samples is None:
        raise InputError("--reconstruct needs --data (or --synthetic) to fit on")
    pruned, report = prune(model, config, samples=samples, source=str(args.model))
    text = report.format()
    split, holdout = "all", 0.0
    if args.recover_steps and samples is None:
        raise InputError("--recover-steps needs --data (or --synthetic) to train on")
    if args.recover_steps and report.unchanged_because is None:
        from onnxzip.recover import RecoverConfig, recover

        recovery = RecoverConfig(
            steps=args.recover_steps,
            learning_rate=args.recover_lr,
            batch_size=args.batch_size,
            holdout=args.holdout,
        )
        pruned, report.recovery = recover(model, pruned, samples, recovery)
        r = report.recovery
        text += (
            f"\n\nrecovery    {r.steps} steps on {r.samples_seen} samples, distillation loss "
            f"{r.first_loss:.4f} -> {r.last_loss:.4f}, {r.seconds:.1f} s"
        )
        split, holdout = ("holdout", args.holdout) if args.holdout > 0 else ("all", 0.0)
    save(pruned, args)
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
        )
        text += "\n\n" + report.parity.format()

    emit(report, args, memory + text + f"\n\nwrote {args.output}")
    return EXIT_OK if report.parity is None or report.parity.passed else EXIT_PARITY
