"""What a model is: opsets, inputs and outputs, op histogram, parameters, size and MACs.

MACs (multiply-accumulates) are counted from inferred shapes, one sample at a time, with each
op family's formula from the metatype table (``onnxzip/ir/ops.py``):

* Conv:          MACs = |Y| / N * (C_in / group) * prod(kernel)   (Y the output, N its batch)
                 = prod(Y.shape[1:]) * prod(W.shape[1:])
* ConvTranspose: MACs = prod(X.shape[1:]) * prod(W.shape[1:])      (each input pixel scatters
                 a C_out/group x kernel patch)
* Gemm:          MACs = M * N * K, with M the output's first dim
* MatMul:        MACs = prod(Y.shape) * K, K the contracted dim of the first operand

A symbolic dimension that is the batch dimension of a graph input counts as 1. Other symbolic
dimensions (a sequence length) also count as 1, so a transformer's MACs are per token, and the
total is marked incomplete; a node whose shapes are unknown counts nothing.
Biases, activations and normalisation are not counted: they are a few percent at most in the
networks onnxzip targets and no int8 kernel changes their cost.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxzip import data as data_mod
from onnxzip import floors, io, passes
from onnxzip.errors import InputError, ModelError
from onnxzip.ir import ops
from onnxzip.passes import const_array
from onnxzip.quantize.params import pair_overflow_channels
from onnxzip.report import table

logger = logging.getLogger(__name__)

# Integer initializers of these types are shapes, axes and indices, not parameters.
_INDEX_TYPES = {ir.DataType.INT64}


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: list
    # outputs: the kind the quality floors judge it as, per part (onnxzip.floors)
    kinds: list[str] = field(default_factory=list)


@dataclass
class NodeMacs:
    node: str
    op_type: str
    macs: int | None


@dataclass
class InspectReport:
    """Everything ``onnxzip inspect`` prints, as data."""

    source: str
    ir_version: int
    opsets: dict[str, int]
    producer: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    op_histogram: dict[str, int]
    nodes: int
    parameters: int
    weight_bytes: int
    file_bytes: int | None
    macs: int
    macs_complete: bool
    macs_per_node: list[NodeMacs] = field(default_factory=list)
    groups: list | None = None  # channel groups, with --groups
    # int8 weight tensors of Conv/Gemm/MatMul-family nodes, and how many of them hold a channel
    # that can saturate onnxruntime's 16-bit pair sums on x86 CPUs without VNNI (None: no such
    # weights)
    int8_weights: tuple[int, int] | None = None
    # the input shapes MACs were counted at (from samples or --input-shape), None: the model's
    macs_shapes: dict[str, list[int]] | None = None
    # weighted ops inside If/Loop/Scan bodies, which MACs do not count (a branch or an
    # iteration count is a run-time choice)
    macs_uncounted: int = 0
    # (output, tensor) of each ZipMap cut off while onnxzip works and put back when it writes
    detached: list[tuple[str, str]] = field(default_factory=list)

    def format(self, per_node: bool = False) -> str:
        lines = [
            f"model       {self.source}",
            f"ir_version  {self.ir_version}",
            "opsets      "
            + ", ".join(f"{d or 'ai.onnx'}:{v}" for d, v in sorted(self.opsets.items())),
        ]
        if self.producer:
            lines.append(f"producer    {self.producer}")
        for kind, items in (("input", self.inputs), ("output", self.outputs)):
            for t in items:
                dims = ", ".join("?" if d is None else str(d) for d in t.shape)
                judged = f"  ({'; '.join(t.kinds)})" if t.kinds else ""
                lines.append(f"{kind:<11} {t.name}: {t.dtype}[{dims}]{judged}")
        for name, tensor in self.detached:
            lines.append(
                f"output      {name}: ZipMap of {tensor} (a sequence of maps: cut off while "
                "onnxzip works, put back in every model it writes)"
            )
        lines.append(f"nodes       {self.nodes}")
        lines.append(f"parameters  {self.parameters:,}")
        lines.append(f"weights     {self.weight_bytes:,} bytes")
        if self.file_bytes is not None:
            lines.append(f"file        {self.file_bytes:,} bytes")
        note = (
            ""
            if self.macs_complete
            else " (symbolic dims other than the batch counted as 1, or shapes unknown)"
        )
        if self.macs_shapes:
            note += " at input shapes " + ", ".join(
                f"{k}={'x'.join(map(str, v))}" for k, v in self.macs_shapes.items()
            )
        if self.macs_uncounted:
            note += (
                f" (main graph only: {self.macs_uncounted} weighted ops inside If/Loop/Scan "
                "bodies not counted)"
            )
        lines.append(f"MACs        {self.macs:,} per sample{note}")
        if self.int8_weights is not None:
            total, risky = self.int8_weights
            lines.append(
                f"int8        {total} weight tensors, "
                + (
                    f"{risky} can saturate onnxruntime's int8 kernels on x86 CPUs without VNNI "
                    "(quantize with --reduce-range on to serve there)"
                    if risky
                    else "all safe on x86 CPUs without VNNI"
                )
            )
        lines.append("")
        hist = sorted(self.op_histogram.items(), key=lambda kv: (-kv[1], kv[0]))
        lines.append(table(["op", "count"], [[op, n] for op, n in hist]))
        if per_node and self.macs_per_node:
            lines.append("")
            total = max(self.macs, 1)
            rows = [
                [m.node, m.op_type, m.macs, None if m.macs is None else 100.0 * m.macs / total]
                for m in self.macs_per_node
            ]
            lines.append(table(["node", "op", "MACs", "%"], rows))
        return "\n".join(lines)


# in ``batch_names``: the model's batch dimension has no name (skl2onnx writes ``[None, 64]``)
UNNAMED_BATCH = ""


def _dims(value: ir.Value, batch_names: set[str]) -> list[int] | None:
    if value.shape is None:
        return None
    dims = []
    for i, d in enumerate(value.shape):
        if isinstance(d, int):
            dims.append(d)
        elif d.value is not None and d.value in batch_names:
            dims.append(1)
        elif (
            i == 0
            and UNNAMED_BATCH in batch_names
            and (d.value is None or d.value.startswith("unk__"))
        ):
            dims.append(1)  # a leading dim unnamed (or named by onnx's inference) like the batch
        else:
            return None
    return dims


def _const_shape(value: ir.Value | None, batch_names: set[str]) -> list[int] | None:
    if value is None:
        return None
    if value.const_value is not None:
        return list(value.const_value.shape)
    return _dims(value, batch_names)


def _weight_codes(node: ir.Node) -> tuple[np.ndarray, int] | None:
    """The constant int8 weight codes of a Conv/Gemm/MatMul-family node (through a
    DequantizeLinear for QDQ) and their output-channel axis; None for anything else,
    depthwise Conv included (onnxruntime's depthwise kernel adds in 32 bits)."""
    if not ops.is_weighted(node) or len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    if node.op_type in ops.FLOAT_WEIGHTED_OPS:
        dq = node.inputs[1].producer()
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        codes = const_array(dq.inputs[0])
    else:  # ConvInteger, MatMulInteger
        codes = const_array(node.inputs[1])
    if codes is None or codes.dtype != np.int8 or codes.ndim < 2:
        return None
    if ops.single_channel_groups(node, codes.shape):
        return None
    return codes, ops.weight_channel_axis(node)


def int8_weight_risk(model: ir.Model) -> tuple[int, int] | None:
    """(int8 weight tensors, how many can saturate on x86 without VNNI), or None if none."""
    total = risky = 0
    for node in model.graph:
        found = _weight_codes(node)
        if found is None:
            continue
        total += 1
        risky += pair_overflow_channels(*found) > 0
    return (total, risky) if total else None


def symbolic_dims(model: ir.Model) -> set[str]:
    """Every symbolic dimension name in the main graph."""
    names = set()
    values = list(model.graph.inputs) + [v for n in model.graph for v in n.outputs]
    for value in values:
        if value.shape is not None:
            names.update(d.value for d in value.shape if not isinstance(d, int) and d.value)
    return names


def node_macs(node: ir.Node, batch_names: set[str]) -> int | None:
    """MACs of one weighted node for one sample (None if unknown), symbolic dims in
    ``batch_names`` counted as 1. Integer forms count as their float ops: ConvInteger as Conv,
    MatMulInteger as MatMul."""
    return ops.node_macs(node, lambda value: _const_shape(value, batch_names))


# The input ports of quantized ops that hold scales and zero points: quantization parameters,
# which are counted in the weight bytes but not as parameters (a quantized model has as many
# parameters as its float one).
_QUANTIZATION_PORTS = {
    "QuantizeLinear": {1, 2},
    "DequantizeLinear": {1, 2},
    "DynamicQuantizeLinear": set(),
    "MatMulInteger": {2, 3},
    "ConvInteger": {2, 3},
    "MatMulIntegerToFloat": {2, 3, 4, 5},
    "DynamicQuantizeMatMul": {2, 3},
    "MatMulNBits": {2, 3},
    "QLinearConv": {1, 2, 4, 5, 6, 7},
    "QLinearMatMul": {1, 2, 4, 5, 6, 7},
}


def _quantization_parameter(value: ir.Value) -> bool:
    uses = value.uses()
    return bool(uses) and all(u.idx in _QUANTIZATION_PORTS.get(u.node.op_type, ()) for u in uses)


def _parameters(model: ir.Model) -> tuple[int, int]:
    """The values of the model's float and quantized weights and biases (not its shapes,
    indices, scales or zero points), and the bytes of every constant: those of the main graph
    and of If/Loop/Scan bodies (an exporter may keep a model's every weight in the branches of
    an If, as silero-vad's does)."""
    count = nbytes = 0
    tensors = [
        (v, v.const_value)
        for graph in io.all_graphs(model)
        for v in graph.initializers.values()
        if v.const_value is not None
    ]
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attr = node.attributes.get("value")
            if attr is not None and attr.type == ir.AttributeType.TENSOR:
                tensors.append((node.outputs[0], attr.as_tensor()))
    for value, tensor in tensors:
        if tensor.dtype in _INDEX_TYPES:
            continue
        nbytes += ops.tensor_nbytes(tensor)
        if _quantization_parameter(value):
            continue
        packed = next((u.node for u in value.uses() if u.node.op_type == "MatMulNBits"), None)
        if packed is not None and "K" in packed.attributes and "N" in packed.attributes:
            # codes packed several to a byte: the weight's own K x N values
            count += packed.attributes["K"].as_int() * packed.attributes["N"].as_int()
        else:
            count += math.prod(tensor.shape.numpy())
    return int(count), int(nbytes)


def _tensor_info(value: ir.Value) -> TensorInfo:
    shape = []
    if value.shape is not None:
        shape = [d if isinstance(d, int) else d.value for d in value.shape]
    dtype = str(np.dtype(value.dtype.numpy())) if value.dtype is not None else "?"
    return TensorInfo(value.name or "", dtype, shape)


def _output_info(value: ir.Value) -> TensorInfo:
    info = _tensor_info(value)
    parts = floors.parts_of(value)
    if len(parts) == 1:
        info.kinds = [parts[0].kind]
    else:
        info.kinds = [f"{p.start}:{p.stop} on axis {p.axis} {p.kind}" for p in parts]
    return info


def sample_shapes(samples) -> dict[str, list[int]]:
    """The input shapes of one real sample (batch 1), for counting MACs where the model's own
    shapes are symbolic (image height and width, sequence length)."""
    batch = next(iter(samples.batches(1)))
    shapes = {}
    for name, array in batch.inputs.items():
        dims, a = list(array.shape), batch.axis(name)
        if a is not None and dims:
            dims[a] = 1
        shapes[name] = dims
    return shapes


def shapes_for_macs(model: ir.Model, samples) -> dict[str, list[int]] | None:
    """The samples' input shapes when some model input has a symbolic dimension besides the
    batch (MACs would otherwise count it as 1), else None."""
    if samples is None:
        return None
    for value in model.graph.inputs:
        if value.is_initializer() or value.shape is None:
            continue
        if any(not isinstance(d, int) for d in list(value.shape)[1:]):
            return sample_shapes(samples)
    return None


FOLD_FOR_MACS_BYTES = 256 * 2**20


def _shapes_folded(model: ir.Model) -> ir.Model:
    """``model``, or a copy with its constant subgraphs folded and the shapes that makes
    computable inferred (the stages' own ``passes.FoldConstants`` step): shapes computed from
    constants at run time (a TorchScript export's ``F.pad`` pads) leave everything after them
    unknown until folded. Not on models above ``FOLD_FOR_MACS_BYTES`` of weights: a fold of a
    weight's Transpose would hold a second copy of it just to count."""
    if io.weights_nbytes(model) > FOLD_FOR_MACS_BYTES:
        return model
    if not any(passes.foldable(n) for n in model.graph):
        return model
    folded = model.clone()
    passes.FoldConstants()(folded)
    return folded


def with_input_shapes(model: ir.Model, shapes: dict[str, list[int]], name: str = "model"):
    """A copy of ``model`` with the given graph input shapes and every shape inferred from them.

    A symbolic first dimension stays symbolic, so MACs are still counted per sample.

    Raises:
        InputError: an input name the model does not have, or a shape of the wrong rank.
        ModelError: the shapes contradict the model (shape inference fails).
    """
    fixed = model.clone()
    inputs = {v.name: v for v in fixed.graph.inputs if not v.is_initializer()}
    for key, dims in shapes.items():
        value = inputs.get(key)
        if value is None:
            raise InputError(f"{name}: input shape for '{key}', which is not a model input")
        old = list(value.shape) if value.shape is not None else None
        if old is not None and len(old) != len(dims):
            raise InputError(
                f"{name}: input '{key}' has rank {len(old)}, the shape given has {len(dims)}"
            )
        if old and not isinstance(old[0], int):
            dims = [old[0], *dims[1:]]
        value.shape = ir.Shape(dims)
    return io.reinfer_shapes(fixed, name)


# Peak bytes of a run per byte of its intermediate tensors: onnxruntime's arena holds them (its
# memory plan reuses some), tensors fetched for statistics are copied out, and the numpy
# reductions of statistics work on float64 copies of what they reduce.
RUN_OVERHEAD = 3


@dataclass
class MemoryFit:
    """How many samples one run may hold under a memory budget."""

    budget: int  # bytes
    per_sample: int  # estimated peak bytes of one sample's run
    batch: int  # samples per run after the cap
    requested: int

    @property
    def capped(self) -> bool:
        return self.batch < self.requested

    def describe(self) -> str:
        return (
            f"batches of {self.batch} sample{'s' if self.batch != 1 else ''} "
            f"({'capped from ' + str(self.requested) + ' by' if self.capped else 'within'} the "
            f"memory budget of {self.budget / 2**30:.1f} GiB; about "
            f"{self.per_sample / 2**20:,.0f} MiB per sample)"
        )


def _element_bytes(dtype: ir.DataType) -> float:
    """Bytes per element; strings (of unknown length) count as one 64-bit pointer."""
    try:
        return max(1.0, dtype.itemsize)
    except TypeError:
        return 8.0


def activation_bytes(model: ir.Model, shapes: dict[str, list[int]]) -> int:
    """Bytes of every intermediate tensor of one run at these input shapes (batch 1); tensors
    whose shape is still unknown count nothing."""
    fixed = with_input_shapes(model, shapes)
    total = 0
    for node in fixed.graph:
        for value in node.outputs:
            if value.shape is None or value.dtype is None:
                continue
            dims = [d if isinstance(d, int) else 1 for d in value.shape]
            total += int(math.prod(dims) * _element_bytes(value.dtype))
    return total


def fit_memory(model: ir.Model, samples, requested: int, budget: int | None = None) -> MemoryFit:
    """Caps ``samples``' batches so that one run fits ``budget`` bytes (default: half the
    memory available now); the estimate is ``RUN_OVERHEAD`` times the bytes of one sample's
    intermediate tensors at the shapes of the first real sample."""
    if budget is None:
        available = data_mod.available_memory()
        budget = available // 2 if available else 2**34
    try:
        per_sample = RUN_OVERHEAD * activation_bytes(model, sample_shapes(samples))
    except (InputError, ModelError) as exc:  # shapes it cannot infer: no cap
        logger.info("activation memory not estimated: %s", exc)
        per_sample = 0
    batch = requested
    if per_sample > 0:
        batch = max(1, min(requested, budget // per_sample))
        if batch < requested:
            samples.max_batch = batch
            if budget < per_sample:
                logger.warning(
                    "one sample needs about %.1f GiB, over the memory budget of %.1f GiB",
                    per_sample / 2**30,
                    budget / 2**30,
                )
    return MemoryFit(budget, per_sample, batch, requested)


def inspect_model(
    model,
    *,
    source: str | None = None,
    input_shapes: dict[str, list[int]] | None = None,
    strict_shapes: bool = True,
) -> InspectReport:
    """Describes a model given as a path, ``ModelProto`` or ``onnx_ir.Model``.

    ``input_shapes`` (e.g. from ``sample_shapes``) fixes symbolic non-batch input dimensions
    for counting MACs; without it they count as 1 and the total is marked incomplete. With
    ``strict_shapes=False`` shapes that do not infer fall back to that instead of raising.

    Raises:
        ModelError: the model cannot be loaded, or ``input_shapes`` contradict it.
    """
    file_bytes = None
    if isinstance(model, (str, Path)):
        source = source or str(model)
    ir_model = io.load_model(model, name=source)
    if isinstance(model, (str, Path)):
        file_bytes = io.file_size(model)
    counted = _shapes_folded(ir_model)
    if input_shapes:
        try:
            counted = with_input_shapes(counted, input_shapes, source or "model")
        except InputError:
            if strict_shapes:
                raise
            # Shapes taken from samples that the model's inference cannot use: count as before.
            logger.warning("MACs counted at the model's own shapes: the samples' do not infer")
            input_shapes = None
    graph = ir_model.graph
    batch_names = {
        v.shape[0].value or UNNAMED_BATCH
        for v in graph.inputs
        if not v.is_initializer()
        and v.shape is not None
        and len(v.shape) > 0
        and isinstance(v.shape[0], ir.SymbolicDim)
    }

    histogram = Counter()
    uncounted = 0
    for node in ir.traversal.RecursiveGraphIterator(graph):
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        histogram[key] += 1
        uncounted += node.graph is not graph and ops.counts_macs(node)

    per_node = []
    complete = True
    symbolic = symbolic_dims(counted)
    for node in counted.graph:
        if ops.counts_macs(node):
            macs = node_macs(node, batch_names)
            if macs is None:
                # Sequence lengths and other symbolic dims count as 1: MACs per token.
                complete = False
                macs = node_macs(node, symbolic)
            per_node.append(NodeMacs(node.name or node.outputs[0].name, node.op_type, macs))
    params, nbytes = _parameters(ir_model)
    return InspectReport(
        source=source or "model",
        ir_version=ir_model.ir_version,
        opsets=dict(ir_model.opset_imports),
        producer=" ".join(p for p in (ir_model.producer_name, ir_model.producer_version) if p),
        inputs=[_tensor_info(v) for v in graph.inputs if not v.is_initializer()],
        outputs=[_output_info(v) for v in graph.outputs],
        op_histogram=dict(histogram),
        nodes=sum(histogram.values()),
        parameters=params,
        weight_bytes=nbytes,
        file_bytes=file_bytes,
        macs=sum(m.macs or 0 for m in per_node),
        macs_complete=complete,
        macs_per_node=per_node,
        int8_weights=int8_weight_risk(ir_model),
        macs_shapes=dict(input_shapes) if input_shapes else None,
        macs_uncounted=int(uncounted),
        detached=io.detached_outputs(ir_model),
    )
