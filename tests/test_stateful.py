"""Streaming models (onnxzip.stateful): --state IN=OUT carries each step's state output into
the next step's state input; verification runs each model on its own state."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from conftest import run_cli

from onnxzip import io
from onnxzip.data import NpzSamples, input_specs
from onnxzip.errors import InputError
from onnxzip.stateful import StatefulSamples, parse_pairs
from onnxzip.verify import verify

# state [2, batch, 4] (the batch on axis 1, as a streaming voice detector keeps it)
STREAM = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x, float[2, N, 4] state) => (float[N, 4] y, float[2, N, 4] stateN) {
    decayed = Mul (state, decay)
    kept = Add (decayed, offset)
    stateN = Add (kept, x)
    first = Gather <axis = 0> (stateN, zero)
    y = Tanh (first)
}
"""


def _stream(decay: float, offset: float = 0.0) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(STREAM)
    proto.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(np.float32(decay), "decay"),
            onnx.numpy_helper.from_array(np.float32(offset), "offset"),
            onnx.numpy_helper.from_array(np.int64(0), "zero"),
        ]
    )
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _data(tmp_path, steps=40):
    x = np.random.default_rng(0).normal(0, 0.3, (steps, 4)).astype(np.float32)
    path = tmp_path / "stream.npz"
    np.savez(path, x=x, state=np.zeros((2, steps, 4), np.float32))
    return path


def test_each_step_reads_the_state_the_step_before_wrote(tmp_path):
    proto = _stream(0.9)
    model = io.load_model(proto)
    base = NpzSamples(_data(tmp_path), input_specs(model))
    stream = StatefulSamples(base, model, parse_pairs(["state=stateN"], model, "m"), "m")
    batches = list(stream.batches(8))
    assert sum(len(b) for b in batches) == 40 and batches[0].inputs["state"].shape == (2, 8, 4)
    state = np.concatenate([b.inputs["state"] for b in batches], axis=1)
    x = np.concatenate([b.inputs["x"] for b in batches])
    carried = np.zeros((2, 1, 4), np.float32)
    for k in range(40):  # the recurrence by hand: state_k = 0.9 state_{k-1} + x_{k-1}
        np.testing.assert_allclose(state[:, k : k + 1], carried, rtol=1e-5, atol=1e-6)
        carried = 0.9 * carried + x[k][None, None]
    # the held-out steps still read the states of the steps before them
    held = np.concatenate([b.inputs["state"] for b in stream.batches(8, "holdout", 0.25)], axis=1)
    assert held.shape[1] == 10 and np.abs(held).max() > 0.1


def test_verify_runs_each_model_on_its_own_state(tmp_path, capsys):
    """A candidate whose state decays a little faster: fed the data's zero states at every
    step it computes exactly what the reference does (PASS); each on its own state, its
    state drifts away step after step (FAIL)."""
    ref, cand = tmp_path / "ref.onnx", tmp_path / "cand.onnx"
    onnx.save(_stream(0.95), ref)
    onnx.save(_stream(0.6), cand)
    data = _data(tmp_path)
    model = io.load_model(ref)
    samples = NpzSamples(data, input_specs(model))
    assert verify(ref, cand, samples).passed
    report = verify(ref, cand, samples, states=[("state", "stateN")])
    assert not report.passed and "each model on its own state (state<-stateN)" in report.data
    # the same through the CLI, and through a stream given as the samples
    code, out, _ = run_cli(["verify", ref, cand, "--data", data, "--state", "state=stateN"], capsys)
    assert code == 1 and "FAIL: " in out
    stream = StatefulSamples(samples, model, [("state", "stateN")], "ref")
    assert not verify(ref, cand, stream).passed
    # the reference on its own state against itself: exact
    assert verify(ref, ref, samples, states=[("state", "stateN")]).outputs[0].snr_db == np.inf


@pytest.mark.parametrize(
    "spec, message",
    [
        ("state", "--state wants IN=OUT"),
        ("nope=stateN", "has no input 'nope'"),
        ("state=nope", "has no output 'nope'"),
        ("x=stateN", "differ in shape"),
    ],
)
def test_bad_state_pairs_are_refused_in_one_line(spec, message, tmp_path, capsys):
    ref = tmp_path / "ref.onnx"
    onnx.save(_stream(0.9), ref)
    model = io.load_model(ref)
    with pytest.raises(InputError, match=message):
        parse_pairs([spec], model, "ref.onnx")
    data = _data(tmp_path)
    code, out, err = run_cli(["verify", ref, ref, "--data", data, "--state", spec], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err


def test_quantize_calibrates_on_the_carried_states(tmp_path, capsys):
    """Calibrated on the data's zero states, the state input's range is [0, 0]; on the carried
    states it is the range the served model meets."""
    ref = tmp_path / "ref.onnx"
    onnx.save(_stream(0.95), ref)
    data = _data(tmp_path)
    out = tmp_path / "q.onnx"
    code, text, err = run_cli(
        [
            "quantize",
            ref,
            "-o",
            out,
            "--data",
            data,
            "--state",
            "state=stateN",
            "--json",
            tmp_path / "q.json",
        ],
        capsys,
    )
    assert code in (0, 1), err
    import json

    ranges = {r["tensor"]: r for r in json.loads((tmp_path / "q.json").read_text())["ranges"]}
    assert ranges["state"]["observed_max"] - ranges["state"]["observed_min"] > 0.5
    assert "each model on its own state" in text


def test_the_accuracy_guard_judges_candidates_on_their_own_state(tmp_path):
    """The guard's evaluator, given a stream, runs each candidate on its own carried state (as
    the final verification does). A candidate whose state is off by a little at each step holds
    the floors step by step on the reference's states, but its own state drifts by the sum of
    those errors: that is what the guard must see."""
    from onnxzip.quantize import QuantizeConfig
    from onnxzip.quantize.guard import _Evaluator

    ref = io.load_model(_stream(0.95))
    cand = io.load_model(_stream(0.95, offset=0.01))
    base = NpzSamples(_data(tmp_path, steps=80), input_specs(ref))
    pairs = [("state", "stateN")]
    stream = StatefulSamples(base, ref, pairs, "ref")
    config = QuantizeConfig(batch_size=8)
    evaluator = _Evaluator(ref, stream, "holdout", config)
    # teacher-forced, step by step on the reference's states: every floor holds
    forced = floors_judge(ref, cand, stream)
    assert all(c.passed for c in forced)
    checks, _ = evaluator.floor_checks(cand)
    assert not all(c.passed for c in checks)  # on its own state it drifts
    checks, levels = evaluator.floor_checks(ref)
    assert all(c.passed for c in checks) and min(levels.values()) == np.inf
    assert not verify(ref, cand, stream, split="holdout", holdout=0.5).passed


def floors_judge(ref, cand, stream):
    from onnxzip import floors
    from onnxzip.runtime import Runner

    judge = floors.Judge(list(ref.graph.outputs))
    a, b = Runner(ref), Runner(cand)
    names = [v.name for v in ref.graph.outputs]
    for batch in stream.batches(8, "holdout", 0.5):
        judge.add(a.run(batch, names), b.run(batch, names), batch)
    return judge.checks()
