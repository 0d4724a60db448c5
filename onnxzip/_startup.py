"""Signals while ``python -m onnxzip`` is still importing (numpy, onnx, onnxruntime: about a
second). Python imports the package before it runs ``__main__``, so this is installed from the
package's ``__init__``, only when the process is that command (an application importing the
library keeps its own signal handling). Ctrl-C or SIGTERM then ends the start-up with one line
and no traceback; ``cli.main`` installs the handlers for the run itself."""

from __future__ import annotations

import os
import signal
import sys


def _quit(code: int, word: str):
    def handler(signum, frame):
        # Nothing is written during start-up, so there is nothing to clean: exit at once (an
        # exception could be swallowed by a library's bare ``except`` around an optional import).
        sys.stderr.write(f"onnxzip: {word}\n")
        sys.stderr.flush()
        os._exit(code)

    return handler


def install() -> None:
    argv = getattr(sys, "orig_argv", [])
    if argv[1:3] != ["-m", "onnxzip"]:
        return
    try:
        signal.signal(signal.SIGINT, _quit(130, "interrupted"))
        if hasattr(signal, "SIGTERM"):
            signal.signal(signal.SIGTERM, _quit(143, "terminated"))
    except ValueError:  # not the main thread
        pass
