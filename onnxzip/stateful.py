"""Streaming models: state inputs fed from the state outputs of the step before.

A streaming model (a voice-activity detector, an RNN tagger) takes its state as an input and
returns the next state as an output. Its samples are the steps of a stream, in order: run one
by one, each step reads the state the previous step wrote. Fed the data's own state values
instead (usually zeros), calibration sees ranges the served model never meets and a
comparison checks steps the served model never runs.

``--state IN=OUT`` names such a pair. ``StatefulSamples`` carries the state of one model
through the samples in file order, one sample per step (the first step reads the data's
state): every stage that reads samples (calibration, statistics, recovery) then sees the states
the float model really passes. ``verify`` with state pairs runs the reference and the candidate
each on its own carried state, so what is compared is what each model computes when it runs
alone over the stream: drift that accumulates through the state is measured, not reset.

The carried states are made once per stream by running the model at one sample per step; the
splits (calibration, held-out) are taken from the carried stream, so a held-out step still
reads the state of the steps before it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from onnxzip.data import Batch, Samples
from onnxzip.errors import InputError
from onnxzip.runtime import Runner


def parse_pairs(specs: list[str] | None, model: ir.Model, source: str) -> list[tuple[str, str]]:
    """``["state=stateN"]`` as (input, output) pairs, checked against ``model``.

    Raises:
        InputError: a pair that is not ``IN=OUT``, names no input or output of the model, or
            whose input and output differ in type or in a fixed dimension.
    """
    pairs = []
    inputs = {v.name: v for v in model.graph.inputs}
    outputs = {v.name: v for v in model.graph.outputs}
    for spec in specs or []:
        name, sep, out = spec.partition("=")
        if not sep or not name or not out:
            raise InputError(f"--state wants IN=OUT (a state input and its output), got '{spec}'")
        if name not in inputs:
            raise InputError(f"--state {spec}: {source} has no input '{name}'")
        if out not in outputs:
            raise InputError(f"--state {spec}: {source} has no output '{out}'")
        a, b = inputs[name], outputs[out]
        if a.dtype != b.dtype:
            raise InputError(
                f"--state {spec}: input '{name}' is {a.dtype} but output '{out}' is {b.dtype}"
            )
        if a.shape is not None and b.shape is not None:
            if len(a.shape) != len(b.shape) or any(
                isinstance(x, int) and isinstance(y, int) and x != y
                for x, y in zip(a.shape, b.shape, strict=True)
            ):
                raise InputError(
                    f"--state {spec}: input '{name}' {list(a.shape)} and output '{out}' "
                    f"{list(b.shape)} differ in shape"
                )
        if any(p[0] == name for p in pairs):
            raise InputError(f"--state: input '{name}' is paired twice")
        pairs.append((name, out))
    return pairs


class StatefulSamples(Samples):
    """``base``'s samples, in order, with each state input replaced by the state ``model``'s
    previous step returned (see the module text)."""

    def __init__(self, base: Samples, model: ir.Model, pairs: list[tuple[str, str]], name: str):
        super().__init__(base.specs)
        if base.unbatched:
            raise InputError(
                "--state needs a batch axis: the model's inputs do not share one (see --batch-axis)"
            )
        axes = {spec.name: spec.batch_axis for spec in base.specs}
        for name, _ in pairs:
            if axes.get(name) is None:
                raise InputError(
                    f"--state: input '{name}' has no batch axis to carry one state per stream "
                    "(see --batch-axis)"
                )
        self.base = base
        self.pairs = pairs
        self.model = model
        self.model_name = name
        self.count = base.count
        self.max_batch = base.max_batch
        self.has_labels = base.has_labels
        self.synthetic = base.synthetic
        self.axes = base.axes
        self._runner: Runner | None = None

    def describe(self) -> str:
        states = ", ".join(f"{i}<-{o}" for i, o in self.pairs)
        return f"{self.base.describe()} as one stream (state {states} carried by {self.model_name})"

    def chunks(self) -> Iterator[Batch]:
        if self._runner is None:
            self._runner = Runner(self.model, name=self.model_name)
        outputs = [o for _, o in self.pairs]
        carried: dict[str, np.ndarray] | None = None
        for chunk in self.base.chunks():
            n = len(chunk)
            states: dict[str, list[np.ndarray]] = {i: [] for i, _ in self.pairs}
            for k in range(n):
                step = _step(chunk, k)
                if carried is not None:
                    step.inputs.update(carried)
                for i, _ in self.pairs:
                    states[i].append(step.inputs[i])
                out = self._runner.run(step, outputs)
                carried = {i: out[o] for i, o in self.pairs}
            inputs = dict(chunk.inputs)
            for i, _ in self.pairs:
                axis = chunk.axis(i)
                inputs[i] = np.concatenate(states[i], axis=0 if axis is None else axis)
            yield Batch(inputs, chunk.labels, chunk.count, chunk.axes)


def _step(chunk: Batch, k: int) -> Batch:
    """Sample ``k`` of the chunk as a batch of one."""
    inputs = {}
    for name, v in chunk.inputs.items():
        a = chunk.axis(name)
        inputs[name] = v if a is None else np.take(v, [k], axis=a)
    labels = None if chunk.labels is None else chunk.labels[k : k + 1]
    return Batch(inputs, labels, axes=chunk.axes)


__all__ = ["StatefulSamples", "parse_pairs"]
