"""Finding, checking and creating the training engine's own Python environment.

onnxruntime-training 1.19.2 is the last onnxruntime build with training artifacts; its wheels
exist for CPython 3.10 and 3.11 on x86-64 Linux only, and it provides the ``onnxruntime``
module, so it can never share an environment with the user's onnxruntime. It lives in a
virtual environment of its own, found in this order:

1. the interpreter given by ``--training-python`` (API: ``training_python=``);
2. the ``ONNXZIP_TRAINING_PYTHON`` environment variable;
3. the environment onnxzip created earlier in the user's cache folder
   (``ONNXZIP_CACHE``, else the platform's cache folder) under ``training-engine/``;
4. otherwise it is created there on first use: a CPython 3.11 or 3.10 (the running interpreter
   when it is one, else ``python3.11`` / ``python3.10`` from PATH), ``venv``, ``pip install``
   of the pinned packages, a probe of the result. It is built in a temporary folder beside its
   final place and renamed when complete, so an interrupted creation leaves nothing half made.
   ``offline=True`` refuses to download.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from onnxzip import progress
from onnxzip.engine.worker import ENGINE_VERSION  # the worker's own: stdlib-only module level
from onnxzip.errors import InputError

logger = logging.getLogger(__name__)

# What the worker environment installs: exact pins, the combination the test suite runs.
REQUIREMENTS = (f"onnxruntime-training=={ENGINE_VERSION}", "onnx==1.23.2", "numpy==2.4.6")
ENV_NAME = f"ort-training-{ENGINE_VERSION}-v1"
SUPPORTED_PYTHONS = ((3, 11), (3, 10))
WORKER = Path(__file__).with_name("worker.py")
_MARKER = "onnxzip-engine.json"


class EngineUnavailable(InputError):
    """The training engine cannot be found, created or run here; the message says why and what
    works instead."""


INSTEAD = (
    "inspect, verify, quantize and prune with magnitude criteria work without it; "
    "compress runs without recovery"
)


@dataclass(frozen=True)
class Engine:
    python: Path  # the training interpreter
    origin: str  # "--training-python", "ONNXZIP_TRAINING_PYTHON", "cache" or "created"
    info: dict  # the probe: versions of python, onnxruntime, onnx, numpy


def cache_root() -> Path:
    """The folder onnxzip keeps its own files in (``ONNXZIP_CACHE`` overrides)."""
    if os.environ.get("ONNXZIP_CACHE"):
        return Path(os.environ["ONNXZIP_CACHE"]).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "onnxzip" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "onnxzip"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "onnxzip"


def env_folder() -> Path:
    return cache_root() / "training-engine" / ENV_NAME


def _venv_python(folder: Path) -> Path:
    if sys.platform == "win32":
        return folder / "Scripts" / "python.exe"
    return folder / "bin" / "python"


def platform_supported() -> tuple[bool, str]:
    """Whether onnxruntime-training 1.19.2 has wheels for this operating system and CPU."""
    machine = platform.machine().lower()
    if sys.platform.startswith("linux") and machine in ("x86_64", "amd64"):
        return True, ""
    system = {"darwin": "macOS", "win32": "Windows"}.get(sys.platform, sys.platform)
    return False, f"onnxruntime-training {ENGINE_VERSION} has no build for {system} on {machine}"


def probe(python: str | os.PathLike, *, what: str) -> dict:
    """Runs the worker's probe with ``python``; raises EngineUnavailable naming ``what``."""
    try:
        proc = subprocess.run(
            [str(python), "-I", str(WORKER), "--probe"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    except FileNotFoundError:
        raise EngineUnavailable(f"{what}: no such interpreter: {python}") from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineUnavailable(f"{what}: cannot run {python}: {exc}") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    info = {}
    if lines:
        with contextlib.suppress(json.JSONDecodeError):
            info = json.loads(lines[-1])
    if proc.returncode != 0 or "error" in info or not info:
        reason = info.get("error") or (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EngineUnavailable(
            f"{what}: {python} cannot run the training engine ({reason}); it needs "
            f"onnxruntime-training=={ENGINE_VERSION} on CPython 3.10 or 3.11"
        )
    if info.get("onnxruntime") != ENGINE_VERSION:
        raise EngineUnavailable(
            f"{what}: {python} has onnxruntime {info.get('onnxruntime')}, the training engine "
            f"needs onnxruntime-training=={ENGINE_VERSION}"
        )
    return info


def _python_version(python: str) -> tuple[int, int] | None:
    try:
        proc = subprocess.run(
            [python, "-I", "-c", "import sys; print(sys.version_info[0], sys.version_info[1])"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    try:
        major, minor = proc.stdout.split()[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def base_interpreters(base_python: str | None = None) -> list[str]:
    """CPython 3.11 / 3.10 interpreters that could host the engine, best first."""
    candidates = []
    if base_python:
        candidates.append(base_python)
    else:
        if tuple(sys.version_info[:2]) in SUPPORTED_PYTHONS:
            candidates.append(sys.executable)
        for name in ("python3.11", "python3.10"):
            found = shutil.which(name)
            if found:
                candidates.append(found)
    usable = []
    for candidate in candidates:
        if _python_version(candidate) in SUPPORTED_PYTHONS and candidate not in usable:
            usable.append(candidate)
    return usable


def _cached() -> Engine | None:
    folder = env_folder()
    marker = folder / _MARKER
    python = _venv_python(folder)
    if not (marker.is_file() and python.exists()):
        return None
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return Engine(python, "cache", info)


def locate(
    training_python: str | os.PathLike | None = None,
    *,
    offline: bool = False,
    create: bool = True,
    base_python: str | None = None,
) -> Engine:
    """The training engine to use (see the module text); creates it when allowed.

    Raises:
        EngineUnavailable: none is configured, none can be created here, or the one named
            does not work. The message says why and what works instead.
    """
    if training_python:
        return Engine(
            Path(training_python),
            "--training-python",
            probe(training_python, what="--training-python"),
        )
    configured = os.environ.get("ONNXZIP_TRAINING_PYTHON")
    if configured:
        return Engine(
            Path(configured),
            "ONNXZIP_TRAINING_PYTHON",
            probe(configured, what="ONNXZIP_TRAINING_PYTHON"),
        )
    cached = _cached()
    if cached is not None:
        return cached
    if not create:
        raise EngineUnavailable(
            f"the training engine is not set up (run `python -m onnxzip setup-training`); {INSTEAD}"
        )
    return setup(offline=offline, base_python=base_python)


def setup(*, offline: bool = False, base_python: str | None = None, force: bool = False) -> Engine:
    """Creates the training environment in the cache folder (or returns the existing one)."""
    folder = env_folder()
    if not force:
        cached = _cached()
        if cached is not None:
            return cached
    supported, why = platform_supported()
    if not supported:
        raise EngineUnavailable(f"training engine unavailable: {why}; {INSTEAD}")
    if offline:
        raise EngineUnavailable(
            f"the training engine is not set up and --offline forbids downloading "
            f"onnxruntime-training {ENGINE_VERSION}; run `python -m onnxzip setup-training` once "
            f"online or pass --training-python; {INSTEAD}"
        )
    bases = base_interpreters(base_python)
    if not bases:
        named = base_python or "python3.11 / python3.10 on PATH"
        raise EngineUnavailable(
            f"training engine unavailable: onnxruntime-training {ENGINE_VERSION} needs CPython "
            f"3.10 or 3.11 and none was found ({named}); install one or pass --training-python; "
            f"{INSTEAD}"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{ENV_NAME}-", dir=folder.parent))
    try:
        python = _venv_python(tmp)
        steps = ["virtual environment", "install " + ", ".join(REQUIREMENTS), "check"]
        bar = progress.bar(steps, total=len(steps), desc="training engine", unit="step")
        for step in bar:
            logger.info("training engine: %s", step)
            if step == "virtual environment":
                _run([bases[0], "-m", "venv", str(tmp)], "creating the virtual environment")
            elif step.startswith("install"):
                _run(
                    [
                        str(python),
                        "-m",
                        "pip",
                        "install",
                        "--disable-pip-version-check",
                        "--no-input",
                        "--quiet",
                        *REQUIREMENTS,
                    ],
                    f"installing onnxruntime-training {ENGINE_VERSION}",
                )
            else:
                info = probe(python, what="the new training environment")
        (tmp / _MARKER).write_text(json.dumps(info, indent=1))
        if force and folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("training engine ready in %s (python %s)", folder, info.get("python"))
    return Engine(_venv_python(folder), "created", info)


def _run(command: list[str], what: str) -> None:
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineUnavailable(f"training engine: {what} failed: {exc}") from None
    if proc.returncode != 0:
        lines = [
            line
            for line in (proc.stderr or proc.stdout).strip().splitlines()
            if line.strip() and not line.startswith("WARNING")
        ]
        raise EngineUnavailable(
            f"training engine: {what} failed: {lines[-1] if lines else 'exit ' + str(proc.returncode)}"
        )
