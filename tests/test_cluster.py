"""onnxzip.engine.cluster: the same bits with and without Ray, retries of killed workers, a
two-node cluster, and one-line refusals when Ray is missing or unreachable.

A private Ray instance with 2 CPUs serves the in-process tests; the two-node test starts
``ray start --head`` and a second ``ray start --address`` (each with its own ports and one CPU)
as processes of their own, with a token of its own for Ray's authentication, and stops both.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from onnxzip import PruneConfig, RecoverConfig, cli, io
from onnxzip.compress import CompressConfig, compress
from onnxzip.data import NpzSamples, SyntheticSamples, input_specs
from onnxzip.engine import cluster
from onnxzip.quantize import QuantizeConfig, quantize
from onnxzip.statistics import Collector
from onnxzip.verify import verify

ray = pytest.importorskip("ray")  # a dev dependency: CI installs it
statistics = importlib.import_module("onnxzip.statistics")
compress_module = importlib.import_module("onnxzip.compress")
gradients_module = importlib.import_module("onnxzip.gradients")

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "digits_resnet.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"
TEST = ROOT / "models" / "digits_test.npz"
RAY_BIN = Path(sys.executable).parent / "ray"

# Functions defined here travel to the workers by value (the workers cannot import tests/).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def ray_cluster():
    engine = cluster.RayCluster("local", num_cpus=2)
    try:
        yield engine
    finally:
        engine.close()


def _digits():
    model = io.load_model(MODEL)
    specs = input_specs(model)
    return model, NpzSamples(CALIB, specs), NpzSamples(TEST, specs)


def _sweep(model, samples, batch_size=16):
    """Ranges with histograms, ranges reduced in the graph and channel moments: every kind."""
    outputs = [v.name for n in model.graph for v in n.outputs if v.shape is not None]
    hist = Collector(model, bins=256, in_graph=False)
    plain = Collector(model)
    for name in outputs[::3]:
        hist.range(name, histogram=True)
        plain.range(name)
    convs = [n.outputs[0].name for n in model.graph if n.op_type == "Conv"]
    for name in convs:
        plain.channel_moments(name, 1)
    return hist.run(samples, batch_size), plain.run(samples, batch_size)


def _same(a, b) -> None:
    assert a.samples == b.samples
    assert a.ranges.keys() == b.ranges.keys() and a.channels.keys() == b.channels.keys()
    for name, s in a.ranges.items():
        t = b.ranges[name]
        assert (s.min, s.max, s.count, s.zeros, s.nonfinite, s.radius) == (
            t.min,
            t.max,
            t.count,
            t.zeros,
            t.nonfinite,
            t.radius,
        ), name
        assert (s.hist is None) == (t.hist is None)
        if s.hist is not None:
            assert np.array_equal(s.hist, t.hist), name
    for key, s in a.channels.items():
        t = b.channels[key]
        assert s.count == t.count
        # bitwise: the float64 sums were added in the same order
        assert np.asarray(s.sum).tobytes() == np.asarray(t.sum).tobytes(), key
        assert np.asarray(s.squares).tobytes() == np.asarray(t.squares).tobytes(), key


def test_statistics_on_ray_are_the_same_bits_as_in_one_process(ray_cluster):
    model, calib, _ = _digits()
    local = _sweep(model, calib)
    with cluster.using(ray_cluster):
        remote = _sweep(model, calib)
    assert calib.count // cluster.SHARD_SAMPLES >= 4  # several shards per worker
    for a, b in zip(local, remote, strict=True):
        _same(a, b)
    # the shards were statistics of their own, merged: the histograms are not empty
    assert any(s.hist is not None and s.hist.sum() > 0 for s in local[0].ranges.values())


def test_gradient_statistics_on_ray_are_the_same_bits_as_in_one_process(ray_cluster, monkeypatch):
    """One training-engine job per shard on the workers (each with one onnxruntime thread)
    against one job of two threads here: every group's sums are the same bits."""
    from onnxzip.gradients import gradient_statistics
    from onnxzip.pruning import prepared_groups

    model, calib, _ = _digits()
    work, groups = prepared_groups(model)
    local, local_report = gradient_statistics(work, groups, calib, batch_size=32)
    monkeypatch.setattr(gradients_module, "SHARD_SAMPLES", 96)  # three batches per job
    shards = []
    real = cluster.shards

    def recorded(batches, per_shard):
        for shard in real(batches, per_shard):
            shards.append(len(shard))
            yield shard

    monkeypatch.setattr(cluster, "shards", recorded)
    with cluster.using(ray_cluster):
        remote, remote_report = gradient_statistics(work, groups, calib, batch_size=32)
    assert len(shards) >= 4 and set(shards[:-1]) == {3}  # jobs of three batches
    assert local_report.batches == remote_report.batches == calib.count // 32
    assert local.keys() == remote.keys() and len(local) >= 4
    for gid, a in local.items():
        b = remote[gid]
        assert a.batches == b.batches
        assert a.total.tobytes() == b.total.tobytes(), gid
        assert a.squares.tobytes() == b.squares.tobytes(), gid
    assert float(np.abs(next(iter(local.values())).total).max()) > 0


def _slow_first(_context, item):
    time.sleep(0.4 if item == 0 else 0.0)  # the first item finishes last
    return item * item


def test_results_come_back_in_item_order_whatever_finishes_first(ray_cluster):
    assert list(ray_cluster.map(_slow_first, range(6))) == [i * i for i in range(6)]


def test_quantize_with_the_guard_writes_the_same_model_with_ray(ray_cluster):
    model, calib, test = _digits()
    config = QuantizeConfig(min_cosine=0.9999, calibration="percentile")
    local, local_report = quantize(model, calib, config, verify_samples=test)
    with cluster.using(ray_cluster):
        remote, remote_report = quantize(model, calib, config, verify_samples=test)
    assert local_report.guard is not None and local_report.guard.candidates > 2
    assert io.model_bytes(local) == io.model_bytes(remote)
    assert [s.node for s in local_report.guard.kept_float] == [
        s.node for s in remote_report.guard.kept_float
    ]
    assert [(s.snr_gain_db, s.metric_after) for s in local_report.guard.kept_float] == [
        (s.snr_gain_db, s.metric_after) for s in remote_report.guard.kept_float
    ]


def test_verify_on_ray_reports_the_same_numbers_and_floors(ray_cluster):
    model, calib, test = _digits()
    quantized, _ = quantize(model, calib, QuantizeConfig(calibration="percentile"))
    local = verify(model, quantized, test, batch_size=8)
    remote = verify(model, quantized, test, batch_size=8, engine=ray_cluster)
    assert test.count / 8 / (cluster.SHARD_SAMPLES / 8) > 4  # several shards
    assert local.samples == remote.samples == test.count
    assert local.outputs == remote.outputs  # every field, bit for bit
    assert [(c.part, c.kind, c.value, c.passed) for c in local.floors] == [
        (c.part, c.kind, c.value, c.passed) for c in remote.floors
    ]
    assert local.passed == remote.passed


def test_engine_keyword_of_the_api_gives_the_same_model(ray_cluster):
    model, calib, test = _digits()
    config = QuantizeConfig(min_cosine=0.9999, calibration="percentile")
    local, _ = quantize(model, calib, config, verify_samples=test)
    remote, _ = quantize(model, calib, config, verify_samples=test, engine=ray_cluster)
    assert io.model_bytes(local) == io.model_bytes(remote)
    assert cluster.active() is not ray_cluster  # the keyword's engine is not left active


def test_compress_budget_search_runs_attempts_side_by_side_with_the_same_outcome(ray_cluster):
    """The requested amount misses the budget and milder ones are tried (each pruned, distilled
    through the training engine, verified); on Ray two attempts run at once."""
    model, calib, test = _digits()
    config = CompressConfig(
        prune=PruneConfig(target_macs=0.3),
        recover=RecoverConfig(steps=150),
        max_drop=0.3,
        latency=False,
    )
    local, local_report = compress(model, calib, config, verify_samples=test)
    remote, remote_report = compress(model, calib, config, verify_samples=test, engine=ray_cluster)
    assert len(local_report.attempts) >= 2  # a search happened
    # the first attempt's distillation loses to reconstruction: the recovery mode changes and
    # the attempt run beside it on Ray is taken as reconstructed (what it also computed)
    assert local_report.recovery_not_kept is not None
    assert local_report.attempts == remote_report.attempts
    assert io.model_bytes(local) == io.model_bytes(remote)
    assert local_report.recovery_not_kept == remote_report.recovery_not_kept
    assert local_report.recovery_skipped == remote_report.recovery_skipped


class _Wide(cluster.Local):
    """Runs pieces in this process, but claims three workers, so that the budget search hands
    out its attempts three at a time; records what it ran."""

    workers = 3

    def __init__(self):
        self.ran = []

    def map(self, fn, items, context=None, **kwargs):
        for item in items:
            if fn is compress_module._attempt:
                self.ran.append(item)
            yield fn(context, item)


def test_a_mode_change_in_a_round_of_attempts_reruns_nothing():
    """The attempts run beside the one whose distillation lost are taken as reconstructed,
    not run again; and the outcome is the one-at-a-time search's."""
    model, calib, test = _digits()
    config = CompressConfig(
        prune=PruneConfig(target_macs=0.3),
        recover=RecoverConfig(steps=150),
        max_drop=0.3,
        latency=False,
    )
    local, local_report = compress(model, calib, config, verify_samples=test)
    wide = _Wide()
    remote, remote_report = compress(model, calib, config, verify_samples=test, engine=wide)
    assert local_report.recovery_not_kept is not None  # the mode changed at the first attempt
    assert [mode for _target, mode in wide.ran[:3]] == ["distill"] * 3
    assert len(wide.ran) == len(remote_report.attempts)  # none of them ran twice
    assert local_report.attempts == remote_report.attempts
    assert io.model_bytes(local) == io.model_bytes(remote)
    assert local_report.recovery_not_kept == remote_report.recovery_not_kept


def _killing_once(marker: str, real):
    """``real`` as a piece, except that the first attempt to run anywhere kills its worker."""

    def piece(context, item):
        if cluster._IN_WORKER and not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return real(context, item)

    return piece


def test_a_worker_killed_mid_shard_is_retried_and_the_statistics_do_not_change(
    ray_cluster, tmp_path, monkeypatch
):
    model, calib, _ = _digits()
    local = _sweep(model, calib)
    marker = tmp_path / "killed"
    monkeypatch.setattr(
        statistics, "_sweep_shard", _killing_once(str(marker), statistics._sweep_shard)
    )
    with cluster.using(ray_cluster):
        remote = _sweep(model, calib)
    assert marker.exists()  # a worker really died mid-task
    for a, b in zip(local, remote, strict=True):
        _same(a, b)


def test_a_piece_that_fails_raises_its_own_error_on_the_driver(ray_cluster):
    model, _, _ = _digits()
    bad = SyntheticSamples(input_specs(model), 8)
    bad.specs = [type(s)(s.name, np.dtype(np.float64), s.shape) for s in bad.specs]
    collector = Collector(model)
    collector.range(model.graph.outputs[0].name)
    with cluster.using(ray_cluster), pytest.raises(Exception) as info:
        collector.run(bad, 4)
    # onnxruntime's refusal of float64 feeds, as onnxzip's one-line ModelError, not a Ray wrapper
    assert type(info.value).__name__ == "ModelError"
    assert "onnxruntime failed to run" in str(info.value)


def test_ray_missing_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    out = tmp_path / "q.onnx"
    code = cli.main(
        ["quantize", str(MODEL), "-o", str(out), "--data", str(CALIB), "--ray", "local"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert err.count("\n") == 0 and "pip install 'onnxzip[ray]'" in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_cluster_is_one_line_and_exit_2_within_seconds(capsys, tmp_path):
    out = tmp_path / "q.onnx"
    port = _free_port()
    t0 = time.perf_counter()
    code = cli.main(
        ["quantize", str(MODEL), "-o", str(out), "--data", str(CALIB), "--ray", f"127.0.0.1:{port}"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert time.perf_counter() - t0 < 15
    assert err.count("\n") == 0 and f"127.0.0.1:{port}" in err and "cannot connect" in err
    code = cli.main(["quantize", str(MODEL), "-o", str(out), "--data", str(CALIB), "--ray", "x"])
    assert code == 2 and "expected auto, local or HOST:PORT" in capsys.readouterr().err


def test_the_core_never_imports_ray():
    script = (
        "import sys, tempfile, os\n"
        "from onnxzip import cli\n"
        "d = tempfile.mkdtemp()\n"
        f"rc = cli.main(['quantize', {str(MODEL)!r}, '-o', os.path.join(d, 'q.onnx'), "
        f"'--data', {str(CALIB)!r}, '-q'])\n"
        "assert rc == 0, rc\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _ray_env(tmp_path: Path) -> dict:
    """Ray's token authentication with a token of this test's own (not ~/.ray's)."""
    token = tmp_path / "ray_token"
    token.write_text(os.urandom(32).hex())
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    env.pop("RAY_ADDRESS", None)
    return env


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    handle = open(log, "w")  # noqa: SIM115  (closed with the process)
    return subprocess.Popen(
        [str(RAY_BIN), "start", "--block", "--disable-usage-stats", *args],
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def _wait_for(log: Path, pattern: str, process: subprocess.Popen, seconds: float = 90) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(errors="replace"))
        if found:
            return found.group(1) if found.groups() else found.group(0)
        assert process.poll() is None, log.read_text()[-2000:]
        time.sleep(0.2)
    raise AssertionError(f"ray start: no '{pattern}' in {seconds} s:\n{log.read_text()[-2000:]}")


DRIVER = """
import sys, time, ray
from onnxzip import io
from onnxzip import PruneConfig, QuantizeConfig, RecoverConfig
from onnxzip.compress import CompressConfig, compress
from onnxzip.data import NpzSamples, input_specs
from onnxzip.engine import cluster
from onnxzip.quantize import QuantizeConfig, quantize

address, out = sys.argv[1], sys.argv[2]
engine = cluster.RayCluster(address)
deadline = time.monotonic() + 60
while len([n for n in ray.nodes() if n["Alive"]]) < 2:
    assert time.monotonic() < deadline, "the second node never joined"
    time.sleep(0.5)

def where(_context, _item):
    time.sleep(0.3)
    return ray.get_runtime_context().get_node_id()

nodes = set(engine.map(where, range(8)))
model = io.load_model({model!r})
specs = input_specs(model)
config = QuantizeConfig(min_cosine=0.9999, calibration="percentile")
with cluster.using(engine):
    quantized, report = quantize(model, NpzSamples({calib!r}, specs), config,
                                 verify_samples=NpzSamples({test!r}, specs))
io.save_model(quantized, out)
print("NODES", len(nodes), "WORKERS", engine.workers)
engine.close()
"""


def test_two_node_cluster_gives_the_same_model_as_one_process(tmp_path):
    env = _ray_env(tmp_path)
    port = _free_port()
    head_log, node_log = tmp_path / "head.log", tmp_path / "node.log"
    # Ray's sockets live under its temp folder: a short path (AF_UNIX allows 107 bytes)
    temp = tempfile.mkdtemp(prefix="oz-ray-")
    head = _start(
        [
            "--head",
            f"--port={port}",
            "--num-cpus=1",
            "--include-dashboard=false",
            f"--temp-dir={temp}",
        ],
        env,
        head_log,
    )
    node = None
    try:
        address = _wait_for(head_log, r"ray start --address='([^']+)'", head)
        node = _start(["--address", address, "--num-cpus=1", f"--temp-dir={temp}"], env, node_log)
        _wait_for(node_log, r"Ray runtime started", node)

        model, calib, test = _digits()
        config = QuantizeConfig(min_cosine=0.9999, calibration="percentile")
        local, _ = quantize(model, calib, config, verify_samples=test)

        out = tmp_path / "remote.onnx"
        script = DRIVER.format(model=str(MODEL), calib=str(CALIB), test=str(TEST))
        done = subprocess.run(
            [sys.executable, "-c", script, address, str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert "NODES 2 WORKERS 2" in done.stdout  # pieces ran on both nodes
        assert io.model_bytes(io.load_model(out)) == io.model_bytes(local)

        # the command line on the same cluster
        cli_out = tmp_path / "cli.onnx"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "onnxzip",
                "quantize",
                str(MODEL),
                "-o",
                str(cli_out),
                "--data",
                str(CALIB),
                "--verify-data",
                str(TEST),
                "--min-cosine",
                "0.9999",
                "--calibration",
                "percentile",
                "--ray",
                address,
                "-q",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode in (0, 1), done.stderr[-3000:]
        assert io.model_bytes(io.load_model(cli_out)) == io.model_bytes(local)

        # gradient statistics: the training engine's job runs on a worker
        written = {}
        for where, extra in (("here", []), ("ray", ["--ray", address])):
            written[where] = tmp_path / f"stats_{where}.npz"
            done = subprocess.run(
                [sys.executable, "-m", "onnxzip", "stats", str(MODEL), "-o", str(written[where])]
                + ["--data", str(CALIB), "-q", *extra],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, done.stderr[-3000:]
        with np.load(written["here"]) as a, np.load(written["ray"]) as b:
            assert a.files == b.files and len(a.files) >= 10
            assert all(a[k].tobytes() == b[k].tobytes() for k in a.files)
    finally:
        if node is not None:
            _stop(node)
        _stop(head)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_killed_driver_leaves_no_output(tmp_path):
    from testmodels import zoo

    model_path = tmp_path / "resnet50.onnx"
    io.save_model(zoo.from_light("resnet50"), model_path)
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "onnxzip",
            "quantize",
            str(model_path),
            "-o",
            str(out),
            "--synthetic",
            "256",
            "--batch-size",
            "8",
            "--holdout",
            "0",
            "--ray",
            "local",
            "-q",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        running = False
        while time.monotonic() < deadline and driver.poll() is None:
            titles = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
            if any(line.startswith("ray::_run_piece") for line in titles.splitlines()):
                running = True
                break
            time.sleep(0.2)
        assert running, "no Ray task started"
        driver.kill()
        driver.wait(30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    time.sleep(2)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # nothing half-written beside it either
