"""How onnxzip's time grows with graph size (``results/scale.json``, README "Reliability").

Synthetic graphs of about 1k, 10k and 100k nodes, in three shapes:

* ``mlp``: a chain of MatMul + Add + Relu blocks (16 features);
* ``encoder``: transformer-like blocks (LayerNormalization, q/k/v projections, scores,
  Softmax, context, output projection, residual, a SiLU FFN), 25 nodes a block;
* ``conv``: a chain of 3x3 Conv + Relu on 4 channels of 8x8.

Each goes through ``inspect``, ``quantize --synthetic 8``, ``prune --ratio 0.3 --synthetic 8``
and ``verify --per-node --synthetic 8`` (against the quantized model), each in a fresh process
(wall time and peak RSS from ``benchlib.run_measured``). Beside them, onnxruntime's own session
creation for the input model at the default optimisation level: a floor no tool that runs the
model can go below, and not itself linear in graph size (it grows with the initializer count).

Usage: python scripts/bench_scale.py [--sizes 1000 10000 100000] [--kinds mlp encoder conv]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import run_measured, run_record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class _Graph:
    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def weight(self, shape, scale: float = 0.2) -> str:
        self.count += 1
        name = f"p{self.count}"
        data = self.rng.normal(0, scale, shape).astype(np.float32)
        self.inits.append(numpy_helper.from_array(data, name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        self.count += 1
        out = f"t{self.count}"
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def model(self, x: str, shape: list) -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [x], ["out"]))
        graph = helper.make_graph(
            self.nodes,
            "scale",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)],
            self.inits,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def mlp(nodes: int, d: int = 16) -> onnx.ModelProto:
    g, x = _Graph(), "x"
    while len(g.nodes) < nodes:
        y = g.node("Add", [g.node("MatMul", [x, g.weight((d, d), 0.3)]), g.weight((d,), 0.1)])
        x = g.node("Relu", [y])
    return g.model(x, ["N", d])


def encoder(nodes: int, d: int = 16, seq: int = 8) -> onnx.ModelProto:
    g, x = _Graph(), "x"

    def linear(h: str, n_in: int, n_out: int) -> str:
        return g.node("Add", [g.node("MatMul", [h, g.weight((n_in, n_out))]), g.weight((n_out,))])

    while len(g.nodes) < nodes:
        h = g.node("LayerNormalization", [x, g.weight((d,), 1), g.weight((d,), 0.1)], axis=-1)
        q, k, v = linear(h, d, d), linear(h, d, d), linear(h, d, d)
        kt = g.node("Transpose", [k], perm=[0, 2, 1])
        scores = g.node("Mul", [g.node("MatMul", [q, kt]), g.weight((1,), 0.1)])
        attn = g.node("Softmax", [scores], axis=-1)
        x1 = g.node("Add", [x, linear(g.node("MatMul", [attn, v]), d, d)])
        h2 = g.node("LayerNormalization", [x1, g.weight((d,), 1), g.weight((d,), 0.1)], axis=-1)
        f = linear(h2, d, 4 * d)
        f = g.node("Mul", [f, g.node("Sigmoid", [f])])
        x = g.node("Add", [x1, linear(f, 4 * d, d)])
    return g.model(x, ["N", seq, d])


def conv(nodes: int, c: int = 4, s: int = 8) -> onnx.ModelProto:
    g, x = _Graph(), "x"
    while len(g.nodes) < nodes:
        w, b = g.weight((c, c, 3, 3), (2 / (9 * c)) ** 0.5), g.weight((c,), 0.1)
        x = g.node("Relu", [g.node("Conv", [x, w, b], pads=[1, 1, 1, 1])])
    return g.model(x, ["N", c, s, s])


KINDS = {"mlp": mlp, "encoder": encoder, "conv": conv}


def ort_load_seconds(path: Path) -> float:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    start = time.perf_counter()
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "scale.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for kind in args.kinds:
            for size in args.sizes:
                model = KINDS[kind](size)
                path = work / f"{kind}{size}.onnx"
                onnx.save(model, path)
                row = {
                    "kind": kind,
                    "nodes": len(model.graph.node),
                    "ort_load_s": ort_load_seconds(path),
                }
                quantized = work / f"{kind}{size}.int8.onnx"
                commands = {
                    "inspect": ["inspect", str(path)],
                    "quantize": ["quantize", str(path), "--synthetic", "8", "-o", str(quantized)],
                    "prune": [
                        "prune",
                        str(path),
                        "--ratio",
                        "0.3",
                        "--synthetic",
                        "8",
                        "-o",
                        str(work / "pruned.onnx"),
                        "--overwrite",
                    ],
                    "verify --per-node": [
                        "verify",
                        str(path),
                        str(quantized),
                        "--per-node",
                        "--synthetic",
                        "8",
                    ],
                }
                for name, cmd in commands.items():
                    measured = run_measured([sys.executable, "-m", "onnxzip", *cmd], ROOT)
                    row[name] = measured
                    print(
                        f"{kind:8s} {row['nodes']:7d} {name:18s} {measured['seconds']:8.2f} s "
                        f"{measured['peak_mib']:8.0f} MiB {measured.get('verdict', '')}",
                        flush=True,
                    )
                print(f"{kind:8s} {row['nodes']:7d} onnxruntime load   {row['ort_load_s']:8.2f} s")
                rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"run": run_record(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
