"""The training engine: onnxruntime training artifacts in a worker process of their own.

onnxzip itself runs on the user's (newest, plain) onnxruntime. Gradients and fine-tuning need
``onnxruntime-training==1.19.2``, which lives in a separate environment (``env.py``) and runs in
a worker process (``worker.py``) that imports nothing from onnxzip. Nothing of the training
build is ever imported here.

The boundary is a temporary folder: the trainable twin (``model.onnx``, converted to opset <= 21
and IR <= 10 without touching the caller's model), one ``.npz`` per batch of feeds and a
versioned ``job.json`` go in; the parameters asked for (gradients per batch, or trained
weights) and the losses come out. The worker reports progress line by line on stdout; a worker
that dies, is killed or cannot start is reported in one line (``EngineUnavailable``, exit code
2) and leaves nothing behind.

``configure`` sets which engine the library uses (the command line's ``--training-python`` and
``--offline``); ``current`` finds (or creates) it on first use.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxzip import io, progress
from onnxzip.engine import cluster
from onnxzip.engine.env import (
    INSTEAD,
    WORKER,
    Engine,
    EngineUnavailable,
    env_folder,
    locate,
    platform_supported,
    setup,
)
from onnxzip.engine.worker import ENGINE_VERSION, PROTOCOL
from onnxzip.errors import ModelError, OnnxzipError

__all__ = [
    "ENGINE_VERSION",
    "Engine",
    "EngineUnavailable",
    "JobResult",
    "configure",
    "current",
    "env_folder",
    "platform_supported",
    "run_job",
    "setup",
    "use",
]

logger = logging.getLogger(__name__)


@dataclass
class _Config:
    training_python: str | None = None
    offline: bool = False
    engine: Engine | None = None


_config = _Config()


def configure(training_python: str | None = None, offline: bool = False) -> None:
    """Which training engine ``current`` returns (reset: the next use locates it again)."""
    global _config
    _config = _Config(training_python, offline)


def use(found: Engine) -> None:
    """Makes ``found`` (an engine located elsewhere, e.g. by a Ray driver) the current one.

    Raises:
        ClusterError: its interpreter is not on this machine (a Ray node without it).
    """
    if not found.python.exists():
        raise cluster.ClusterError(
            f"the training engine's interpreter {found.python} is not on this Ray node: "
            "install the same environment on every node, or run without --ray"
        )
    _config.engine = found


def current() -> Engine:
    """The configured training engine, located (or created) once per process."""
    if _config.engine is None:
        _config.engine = locate(_config.training_python, offline=_config.offline)
    return _config.engine


@dataclass
class JobResult:
    arrays: dict[str, np.ndarray]
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)  # train: which batch each step used
    scale: float = 1.0  # train with trials: the factor the learning rates were scaled by
    trial_scores: list[float] = field(default_factory=list)  # each trial's mean late loss


class WorkerFailed(ModelError):
    """onnxruntime-training refused the twin or failed in a step (the message says which op)."""


def first_line(text: str) -> str:
    """The part of an onnxruntime-training error a user can act on."""
    text = text.strip()
    marker = "The gradient builder has not been registered:"
    if marker in text:
        op = text.split(marker, 1)[1].split()[0]
        return f"op {op} has no gradient in onnxruntime-training"
    for line in text.splitlines():
        if "was false." in line:
            return line.split("was false.", 1)[1].strip() or line.strip()
    line = text.splitlines()[0] if text else "no message"
    if "[ONNXRuntimeError]" in line:  # "<C++ location> [ONNXRuntimeError] : 1 : FAIL : message"
        line = line.split("[ONNXRuntimeError]", 1)[1].split(" : ", 3)[-1].strip()
    if line.startswith("This is an invalid model. Error: "):
        line = "the training graph is invalid: " + line.split("Error: ", 1)[1]
    return line


def run_job(
    twin: ir.Model,
    *,
    kind: str,
    requires_grad: list[str],
    frozen: list[str],
    batches: Iterable[dict[str, np.ndarray]],
    read: list[str],
    loss: str | dict | None = None,
    learning_rates: list[float] | None = None,
    trials: list[float] | None = None,
    trial_steps: int = 0,
    shuffle_seed: int | None = None,
    batch_size: int | None = None,
    what: str = "training",
    desc: str | None = None,
    threads: int | None = None,
) -> JobResult:
    """Runs one job in the training worker (see ``worker.py`` for the job kinds).

    ``kind`` is ``"gradients"`` (each batch once; ``read`` gradients per batch) or ``"train"``
    (AdamW, one step per learning rate; ``read`` trained values; ``trials``: factors of the
    rates tried for ``trial_steps`` steps each first, the best one kept, as ``worker.py`` says). ``loss`` is None (the twin's
    first output is the loss), ``"cross-entropy"`` (adds a ``labels`` input) or
    ``{"block": NAME, "options": {...}}`` naming an ``onnxblock.loss`` block. ``threads`` is
    the worker's onnxruntime intra-op thread count (default: one inside a Ray task, whose CPU it
    was given, else onnxruntime's default).

    Raises:
        EngineUnavailable: no training engine here, or the worker died (exit code 2).
        WorkerFailed: onnxruntime-training cannot build or run the twin (the op is named).
    """
    engine = current()
    with tempfile.TemporaryDirectory(prefix="onnxzip-engine-") as tmp:
        folder = Path(tmp)
        io.save_for_engine(twin, folder / "model.onnx", name=f"{what} twin")
        (folder / "batches").mkdir()
        sizes = []
        for i, feeds in enumerate(batches):
            np.savez(folder / "batches" / f"{i:06d}.npz", **feeds)
            sizes.append(len(next(iter(feeds.values()))))
        count = len(sizes)
        if count == 0:
            raise ModelError(f"{what}: no batches to run")
        job = {
            "protocol": PROTOCOL,
            "kind": kind,
            "requires_grad": list(requires_grad),
            "frozen": list(frozen),
            "loss": loss,
            "read": list(read),
            "learning_rates": [float(r) for r in learning_rates or []],
            "trials": [float(f) for f in trials or []],
            "trial_steps": int(trial_steps),
            "shuffle_seed": shuffle_seed,
            "batch_size": batch_size,
            "sizes": sizes,
            "threads": threads if threads is not None else cluster.worker_threads(),
        }
        (folder / "job.json").write_text(json.dumps(job))
        total = count
        if kind == "train":
            runs = len(job["trials"]) if len(job["trials"]) > 1 else 0
            total = len(job["learning_rates"]) + runs * job["trial_steps"]
        _run_worker(engine, folder, total, desc or what, what)
        error = folder / "error.json"
        if error.is_file():
            _raise(json.loads(error.read_text()), engine, what)
        if not (folder / "result.json").is_file():
            raise EngineUnavailable(f"{what}: the training worker ended without a result")
        info = json.loads((folder / "result.json").read_text())
        with np.load(folder / "result.npz") as data:
            arrays = {k: data[k] for k in data.files}
    return JobResult(
        arrays,
        info.get("losses", []),
        info.get("step_seconds", []),
        info.get("batches", []),
        info.get("scale", 1.0),
        info.get("trial_scores", []),
    )


def _run_worker(engine: Engine, folder: Path, total: int, desc: str, what: str) -> None:
    log = folder / "worker.log"
    with open(log, "w") as stderr:
        try:
            proc = subprocess.Popen(
                [str(engine.python), "-I", str(WORKER), str(folder)],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                start_new_session=os.name == "posix",  # Ctrl-C reaches onnxzip, which stops it
            )
        except OSError as exc:
            raise EngineUnavailable(
                f"{what}: cannot start the training worker {engine.python}: {exc.strerror or exc}"
            ) from None
        bar = progress.bar(iter(()), total=total, desc=desc, unit="step")
        try:
            done = 0
            for line in proc.stdout:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                n = int(record.get("progress", done))
                bar.update(n - done)
                done = n
                if "loss" in record and hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
            code = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            bar.close()
    if code < 0 or (code != 0 and not (folder / "error.json").is_file()):
        how = (
            f"was killed by signal {signal.Signals(-code).name}"
            if code < 0 and -code in signal.valid_signals()
            else f"exited with code {code}"
        )
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        detail = f": {tail[-1]}" if tail and code > 0 else ""
        raise EngineUnavailable(
            f"{what}: the training worker ({engine.python}) {how} before finishing{detail}"
        )


def _raise(error: dict, engine: Engine, what: str) -> None:
    stage, message = error.get("stage"), error.get("message", "")
    if stage == "build":
        raise WorkerFailed(
            f"{what}: onnxruntime cannot build the gradient graph: {first_line(message)}"
        )
    if stage == "step":
        raise WorkerFailed(f"{what}: onnxruntime failed in a training step: {first_line(message)}")
    if stage == "environment":
        where = (
            f"; remove {env_folder()} or run `python -m onnxzip setup-training --force`"
            if engine.origin in ("cache", "created")
            else ""
        )
        raise EngineUnavailable(
            f"{what}: the training environment {engine.python} is broken "
            f"({first_line(message)}){where}; {INSTEAD}"
        )
    if stage in ("loss", "data"):
        raise ModelError(f"{what}: {message}")
    raise OnnxzipError(f"{what}: internal error in the training worker: {first_line(message)}")
