"""Shared measurement code of the benchmark scripts (see the project's benchmarking rules).

Latency: onnxruntime CPU, 2 intra-op threads, batch as fed, default graph optimisation; three
warm-up runs per session, then rounds in which every model runs for about a second in turn;
the median per model is reported. Tool time and memory: each tool in a fresh process started
by a small launcher, wall time and the process's own peak RSS from the OS.
"""

from __future__ import annotations

import json
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


def run_measured(cmd: list[str], cwd: Path) -> dict:
    """Runs a command in a fresh process: wall seconds and peak RSS (MiB) from the OS."""
    out = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *cmd], cwd=cwd, capture_output=True, text=True, check=True
    )
    info = json.loads(out.stdout)
    result = {"seconds": info["seconds"], "peak_mib": info["peak_mib"]}
    if info["code"] != 0:
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


def versions() -> dict:
    from importlib.metadata import version

    return {
        p: version(p) for p in ("onnxruntime-training", "onnx", "onnx-ir", "onnxscript", "numpy")
    }


def sentence_metrics(reference: Path, candidate: Path, data: Path) -> dict:
    """Sentence-embedding parity of ``candidate`` against ``reference`` on every sentence in ``data``.

    cosine: per sentence, between the two embeddings (mean and minimum over sentences);
    neighbours: for each sentence, whether its most similar *other* sentence (by cosine of the
    embeddings) is the same under both models.
    """
    with np.load(data) as archive:
        feed = {k: archive[k] for k in ("input_ids", "attention_mask")}

    def embed(path: Path) -> np.ndarray:
        # One sentence per run, without padding, as a server embeds a request: dynamic
        # quantization takes its activation range from the batch, so a batch of 240 padded
        # sentences would be judged on a range no single request has.
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        rows = []
        for ids, mask in zip(feed["input_ids"], feed["attention_mask"], strict=True):
            n = int(mask.sum())
            one = {"input_ids": ids[None, :n], "attention_mask": mask[None, :n]}
            rows.append(session.run(None, one)[0][0])
        out = np.asarray(rows, dtype=np.float64)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    a, b = embed(reference), embed(candidate)
    cosine = (a * b).sum(axis=1)

    def nearest(e: np.ndarray) -> np.ndarray:
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(axis=1)

    agree = nearest(a) == nearest(b)
    return {
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "neighbour_agreement": float(agree.mean()),
        "sentences": len(a),
    }
