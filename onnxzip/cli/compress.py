"""``onnxzip compress``: its options and its run."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from onnxzip.cli import quantize as quantize_cli
from onnxzip.cli.options import (
    add_config_options,
    batch_axes,
    cluster_option,
    common,
    config_kwargs,
    emit,
    engine_options,
    fit_memory,
    floor_option,
    metric_of,
    output_options,
    run_options,
    stateful,
    write_result,
)
from onnxzip.compress import CompressConfig
from onnxzip.config import Mode
from onnxzip.errors import (
    EXIT_OK,
    EXIT_PARITY,
)
from onnxzip.pruning.config import PruneConfig
from onnxzip.quantize.config import QuantizeConfig
from onnxzip.recover import RecoverConfig

logger = logging.getLogger("onnxzip")

# --quantize: the quantizer's mode, or none
QUANTIZE_MODES = {
    "int8": Mode.STATIC,
    "dynamic": Mode.DYNAMIC,
    "weight-only": Mode.WEIGHT_ONLY,
    "none": None,
}
# the stage configs' fields that are options of this command (the quantizer's as in quantize,
# but for its mode, set by --quantize, and its guard target, the job's budget)
PRUNING = ["criterion", "scope", "max_group_ratio", "round_to"]
RECOVERY = ["steps", "learning_rate", "temperature"]
QUANTIZATION = [f for f in quantize_cli.QUANTIZATION if f not in ("mode", "max_drop")]
WEIGHT_ONLY = quantize_cli.WEIGHT_ONLY


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
    run_options(p)
    add_config_options(p, p, CompressConfig, ["holdout"])
    stages = p.add_argument_group("pruning")
    amount = stages.add_mutually_exclusive_group()
    add_config_options(
        p,
        amount,
        PruneConfig,
        ["target_macs", "ratio"],
        defaults={"target_macs": 0.5},
        flags={"ratio": "--prune"},
    )
    amount.add_argument("--no-prune", action="store_true", help="skip pruning")
    add_config_options(p, stages, PruneConfig, PRUNING)
    recovery = p.add_argument_group(
        "recovery (distillation from the original, no labels needed; 0 steps: none)"
    )
    add_config_options(p, recovery, RecoverConfig, RECOVERY)
    q = p.add_argument_group("quantization (see quantize --help)")
    q.add_argument(
        "--quantize",
        choices=list(QUANTIZE_MODES),
        default="int8",
        help="static int8 QDQ (default), dynamic (transformers), weight-only (decoders) or none",
    )
    add_config_options(p, q, QuantizeConfig, QUANTIZATION + WEIGHT_ONLY)
    b = p.add_argument_group(
        "accuracy budget (the pruning amount is searched; exit 1 if it cannot hold)"
    )
    add_config_options(p, b, CompressConfig, ["max_drop", "min_cosine"])
    p.add_argument(
        "--verify-data",
        type=Path,
        metavar="V",
        help="samples for every accuracy decision and the final parity "
        "(default: the held-out part of --data)",
    )
    add_config_options(p, p, CompressConfig, ["latency"])
    floor_option(p)
    engine_options(p)
    cluster_option(p)
    common(p)
    p.set_defaults(func=run)


def config_of(args: argparse.Namespace) -> CompressConfig:
    """The CompressConfig the options describe (each stage's from its own fields)."""
    scope = config_kwargs(QuantizeConfig, args, ["exclude"])["exclude"]
    mode = QUANTIZE_MODES[args.quantize]
    prune = None
    if not args.no_prune:  # a fixed ratio, or the MACs target (0.5 unless given)
        amount = ["ratio"] if args.ratio is not None else ["target_macs"]
        prune = PruneConfig(**config_kwargs(PruneConfig, args, amount + PRUNING), exclude=scope)
    return CompressConfig(
        prune=prune,
        recover=None
        if args.steps == 0
        else RecoverConfig(**config_kwargs(RecoverConfig, args, RECOVERY)),
        quantize=None
        if mode is None
        else QuantizeConfig(
            **config_kwargs(QuantizeConfig, args, QUANTIZATION + WEIGHT_ONLY), mode=mode
        ),
        **config_kwargs(CompressConfig, args, ["holdout", "max_drop", "min_cosine", "latency"]),
        batch_size=args.batch_size,
        target_opset=args.target_opset,
        floors=not args.no_floors,
    )


def run(args: argparse.Namespace) -> int:
    from onnxzip import io
    from onnxzip.compress import compress
    from onnxzip.data import input_specs, open_samples

    model = io.load_model(args.model, name=str(args.model))
    samples = open_samples(input_specs(model), args.data, batch_axes=batch_axes(args))
    config = config_of(args)
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
    written = write_result(compressed, args, report.parity.passed)
    emit(report, args, memory + report.format() + f"\n\n{written}")
    return EXIT_OK if report.parity.passed else EXIT_PARITY
