"""``onnxzip setup-training``: its options and its run."""

from __future__ import annotations

import argparse
import logging

from onnxzip.cli.options import (
    common,
    engine_options,
)
from onnxzip.errors import (
    EXIT_OK,
)

logger = logging.getLogger("onnxzip")


def register(sub) -> None:
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
    engine_options(p)
    common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
