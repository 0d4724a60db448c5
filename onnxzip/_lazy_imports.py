"""Start-up work onnxzip skips: sympy until something uses it.

``onnx_ir`` imports sympy (and builds a table of sympy functions in ``onnx_ir._symbolic_shapes``)
when it is imported, for arithmetic on symbolic dimensions that onnxzip's commands never do.
That import is about a third of onnxzip's start-up time. ``defer()`` puts a stand-in module
under each of the two names: the first attribute read from a stand-in (``sympy.Expr``,
``_symbolic_shapes.parse_symbolic_expression``) imports the real module, puts it in
``sys.modules`` and copies its namespace into the stand-in, so code that already holds the
stand-in sees the real module from then on. (``importlib.util.LazyLoader`` cannot do this on
Python 3.11: the ``import`` statement itself reads ``__spec__`` and so loads the module.)

``onnxzip/__init__.py`` imports this module, which calls ``defer()``, before anything imports
``onnx_ir``. If sympy or onnx_ir is already imported, nothing is done.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path


class _Deferred(types.ModuleType):
    def __getattr__(self, attr: str):  # only called for names the stand-in does not hold yet
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        real = importlib.import_module(name)
        self.__dict__.update(real.__dict__)
        return getattr(real, attr)


def _stand_in(name: str, spec) -> None:
    module = _Deferred(name)
    module.__spec__ = spec  # the import system reads it; reading it imports nothing
    module.__file__ = spec.origin
    sys.modules[name] = module


def defer() -> None:
    if any(name in sys.modules for name in ("sympy", "onnx_ir", "onnx_ir._symbolic_shapes")):
        return
    sympy = importlib.util.find_spec("sympy")
    package = importlib.util.find_spec("onnx_ir")  # locates the package without running it
    if sympy is None or package is None or not package.submodule_search_locations:
        return
    path = Path(next(iter(package.submodule_search_locations))) / "_symbolic_shapes.py"
    if not path.is_file():
        return
    _stand_in("sympy", sympy)
    _stand_in(
        "onnx_ir._symbolic_shapes",
        importlib.util.spec_from_file_location("onnx_ir._symbolic_shapes", path),
    )


defer()
