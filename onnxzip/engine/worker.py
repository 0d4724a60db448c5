"""The training-engine worker: runs one job with onnxruntime-training 1.19.2 in its own process.

This file is executed by the *training interpreter* (a separate environment holding
``onnxruntime-training==1.19.2``, ``onnx`` and ``numpy``) as ``python -I worker.py JOB_FOLDER``.
It imports nothing from onnxzip, so the user's environment and the training environment share
no packages; onnxzip imports only its constants (its module level is the standard library).

The boundary (protocol version ``PROTOCOL``) is a folder:

* ``job.json``: what to do (below); ``model.onnx``: the trainable twin (opset <= 21, IR <= 10);
  ``batches/NNNNNN.npz``: the feeds of each batch, keyed by the twin's input names.
* out: ``result.npz`` and ``result.json`` (written last, atomically: a killed worker leaves
  neither), or ``error.json`` with ``{"stage", "message"}`` when onnxruntime refuses.
* stdout: one JSON object per line, ``{"progress": n}``, for the caller's progress bar.

Jobs (``job["kind"]``):

* ``gradients``: every batch once, in order, forward and backward; the gradients of the
  parameters in ``read`` are returned per batch (``result.npz``: ``NAME`` of shape
  ``[batches, *param_shape]``), with the losses.
* ``train``: ``len(learning_rates)`` optimizer steps (AdamW), batch ``i`` drawn by cycling
  through the batches; with ``shuffle_seed`` each drawn batch's samples are permuted by one
  ``numpy.random.default_rng(shuffle_seed)``; with ``batch_size`` set, batches of another
  size are skipped without being read (``sizes`` gives each file's samples; a twin whose batch
  is fixed). Returns the final ``read`` parameters. With ``trials`` (factors, largest first)
  and ``trial_steps``, each factor first runs ``trial_steps`` steps at ``factor *
  learning_rates[0]`` from the initial weights; the schedule then runs from the initial weights
  again, scaled by the factor whose trial ended at the lowest loss (``scale`` in the result).

``onnxruntime.training``'s ``__init__`` imports torch (ORTModule); the ``artifacts`` and ``api``
submodules do not need it, so the package is registered bare, without running that
``__init__``, before they are imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

PROTOCOL = 2  # 2: job.json lists the samples per batch file (sizes)
ENGINE_VERSION = "1.19.2"
_PACKAGE = "onnxruntime.training"


def _register_bare_package():
    if importlib.util.find_spec("torch") is None:
        sys.modules[_PACKAGE + ".ortmodule"] = None  # what importing it would conclude
    import onnxruntime

    if _PACKAGE not in sys.modules:
        spec = importlib.util.find_spec(_PACKAGE)
        if spec is None or spec.submodule_search_locations is None:
            raise ImportError(
                f"onnxruntime.training is missing: this interpreter needs "
                f"onnxruntime-training=={ENGINE_VERSION}"
            )
        # Deliberately no spec.loader.exec_module: that would run __init__ and import torch.
        sys.modules[_PACKAGE] = importlib.util.module_from_spec(spec)
    onnxruntime.training = sys.modules[_PACKAGE]
    return onnxruntime


def _engine():
    ort = _register_bare_package()
    artifacts = importlib.import_module(_PACKAGE + ".artifacts")
    api = importlib.import_module(_PACKAGE + ".api")

    def quiet_options():  # the gradient builder warns per node at the default level
        options = ort.SessionOptions()
        options.log_severity_level = 3
        return options

    graph_utils = importlib.import_module(_PACKAGE + ".onnxblock._training_graph_utils")
    graph_utils.SessionOptions = quiet_options
    return ort, artifacts, api


def probe() -> dict:
    """What this interpreter offers; printed by ``worker.py --probe``."""
    import platform

    import numpy
    import onnx

    ort, artifacts, api = _engine()
    return {
        "protocol": PROTOCOL,
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "numpy": numpy.__version__,
        "torch_loaded": "torch" in sys.modules,
        "training_api": callable(artifacts.generate_artifacts) and api.Module is not None,
    }


class JobFailed(Exception):
    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


def _loss(artifacts, spec):
    if spec is None:
        return None  # the twin's first output is the loss
    if spec == "cross-entropy":
        return artifacts.LossType.CrossEntropyLoss
    if isinstance(spec, dict) and "block" in spec:
        onnxblock = importlib.import_module(_PACKAGE + ".onnxblock")
        cls = getattr(onnxblock.loss, spec["block"], None)
        if cls is None:
            raise JobFailed("loss", f"onnxblock has no loss block {spec['block']}")
        return cls(**spec.get("options", {}))
    raise JobFailed("loss", f"unknown loss {spec!r}")


def _cap_ir_version(path: Path) -> None:
    """onnx writes the optimizer graph at its newest IR version; onnxruntime 1.19 reads <= 10."""
    import onnx

    model = onnx.load(str(path))
    if model.ir_version > 10:
        model.ir_version = 10
        onnx.save(model, str(path))


def _emit(record: dict) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def run(folder: Path) -> None:
    import numpy as np

    job = json.loads((folder / "job.json").read_text())
    if job.get("protocol") != PROTOCOL:
        raise JobFailed("protocol", f"job protocol {job.get('protocol')} != worker {PROTOCOL}")
    ort, artifacts, api = _engine()
    batch_files = sorted((folder / "batches").glob("*.npz"))
    if not batch_files:
        raise JobFailed("data", "no batches")
    train = job["kind"] == "train"
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        art = Path(tmp)
        try:
            import onnx

            artifacts.generate_artifacts(
                onnx.load(str(folder / "model.onnx")),
                requires_grad=job["requires_grad"],
                frozen_params=job["frozen"],
                loss=_loss(artifacts, job.get("loss")),
                optimizer=artifacts.OptimType.AdamW if train else None,
                artifact_directory=str(art),
            )
        except JobFailed:
            raise
        except Exception as exc:  # the gradient builders raise RuntimeErrors with C++ text
            raise JobFailed("build", str(exc)) from exc
        options = ort.SessionOptions()
        if job.get("threads"):  # a Ray task's one CPU; else onnxruntime's default
            options.intra_op_num_threads = int(job["threads"])
            options.inter_op_num_threads = 1

        if train:
            _cap_ir_version(art / "optimizer_model.onnx")

        def fresh():
            """Module and optimizer from the checkpoint as written: the initial weights and
            no optimizer moments (each learning-rate trial and the run start from there)."""
            try:  # sessions over the gradient graph: where a missing kernel shows (ResizeGrad)
                state = api.CheckpointState.load_checkpoint(str(art / "checkpoint"))
                module = api.Module(
                    str(art / "training_model.onnx"),
                    state,
                    str(art / "eval_model.onnx"),
                    device="cpu",
                    session_options=options,
                )
                optimizer = None
                if train:
                    optimizer = api.Optimizer(str(art / "optimizer_model.onnx"), module)
            except Exception as exc:
                raise JobFailed("build", str(exc)) from exc
            module.train()
            return state, module, optimizer

        state, module, optimizer = fresh()
        names = module.input_names()
        read = job.get("read", [])
        losses, step_seconds = [], []
        grads = {name: [] for name in read}

        def step(module, feeds):
            try:
                return float(module(*[np.ascontiguousarray(feeds[n]) for n in names]))
            except Exception as exc:
                raise JobFailed("step", str(exc)) from exc

        if not train:
            parameters = state.parameters
            for i, path in enumerate(batch_files):
                with np.load(path) as data:
                    feeds = {k: data[k] for k in data.files}
                t0 = time.perf_counter()
                losses.append(step(module, feeds))
                for name in read:  # Parameter.grad is a view the next step overwrites
                    grads[name].append(np.array(parameters[name].grad, copy=True))
                module.lazy_reset_grad()
                step_seconds.append(time.perf_counter() - t0)
                _emit({"progress": i + 1})
            arrays = {name: np.stack(g) for name, g in grads.items()}
        else:
            fixed = job.get("batch_size")
            sizes = job["sizes"]  # samples per batch file, so that skipped ones are never read
            if fixed and fixed not in sizes:
                raise JobFailed("data", f"no batch of the fixed size {fixed}")
            done = 0

            def schedule(module, optimizer, rates, losses, step_seconds):
                """``len(rates)`` steps from the first batch on, in the seeded order."""
                nonlocal done
                rng = (
                    np.random.default_rng(job["shuffle_seed"])
                    if job.get("shuffle_seed") is not None
                    else None
                )
                cursor = 0
                used = []
                for rate in rates:
                    while True:
                        index = cursor % len(batch_files)
                        cursor += 1
                        # Drawn for every batch, skipped ones too: the same order whatever is fixed.
                        order = rng.permutation(sizes[index]) if rng is not None else None
                        if not fixed or sizes[index] == fixed:
                            break
                    with np.load(batch_files[index]) as data:
                        feeds = {
                            k: data[k] if order is None else data[k][order] for k in data.files
                        }
                    used.append(index)
                    t0 = time.perf_counter()
                    optimizer.set_learning_rate(float(rate))
                    losses.append(step(module, feeds))
                    optimizer.step()
                    module.lazy_reset_grad()
                    step_seconds.append(time.perf_counter() - t0)
                    done += 1
                    _emit({"progress": done, "loss": losses[-1]})
                return used

            rates = job["learning_rates"]
            trials = job.get("trials") or []
            scale, scores = 1.0, []
            if len(trials) > 1:
                # Each trial factor scales the schedule's first rate, held for ``trial_steps``
                # steps from the initial weights (the first trial in the sessions built above,
                # each later one in new ones: one set at a time); the lowest mean loss over the
                # second half of those steps picks the factor (a diverging trial scores inf).
                count = int(job["trial_steps"])
                for j, factor in enumerate(trials):
                    if j:
                        state, module, optimizer = fresh()
                    trial_losses = []
                    schedule(module, optimizer, [rates[0] * factor] * count, trial_losses, [])
                    tail = np.array(trial_losses[count // 2 :], np.float64)
                    scores.append(float(tail.mean()) if np.all(np.isfinite(tail)) else math.inf)
                    del state, module, optimizer
                best = int(np.argmin(scores))  # the first (the largest factor) on ties
                scale = float(trials[best])
                state, module, optimizer = fresh()
            used = schedule(module, optimizer, [r * scale for r in rates], losses, step_seconds)
            arrays = {name: np.array(state.parameters[name].data, copy=True) for name in read}
    partial = folder / "result.partial.npz"
    np.savez(partial, **arrays)
    os.replace(partial, folder / "result.npz")
    info = {
        "losses": losses,
        "step_seconds": step_seconds,
        "batches": used if train else list(range(len(batch_files))),
        "scale": scale if train else 1.0,
        "trial_scores": scores if train else [],
        "engine": ort.__version__,
    }
    (folder / "result.partial.json").write_text(json.dumps(info))
    os.replace(folder / "result.partial.json", folder / "result.json")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--probe"]:
        try:
            _emit(probe())
        except Exception as exc:  # reported to the caller, which names the environment
            _emit({"error": f"{type(exc).__name__}: {exc}"})
            return 1
        return 0
    folder = Path(argv[0])
    try:
        run(folder)
    except JobFailed as exc:
        (folder / "error.json").write_text(json.dumps({"stage": exc.stage, "message": str(exc)}))
        return 1
    except ImportError as exc:  # the environment lacks (or has a broken) training build
        (folder / "error.json").write_text(
            json.dumps({"stage": "environment", "message": f"{type(exc).__name__}: {exc}"})
        )
        return 1
    except Exception as exc:
        record = {
            "stage": "internal",
            "message": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
        (folder / "error.json").write_text(json.dumps(record))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
