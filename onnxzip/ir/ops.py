"""Op knowledge in one table: one metatype per op family, read by every stage.

A metatype says, for the ops of one family (as NNCF's ONNX metatypes do): which input is the
constant weight and which the bias, which weight axis indexes the output channels and which the
input channels, on which axis of the output activation the channels lie, the subtypes of
convolution, how many multiply-accumulates one sample costs, and, for onnxruntime's fused
com.microsoft ops that onnx's shape inference does not know, which input the output's type and
shape follow. Pruning (groups, MAC estimates, reconstruction), quantization (weight axes, bias
correction, the VNNI saturation risk), analysis (MACs) and the gradient twin ask this table;
nobody re-derives "is this Conv depthwise" or "which axis is the output channel".

MACs per sample (``|.|`` the element count without the batch axis):

* Conv / ConvInteger:   ``|Y| * (C_in / group) * prod(kernel)``  (``prod(W.shape[1:])``)
* ConvTranspose:        ``|X| * (C_out / group) * prod(kernel)`` (each input pixel scatters a
  ``C_out / group x kernel`` patch; ``prod(W.shape[1:])`` again)
* Gemm:                 ``M * N * K`` for ``A [M, K]``, ``Y [M, N]`` (the batch is ``M``)
* MatMul / MatMulInteger and com.microsoft MatMul forms: ``|Y| * K``, ``K`` the last axis of A.

Convolution subtypes, from the weight ``W [C_out, C_in / group, k..]``: *dense* (``group = 1``),
*depthwise* (``group > 1`` and one input channel per group, any channel multiplier
``C_out / group``), *grouped* (the rest). onnxruntime runs a Conv with one input and one output
channel per group with its depthwise kernel (32-bit sums), which ``single_channel_groups`` tells.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import onnx_ir as ir

DEFAULT_DOMAINS = ("", "ai.onnx")
MS_DOMAIN = "com.microsoft"

# dims of a value without its batch axis resolved: a list of ints, or None when unknown
DimsFn = Callable[[ir.Value | None], list[int] | None]


# -- node helpers: one way to read attributes, ranks and names ------------------------------------


def domain_of(node: ir.Node) -> str:
    """The node's domain with onnx's two spellings of the default one made one."""
    return "" if node.domain in DEFAULT_DOMAINS else node.domain


def attr(node: ir.Node, name: str, default):
    """An attribute's value, or ``default`` when it is absent."""
    found = node.attributes.get(name)
    return default if found is None else found.value


def axes_as_input(op_type: str, opset: int) -> bool:
    """Whether a Reduce op takes its axes as a second input at this default-domain opset
    (ReduceSum from 13, the other reductions from 18) rather than as an attribute."""
    return opset >= (13 if op_type == "ReduceSum" else 18)


def tensor_nbytes(tensor) -> int:
    """Bytes of an IR tensor's data; strings (whose size onnx_ir does not define) count 0."""
    try:
        return int(tensor.nbytes)
    except TypeError:
        return 0


def node_key(node: ir.Node) -> str:
    """A node's identity in reports and plans: its name, else its first output's."""
    return node.name or (node.outputs[0].name if node.outputs else node.op_type)


def rank(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)


def dim(value: ir.Value, axis: int) -> int | None:
    """A static dimension, or None (symbolic, unknown rank, or out of range)."""
    if value.shape is None or axis >= len(value.shape):
        return None
    d = value.shape[axis]
    return d if isinstance(d, int) else None


def same_dim(a, b) -> bool:
    """Two dims (of ``ir.Shape``) provably equal: the same value, or the same named symbol."""
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a is not None and b is not None and a.value is not None and a.value == b.value


def optional_input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


# -- metatypes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metatype:
    """What every stage needs to know about one op family.

    ``out_axis`` / ``in_axis`` give the weight's output- and input-channel axes for a node
    (negative counts from the end); ``activation_axis`` the channel axis of the output for its
    rank; ``macs`` the MACs of one sample from a dims reader; ``shape_from`` the input whose
    element type and shape output 0 has (for ops onnx's inference does not cover).
    """

    name: str
    op_types: tuple[str, ...]
    domain: str = ""
    weight_port: int | None = None
    bias_port: int | None = None
    out_axis: Callable[[ir.Node], int] | None = None
    in_axis: Callable[[ir.Node], int] | None = None
    activation_axis: Callable[[int], int] | None = None
    macs: Callable[[ir.Node, DimsFn], int | None] | None = None
    shape_from: int | None = None
    # for fused ops whose output shape is not an input's: (attributes, dims of each input, each
    # a list of int / str / None or None when unknown) -> dims of output 0, or None
    output_dims: Callable[[dict, list], list | None] | None = None
    # the node adds a per-channel bias of the output channels (Conv/Gemm ``b``, BiasGelu ``B``)
    channel_bias_port: int | None = None
    # quantized (DQ inputs), onnxruntime's kernel may also write float where nothing reads the
    # output quantized: QGemm without an output scale, MatMulIntegerToFloat
    float_output: bool = False

    @property
    def weighted(self) -> bool:
        return self.weight_port is not None


def _conv_macs(node: ir.Node, dims: DimsFn) -> int | None:
    w = dims(node.inputs[1])
    side = node.inputs[0] if node.op_type == "ConvTranspose" else node.outputs[0]
    s = dims(side)
    if w is None or s is None:
        return None
    return math.prod(s[1:]) * math.prod(w[1:])


def _gemm_macs(node: ir.Node, dims: DimsFn) -> int | None:
    a, y = dims(node.inputs[0]), dims(node.outputs[0])
    if a is None or y is None or len(a) != 2:
        return None
    k = a[0] if attr(node, "transA", 0) else a[1]
    return y[0] * y[1] * k


def _matmul_macs(node: ir.Node, dims: DimsFn) -> int | None:
    a, y = dims(node.inputs[0]), dims(node.outputs[0])
    if a is None or y is None or not a:
        return None
    return math.prod(y) * a[-1]


CONVOLUTION = Metatype(
    "convolution",
    ("Conv", "ConvInteger"),
    weight_port=1,
    bias_port=2,
    channel_bias_port=2,
    out_axis=lambda node: 0,
    in_axis=lambda node: 1,
    activation_axis=lambda r: 1,
    macs=_conv_macs,
)
CONV_TRANSPOSE = Metatype(
    "transposed convolution",
    ("ConvTranspose",),
    weight_port=1,
    bias_port=2,
    channel_bias_port=2,
    out_axis=lambda node: 1,
    in_axis=lambda node: 0,
    activation_axis=lambda r: 1,
    macs=_conv_macs,
)
GEMM = Metatype(
    "gemm",
    ("Gemm",),
    weight_port=1,
    bias_port=2,
    channel_bias_port=2,
    out_axis=lambda node: 0 if attr(node, "transB", 0) else 1,
    in_axis=lambda node: 1 if attr(node, "transB", 0) else 0,
    activation_axis=lambda r: r - 1,
    macs=_gemm_macs,
    float_output=True,
)
MATMUL = Metatype(
    "matmul",
    ("MatMul", "MatMulInteger"),
    weight_port=1,
    out_axis=lambda node: -1,
    in_axis=lambda node: -2,
    activation_axis=lambda r: r - 1,
    macs=_matmul_macs,
    float_output=True,
)

# onnxruntime's fused ops (com.microsoft), written by its transformer optimizer. onnx's shape
# inference does not know them: their first output has the type and shape of ``shape_from``.
SKIP_LAYER_NORM = Metatype(
    "skip layer normalization",
    ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization"),
    domain=MS_DOMAIN,
    shape_from=0,
)
LAYER_NORM_MS = Metatype(
    "layer normalization (contrib)",
    ("SimplifiedLayerNormalization",),
    domain="",  # onnxruntime registers SimplifiedLayerNormalization in the default domain
    shape_from=0,
)
BIAS_ACTIVATION = Metatype(
    "bias activation",
    ("BiasGelu", "FastGelu", "BiasAdd"),
    domain=MS_DOMAIN,
    shape_from=0,
    channel_bias_port=1,
)


def _attention_dims(attrs: dict, dims: list) -> list | None:
    """com.microsoft.Attention: [B, S, v_hidden], v_hidden from qkv_hidden_sizes or from the
    packed weight [hidden, 3 * hidden]."""
    x = dims[0] if dims else None
    if x is None or len(x) != 3:
        return None
    sizes = attrs.get("qkv_hidden_sizes")
    if sizes:
        return [x[0], x[1], int(sizes[-1])]
    w = dims[1] if len(dims) > 1 else None
    if w is None or len(w) != 2 or not isinstance(w[1], int) or w[1] % 3:
        return None
    return [x[0], x[1], w[1] // 3]


def _attention_macs(node: ir.Node, dims: DimsFn) -> int | None:
    """The QKV projection of com.microsoft.Attention: |X| / N * 3 * hidden (the score and
    context products are activation x activation, not counted, as for MatMul of two inputs)."""
    x, w = dims(node.inputs[0]), dims(node.inputs[1])
    if x is None or w is None or len(w) != 2:
        return None
    return math.prod(x[1:]) * w[1]


def _multi_head_dims(attrs: dict, dims: list) -> list | None:
    """com.microsoft.MultiHeadAttention: [B, S, v_hidden], v_hidden from a [B, L, v_hidden] value,
    else the query's hidden size."""
    q = dims[0] if dims else None
    if q is None or len(q) != 3:
        return None
    v = dims[2] if len(dims) > 2 else None
    return [q[0], q[1], v[2] if v is not None and len(v) == 3 else q[2]]


def _group_query_dims(attrs: dict, dims: list) -> list | None:
    """com.microsoft.GroupQueryAttention: [B, S, num_heads * head_size]; with packed QKV the
    query's hidden is (num_heads + 2 kv_num_heads) * head_size."""
    q = dims[0] if dims else None
    heads, kv = attrs.get("num_heads"), attrs.get("kv_num_heads")
    if q is None or len(q) != 3 or not heads:
        return None
    packed = len(dims) < 2 or dims[1] is None or dims[1] == []
    if packed and isinstance(q[2], int) and kv:
        return [q[0], q[1], heads * (q[2] // (heads + 2 * kv))]
    return list(q)


def _embed_layer_norm_dims(attrs: dict, dims: list) -> list | None:
    """com.microsoft.EmbedLayerNormalization: ids [B, S] and word embedding [V, H] -> [B, S, H]."""
    ids, word = (dims[0], dims[2]) if len(dims) > 2 else (None, None)
    if ids is None or word is None or len(ids) != 2 or len(word) != 2:
        return None
    return [ids[0], ids[1], word[1]]


ATTENTION = Metatype(
    "attention (fused)",
    ("Attention",),
    domain=MS_DOMAIN,
    weight_port=1,
    bias_port=2,
    shape_from=0,
    output_dims=_attention_dims,
    macs=_attention_macs,
)
ATTENTION_CORE = Metatype(
    "multi-head attention (fused, projections outside)",
    ("MultiHeadAttention",),
    domain=MS_DOMAIN,
    shape_from=0,
    output_dims=_multi_head_dims,
)
GROUP_QUERY_ATTENTION = Metatype(
    "group-query attention (fused)",
    ("GroupQueryAttention",),
    domain=MS_DOMAIN,
    shape_from=0,
    output_dims=_group_query_dims,
)
EMBED_LAYER_NORM = Metatype(
    "embedding + layer normalization (fused)",
    ("EmbedLayerNormalization",),
    domain=MS_DOMAIN,
    shape_from=2,  # the element type of the word embedding
    output_dims=_embed_layer_norm_dims,
)
ROTARY = Metatype("rotary embedding", ("RotaryEmbedding",), domain=MS_DOMAIN, shape_from=0)

ACTIVATION_MS = Metatype(
    "activation (contrib)",
    ("Gelu", "QuickGelu"),
    domain=MS_DOMAIN,
    shape_from=0,
)

# scikit-learn's preprocessing as skl2onnx writes it (ai.onnx.ml): elementwise, output 0 has
# the shape of the input; onnx's inference gives its element type (float for Scaler and
# Normalizer whatever comes in) but no shape, and every shape after it was lost
ML_ELEMENTWISE = Metatype(
    "elementwise preprocessing (ai.onnx.ml)",
    ("Scaler", "Normalizer", "Binarizer", "Imputer"),
    domain="ai.onnx.ml",
    shape_from=0,
    output_dims=lambda attrs, dims: dims[0] if dims else None,
)

METATYPES: tuple[Metatype, ...] = (
    CONVOLUTION,
    CONV_TRANSPOSE,
    GEMM,
    MATMUL,
    SKIP_LAYER_NORM,
    LAYER_NORM_MS,
    BIAS_ACTIVATION,
    ACTIVATION_MS,
    ATTENTION,
    ATTENTION_CORE,
    GROUP_QUERY_ATTENTION,
    EMBED_LAYER_NORM,
    ROTARY,
    ML_ELEMENTWISE,
)
_BY_OP: dict[tuple[str, str], Metatype] = {
    (m.domain, op): m for m in METATYPES for op in m.op_types
}
WEIGHTED_OPS = frozenset(
    op for m in METATYPES if m.weighted and m.domain == "" for op in m.op_types
)
# Ops whose every output value is one of their input's values, only rearranged (the tensor's
# meaning per value is kept): what floors look through to find the op that wrote a score, and
# what a bias written after a layer may pass on its way to its Add. Each reader adds what its
# question allows (floors: Cast; the bias rule: Slice, which drops values but moves none).
LAYOUT_OPS = frozenset({"Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})
# the float ops among them (integer forms count only for MACs and saturation checks)
FLOAT_WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# Ops that hold a layer's weights already quantized inside one fused kernel (a QDQ model's
# Conv/MatMul/Gemm still read float weights through DequantizeLinear)
FUSED_QUANTIZED_OPS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "ConvInteger",
        "MatMulInteger",
        "QGemm",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "MatMulNBits",
    }
)


def metatype(node: ir.Node) -> Metatype | None:
    """The node's metatype, or None for ops the table does not describe."""
    return _BY_OP.get((domain_of(node), node.op_type))


def lookup(domain: str, op_type: str) -> Metatype | None:
    """The metatype of an op named by domain and type (for code that sees protobuf nodes)."""
    return _BY_OP.get(("" if domain in DEFAULT_DOMAINS else domain, op_type))


def counts_macs(node: ir.Node) -> bool:
    m = metatype(node)
    return m is not None and m.macs is not None


def is_weighted(node: ir.Node) -> bool:
    m = metatype(node)
    return m is not None and m.weighted


def weight_channel_axis(node: ir.Node) -> int:
    """The axis of a weighted node's weight that indexes its output channels (counted from
    the end for MatMul: one channel per output column)."""
    m = metatype(node)
    if m is None or m.out_axis is None:
        raise ValueError(f"{node.op_type} has no weight")
    return m.out_axis(node)


def weight_input_axis(node: ir.Node) -> int:
    """The axis of a weighted node's weight that indexes its input channels."""
    m = metatype(node)
    if m is None or m.in_axis is None:
        raise ValueError(f"{node.op_type} has no weight")
    return m.in_axis(node)


def activation_channel_axis(node: ir.Node, out_rank: int) -> int:
    """The channel axis of a weighted node's output: 1 for convolutions, the last otherwise."""
    m = metatype(node)
    if m is None or m.activation_axis is None:
        raise ValueError(f"{node.op_type} has no channel axis")
    return m.activation_axis(out_rank)


def groups(node: ir.Node) -> int:
    return int(attr(node, "group", 1))


def conv_subtype(node: ir.Node, weight_shape: Sequence[int]) -> str:
    """``dense``, ``depthwise`` or ``grouped`` for a convolution with this weight shape."""
    group = groups(node)
    if group == 1:
        return "dense"
    if node.op_type in CONVOLUTION.op_types and len(weight_shape) >= 2 and weight_shape[1] == 1:
        return "depthwise"
    return "grouped"


def is_depthwise(node: ir.Node, weight_shape: Sequence[int]) -> bool:
    """A Conv with one input channel per group (its channels are its input's)."""
    return metatype(node) is CONVOLUTION and conv_subtype(node, weight_shape) == "depthwise"


def single_channel_groups(node: ir.Node, weight_shape: Sequence[int]) -> bool:
    """A Conv with one input and one output channel per group: onnxruntime runs it with its
    depthwise kernel, which adds in 32 bits, so its int8 weights cannot saturate the 16-bit
    pair sums of CPUs without VNNI (measured exact with full-range weights on an AVX2-only CPU
    where dense and grouped Conv saturate)."""
    return (
        metatype(node) is CONVOLUTION
        and len(weight_shape) >= 3
        and weight_shape[1] == 1
        and groups(node) == weight_shape[0]
    )


def output_channels(node: ir.Node, weight_shape: Sequence[int]) -> int:
    """The number of output channels a weighted node creates."""
    axis = weight_channel_axis(node)
    channels = weight_shape[axis]
    if metatype(node) is CONV_TRANSPOSE:
        channels *= groups(node)  # the weight holds C_out / group per group
    return int(channels)


def node_macs(node: ir.Node, dims: DimsFn) -> int | None:
    """MACs of one sample of a weighted node (None when a shape is unknown or the op has none)."""
    m = metatype(node)
    if m is None or m.macs is None:
        return None
    return m.macs(node, dims)


# -- spectral front ends ----------------------------------------------------------------------

# Ops through which a value keeps its magnitude (up to a constant, a sum or a square) on its way
# to a logarithm: elementwise arithmetic, reductions, data movement, and linear layers (a
# short-time Fourier transform or a constant-Q filter bank written as Conv, a mel filter bank as
# MatMul). Not Exp (it turns an absolute error into a relative one) nor any other nonlinearity.
MAGNITUDE_OPS = frozenset(
    {
        *("Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Abs"),
        *("Max", "Min", "Clip", "Identity", "Cast"),
        *("ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL1", "ReduceL2"),
        *("ReduceMax", "ReduceMin"),
        *LAYOUT_OPS,
        *("Expand", "Tile"),
        *("Slice", "Concat", "Split", "Gather", "Pad", "AveragePool", "GlobalAveragePool"),
        *("Conv", "ConvTranspose", "MatMul", "Gemm"),
    }
)
LOGARITHM_REASON = (
    "it feeds a logarithm through linear and magnitude ops only (a spectral front end): int8's "
    "absolute step erases the small values a logarithm magnifies"
)


def logarithm_front_end(graph: ir.Graph) -> frozenset[str]:
    """Keys of the nodes of ``graph`` that compute what a ``Log`` reads through linear and
    magnitude ops only (``MAGNITUDE_OPS``): an audio model's feature extraction exported with it
    (frames, a filter bank as Conv or MatMul, ``re^2 + im^2``, ``Sqrt``, ``+ eps``, ``Log``).

    Such a value spans many orders of magnitude and what the logarithm reads is its *relative*
    precision: one 8-bit step per tensor is a fixed *absolute* error, which turns every value
    below it into ``log(eps)`` and shifts a log spectrum's floor (and any min/max
    normalisation after it). The search walks up from each Log's input and stops at anything
    else (a ReLU, Sigmoid, Softmax, Exp: what a learned network puts between its layers) and
    at constants, so a Log after a learned network keeps at most the linear layers right
    before it. Quantization keeps these nodes in float; recovery does not train their weights
    (fixed signal-processing filters, and the costliest part of a backward pass)."""
    found: set[str] = set()
    seen: set[int] = set()
    todo = [n.inputs[0] for n in graph if n.op_type == "Log" and domain_of(n) == ""]
    while todo:
        value = todo.pop()
        if value is None or id(value) in seen:
            continue
        seen.add(id(value))
        node = value.producer()
        if node is None or node.graph is not graph or domain_of(node) != "":
            continue
        if node.op_type not in MAGNITUDE_OPS:
            continue
        found.add(node_key(node))
        for v in node.inputs:
            if v is not None and (v.dtype is None or v.dtype.is_floating_point()):
                todo.append(v)
    return frozenset(found)


# -- activation functions spelled in primitive ops ----------------------------------------------

# Elementwise ops an activation function is written with (GELU's tanh and erf forms, HardSwish,
# Mish, ...) when an exporter decomposes it.
ELEMENTWISE_FUNCTION_OPS = frozenset(
    {
        *("Add", "Sub", "Mul", "Div", "Pow", "Neg", "Abs", "Sqrt", "Reciprocal", "Exp", "Log"),
        *("Tanh", "Erf", "Sigmoid", "HardSigmoid", "Softplus", "Relu", "Clip", "Max", "Min"),
    }
)
# An island is kept float only when it curves its input through one of these: a HardSwish's
# Add, Clip, Mul and Div keep bounded ranges and quantize well (PP-PicoDet has 94 of them).
CURVING_OPS = frozenset({"Tanh", "Erf", "Exp", "Log", "Pow", "Softplus", "Sigmoid"})
# An island of fewer nodes is left to the per-op rules (x * sigmoid(x) has QLinear kernels for
# both of its ops and loses little to its one intermediate scale).
MIN_ISLAND_NODES = 3
MAX_ISLAND_NODES = 32
ISLAND_REASON = (
    "inside an activation function of one tensor spelled in elementwise ops (a GELU, a Mish): "
    "one 8-bit scale per intermediate (x^3, tanh(...)) compounds its error"
)


def activation_islands(graph: ir.Graph) -> frozenset[str]:
    """Keys of the nodes of ``graph`` that compute an elementwise function of one tensor ``x``
    spelled in primitive ops: tf2onnx writes Keras' GELU as nine of them,
    ``x * 0.5 * (1 + tanh(0.7979 * (x + 0.0447 * x * x * x)))``, older torch exports the erf
    form in five.

    An island starts at a value ``x`` read more than once; a node joins when it is one of
    ``ELEMENTWISE_FUNCTION_OPS`` and its every non-constant input is ``x`` or an island node's
    output. Islands of ``MIN_ISLAND_NODES`` to ``MAX_ISLAND_NODES`` nodes, with one of
    ``CURVING_OPS`` and a single node whose output leaves the island, are kept. Quantizing each of those ops per tensor rounds
    every intermediate to 8 bits (``x^3`` spans the cube of ``x``'s range): on magika's file-type
    classifier, every GELU node quantized lost 14 dB and 8 % of its top-1 decisions; with the
    islands in float (their input and output still quantized where their neighbours are) the
    rest of the model is int8 at 26 dB."""
    from onnxzip.passes import is_constant  # passes builds on this module

    order = {id(n): i for i, n in enumerate(graph)}
    found: set[str] = set()
    taken: set[int] = set()
    values = [*graph.inputs, *(v for n in graph for v in n.outputs)]
    for x in values:
        if x is None or len(x.uses()) < 2:
            continue
        if x.dtype is not None and not x.dtype.is_floating_point():
            continue
        # nodes reachable from x through elementwise ops, bounded
        reach: dict[int, ir.Node] = {}
        todo = [u.node for u in x.uses()]
        while todo and len(reach) <= MAX_ISLAND_NODES:
            node = todo.pop()
            if id(node) in reach or id(node) in taken or id(node) not in order:
                continue
            if node.op_type not in ELEMENTWISE_FUNCTION_OPS or domain_of(node) != "":
                continue
            reach[id(node)] = node
            for out in node.outputs:
                todo.extend(u.node for u in out.uses())
        if len(reach) < MIN_ISLAND_NODES or len(reach) > MAX_ISLAND_NODES:
            continue
        inside = {id(x)}
        island = []
        for node in sorted(reach.values(), key=lambda n: order[id(n)]):
            varying = [v for v in node.inputs if not is_constant(v)]
            if varying and all(id(v) in inside for v in varying):
                island.append(node)
                inside.update(id(v) for v in node.outputs)
        if len(island) < MIN_ISLAND_NODES or not any(n.op_type in CURVING_OPS for n in island):
            continue
        members = {id(n) for n in island}
        exits = [
            n
            for n in island
            if any(
                v.is_graph_output() or any(id(u.node) not in members for u in v.uses())
                for v in n.outputs
            )
        ]
        if len(exits) != 1:
            continue
        taken |= members
        found.update(node_key(n) for n in island)
    return frozenset(found)
