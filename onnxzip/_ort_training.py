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
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

_PACKAGE = "onnxruntime.training"


def _register_bare_package() -> None:
    if _PACKAGE in sys.modules:
        return
    import onnxruntime  # the inference part of the package; no torch

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
