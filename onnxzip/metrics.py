"""Task metrics: the user's definition of "still does its job", as NNCF's accuracy control takes
a ``validation_fn``.

A metric is a function ``f(reference, candidate, batch) -> float``: the original's and the
compressed model's outputs for one batch (dicts of arrays keyed by output name) and the batch
itself (its ``inputs`` and ``labels``); higher is better. ``verify`` averages it over the
samples, weighted by batch size, and checks it against its floor (``--min-metric``, or the
floor a shipped metric carries); given, it replaces the default floors of the outputs' kinds,
and the accuracy guards and ``compress``'s budget search use it.

Shipped, by name:

* ``top1``: top-1 agreement of the first class-score output (``[N, C]``), floor 0.98;
* ``detection``: the fraction of the original's detections the candidate keeps, for
  YOLO-style outputs ``[N, A, 4 + 1 + C]`` (box ``cx, cy, w, h``, objectness, class scores; a
  ``[N, F, A]`` layout is transposed): detections are anchors whose ``objectness * class
  score`` reaches 0.25, after greedy per-class non-maximum suppression at IoU 0.45; one of the
  original's detections is kept when a candidate detection of the same class overlaps it at
  IoU >= 0.5 (each matched once). Floor 0.9. ``detection-no-objectness`` reads
  ``[N, A, 4 + C]`` (YOLOv8 layout).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from onnxzip.errors import InputError

MetricFn = Callable[[dict, dict, object], float]


@dataclass
class TaskMetric:
    name: str
    fn: MetricFn
    floor: float | None = None  # the score must reach it; None: reported, not checked


def top1(reference: dict, candidate: dict, batch) -> float:
    """Top-1 agreement of the first output of shape [N, C]."""
    for name, r in reference.items():
        if np.ndim(r) == 2 and np.shape(r)[1] >= 2:
            return float(np.mean(np.argmax(r, 1) == np.argmax(candidate[name], 1)))
    raise InputError("metric top1: no output of class scores [N, C]")


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one corner box against many, boxes as x1, y1, x2, y2."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(area + areas - inter > 0, inter / (area + areas - inter), 0.0)


def decode(
    rows: np.ndarray, objectness: bool = True, score: float = 0.25, nms_iou: float = 0.45
) -> list[tuple[np.ndarray, int]]:
    """(corner box, class) of one image's detections from [A, 4 (+1) + C] rows."""
    boxes = np.stack(
        [
            rows[:, 0] - rows[:, 2] / 2,
            rows[:, 1] - rows[:, 3] / 2,
            rows[:, 0] + rows[:, 2] / 2,
            rows[:, 1] + rows[:, 3] / 2,
        ],
        axis=1,
    )
    classes = rows[:, 5:] if objectness else rows[:, 4:]
    if classes.shape[1] == 0:  # objectness only: one class
        classes = np.ones((len(rows), 1), rows.dtype)
    conf = classes * (rows[:, 4:5] if objectness else 1.0)
    cls = conf.argmax(axis=1)
    best = conf[np.arange(len(rows)), cls]
    keep = []
    for c in np.unique(cls[best >= score]):
        idx = np.where((cls == c) & (best >= score))[0]
        idx = idx[np.argsort(-best[idx], kind="stable")]
        while len(idx):
            i = idx[0]
            keep.append((boxes[i], int(c)))
            idx = idx[1:][_iou(boxes[i], boxes[idx[1:]]) < nms_iou]
    return keep


def _detector_rows(array: np.ndarray) -> np.ndarray:
    a = np.asarray(array, np.float64)
    if a.ndim != 3:
        raise InputError(f"metric detection: expects a [N, A, F] output, got rank {a.ndim}")
    return a.transpose(0, 2, 1) if a.shape[1] < a.shape[2] else a


def detection_recall(
    reference: dict, candidate: dict, batch, objectness: bool = True, iou: float = 0.5
) -> float:
    """The fraction of the reference's detections the candidate keeps (1.0 when the reference
    detects nothing in the batch)."""
    name = next(iter(reference))
    ref, cand = _detector_rows(reference[name]), _detector_rows(candidate[name])
    found = total = 0
    for r, c in zip(ref, cand, strict=True):
        wanted = decode(r, objectness)
        got = decode(c, objectness)
        used = [False] * len(got)
        for box, cls in wanted:
            total += 1
            for j, (other, other_cls) in enumerate(got):
                if not used[j] and other_cls == cls and _iou(box, other[None])[0] >= iou:
                    used[j] = True
                    found += 1
                    break
    return found / total if total else 1.0


SHIPPED = {
    "top1": TaskMetric("top1", top1, 0.98),
    "detection": TaskMetric("detection", detection_recall, 0.9),
    "detection-no-objectness": TaskMetric(
        "detection-no-objectness",
        lambda r, c, b: detection_recall(r, c, b, objectness=False),
        0.9,
    ),
}


def load(spec: str, floor: float | None = None) -> TaskMetric:
    """A shipped metric by name, or ``module:function`` imported (the current directory is on
    the path when run as ``python -m onnxzip``). ``floor`` replaces the metric's own."""
    if spec in SHIPPED:
        m = SHIPPED[spec]
        return TaskMetric(m.name, m.fn, m.floor if floor is None else floor)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"--metric '{spec}': give one of {', '.join(SHIPPED)} or module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module: any import error is theirs
        raise InputError(f"--metric '{spec}': cannot import {module_name}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise InputError(f"--metric '{spec}': {module_name} has no function {attr}")
    return TaskMetric(spec, fn, floor if floor is not None else getattr(fn, "floor", None))


def as_metric(metric) -> TaskMetric | None:
    """A ``TaskMetric`` from one, a callable (its ``floor`` attribute, if any), or a name."""
    if metric is None or isinstance(metric, TaskMetric):
        return metric
    if isinstance(metric, str):
        return load(metric)
    if callable(metric):
        return TaskMetric(
            getattr(metric, "__name__", "metric"), metric, getattr(metric, "floor", None)
        )
    raise InputError(f"metric: expected a callable or a name, got {type(metric).__name__}")


def score(metric: TaskMetric, reference: dict, candidate: dict, batch) -> float:
    """One batch's score; a metric that raises or returns a non-number is the user's problem."""
    try:
        value = float(metric.fn(reference, candidate, batch))
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"metric {metric.name} failed: {type(exc).__name__}: {exc}") from exc
    if not np.isfinite(value):
        raise InputError(f"metric {metric.name} returned {value}")
    return value
