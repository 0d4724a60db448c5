"""Shared fixtures: the shipped digits models and data, small models written as ONNX text."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
ONNX_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"


@pytest.fixture(scope="session")
def resnet_path() -> Path:
    return MODELS / "digits_resnet.onnx"


@pytest.fixture(scope="session")
def mobilenet_path() -> Path:
    return MODELS / "digits_mobilenet.onnx"


@pytest.fixture(scope="session")
def test_npz() -> Path:
    return MODELS / "digits_test.npz"


@pytest.fixture(scope="session")
def calib_npz() -> Path:
    return MODELS / "digits_calib.npz"


def parse(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model, full_check=True)
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Runs the command line in-process; returns (exit code, stdout, stderr)."""
    from onnxzip.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def python() -> str:
    return sys.executable


def run_python(code: str, timeout: float = 600):
    """Runs ``code`` in a fresh interpreter with the project importable; the finished process."""
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout
    )


def random_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def load_script(name: str):
    """Imports ``scripts/<name>.py`` as a module (scripts are not a package)."""
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
