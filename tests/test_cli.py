"""Command line: exit codes, one-line errors, no output on failure, JSON reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, run_cli, run_python
from test_verify import perturbed


def assert_one_line_error(code, out, err, expected_code=2):
    assert code == expected_code
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("onnxzip: error:")
    assert "Traceback" not in err


def test_inspect_prints_hand_counted_macs_and_writes_json(resnet_path, tmp_path, capsys):
    code, out, err = run_cli(
        ["inspect", resnet_path, "--per-node", "--json", tmp_path / "r.json"], capsys
    )
    assert code == 0
    assert "533,824" in out and "19,994" in out and "s2.conv2" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["macs"] == 533_824 and data["parameters"] == 19_994


def test_verify_self_exits_0(resnet_path, test_npz, capsys):
    code, out, _ = run_cli(
        [
            "verify",
            resnet_path,
            resnet_path,
            "--data",
            test_npz,
            "--min-cosine",
            "0.9999",
            "--min-top1",
            "1",
        ],
        capsys,
    )
    assert code == 0 and "PASS" in out


def test_verify_perturbed_exits_1_and_names_node(resnet_path, test_npz, tmp_path, capsys):
    bad = perturbed(resnet_path, tmp_path)
    code, out, _ = run_cli(
        [
            "verify",
            resnet_path,
            bad,
            "--data",
            test_npz,
            "--min-cosine",
            "0.9999",
            "--per-node",
            "--json",
            tmp_path / "v.json",
        ],
        capsys,
    )
    assert code == 1
    assert "first diverging: node 's1.conv2' (Conv)" in out
    data = json.loads((tmp_path / "v.json").read_text())
    assert data["per_node"]["first_diverging"]["node"] == "s1.conv2"
    assert data["outputs"][0]["cosine_mean"] < 0.9999


def _bad_model(kind, tmp_path, resnet_path):
    path = tmp_path / "model.onnx"
    if kind == "missing":
        return tmp_path / "nowhere.onnx"
    if kind == "directory":
        path.mkdir()
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    elif kind == "truncated":
        path.write_bytes(resnet_path.read_bytes()[:30000])
    return path


@pytest.mark.parametrize("kind", ["missing", "directory", "random", "truncated"])
@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_bad_model_exits_2_with_one_line_and_no_output(
    kind, command, tmp_path, resnet_path, test_npz, capsys
):
    bad = _bad_model(kind, tmp_path, resnet_path)
    report = tmp_path / "report.json"
    args = (
        ["inspect", bad]
        if command == "inspect"
        else ["verify", resnet_path, bad, "--data", test_npz]
    )
    code, out, err = run_cli([*args, "--json", report], capsys)
    assert_one_line_error(code, out, err)
    assert str(bad) in err
    assert not report.exists()


@pytest.mark.parametrize(
    "arrays,needle",
    [
        ({"image": np.zeros((4, 1, 8, 8), np.float32)}, "'image' is not a model input"),
        ({"input": np.zeros((4, 1, 8, 8), np.float64)}, "dtype float64"),
        ({"input": np.zeros((4, 1, 6, 6), np.float32)}, "axis 2 must be 8"),
        ({"input": np.zeros((4, 64), np.float32)}, "rank 2"),
    ],
)
def test_bad_data_exits_2_with_one_line(arrays, needle, tmp_path, resnet_path, capsys):
    data = tmp_path / "d.npz"
    np.savez(data, **arrays)
    report = tmp_path / "report.json"
    code, out, err = run_cli(
        ["verify", resnet_path, resnet_path, "--data", data, "--json", report], capsys
    )
    assert_one_line_error(code, out, err)
    assert needle in err and str(data) in err
    assert not report.exists()


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["verify", "a.onnx"],
        ["inspect", "m.onnx", "--no-such-flag"],
        ["verify", "a.onnx", "b.onnx", "--synthetic", "4", "--min-top1", "1.5"],
        ["verify", "a.onnx", "b.onnx"],  # neither --data nor --synthetic
    ],
)
def test_usage_errors_exit_2_with_one_line(args, capsys):
    code, out, err = run_cli(args, capsys)
    assert_one_line_error(code, out, err)


def test_real_process_bad_input_has_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "onnxzip", "inspect", str(tmp_path / "missing.onnx")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"onnxzip: error: {tmp_path / 'missing.onnx'}: no such file"
    assert list(tmp_path.iterdir()) == []


def test_start_up_defers_sympy_but_it_still_works():
    """Importing onnxzip loads neither sympy nor any training machinery; onnx_ir's symbolic
    dimensions still work when asked for."""
    code = (
        "import sys, onnxzip\n"
        "print(sorted(m for m in ('sympy.core', 'onnxruntime.training') if m in sys.modules))\n"
        "import onnx_ir as ir\n"
        "print(ir.SymbolicDim('N') + 1)\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["[]", "N + 1"], proc.stdout


def test_real_process_inspect(resnet_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "onnxzip", "inspect", str(resnet_path)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "MACs        533,824 per sample" in proc.stdout
    assert proc.stderr == ""


def test_internal_error_exits_3_with_hint(resnet_path, capsys, monkeypatch):
    import onnxzip.analysis

    def broken(*args, **kwargs):
        raise RuntimeError("something unexpected\nsecond line")

    monkeypatch.setattr(onnxzip.analysis, "inspect_model", broken)
    code, out, err = run_cli(["inspect", resnet_path], capsys)
    assert code == 3
    assert err.strip().splitlines() == [
        "onnxzip: internal error: RuntimeError: something unexpected (rerun with --debug for the traceback)"
    ]


def test_internal_error_type_exits_3_and_says_internal(resnet_path, capsys, monkeypatch):
    import onnxzip.analysis
    from onnxzip.errors import InternalError

    def broken(*args, **kwargs):
        raise InternalError("a state the code never reaches")

    monkeypatch.setattr(onnxzip.analysis, "inspect_model", broken)
    code, out, err = run_cli(["inspect", resnet_path], capsys)
    assert code == 3
    assert err.strip().splitlines() == ["onnxzip: internal error: a state the code never reaches"]


def test_library_calls_print_nothing(resnet_path, test_npz, capsys):
    import onnxzip

    model = onnxzip.load_model(resnet_path)
    data = onnxzip.open_samples(onnxzip.input_specs(model), test_npz)
    onnxzip.verify(resnet_path, resnet_path, data, per_node=True)
    onnxzip.inspect_model(resnet_path)
    out, err = capsys.readouterr()
    assert out == "" and err == ""


def test_verify_holdout_uses_only_held_out_samples(resnet_path, test_npz, capsys, tmp_path):
    code, out, _ = run_cli(
        [
            "verify",
            resnet_path,
            resnet_path,
            "--data",
            test_npz,
            "--holdout",
            "0.25",
            "--json",
            tmp_path / "v.json",
        ],
        capsys,
    )
    assert code == 0
    data = json.loads((tmp_path / "v.json").read_text())
    assert data["samples"] == 90  # a quarter of 360
    assert "holdout split" in data["data"]
