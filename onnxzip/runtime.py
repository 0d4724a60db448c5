"""onnxruntime sessions for onnxzip's numeric checks.

Every number onnxzip reports about a model's outputs comes from onnxruntime's CPU provider.
A model reaches it as the serialised graph with its large weights handed over as arrays, so the
message stays under protobuf's 2 GB whatever the weights weigh; only when that fails is the
model written with external data to a temporary folder first.
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxzip import io
from onnxzip.data import Batch
from onnxzip.engine import cluster
from onnxzip.errors import ModelError, first_line

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
    # Failures surface as exceptions, which onnxzip reports in one line: no log spam on stderr.
    options.log_severity_level = 4
    # Inside a Ray task: as many threads as CPUs the task holds (see onnxzip.engine.cluster).
    threads = threads or cluster.worker_threads()
    if threads:
        options.intra_op_num_threads = threads
    return options


def int8_pairs_saturate(cpuinfo: str | None = None, machine: str | None = None) -> str | None:
    """Why onnxruntime's uint8 x int8 kernels on this CPU may saturate, or None if they cannot.

    On x86-64 without VNNI (AVX2, AVX-512 before Cascade Lake / Zen 4) MLAS multiplies with
    ``vpmaddubsw``, whose pairwise int16 sums overflow for large weights (see
    ``params.weight_params``). VNNI CPUs and ARM add in 32 bits. ``cpuinfo`` and ``machine``
    default to ``/proc/cpuinfo`` and ``platform.machine()``; an x86 host whose flags cannot be
    read counts as saturating.
    """
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return None
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return "this x86 CPU's instruction sets could not be read"
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if flags & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        return None
    return "this x86-64 CPU has no VNNI: onnxruntime's int8 kernels add weight pairs in 16 bits"


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
        self.weights: dict[str, np.ndarray] = {}  # graph inputs fed with every run
        options = session_options(optimization, threads)
        providers = ["CPUExecutionProvider"]
        try:
            # The graph with its large weights handed over as arrays: under protobuf's 2 GB
            # whatever the weights weigh (a model written to a temporary folder only when even
            # that is too big, or when onnxruntime refuses the handover)
            data, arrays = _graph_bytes(model, options, self.weights)
            try:
                if len(data) > io.EXTERNAL_DATA_THRESHOLD:
                    raise OverflowError("the graph alone is over protobuf's limit")
                self.session = ort.InferenceSession(data, options, providers=providers)
            except Exception:
                if not arrays[0] and len(data) <= io.EXTERNAL_DATA_THRESHOLD:
                    raise
                # onnxruntime refused the handed-over arrays (it had dropped an initializer it
                # saw no use for, say): the whole model, as bytes or as a file
                options = session_options(optimization, threads)
                self.weights = {}
                if io.weights_nbytes(model) > io.EXTERNAL_DATA_THRESHOLD:
                    with tempfile.TemporaryDirectory() as tmp:
                        path = Path(tmp) / "model.onnx"
                        io.save_model(model, path)
                        self.session = ort.InferenceSession(
                            os.fspath(path), options, providers=providers
                        )
                else:
                    self.session = ort.InferenceSession(
                        io.model_bytes(model), options, providers=providers
                    )
            del arrays  # copied into the session: alive until it was made
        except (
            Exception
        ) as exc:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented types
            raise ModelError(
                f"{name}: onnxruntime cannot load the model: {first_line(exc)}"
            ) from exc
        self.input_names = [i.name for i in self.session.get_inputs() if i.name not in self.weights]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, batch: Batch, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        feeds = {name: batch.inputs[name] for name in self.input_names}
        feeds.update(self.weights)
        names = outputs or self.output_names
        try:
            results = self.session.run(names, feeds)
        except Exception as exc:
            raise ModelError(f"{self.name}: onnxruntime failed to run: {first_line(exc)}") from exc
        return dict(zip(names, results, strict=True))


# Main-graph initializers of at least this many bytes reach onnxruntime as arrays rather than
# inside the serialised model (smaller ones are not worth an OrtValue each).
HANDED_OVER_BYTES = 64 * 1024
_HANDED_OVER = "onnxzip-handed-over"  # the external-data location such a tensor is given


def _graph_bytes(
    model: ir.Model, options: ort.SessionOptions, fed: dict[str, np.ndarray] | None = None
) -> tuple[bytes, list]:
    """The serialised model whose large initializers are external-data stubs, their arrays
    handed to onnxruntime through ``options.add_external_initializers`` (it copies them
    before optimising the graph, so the session computes what the whole model does).

    Serialising 100 MB of ResNet-50 weights into a protobuf message only for onnxruntime to
    parse them back took 0.2 s per session; the arrays are handed over without that copy.

    With ``fed`` (a dict to fill), when the float weights that no quantization op reads weigh
    ``LARGE_WEIGHTS_BYTES`` or more, they become graph inputs instead, and their arrays go into
    ``fed`` to be fed with every run: onnxruntime then keeps no copy of them (a 2.3 GB encoder's
    session: 4.4 s and 2.2 GB to make, against nothing) at the price of slower runs (no
    prepacked weights: 1.8x there). Weights that a DequantizeLinear or a fused quantized op
    reads stay initializers, or onnxruntime would not fuse them into its int8 kernels."""
    graph = model.graph
    swapped = _handed(model)
    inputs = {n: graph.initializers[n] for n in _fed(model, swapped)} if fed is not None else {}
    for name, tensor in swapped.items():
        if name not in inputs:
            graph.initializers[name].const_value = ir.ExternalTensor(
                _HANDED_OVER, 0, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=name
            )
    order, initializers = list(graph.inputs), list(graph.initializers.values())
    for name, value in inputs.items():  # for the serialisation only: inputs, not initializers
        graph.initializers.pop(name)
        graph.inputs.append(value)
    try:
        data = io.model_bytes(model, frozenset(swapped) - set(inputs))
    finally:
        graph.inputs.clear()
        graph.inputs.extend(order)
        if inputs:  # the initializers back, in their order
            graph.initializers.clear()
            for value in initializers:
                graph.register_initializer(value)
        for name, tensor in swapped.items():
            graph.initializers[name].const_value = tensor
    for name in inputs:
        fed[name] = np.ascontiguousarray(swapped.pop(name).numpy())
    arrays = [np.ascontiguousarray(t.numpy()) for t in swapped.values()]
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
    if swapped:
        options.add_external_initializers(list(swapped), values)
    return data, [arrays, values]


def _fed(model: ir.Model, handed: dict[str, ir.TensorProtocol]) -> list[str]:
    """Which of the ``handed`` initializers a session takes as inputs: the float weights no
    quantization op reads, when they weigh ``LARGE_WEIGHTS_BYTES`` or more in all."""
    names = [
        name
        for name, tensor in handed.items()
        if tensor.dtype in _FLOAT_TYPES
        and all(
            u.node.domain in ("", "ai.onnx") and u.node.op_type not in _QUANTIZED_READERS
            for u in model.graph.initializers[name].uses()
        )
    ]
    return names if sum(handed[n].nbytes for n in names) >= LARGE_WEIGHTS_BYTES else []


def _handed(model: ir.Model) -> dict[str, ir.TensorProtocol]:
    """The main-graph initializers a session gets other than inside the serialised model."""
    return {
        name: value.const_value
        for name, value in model.graph.initializers.items()
        if value.const_value is not None
        and value.const_value.nbytes >= HANDED_OVER_BYTES
        and value.const_value.dtype in _HANDED_OVER_TYPES
        and value.uses()  # onnxruntime drops an unused initializer before the handover
        and not value.is_graph_input()
    }


def feeds_weights(model: ir.Model) -> bool:
    """Whether a ``Runner`` of this model feeds its weights as inputs (see ``_graph_bytes``)."""
    return bool(_fed(model, _handed(model)))


# Float weights of this many bytes in all, read by no quantization op, are fed as inputs (see
# _graph_bytes): above it a session's copy of them costs more than its slower runs.
LARGE_WEIGHTS_BYTES = 512 * 2**20
_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE})
_QUANTIZED_READERS = frozenset({"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear"})

_HANDED_OVER_TYPES = frozenset(
    {
        ir.DataType.FLOAT,
        ir.DataType.DOUBLE,
        ir.DataType.FLOAT16,
        ir.DataType.INT8,
        ir.DataType.UINT8,
        ir.DataType.INT16,
        ir.DataType.UINT16,
        ir.DataType.INT32,
        ir.DataType.UINT32,
        ir.DataType.INT64,
        ir.DataType.UINT64,
    }
)


def expose(model: ir.Model, names) -> ir.Model:
    """A copy of ``model`` in which the tensors ``names`` (node outputs or graph inputs) are also
    graph outputs, so one run fetches them."""
    exposed = model.clone()
    graph = exposed.graph
    by_name = {v.name: v for v in graph.inputs}
    by_name.update({v.name: v for node in graph for v in node.outputs})
    present = {v.name for v in graph.outputs}
    for name in names:
        if name not in present:
            graph.outputs.append(by_name[name])
            present.add(name)
    return exposed


def channel_moments(
    model: ir.Model,
    keys,
    samples,
    *,
    batch_size: int = 32,
    split: str = "all",
    holdout: float = 0.5,
    name: str = "statistics model",
) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """Mean and standard deviation along ``axis`` of each ``(tensor, axis)`` in ``keys``, over
    ``samples`` (every other axis pooled): one sweep of ``onnxzip.statistics.Collector``, the
    tensors fetched and summed in float64 by numpy."""
    from onnxzip.statistics import Collector  # it runs on this module's Runner

    keys = sorted(set(keys))
    if not keys:
        return {}
    collector = Collector(model, in_graph=False)
    for tensor, axis in keys:
        collector.channel_moments(tensor, axis)
    found = collector.run(
        samples,
        batch_size,
        split,
        holdout,
        name=name,
        desc="channel statistics",
        optimization="basic",
    )
    return {key: (sums.mean(), sums.std()) for key, sums in found.channels.items()}
