"""Loading and saving models: the one module of onnxzip that imports ``onnx``.

Everything else in onnxzip works on ``onnx_ir`` objects. This module turns a path or a
``ModelProto`` into an ``onnx_ir.Model`` that the installed onnxruntime can run, and writes one
back.

Normalisation on load:
  * the default-domain opset is kept when the installed onnxruntime runs it (``max_opset()``:
    the newest opset its CPU kernels implement and onnx knows); below 13 it is raised to 13 with
    ``onnx.version_converter`` (QDQ with per-channel axes and most channel rules need it); above
    ``max_opset()`` it is lowered, and a model whose ops cannot be expressed there is refused,
    naming the op. ``convert_opset`` targets an older runtime (``--target-opset``);
  * the IR version is capped at the newest the installed onnxruntime reads (``max_ir_version()``);
  * shapes are inferred (``data_prop`` on), so every value carries the type and shape later passes
    read.

Saving checks the model with ``onnx.checker`` (full check) *before* it reaches the target path:
the model is written to a temporary folder beside the target, checked there, then renamed into
place, so a crash never leaves a half-written file at the target. Models whose weights exceed
the 2 GB protobuf limit get their tensors in an external data file beside the model.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx.checker
import onnx.defs
import onnx.external_data_helper
import onnx.helper
import onnx.numpy_helper
import onnx.shape_inference
import onnx.version_converter
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnxzip import leases
from onnxzip.errors import InputError, ModelError
from onnxzip.ir import ops

logger = logging.getLogger(__name__)

MIN_OPSET = 13
# Protobuf cannot serialise a message of 2 GiB or more; leave headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("==>"):
            return line
    return text.splitlines()[0]


def _default_opset(proto: onnx.ModelProto) -> int | None:
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    return None


_LIMITS: dict[str, int] = {}


_CPU_KERNELS: list[tuple[str, str, int, int]] | None = None


def _cpu_kernels() -> list[tuple[str, str, int, int]] | None:
    """(domain, op, first opset, last opset) of each CPU kernel of the installed onnxruntime,
    read once from its kernel registry; None where the build does not expose it."""
    global _CPU_KERNELS
    if _CPU_KERNELS is None:
        try:
            from onnxruntime.capi import _pybind_state

            _CPU_KERNELS = [
                ("" if d.domain == "ai.onnx" else d.domain, d.op_name, *d.version_range)
                for d in _pybind_state.get_all_opkernel_def()
                if d.provider == "CPUExecutionProvider"
            ]
        except Exception:  # a build without the registry
            return None
    return _CPU_KERNELS


def max_opset() -> int:
    """The newest default-domain opset both onnx and the installed onnxruntime know: the highest
    opset at which onnxruntime's CPU kernels start (1.32: 28), capped by onnx's own."""
    if "opset" not in _LIMITS:
        kernels = _cpu_kernels()
        starts = [lo for domain, _, lo, _ in kernels or [] if domain == ""]
        runtime = max(starts) if starts else 21  # no registry to read: assume 1.20's
        _LIMITS["opset"] = max(MIN_OPSET, min(onnx.defs.onnx_opset_version(), runtime))
    return _LIMITS["opset"]


def runtime_has_kernel(op_type: str, opset: int, domain: str = "") -> bool:
    """Whether the installed onnxruntime has a CPU kernel for ``op_type`` at ``opset``."""
    kernels = _cpu_kernels()
    if kernels is None:
        return True  # cannot tell: assume it has
    domain = "" if domain == "ai.onnx" else domain
    return any(d == domain and op == op_type and lo <= opset <= hi for d, op, lo, hi in kernels)


def max_ir_version() -> int:
    """The newest IR version both onnx and the installed onnxruntime read (probed once)."""
    if "ir" not in _LIMITS:
        import onnxruntime

        found = 10
        graph = onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])],
            "probe",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        )
        probe = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 4
        for version in range(onnx.IR_VERSION, 10, -1):
            probe.ir_version = version
            try:
                onnxruntime.InferenceSession(
                    probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
                )
            except Exception:
                continue
            found = version
            break
        _LIMITS["ir"] = found
    return _LIMITS["ir"]


def _blocking_ops(proto: onnx.ModelProto, version: int, target: int) -> list[str]:
    """Ops of the default domain whose definition at ``version`` is newer than ``target``."""
    blocking = []
    for op in sorted({n.op_type for n in proto.graph.node if n.domain in ("", "ai.onnx")}):
        try:
            schema = onnx.defs.get_schema(op, version, "")
        except onnx.defs.SchemaError:
            blocking.append(f"{op} (unknown op)")
            continue
        if schema.since_version > target:
            try:
                onnx.defs.get_schema(op, target, "")
                blocking.append(f"{op} (changed in opset {schema.since_version})")
            except onnx.defs.SchemaError:
                blocking.append(f"{op} (introduced in opset {schema.since_version})")
    return blocking


def _convert_opset(proto: onnx.ModelProto, target: int, source: str) -> onnx.ModelProto:
    version = _default_opset(proto)
    try:
        converted = onnx.version_converter.convert_version(proto, target)
    except Exception as exc:  # the converter raises bare RuntimeErrors from C++
        if version is not None and version > target:
            blocking = _blocking_ops(proto, version, target)
            if blocking:
                raise ModelError(
                    f"{source}: opset {version} cannot be converted down to {target}: "
                    f"op {blocking[0]} has no equivalent at opset {target}"
                ) from exc
        raise ModelError(
            f"{source}: cannot convert opset {version} to {target}: {_one_line(exc)}"
        ) from exc
    _check_interface_kept(proto, converted, f"{source}: converting opset {version} to {target}")
    logger.info("%s: converted opset %s -> %d", source, version, target)
    return converted


# onnxruntime registers these in the default domain below the opsets that define them (or in no
# ONNX opset at all); its transformer optimizer writes them into models of any opset.
_ORT_DEFAULT_DOMAIN_OPS = ("LayerNormalization", "SimplifiedLayerNormalization")
_PARKED = "onnxzip.parked"  # a private domain for the time of an opset conversion


def _standardise_ort_ops(proto: onnx.ModelProto, source: str) -> onnx.ModelProto | None:
    """A copy of ``proto`` in which onnxruntime's default-domain extensions are standard ONNX,
    or None when there are none. Both are exact:

    * ``LayerNormalization`` below opset 17 (onnxruntime's own schema, the one ONNX adopted at
      17): the model's default opset is raised to 17 (every other op converted by onnx's
      version converter, the LayerNormalizations parked in a private domain meanwhile);
    * ``SimplifiedLayerNormalization`` (RMSNorm, in no ONNX opset): spelled out as
      ``x / sqrt(mean(x^2 over the axes from axis) + epsilon) * scale``, the pattern
      onnxruntime fuses back into its kernel when it loads the model.
    """
    version = _default_opset(proto)
    found = {
        n.op_type
        for n in proto.graph.node
        if n.domain in ("", "ai.onnx") and n.op_type in _ORT_DEFAULT_DOMAIN_OPS
    }
    if version is None or not found:
        return None
    if found == {"LayerNormalization"} and version >= 17:
        return None
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    if "SimplifiedLayerNormalization" in found:
        _spell_rms_norms(copy)
    layer_norms = [
        n for n in copy.graph.node if n.op_type == "LayerNormalization" and n.domain == ""
    ]
    if version < 17 and layer_norms:
        for node in layer_norms:
            node.domain = _PARKED
        copy.opset_import.append(onnx.helper.make_opsetid(_PARKED, 1))
        copy = _convert_opset(copy, 17, source)
        for node in copy.graph.node:
            if node.domain == _PARKED:
                node.domain = ""
        kept = [o for o in copy.opset_import if o.domain != _PARKED]
        del copy.opset_import[:]
        copy.opset_import.extend(kept)
    logger.info("%s: onnxruntime's default-domain %s written as standard ONNX", source, found)
    return copy


def _spell_rms_norms(proto: onnx.ModelProto) -> None:
    """Replaces every default-domain ``SimplifiedLayerNormalization`` of the main graph with
    standard ops (the Reduce form of the model's opset: axes as an input from 18)."""
    opset = _default_opset(proto) or MIN_OPSET
    nodes = []
    made = []
    ranks = _ranks_of(proto)
    for node in proto.graph.node:
        if node.op_type != "SimplifiedLayerNormalization" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        axis, eps = int(attrs.get("axis", -1)), float(attrs.get("epsilon", 1e-5))
        p = f"{node.name or node.output[0]}__rms"
        x, scale, y = node.input[0], node.input[1], node.output[0]
        rank = ranks(x)
        if axis < 0 and rank is None:
            axis_list = list(range(axis, 0))
        else:
            start = axis % rank if rank is not None else axis
            axis_list = list(range(start, rank)) if rank is not None else [start]
        made.append(onnx.numpy_helper.from_array(np.array(eps, np.float32), f"{p}_eps"))
        square = onnx.helper.make_node("Mul", [x, x], [f"{p}_sq"], name=f"{p}_sq")
        if opset >= 18:
            made.append(onnx.numpy_helper.from_array(np.array(axis_list, np.int64), f"{p}_axes"))
            mean = onnx.helper.make_node(
                "ReduceMean", [f"{p}_sq", f"{p}_axes"], [f"{p}_ms"], name=f"{p}_ms", keepdims=1
            )
        else:
            mean = onnx.helper.make_node(
                "ReduceMean", [f"{p}_sq"], [f"{p}_ms"], name=f"{p}_ms", axes=axis_list, keepdims=1
            )
        shifted = onnx.helper.make_node("Add", [f"{p}_ms", f"{p}_eps"], [f"{p}_v"], name=f"{p}_v")
        root = onnx.helper.make_node("Sqrt", [f"{p}_v"], [f"{p}_rms"], name=f"{p}_rms")
        normed = onnx.helper.make_node("Div", [x, f"{p}_rms"], [f"{p}_n"], name=f"{p}_n")
        scaled = onnx.helper.make_node("Mul", [f"{p}_n", scale], [y], name=f"{p}_scale")
        nodes += [square, mean, shifted, root, normed, scaled]
        for extra in node.output[1:]:  # the inverse RMS output, where declared and read
            if extra:
                nodes.append(
                    onnx.helper.make_node("Reciprocal", [f"{p}_rms"], [extra], name=f"{p}_inv")
                )
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    proto.graph.initializer.extend(made)


def _ranks_of(proto: onnx.ModelProto):
    """``rank(name)``: a value's rank from the stored shapes, else from one shape inference of
    the model (run on the first value the stored shapes do not give)."""
    known = _ranks([*proto.graph.value_info, *proto.graph.input, *proto.graph.output])
    inferred: dict[str, int | None] | None = None

    def rank(name: str) -> int | None:
        nonlocal inferred
        if known.get(name) is not None:
            return known[name]
        if inferred is None:
            try:
                inferred = _ranks(onnx.shape_inference.infer_shapes(proto).graph.value_info)
            except Exception:
                inferred = {}
        return inferred.get(name)

    return rank


def _ranks(values) -> dict[str, int | None]:
    return {
        v.name: len(v.type.tensor_type.shape.dim) if v.type.tensor_type.HasField("shape") else None
        for v in values
        if v.type.HasField("tensor_type")
    }


def _check_interface_kept(before: onnx.ModelProto, after: onnx.ModelProto, what: str) -> None:
    """The converter must not change what callers feed and fetch (Scan-8 to Scan-9 drops the
    batch axis from the scan inputs, for one)."""
    for kind, old, new in (
        ("input", _ranks(before.graph.input), _ranks(after.graph.input)),
        ("output", _ranks(before.graph.output), _ranks(after.graph.output)),
    ):
        for name, rank in old.items():
            if name in new and None not in (rank, new[name]) and rank != new[name]:
                raise ModelError(
                    f"{what} would change {kind} '{name}' from rank {rank} to {new[name]}"
                )


# Domains whose ops onnx or onnxruntime define; an op of any other domain (unless the model
# defines it as a function) has no schema to check it against and no kernel to run it with.
KNOWN_DOMAINS = frozenset(
    {"", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview", "ai.onnx.preview.training", "com.microsoft"}
)


def _graphs(proto: onnx.ModelProto):
    """The main graph and every subgraph (If/Loop/Scan bodies, nested)."""
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        yield graph
        for node in graph.node:
            for attr in node.attribute:
                graphs.extend([attr.g] if attr.HasField("g") else list(attr.graphs))


def _check_schemas(proto: onnx.ModelProto, source: str) -> None:
    local = {(f.domain, f.name) for f in proto.functions}
    for graph in _graphs(proto):
        for node in graph.node:
            if node.domain not in KNOWN_DOMAINS and (node.domain, node.op_type) not in local:
                raise ModelError(
                    f"{source}: op {node.op_type} of custom domain '{node.domain}' has no schema: "
                    "onnxzip can neither check nor run it"
                )


def _negative_dims_to_symbols(proto: onnx.ModelProto) -> int:
    """Some exporters (Paddle) store a dynamic dimension as ``dim_value: -1``, others a dynamic
    batch as ``dim_value: 0`` on the graph's inputs and outputs; each becomes a symbolic
    ``dim_param`` (named after the tensor and axis), as a dynamic dimension should be, so no
    batch of 0 samples is ever fed. Returns how many were rewritten (in place)."""
    count = 0
    main = proto.graph
    boundary_names = {v.name for v in (*main.input, *main.output)}
    for graph in _graphs(proto):
        for value in (*graph.input, *graph.output, *graph.value_info):
            if not value.type.HasField("tensor_type"):
                continue
            boundary = graph is main and value.name in boundary_names
            for axis, dim in enumerate(value.type.tensor_type.shape.dim):
                if not dim.HasField("dim_value"):
                    continue
                if dim.dim_value < 0 or (dim.dim_value == 0 and axis == 0 and boundary):
                    dim.dim_param = f"{value.name}_dim{axis}"
                    count += 1
    return count


def normalize_proto(
    proto: onnx.ModelProto,
    source: str = "model",
    base_dir: Path | None = None,
    *,
    owned: bool = False,
) -> onnx.ModelProto:
    """Returns a copy of ``proto`` at opset 13..``max_opset()``, IR <= ``max_ir_version()``,
    with inferred shapes. With ``owned`` (a message nobody else holds, e.g. one just read from
    a file) the proto itself is edited instead of copied: a 100 MB model's copy is 25,000
    freshly touched memory pages.

    Raises:
        ModelError: the opset cannot be converted, or shape inference fails.
    """
    _check_schemas(proto, source)
    version = _default_opset(proto)
    if version is not None and version > max_opset():
        proto = _convert_opset(proto, max_opset(), source)
    elif version is not None and version < MIN_OPSET:
        proto = _convert_opset(proto, MIN_OPSET, source)
    elif not owned:
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        proto = copy
    negative = _negative_dims_to_symbols(proto)  # on the copy: the caller's proto stays as it was
    if negative:
        logger.info("%s: %d dimensions stored as -1 read as symbolic", source, negative)
    # The IR version must be one that the opsets in use require (IR 3 files upgraded to opset 13
    # say IR 3, which also forbids initializers that are not graph inputs), and at most what
    # the installed onnxruntime reads.
    try:
        needed = onnx.helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
    except Exception:  # an opset onnx does not know: leave the IR version to the checks below
        needed = proto.ir_version
    proto.ir_version = min(max(proto.ir_version, needed), max_ir_version())
    try:
        # Strict: a model whose stored shapes contradict onnx's inference (the checker's full
        # check) is refused here, not after the work, when the result fails to save.
        _infer_shapes_in_place(proto, strict=True, base_dir=base_dir)
    except Exception as exc:
        raise ModelError(f"{source}: fails onnx shape inference: {_one_line(exc)}") from exc
    return proto


_SMALL_TENSOR = 1024  # elements: shape inference reads the values of small constants only


def _elements(tensor: onnx.TensorProto) -> int:
    count = 1
    for d in tensor.dims:
        count *= d
    return count


def _infer_shapes_in_place(
    proto: onnx.ModelProto, strict: bool = False, base_dir: Path | str | None = None
) -> None:
    """Runs onnx shape inference on a copy without the weights' data, then keeps its results.

    Serialising the weights dominates the cost of ``onnx.shape_inference`` on large models, and
    inference needs only their types and dims (values matter only for small shape constants).
    Small constants stored in external data files (exporters put every tensor there) are read
    into the copy from ``base_dir``: inference propagates shape values through them.
    """
    light = onnx.ModelProto()
    light.CopyFrom(proto)  # a memory copy: far cheaper than the serialisation inference does
    for tensor in light.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            if base_dir is not None and _elements(tensor) <= _SMALL_TENSOR:
                onnx.external_data_helper.load_external_data_for_tensor(tensor, str(base_dir))
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]
            continue
        if _elements(tensor) > _SMALL_TENSOR:
            for data_field in (
                "raw_data",
                "float_data",
                "int32_data",
                "int64_data",
                "double_data",
                "uint64_data",
            ):
                tensor.ClearField(data_field)
    inferred = onnx.shape_inference.infer_shapes(
        light, check_type=strict, strict_mode=strict, data_prop=True
    )
    inferred = _infer_through_fused_ops(light, inferred, strict)
    _fill_symbolic_dims(light, inferred)
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(inferred.graph.value_info)
    del proto.graph.output[:]
    proto.graph.output.extend(inferred.graph.output)


def _infer_through_fused_ops(
    light: onnx.ModelProto, inferred: onnx.ModelProto, strict: bool
) -> onnx.ModelProto:
    """onnx's inference stops at onnxruntime's fused ops (com.microsoft), whose schemas it does
    not have: everything after a SkipLayerNormalization or BiasGelu is left untyped. Their first
    output has the element type and shape of one input (the metatype table says which): give it
    that, infer again, and repeat while a fused op gains its output type (once per fused op on
    a chain, at most)."""
    fused = [
        (node, m)
        for node in inferred.graph.node
        if (m := ops.lookup(node.domain, node.op_type)) is not None
        and m.shape_from is not None
        and node.output
        and node.output[0]
    ]
    initializers = {t.name: t for t in light.graph.initializer}

    def dims_of(name: str, known: dict) -> list | None:
        if name in initializers:
            return list(initializers[name].dims)
        info = known.get(name)
        if info is None or not info.type.tensor_type.HasField("shape"):
            return None
        return [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in info.type.tensor_type.shape.dim
        ]

    for _ in range(len(fused)):
        known = {v.name: v for v in inferred.graph.value_info}
        known.update({v.name: v for v in inferred.graph.input})
        known.update({v.name: v for v in inferred.graph.output if v.type.HasField("tensor_type")})
        added = []
        for node, m in fused:
            out = node.output[0]
            src = node.input[m.shape_from] if len(node.input) > m.shape_from else ""
            have = known.get(out)
            if have is not None and have.type.tensor_type.HasField("shape"):
                continue
            if m.output_dims is not None:
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                dims = m.output_dims(attrs, [dims_of(i, known) if i else None for i in node.input])
                if have is not None and have.type.tensor_type.elem_type:
                    elem = have.type.tensor_type.elem_type  # onnx typed it: keep that
                elif src in known:
                    elem = known[src].type.tensor_type.elem_type
                elif src in initializers:
                    elem = initializers[src].data_type
                else:
                    elem = None
                if dims is None or not elem:
                    continue
                added.append(onnx.helper.make_tensor_value_info(out, elem, dims))
            elif src in known:
                info = onnx.ValueInfoProto()
                info.CopyFrom(known[src])
                info.name = out
                added.append(info)
        if not added:
            break
        names = {v.name for v in added}
        del light.graph.value_info[:]
        light.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in names)
        light.graph.value_info.extend(added)
        inferred = onnx.shape_inference.infer_shapes(
            light, check_type=strict, strict_mode=strict, data_prop=True
        )
    return inferred


def _open_dim(d: onnx.TensorShapeProto.Dimension) -> bool:
    """A dim onnx left unknown: no value, and no name or one it made up (``unk__N``)."""
    return not d.HasField("dim_value") and (not d.dim_param or d.dim_param.startswith("unk__"))


def _fill_symbolic_dims(light: onnx.ModelProto, inferred: onnx.ModelProto) -> None:
    """Fills the dims onnx's inference leaves open with onnxruntime's symbolic shape inference.

    onnx cannot divide symbolic products or see that two run-time dims are the same: a head
    reshape ``Concat(batch, sequence, [-1], [head size])`` leaves the head count unknown, and
    dims read back with ``Shape`` come out as fresh symbols. onnxruntime's symbolic inference
    (``onnxruntime.tools.symbolic_shape_infer``, sympy-based, what its quantization
    preprocessing runs) tracks them as expressions and knows the com.microsoft ops. Only open
    dims of values onnx gave a shape of the same rank are filled (a value or a name onnx
    inferred is kept), and a model symbolic inference cannot finish keeps what onnx inferred.
    Nothing runs when onnx left no dim open. Its own entry point saves a partial model into the
    working folder on failure, so its steps are run here instead.
    """
    infos = list(inferred.graph.value_info) + list(inferred.graph.output)
    if not any(
        _open_dim(d)
        for v in infos
        if v.type.HasField("tensor_type")
        for d in v.type.tensor_type.shape.dim
    ):
        return  # nothing to fill: every later step only touches open dims
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError:  # pragma: no cover - every supported onnxruntime ships it
        return
    symbolic_logger = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")
    level = symbolic_logger.level
    symbolic_logger.setLevel(logging.CRITICAL)
    copy = onnx.ModelProto()
    copy.CopyFrom(light)
    del copy.graph.value_info[:]
    copy.graph.value_info.extend(inferred.graph.value_info)
    try:
        engine = SymbolicShapeInference(2**31 - 1, True, False, 0)
        engine._preprocess(copy)
        for _ in range(1000):
            if not engine.run_:
                break
            engine._infer_impl()
        found = {v.name: v for v in engine.out_mp_.graph.value_info}
    except Exception as exc:  # its own bugs or ops it does not know: keep onnx's result
        logger.debug("symbolic shape inference did not finish: %s", _one_line(exc))
        return
    finally:
        symbolic_logger.setLevel(level)
    merged = onnx.GraphProto()
    merged.value_info.extend(inferred.graph.value_info)
    merged.output.extend(inferred.graph.output)
    # Values only where onnx cannot divide (a Reshape's -1, an Expand's run-time target): its
    # results elsewhere are not always right (a Slice whose end is computed, say), and a wrong
    # value makes onnxruntime refuse the model. Names of symbolic dims are taken everywhere.
    solved = {
        o
        for n in light.graph.node
        if n.op_type in ("Reshape", "Expand") and n.domain in ("", "ai.onnx")
        for o in n.output
    }
    changed = False
    for info in list(merged.value_info) + list(merged.output):
        other = found.get(info.name)
        if other is None or not other.type.tensor_type.HasField("shape"):
            continue
        mine, theirs = info.type.tensor_type, other.type.tensor_type
        if not mine.HasField("shape") or len(mine.shape.dim) != len(theirs.shape.dim):
            continue
        for d, t in zip(mine.shape.dim, theirs.shape.dim, strict=True):
            if not _open_dim(d):
                continue
            if t.HasField("dim_value") and t.dim_value > 0 and info.name in solved:
                d.dim_value = t.dim_value
                changed = True
            elif t.dim_param and not t.dim_param.startswith("unk__"):
                d.dim_param = t.dim_param
                changed = True
    changed = _fill_unsliced_axes(light, merged) or changed
    # Declared for every value, the fills must pass onnx's strict inference (broadcasts,
    # matrix dims), as they must when onnxruntime loads the model; a conflict drops the round.
    # Each round lets onnx carry the fills on, which may open more Slices to fill.
    for _ in range(4):
        if not changed:
            return
        check = onnx.ModelProto()
        check.CopyFrom(light)
        del check.graph.value_info[:]
        check.graph.value_info.extend(merged.value_info)
        try:
            checked = onnx.shape_inference.infer_shapes(
                check, check_type=True, strict_mode=True, data_prop=True
            )
        except Exception as exc:
            logger.debug("symbolic shapes dropped: %s", _one_line(exc))
            return
        del inferred.graph.value_info[:]
        inferred.graph.value_info.extend(checked.graph.value_info)
        del inferred.graph.output[:]
        inferred.graph.output.extend(checked.graph.output)
        merged = checked.graph
        changed = _fill_unsliced_axes(light, merged)


def _fill_unsliced_axes(light: onnx.ModelProto, merged: onnx.GraphProto) -> bool:
    """A Slice with run-time starts or ends but constant axes keeps every other axis as it is;
    onnx leaves them all unknown (rotary embeddings split the head size at ``size // 2``)."""
    infos = {v.name: v for v in list(light.graph.input) + list(merged.value_info)}
    constants = {t.name: t for t in light.graph.initializer}
    constants.update(
        {
            n.output[0]: n.attribute[0].t
            for n in light.graph.node
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
        }
    )
    changed = False
    for node in light.graph.node:
        if node.op_type != "Slice" or node.domain not in ("", "ai.onnx") or len(node.input) < 4:
            continue
        source, out = infos.get(node.input[0]), infos.get(node.output[0])
        axes = constants.get(node.input[3])
        if source is None or out is None or axes is None or _elements(axes) > 64:
            continue
        if axes.data_location == onnx.TensorProto.EXTERNAL:
            continue
        dims_in, dims_out = source.type.tensor_type.shape.dim, out.type.tensor_type.shape.dim
        if not source.type.tensor_type.HasField("shape") or len(dims_in) != len(dims_out):
            continue
        rank = len(dims_in)
        sliced = {int(a) % rank for a in onnx.numpy_helper.to_array(axes).reshape(-1)}
        for axis, (d, src) in enumerate(zip(dims_out, dims_in, strict=True)):
            if axis in sliced or not _open_dim(d) or _open_dim(src):
                continue
            d.CopyFrom(src)
            changed = True
    return changed


def _data_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes of a tensor's raw data from its type and dims (None: strings, unknown types)."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    if any(d < 0 for d in tensor.dims):
        return None
    try:
        bits = ir.DataType(tensor.data_type).bitwidth
    except (TypeError, ValueError):
        return None
    count = 1
    for d in tensor.dims:
        count *= d
    return (count * bits + 7) // 8


def _check_external_data(proto: onnx.ModelProto, base_dir: Path, source: str) -> bool:
    """Raises if a tensor's external data file is missing or short; says whether there are any."""
    found = False
    tensors = list(proto.graph.initializer)
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                tensors.append(attr.t)
    for tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            needed = _data_bytes(tensor) if tensor.HasField("raw_data") else None
            if needed is not None and len(tensor.raw_data) != needed:
                raise ModelError(
                    f"{source}: tensor '{tensor.name}' holds {len(tensor.raw_data)} bytes, its "
                    f"type and dims need {needed}"
                )
            continue
        found = True
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        numbers = {}
        for key in ("offset", "length"):
            text = info.get(key, "0")
            try:
                numbers[key] = int(text)
            except ValueError:
                numbers[key] = -1
            if numbers[key] < 0:
                raise ModelError(
                    f"{source}: external data {key} of tensor '{tensor.name}' is not a "
                    f"non-negative integer ({text!r})"
                )
        path = (base_dir / location).resolve()
        if not location or not path.is_file():
            raise ModelError(
                f"{source}: external data file '{location}' for tensor '{tensor.name}' is missing"
            )
        needed = _data_bytes(tensor)
        if "length" in info and needed is not None and numbers["length"] != needed:
            raise ModelError(
                f"{source}: external data length of tensor '{tensor.name}' is "
                f"{numbers['length']} bytes, its type and dims need {needed}"
            )
        end = numbers["offset"] + (numbers["length"] if "length" in info else needed or 0)
        if end > path.stat().st_size:
            raise ModelError(
                f"{source}: external data file '{location}' is shorter than tensor "
                f"'{tensor.name}' needs ({path.stat().st_size} < {end} bytes)"
            )
    return found


def _read_proto(path: Path) -> onnx.ModelProto:
    source = str(path)
    if not path.exists():
        raise ModelError(f"{source}: no such file")
    if path.is_dir():
        raise ModelError(f"{source}: is a directory, not an ONNX model file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{source}: cannot read: {exc.strerror or exc}") from exc
    try:
        proto = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{source}: not a readable ONNX model ({_one_line(exc)})") from exc
    if proto.ir_version <= 0 or not proto.HasField("graph"):
        raise ModelError(f"{source}: not an ONNX model (no IR version or no graph)")
    has_external = _check_external_data(proto, path.parent, source)
    standard = _standardise_ort_ops(proto, source)
    try:
        # The bytes in hand are checked as they are; with external data the checker needs the
        # path to find the tensors' files.
        if standard is not None:
            if has_external:
                _check_with_empty_external_tensors(standard, path.parent)
            else:
                onnx.checker.check_model(standard)
            return standard
        onnx.checker.check_model(str(path) if has_external else data)
    except Exception as exc:  # ValidationError, or C++ errors surfaced as RuntimeError
        raise ModelError(f"{source}: fails onnx.checker: {_one_line(exc)}") from exc
    return proto


def _external_base_dir(model: ir.Model) -> Path | None:
    """The folder a model's external tensors are read from (None: none, or several folders)."""
    dirs = {
        str(v.const_value.base_dir)
        for v in model.graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    }
    return Path(next(iter(dirs))) if len(dirs) == 1 else None


def _is_normalized(model: ir.Model) -> bool:
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if model.ir_version > max_ir_version() or (
        opset is not None and not MIN_OPSET <= opset <= max_opset()
    ):
        return False
    return all(v.type is not None for node in model.graph for v in node.outputs if v.name)


def load_model(model, *, name: str | None = None) -> ir.Model:
    """Loads and normalises a model given as a path, a ``ModelProto`` or an ``onnx_ir.Model``.

    External data files are resolved beside the model file and stay memory-mapped.

    Args:
        model: path to an ``.onnx`` file, an ``onnx.ModelProto`` or an ``onnx_ir.Model``.
        name: how error messages name the model (defaults to the path).

    Returns:
        An ``onnx_ir.Model`` at opset 13..``max_opset()``, with inferred shapes. An ``onnx_ir.Model``
        that already is all of that is returned as it is (not copied): clone it before editing.

    Raises:
        ModelError: missing or unreadable file, checker failure, missing external data,
            an opset that cannot be converted.
    """
    base_dir: Path | None = None
    owned = True  # the proto below is this function's own, unless the caller passed it
    if isinstance(model, ir.Model):
        if _is_normalized(model):
            return model
        proto = ir.to_proto(model)
        source = name or "model"
        base_dir = _external_base_dir(model)
    elif isinstance(model, onnx.ModelProto):
        source = name or "model"
        proto = _standardise_ort_ops(model, source) or model
        owned = proto is not model
        try:
            onnx.checker.check_model(proto)
        except Exception as exc:
            raise ModelError(f"{source}: fails onnx.checker: {_one_line(exc)}") from exc
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        source = name or str(path)
        proto = _read_proto(path)
        base_dir = path.parent
        for location in _external_locations(proto):
            leases.hold(base_dir / location)  # the command line: held against truncation
    else:
        raise InputError(f"cannot load a model from {type(model).__name__}")
    detached = _detach_zipmaps(proto)
    proto = normalize_proto(detached, source, base_dir, owned=owned or detached is not proto)
    _refuse_map_types(proto, source)
    result = ir.serde.deserialize_model(proto)
    if base_dir is not None:
        ir.external_data.set_base_dir(result.graph, str(base_dir))
    return result


# Model metadata key under which a detached ZipMap waits to be put back when the model is saved
ZIPMAP_KEY = "onnxzip.detached_zipmap"


def _detach_zipmaps(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A scikit-learn classifier's ZipMap (probabilities as a sequence of maps, skl2onnx's
    default) cut off the main graph: the tensor it reads becomes a graph output in its place
    (what verification compares; ``normalize_proto``'s inference types it), and the node, its
    output and where it stood are kept in the model's metadata for ``save_model`` to put back. The IR onnxzip edits in has no map type.
    Returns ``proto`` unchanged when there is no such ZipMap (a copy otherwise)."""
    graph = proto.graph
    outputs = [o.name for o in graph.output]
    read = {name for node in graph.node for name in node.input}
    found = [
        n
        for n in graph.node
        if n.op_type == "ZipMap"
        and n.domain == "ai.onnx.ml"
        and len(n.output) == 1
        and n.output[0] in outputs
        and n.output[0] not in read
        and len(n.input) == 1
    ]
    if not found:
        return proto
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    graph = copy.graph
    records = []
    for zipmap in found:
        out = zipmap.output[0]
        index = [o.name for o in graph.output].index(out)
        info = graph.output[index]
        tensor = zipmap.input[0]
        added = tensor not in [o.name for o in graph.output]
        records.append(
            {
                "node": base64.b64encode(zipmap.SerializeToString()).decode(),
                "output": base64.b64encode(info.SerializeToString()).decode(),
                "index": index,
                "added": added,
                "tensor": tensor,
            }
        )
        del graph.output[index]
        if added:
            graph.output.insert(index, onnx.helper.make_value_info(tensor, onnx.TypeProto()))
        kept = [n for n in graph.node if not (n.op_type == "ZipMap" and list(n.output) == [out])]
        del graph.node[:]
        graph.node.extend(kept)
    entry = copy.metadata_props.add()
    entry.key, entry.value = ZIPMAP_KEY, json.dumps(records)
    return copy


def detached_outputs(model: ir.Model) -> list[tuple[str, str]]:
    """(output, tensor it maps) of each ZipMap ``load_model`` cut off this model."""
    text = model.metadata_props.get(ZIPMAP_KEY)
    if not text:
        return []
    found = []
    for record in json.loads(text):
        info = onnx.ValueInfoProto.FromString(base64.b64decode(record["output"]))
        found.append((info.name, record["tensor"]))
    return found


def _reattach_zipmaps(proto: onnx.ModelProto, target) -> onnx.ModelProto:
    """Puts back what ``_detach_zipmaps`` cut off (on a written model's proto)."""
    entries = [e for e in proto.metadata_props if e.key == ZIPMAP_KEY]
    if not entries:
        return proto
    records = json.loads(entries[0].value)
    kept = [e for e in proto.metadata_props if e.key != ZIPMAP_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    graph = proto.graph
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    produced |= {t.name for t in graph.initializer}
    for record in reversed(records):
        node = onnx.NodeProto.FromString(base64.b64decode(record["node"]))
        info = onnx.ValueInfoProto.FromString(base64.b64decode(record["output"]))
        if record["tensor"] not in produced:
            raise ModelError(
                f"{target}: the ZipMap's input '{record['tensor']}' is gone from the model"
            )
        names = [o.name for o in graph.output]
        if record["added"] and record["tensor"] in names:
            del graph.output[names.index(record["tensor"])]
        graph.node.append(node)
        graph.output.insert(min(record["index"], len(graph.output)), info)
    if not any(o.domain == "ai.onnx.ml" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("ai.onnx.ml", 1))
    return proto


def _has_map(t: onnx.TypeProto) -> bool:
    kind = t.WhichOneof("value")
    if kind == "map_type":
        return True
    if kind == "sequence_type":
        return _has_map(t.sequence_type.elem_type)
    if kind == "optional_type":
        return _has_map(t.optional_type.elem_type)
    return False


def _refuse_map_types(proto: onnx.ModelProto, source: str) -> None:
    """A value typed as a map (or a sequence of maps: scikit-learn classifiers' ZipMap output,
    skl2onnx's default) is refused in one line: the IR onnxzip edits models in has no map type.

    Raises:
        ModelError: naming the first such value and the export option that avoids it.
    """
    for graph in _graphs(proto):
        for kind, values in (
            ("input", graph.input),
            ("output", graph.output),
            ("value", graph.value_info),
        ):
            for v in values:
                if _has_map(v.type):
                    zipmap = any(n.op_type == "ZipMap" and v.name in n.output for n in graph.node)
                    hint = (
                        " (a ZipMap: export without it, e.g. skl2onnx's "
                        "options={'zipmap': False}, for a tensor of class probabilities)"
                        if zipmap
                        else ""
                    )
                    raise ModelError(
                        f"{source}: {kind} '{v.name}' is a map or a sequence of maps, which "
                        f"onnxzip cannot edit{hint}"
                    )


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialises an IR model to a ``ModelProto`` (tensors included)."""
    return ir.to_proto(model)


def model_bytes(model: ir.Model, stubs: frozenset[str] = frozenset()) -> bytes:
    """The serialised model with every tensor inline, for an in-memory onnxruntime session.

    Tensors still in external data files (models loaded from disk keep them memory-mapped) are
    read into the message; only for models under 2 GB. ``stubs`` names external tensors left
    as they are (their data reach onnxruntime another way).
    """
    proto = ir.to_proto(model)
    base_dirs = {
        name: value.const_value.base_dir
        for name, value in model.graph.initializers.items()
        if isinstance(value.const_value, ir.ExternalTensor) and name not in stubs
    }
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL and tensor.name in base_dirs:
            onnx.external_data_helper.load_external_data_for_tensor(
                tensor, str(base_dirs[tensor.name])
            )
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    return proto.SerializeToString()


def drop_resident_pages(model: ir.Model) -> None:
    """Lets the OS drop the resident pages of every memory-mapped external tensor of the main
    graph (``madvise(MADV_DONTNEED)``: the mapping stays, and a later read faults the data back
    in from the file), so that weights already used stop counting in the process's memory."""
    for value in model.graph.initializers.values():
        drop_pages(value.const_value)


def drop_pages(tensor) -> None:
    """``drop_resident_pages`` for one tensor (nothing for a tensor held in memory)."""
    import mmap

    raw = getattr(tensor, "raw", None) if isinstance(tensor, ir.ExternalTensor) else None
    if raw is not None and not raw.closed and hasattr(mmap, "MADV_DONTNEED"):
        try:
            raw.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


def all_graphs(model: ir.Model) -> list[ir.Graph]:
    """The main graph and every If/Loop/Scan body that holds a node, nested ones included."""
    graphs = {id(model.graph): model.graph}
    graphs.update((id(n.graph), n.graph) for n in ir.traversal.RecursiveGraphIterator(model.graph))
    return list(graphs.values())


def weights_nbytes(model: ir.Model) -> int:
    """Bytes held by the initializers (of the main graph and of If/Loop/Scan bodies) and by
    the tensors of Constant nodes (exporters store weights either way)."""
    total = 0
    for graph in all_graphs(model):
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += ops.tensor_nbytes(value.const_value)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attr = node.attributes.get("value")
            if attr is not None and attr.type == ir.AttributeType.TENSOR:
                total += ops.tensor_nbytes(attr.as_tensor())
    return total


def _target_dir(target: Path) -> Path:
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{target}: output folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{target}: output folder '{folder}' is not writable")
    return folder


def _check_full(model: bytes | str, target: Path) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # ValidationError, or C++ errors surfaced as RuntimeError
        raise ModelError(
            f"{target}: the model to be written fails onnx.checker: {_one_line(exc)}"
        ) from exc


def _own_data_files(target: Path) -> list[Path]:
    """External data files of the model at ``target`` that onnxzip named after it
    (``<name>.data`` or ``<name>.<8 hex>.data`` in the same folder): replaced with the model."""
    if not target.is_file():
        return []
    pattern = re.compile(re.escape(target.name) + r"(\.[0-9a-f]{8})?\.data")
    return [
        f
        for f in external_data_files(target)
        if f.parent.resolve() == target.parent.resolve() and pattern.fullmatch(f.name)
    ]


def remove_stale_temporaries(folder: Path) -> None:
    """Removes ``.onnxzip-PID-*`` folders that a killed run left in ``folder`` (its process
    is gone); folders of running processes and anything else are left alone."""
    if os.name != "posix":
        return
    for path in folder.glob(".onnxzip-*-*"):
        pid = path.name.split("-")[1]
        if not pid.isdigit() or not path.is_dir() or path.is_symlink():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed %s, left by a run that was killed", path)
        except OSError:
            continue  # another user's process, or no permission to ask: leave it


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    external: bool = False,
) -> Path:
    """Checks and writes ``model`` to ``path`` atomically.

    The model is written into a temporary folder beside ``path``, checked there with
    ``onnx.checker.check_model(full_check=True)``, and only then renamed over ``path``.
    If its initializers exceed ``external_data_threshold`` bytes, or ``external`` is set (the
    input kept its weights outside, as torch.onnx's exporter writes them), tensors of 1 KiB
    and more go to ``<name>.<8 hex>.data`` beside the model.

    Returns:
        The path written.

    Raises:
        InputError: the folder is missing or not writable, or the disk is full.
        ModelError: the model fails the checker (nothing is written).
    """
    target = Path(path)
    if target.is_symlink():  # written through: the link keeps pointing at the new model
        target = target.resolve()
    folder = _target_dir(target)
    if target.is_dir():
        raise InputError(f"{target}: is a directory")
    if model.ir_version > max_ir_version():
        model.ir_version = max_ir_version()
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is not None and opset > max_opset():
        raise ModelError(
            f"{target}: refusing to write opset {opset} (the installed onnxruntime runs "
            f"<= {max_opset()})"
        )
    data_name = None
    if weights_nbytes(model) > external_data_threshold or (external and _has_large_tensor(model)):
        # A name unique to this write: it never overwrites another model's data, and readers
        # see the old model with its old data or the new one with its new data, never a mix.
        while data_name is None or (folder / data_name).exists():
            data_name = f"{target.name}.{secrets.token_hex(4)}.data"
    stale = _own_data_files(target)

    remove_stale_temporaries(folder)
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".onnxzip-{os.getpid()}-", dir=folder))
    except OSError as exc:
        raise InputError(f"{target}: cannot write in '{folder}': {exc.strerror or exc}") from exc
    try:
        tmp_model = tmp_dir / target.name
        data = None if data_name else model_bytes(model)
        detached = ZIPMAP_KEY in model.metadata_props
        if data is not None and detached:
            data = _reattach_zipmaps(onnx.ModelProto.FromString(data), target).SerializeToString()
        if data is not None:  # checked before any byte reaches the disk
            _check_full(data, target)
        try:
            if data is not None:
                with open(tmp_model, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            else:
                ir.save(
                    model,
                    tmp_model,
                    external_data=data_name,
                    size_threshold_bytes=min(1024, external_data_threshold),
                )
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise InputError(
                    f"{target}: disk full or file too large while writing ({exc.strerror})"
                ) from exc
            raise InputError(f"{target}: cannot write: {exc.strerror or exc}") from exc
        if data is None and detached:  # the graph's proto only: the weights stay in their file
            written = onnx.load(str(tmp_model), load_external_data=False)
            tmp_model.write_bytes(_reattach_zipmaps(written, target).SerializeToString())
        if data is None:  # with external data the checker reads the files just written
            _check_full(str(tmp_model), target)
            with open(tmp_model, "rb") as handle:
                os.fsync(handle.fileno())
        if data_name:
            os.replace(tmp_dir / data_name, folder / data_name)
        try:
            os.replace(tmp_model, target)
        except OSError:
            if data_name:
                (folder / data_name).unlink(missing_ok=True)
            raise
        for old in stale:  # what the replaced model referenced, now read by nobody
            if old.name != data_name:
                old.unlink(missing_ok=True)
    except OSError as exc:
        raise InputError(f"{target}: cannot write: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("wrote %s", target)
    return target


def _has_large_tensor(model: ir.Model) -> bool:
    return any(
        v.const_value is not None and ops.tensor_nbytes(v.const_value) >= 1024
        for v in model.graph.initializers.values()
    )


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The external data files a model file references (none when it cannot be read).

    Remembered per file version (inode, size, modification time): a command asks before its
    work, to guard its inputs, and again when it writes its output in the input's layout,
    and parsing a 100 MB model for that took 0.1 s each time."""
    p = Path(path)
    try:
        st = p.stat()
        version = (str(p.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        version = None
    if version is not None and version in _LOCATIONS:
        return [p.parent / location for location in _LOCATIONS[version]]
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception:  # not a model: load_model reports that in its own words
        return []
    locations = list(_external_locations(proto))
    if version is not None:
        if len(_LOCATIONS) >= 8:
            _LOCATIONS.pop(next(iter(_LOCATIONS)))
        _LOCATIONS[version] = locations
    return [p.parent / location for location in locations]


_LOCATIONS: dict[tuple, list[str]] = {}


def _check_with_empty_external_tensors(proto: onnx.ModelProto, base_dir: Path) -> None:
    """Runs onnx's checker on a model whose tensors live in external files (checked already by
    ``_check_external_data``: present, inside ``base_dir``, long enough) without reading them:
    each external tensor is checked as an empty inline one (this check does not infer shapes,
    so the empty stand-ins change nothing else it looks at)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for tensor in copy.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.dims[:]
            tensor.dims.append(0)  # no elements: no value field needed
    onnx.checker.check_model(copy)


def _external_locations(proto: onnx.ModelProto) -> list[str]:
    locations = set()
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(e.value for e in tensor.external_data if e.key == "location")
    return sorted(locations)


def file_size(path: str | os.PathLike) -> int:
    """Bytes on disk of a model file plus the external data files it references."""
    p = Path(path)
    return p.stat().st_size + sum(f.stat().st_size for f in external_data_files(p))


def onnx_package_dir() -> Path:
    """The installed onnx package (its backend test data hold real architectures)."""
    return Path(onnx.__file__).parent


def at_opset(model: ir.Model, opset: int | None, name: str = "model") -> ir.Model:
    """``model`` itself when ``opset`` is None or already its opset, else ``convert_opset``."""
    if opset is None or opset == model.opset_imports.get("", model.opset_imports.get("ai.onnx")):
        return model
    return convert_opset(model, opset, name)


def convert_opset(model: ir.Model, opset: int, name: str = "model") -> ir.Model:
    """A copy of ``model`` converted to default-domain ``opset`` (13..``max_opset()``) and
    normalised: for runtimes older than the installed one (``--target-opset``)."""
    if not MIN_OPSET <= opset <= max_opset():
        raise ModelError(f"{name}: target opset {opset} is outside {MIN_OPSET}..{max_opset()}")
    proto = ir.to_proto(model)
    if _default_opset(proto) != opset:
        proto = _convert_opset(proto, opset, name)
        # An older runtime reads only the IR versions of its time: the lowest the opsets need.
        try:
            needed = onnx.helper.find_min_ir_version_for(
                list(proto.opset_import), ignore_unknown=True
            )
            proto.ir_version = min(proto.ir_version, max(needed, 8))
        except Exception:  # an opset onnx does not know: keep the IR version
            pass
    return load_model(proto, name=name)


def reinfer_shapes(model: ir.Model, name: str = "model") -> ir.Model:
    """A copy of ``model`` with every intermediate shape inferred anew, strictly.

    For rewritten graphs: stale shapes are dropped first, and any inconsistency the rewrite
    introduced is an error rather than a model that fails later. The copy shares the main
    graph's tensors with ``model``: large weights are never serialised for inference (they were
    a second copy of every weight while it ran, and most of its time).

    Raises:
        ModelError: shape inference fails.
    """
    base_dirs = {
        str(v.const_value.base_dir)
        for v in model.graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    }
    for node in model.graph:
        for value in node.outputs:
            if not value.is_graph_output():
                value.shape = None
    # In-memory weights reach the message as external-data stubs: their dims, not their data
    held = {
        value.name: value.const_value
        for value in model.graph.initializers.values()
        if value.const_value is not None
        and not isinstance(value.const_value, ir.ExternalTensor)
        and value.const_value.size > _SMALL_TENSOR
    }
    for key, tensor in held.items():
        model.graph.initializers[key].const_value = ir.ExternalTensor(
            _SHAPE_ONLY, 0, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=key
        )
    try:
        proto = ir.to_proto(model)
    finally:
        for key, tensor in held.items():
            model.graph.initializers[key].const_value = tensor
    del proto.graph.value_info[:]
    try:
        _infer_shapes_in_place(proto, strict=True, base_dir=_external_base_dir(model))
    except Exception as exc:
        raise ModelError(
            f"{name}: shape inference failed after rewriting: {_one_line(exc)}"
        ) from exc
    result = ir.serde.deserialize_model(proto)
    for key, tensor in held.items():
        result.graph.initializers[key].const_value = tensor
    for base_dir in base_dirs:
        ir.external_data.set_base_dir(result.graph, base_dir)
    return result


def refresh_shapes(model: ir.Model, name: str = "model") -> int:
    """Infers anew, in place, the main graph's intermediate shapes that are not known (after a
    fold made computable what was not: pads or reshape targets computed from constants). Shapes
    already known stay as they are. Returns how many values got a better shape (0 when
    inference fails: the shapes stay as they were)."""
    values = [v for node in model.graph for v in node.outputs if not v.is_graph_output()]
    before = [(v, v.shape) for v in values]
    try:
        fresh = reinfer_shapes(model, name)
    except ModelError as exc:
        logger.info("%s: shapes not inferred again after folding: %s", name, exc)
        fresh = None
    found = {v.name: v for node in fresh.graph for v in node.outputs if v.name} if fresh else {}
    better = 0
    for value, shape in before:  # reinfer_shapes dropped them: what was known comes back
        value.shape = shape
        new = found.get(value.name)
        if new is None or new.shape is None or unknown_dims(new.shape) >= unknown_dims(shape):
            continue
        value.shape = new.shape
        if value.dtype is None and new.dtype is not None:
            value.dtype = new.dtype
        better += 1
    return better


def unknown_dims(shape: ir.Shape | None) -> int:
    """Dims shape inference could not tell (unnamed, or ``unk__N``); no shape counts as many."""
    if shape is None:
        return 1 << 20
    return sum(
        isinstance(d, ir.SymbolicDim) and (d.value is None or d.value.startswith("unk__"))
        for d in shape
    )


_SHAPE_ONLY = "onnxzip-shape-only"  # the external-data location of a stub for shape inference


ENGINE_MAX_OPSET = 21  # onnxruntime-training 1.19.2, the training engine
ENGINE_MAX_IR_VERSION = 10


def save_for_engine(model: ir.Model, path: str | os.PathLike, name: str = "training twin") -> None:
    """Writes ``model`` for the training engine: default-domain opset <= 21, IR <= 10.

    The caller's model is not changed. A model newer than opset 21 is converted down (refused,
    naming the op, when an op has no opset-21 form). Weights over 2 GB go to ``<name>.data``.
    """
    target = Path(path)
    if weights_nbytes(model) > EXTERNAL_DATA_THRESHOLD:
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
        if opset is not None and opset > ENGINE_MAX_OPSET:
            raise ModelError(
                f"{name}: opset {opset} models over 2 GB cannot be converted for the training "
                f"engine (opset <= {ENGINE_MAX_OPSET})"
            )
        ir.save(model, target, external_data=target.name + ".data")
        proto = onnx.load(str(target), load_external_data=False)
        if proto.ir_version > ENGINE_MAX_IR_VERSION:
            proto.ir_version = ENGINE_MAX_IR_VERSION
            onnx.save(proto, str(target))
        return
    proto = onnx.ModelProto()
    proto.ParseFromString(model_bytes(model))
    version = _default_opset(proto)
    if version is not None and version > ENGINE_MAX_OPSET:
        proto = _convert_opset(proto, ENGINE_MAX_OPSET, name)
    proto.ir_version = min(proto.ir_version, ENGINE_MAX_IR_VERSION)
    onnx.save(proto, str(target))
