"""The training engine boundary: a worker process with onnxruntime-training 1.19.2 in its own
environment, never imported into the user's."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnx_ir as ir
import pytest
from conftest import MODELS, ROOT, run_python

from onnxzip import engine, io
from onnxzip.engine import env as engine_env


@pytest.fixture(scope="module")
def training_python() -> Path:
    """The training interpreter the suite uses (created in the cache folder when missing)."""
    return engine.locate().python


def _run(args, env_extra=None, tmp=None, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "onnxzip", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp,
        timeout=timeout,
    )


def _linear(opset: int = 17) -> ir.Model:
    """y = x @ W with W trainable; the loss 0.5 * sum(y^2) is the first output."""
    w = np.random.default_rng(3).normal(size=(4, 3)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("MatMul", ["x", "W"], ["y"]),
            onnx.helper.make_node("Mul", ["y", "y"], ["sq"]),
            onnx.helper.make_node("ReduceSum", ["sq"], ["total"], keepdims=0),
            onnx.helper.make_node("Mul", ["total", "half"], ["loss"]),
        ],
        "linear",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
        [onnx.helper.make_tensor_value_info("loss", onnx.TensorProto.FLOAT, [])],
        [
            onnx.numpy_helper.from_array(w, "W"),
            onnx.numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        ],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    proto.ir_version = 8 if opset < 21 else 10
    return io.load_model(proto), w


def test_user_environment_has_plain_onnxruntime_and_no_training_build():
    import importlib.util

    import onnxruntime

    assert importlib.util.find_spec("onnxruntime.training") is None
    major, minor = (int(p) for p in onnxruntime.__version__.split(".")[:2])
    assert (major, minor) >= (1, 20)


def test_worker_probe_reports_the_training_build_without_torch(training_python):
    info = engine_env.probe(training_python, what="test")
    assert info["onnxruntime"] == "1.19.2" and info["training_api"] is True
    assert info["torch_loaded"] is False and info["protocol"] == engine.PROTOCOL


def test_gradients_job_returns_exact_per_batch_gradients(training_python):
    """dL/dW of 0.5 ||x W||^2 is x^T (x W): the worker's gradients match numpy per batch."""
    model, w = _linear()
    rng = np.random.default_rng(0)
    batches = [{"x": rng.normal(size=(n, 4)).astype(np.float32)} for n in (5, 3, 7)]
    result = engine.run_job(
        model, kind="gradients", requires_grad=["W"], frozen=[], batches=batches, read=["W"]
    )
    assert result.arrays["W"].shape == (3, 4, 3) and result.batches == [0, 1, 2]
    for b, feeds in enumerate(batches):
        x = feeds["x"].astype(np.float64)
        np.testing.assert_allclose(result.arrays["W"][b], x.T @ (x @ w), rtol=1e-4, atol=1e-5)
        assert result.losses[b] == pytest.approx(0.5 * float(np.sum((x @ w) ** 2)), rel=1e-4)


def test_train_job_is_deterministic_shuffles_and_skips_partial_batches(training_python):
    model, w = _linear()
    rng = np.random.default_rng(1)
    batches = [{"x": rng.normal(size=(n, 4)).astype(np.float32)} for n in (4, 4, 2)]
    kwargs = dict(
        kind="train",
        requires_grad=["W"],
        frozen=[],
        read=["W"],
        learning_rates=[0.05] * 12,
        shuffle_seed=0,
        batch_size=4,
    )
    first = engine.run_job(model, batches=batches, **kwargs)
    second = engine.run_job(model, batches=batches, **kwargs)
    np.testing.assert_array_equal(first.arrays["W"], second.arrays["W"])
    assert first.batches == [0, 1] * 6  # the 2-sample batch never trains; the others in turn
    # The worker's steps are Adam with bias correction (beta 0.9 / 0.999, eps 1e-8, no weight
    # decay: what generate_artifacts' AdamW does) on dL/dW = x^T x W, which the sample order
    # does not change: replayed here in float64, they give the same weights.
    expected, m, v = w.astype(np.float64), 0.0, 0.0
    for t, b in enumerate(first.batches, 1):
        x = batches[b]["x"].astype(np.float64)
        g = x.T @ (x @ expected)
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        expected = expected - 0.05 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    np.testing.assert_allclose(first.arrays["W"], expected, atol=1e-4)
    assert not np.allclose(first.arrays["W"], w, atol=0.1)
    # The user's model is untouched by the job.
    np.testing.assert_array_equal(model.graph.initializers["W"].const_value.numpy(), w)


def _adam(w, batches, order, rates):
    """AdamW as the worker steps it (bias correction, beta 0.9 / 0.999, eps 1e-8, no weight
    decay) on dL/dW = x^T x W, replayed in float64; returns the weights and each step's loss."""
    w, m, v, losses = w.astype(np.float64), 0.0, 0.0, []
    for t, (b, rate) in enumerate(zip(order, rates, strict=True), 1):
        x = batches[b]["x"].astype(np.float64)
        losses.append(0.5 * float(np.sum((x @ w) ** 2)))
        g = x.T @ (x @ w)
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        w = w - rate * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    return w, losses


def test_learning_rate_trials_pick_the_lowest_late_loss_and_restart_from_the_weights(
    training_python,
):
    """Each trial runs from the initial weights at its factor of the first rate; the schedule
    then runs from the initial weights again at the factor whose trial's second half had the
    lowest mean loss: the weights are those of a plain run at that rate."""
    model, w = _linear()
    rng = np.random.default_rng(2)
    batches = [{"x": rng.normal(size=(4, 4)).astype(np.float32)} for _ in range(3)]
    rates = [5.0 * (1 - i / 10) for i in range(10)]
    trials, count = [1.0, 0.1, 0.01], 6
    kwargs = dict(kind="train", requires_grad=["W"], frozen=[], read=["W"], batch_size=4)
    result = engine.run_job(
        model, batches=batches, learning_rates=rates, trials=trials, trial_steps=count, **kwargs
    )
    order = [i % 3 for i in range(count)]
    scores = [
        float(np.mean(_adam(w, batches, order, [rates[0] * f] * count)[1][count // 2 :]))
        for f in trials
    ]
    np.testing.assert_allclose(result.trial_scores, scores, rtol=1e-3)
    best = trials[int(np.argmin(scores))]
    assert best != trials[0]  # 5 per step overshoots weights of about 1: the choice matters
    assert result.scale == best
    plain = engine.run_job(
        model, batches=batches, learning_rates=[r * best for r in rates], **kwargs
    )
    np.testing.assert_array_equal(result.arrays["W"], plain.arrays["W"])
    assert result.losses == plain.losses and len(result.losses) == len(rates)
    expected, _ = _adam(w, batches, [i % 3 for i in range(10)], [r * best for r in rates])
    np.testing.assert_allclose(result.arrays["W"], expected, atol=1e-4)


def test_twin_above_opset_21_is_converted_for_the_engine_without_changing_the_model(
    tmp_path, training_python
):
    model, _ = _linear(opset=23)
    model.opset_imports[""] = 23
    io.save_for_engine(model, tmp_path / "twin.onnx")
    written = onnx.load(str(tmp_path / "twin.onnx"))
    assert written.opset_import[0].version == 21 and written.ir_version <= 10
    assert model.opset_imports[""] == 23
    result = engine.run_job(
        model,
        kind="gradients",
        requires_grad=["W"],
        frozen=[],
        batches=[{"x": np.ones((2, 4), np.float32)}],
        read=["W"],
    )
    assert np.all(np.isfinite(result.arrays["W"]))


def test_refused_op_is_named_in_one_line(training_python):
    """An op with no gradient builder is reported as such (a ModelError, exit code 2)."""
    from onnxzip.data import SyntheticSamples, input_specs
    from onnxzip.gradients import gradient_statistics
    from onnxzip.pruning import prepared_groups
    from testmodels.zoo import from_light

    light = from_light("inception_v1")
    work, groups = prepared_groups(light)

    with pytest.raises(engine.WorkerFailed, match="op LRN has no gradient in onnxruntime-training"):
        gradient_statistics(work, groups, SyntheticSamples(input_specs(light), 2), batch_size=2)


def test_no_command_imports_the_training_build(tmp_path, training_python):
    code = (
        "import sys\n"
        "from onnxzip.cli import main\n"
        f"args = ['prune', r'{MODELS / 'digits_resnet.onnx'}', '-o', r'{tmp_path / 'p.onnx'}',"
        f" '--ratio', '0.3', '--data', r'{MODELS / 'digits_calib.npz'}', '--recover-steps', '3',"
        " '--criterion', 'taylor', '--no-floors', '-q']\n"
        "assert main(args) == 0\n"
        "import onnxzip\n"
        "assert 'onnxruntime.training' not in sys.modules\n"
        "assert not any(m.startswith('torch') for m in sys.modules)\n"
        "print('ok')\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.mark.parametrize("kind", ["missing", "plain-onnxruntime", "broken"])
def test_unusable_interpreter_exits_2_in_one_line_and_writes_nothing(tmp_path, kind):
    if kind == "missing":
        python = tmp_path / "no-such-python"
    elif kind == "plain-onnxruntime":
        python = Path(sys.executable)  # the user's environment: plain onnxruntime only
    else:
        python = _script(tmp_path / "python", "echo 'Segmentation fault' >&2\nexit 139\n")
    out = tmp_path / "out"
    out.mkdir()
    proc = _run(
        [
            "stats",
            MODELS / "digits_resnet.onnx",
            "-o",
            out / "s.npz",
            "--data",
            MODELS / "digits_calib.npz",
            "--training-python",
            python,
        ],
        tmp=out,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxzip: error: --training-python"), lines
    assert "Traceback" not in proc.stderr
    assert list(out.iterdir()) == []


def test_killed_worker_exits_2_with_no_output_and_no_leftover(tmp_path, training_python):
    """The worker is killed (SIGKILL) in the middle of recovery: one line, exit 2, no model, the
    engine's temporary folder removed."""
    killer = _script(
        tmp_path / "python",
        'case "$*" in *--probe*) exec "$REAL" "$@";; esac\n'
        '(sleep 3; kill -9 $$) &\nexec "$REAL" "$@"\n',
    )
    work = tmp_path / "work"
    scratch = tmp_path / "scratch"
    work.mkdir()
    scratch.mkdir()
    proc = _run(
        [
            "prune",
            MODELS / "digits_resnet.onnx",
            "-o",
            work / "p.onnx",
            "--ratio",
            "0.3",
            "--data",
            MODELS / "digits_calib.npz",
            "--recover-steps",
            "200000",
            "--training-python",
            killer,
        ],
        env_extra={"REAL": str(training_python), "TMPDIR": str(scratch)},
        tmp=work,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "killed by signal SIGKILL" in lines[0], lines
    assert list(work.iterdir()) == []
    # (onnxruntime itself leaves a '.ses' session file in TMPDIR on import)
    assert [p.name for p in scratch.iterdir() if p.name.startswith("onnxzip")] == []


def test_compress_without_engine_recovers_by_reconstruction_and_says_so(tmp_path):
    proc = _run(
        [
            "compress",
            MODELS / "digits_resnet.onnx",
            "-o",
            tmp_path / "c.onnx",
            "--data",
            MODELS / "digits_calib.npz",
            "--no-latency",
        ],
        env_extra={"ONNXZIP_TRAINING_PYTHON": str(tmp_path / "absent")},
    )
    assert proc.returncode in (0, 1), proc.stderr
    assert "NOT FINE-TUNED: no distillation" in proc.stdout
    assert "no such interpreter" in proc.stdout
    assert "recovery  gradient-free instead:" in proc.stdout
    onnx.checker.check_model(str(tmp_path / "c.onnx"), full_check=True)


def test_offline_without_environment_refuses_to_download(tmp_path):
    proc = _run(
        [
            "stats",
            MODELS / "digits_resnet.onnx",
            "-o",
            tmp_path / "s.npz",
            "--data",
            MODELS / "digits_calib.npz",
            "--offline",
        ],
        env_extra={"ONNXZIP_CACHE": str(tmp_path / "cache"), "ONNXZIP_TRAINING_PYTHON": ""},
    )
    assert proc.returncode == 2
    assert "--offline forbids downloading" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "s.npz").exists()


def test_failed_creation_leaves_no_half_made_environment(tmp_path):
    """A base interpreter that passes the version check but cannot make a venv: exit 2, and the
    cache holds no environment, finished or not."""
    fake = _script(
        tmp_path / "python3.11",
        'case "$*" in *version_info*) echo "3 11"; exit 0;; esac\n'
        "echo 'Error: ensurepip is not available' >&2\nexit 1\n",
    )
    cache = tmp_path / "cache"
    proc = _run(
        ["setup-training", "--python", fake],
        env_extra={"ONNXZIP_CACHE": str(cache), "ONNXZIP_TRAINING_PYTHON": ""},
    )
    assert proc.returncode == 2, proc.stderr
    assert "creating the virtual environment failed: Error: ensurepip" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    folder = cache / "training-engine"
    assert not folder.exists() or list(folder.iterdir()) == []


def test_unsupported_platforms_say_why_and_what_works(monkeypatch, tmp_path):
    monkeypatch.setenv("ONNXZIP_CACHE", str(tmp_path))
    monkeypatch.delenv("ONNXZIP_TRAINING_PYTHON", raising=False)
    for system, machine in (("darwin", "arm64"), ("win32", "AMD64"), ("linux", "aarch64")):
        monkeypatch.setattr(engine_env.sys, "platform", system)
        monkeypatch.setattr(engine_env.platform, "machine", lambda m=machine: m)
        with pytest.raises(engine.EngineUnavailable, match="has no build for") as info:
            engine_env.locate()
        assert "quantize and prune with magnitude criteria work without it" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_cache_folder_per_platform(monkeypatch, tmp_path):
    monkeypatch.delenv("ONNXZIP_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(engine_env.sys, "platform", "linux")
    assert engine_env.cache_root() == tmp_path / "onnxzip"
    monkeypatch.setattr(engine_env.sys, "platform", "darwin")
    assert engine_env.cache_root() == Path.home() / "Library" / "Caches" / "onnxzip"
    monkeypatch.setenv("ONNXZIP_CACHE", str(tmp_path / "mine"))
    assert engine_env.cache_root() == tmp_path / "mine"


def test_setup_training_reports_the_environment(training_python):
    proc = _run(["setup-training", "--training-python", training_python])
    assert proc.returncode == 0, proc.stderr
    assert "onnxruntime-training 1.19.2" in proc.stdout


def test_job_protocol_mismatch_is_refused(tmp_path, training_python):
    model, _ = _linear()
    io.save_for_engine(model, tmp_path / "model.onnx")
    (tmp_path / "batches").mkdir()
    np.savez(tmp_path / "batches" / "000000.npz", x=np.ones((2, 4), np.float32))
    (tmp_path / "job.json").write_text(json.dumps({"protocol": 999, "kind": "gradients"}))
    proc = subprocess.run(
        [str(training_python), "-I", str(engine_env.WORKER), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    error = json.loads((tmp_path / "error.json").read_text())
    assert error["stage"] == "protocol" and not (tmp_path / "result.json").exists()


def test_training_errors_are_reduced_to_what_a_user_can_act_on():
    cpp = (
        "/onnxruntime_src/orttraining/orttraining/python/orttraining_pybind_state.cc:621 "
        "onnxruntime::python::addObjectMethodsForTraining(pybind11::module&)::<lambda(onnxruntime"
        "::python::PyGradientGraphBuilderContext*)> [ONNXRuntimeError] : 1 : FAIL : This is an "
        "invalid model. Error: Duplicate definition of name (m.embeddings.LayerNorm.weight_grad)."
    )
    assert engine.first_line(cpp) == (
        "the training graph is invalid: Duplicate definition of name "
        "(m.embeddings.LayerNorm.weight_grad)."
    )
    assert (
        engine.first_line("The gradient builder has not been registered: LRN for node x")
        == "op LRN has no gradient in onnxruntime-training"
    )
