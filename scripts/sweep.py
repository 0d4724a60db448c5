"""Sweep onnxzip over ONNX's own backend test models.

Every model under the installed onnx package's ``backend/test/data/{pytorch-converted,
pytorch-operator,simple,light}`` plus every single-op model of ``backend/test/case/node`` (onnx
generates those from its case modules; the wheel does not ship them as files) goes through
``inspect``, ``quantize --synthetic 8`` and ``prune --ratio 0.3``, run in-process through the CLI's
``main`` (with ``--no-floors``: a single op on random inputs has no task, so the default quality
floors are replaced by the tolerances below). Each run must either

* exit 0 with a model that passes ``onnx.checker`` (full check) and runs in onnxruntime, whose
  outputs keep the original's names, element types and shapes, and whose values are within the
  tolerance below, or
* exit 2 with one line on stderr naming the reason (a refusal).

Anything else (exit 3, an exception escaping ``main``, an invalid or non-running output, values out
of tolerance) is a failure. Tolerances, on the sweep's own random inputs:

* ``quantize``: float outputs of cosine >= 0.95 to the original's, or within 0.15 of the original's
  dynamic range in max abs error (int8 QDQ on a single op with 8 random calibration samples);
  non-float outputs equal wherever the original's are.
* ``prune``: a model with nothing pruned must give the original's outputs exactly (to 1e-6); a
  pruned one only the same names, types and shapes and finite values where the original's are
  finite (removing channels changes the numbers; the masking oracle in ``tests/test_pruning.py``
  checks those).

Reference outputs come from onnxruntime on the original; where onnxruntime cannot run the
original (newer opsets), from ``onnx.reference.ReferenceEvaluator``.

``python scripts/sweep.py`` writes ``results/sweep.json`` with the counts per category and
command, and refusals grouped by reason.
"""

from __future__ import annotations

import argparse
import contextlib
import io as _io
import json
import logging
import re
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxzip import cli  # noqa: E402

CATEGORIES = ("node", "pytorch-converted", "pytorch-operator", "simple", "light")
COMMANDS = ("inspect", "quantize", "prune")
SAMPLES = 8

# Reviewed refusal reasons: a refusal passes the sweep only when its message matches one of these
# patterns. Each says why refusing is right.
REASONS: dict[str, tuple[str, str]] = {
    "fails onnx shape inference": (
        r"fails onnx shape inference",
        "onnx's own inference contradicts the stored shapes or cannot expand the op's function "
        "(MeanVarianceNormalization, pools whose last ceil-mode window starts in the padding): "
        "nothing written from it would pass onnx.checker's full check",
    ),
    "opset upgrade changes the interface": (
        r"converting opset \d+ to \d+ would change",
        "onnx's version converter turns Scan-8 into Scan-9, which drops the batch axis of the scan "
        "inputs: callers would have to feed other shapes",
    ),
    "no onnxruntime kernel": (
        r"onnxruntime cannot load the model",
        "the installed onnxruntime has no CPU kernel for an op or type of the model itself "
        "(int16 arithmetic, some 2- and 4-bit casts, preview training ops, ImageDecoder, ...); "
        "calibration and verification need onnxruntime to run the model",
    ),
    "onnxruntime rejects the samples": (
        r"onnxruntime failed to run",
        "onnxruntime refuses to run the model on random samples or cannot hand back its outputs "
        "(float8 outputs, training-mode Dropout masks, inconsistent synthetic integer inputs)",
    ),
    "input random samples cannot fill": (
        r"cannot synthesise samples for input '[^']*': it is",
        "the input is a shape, size, axis, count or integer divisor; random values are "
        "meaningless there and can crash the runtime (an integer division by zero); --data works",
    ),
    "element type numpy cannot draw": (
        r"cannot synthesise samples for input \S+: "
        r"(object|float8|bfloat16|float4|int4|uint4|int2|uint2)",
        "strings, bfloat16, float8, 4-bit and 2-bit inputs: no synthetic samples (--data works "
        "where onnxruntime can feed the type)",
    ),
    "non-tensor input": (
        r"has type .*: onnxzip feeds tensors only",
        "sequence, map and optional inputs cannot come from .npz files or synthetic samples",
    ),
    "non-tensor output": (
        r"no tensor outputs to compare",
        "parity is measured on tensors; a model whose outputs are all sequences or optionals "
        "cannot be verified",
    ),
    "no inputs": (
        r"the model has no inputs to feed",
        "a constant-only model has nothing to calibrate",
    ),
    "fixed batch above the sample count": (
        r"no samples.*fewer than the model's fixed batch size",
        "the model fixes a batch larger than the 8 synthetic samples",
    ),
}


@dataclass(frozen=True)
class Case:
    category: str
    name: str
    path: Path

    @property
    def id(self) -> str:
        return f"{self.category}/{self.name}"


def data_dir() -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data"


def corpus(workdir: Path, categories=CATEGORIES) -> list[Case]:
    """Every model of ``categories``; node models are written under ``workdir``."""
    cases = []
    for category in categories:
        if category == "node":
            cases += node_cases(workdir / "node")
            continue
        if category == "light":  # light_<name>.onnx files beside their test data
            for path in sorted((data_dir() / category).glob("*.onnx")):
                cases.append(Case(category, path.stem, path))
            continue
        for path in sorted((data_dir() / category).glob("*/model.onnx")):
            cases.append(Case(category, path.parent.name, path))
    return cases


def node_cases(folder: Path) -> list[Case]:
    from onnx.backend.test.case import node

    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        collected = node.collect_testcases("")
    cases = []
    for case in sorted(collected, key=lambda c: c.name):
        path = folder / f"{case.name}.onnx"
        if not path.exists():
            path.write_bytes(case.model.SerializeToString())
            inputs, _ = case.data_sets[0] if case.data_sets else ([], None)
            names = [i.name for i in case.model.graph.input]
            arrays = {
                n: a for n, a in zip(names, inputs, strict=False) if isinstance(a, np.ndarray)
            }
            if len(arrays) == len(names):
                np.savez(path.with_suffix(".inputs.npz"), **arrays)
        cases.append(Case("node", case.name, path))
    return cases


def test_inputs(path: Path, model: onnx.ModelProto) -> dict[str, np.ndarray] | None:
    """The inputs onnx's own test case feeds the model, when they are plain tensors."""
    from onnx import numpy_helper

    saved = path.with_suffix(".inputs.npz")
    if saved.exists():
        with np.load(saved, allow_pickle=True) as archive:
            return {k: archive[k] for k in archive.files}
    files = sorted((path.parent / "test_data_set_0").glob("input_*.pb"))
    if not files:
        return None
    arrays = []
    for file in files:
        tensor = onnx.TensorProto()
        try:
            tensor.ParseFromString(file.read_bytes())
            arrays.append(numpy_helper.to_array(tensor))
        except Exception:  # noqa: BLE001 - sequences and maps: no plain tensor
            return None
    names = [
        i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}
    ]
    return dict(zip(names, arrays, strict=False)) if len(arrays) == len(names) else None


def run_cli(argv: list[str]) -> tuple[int, str]:
    """Runs the CLI in-process: exit code and the last line of stderr."""
    err = _io.StringIO()
    with (
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(_io.StringIO()),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        try:
            code = cli.main(argv)
        except BaseException as exc:  # noqa: BLE001 - anything escaping main is what we look for
            return -1, f"escaped main: {type(exc).__name__}: {exc}"
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    return code, lines[-1] if lines else ""


def classify(message: str) -> str | None:
    for key, (pattern, _) in REASONS.items():
        if re.search(pattern, message):
            return key
    return None


# ----------------------------------------------------------------------------- output checks


def _feeds(model: onnx.ModelProto, seed: int = 7) -> dict[str, np.ndarray]:
    from onnx import helper

    rng = np.random.default_rng(seed)
    initializers = {i.name for i in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        t = value.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim]
        if np.dtype(dtype).kind == "f":
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif np.dtype(dtype).kind == "b":
            feeds[value.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[value.name] = rng.integers(0, 2, shape).astype(dtype)
    return feeds


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


def check_output(command: str, original: Path, output: Path, report: dict | None) -> str | None:
    """What is wrong with an exit-0 output, or None."""
    if not output.exists():
        return "exit 0 but no output file"
    try:
        candidate = onnx.load(output)
        onnx.checker.check_model(candidate, full_check=True)
    except Exception as exc:  # noqa: BLE001
        return f"invalid output: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    source = onnx.load(original)
    if any(not i.type.HasField("tensor_type") for i in candidate.graph.input):
        return None  # sequences, maps, optionals: the checker's word is all there is
    # Quantization is judged on inputs like its calibration samples (standard normal); pruning
    # on the inputs of onnx's own test case where there are any.
    feeds = (test_inputs(original, source) if command == "prune" else None) or _feeds(candidate)
    if not all(isinstance(v, np.ndarray) and v.dtype != object for v in feeds.values()):
        feeds = _feeds(candidate)
    try:
        got = _run(candidate, feeds)
    except Exception as exc:  # noqa: BLE001
        try:
            _run(source, feeds)
        except Exception:  # noqa: BLE001 - onnxruntime cannot run the original either
            return _compare_by_reference(source, candidate, feeds)
        return f"output does not run in onnxruntime: {str(exc).splitlines()[0][:200]}"
    try:
        want = _run(source, feeds)
    except Exception:  # noqa: BLE001 - a newer opset: both through the reference evaluator
        return _compare_by_reference(source, candidate, feeds, command, got)
    if [o.name for o in candidate.graph.output] != [o.name for o in source.graph.output]:
        return "output names changed"
    pruned = bool(report) and any(g["kept"] < g["channels"] for g in report.get("groups", []))
    for output, a, b in zip(source.graph.output, want, got, strict=True):
        name = output.name
        if not output.type.HasField("tensor_type"):
            if len(a) != len(b):  # a sequence: as long as the original's
                return f"output {name}: sequence of {len(b)} tensors, the original's has {len(a)}"
            continue
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"output {name}: {a.dtype}{a.shape} became {b.dtype}{b.shape}"
        if command == "prune":
            if pruned:
                finite = np.isfinite(a) if a.dtype.kind == "f" else np.ones(a.shape, bool)
                if a.dtype.kind == "f" and not np.isfinite(b[finite]).all():
                    return f"output {name}: non-finite values after pruning"
            elif not _same(a, b, 1e-6):
                return f"output {name}: changed although nothing was pruned"
        elif command == "quantize" and not _close_quantized(a, b):
            return f"output {name}: cosine {_cosine(a, b):.3f} outside the quantization tolerance"
    return None


def _compare_by_reference(
    source: onnx.ModelProto,
    candidate: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    command: str = "shapes",
    fallback: list[np.ndarray] | None = None,
) -> str | None:
    """onnxruntime cannot run the original: compare with onnx's reference implementation, both
    sides through it where it runs the candidate (the two implementations differ on corner cases
    such as pooling with ceil_mode and dilations), else the candidate's ``fallback`` outputs."""
    from onnx.reference import ReferenceEvaluator

    try:
        want = ReferenceEvaluator(source).run(None, feeds)
    except Exception:  # noqa: BLE001 - no implementation runs the original: nothing to compare
        return None
    try:
        got = ReferenceEvaluator(candidate).run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - e.g. Q/DQ below opset 19, which it lacks
        if fallback is None:
            return f"output fails in the reference evaluator, the original does not: {exc}"
        got = fallback
    for a, b in zip(want, got, strict=True):
        if isinstance(a, list):  # a sequence output
            if not isinstance(b, list) or len(a) != len(b):
                return "sequence output differs in length from the original's"
            continue
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return "output shapes differ from the original's (reference evaluator)"
        if command == "quantize" and not _close_quantized(a, b):
            return "output outside the quantization tolerance (reference evaluator)"
    return None


def _same(a: np.ndarray, b: np.ndarray, tol: float) -> bool:
    if a.dtype.kind != "f":
        return bool(np.array_equal(a, b))
    return bool(np.allclose(a, b, rtol=tol, atol=tol, equal_nan=True))


def _close_quantized(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype.kind != "f":
        return bool(np.array_equal(a, b))
    finite = np.isfinite(a)
    if not finite.any():
        return True
    x, y = a[finite].astype(np.float64), b[finite].astype(np.float64)
    if not np.isfinite(y).all():
        return False
    if _cosine(x, y) >= 0.95:
        return True
    spread = float(x.max() - x.min()) if x.size else 0.0
    return float(np.abs(x - y).max()) <= 0.15 * max(spread, 1e-6)


# ----------------------------------------------------------------------------- the sweep


def sweep_one(case: Case, workdir: Path, announce: bool = False) -> dict[str, dict]:
    """Runs the three commands on one model: per command its outcome."""
    results = {}
    out = workdir / "out"
    out.mkdir(parents=True, exist_ok=True)
    for command in COMMANDS:
        target = out / f"{case.category}-{case.name}-{command}.onnx"
        report_path = out / f"{case.category}-{case.name}-{command}.json"
        target.unlink(missing_ok=True)
        report_path.unlink(missing_ok=True)
        argv = {
            "inspect": ["inspect", str(case.path), "--json", str(report_path)],
            "quantize": [
                "quantize",
                str(case.path),
                "-o",
                str(target),
                "--synthetic",
                str(SAMPLES),
                "--no-floors",  # the sweep's own tolerances below, for one op on random inputs
            ],
            "prune": ["prune", str(case.path), "-o", str(target), "--ratio", "0.3", "--no-floors"],
        }[command]
        if command != "inspect":
            argv += ["--json", str(report_path), "--quiet"]
        if announce:  # the parent names the command that was running if this process dies
            sys.__stdout__.write(f"start {case.id} {command}\n")
            sys.__stdout__.flush()
        start = time.perf_counter()
        code, message = run_cli(argv)
        outcome = {"code": code, "seconds": round(time.perf_counter() - start, 3)}
        if code == 0:
            if command != "inspect":
                report = json.loads(report_path.read_text()) if report_path.exists() else None
                try:
                    problem = check_output(command, case.path, target, report)
                except Exception as exc:  # noqa: BLE001 - the sweep's own check failed
                    problem = f"the sweep could not check the output: {type(exc).__name__}: {exc}"
                if problem:
                    outcome["problem"] = problem
        elif code == 2:
            outcome["message"] = message
            reason = classify(message)
            if reason is None:
                outcome["problem"] = f"refusal with an unreviewed reason: {message}"
            else:
                outcome["reason"] = reason
        else:
            outcome["problem"] = f"exit {code}: {message}"
        if code != 0 and target.exists():
            outcome.setdefault("problem", "a refused run left an output file")
        target.unlink(missing_ok=True)
        results[command] = outcome
    return results


def _worker() -> int:
    """Child side: sweeps the cases named on stdin, one JSON line per command on stdout."""
    logging.disable(logging.WARNING)
    for line in sys.stdin:
        category, name, path, workdir = line.rstrip("\n").split("\t")
        case = Case(category, name, Path(path))
        results = sweep_one(case, Path(workdir), announce=True)
        print(json.dumps({"case": case.id, "results": results}), flush=True)
    return 0


def _sweep_chunk(cases: list[Case], workdir: Path, out: dict[str, dict]) -> None:
    """Parent side: feeds ``cases`` to a worker process, restarting it after a crash."""
    pending = list(cases)
    while pending:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        feed = "".join(f"{c.category}\t{c.name}\t{c.path}\t{workdir}\n" for c in pending)
        stdout, _ = proc.communicate(feed)
        started: dict[str, str] = {}
        for line in stdout.splitlines():
            if line.startswith("start "):
                _, case_id, command = line.split(" ", 2)
                started[case_id] = command
            elif line.startswith("{"):
                record = json.loads(line)
                out[record["case"]] = record["results"]
        done = [c for c in pending if c.id in out]
        rest = [c for c in pending if c.id not in out]
        if rest and proc.returncode != 0:
            crashed = rest[0]
            command = started.get(crashed.id, "inspect")
            out[crashed.id] = {
                command: {
                    "code": proc.returncode,
                    "problem": f"process died (exit {proc.returncode})",
                }
            }
            rest = rest[1:]
        elif rest:
            raise RuntimeError(f"worker stopped early without a crash after {len(done)} cases")
        pending = rest


def sweep(cases: list[Case], workdir: Path, workers: int = 2) -> dict[str, dict]:
    """Outcomes per case id and command, run in ``workers`` child processes."""
    out: dict[str, dict] = {}
    chunks = [cases[i::workers] for i in range(workers)]
    threads = [threading.Thread(target=_sweep_chunk, args=(c, workdir, out)) for c in chunks if c]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def problems_of(results: dict[str, dict]) -> list[str]:
    return [
        f"{case_id} {command}: {outcome['problem']}"
        for case_id, per_command in sorted(results.items())
        for command, outcome in per_command.items()
        if "problem" in outcome
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--category", action="append", choices=CATEGORIES)
    parser.add_argument("--match", help="only models whose name contains this")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "sweep.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        cases = corpus(workdir, tuple(args.category or CATEGORIES))
        if args.match:
            cases = [c for c in cases if args.match in c.name]
        results = sweep(cases, workdir, args.workers)
    categories = {c.id: c.category for c in cases}
    counts: dict = defaultdict(lambda: defaultdict(Counter))
    for case_id, per_command in results.items():
        for command, outcome in per_command.items():
            if "problem" in outcome:
                kind = "failed"
            elif outcome["code"] == 0:
                kind = "handled"
            else:
                kind = f"refused: {outcome['reason']}"
            counts[categories[case_id]][command][kind] += 1
    problems = problems_of(results)
    summary = {
        "models": len(cases),
        "seconds": round(time.perf_counter() - start, 1),
        "counts": {c: {k: dict(v) for k, v in cmds.items()} for c, cmds in counts.items()},
        "reasons": {k: why for k, (_, why) in REASONS.items()},
        "problems": problems,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    for p in problems:
        print(p)
    print(json.dumps(summary["counts"], indent=1))
    print(f"{len(cases)} models, {len(problems)} problems, {summary['seconds']} s")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
