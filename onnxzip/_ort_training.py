"""Access to onnxruntime's training artifacts and training API without importing torch.

``onnxruntime-training`` 1.19.2 ships ``onnxruntime.training``, whose ``__init__`` imports the
ORTModule machinery and with it torch. onnxzip only needs two pure submodules:
``onnxruntime.training.artifacts`` (builds the training, eval and optimizer graphs plus a
checkpoint) and ``onnxruntime.training.api`` (runs them). Neither depends on torch.

This module registers ``onnxruntime.training`` in ``sys.modules`` as a bare package whose
``__path__`` points at the installed folder, *without* executing its ``__init__``, then imports
the two submodules normally. If the real package was already imported (torch present and
somebody imported it first) it is used as is. Every other onnxzip module imports the training
engine from here, so this workaround lives in one place.

``register_early()`` does the registration before onnxruntime itself is imported (onnxzip's
``__init__`` has it called first thing). ``import onnxruntime`` checks whether ORTModule is available
by importing ``onnxruntime.training.ortmodule``; without torch that import fails, but only after
``onnxruntime.training.__init__`` has loaded the artifacts machinery, about 0.1 s of every
start. With the bare package registered, and ``ortmodule`` marked missing when torch is not
installed, the check reaches the same answer at once.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_PACKAGE = "onnxruntime.training"


def register_early() -> None:
    """Registers the bare package before onnxruntime is imported (see the module text)."""
    if _PACKAGE in sys.modules or "onnxruntime" in sys.modules:
        return
    root = importlib.util.find_spec("onnxruntime")  # locates the package without running it
    if root is None or not root.submodule_search_locations:
        return
    folder = Path(next(iter(root.submodule_search_locations))) / "training"
    if not (folder / "__init__.py").is_file():
        return  # plain onnxruntime: no training package
    spec = importlib.util.spec_from_file_location(
        _PACKAGE, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    sys.modules[_PACKAGE] = importlib.util.module_from_spec(spec)
    if importlib.util.find_spec("torch") is None:
        sys.modules[_PACKAGE + ".ortmodule"] = None  # what importing it would conclude


def _register_bare_package() -> None:
    import onnxruntime  # the inference part of the package; no torch

    if _PACKAGE in sys.modules:
        if not hasattr(onnxruntime, "training"):
            onnxruntime.training = sys.modules[_PACKAGE]  # type: ignore[attr-defined]
        return

    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(
            "onnxruntime.training is missing: install onnxruntime-training==1.19.2 "
            "(it replaces the plain onnxruntime package)"
        )
    module = importlib.util.module_from_spec(spec)
    # Deliberately no spec.loader.exec_module(module): that would run __init__ and import torch.
    sys.modules[_PACKAGE] = module
    onnxruntime.training = module  # type: ignore[attr-defined]


def _quiet_session_options():
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: the gradient builder warns per node otherwise
    return options


def artifacts() -> ModuleType:
    """Returns ``onnxruntime.training.artifacts`` (``generate_artifacts``, ``LossType`` …).

    The gradient-graph builder creates its own ``SessionOptions`` at the default log level and
    prints a warning line for every node it visits; it is given quiet options instead.
    """
    _register_bare_package()
    module = importlib.import_module(_PACKAGE + ".artifacts")
    graph_utils = importlib.import_module(_PACKAGE + ".onnxblock._training_graph_utils")
    graph_utils.SessionOptions = _quiet_session_options
    return module


def api() -> ModuleType:
    """Returns ``onnxruntime.training.api`` (``CheckpointState``, ``Module``, ``Optimizer``)."""
    _register_bare_package()
    return importlib.import_module(_PACKAGE + ".api")


def onnxblock() -> ModuleType:
    """Returns ``onnxruntime.training.onnxblock`` (losses and blocks for custom training graphs)."""
    _register_bare_package()
    return importlib.import_module(_PACKAGE + ".onnxblock")
