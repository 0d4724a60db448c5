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
from onnxzip.cli import compress, inspect, prune, quantize, setup_training, stats, verify
from onnxzip.cli.options import Parser, check_paths
from onnxzip.config import ConfigError
from onnxzip.errors import (
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_OK,
    InternalError,
    OnnxzipError,
    Terminated,
)

logger = logging.getLogger("onnxzip")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="onnxzip", description="Prune, quantize and verify ONNX models with onnxruntime."
    )
    parser.add_argument("--version", action="version", version=f"onnxzip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    inspect.register(sub)
    verify.register(sub)
    quantize.register(sub)
    compress.register(sub)
    stats.register(sub)
    prune.register(sub)
    setup_training.register(sub)
    return parser


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
        check_paths(args)
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
        text = str(exc)
        if isinstance(exc, ConfigError):  # named by the flag that set the field
            flags = getattr(args, "config_flags", None) or {}
            text = exc.named(flags.get(exc.field, exc.field))
        print(f"onnxzip: {what}: {text}", file=sys.stderr)
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
