"""Recreates the real-model development set into a cache, and runs every command over it.

Models: the three ONNX models inside the ``ddddocr`` 1.6.1 wheel from PyPI (``pip download
--no-deps``; real weights: a CTC text recognizer, its older QDQ-quantized sibling and a
YOLOX-style detector whose single output concatenates boxes and scores), plus the committed
torch.onnx exports under ``tests/data/exported`` (BERT, Llama-style GQA, GPT-2; dynamo and
TorchScript exporters; a ViT from dynamo; their token sequences).

Data, all real and offline, made the way ddddocr feeds its models:
* ``ocr.npz``: 40 text lines rendered with PIL (letters and digits, four fonts sizes), grey,
  64 x 256, scaled to [0, 1];
* ``det.npz``: 24 416 x 416 crops (with mirror images) of scikit-learn's two sample photos
  with large characters drawn on them (what the detector looks for), RGB in CHW, 0-255 float.

``--run`` then runs inspect, verify, quantize (static, dynamic, weight-only), prune and
compress on every model, prints one line per run (exit code, verdict) and exits 1 when any run
ends in exit 3, a signal or a traceback, as the corpus test does for the committed part.

Usage: ``python scripts/devset.py [--cache DIR] [--run]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WHEEL = "ddddocr==1.6.1"
MODELS = {"ocr": "common.onnx", "ocr_old": "common_old.onnx", "det": "common_det.onnx"}
CHARS = "abcdefghijkmnpqrstuvwxyz0123456789"


def fetch_models(cache: Path) -> dict[str, Path]:
    wheels = sorted(cache.glob("ddddocr-1.6.1-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache), WHEEL],
            check=True,
        )
        wheels = sorted(cache.glob("ddddocr-1.6.1-*.whl"))
    paths = {}
    with zipfile.ZipFile(wheels[-1]) as wheel:
        for key, member in MODELS.items():
            target = cache / member
            if not target.exists():
                target.write_bytes(wheel.read(f"ddddocr/{member}"))
            paths[key] = target
    return paths


def text_lines(count: int = 40, seed: int = 0) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    lines = []
    for i in range(count):
        text = "".join(rng.choice(list(CHARS), int(rng.integers(4, 9))))
        image = Image.new("L", (256, 64), 255)
        draw = ImageDraw.Draw(image)
        size = (28, 34, 40, 46)[i % 4]
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: one bitmap size
            font = ImageFont.load_default()
        draw.text((int(rng.integers(4, 40)), int(rng.integers(0, 12))), text, fill=0, font=font)
        lines.append(np.asarray(image, np.float32) / 255.0)
    return np.stack(lines)[:, None]


def photo_crops(count: int = 24, seed: int = 1) -> np.ndarray:
    """Crops of the sample photos with 3 to 6 large characters drawn on each, as on the
    captchas ddddocr's detector finds characters in (photos alone give it nothing to detect:
    its objectness is near 0 everywhere, and no floor on it means anything)."""
    from PIL import Image, ImageDraw, ImageFont
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    crops = []
    for photo in load_sample_images().images:  # 427 x 640 x 3, uint8
        h, w, _ = photo.shape
        for k in range(count // 4):
            x0 = int(k * (w - 416) / max(1, count // 4 - 1))
            crop = photo[:416, x0 : x0 + 416]
            if crop.shape[0] < 416:
                pad = np.full((416, 416, 3), 114, np.uint8)
                pad[: crop.shape[0]] = crop
                crop = pad
            for image in (crop, np.ascontiguousarray(crop[:, ::-1])):
                canvas = Image.fromarray(image)
                draw = ImageDraw.Draw(canvas)
                for _ in range(int(rng.integers(3, 7))):
                    try:
                        font = ImageFont.load_default(size=int(rng.integers(48, 96)))
                    except TypeError:  # Pillow < 10.1: one bitmap size
                        font = ImageFont.load_default()
                    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
                    xy = (int(rng.integers(0, 340)), int(rng.integers(0, 330)))
                    draw.text(xy, str(rng.choice(list(CHARS))), fill=colour, font=font)
                array = np.asarray(canvas)
                crops.append(np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32))
    return np.stack(crops[:count])


def build(cache: Path) -> dict[str, tuple[Path, Path]]:
    cache.mkdir(parents=True, exist_ok=True)
    models = fetch_models(cache)
    ocr, det = cache / "ocr.npz", cache / "det.npz"
    if not ocr.exists():
        np.savez(ocr, input1=text_lines())
    if not det.exists():
        np.savez(det, images=photo_crops())
    corpus = {
        "ocr": (models["ocr"], ocr),
        "ocr_old": (models["ocr_old"], ocr),
        "det": (models["det"], det),
    }
    exported = ROOT / "tests" / "data" / "exported"
    for arch in ("bert", "llama", "gpt2"):
        for exporter in ("dynamo", "ts"):
            corpus[f"{arch}_{exporter}"] = (
                exported / f"{arch}_{exporter}.onnx",
                exported / f"{arch}_ids.npz",
            )
    corpus["vit_dynamo"] = (exported / "vit_dynamo.onnx", exported / "vit_pixels.npz")
    return corpus


# every command as a user would run it; tests/test_corpus.py runs the same list
COMMANDS = {
    "inspect": ["inspect", "{model}", "--groups", "--data", "{data}"],
    "verify": ["verify", "{model}", "{model}", "--data", "{data}", "--per-node"],
    "quantize": ["quantize", "{model}", "-o", "{out}", "--data", "{data}"],
    "quantize-dynamic": ["quantize", "{model}", "-o", "{out}", "--data", "{data}"]
    + ["--mode", "dynamic"],
    "quantize-int4": ["quantize", "{model}", "-o", "{out}", "--data", "{data}"]
    + ["--mode", "weight-only"],
    "prune": ["prune", "{model}", "-o", "{out}", "--ratio", "0.3", "--data", "{data}"],
    "compress": ["compress", "{model}", "-o", "{out}", "--data", "{data}"]
    + ["--recover-steps", "50", "--no-latency"],
}


def run_all(corpus: dict[str, tuple[Path, Path]], work: Path) -> int:
    bad = 0
    for name, (model, data) in corpus.items():
        for command, template in COMMANDS.items():
            out = work / f"{name}.{command}.onnx"
            argv = [a.format(model=model, data=data, out=out) for a in template]
            run = subprocess.run(
                [sys.executable, "-m", "onnxzip", *argv], capture_output=True, text=True
            )
            verdict = next(
                (
                    line
                    for line in reversed(run.stdout.splitlines())
                    if line.startswith(("PASS", "FAIL", "NOTHING"))
                ),
                run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "",
            )
            broken = run.returncode not in (0, 1, 2) or "Traceback" in run.stderr
            bad += broken
            print(f"{name:14s} {command:17s} exit {run.returncode}  {verdict[:110]}", flush=True)
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "devset")
    parser.add_argument("--run", action="store_true", help="run every command over the set")
    args = parser.parse_args()
    corpus = build(args.cache)
    for name, (model, data) in corpus.items():
        print(f"{name:14s} {model}  {data}")
    if not args.run:
        return 0
    work = args.cache / "out"
    work.mkdir(exist_ok=True)
    return run_all(corpus, work)


if __name__ == "__main__":
    sys.exit(main())
