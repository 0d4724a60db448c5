"""Models for tests and benchmarks, built from code: onnx's light architectures with random weights,
a MobileNetV2 and a BERT-style encoder. Not part of the onnxzip package."""
