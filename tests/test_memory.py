"""The memory budget: batches shrink so that one run of a large-image model fits it, the run
says so, and the process's peak memory stays near the budget instead of growing with the batch."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as oh

from onnxzip import io
from onnxzip.analysis import RUN_OVERHEAD, activation_bytes, fit_memory
from onnxzip.data import input_specs, open_samples


def _conv_net(path, size: int, samples: int):
    """3 -> 32 -> 64 -> 64 channels at full resolution (a segmentation-style trunk), symbolic
    height and width, and ``samples`` smooth images of ``size`` x ``size``."""
    rng = np.random.default_rng(0)
    nodes, inits, c, x = [], [], 3, "x"
    for i, out in enumerate([32, 64, 64]):
        w = (rng.standard_normal((out, c, 3, 3)) * 0.2).astype(np.float32)
        inits.append(onnx.numpy_helper.from_array(w, f"w{i}"))
        nodes += [
            oh.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
            oh.make_node("Relu", [f"c{i}"], [f"r{i}"]),
        ]
        x, c = f"r{i}", out
    nodes += [oh.make_node("GlobalAveragePool", [x], ["g"]), oh.make_node("Flatten", ["g"], ["y"])]
    graph = oh.make_graph(
        nodes,
        "trunk",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])],
        inits,
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)
    data = path.with_suffix(".npz")
    np.savez(data, x=rng.standard_normal((samples, 3, size, size)).astype(np.float32))
    return data


def test_activation_estimate_counts_every_intermediate_at_the_samples_shapes(tmp_path):
    data = _conv_net(tmp_path / "m.onnx", 64, 4)
    model = io.load_model(tmp_path / "m.onnx")
    got = activation_bytes(model, {"x": [1, 3, 64, 64]})
    pixels = 64 * 64
    # Conv and Relu outputs at full resolution, then the pooled [1, 64, 1, 1] and [1, 64]
    assert got == 4 * (pixels * (32 + 32 + 64 + 64 + 64 + 64) + 64 + 64)
    samples = open_samples(input_specs(model), data)
    fit = fit_memory(model, samples, 32, budget=3 * RUN_OVERHEAD * got)
    assert fit.batch == 3 and fit.capped and samples.batch_size_for(32) == 3
    assert samples.batch_size_for(2) == 2  # a smaller request stays
    roomy = open_samples(input_specs(model), data)
    assert fit_memory(model, roomy, 32, budget=2**40).batch == 32 and roomy.max_batch is None


def test_quantize_under_a_budget_runs_small_batches_and_stays_within_it(tmp_path):
    """512 x 512 images: one sample's intermediates are 268 MB; 16 samples at the default batch
    would hold gigabytes at once. Under a 1 GiB budget the run says which batch it chose and the
    process's peak resident memory stays under 1.5 GiB (interpreter and libraries included)."""
    data = _conv_net(tmp_path / "m.onnx", 512, 12)
    cmd = [sys.executable, "-m", "onnxzip", "quantize", "m.onnx", "-o", "q.onnx"]
    cmd += ["--data", data.name, "--no-floors", "--memory-budget", "1G"]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _, status, usage = os.wait4(proc.pid, 0)
    out = proc.stdout.read()
    assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read()
    assert "memory       batches of 1 sample (capped from 32 by the memory budget of 1.0 GiB" in out
    assert usage.ru_maxrss / 2**20 < 1.5  # KiB -> GiB
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)


def test_a_bad_memory_budget_is_refused_in_one_line(tmp_path):
    data = _conv_net(tmp_path / "m.onnx", 32, 4)
    for bad in ("lots", "12k"):
        run = subprocess.run(
            [sys.executable, "-m", "onnxzip", "verify", "m.onnx", "m.onnx", "--data", data.name]
            + ["--memory-budget", bad],
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert run.returncode == 2
        assert "memory-budget" in run.stderr and len(run.stderr.strip().splitlines()) == 1
