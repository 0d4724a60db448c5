"""The project's benchmark models: real architectures with random weights."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from onnxzip import io
from onnxzip.analysis import inspect_model
from testmodels import zoo


def test_mobilenet_v2_has_the_published_size():
    model = zoo.mobilenet_v2()
    report = inspect_model(model)
    assert 3.4e6 < report.parameters < 3.6e6  # MobileNetV2 1.0: 3.5 M parameters
    assert 2.9e8 < report.macs < 3.1e8  # and 300 M multiply-adds at 224 x 224
    ops = report.op_histogram
    assert ops["Conv"] == 52 and ops["BatchNormalization"] == 52 and ops["Add"] == 10


def test_light_resnet50_gets_real_initializers_at_opset_17():
    model = zoo.from_light("resnet50")
    assert model.opset_imports[""] == 17 and model.ir_version <= 10
    assert not any(n.op_type == "ConstantOfShape" for n in model.graph)
    report = inspect_model(model)
    assert 25.5e6 < report.parameters < 25.7e6  # ResNet-50: 25.6 M parameters
    weights = [
        v.const_value.numpy()
        for v in model.graph.initializers.values()
        if v.const_value.numpy().ndim == 4
    ]
    assert len(weights) == 53 and all(w.std() > 0 for w in weights)  # random, not the constant 0.02
    session = ort.InferenceSession(io.model_bytes(model), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(1, 3, 224, 224)).astype(np.float32)
    (probs,) = session.run(None, {session.get_inputs()[0].name: x})
    assert np.isfinite(probs).all() and abs(float(probs.sum()) - 1.0) < 1e-3
