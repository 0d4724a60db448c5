"""Shared plumbing for the trainable twins of ``gradients.py`` and ``recover.py``.

* ``scalar_loss``: adds the loss terms of a twin into one scalar and makes it the twin's only
  output (``generate_artifacts`` with ``loss=None`` takes the first output as the loss).
* ``session``: builds onnxruntime training artifacts for a twin in a temporary folder and opens
  them (checkpoint state, training module, optimizer when asked), turning the builders' C++
  errors into one-line ``ModelError`` messages that name what failed.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from onnxzip import _ort_training, io
from onnxzip.errors import InputError, ModelError


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def scalar_loss(graph: ir.Graph, terms: list[ir.Value], prefix: str) -> ir.Value:
    """Sums ``terms`` and makes the sum the graph's only output."""
    if not terms:
        raise InputError(f"{prefix}: the model has no float output to take a loss on")
    total = terms[0]
    for j, term in enumerate(terms[1:]):
        add = ir.node("Add", [total, term], name=f"{prefix}_total_{j}")
        add.outputs[0].name = add.name
        graph.append(add)
        total = add.outputs[0]
    total.type = ir.TensorType(ir.DataType.FLOAT)
    total.shape = ir.Shape([])
    graph.outputs.clear()
    graph.outputs.append(total)
    return total


@dataclass
class Session:
    state: object  # onnxruntime.training.api.CheckpointState
    module: object  # onnxruntime.training.api.Module
    optimizer: object | None  # onnxruntime.training.api.Optimizer

    @property
    def input_names(self) -> list[str]:
        return self.module.input_names()


@contextlib.contextmanager
def session(
    twin: ir.Model,
    requires_grad: list[str],
    frozen: list[str],
    *,
    loss: str | None = None,
    optimizer: bool = False,
    what: str = "training",
) -> Iterator[Session]:
    """Training artifacts for ``twin``, opened; ``loss`` is None (the twin's first output is
    the loss) or ``"cross-entropy"`` (onnxruntime adds it, with a ``labels`` input)."""
    artifacts = _ort_training.artifacts()
    api = _ort_training.api()
    loss_type = artifacts.LossType.CrossEntropyLoss if loss == "cross-entropy" else None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        try:
            artifacts.generate_artifacts(
                io.to_proto(twin),
                requires_grad=requires_grad,
                frozen_params=frozen,
                loss=loss_type,
                optimizer=artifacts.OptimType.AdamW if optimizer else None,
                artifact_directory=str(folder),
            )
        except Exception as exc:  # the gradient builders raise RuntimeErrors with C++ text
            raise ModelError(
                f"{what}: onnxruntime cannot build the gradient graph: {first_line(exc)}"
            ) from exc
        opt_path = folder / "optimizer_model.onnx"
        if optimizer:
            io.cap_ir_version(opt_path)
        state = api.CheckpointState.load_checkpoint(str(folder / "checkpoint"))
        module = api.Module(
            str(folder / "training_model.onnx"),
            state,
            str(folder / "eval_model.onnx"),
            device="cpu",
        )
        opt = api.Optimizer(str(opt_path), module) if optimizer else None
        module.train()
        yield Session(state, module, opt)


def step(sess: Session, feeds: dict, what: str = "training") -> float:
    """One forward and backward pass; returns the loss."""
    try:
        loss = sess.module(*[feeds[name] for name in sess.input_names])
    except Exception as exc:
        raise ModelError(
            f"{what}: onnxruntime failed in a training step: {first_line(exc)}"
        ) from exc
    return float(loss)
