"""onnxruntime sessions for onnxzip's numeric checks.

Every number onnxzip reports about a model's outputs comes from onnxruntime's CPU provider.
Models under 2 GB are handed over as bytes; larger ones are written with external data to a
temporary folder first, since protobuf cannot hold them in one message.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxzip import io
from onnxzip.data import Batch
from onnxzip.errors import ModelError

logger = logging.getLogger(__name__)

OPT_LEVELS = {
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(optimization: str = "all", threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = OPT_LEVELS[optimization]
    options.log_severity_level = (
        4  # failures surface as exceptions, reported by onnxzip in one line
    )
    if threads:
        options.intra_op_num_threads = threads
    return options


class Runner:
    """One onnxruntime CPU session over an IR model, fed with ``Batch`` objects."""

    def __init__(
        self,
        model: ir.Model,
        *,
        name: str = "model",
        optimization: str = "all",
        threads: int | None = None,
    ):
        self.name = name
        options = session_options(optimization, threads)
        try:
            if io.weights_nbytes(model) > io.EXTERNAL_DATA_THRESHOLD:
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "model.onnx"
                    io.save_model(model, path)
                    self.session = ort.InferenceSession(
                        os.fspath(path), options, providers=["CPUExecutionProvider"]
                    )
            else:
                self.session = ort.InferenceSession(
                    io.model_bytes(model), options, providers=["CPUExecutionProvider"]
                )
        except (
            Exception
        ) as exc:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{name}: onnxruntime cannot load the model: {first}") from exc
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, batch: Batch, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        feeds = {name: batch.inputs[name] for name in self.input_names}
        names = outputs or self.output_names
        try:
            results = self.session.run(names, feeds)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{self.name}: onnxruntime failed to run: {first}") from exc
        return dict(zip(names, results, strict=True))
