"""Error types and the exit codes the command line maps them to.

0 success, 1 a parity check failed, 2 bad input or usage, 3 internal error.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_PARITY = 1
EXIT_INPUT = 2
EXIT_INTERNAL = 3


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a
    one-line report quotes of an error raised by a library onnxzip calls."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class OnnxzipError(Exception):
    """Base class for errors onnxzip reports as one line."""

    exit_code = EXIT_INTERNAL


class InternalError(OnnxzipError):
    """A bug in onnxzip: a state its own code should never reach (exit code 3). Never raised
    for anything the user gave."""

    exit_code = EXIT_INTERNAL


class InputError(OnnxzipError):
    """The user's model, data, paths or options are unusable. The message names the file and the problem."""

    exit_code = EXIT_INPUT


class ModelError(InputError):
    """A model cannot be read, checked or normalised to what the installed onnxruntime runs."""


class DataError(InputError):
    """Sample data do not match the model or cannot be read."""


class ParityError(OnnxzipError):
    """A compressed model's outputs moved further from the reference than a threshold allows."""

    exit_code = EXIT_PARITY


class NoSamplesError(DataError):
    """A data set, or the part of it a split selects, holds no samples."""


class Terminated(BaseException):
    """SIGTERM arrived: raised where the program is, so that every cleanup runs (not an
    ``Exception``: nothing may catch it by accident)."""
