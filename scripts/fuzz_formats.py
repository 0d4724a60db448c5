"""Format fuzzer: mutated model protobufs and ``.npz`` files through every command.

Each case takes one of two small valid seed models (a Conv net and an MLP with a Gemm head) and
its valid samples, mutates one of them and runs one command in-process:

* model mutations, at the byte level (flip, overwrite, insert or delete bytes, truncate) and at
  the field level (dims, data types, raw data, op types, attributes, input names, opsets, IR
  version, value_info types, external-data entries);
* ``.npz`` mutations: bytes of the archive, array shapes, dtypes, member names, NaN, extra or
  missing members.

A case passes when the command exits 0, 1 or 2, never 3 (an internal error) and never by a
signal; stderr holds no traceback; an exit 2 is one line and leaves no output file; the input
files are unchanged. ``tests/test_fuzz_formats.py`` runs a derandomised slice in CI; this script
runs as many cases as asked and writes ``results/fuzz.json``.

Usage: python scripts/fuzz_formats.py [--cases 10000] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io as stdio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]

MODEL_MUTATIONS = (
    "flip bytes",
    "overwrite bytes",
    "insert bytes",
    "delete bytes",
    "truncate",
    "dims",
    "data type",
    "raw data",
    "op type",
    "attribute",
    "input name",
    "opset",
    "ir version",
    "value info",
    "external data",
)
NPZ_MUTATIONS = (
    "npz bytes",
    "npz shape",
    "npz dtype",
    "npz name",
    "npz nan",
    "npz extra",
    "npz missing",
)
COMMANDS = ("inspect", "quantize", "dynamic", "prune", "verify")


def seed_models() -> dict[str, onnx.ModelProto]:
    rng = np.random.default_rng(0)

    def w(shape, name):
        return numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)

    conv = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c1"], ["r1"]),
            helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c2"], ["r2"]),
            helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1),
        ],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [w((6, 3, 3, 3), "w1"), w((6,), "b1"), w((8, 6, 3, 3), "w2"), w((8,), "b2")]
        + [w((5, 8), "w3"), w((5,), "b3")],
    )
    mlp = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "m1"], ["h"]),
            helper.make_node("Add", ["h", "a1"], ["ha"]),
            helper.make_node("Relu", ["ha"], ["hr"]),
            helper.make_node("MatMul", ["hr", "m2"], ["z"]),
            helper.make_node("Softmax", ["z"], ["y"], axis=-1),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [w((12, 16), "m1"), w((16,), "a1"), w((16, 4), "m2")],
    )
    opset = [helper.make_opsetid("", 17)]
    return {
        "conv": helper.make_model(conv, opset_imports=opset, ir_version=8),
        "mlp": helper.make_model(mlp, opset_imports=opset, ir_version=8),
    }


def seed_samples(model: onnx.ModelProto, n: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    inp = model.graph.input[0]
    dims = [n if d.dim_param else d.dim_value for d in inp.type.tensor_type.shape.dim]
    return {inp.name: rng.normal(size=dims).astype(np.float32)}


def _bytes_mutation(data: bytes, kind: str, rng: np.random.Generator) -> bytes:
    b = bytearray(data)
    if not b:
        return bytes(b)
    pos = int(rng.integers(0, len(b)))
    count = int(rng.integers(1, 9))
    if kind in ("flip bytes", "npz bytes"):
        for p in rng.integers(0, len(b), count):
            b[p] ^= 1 << int(rng.integers(0, 8))
    elif kind == "overwrite bytes":
        b[pos : pos + count] = rng.integers(0, 256, count, dtype=np.uint8).tobytes()
    elif kind == "insert bytes":
        b[pos:pos] = rng.integers(0, 256, count, dtype=np.uint8).tobytes()
    elif kind == "delete bytes":
        del b[pos : pos + count]
    elif kind == "truncate":
        del b[pos:]
    return bytes(b)


_ODD_INTS = (-(2**62), -1, 0, 1, 3, 7, 2**31, 2**40)


def _field_mutation(model: onnx.ModelProto, kind: str, rng: np.random.Generator, folder: Path):
    g = model.graph
    pick = lambda seq: seq[int(rng.integers(0, len(seq)))]  # noqa: E731
    if kind == "dims":
        t = pick(g.initializer)
        if t.dims:
            t.dims[int(rng.integers(0, len(t.dims)))] = int(pick(_ODD_INTS))
        else:
            t.dims.append(int(pick(_ODD_INTS)))
    elif kind == "data type":
        pick(g.initializer).data_type = int(rng.integers(0, 27))
    elif kind == "raw data":
        t = pick(g.initializer)
        raw = bytearray(t.raw_data)
        cut = int(rng.integers(0, len(raw) + 1))
        t.raw_data = bytes(raw[:cut]) if rng.random() < 0.5 else bytes(raw) + bytes(cut)
    elif kind == "op type":
        n = pick(g.node)
        n.op_type = pick(("Conv", "MatMul", "Relu", "Reshape", "Concat", "Loop", "", "Nope"))
    elif kind == "attribute":
        n = pick(g.node)
        if n.attribute:
            a = pick(n.attribute)
            choice = int(rng.integers(0, 3))
            if choice == 0:
                a.ints[:] = [int(pick(_ODD_INTS)) for _ in range(int(rng.integers(0, 5)))]
                a.type = onnx.AttributeProto.INTS
            elif choice == 1:
                a.i = int(pick(_ODD_INTS))
                a.type = onnx.AttributeProto.INT
            else:
                a.name = pick(("axis", "pads", "group", "strides", "bogus"))
        else:
            n.attribute.append(helper.make_attribute("axis", int(pick(_ODD_INTS))))
    elif kind == "input name":
        n = pick(g.node)
        if n.input:
            n.input[int(rng.integers(0, len(n.input)))] = pick(("", "nowhere", g.node[0].output[0]))
    elif kind == "opset":
        model.opset_import[0].version = int(pick((-1, 0, 1, 6, 11, 21, 28, 29, 999)))
    elif kind == "ir version":
        model.ir_version = int(pick((-1, 0, 1, 3, 7, 11, 12, 99)))
    elif kind == "value info":
        v = pick([*g.input, *g.output])
        tt = v.type.tensor_type
        choice = int(rng.integers(0, 3))
        if choice == 0:
            tt.elem_type = int(rng.integers(0, 27))
        elif choice == 1 and tt.shape.dim:
            tt.shape.dim[int(rng.integers(0, len(tt.shape.dim)))].dim_value = int(
                pick((-5, 0, 1, 2, 10**9))
            )
        else:
            tt.ClearField("shape")
    elif kind == "external data":
        t = pick(g.initializer)
        data = t.raw_data
        (folder / "w.bin").write_bytes(data)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        entries = {
            "location": pick(("w.bin", "missing.bin", "../w.bin", "/etc/passwd", "")),
            "offset": pick(("0", "-1", "x", "99999", "1")),
            "length": pick((str(len(data)), "0", "-3", "y", str(len(data) + 4))),
        }
        for key in entries:
            if rng.random() < 0.85:
                t.external_data.add(key=key, value=entries[key])


def _npz_mutation(arrays: dict, kind: str, rng: np.random.Generator) -> dict | bytes:
    arrays = {k: v.copy() for k, v in arrays.items()}
    name = next(iter(arrays))
    a = arrays[name]
    if kind == "npz shape":
        shape = list(a.shape)
        shape[int(rng.integers(0, len(shape)))] = int(rng.integers(0, 20))
        if rng.random() < 0.3:
            shape = shape[:-1] if rng.random() < 0.5 else [*shape, 1]
        arrays[name] = np.resize(a, shape) if np.prod(shape) else np.zeros(shape, a.dtype)
    elif kind == "npz dtype":
        dtype = [np.float64, np.int64, np.uint8, np.bool_, np.float16, np.complex64, "U3"]
        arrays[name] = a.astype(dtype[int(rng.integers(0, len(dtype)))])
    elif kind == "npz name":
        arrays["renamed"] = arrays.pop(name)
    elif kind == "npz nan":
        a.flat[int(rng.integers(0, a.size))] = np.nan if rng.random() < 0.5 else np.inf
    elif kind == "npz extra":
        arrays["labels"] = rng.integers(0, 5, int(rng.integers(0, 20)))
    elif kind == "npz missing":
        arrays.pop(name)
        arrays["other"] = a
    return arrays


def _save_npz(arrays: dict, path: Path) -> None:
    buffer = stdio.BytesIO()
    np.savez(buffer, **arrays)
    path.write_bytes(buffer.getvalue())


def make_case(case: int, seed: int, folder: Path) -> tuple[str, list[str], Path, Path, str]:
    """Writes case ``case``'s files into ``folder``: (mutation, command args, model, data, out)."""
    rng = np.random.default_rng([seed, case])
    models = seed_models()
    name = ("conv", "mlp")[case % 2]
    model = models[name]
    samples = seed_samples(model)
    kinds = MODEL_MUTATIONS + NPZ_MUTATIONS
    kind = kinds[int(rng.integers(0, len(kinds)))]
    model_path, data_path = folder / "model.onnx", folder / "data.npz"
    if kind in NPZ_MUTATIONS:
        onnx.save(model, model_path)
        arrays = _npz_mutation(samples, kind, rng) if kind != "npz bytes" else samples
        _save_npz(arrays, data_path)
        if kind == "npz bytes":
            data_path.write_bytes(_bytes_mutation(data_path.read_bytes(), kind, rng))
    elif kind in ("flip bytes", "overwrite bytes", "insert bytes", "delete bytes", "truncate"):
        model_path.write_bytes(_bytes_mutation(model.SerializeToString(), kind, rng))
        _save_npz(samples, data_path)
    else:
        _field_mutation(model, kind, rng, folder)
        model_path.write_bytes(model.SerializeToString())
        _save_npz(samples, data_path)
    command = COMMANDS[int(rng.integers(0, len(COMMANDS)))]
    out = folder / "out" / "result.onnx"
    out.parent.mkdir(exist_ok=True)
    data = ["--data", str(data_path)]
    args = {
        "inspect": ["inspect", str(model_path), "--data", str(data_path)],
        "quantize": ["quantize", str(model_path), *data, "-o", str(out)],
        "dynamic": ["quantize", str(model_path), "--mode", "dynamic", *data, "-o", str(out)],
        "prune": ["prune", str(model_path), "--ratio", "0.3", *data, "-o", str(out)],
        "verify": ["verify", str(model_path), str(model_path), *data],
    }[command]
    return kind, args, model_path, data_path, f"{name}/{command}"


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def run_case(case: int, seed: int) -> dict:
    """Runs one case in this process; the verdict and what broke it, if anything."""
    from onnxzip.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        kind, args, model_path, data_path, what = make_case(case, seed, folder)
        before = {p: _digest(p) for p in (model_path, data_path)}
        err, out = stdio.StringIO(), stdio.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(args)
        stderr = err.getvalue()
        problems = []
        if code not in (0, 1, 2):
            problems.append(f"exit {code}")
        if "Traceback" in stderr:
            problems.append("traceback")
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        written = list((folder / "out").iterdir())
        if code == 2:
            if len(lines) != 1:
                problems.append(f"{len(lines)} lines on a refusal")
            if written:
                problems.append("output written although refused")
        if any(_digest(p) != d for p, d in before.items()):
            problems.append("input changed")
        return {
            "case": case,
            "mutation": kind,
            "run": what,
            "code": code,
            "problems": problems,
            "stderr": lines[-1][:300] if lines else "",
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "fuzz.json")
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)
    start = time.perf_counter()
    codes: dict[str, int] = {}
    failures = []
    for case in range(args.cases):
        result = run_case(case, args.seed)
        codes[str(result["code"])] = codes.get(str(result["code"]), 0) + 1
        if result["problems"]:
            failures.append(result)
            print(json.dumps(result), flush=True)
        if (case + 1) % 500 == 0:
            print(f"{case + 1} cases, {len(failures)} failing, exit codes {codes}", flush=True)
    seconds = time.perf_counter() - start
    summary = {
        "cases": args.cases,
        "seed": args.seed,
        "seconds": seconds,
        "exit_codes": codes,
        "failures": failures,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{args.cases} cases in {seconds:.0f} s: {len(failures)} failing; exit codes {codes}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
