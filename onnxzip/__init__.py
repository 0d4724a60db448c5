"""onnxzip: prune, quantize and verify ONNX models on the graph itself, checked with onnxruntime.

Python API (each function takes a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model``)::

    import onnxzip
    model = onnxzip.load_model("model.onnx")                # normalised onnx_ir.Model
    info = onnxzip.inspect_model("model.onnx")              # InspectReport
    data = onnxzip.open_samples(onnxzip.input_specs(model), "samples.npz")
    report = onnxzip.verify("model.onnx", "small.onnx", data,
                            thresholds=onnxzip.Thresholds(min_cosine=0.99))
    report.passed, report.outputs[0].snr_db
    q, qreport = onnxzip.quantize(model, data)              # int8 QDQ
    p, preport = onnxzip.prune(model, onnxzip.PruneConfig(target_macs=0.5))
    onnxzip.save_model(q, "out.onnx")                       # checked, atomic
"""

from __future__ import annotations

__version__ = "0.1.0"

# First: one-line exits for signals during start-up (python -m onnxzip only), and what
# start-up can skip, before anything imports onnx_ir or onnxruntime.
from onnxzip import _startup

_startup.install()
from onnxzip import _lazy_imports  # noqa: F401
from onnxzip.analysis import InspectReport, inspect_model
from onnxzip.compress import CompressConfig, CompressReport, compress
from onnxzip.config import IgnoredScope
from onnxzip.data import Batch, InputSpec, Samples, input_specs, open_samples
from onnxzip.errors import DataError, InputError, ModelError, OnnxzipError, ParityError
from onnxzip.io import load_model, save_model
from onnxzip.pruning import PruneConfig, PruneReport, prune
from onnxzip.quantize import QuantizeConfig, QuantizeReport, quantize
from onnxzip.recover import RecoverConfig, RecoverReport, recover
from onnxzip.verify import Thresholds, VerifyReport, verify

__all__ = [
    "Batch",
    "compress",
    "CompressConfig",
    "CompressReport",
    "DataError",
    "IgnoredScope",
    "InputError",
    "InputSpec",
    "InspectReport",
    "ModelError",
    "OnnxzipError",
    "ParityError",
    "Samples",
    "Thresholds",
    "VerifyReport",
    "input_specs",
    "inspect_model",
    "load_model",
    "open_samples",
    "prune",
    "PruneConfig",
    "PruneReport",
    "quantize",
    "QuantizeConfig",
    "QuantizeReport",
    "recover",
    "RecoverConfig",
    "RecoverReport",
    "save_model",
    "verify",
]
