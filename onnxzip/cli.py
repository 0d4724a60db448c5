"""Command line: ``python -m onnxzip SUBCOMMAND ...``.

Exit codes: 0 success, 1 a parity check failed, 2 bad input or usage, 3 internal error.
Errors on bad input are one line on stderr; a traceback appears only with ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from onnxzip import __version__, leases, progress
from onnxzip.errors import (
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_PARITY,
    InputError,
    InternalError,
    OnnxzipError,
    Terminated,
)

logger = logging.getLogger("onnxzip")


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(f"{self.prog}: {message} (see --help)")


def _common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output and diagnostics")
    group.add_argument(
        "--json", type=Path, metavar="PATH", help="also write the report as JSON to PATH"
    )
    group.add_argument(
        "--no-follow",
        action="store_true",
        help="refuse an output path (-o, --json) that is a symbolic link (default: write "
        "through it to its target; the link stays)",
    )
    group.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars, only errors and results"
    )
    group.add_argument("-v", "--verbose", action="store_true", help="log what each step does")
    group.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def _engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "training engine (onnxruntime-training 1.19.2 in its own environment, for gradients "
        "and recovery)"
    )
    group.add_argument(
        "--training-python",
        metavar="PATH",
        help="interpreter that has onnxruntime-training 1.19.2 (default: $ONNXZIP_TRAINING_PYTHON, "
        "else the environment onnxzip creates in its cache folder on first use)",
    )
    group.add_argument(
        "--offline",
        action="store_true",
        help="never download: refuse to create the training environment if it is missing",
    )


def _cluster_option(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("parallel work (Ray; results are the same bits as without)")
    group.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run the sweeps over the samples (calibration, channel moments, gradient "
        "statistics, verification), the accuracy guard's per-layer sensitivity and compress's "
        "budget-search attempts as Ray tasks: 'local' starts a private Ray instance on this "
        "machine, 'auto' joins the cluster this machine is part of (or $RAY_ADDRESS), HOST:PORT "
        "or ray://HOST:PORT a running one (needs pip install 'onnxzip[ray]')",
    )


def _data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("samples")
    src = group.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--data",
        type=Path,
        metavar="D",
        help=".npz keyed by input name (optional 'labels'), or a folder of them",
    )
    src.add_argument(
        "--synthetic", type=int, metavar="N", help="use N random samples (reported as synthetic)"
    )
    group.add_argument(
        "--batch-size", type=int, default=32, metavar="B", help="samples per run (default 32)"
    )
    _memory_option(group)
    _batch_axis_option(group)
    _state_option(group)
    group.add_argument("--seed", type=int, default=0, help="seed for --synthetic (default 0)")
    group.add_argument(
        "--holdout",
        type=_fraction,
        metavar="F",
        help="held-out fraction F of --data: verify compares on it only; quantize keeps it out of "
        "calibration and verifies on it (default there 0.2; 0 calibrates on everything)",
    )


def _batch_axis_option(group) -> None:
    group.add_argument(
        "--batch-axis",
        action="append",
        default=[],
        metavar="NAME=AXIS",
        help="the axis of input NAME that counts samples (a state [2, batch, 128] has 1; 'none' "
        "for an input every sample shares); found from the data when not given",
    )


def _state_option(group) -> None:
    group.add_argument(
        "--state",
        action="append",
        default=[],
        metavar="IN=OUT",
        help="a streaming model's state input IN and the output OUT that feeds it at the next "
        "step: the samples are then the steps of one stream, in order; calibration and training "
        "see the states the float model carries, and verification runs each model on its own",
    )


def _stateful(model, samples, args: argparse.Namespace, source: str):
    """``samples`` as one stream carrying the --state pairs (onnxzip.stateful), if given."""
    if samples is None or not getattr(args, "state", None):
        return samples
    from onnxzip.stateful import StatefulSamples, parse_pairs

    return StatefulSamples(samples, model, parse_pairs(args.state, model, source), source)


def _batch_axes(args: argparse.Namespace) -> dict[str, int | None] | None:
    axes: dict[str, int | None] = {}
    for item in getattr(args, "batch_axis", []):
        name, sep, axis = item.partition("=")
        if not sep or not name:
            raise InputError(f"--batch-axis '{item}': expected NAME=AXIS, like state=1")
        if axis.strip().lower() == "none":
            axes[name] = None
            continue
        try:
            axes[name] = int(axis)
        except ValueError:
            raise InputError(f"--batch-axis '{item}': AXIS must be an integer or none") from None
    return axes or None


def _memory_option(group) -> None:
    group.add_argument(
        "--memory-budget",
        type=_size,
        metavar="SIZE",
        help="bytes one run of the samples may take (like 8G or 512M): batches shrink to fit "
        "(default: half the memory available at start)",
    )


def _size(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    raw = text.strip().lower().removesuffix("b").removesuffix("i")
    factor = units.get(raw[-1:], 1)
    try:
        value = float(raw[:-1] if raw[-1:] in units else raw) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (like 8G or 512M)") from None
    if value < 2**20:
        raise argparse.ArgumentTypeError(f"a memory budget under 1 MiB: {text!r}")
    return int(value)


def _fit_memory(model, samples, args: argparse.Namespace, verify_samples=None) -> str:
    """Caps the samples' batches (and the verification samples', at the same cap: one
    estimate) to the memory budget; the line that says so when it bites."""
    from onnxzip.analysis import fit_memory

    fit = fit_memory(model, samples, args.batch_size, args.memory_budget)
    if verify_samples is not None and fit.capped:
        verify_samples.max_batch = fit.batch
    logger.info("memory: %s", fit.describe())
    return f"memory       {fit.describe()}\n" if fit.capped else ""


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _floor_option(group) -> None:
    group.add_argument(
        "--no-floors",
        action="store_true",
        help="do not check the default quality floor of each output's kind (see README, "
        "'Quality floors'); for exploration: the verdict then means only that no threshold failed",
    )
    group.add_argument(
        "--metric",
        metavar="NAME|MODULE:FUNCTION",
        help="task metric f(reference, candidate, batch) -> score, replacing the default floors "
        "(shipped: top1, detection, detection-no-objectness)",
    )
    group.add_argument(
        "--min-metric",
        type=float,
        metavar="X",
        help="the task metric's floor (default: the shipped metric's own)",
    )


def _metric(args: argparse.Namespace):
    if getattr(args, "metric", None) is None:
        if getattr(args, "min_metric", None) is not None:
            raise InputError("--min-metric needs --metric")
        return None
    from onnxzip import metrics

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # module:function from the directory the user is in
    return metrics.load(args.metric, args.min_metric)


def _threshold_options(parser: argparse.ArgumentParser) -> None:
    t = parser.add_argument_group(
        "thresholds (exit 1 when one fails; given, they replace the default floors)"
    )
    _floor_option(t)
    t.add_argument(
        "--min-cosine", type=float, metavar="C", help="minimum mean per-sample cosine similarity"
    )
    t.add_argument("--min-snr", type=float, metavar="DB", help="minimum SNR in dB")
    t.add_argument("--max-abs-error", type=float, metavar="E", help="maximum absolute error")
    t.add_argument(
        "--min-top1", type=_fraction, metavar="F", help="minimum top-1 agreement, a fraction (0.99)"
    )
    t.add_argument(
        "--max-accuracy-drop",
        type=_fraction,
        metavar="F",
        help="maximum accuracy drop against labels, a fraction (0.01 = one point)",
    )


def _thresholds(args: argparse.Namespace):
    from onnxzip.verify import Thresholds

    return Thresholds(
        min_cosine=args.min_cosine,
        min_snr_db=args.min_snr,
        max_abs_error=args.max_abs_error,
        min_top1=args.min_top1,
        max_accuracy_drop=args.max_accuracy_drop,
    )


def _output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o", "--output", type=Path, required=True, metavar="OUT", help="where to write the model"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="allow OUT to be the input model's path"
    )
    parser.add_argument(
        "--target-opset",
        type=int,
        metavar="N",
        help="write default-domain opset N, for runtimes older than the installed onnxruntime "
        "(default: keep the model's own; below 13 it becomes 13)",
    )


def _probe_writable(folder: Path, path: Path) -> None:
    """Outputs are written in a temporary folder beside them and renamed into place: create and
    remove one such folder now (named like them, so a run killed in between leaves nothing the
    next run does not clean up), so that an unwritable folder (read-only, /proc) is refused
    before the work rather than after it."""
    import tempfile

    try:
        probe = tempfile.mkdtemp(prefix=f".onnxzip-{os.getpid()}-probe-", dir=folder)
    except OSError as exc:
        raise InputError(f"{path}: cannot write in '{folder}': {exc.strerror or exc}") from exc
    os.rmdir(probe)


def _input_paths(args: argparse.Namespace) -> dict[Path, str]:
    """What a run reads, resolved: its models, their external data files, its data files."""
    from onnxzip import io

    inputs: dict[Path, str] = {}
    for attr, what in (
        ("model", "the input model"),
        ("reference", "the reference model"),
        ("candidate", "the candidate model"),
    ):
        path = getattr(args, attr, None)
        if path is not None and path.exists():
            inputs[path.resolve()] = f"{what} {path}"
            if path.is_file():
                for data in io.external_data_files(path):
                    inputs[data.resolve()] = f"the external data of {path}"
    for attr in ("data", "verify_data"):
        path = getattr(args, attr, None)
        if path is not None and path.is_file():
            inputs[path.resolve()] = f"the data file {path}"
    return inputs


def _check_paths(args: argparse.Namespace) -> None:
    """Before any work: nothing a run writes may land on a file it reads, on a directory, or on
    something that is not a regular file; a symbolic link is written through, never replaced.

    Outputs are ``-o`` and ``--json``; inputs are the models (with their external data files)
    and the data files.
    """
    import stat

    inputs = args.inputs_read = _input_paths(args)
    outputs = [
        (flag, getattr(args, attr))
        for flag, attr in (("-o", "output"), ("--json", "json"))
        if getattr(args, attr, None) is not None
    ]
    seen: dict[Path, str] = {}
    for flag, path in outputs:
        if path.is_symlink() and not path.exists():
            raise InputError(f"{path}: {flag} is a symbolic link to nothing ({os.readlink(path)})")
        if path.is_symlink() and getattr(args, "no_follow", False):
            raise InputError(
                f"{path}: {flag} is a symbolic link (to {os.readlink(path)}) and --no-follow "
                "refuses to write through it"
            )
        if path.exists():
            mode = path.stat().st_mode
            if stat.S_ISDIR(mode):
                raise InputError(f"{path}: is a directory; {flag} takes a file path")
            if not stat.S_ISREG(mode):
                raise InputError(f"{path}: {flag} is not a regular file (a device, FIFO or socket)")
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir():
            raise InputError(f"{path}: output folder '{folder}' does not exist")
        _probe_writable(path.resolve().parent, path)
        target = path.resolve()
        if target in seen:
            raise InputError(f"{path}: {flag} and {seen[target]} name the same file")
        seen[target] = flag
        what = inputs.get(target)
        if what is None:
            continue
        if flag == "-o" and what.startswith("the input model"):
            if getattr(args, "overwrite", False):
                continue
            raise InputError(f"{path}: is the input model; choose another -o or pass --overwrite")
        raise InputError(f"{path}: {flag} would overwrite {what}; choose another path")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="onnxzip", description="Prune, quantize and verify ONNX models with onnxruntime."
    )
    parser.add_argument("--version", action="version", version=f"onnxzip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

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
    _common(p)
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser(
        "verify", help="compare a candidate model's outputs with a reference's in onnxruntime"
    )
    p.add_argument("reference", type=Path, metavar="REFERENCE")
    p.add_argument("candidate", type=Path, metavar="CANDIDATE")
    _data_options(p)
    _threshold_options(p)
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
    _cluster_option(p)
    _common(p)
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser(
        "quantize", help="int8 QDQ quantization calibrated on samples, verified on held-out ones"
    )
    p.add_argument("model", type=Path, metavar="MODEL")
    _output_options(p)
    _data_options(p)
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
    _threshold_options(p)
    _cluster_option(p)
    _common(p)
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser(
        "compress", help="prune, recover, quantize and verify in one go (the main job)"
    )
    p.add_argument("model", type=Path, metavar="MODEL")
    _output_options(p)
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
    _memory_option(p)
    _batch_axis_option(p)
    _state_option(p)
    p.add_argument(
        "--holdout",
        type=_fraction,
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
    _floor_option(p)
    _engine_options(p)
    _cluster_option(p)
    _common(p)
    p.set_defaults(func=_cmd_compress)

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
    _data_options(p)
    p.add_argument(
        "--no-labels",
        action="store_true",
        help="ignore 'labels' in the data: use the model's own predictions as targets",
    )
    _engine_options(p)
    _cluster_option(p)
    _common(p)
    p.set_defaults(func=_cmd_stats)

    p = sub.add_parser(
        "prune", help="remove whole channels: smaller weights and shapes, a dense model"
    )
    p.add_argument("model", type=Path, metavar="MODEL")
    _output_options(p)
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
    _memory_option(p)
    _batch_axis_option(p)
    _state_option(p)
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
        type=_fraction,
        default=0.2,
        metavar="F",
        help="fraction of --data never trained on, for the parity report (0.2)",
    )
    _floor_option(p)
    _engine_options(p)
    _cluster_option(p)
    _common(p)
    p.set_defaults(func=_cmd_prune)

    p = sub.add_parser(
        "setup-training",
        help="create (or check) the training engine's own environment: onnxruntime-training "
        "1.19.2 for gradients and recovery",
    )
    p.add_argument(
        "--python",
        metavar="PATH",
        help="CPython 3.10 or 3.11 to build it with (default: this interpreter when it is one, "
        "else python3.11 / python3.10 from PATH)",
    )
    p.add_argument("--force", action="store_true", help="recreate it even if it exists")
    _engine_options(p)
    _common(p)
    p.set_defaults(func=_cmd_setup_training)
    return parser


def _cmd_setup_training(args: argparse.Namespace) -> int:
    from onnxzip import engine

    if args.training_python:
        found = engine.locate(args.training_python)
    elif args.force:
        found = engine.setup(offline=args.offline, base_python=args.python, force=True)
    else:
        found = engine.locate(offline=args.offline, base_python=args.python)
    info = found.info
    print(
        f"training engine  {found.python} ({found.origin})\n"
        f"                 python {info.get('python')}, onnxruntime-training "
        f"{info.get('onnxruntime')}, onnx {info.get('onnx')}, numpy {info.get('numpy')}"
    )
    return EXIT_OK


def _emit(report, args: argparse.Namespace, text: str) -> None:
    if args.json is not None:  # first: a reader that closes stdout early must not lose it
        from onnxzip.report import write_json

        write_json(report, args.json)
        logger.info("report written to %s", args.json)
    print(text)


def _cmd_inspect(args: argparse.Namespace) -> int:
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
            open_samples(input_specs(model), args.data, batch_axes=_batch_axes(args))
        )
        report = inspect_model(model, source=str(args.model), input_shapes=shapes)
        report.file_bytes = io.file_size(args.model)
    text = report.format(per_node=args.per_node)
    if args.groups:
        from onnxzip.pruning import analyse, format_groups

        report.groups = analyse(args.model)
        text += "\n\n" + format_groups(report.groups)
    _emit(report, args, text)
    return EXIT_OK


def _cmd_compress(args: argparse.Namespace) -> int:
    from onnxzip import io
    from onnxzip.compress import CompressConfig, compress
    from onnxzip.data import input_specs, open_samples

    model = io.load_model(args.model, name=str(args.model))
    samples = open_samples(input_specs(model), args.data, batch_axes=_batch_axes(args))
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
    metric = _metric(args)
    verify_samples = None
    if args.verify_data is not None:
        verify_samples = open_samples(
            input_specs(model), args.verify_data, batch_axes=_batch_axes(args)
        )
    samples = _stateful(model, samples, args, str(args.model))
    verify_samples = _stateful(model, verify_samples, args, str(args.model))
    memory = _fit_memory(model, samples, args, verify_samples)
    compressed, report = compress(
        model, samples, config, verify_samples=verify_samples, source=str(args.model), metric=metric
    )
    _save(compressed, args)
    _emit(report, args, memory + report.format() + f"\n\nwrote {args.output}")
    return EXIT_OK if report.parity.passed else EXIT_PARITY


def _cmd_stats(args: argparse.Namespace) -> int:
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
        input_specs(model), args.data, args.synthetic, args.seed, batch_axes=_batch_axes(args)
    )
    _fit_memory(model, samples, args)
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
    _write_npz(args.output, arrays)
    text = (
        f"loss        {report.loss}\nsamples     {report.samples} in {report.batches} batches"
        f"{' (SYNTHETIC)' if samples.synthetic else ''}\ntime        {report.seconds:.2f} s\n\n"
        + table(
            ["group", "producers", "channels", "taylor min", "taylor median", "taylor max"], rows
        )
        + f"\n\nwrote {args.output}"
    )
    _emit(report, args, text)
    return EXIT_OK


def _write_npz(path: Path, arrays: dict) -> None:
    """Atomic .npz write: a temporary file beside the target, then a rename (a symbolic link is
    written through)."""
    import tempfile

    import numpy as np

    if path.is_symlink():
        path = path.resolve()

    fd, tmp = tempfile.mkstemp(
        prefix=".onnxzip-", suffix=".npz", dir=path.parent if str(path.parent) else "."
    )
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cmd_prune(args: argparse.Namespace) -> int:
    from onnxzip import io
    from onnxzip.data import input_specs, open_samples
    from onnxzip.pruning import PruneConfig, prune

    if args.data is not None and args.synthetic is not None:
        raise InputError("give either --data or --synthetic, not both")
    metric = _metric(args)  # a bad --metric is refused before any work
    model = io.at_opset(
        io.load_model(args.model, name=str(args.model)), args.target_opset, str(args.model)
    )
    samples = None
    memory = ""
    if args.data is not None or args.synthetic is not None:
        samples = open_samples(
            input_specs(model), args.data, args.synthetic, args.seed, batch_axes=_batch_axes(args)
        )
        samples = _stateful(model, samples, args, str(args.model))
        memory = _fit_memory(model, samples, args)
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
    _save(pruned, args)
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

    _emit(report, args, memory + text + f"\n\nwrote {args.output}")
    return EXIT_OK if report.parity is None or report.parity.passed else EXIT_PARITY


def _cmd_verify(args: argparse.Namespace) -> int:
    from onnxzip import io
    from onnxzip.data import input_specs, open_samples
    from onnxzip.verify import verify

    if args.per_node_samples < 1:
        raise InputError("--per-node-samples must be at least 1")
    reference = io.load_model(args.reference, name=str(args.reference))
    samples = open_samples(
        input_specs(reference), args.data, args.synthetic, args.seed, batch_axes=_batch_axes(args)
    )
    samples = _stateful(reference, samples, args, str(args.reference))
    memory = _fit_memory(reference, samples, args)
    thresholds = _thresholds(args)
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
        metric=_metric(args),
    )
    _emit(report, args, memory + report.format())
    return EXIT_OK if report.passed else EXIT_PARITY


def _cmd_quantize(args: argparse.Namespace) -> int:
    from onnxzip import io
    from onnxzip.data import input_specs, open_samples
    from onnxzip.quantize import QuantizeConfig, quantize

    holdout = 0.2 if args.holdout is None else args.holdout
    if holdout >= 1:
        raise InputError("--holdout must be below 1")
    metric = _metric(args)  # a bad --metric is refused before any work
    model = io.load_model(args.model, name=str(args.model))
    specs = input_specs(model)
    samples = open_samples(
        specs, args.data, args.synthetic, args.seed, batch_axes=_batch_axes(args)
    )
    verify_samples = (
        open_samples(specs, args.verify_data, batch_axes=_batch_axes(args))
        if args.verify_data is not None
        else None
    )
    samples = _stateful(model, samples, args, str(args.model))
    verify_samples = _stateful(model, verify_samples, args, str(args.model))
    memory = _fit_memory(model, samples, args, verify_samples)
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
        thresholds=_thresholds(args),
        source=str(args.model),
        floors=not args.no_floors,
        metric=metric,
    )
    _save(quantized, args)
    _emit(report, args, memory + report.format() + f"\n\nwrote {args.output}")
    return EXIT_OK if report.parity is None or report.parity.passed else EXIT_PARITY


def _save(model, args: argparse.Namespace) -> None:
    """Writes the output in the input's layout: weights in an external data file when the
    input kept them in one (or when they exceed 2 GB)."""
    from onnxzip import io

    io.save_model(model, args.output, external=bool(io.external_data_files(args.model)))


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(levelname)s %(name)s: %(message)s" if args.debug else "%(message)s")
    )
    root = logging.getLogger("onnxzip")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    progress.set_enabled(False if args.quiet else None)


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Runs one command; SIGINT raises KeyboardInterrupt and SIGTERM ``Terminated`` meanwhile
    (both unwind with cleanup), and the caller's handlers are put back afterwards."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    saved = {
        sig: signal.getsignal(sig)
        for sig in (signal.SIGINT, getattr(signal, "SIGTERM", None))
        if sig
    }
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with leases.holding():  # external data files held against truncation (Linux)
            return _main(argv)
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    args = None
    try:
        args = build_parser().parse_args(argv)
        _configure_logging(args)
        _check_paths(args)
        if hasattr(args, "training_python"):
            from onnxzip import engine

            engine.configure(args.training_python, args.offline)
        if getattr(args, "ray", None):
            from onnxzip.engine import cluster

            with cluster.using(cluster.RayCluster(args.ray)) as ray_cluster:
                try:
                    return args.func(args)
                finally:
                    ray_cluster.close()
        return args.func(args)
    except OnnxzipError as exc:
        if debug:
            raise
        what = "internal error" if isinstance(exc, InternalError) else "error"
        print(f"onnxzip: {what}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("onnxzip: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("onnxzip: terminated", file=sys.stderr)
        return 143
    except leases.InputChanged as exc:
        print(f"onnxzip: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # The reader of stdout went away (`| head`): the work is done, nothing more to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except FileNotFoundError as exc:
        read = getattr(args, "inputs_read", None) or {}
        vanished = exc.filename and read.get(Path(exc.filename).resolve())
        if debug or not vanished:
            raise
        print(
            f"onnxzip: error: {exc.filename}: removed during the run ({vanished})", file=sys.stderr
        )
        return EXIT_INPUT
    except Exception as exc:
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"onnxzip: internal error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
