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

import numpy as np
import onnx_ir as ir

from onnxzip import _ort_training, io
from onnxzip.errors import InputError, ModelError
from onnxzip.passes import add_initializer, replace_node


def first_line(exc: BaseException) -> str:
    """The part of an onnxruntime error a user can act on."""
    text = str(exc).strip()
    marker = "The gradient builder has not been registered:"
    if marker in text:
        op = text.split(marker, 1)[1].split()[0]
        return f"op {op} has no gradient in onnxruntime-training"
    for line in text.splitlines():
        if "was false." in line:
            return line.split("was false.", 1)[1].strip() or line.strip()
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
    loss=None,
    optimizer: bool = False,
    what: str = "training",
) -> Iterator[Session]:
    """Training artifacts for ``twin``, opened; ``loss`` is None (the twin's first output is
    the loss), ``"cross-entropy"`` (onnxruntime adds it, with a ``labels`` input), or an
    ``onnxblock`` loss block."""
    artifacts = _ort_training.artifacts()
    api = _ort_training.api()
    if loss == "cross-entropy":
        loss_type = artifacts.LossType.CrossEntropyLoss
    elif loss is None or isinstance(loss, str):
        loss_type = None
    else:
        loss_type = loss  # an onnxblock loss block
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


def _const(graph: ir.Graph, name: str, value: float) -> ir.Value:
    return add_initializer(graph, name, np.array(value, np.float32))


def differentiable(model: ir.Model) -> list[str]:
    """Rewrites ops onnxruntime-training 1.19 has no gradient builder for into ops it has.

    HardSwish(x) = x * Clip(x + 3, 0, 6) / 6; HardSigmoid(x) = Clip(alpha x + beta, 0, 1);
    PRelu(x, s) = Relu(x) - s * Relu(-x); Sum of n > 2 inputs = a chain of Add; a
    LayerNormalization with one output gets its mean and inverse-deviation outputs declared.
    Returns the rewritten op types. Exact up to float rounding; callers check the outputs.
    """
    graph = model.graph
    done = []
    for i, node in enumerate(list(graph)):
        if node.domain not in ("", "ai.onnx"):
            continue
        op = node.op_type
        p = f"grad_rewrite_{i}"
        if op == "HardSwish":
            x = node.inputs[0]
            shifted = ir.node("Add", [x, _const(graph, f"{p}_3", 3.0)], name=f"{p}_add")
            clipped = ir.node(
                "Clip",
                [shifted.outputs[0], _const(graph, f"{p}_0", 0.0), _const(graph, f"{p}_6", 6.0)],
                name=f"{p}_clip",
            )
            scaled = ir.node(
                "Mul",
                [clipped.outputs[0], _const(graph, f"{p}_sixth", 1.0 / 6.0)],
                name=f"{p}_scale",
            )
            out = ir.node("Mul", [x, scaled.outputs[0]], name=f"{p}_mul")
            replace_node(graph, node, [shifted, clipped, scaled, out], out.outputs[0])
        elif op == "HardSigmoid":
            alpha = node.attributes["alpha"].as_float() if "alpha" in node.attributes else 0.2
            beta = node.attributes["beta"].as_float() if "beta" in node.attributes else 0.5
            mul = ir.node(
                "Mul", [node.inputs[0], _const(graph, f"{p}_alpha", alpha)], name=f"{p}_mul"
            )
            add = ir.node(
                "Add", [mul.outputs[0], _const(graph, f"{p}_beta", beta)], name=f"{p}_add"
            )
            out = ir.node(
                "Clip",
                [add.outputs[0], _const(graph, f"{p}_0", 0.0), _const(graph, f"{p}_1", 1.0)],
                name=f"{p}_clip",
            )
            replace_node(graph, node, [mul, add, out], out.outputs[0])
        elif op == "PRelu":
            x, slope = node.inputs[0], node.inputs[1]
            pos = ir.node("Relu", [x], name=f"{p}_pos")
            neg_x = ir.node("Neg", [x], name=f"{p}_negx")
            neg = ir.node("Relu", [neg_x.outputs[0]], name=f"{p}_neg")
            scaled = ir.node("Mul", [slope, neg.outputs[0]], name=f"{p}_scaled")
            out = ir.node("Sub", [pos.outputs[0], scaled.outputs[0]], name=f"{p}_sub")
            replace_node(graph, node, [pos, neg_x, neg, scaled, out], out.outputs[0])
        elif op == "LayerNormalization" and len(node.outputs) == 1:
            # Its gradient builder reads the mean and inverse deviation outputs: declare them.
            node.resize_outputs(3)
            node.outputs[1].name = f"{p}_mean"
            node.outputs[2].name = f"{p}_inv_std"
        elif op == "Sum" and len(node.inputs) > 2:
            adds, total = [], node.inputs[0]
            for j, term in enumerate(node.inputs[1:]):
                add = ir.node("Add", [total, term], name=f"{p}_add{j}")
                adds.append(add)
                total = add.outputs[0]
            replace_node(graph, node, adds, total)
        else:
            continue
        done.append(op)
    for node in graph:
        for value in node.outputs:
            if value.name is None:
                value.name = f"{node.name}_out"
    return done


def fix_batch(model: ir.Model, batch: int) -> bool:
    """Gives every graph input a fixed first dimension when an AveragePool's gradient would
    meet a symbolic batch (onnxruntime-training 1.19 mis-sizes it, even crashing with SIGFPE)."""
    if not any(n.op_type == "AveragePool" for n in model.graph):
        return False
    changed = False
    for value in model.graph.inputs:
        if value.shape is not None and len(value.shape) and not isinstance(value.shape[0], int):
            value.shape = ir.Shape([batch, *list(value.shape)[1:]])
            changed = True
    if changed:  # stale symbolic shapes downstream would contradict the fixed batch
        for node in model.graph:
            for value in node.outputs:
                if not value.is_graph_output():
                    value.shape = None
    return changed
