"""Models the project builds for its tests and benchmarks (no model hub is reachable).

* ``from_light(name)``: a real architecture from ``onnx/backend/test/data/light/`` (ResNet-50,
  VGG-19, SqueezeNet, Inception, ...). Those files generate every weight with ConstantOfShape
  (all 0.02); here each becomes a seeded random initializer of a sensible distribution for the op
  that reads it (He-normal convolution weights, BatchNormalization statistics near identity),
  the initializer inputs of the IR-3 era are dropped, and the opset is converted to 17.
* ``mobilenet_v2()``: the MobileNetV2 architecture (inverted residuals, depthwise convolutions,
  ReLU6 as Clip, BatchNormalization), random weights, built with onnx_ir.

Random-weight models serve latency, size and parity measurements only, never accuracy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxzip import io, passes

LIGHT_DIR = Path(io.onnx_package_dir()) / "backend" / "test" / "data" / "light"


def _random_for(value: ir.Value, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    uses = value.uses()
    node, index = (uses[0].node, uses[0].idx) if uses else (None, -1)
    op = node.op_type if node is not None else ""
    if op == "BatchNormalization":
        feeds_sum = any(u.node.op_type in ("Add", "Sum") for u in node.outputs[0].uses())
        if index == 1 and feeds_sum:
            # The last BN of a residual branch starts small (as in Fixup / zero-gamma init), or the
            # sum of 16 branches grows the activations by ~2^16.
            return rng.uniform(0.1, 0.3, shape)
        if index in (1, 4):  # scale, variance
            return rng.uniform(0.9, 1.1, shape)
        return rng.normal(0.0, 0.02, shape)  # bias, mean: small, or they drown the input's signal
    if op in ("Conv", "ConvTranspose") and index == 1:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        return rng.normal(0.0, np.sqrt(2.0 / max(fan_in, 1)), shape)
    if op in ("Gemm", "MatMul") and index == 1:
        fan_in = (
            shape[-1]
            if (
                op == "Gemm"
                and node.attributes.get("transB")
                and node.attributes["transB"].as_int()
            )
            else shape[0]
        )
        return rng.normal(0.0, np.sqrt(1.0 / max(fan_in, 1)), shape)
    return rng.normal(0.0, 0.01, shape)


def from_light(name: str, seed: int = 0, opset: int = 17) -> ir.Model:
    """A light architecture with its ConstantOfShape weights replaced by random initializers."""
    path = LIGHT_DIR / f"light_{name}.onnx"
    model = io.load_model(path)
    passes.drop_initializer_inputs(model)
    graph = model.graph
    rng = np.random.default_rng(seed)
    for node in list(graph):
        if node.op_type != "ConstantOfShape":
            continue
        shape_array = passes.const_array(node.inputs[0])
        if shape_array is None:
            continue
        out = node.outputs[0]
        shape = tuple(int(d) for d in shape_array)
        array = _random_for(out, shape, rng).astype(np.float32)
        name = out.name
        out.name = f"{name}__generated"
        value = passes.add_initializer(graph, name, array)
        out.replace_all_uses_with(value, replace_graph_outputs=True)
        graph.remove(node, safe=True)
    passes.remove_unused_initializers(model)
    return io.convert_opset(model, opset)


class _Builder:
    """Small onnx_ir graph builder for the project's own architectures."""

    def __init__(self, name: str, seed: int):
        self.graph = ir.Graph(inputs=[], outputs=[], nodes=[], opset_imports={"": 17}, name=name)
        self.rng = np.random.default_rng(seed)
        self.channels: dict[str, int] = {}

    def input(self, name: str, shape: list) -> ir.Value:
        value = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shape))
        self.graph.inputs.append(value)
        self.channels[name] = shape[1]
        return value

    def init(self, name: str, array: np.ndarray) -> ir.Value:
        return passes.add_initializer(self.graph, name, array.astype(np.float32))

    def op(self, op_type: str, inputs: list, name: str, **attrs) -> ir.Value:
        node = ir.node(op_type, inputs, attributes=attrs or None, name=name)
        node.outputs[0].name = name
        self.graph.append(node)
        return node.outputs[0]

    def conv_bn(
        self,
        x: ir.Value,
        cout: int,
        name: str,
        k: int = 1,
        stride: int = 1,
        group: int = 1,
        act: bool = True,
    ) -> ir.Value:
        cin = self.channels[x.name]
        fan_in = cin // group * k * k
        w = self.init(
            f"{name}.weight", self.rng.normal(0, np.sqrt(2.0 / fan_in), (cout, cin // group, k, k))
        )
        y = self.op(
            "Conv",
            [x, w],
            f"{name}.conv",
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[k // 2] * 4,
            group=group,
        )
        bn = [
            self.init(f"{name}.bn.{p}", a)
            for p, a in (
                ("scale", self.rng.uniform(0.8, 1.2, cout)),
                ("bias", self.rng.normal(0, 0.1, cout)),
                ("mean", self.rng.normal(0, 0.1, cout)),
                ("var", self.rng.uniform(0.8, 1.2, cout)),
            )
        ]
        y = self.op("BatchNormalization", [y, *bn], f"{name}.bn", epsilon=1e-5)
        if act:
            lo, hi = (
                self.init(f"{name}.min", np.array(0.0)),
                self.init(f"{name}.max", np.array(6.0)),
            )
            y = self.op("Clip", [y, lo, hi], f"{name}.relu6")
        self.channels[y.name] = cout
        return y


def mobilenet_v2(
    resolution: int = 224, classes: int = 1000, width: float = 1.0, seed: int = 0
) -> ir.Model:
    """MobileNetV2 (Sandler et al. 2018) with random weights, batch dimension symbolic."""

    def div8(c: float) -> int:
        return max(8, int(c + 4) // 8 * 8)

    b = _Builder("mobilenet_v2", seed)
    x = b.input("input", ["N", 3, resolution, resolution])
    x = b.conv_bn(x, div8(32 * width), "stem", k=3, stride=2)
    settings = [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]
    block = 0
    for t, c, n, s in settings:
        cout = div8(c * width)
        for i in range(n):
            stride = s if i == 0 else 1
            cin = b.channels[x.name]
            name = f"block{block}"
            h = x
            if t != 1:
                h = b.conv_bn(h, cin * t, f"{name}.expand")
            h = b.conv_bn(h, cin * t, f"{name}.dw", k=3, stride=stride, group=cin * t)
            h = b.conv_bn(h, cout, f"{name}.project", act=False)
            if stride == 1 and cin == cout:
                h = b.op("Add", [h, x], f"{name}.add")
                b.channels[h.name] = cout
            x = h
            block += 1
    x = b.conv_bn(x, max(1280, div8(1280 * width)), "head", k=1)
    x = b.op("GlobalAveragePool", [x], "pool")
    x = b.op("Flatten", [x], "flatten", axis=1)
    cin = max(1280, div8(1280 * width))
    w = b.init("fc.weight", b.rng.normal(0, np.sqrt(1.0 / cin), (classes, cin)))
    bias = b.init("fc.bias", np.zeros(classes))
    y = b.op("Gemm", [x, w, bias], "logits", transB=1)
    y.type = ir.TensorType(ir.DataType.FLOAT)
    y.shape = ir.Shape(["N", classes])
    b.graph.outputs.append(y)
    model = ir.Model(b.graph, ir_version=8, producer_name="onnxzip.zoo")
    return io.load_model(model, name="mobilenet_v2")


def bert_encoder(
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    ffn: int = 256,
    vocab: int = 1000,
    seed: int = 0,
    *,
    weights: dict[str, np.ndarray] | None = None,
    positions: int = 0,
    pooling: bool = False,
    name: str = "bert_encoder",
) -> ir.Model:
    """A BERT-style encoder: embeddings, LayerNorm, self-attention with heads, GELU FFN.

    Inputs ``input_ids`` and ``attention_mask`` (int64 ``[N, S]``); output the last hidden state
    ``[N, S, hidden]``, or with ``pooling`` the sentence embedding ``[N, hidden]`` (the mean of
    the unmasked tokens' states, L2-normalised, as sentence-transformers computes it). GELU is
    spelled with Erf, as exporters write it below opset 20.

    Args:
        weights: arrays by this builder's initializer names (``embeddings.word``,
            ``layer0.q.weight`` as ``[in, out]``, ``layer0.attn.norm.scale`` ...) replacing the
            random ones, e.g. a pretrained checkpoint's.
        positions: size of a learned absolute position table added to the embeddings (0: none),
            plus a token-type table whose row 0 is added (single-segment inputs).
    """
    b = _Builder(name, seed)
    weights = weights or {}
    head = hidden // heads
    ids = ir.Value(
        name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["N", "S"])
    )
    mask = ir.Value(
        name="attention_mask", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["N", "S"])
    )
    b.graph.inputs.extend([ids, mask])

    def const(name: str, array) -> ir.Value:
        if name in weights:
            given = np.asarray(weights[name], dtype=np.float32)
            if given.shape != np.shape(array):
                raise ValueError(
                    f"{name}: weights have shape {given.shape}, expected {np.shape(array)}"
                )
            array = given
        return b.init(name, np.asarray(array, dtype=np.float32))

    def ints(name: str, values) -> ir.Value:
        return passes.add_initializer(b.graph, name, np.asarray(values, dtype=np.int64))

    def linear(x: ir.Value, din: int, dout: int, name: str) -> ir.Value:
        w = const(f"{name}.weight", b.rng.normal(0, np.sqrt(1.0 / din), (din, dout)))
        bias = const(f"{name}.bias", b.rng.normal(0, 0.02, dout))
        return b.op("Add", [b.op("MatMul", [x, w], f"{name}.matmul"), bias], f"{name}.out")

    def layer_norm(x: ir.Value, name: str) -> ir.Value:
        scale = const(f"{name}.scale", b.rng.uniform(0.9, 1.1, hidden))
        bias = const(f"{name}.bias", b.rng.normal(0, 0.02, hidden))
        return b.op("LayerNormalization", [x, scale, bias], name, axis=-1, epsilon=1e-12)

    table = const("embeddings.word", b.rng.normal(0, 0.5, (vocab, hidden)))
    x = b.op("Gather", [table, ids], "embeddings.gather")
    if positions:
        pos_table = const("embeddings.position", b.rng.normal(0, 0.02, (positions, hidden)))
        seq = b.op(
            "Slice",
            [b.op("Shape", [ids], "embeddings.shape"), ints("pos.one", [1]), ints("pos.two", [2])],
            "embeddings.seq",
        )
        pos = b.op(
            "Slice",
            [pos_table, ints("pos.zero", [0]), seq, ints("pos.axis", [0])],
            "embeddings.pos",
        )
        token_type = const("embeddings.token_type", b.rng.normal(0, 0.02, hidden))
        x = b.op("Add", [b.op("Add", [x, pos], "embeddings.add_pos"), token_type], "embeddings.sum")
    x = layer_norm(x, "embeddings.norm")
    m = b.op("Cast", [mask], "mask.cast", to=ir.DataType.FLOAT)
    m = b.op("Sub", [const("mask.one", 1.0), m], "mask.invert")
    m = b.op("Mul", [m, const("mask.big", -10000.0)], "mask.scale")
    m = b.op("Unsqueeze", [m, ints("mask.axes", [1, 2])], "mask.unsqueeze")
    split = ints("heads.split", [0, 0, heads, head])
    merge = ints("heads.merge", [0, 0, hidden])
    for i in range(layers):
        p = f"layer{i}"

        def projection(which: str, perm: list[int], p=p, x=x) -> ir.Value:
            """The ``which`` projection split into heads: [N, heads, S, d] (or [N, heads, d, S])."""
            out = linear(x, hidden, hidden, f"{p}.{which}")
            heads_view = b.op("Reshape", [out, split], f"{p}.{which}.heads")
            return b.op("Transpose", [heads_view], f"{p}.{which}.t", perm=perm)

        q = projection("q", [0, 2, 1, 3])
        k = projection("k", [0, 2, 3, 1])
        v = projection("v", [0, 2, 1, 3])
        scores = b.op(
            "Div",
            [b.op("MatMul", [q, k], f"{p}.scores"), const(f"{p}.sqrt_d", np.sqrt(head))],
            f"{p}.scaled",
        )
        probs = b.op("Softmax", [b.op("Add", [scores, m], f"{p}.masked")], f"{p}.probs", axis=-1)
        ctx = b.op(
            "Transpose",
            [b.op("MatMul", [probs, v], f"{p}.context")],
            f"{p}.context.t",
            perm=[0, 2, 1, 3],
        )
        ctx = b.op("Reshape", [ctx, merge], f"{p}.context.merged")
        x = layer_norm(
            b.op("Add", [x, linear(ctx, hidden, hidden, f"{p}.attn_out")], f"{p}.attn.res"),
            f"{p}.attn.norm",
        )
        h = linear(x, hidden, ffn, f"{p}.ffn.in")
        gelu = b.op("Mul", [h, const(f"{p}.half", 0.5)], f"{p}.gelu.half")
        erf = b.op(
            "Erf",
            [b.op("Div", [h, const(f"{p}.sqrt2", np.sqrt(2.0))], f"{p}.gelu.scaled")],
            f"{p}.gelu.erf",
        )
        gelu = b.op(
            "Mul",
            [gelu, b.op("Add", [erf, const(f"{p}.one", 1.0)], f"{p}.gelu.plus1")],
            f"{p}.gelu",
        )
        x = layer_norm(
            b.op("Add", [x, linear(gelu, ffn, hidden, f"{p}.ffn.out")], f"{p}.ffn.res"),
            f"{p}.ffn.norm",
        )
    if pooling:
        keep = b.op(
            "Unsqueeze",
            [b.op("Cast", [mask], "pool.mask", to=ir.DataType.FLOAT), ints("pool.axes", [2])],
            "pool.mask3",
        )
        summed = b.op(
            "ReduceSum",
            [b.op("Mul", [x, keep], "pool.masked"), ints("pool.seq", [1])],
            "pool.sum",
            keepdims=0,
        )
        count = b.op(
            "Max",
            [
                b.op("ReduceSum", [keep, ints("pool.seq2", [1])], "pool.count", keepdims=0),
                const("pool.eps", 1e-9),
            ],
            "pool.count_safe",
        )
        mean = b.op("Div", [summed, count], "pool.mean")
        norm = b.op(
            "Max",
            [
                b.op("ReduceL2", [mean], "pool.norm", axes=[1], keepdims=1),
                const("pool.tiny", 1e-12),
            ],
            "pool.norm_safe",
        )
        x = b.op("Div", [mean, norm], "sentence_embedding")
        x.shape = ir.Shape(["N", hidden])
    else:
        x.shape = ir.Shape(["N", "S", hidden])
    x.type = ir.TensorType(ir.DataType.FLOAT)
    b.graph.outputs.append(x)
    model = ir.Model(b.graph, ir_version=8, producer_name="onnxzip.zoo")
    return io.load_model(model, name=name)
