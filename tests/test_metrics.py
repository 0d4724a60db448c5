"""Task metrics: shipped top-1 and detection metrics, a user's module:function, the metric
replacing the default floors in verify and steering quantize's floor guard; bad specs refused."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from conftest import run_cli

from onnxzip import io, metrics
from onnxzip.data import NpzSamples, input_specs
from onnxzip.errors import InputError
from onnxzip.verify import verify


def _rows(boxes, obj, cls):
    """[A, 4 + 1 + C] rows: cx, cy, w, h, objectness, class scores."""
    return np.concatenate([np.asarray(boxes, float), np.asarray(obj, float)[:, None], cls], 1)


def test_detection_decoding_nms_and_matching():
    cls = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9]] + [[0.9, 0.1]] * 9)
    # anchors 0 and 1 overlap (one object, NMS keeps one); 2 another class; 3.. below the score
    ref = _rows(
        [[50, 50, 20, 20], [51, 50, 20, 20], [150, 150, 30, 30]] + [[10, 10, 5, 5]] * 9,
        [0.9, 0.8, 0.9] + [0.1] * 9,
        cls,
    )
    found = metrics.decode(ref)
    assert sorted(c for _, c in found) == [0, 1]
    same = metrics.detection_recall({"y": ref[None]}, {"y": ref[None]}, None)
    assert same == 1.0
    lost = ref.copy()
    lost[2, 4] = 0.05  # the class-1 object's objectness falls below the score
    shifted = ref.copy()
    shifted[0, 0] = shifted[1, 0] = 90  # the class-0 box moves off its object (IoU 0)
    assert metrics.detection_recall({"y": ref[None]}, {"y": lost[None]}, None) == 0.5
    assert metrics.detection_recall({"y": ref[None]}, {"y": shifted[None]}, None) == 0.5
    # the [N, F, A] layout is read the same
    assert metrics.detection_recall({"y": ref.T[None]}, {"y": lost.T[None]}, None) == 0.5


def test_metric_specs_are_loaded_or_refused_in_one_line(tmp_path, monkeypatch):
    assert metrics.load("top1").floor == 0.98
    assert metrics.load("detection", 0.8).floor == 0.8
    (tmp_path / "mymetric.py").write_text(
        "import numpy as np\n"
        "def close(ref, cand, batch):\n"
        "    return float(np.mean([np.allclose(ref[k], cand[k], atol=1e-3) for k in ref]))\n"
        "close.floor = 1.0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    m = metrics.load("mymetric:close")
    assert m.floor == 1.0 and m.fn({"a": np.ones(2)}, {"a": np.ones(2)}, None) == 1.0
    for spec, needle in [
        ("nosuch:f", "cannot import nosuch"),
        ("mymetric:missing", "has no function missing"),
        ("plain", "give one of top1"),
    ]:
        with pytest.raises(InputError, match=needle):
            metrics.load(spec)
    sys.modules.pop("mymetric", None)


def test_task_metric_replaces_the_floors_and_decides_the_verdict(
    resnet_path, test_npz, tmp_path, capsys
):
    proto = onnx.load(resnet_path)
    gemm = next(n for n in proto.graph.node if n.op_type == "Gemm")
    weight = next(t for t in proto.graph.initializer if t.name == gemm.input[1])
    array = onnx.numpy_helper.to_array(weight).copy()
    array[:, :] *= np.linspace(0.6, 1.4, array.shape[1])[None, :]  # a distorted classifier
    weight.CopyFrom(onnx.numpy_helper.from_array(array.astype(np.float32), weight.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, bad)
    samples = NpzSamples(test_npz, input_specs(io.load_model(resnet_path)))
    report = verify(resnet_path, bad, samples, metric="top1")
    (check,) = report.floors
    assert check.part == "task metric top1" and report.task_score == check.value
    assert report.floors_note == "replaced by the task metric top1"

    def always(ref, cand, batch):
        return 1.0

    report = verify(resnet_path, bad, samples, metric=always)
    assert report.task_score == 1.0 and report.floors is None and report.passed
    assert "metric     always: 1.0000 (no floor given)" in report.format()
    code, out, err = run_cli(
        [
            "verify",
            resnet_path,
            bad,
            "--data",
            test_npz,
            "--metric",
            "top1",
            "--min-metric",
            "1.01",
        ],
        capsys,
    )
    assert code == 1 and "FAIL: task metric top1 (task)" in out
    code, out, err = run_cli(
        ["verify", resnet_path, resnet_path, "--data", test_npz, "--min-metric", "0.5"], capsys
    )
    assert code == 2 and err.strip() == "onnxzip: error: --min-metric needs --metric"


@pytest.mark.skipif(
    __import__("onnxzip.runtime", fromlist=["x"]).int8_pairs_saturate() is not None,
    reason="without VNNI the defaults' pair-safe dynamic int8 misses this strict metric too",
)
def test_quantize_defaults_follow_the_task_metric(resnet_path, calib_npz, tmp_path, capsys):
    """A metric static int8 of the digits net misses (99 % of logits within 0.05): the
    defaults look for a quantization that holds it, as they do for the default floors."""
    (tmp_path / "strict_metric.py").write_text(
        "import numpy as np\n"
        "def logits_close(ref, cand, batch):\n"
        "    return float(np.mean(np.abs(ref['logits'] - cand['logits']) < 0.05))\n"
        "logits_close.floor = 0.99\n"
    )
    out = tmp_path / "q.onnx"
    sys.path.insert(0, str(tmp_path))
    try:
        code, stdout, err = run_cli(
            [
                "quantize",
                resnet_path,
                "-o",
                out,
                "--data",
                calib_npz,
                "--metric",
                "strict_metric:logits_close",
            ],
            capsys,
        )
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("strict_metric", None)
    assert code == 0, stdout + err
    # static int8 misses it; dynamic int8 (the Gemm only) reaches it and is chosen, saying why
    assert (
        "fallback     dynamic int8: static int8 broke the default floors (task metric "
        "strict_metric:logits_close (task)" in stdout
    )
    assert "task metric strict_metric:logits_close" in stdout and "\nPASS" in stdout
