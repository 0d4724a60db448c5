"""Reliability: every bad input refused in one line with exit 2, nothing written, nothing changed.

Each case of the list runs through every command that writes a model (quantize, prune, compress),
in-process through the CLI's ``main``: the exit code is 2, stderr is one ``onnxzip: error:`` line
naming the problem, no output (model or report) appears, no temporary file is left in the
output folder, and the input model's bytes are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ROOT, parse, run_cli, save

from onnxzip import io

WRITERS = ("quantize", "prune", "compress")


def _writer_args(command: str, model: Path, out: Path, data: Path | None) -> list:
    data_args = ["--data", data] if data is not None else []
    if command == "quantize":
        return ["quantize", model, "-o", out, *data_args]
    if command == "prune":
        return ["prune", model, "-o", out, "--ratio", "0.3", "--no-floors", *data_args]
    # --no-floors: without recovery no pruning amount keeps the task; these tests are about writes
    return [
        "compress",
        model,
        "-o",
        out,
        "--recover-steps",
        "0",
        "--quantize",
        "none",
        "--no-floors",
        *data_args,
    ]


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _assert_refused(code, err, needle, out_dir: Path, before: set[str]):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("onnxzip: error:") and "Traceback" not in err
    assert needle in lines[0], lines[0]
    assert {p.name for p in out_dir.iterdir()} == before, "a refused run left files behind"


# -- bad models ---------------------------------------------------------------------------------


def _model_case(kind: str, tmp: Path, good: Path) -> tuple[Path, str]:
    path = tmp / "in" / f"{kind}.onnx"
    path.parent.mkdir(exist_ok=True)
    if kind == "missing":
        return path, "no such file"
    if kind == "directory":
        path.mkdir()
        return path, "is a directory"
    if kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
        return path, "not a readable ONNX model"
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[:5000])
        return path, "not a readable ONNX model"
    if kind == "fails checker":
        model = parse(
            '<ir_version: 8, opset_import: ["" : 17]>\ng (float[N,4] x) => (float[N,4] y) { y = Relu (x) }'
        )
        model.graph.node[0].input.append("x")  # Relu takes one input
        onnx.save(model, path)
        return path, "onnx.checker"
    if kind == "op newer than the runtime":
        model = parse(
            '<ir_version: 10, opset_import: ["" : 23]>\n'
            "g (float[N,4] x, float[4] s) => (float[N,4] y) { y = RMSNormalization (x, s) }"
        )
        onnx.save(model, path)
        return path, "op RMSNormalization"
    if kind == "custom domain":
        model = parse(
            '<ir_version: 8, opset_import: ["" : 17, "acme.ops" : 1]>\n'
            "g (float[N,4] x) => (float[N,4] y) { t = acme.ops.Mystery (x)\n y = Relu (t) }"
        )
        onnx.save(model, path)
        return path, "custom domain 'acme.ops'"
    if kind == "missing external data":
        model = onnx.load(good)
        onnx.save(model, path, save_as_external_data=True, location="weights.bin", size_threshold=0)
        (path.parent / "weights.bin").unlink()
        return path, "weights.bin"
    if kind.startswith("external data "):  # offset/length entries a hostile file could carry
        field, text = {
            "external data offset negative": ("offset", "-8"),
            "external data offset not a number": ("offset", "abc"),
            "external data length negative": ("length", "-4"),
            "external data length short of the dims": ("length", "16"),
        }[kind]
        model = onnx.load(good)
        onnx.save(model, path, save_as_external_data=True, location="weights.bin", size_threshold=0)
        model = onnx.load(path, load_external_data=False)
        tensor = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
        entries = {e.key: e for e in tensor.external_data}
        if field not in entries:
            entries[field] = tensor.external_data.add(key=field)
        entries[field].value = text
        onnx.save(model, path)
        return path, f"external data {field} of tensor '{tensor.name}'"
    if kind == "raw data longer than its dims":
        model = onnx.load(good)
        tensor = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
        tensor.raw_data = tensor.raw_data + bytes(64)
        onnx.save(model, path)
        return path, f"tensor '{tensor.name}' holds"
    raise AssertionError(kind)


BAD_MODELS = [
    "missing",
    "directory",
    "random bytes",
    "truncated",
    "fails checker",
    "op newer than the runtime",
    "custom domain",
    "missing external data",
    "external data offset negative",
    "external data offset not a number",
    "external data length negative",
    "external data length short of the dims",
    "raw data longer than its dims",
]


@pytest.mark.parametrize("command", WRITERS)
@pytest.mark.parametrize("kind", BAD_MODELS)
def test_bad_model_is_refused_in_one_line(
    kind, command, tmp_path, resnet_path, calib_npz, capsys, monkeypatch
):
    if kind == "op newer than the runtime":  # as onnxruntime 1.20 (opset <= 21) would see it
        monkeypatch.setitem(io._LIMITS, "opset", 21)
    model, needle = _model_case(kind, tmp_path, resnet_path)
    _assert_writer_refuses(command, model, calib_npz, needle, tmp_path, capsys)


def _assert_writer_refuses(command, model: Path, data: Path, needle: str, tmp: Path, capsys):
    """The command refuses in one line and writes neither model nor report; the input stays."""
    out_dir = tmp / "out"
    out_dir.mkdir()
    digest = _digest(model)
    args = [*_writer_args(command, model, out_dir / "m.onnx", data), "--json", out_dir / "r.json"]
    code, _, err = run_cli(args, capsys)
    _assert_refused(code, err, needle, out_dir, set())
    assert _digest(model) == digest


# -- bad data -----------------------------------------------------------------------------------


def _data_case(kind: str, tmp: Path, calib: Path) -> tuple[Path, str]:
    path = tmp / f"{kind.replace(' ', '_')}.npz"
    with np.load(calib) as archive:
        x, labels = archive["input"], archive["labels"]
    if kind == "wrong input name":
        np.savez(path, image=x)
        return path, "'image' is not a model input"
    if kind == "wrong dtype":
        np.savez(path, input=x.astype(np.float64))
        return path, "dtype float64"
    if kind == "wrong rank":
        np.savez(path, input=x.reshape(len(x), -1))
        return path, "rank 2"
    if kind == "wrong shape":
        np.savez(path, input=x[:, :, :6, :6])
        return path, "axis 2 must be 8"
    if kind == "NaN":
        x = x.copy()
        x[3, 0, 2, 2] = np.nan
        np.savez(path, input=x)
        return path, "NaN or Inf"
    if kind == "Inf":
        x = x.copy()
        x[0, 0, 0, 0] = np.inf
        np.savez(path, input=x)
        return path, "NaN or Inf"
    if kind == "empty":
        np.savez(path, input=x[:0])
        return path, "empty"
    if kind == "labels of another length":
        np.savez(path, input=x, labels=labels[:-3])
        return path, "labels for"
    if kind == "labels not integers":
        np.savez(path, input=x, labels=labels.astype(np.float32))
        return path, "'labels' must be a 1-D integer array"
    if kind == "not an npz":
        path.write_bytes(b"plain text, not a zip archive")
        return path, str(path)
    raise AssertionError(kind)


BAD_DATA = [
    "wrong input name",
    "wrong dtype",
    "wrong rank",
    "wrong shape",
    "NaN",
    "Inf",
    "empty",
    "labels of another length",
    "labels not integers",
    "not an npz",
]


@pytest.mark.parametrize("command", WRITERS)
@pytest.mark.parametrize("kind", BAD_DATA)
def test_bad_data_is_refused_in_one_line(kind, command, tmp_path, resnet_path, calib_npz, capsys):
    data, needle = _data_case(kind, tmp_path, calib_npz)
    model = Path(shutil.copy(resnet_path, tmp_path / "model.onnx"))
    _assert_writer_refuses(command, model, data, needle, tmp_path, capsys)


# -- bad options and targets ----------------------------------------------------------------------


@pytest.mark.parametrize("command", WRITERS)
def test_output_equal_to_input_is_refused_unless_overwrite(
    command, tmp_path, resnet_path, calib_npz, capsys
):
    model = Path(shutil.copy(resnet_path, tmp_path / "model.onnx"))
    digest = _digest(model)
    code, _, err = run_cli(_writer_args(command, model, model, calib_npz), capsys)
    _assert_refused(code, err, "--overwrite", tmp_path, {"model.onnx"})
    assert _digest(model) == digest
    args = _writer_args(command, model, model, calib_npz)
    if command == "compress":
        args += ["--prune", "0.3"]
    code, _, err = run_cli([*args, "--overwrite", "--quiet"], capsys)
    assert code in (0, 1), err
    assert _digest(model) != digest
    onnx.checker.check_model(onnx.load(model), full_check=True)


@pytest.mark.parametrize("command", WRITERS)
def test_unwritable_output_folder_is_refused(command, tmp_path, resnet_path, calib_npz, capsys):
    # /proc refuses new files even to root, so this holds whoever runs the tests.
    target = Path("/proc/onnxzip-out.onnx")
    code, _, err = run_cli(_writer_args(command, resnet_path, target, calib_npz), capsys)
    _assert_refused(code, err, "cannot write", tmp_path, set())
    assert not target.exists()


def test_output_in_missing_folder_is_refused(tmp_path, resnet_path, calib_npz, capsys):
    code, _, err = run_cli(
        _writer_args("quantize", resnet_path, tmp_path / "no" / "m.onnx", calib_npz), capsys
    )
    _assert_refused(code, err, "no", tmp_path, set())


@pytest.mark.parametrize(
    "args,needle",
    [
        (["prune", "--ratio", "1.0"], "ratio"),
        (["prune", "--ratio", "-0.1"], "ratio"),
        (["prune", "--ratio", "nan"], "ratio"),
        (["prune", "--target-macs", "0"], "target"),
        (["prune", "--target-macs", "1.5"], "target"),
        (["compress", "--prune", "1.2"], "ratio"),
        (["compress", "--target-macs", "-1"], "target"),
        (["quantize", "--holdout", "1"], "holdout"),
        (["quantize", "--percentile", "101", "--calibration", "percentile"], "percentile"),
    ],
)
def test_ratios_outside_their_range_are_refused(
    args, needle, tmp_path, resnet_path, calib_npz, capsys
):
    command, *options = args
    out = tmp_path / "m.onnx"
    code, _, err = run_cli([command, resnet_path, "-o", out, "--data", calib_npz, *options], capsys)
    _assert_refused(code, err, needle, tmp_path, set())


# -- models with nothing to do, and control flow --------------------------------------------------


def test_model_without_prunable_group_exits_0_unchanged_and_says_why(tmp_path, capsys):
    model = save(
        parse(
            '<ir_version: 8, opset_import: ["" : 17]>\ng (float[N,4] x) => (float[N,4] y) { t = Relu (x)\n y = Sigmoid (t) }'
        ),
        tmp_path / "plain.onnx",
    )
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code, stdout, _ = run_cli(
        ["prune", model, "-o", out, "--ratio", "0.3", "--json", report], capsys
    )
    assert code == 0
    assert "no prunable channel group" in stdout
    assert "no prunable channel group" in json.loads(report.read_text())["unchanged_because"]
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)

    def run(path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x})[0]

    np.testing.assert_array_equal(run(model), run(out))


CONTROL_FLOW = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x, bool c) => (float[N,8,8,8] y) {
  a = Conv <pads=[1,1,1,1]> (x, w1)
  r = Relu (a)
  b = Conv <pads=[1,1,1,1]> (r, w2)
  y = If (c) <
    then_branch = t () => (float[N,8,8,8] yt) { u = Conv <pads=[1,1,1,1]> (b, w3)\n yt = Relu (u) },
    else_branch = e () => (float[N,8,8,8] ye) { ye = Relu (b) }
  >
}"""


def _control_flow_model(tmp: Path) -> Path:
    model = onnx.parser.parse_model(CONTROL_FLOW)
    rng = np.random.default_rng(1)
    for name, shape in {"w1": (8, 3, 3, 3), "w2": (8, 8, 3, 3), "w3": (8, 8, 3, 3)}.items():
        model.graph.initializer.append(
            onnx.numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)
        )
    onnx.checker.check_model(model, full_check=True)
    return save(model, tmp / "if.onnx")


def _branches(path: Path) -> list[bytes]:
    model = onnx.load(path)
    node = next(n for n in model.graph.node if n.op_type == "If")
    return [onnx.printer.to_text(a.g) for a in node.attribute]


def _run(path: Path, x: np.ndarray, c: bool) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x, "c": np.array(c)})[0]


def test_control_flow_quantize_main_graph_and_leave_subgraphs_alone(tmp_path, capsys):
    model = _control_flow_model(tmp_path)
    rng = np.random.default_rng(2)
    data = tmp_path / "d.npz"
    np.savez(
        data,
        x=rng.normal(size=(4, 1, 3, 8, 8)).astype(np.float32),
        c=np.array([True, False, True, False]),
    )
    # The scalar bool input means one sample is one whole feed: the file adds a sample axis.
    out = tmp_path / "q.onnx"
    code, _, err = run_cli(
        ["quantize", model, "-o", out, "--data", data, "--holdout", "0", "--quiet"], capsys
    )
    assert code == 0, err
    quantized = onnx.load(out)
    onnx.checker.check_model(quantized, full_check=True)
    main_ops = [n.op_type for n in quantized.graph.node]
    assert main_ops.count("QuantizeLinear") >= 2 and main_ops.count("Conv") == 2
    assert _branches(out) == _branches(model)  # subgraphs exactly as they were
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    for c in (True, False):
        want, got = _run(model, x, c), _run(out, x, c)
        cos = float((want * got).sum() / (np.linalg.norm(want) * np.linalg.norm(got)))
        assert cos > 0.99, (c, cos)


def test_control_flow_prune_blocks_groups_reaching_a_subgraph(tmp_path, capsys):
    model = _control_flow_model(tmp_path)
    out, report = tmp_path / "p.onnx", tmp_path / "r.json"
    code, _, err = run_cli(
        ["prune", model, "-o", out, "--ratio", "0.5", "--json", report, "--quiet"], capsys
    )
    assert code == 0, err
    groups = json.loads(report.read_text())["groups"]
    blocked = [g for g in groups if g["reason"]]
    assert any("subgraph" in g["reason"] for g in blocked)
    pruned = [g for g in groups if g["kept"] < g["channels"]]
    assert pruned, "the group between the two main-graph Convs is free to prune"
    assert _branches(out) == _branches(model)
    x = np.random.default_rng(3).normal(size=(2, 3, 8, 8)).astype(np.float32)
    for c in (True, False):
        assert _run(out, x, c).shape == _run(model, x, c).shape


# -- nothing lost: killed mid-write, disk full ----------------------------------------------------


def _big_model(tmp: Path) -> Path:
    """Two Gemms with 8 M weights (32 MB): writing the pruned model takes a while."""
    model = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        "g (float[N,1024] x) => (float[N,1024] y) "
        "{ h = Gemm <transB=1> (x, w1, b1)\n r = Relu (h)\n y = Gemm <transB=1> (r, w2, b2) }"
    )
    rng = np.random.default_rng(0)
    for name, shape in {
        "w1": (4096, 1024),
        "b1": (4096,),
        "w2": (1024, 4096),
        "b2": (1024,),
    }.items():
        model.graph.initializer.append(
            onnx.numpy_helper.from_array(rng.normal(0, 0.02, shape).astype(np.float32), name)
        )
    return save(model, tmp / "big.onnx")


def _cli_process(args: list, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "onnxzip", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        **kwargs,
    )


def test_sigkill_during_write_leaves_nothing_or_a_valid_model(tmp_path):
    model = _big_model(tmp_path)
    digest = _digest(model)
    out = tmp_path / "out" / "pruned.onnx"
    out.parent.mkdir()
    args = ["prune", model, "-o", out, "--ratio", "0.3", "--quiet"]
    start = time.perf_counter()
    proc = _cli_process(args)
    assert proc.wait() == 0, proc.stderr.read()
    full = time.perf_counter() - start
    out.unlink()
    rng = np.random.default_rng(7)
    outcomes = []
    for delay in rng.uniform(0.3 * full, 1.05 * full, size=8):
        out.unlink(missing_ok=True)
        proc = _cli_process(args)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():  # the rename happened: the file must be whole and valid
            onnx.checker.check_model(onnx.load(out), full_check=True)
            outcomes.append("complete")
        else:
            outcomes.append("nothing")
        # Only hidden temporary folders may remain beside the target, never a partial target.
        assert {p.name for p in out.parent.iterdir() if not p.name.startswith(".onnxzip-")} <= {
            out.name
        }
        assert _digest(model) == digest
    assert "nothing" in outcomes  # some kills landed before the rename


def test_disk_full_is_a_clear_error_with_no_partial_file(tmp_path):
    model = _big_model(tmp_path)
    digest = _digest(model)
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def limit():  # files this process writes may not grow past 4 MB
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))

    proc = _cli_process(
        ["prune", model, "-o", out_dir / "p.onnx", "--ratio", "0.3"], preexec_fn=limit
    )
    err = proc.communicate()[1].decode()
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxzip: error:"), err
    assert "disk full" in lines[0] or "too large" in lines[0], lines[0]
    assert list(out_dir.iterdir()) == []
    assert _digest(model) == digest


# -- what a run writes (outputs never land on inputs, never replace links or devices) -----------


def _refused_one_line(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines


@pytest.mark.parametrize("target", ["input model", "data file", "output", "directory"])
def test_json_report_never_lands_on_an_input_or_the_output(
    target, tmp_path, resnet_path, calib_npz, capsys
):
    model = tmp_path / "m.onnx"
    shutil.copy(resnet_path, model)
    data = tmp_path / "d.npz"
    shutil.copy(calib_npz, data)
    out = tmp_path / "q.onnx"
    json_path = {"input model": model, "data file": data, "output": out, "directory": tmp_path}[
        target
    ]
    before = {p.name: _digest(p) for p in (model, data)}
    code, _, err = run_cli(
        ["quantize", model, "-o", out, "--data", data, "--json", json_path], capsys
    )
    needle = {
        "input model": "--json would overwrite the input model",
        "data file": "--json would overwrite the data file",
        "output": "--json and -o name the same file",
        "directory": "is a directory; --json takes a file path",
    }[target]
    _refused_one_line(code, err, needle)
    assert not out.exists()  # refused before any work: no model written either
    assert {p.name: _digest(p) for p in (model, data)} == before


def test_verify_json_never_overwrites_either_model(tmp_path, resnet_path, test_npz, capsys):
    candidate = tmp_path / "c.onnx"
    shutil.copy(resnet_path, candidate)
    digest = _digest(candidate)
    code, _, err = run_cli(
        ["verify", resnet_path, candidate, "--data", test_npz, "--json", candidate], capsys
    )
    _refused_one_line(code, err, "--json would overwrite the candidate model")
    assert _digest(candidate) == digest


def test_output_on_external_data_of_the_input_is_refused(tmp_path, resnet_path, calib_npz, capsys):
    model = tmp_path / "ext.onnx"
    proto = onnx.load(str(resnet_path))
    onnx.save(
        proto, str(model), save_as_external_data=True, location="ext.onnx.data", size_threshold=0
    )
    data_file = tmp_path / "ext.onnx.data"
    digest = _digest(data_file)
    code, _, err = run_cli(["quantize", model, "-o", data_file, "--data", calib_npz], capsys)
    _refused_one_line(code, err, "-o would overwrite the external data of")
    assert _digest(data_file) == digest


def test_output_that_is_a_fifo_or_dangling_link_is_refused(
    tmp_path, resnet_path, calib_npz, capsys
):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code, _, err = run_cli(["quantize", resnet_path, "-o", fifo, "--data", calib_npz], capsys)
    _refused_one_line(code, err, "-o is not a regular file")
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    dangling = tmp_path / "dangling.onnx"
    dangling.symlink_to(tmp_path / "nowhere.onnx")
    code, _, err = run_cli(["quantize", resnet_path, "-o", dangling, "--data", calib_npz], capsys)
    _refused_one_line(code, err, "-o is a symbolic link to nothing")
    assert dangling.is_symlink() and not (tmp_path / "nowhere.onnx").exists()


def test_output_through_a_symbolic_link_keeps_the_link(tmp_path, resnet_path, calib_npz, capsys):
    real = tmp_path / "real.onnx"
    real.write_bytes(b"old")
    link = tmp_path / "link.onnx"
    link.symlink_to(real)
    report = tmp_path / "report.json"
    report.write_text("{}")
    report_link = tmp_path / "report_link.json"
    report_link.symlink_to(report)
    code, _, err = run_cli(
        ["quantize", resnet_path, "-o", link, "--data", calib_npz, "--json", report_link], capsys
    )
    assert code == 0, err
    assert link.is_symlink() and report_link.is_symlink()
    onnx.checker.check_model(str(real), full_check=True)
    assert json.loads(report.read_text())  # the report went to the link's target


def test_no_follow_refuses_an_output_that_is_a_symbolic_link(
    tmp_path, resnet_path, calib_npz, capsys
):
    real = tmp_path / "real.onnx"
    real.write_bytes(b"old")
    link = tmp_path / "link.onnx"
    link.symlink_to(real)
    code, _, err = run_cli(
        ["quantize", resnet_path, "-o", link, "--data", calib_npz, "--no-follow"], capsys
    )
    _refused_one_line(code, err, "-o is a symbolic link")
    assert "--no-follow" in err and real.read_bytes() == b"old" and link.is_symlink()
    report = tmp_path / "report.json"
    report.symlink_to(real)
    out = tmp_path / "out.onnx"
    code, _, err = run_cli(
        ["quantize", resnet_path, "-o", out, "--data", calib_npz, "--json", report, "--no-follow"],
        capsys,
    )
    _refused_one_line(code, err, "--json is a symbolic link")
    assert not out.exists() and real.read_bytes() == b"old"


# -- reading is bounded ---------------------------------------------------------------------------


def _forged_npz(path: Path, shape: tuple, payload: bytes = b"\0" * 64) -> Path:
    """An .npz whose header declares ``shape`` float32 but which holds only ``payload``."""
    import io as _io
    import zipfile

    member = _io.BytesIO()
    np.lib.format.write_array_header_1_0(
        member, {"descr": "<f4", "fortran_order": False, "shape": shape}
    )
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("input.npy", member.getvalue() + payload)
    return path


def test_npz_header_declaring_gigabytes_in_a_small_file_is_refused(tmp_path, resnet_path, capsys):
    data = _forged_npz(tmp_path / "bomb.npz", (2**28, 1, 8, 8))  # 64 GiB declared, 64 bytes held
    out = tmp_path / "q.onnx"
    code, _, err = run_cli(["quantize", resnet_path, "-o", out, "--data", data], capsys)
    assert code == 2, err
    assert (
        "declares" in err and "truncated or corrupt" in err and len(err.strip().splitlines()) == 1
    )
    assert not out.exists()


def test_npz_larger_than_the_memory_budget_is_refused(
    tmp_path, resnet_path, calib_npz, capsys, monkeypatch
):
    from onnxzip import data as data_module

    monkeypatch.setattr(data_module, "available_memory", lambda: 100_000)  # 100 kB "available"
    code, _, err = run_cli(
        ["quantize", resnet_path, "-o", tmp_path / "q.onnx", "--data", calib_npz], capsys
    )
    assert code == 2, err
    assert (
        "more than a quarter of the memory available" in err and len(err.strip().splitlines()) == 1
    )


def test_synthetic_samples_that_cannot_fit_are_refused(tmp_path, capsys):
    proto = parse(
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        "g (float[N, 2000000000] x) => (float[N, 2000000000] y) { y = Relu (x) }"
    )
    path = save(proto, tmp_path / "wide.onnx")
    code, _, err = run_cli(
        ["quantize", path, "-o", tmp_path / "q.onnx", "--synthetic", "8"], capsys
    )
    assert code == 2, err
    assert "one random sample would take" in err and len(err.strip().splitlines()) == 1


# -- signals --------------------------------------------------------------------------------------


def _start(args: list, tmp: Path, env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "onnxzip", *map(str, args)],
        cwd=tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigterm_mid_run_exits_in_one_line_and_leaves_nothing(tmp_path, resnet_path, calib_npz):
    """SIGTERM during recovery (the training worker running): one line, exit 143, no model, no
    temporary folder beside the target or in TMPDIR, the worker gone."""
    work, scratch = tmp_path / "work", tmp_path / "scratch"
    work.mkdir()
    scratch.mkdir()
    args = ["prune", resnet_path, "-o", work / "p.onnx", "--ratio", "0.3", "--data", calib_npz]
    proc = _start([*args, "--recover-steps", "200000"], work, {"TMPDIR": str(scratch)})
    time.sleep(6)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == ["onnxzip: terminated"], err
    assert list(work.iterdir()) == []
    assert [p.name for p in scratch.iterdir() if p.name.startswith("onnxzip")] == []


def test_ctrl_c_during_start_up_is_one_line(tmp_path, resnet_path, calib_npz):
    proc = _start(
        ["quantize", resnet_path, "-o", tmp_path / "q.onnx", "--data", calib_npz], tmp_path
    )
    # Interrupt once the start-up handlers are in place (numpy, imported after them, is being
    # mapped in) and onnx / onnxruntime are still importing; a fixed delay raced the interpreter's
    # own start-up on a loaded machine.
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if "_multiarray_umath" in maps.read_text():
                break
        except OSError:
            pass
        time.sleep(0.005)
    assert proc.poll() is None, "the command finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["onnxzip: interrupted"], err
    assert not (tmp_path / "q.onnx").exists()


def test_a_killed_runs_temporary_folder_is_removed_by_the_next_run(
    tmp_path, resnet_path, calib_npz, capsys
):
    dead = tmp_path / ".onnxzip-999999999-left"  # no such process
    dead.mkdir()
    (dead / "half.onnx").write_bytes(b"partial")
    alive = tmp_path / f".onnxzip-{os.getpid()}-busy"  # a running process's: kept
    alive.mkdir()
    code, _, err = run_cli(
        ["quantize", resnet_path, "-o", tmp_path / "q.onnx", "--data", calib_npz], capsys
    )
    assert code == 0, err
    assert not dead.exists() and alive.exists()


def test_unwritable_output_folder_is_refused_before_any_work(
    tmp_path, resnet_path, calib_npz, capsys, monkeypatch
):
    """The folder is probed before the work: the model is never loaded or quantized."""
    import onnxzip.quantize  # noqa: F401 - the module the command would run

    calls = []
    monkeypatch.setattr("onnxzip.io.load_model", lambda *a, **k: calls.append(a))
    code, _, err = run_cli(
        ["quantize", resnet_path, "-o", Path("/proc/onnxzip-out.onnx"), "--data", calib_npz], capsys
    )
    assert code == 2 and "cannot write in '/proc'" in err and calls == []


@pytest.mark.parametrize(
    "args",
    [
        ["quantize"],
        ["quantize", "--mode", "dynamic"],
        ["quantize", "--mode", "weight-only"],
        ["prune", "--ratio", "0.3"],
    ],
)
def test_string_initializers_pass_through_every_writer(args, tmp_path, capsys):
    """A model carrying a string constant (a label table, say) beside its weights: the strings
    are left as they are (not constant-folded into numeric tensors, which could not be written)
    and a string output is compared for equality (it exited 3 in both cases)."""
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.normal(0, 0.5, (8, 8)).astype(np.float32), "w")
    labels = onnx.helper.make_tensor("labels", onnx.TensorProto.STRING, [2], [b"cat", b"dog"])
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("MatMul", ["x", "w"], ["h"]),
            onnx.helper.make_node("Relu", ["h"], ["r"]),
            onnx.helper.make_node("MatMul", ["r", "w"], ["y"]),
            onnx.helper.make_node("Identity", ["labels"], ["names"]),
        ],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8])],
        [
            onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 8]),
            onnx.helper.make_tensor_value_info("names", onnx.TensorProto.STRING, [2]),
        ],
        [w, labels],
    )
    path = tmp_path / "labels.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)
    out = tmp_path / "out.onnx"
    code, _, err = run_cli(
        [*args, str(path), "--synthetic", "16", "--no-floors", "-o", str(out)], capsys
    )
    assert code == 0, err
    onnx.checker.check_model(str(out), full_check=True)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = rng.normal(size=(3, 8)).astype(np.float32)
    y, names = session.run(None, {"x": x})
    assert y.shape == (3, 8) and list(names) == ["cat", "dog"]


# -- inputs changed during a run ------------------------------------------------------------------


def _external_model(tmp: Path) -> tuple[Path, Path]:
    """The 32 MB two-Gemm model with its weights in ``big.onnx.data``."""
    path = _big_model(tmp)
    proto = onnx.load(path)
    onnx.save(proto, path, save_as_external_data=True, location="big.onnx.data", size_threshold=0)
    return path, tmp / "big.onnx.data"


def _leases_work_here(folder: Path) -> bool:
    """Whether this file system grants read leases (Linux; not NFS, for instance)."""
    import fcntl

    probe = folder / "lease-probe"
    probe.write_bytes(b"x")
    fd = os.open(probe, os.O_RDONLY)
    try:
        fcntl.fcntl(fd, 1024, fcntl.F_RDLCK)  # F_SETLEASE
        fcntl.fcntl(fd, 1024, fcntl.F_UNLCK)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


def _wait_for_lease(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(
            "LEASE" in line and f" {proc.pid} " in line
            for line in Path("/proc/locks").read_text().splitlines()
        ):
            return
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    raise AssertionError("the run took no lease on its external data")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="read leases are Linux's")
def test_external_data_opened_for_writing_mid_run_stops_in_one_line(tmp_path):
    """Truncating a memory-mapped data file would end the run with SIGBUS: the run holds a read
    lease, so the writer waits, the run stops with one line and exit 2, writes nothing, and the
    writer proceeds once it is gone."""
    if not _leases_work_here(tmp_path):
        pytest.skip("this file system grants no leases")
    model, data = _external_model(tmp_path)
    out = tmp_path / "out" / "p.onnx"
    out.parent.mkdir()
    args = ["prune", model, "-o", out, "--ratio", "0.3", "--synthetic", "64"]
    proc = _start([*args, "--recover-steps", "200000"], tmp_path)
    _wait_for_lease(proc)
    with open(data, "r+b") as handle:  # blocks until the run has let go of the file
        handle.truncate(16)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "big.onnx.data" in lines[0], err
    assert "opened for writing by another process" in lines[0]
    assert list(out.parent.iterdir()) == []
    assert data.stat().st_size == 16  # the writer went ahead afterwards


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="read leases are Linux's")
def test_external_data_deleted_mid_run_is_one_line_or_a_complete_run(tmp_path):
    model, data = _external_model(tmp_path)
    out = tmp_path / "out" / "p.onnx"
    out.parent.mkdir()
    proc = _start(["prune", model, "-o", out, "--ratio", "0.3", "--synthetic", "64"], tmp_path)
    if _leases_work_here(tmp_path):
        _wait_for_lease(proc)  # loaded
    else:
        time.sleep(2)
    data.unlink()
    _, err = proc.communicate(timeout=300)
    if proc.returncode == 0:
        onnx.checker.check_model(str(out), full_check=True)
    else:
        assert proc.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "big.onnx.data" in lines[0], err
        assert [p for p in out.parent.iterdir() if not p.name.startswith(".")] == []


def test_long_passes_are_logged_where_no_bar_can_be_seen(monkeypatch, caplog):
    """stderr is not a terminal under pytest: no bar is drawn, and a pass that runs past
    LOG_EVERY_S says how far it got at INFO, with the postfix a bar would show, and how long it
    took; --quiet (bars off) logs nothing."""
    import logging

    from onnxzip import progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="onnxzip.progress"):
        bar = progress.bar(None, total=3, desc="recover", unit="step")
        bar.update(2)
        bar.set_postfix(loss="0.1234", refresh=False)
        bar.update(1)
        bar.close()
        bar.close()  # once only
        assert list(progress.bar([1, 2], desc="calibrate")) == [1, 2]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("recover: 2/3 step(s) after")
    assert lines[1].startswith("recover: 3/3 step(s) after") and lines[1].endswith("loss 0.1234")
    assert lines[2].startswith("recover: 3 step(s) in") and lines[2].endswith("loss 0.1234")
    assert not lines[3].startswith("recover")
    assert sum(line.startswith("calibrate: 2 batch(s) in") for line in lines[3:]) == 1
    caplog.clear()
    progress.set_enabled(False)
    try:
        with caplog.at_level(logging.INFO, logger="onnxzip.progress"):
            assert list(progress.bar([1, 2], desc="calibrate")) == [1, 2]
    finally:
        progress.set_enabled(None)
    assert not caplog.records
