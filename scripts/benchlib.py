"""Shared measurement code of the benchmark scripts (see the project's benchmarking rules).

Latency: onnxruntime CPU, 2 intra-op threads, batch as fed, default graph optimisation; three
warm-up runs per session, then rounds in which every model runs for about a second in turn;
the median per model is reported. Tool time and memory: each tool in a fresh process started
by a small launcher, wall time and the process's own peak RSS from the OS; onnxzip is
byte-compiled first, as a regular install is.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

# Linux carries a process's peak RSS across fork and exec, so a tool started straight from this
# (large) process would report at least this process's size. A small launcher process starts the
# tool instead and reports the tool's own wall time and peak RSS.
LAUNCHER = r"""
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(proc.pid, 0)
wall = time.perf_counter() - start
err = proc.stderr.read().decode(errors="replace")
print(json.dumps({"seconds": wall, "peak_mib": usage.ru_maxrss / 1024.0,
                  "code": os.waitstatus_to_exitcode(status), "stderr": err[-4000:]}))
"""


@functools.cache
def compile_package() -> None:
    """Byte-compiles onnxzip as ``pip install`` does for a regular install. An editable install
    under ``PYTHONDONTWRITEBYTECODE`` would otherwise recompile every module in each measured
    process, while onnxruntime's quantization tool comes compiled."""
    import compileall

    compileall.compile_dir(str(Path(__file__).resolve().parents[1] / "onnxzip"), quiet=1)


def run_measured(cmd: list[str], cwd: Path) -> dict:
    """Runs a command in a fresh process: wall seconds and peak RSS (MiB) from the OS.

    An onnxzip command that writes a model gets ``--keep-failed``: a result that breaks a
    floor is then written too (as OUT.failed.onnx, moved to OUT here) and measured, with
    ``verdict: FAIL`` in the record."""
    compile_package()
    cmd = [str(c) for c in cmd]
    writer = "onnxzip" in cmd[:3] and "-o" in cmd and "--keep-failed" not in cmd
    if writer:
        cmd = [*cmd, "--keep-failed"]
    out = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *cmd], cwd=cwd, capture_output=True, text=True, check=True
    )
    info = json.loads(out.stdout)
    result = {"seconds": info["seconds"], "peak_mib": info["peak_mib"]}
    if info["code"] == 1 and "onnxzip" in " ".join(map(str, cmd[:3])):
        # onnxzip's verdict: a default quality floor failed; the model is measured all the same
        result["verdict"] = "FAIL"
        if writer:
            target = Path(cwd, cmd[cmd.index("-o") + 1])
            failed = target.with_name(f"{target.stem}.failed{target.suffix or '.onnx'}")
            if failed.exists():
                failed.replace(target)
    elif info["code"] != 0:
        lines = [line for line in info["stderr"].strip().splitlines() if line.strip()]
        result["error"] = lines[-1] if lines else f"exit code {info['code']}"
    return result


def smooth_images(n: int, seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Low-frequency random images: random 7x7 colour cells plus a little noise."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    base = rng.normal(0, 1, (n, c, 7, 7)).astype(np.float32)
    x = np.kron(base, np.ones((1, 1, -(-h // 7), -(-w // 7)), np.float32))[:, :, :h, :w]
    return (x + 0.1 * rng.normal(0, 1, x.shape)).astype(np.float32)


def latency(
    paths: dict[str, Path], feed: dict[str, np.ndarray], rounds: int = 5, seconds: float = 1.0
) -> dict:
    sessions = {}
    for key, path in paths.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.log_severity_level = 3
        sessions[key] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(3):
            sessions[key].run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for key, session in sessions.items():
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                session.run(None, feed)
                times[key].append(time.perf_counter() - t0)
    return {k: {"median_ms": 1000 * float(np.median(v)), "runs": len(v)} for k, v in times.items()}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_record() -> dict:
    """The head of every benchmark's JSON: when, on what, with which versions."""
    from datetime import datetime, timezone

    from onnxzip.runtime import int8_pairs_saturate

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            # x86 without VNNI: onnxruntime's int8 kernels saturate 16-bit pair sums, so
            # onnxzip's default picks pair-safe weights there and quantize_static's models lose
            # accuracy; int8 speed-ups are also smaller than on VNNI CPUs.
            "int8_vnni": int8_pairs_saturate() is None,
        },
        "versions": versions(),
        "models": {},
    }


# onnxruntime's recommended static flow, run in its own process by the benchmarks:
# quant_pre_process, then quantize_static (QDQ, per-channel QInt8 weights, QUInt8 activations).
# Arguments: model, output, calibration .npz, method (MinMax | Percentile | Entropy), batch, scratch.
ORT_STATIC_WORKER = r"""
import sys, numpy as np
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process
model, out, calib, method, batch, tmp = sys.argv[1:7]
batch = int(batch)
with np.load(calib) as archive:
    data = {k: archive[k] for k in archive.files if k != "labels"}
n = len(next(iter(data.values())))
class Reader(CalibrationDataReader):
    def __init__(self):
        self.it = iter([{k: v[i:i + batch] for k, v in data.items()} for i in range(0, n, batch)])
    def get_next(self):
        return next(self.it, None)
pre = tmp + "/pre.onnx"
try:
    quant_pre_process(model, pre)
except Exception as exc:  # its symbolic shape inference gives up on some graphs: quantize as is
    print(f"quant_pre_process failed ({exc}); quantizing the model without it", file=sys.stderr)
    pre = model
extra = {"CalibPercentile": 99.99} if method == "Percentile" else {}
quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=getattr(CalibrationMethod, method), extra_options=extra)
"""


def ort_static_command(
    model: Path, out: Path, calib: Path, method: str, batch: int, scratch: Path
) -> list[str]:
    """onnxruntime's recommended static flow as one fresh-process command (ORT_STATIC_WORKER);
    ``method`` is its CalibrationMethod name (MinMax, Percentile, Entropy)."""
    return [
        sys.executable,
        "-c",
        ORT_STATIC_WORKER,
        str(model),
        str(out),
        str(calib),
        method,
        str(batch),
        str(scratch),
    ]


def image_model(work: Path, name: str) -> dict:
    """ResNet-50 (onnx's light architecture) or the zoo's MobileNetV2, random weights, saved in
    ``work`` with 32 calibration and 16 validation smooth random images."""
    from onnxzip import io
    from onnxzip.data import input_specs
    from testmodels import zoo

    model = zoo.from_light("resnet50") if name == "resnet50" else zoo.mobilenet_v2()
    path = work / f"{name}.onnx"
    io.save_model(model, path)
    spec = input_specs(model)[0]
    shape = tuple(spec.shape[1:])
    calib, val = work / f"{name}_calib.npz", work / f"{name}_val.npz"
    np.savez(calib, **{spec.name: smooth_images(32, 0, shape)})
    np.savez(val, **{spec.name: smooth_images(16, 1, shape)})
    return {"path": path, "calib": calib, "val": val, "batch": spec.fixed_batch or 8}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for p in ("onnxruntime", "onnx", "onnx-ir", "onnxscript", "numpy"):
        try:
            found[p] = version(p)
        except PackageNotFoundError:
            found[p] = None
    try:  # the training engine's own environment, when one is set up
        from onnxzip import engine

        found["training engine"] = engine.locate(create=False).info.get("onnxruntime")
    except Exception:
        found["training engine"] = None
    return found


def sentence_embeddings(path: Path, data: Path) -> np.ndarray:
    """L2-normalised sentence embeddings of every sentence in ``data``, one sentence per run and
    without padding, as a server embeds a request: dynamic quantization takes its activation
    range from the batch, so a batch of 240 padded sentences would be judged on a range no single
    request has."""
    with np.load(data) as archive:
        feed = {k: archive[k] for k in ("input_ids", "attention_mask")}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rows = []
    for ids, mask in zip(feed["input_ids"], feed["attention_mask"], strict=True):
        n = int(mask.sum())
        rows.append(
            session.run(None, {"input_ids": ids[None, :n], "attention_mask": mask[None, :n]})[0][0]
        )
    out = np.asarray(rows, dtype=np.float64)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def sentence_metrics(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Sentence-embedding parity of ``candidate`` against ``reference`` (embeddings, one row per
    sentence, from ``sentence_embeddings``).

    cosine: per sentence, between the two embeddings (mean and minimum over sentences);
    neighbours: for each sentence, whether its most similar *other* sentence (by cosine of the
    embeddings) is the same under both models.
    """
    cosine = (reference * candidate).sum(axis=1)

    def nearest(e: np.ndarray) -> np.ndarray:
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(axis=1)

    agree = nearest(reference) == nearest(candidate)
    return {
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "neighbour_agreement": float(agree.mean()),
        "sentences": len(reference),
    }
