"""Option groups and helpers the commands share: samples, floors, thresholds, outputs, the
checks of every path a run reads and writes, and how a report is emitted."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from onnxzip.errors import (
    InputError,
)

logger = logging.getLogger("onnxzip")


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(f"{self.prog}: {message} (see --help)")


def common(parser: argparse.ArgumentParser) -> None:
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


def engine_options(parser: argparse.ArgumentParser) -> None:
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


def cluster_option(parser: argparse.ArgumentParser) -> None:
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


def data_options(parser: argparse.ArgumentParser) -> None:
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
    run_options(group)
    group.add_argument("--seed", type=int, default=0, help="seed for --synthetic (default 0)")
    group.add_argument(
        "--holdout",
        type=fraction,
        metavar="F",
        help="held-out fraction F of --data: verify compares on it only; quantize keeps it out of "
        "calibration and verifies on it (default there 0.2; 0 calibrates on everything)",
    )
    remember_flags(parser, {"holdout": "--holdout", "batch_size": "--batch-size"})


def run_options(group) -> None:
    """How the samples are run, for every command that runs them: batch size, memory budget,
    batch axes and streaming states."""
    group.add_argument(
        "--batch-size", type=int, default=32, metavar="B", help="samples per run (default 32)"
    )
    memory_option(group)
    batch_axis_option(group)
    state_option(group)


def batch_axis_option(group) -> None:
    group.add_argument(
        "--batch-axis",
        action="append",
        default=[],
        metavar="NAME=AXIS",
        help="the axis of input NAME that counts samples (a state [2, batch, 128] has 1; 'none' "
        "for an input every sample shares); found from the data when not given",
    )


def state_option(group) -> None:
    group.add_argument(
        "--state",
        action="append",
        default=[],
        metavar="IN=OUT",
        help="a streaming model's state input IN and the output OUT that feeds it at the next "
        "step: the samples are then the steps of one stream, in order; calibration and training "
        "see the states the float model carries, and verification runs each model on its own",
    )


def stateful(model, samples, args: argparse.Namespace, source: str):
    """``samples`` as one stream carrying the --state pairs (onnxzip.stateful), if given."""
    if samples is None or not getattr(args, "state", None):
        return samples
    from onnxzip.stateful import StatefulSamples, parse_pairs

    return StatefulSamples(samples, model, parse_pairs(args.state, model, source), source)


def fit_synthetic(model, samples) -> None:
    """Synthetic samples of a model with symbolic image sizes or sequence lengths: the first
    size the model runs at (``SyntheticSamples.fit_dim``; one sample per size tried). A size
    the model refuses would otherwise fail deep in calibration with onnxruntime's words."""
    from onnxzip.data import SyntheticSamples
    from onnxzip.errors import ModelError
    from onnxzip.runtime import Runner

    if not isinstance(samples, SyntheticSamples) or not samples.symbolic_dims():
        return
    runner = Runner(model, name="model", optimization="basic")

    def runs(batch) -> bool:
        try:
            runner.run(batch)
        except ModelError:
            return False
        return True

    dim = samples.fit_dim(runs)
    logger.info("synthetic samples: symbolic dimensions of size %d", dim)


def batch_axes(args: argparse.Namespace) -> dict[str, int | None] | None:
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


def memory_option(group) -> None:
    group.add_argument(
        "--memory-budget",
        type=size,
        metavar="SIZE",
        help="bytes one run of the samples may take (like 8G or 512M): batches shrink to fit "
        "(default: half the memory available at start)",
    )


def size(text: str) -> int:
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


def fit_memory(model, samples, args: argparse.Namespace, verify_samples=None) -> str:
    """Caps the samples' batches (and the verification samples', at the same cap: one
    estimate) to the memory budget; the line that says so when it bites."""
    from onnxzip.analysis import fit_memory

    fit = fit_memory(model, samples, args.batch_size, args.memory_budget)
    if verify_samples is not None and fit.capped:
        verify_samples.max_batch = fit.batch
    logger.info("memory: %s", fit.describe())
    return f"memory       {fit.describe()}\n" if fit.capped else ""


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def floor_option(group) -> None:
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


def metric_of(args: argparse.Namespace):
    if getattr(args, "metric", None) is None:
        if getattr(args, "min_metric", None) is not None:
            raise InputError("--min-metric needs --metric")
        return None
    from onnxzip import metrics

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # module:function from the directory the user is in
    return metrics.load(args.metric, args.min_metric)


def threshold_options(parser: argparse.ArgumentParser) -> None:
    t = parser.add_argument_group(
        "thresholds (exit 1 when one fails; given, they replace the default floors)"
    )
    floor_option(t)
    t.add_argument(
        "--min-cosine", type=float, metavar="C", help="minimum mean per-sample cosine similarity"
    )
    t.add_argument("--min-snr", type=float, metavar="DB", help="minimum SNR in dB")
    t.add_argument("--max-abs-error", type=float, metavar="E", help="maximum absolute error")
    t.add_argument(
        "--min-top1", type=fraction, metavar="F", help="minimum top-1 agreement, a fraction (0.99)"
    )
    t.add_argument(
        "--max-accuracy-drop",
        type=fraction,
        metavar="F",
        help="maximum accuracy drop against labels, a fraction (0.01 = one point)",
    )
    remember_flags(parser, {"min_cosine": "--min-cosine"})


def thresholds_of(args: argparse.Namespace):
    from onnxzip.verify import Thresholds

    return Thresholds(
        min_cosine=args.min_cosine,
        min_snr_db=args.min_snr,
        max_abs_error=args.max_abs_error,
        min_top1=args.min_top1,
        max_accuracy_drop=args.max_accuracy_drop,
    )


def output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o", "--output", type=Path, required=True, metavar="OUT", help="where to write the model"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="allow OUT to be the input model's path"
    )
    parser.add_argument(
        "--keep-failed",
        action="store_true",
        help="when the result breaks a floor or threshold (exit 1), still write it, as "
        "OUT's name with .failed before the suffix (default: write nothing, so that OUT only "
        "ever holds a model that passed)",
    )
    parser.add_argument(
        "--target-opset",
        type=int,
        metavar="N",
        help="write default-domain opset N, for runtimes older than the installed onnxruntime "
        "(default: keep the model's own; below 13 it becomes 13)",
    )
    remember_flags(parser, {"target_opset": "--target-opset"})


def probe_writable(folder: Path, path: Path) -> None:
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


def input_paths(args: argparse.Namespace) -> dict[Path, str]:
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


def check_paths(args: argparse.Namespace) -> None:
    """Before any work: nothing a run writes may land on a file it reads, on a directory, or on
    something that is not a regular file; a symbolic link is written through, never replaced.

    Outputs are ``-o`` and ``--json``; inputs are the models (with their external data files)
    and the data files.
    """
    import stat

    inputs = args.inputs_read = input_paths(args)
    outputs = [
        (flag, getattr(args, attr))
        for flag, attr in (("-o", "output"), ("--json", "json"))
        if getattr(args, attr, None) is not None
    ]
    if getattr(args, "keep_failed", False):
        outputs.append(("--keep-failed", failed_path(args.output)))
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
        probe_writable(path.resolve().parent, path)
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


def emit(report, args: argparse.Namespace, text: str) -> None:
    if args.json is not None:  # first: a reader that closes stdout early must not lose it
        from onnxzip.report import write_json

        write_json(report, args.json)
        logger.info("report written to %s", args.json)
    print(text)


def save(model, args: argparse.Namespace, path: Path | None = None) -> None:
    """Writes the output in the input's layout: weights in an external data file when the
    input kept them in one (or when they exceed 2 GB)."""
    from onnxzip import io

    io.save_model(model, path or args.output, external=bool(io.external_data_files(args.model)))


def failed_path(output: Path) -> Path:
    """Where --keep-failed writes a result that broke its floors: OUT with .failed before the
    suffix (small.onnx -> small.failed.onnx)."""
    return output.with_name(f"{output.stem}.failed{output.suffix or '.onnx'}")


def write_result(model, args: argparse.Namespace, passed: bool) -> str:
    """Writes the result to -o when it passed; one that failed only with --keep-failed, and
    under a name that says so. The line the report ends with."""
    if passed:
        save(model, args)
        return f"wrote {args.output}"
    if getattr(args, "keep_failed", False):
        path = failed_path(args.output)
        save(model, args, path)
        return f"FAILED: wrote it as {path} (--keep-failed); nothing written to {args.output}"
    return (
        f"FAILED: nothing written to {args.output} (--keep-failed writes the model as "
        f"{failed_path(args.output)})"
    )


def write_npz(path: Path, arrays: dict) -> None:
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


def add_config_options(
    parser: argparse.ArgumentParser,
    group,
    cls,
    names: list[str],
    *,
    defaults: dict | None = None,
    flags: dict[str, str] | None = None,
) -> None:
    """Adds to ``group`` one option per field ``names`` of the config dataclass ``cls``, as the
    field declares it (``onnxzip.config.option``): the flag, the type or the enum's choices, the
    default (``defaults`` overrides it for this command) and the help, with the default
    appended. The option's dest is the field's name; ``config_kwargs`` reads them back. The
    flags are remembered on ``parser`` so that an error naming a field names its flag."""
    import dataclasses
    import typing

    from onnxzip.config import IgnoredScope, enum_of, hints

    types = hints(cls)
    declared = {f.name: f for f in dataclasses.fields(cls)}
    flag_of = {}
    for name in names:
        f, tp = declared[name], types[name]
        meta = f.metadata
        if defaults and name in defaults:
            default = defaults[name]
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = (flags or {}).get(name) or meta.get("flag") or "--" + name.replace("_", "-")
        text = meta["help"]
        kind = enum_of(tp)
        if tp is bool:
            if default:
                flag = meta["negate"]
                group.add_argument(
                    flag, dest=name, action="store_false", help=meta.get("negate_help", text)
                )
            else:
                group.add_argument(flag, dest=name, action="store_true", help=text)
        elif kind is not None:
            group.add_argument(
                flag,
                dest=name,
                choices=kind.values(),
                default=None if default is None else str(default),
                help=f"{text} (default {default})",
            )
        elif tp is IgnoredScope:
            group.add_argument(
                flag, dest=name, nargs="+", default=[], metavar=meta.get("metavar"), help=text
            )
            if "patterns_flag" in meta:
                group.add_argument(
                    meta["patterns_flag"],
                    dest=f"{name}_patterns",
                    nargs="+",
                    default=[],
                    metavar="REGEX",
                    help=meta["patterns_help"],
                )
        else:
            base = next(t for t in (tp, *typing.get_args(tp)) if t in (int, float, str))
            group.add_argument(
                flag,
                dest=name,
                type=base,
                default=default,
                metavar=meta.get("metavar"),
                choices=meta.get("choices"),
                help=text + ("" if default is None else f" (default {default})"),
            )
        flag_of[name] = flag
    remember_flags(parser, flag_of)


def remember_flags(parser: argparse.ArgumentParser, flag_of: dict[str, str]) -> None:
    """Records which flag sets which config field (read when a ConfigError is reported)."""
    known = dict(parser.get_default("config_flags") or {})
    known.update(flag_of)
    parser.set_defaults(config_flags=known)


def config_kwargs(cls, args: argparse.Namespace, names: list[str]) -> dict:
    """The values of the options ``add_config_options`` added for ``names``, as keyword
    arguments of ``cls``."""
    from onnxzip.config import IgnoredScope, hints

    types = hints(cls)
    out = {}
    for name in names:
        value = getattr(args, name)
        if types[name] is IgnoredScope:
            items = tuple(value or ())
            value = IgnoredScope(
                names=items, types=items, patterns=tuple(getattr(args, f"{name}_patterns", ()))
            )
        out[name] = value
    return out
