"""The command line (``python -m onnxzip``): one module per command, shared options in
``options``, parsing and the exit codes in ``main``."""

from onnxzip.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
