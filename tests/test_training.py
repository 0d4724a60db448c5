"""The shipped digits models and the script that trains them through the training engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
from conftest import ROOT

from onnxzip import io
from onnxzip.data import NpzSamples, input_specs
from onnxzip.verify import verify


def test_shipped_models_reach_95_percent_on_held_out_digits(resnet_path, mobilenet_path, test_npz):
    for path in (resnet_path, mobilenet_path):
        samples = NpzSamples(test_npz, input_specs(io.load_model(path)))
        (out,) = verify(path, path, samples).outputs
        assert out.reference_accuracy >= 0.95, (path.name, out.reference_accuracy)
    summary = json.loads((ROOT / "models" / "digits_models.json").read_text())
    assert summary["digits_resnet"]["test_accuracy"] >= 0.95


def test_shipped_models_are_inference_form(resnet_path, mobilenet_path, calib_npz, test_npz):
    for path, depthwise in ((resnet_path, False), (mobilenet_path, True)):
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto, full_check=True)
        ops = [n.op_type for n in proto.graph.node]
        assert "BatchNormalization" in ops and "ReduceMean" not in ops
        assert proto.opset_import[0].version <= 21 and proto.ir_version <= 10
        groups = [
            a.i for n in proto.graph.node for a in n.attribute if a.name == "group" and a.i > 1
        ]
        assert bool(groups) == depthwise
    calib, test = np.load(calib_npz), np.load(test_npz)
    assert calib["input"].shape == (512, 1, 8, 8) and test["input"].shape == (360, 1, 8, 8)
    assert set(np.unique(test["labels"])) == set(range(10))


def test_train_script_runs_with_onnxruntime_training(tmp_path):
    """The script trains in the training engine's worker (its own environment)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "train_digits.py"),
            "--out",
            str(tmp_path),
            "--epochs",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "digits_models.json").read_text())
    for arch in ("digits_resnet", "digits_mobilenet"):
        info = summary[arch]
        # The script itself checks inference form == full-batch training form; it records the gap.
        assert info["inference_vs_training_form_max_abs"] < 1e-3
        assert info["test_accuracy"] > 0.5  # two epochs already learn far beyond chance (0.1)
        onnx.checker.check_model(str(tmp_path / f"{arch}.onnx"), full_check=True)
