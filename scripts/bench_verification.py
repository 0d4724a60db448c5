"""Benchmark: does static int8 keep the task? onnxzip's ``quantize`` with its defaults against
onnxruntime's ``quantize_static`` and NNCF's ``nncf.quantize``, on two real models.

Models: the YOLOX-style character detector and the CTC text recognizer inside the ``ddddocr``
1.6.1 wheel (real weights; fetched as ``scripts/devset.py`` does). The detector's one output
concatenates boxes (0-416 px), objectness and class scores (0-1); the recognizer's is a score
per character class at every position of the line.

Data, made as ``scripts/devset.py`` makes it: crops of scikit-learn's sample photos with large
characters drawn on them for the detector, text lines rendered with PIL for the recognizer. Each
tool calibrates on the same calibration file; the task is then measured on other images and
lines, which no tool saw:

* detector: the share of the fp32 model's detections (objectness x class score >= 0.25, NMS
  0.45) that the int8 model also makes (IoU >= 0.5, same class), and its batch-1 latency
  against fp32's;
* recognizer: the share of lines whose greedy CTC reading (best class per position, repeats
  merged, blanks dropped) is the fp32 model's reading.

Tools, each in a fresh process: ``python -m onnxzip quantize MODEL -o OUT --data CALIB`` (every
default: its floors, its guard and its dynamic fallback decide what is written, and the line it
prints about a fallback is recorded); onnxruntime's recommended flow (``quant_pre_process``,
``quantize_static``, QDQ, per-channel, MinMax), on the model as shipped and on a copy converted
to opset 13 by onnx's version converter (both models are opset 11, where the per-channel
``DequantizeLinear`` it writes does not exist); NNCF's ``nncf.quantize`` (its ONNX backend,
defaults, every calibration sample) in an environment of its own (``--nncf-python``, or one this
script creates in ``--cache`` with ``pip install nncf onnx onnxruntime``: NNCF pins an older
numpy than onnxzip's).

Floors (the verification issue): the detector keeps >= 90 % of the detections at <= 0.6x fp32
latency; the recognizer reads >= 95 % of lines as fp32 does, or onnxzip says it fell back to a
mode that does. Writes JSON and prints a Markdown table.

Usage: python scripts/bench_verification.py [--cache DIR] [--nncf-python PATH] [--out JSON]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import devset  # noqa: E402
from benchlib import latency, ort_static_command, run_measured, run_record  # noqa: E402

from onnxzip.metrics import decode, detection_recall  # noqa: E402

NNCF_WORKER = r"""
import sys, numpy as np, onnx, nncf
model_path, out, calib = sys.argv[1:4]
with np.load(calib) as archive:
    data = {k: archive[k] for k in archive.files if k != "labels"}
n = len(next(iter(data.values())))
items = [{k: v[i:i + 1] for k, v in data.items()} for i in range(n)]
model = onnx.load(model_path)
quantized = nncf.quantize(model, nncf.Dataset(items), subset_size=n)
onnx.save(quantized, out)
"""

FLOORS = {"detector": (0.90, 0.6), "recognizer": (0.95, None)}


def nncf_python(cache: Path, given: str | None) -> str:
    if given:
        return given
    env = cache / "nncf-env"
    python = env / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "nncf", "onnx", "onnxruntime"], check=True
        )
    return str(python)


def run_each(path: Path, images: np.ndarray, name: str) -> list[np.ndarray]:
    """The model's first output for every image, one at a time (both models take batch 1)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [session.run(None, {name: images[i : i + 1]})[0] for i in range(len(images))]


def detections_kept(reference: list, candidate: list) -> tuple[int, int]:
    """(fp32 detections the candidate also makes, fp32 detections) over all images."""
    found = total = 0
    for ref, cand in zip(reference, candidate, strict=True):
        wanted = len(decode(ref[0]))
        found += round(detection_recall({"o": ref}, {"o": cand}, None) * wanted)
        total += wanted
    return found, total


def reading(scores: np.ndarray) -> tuple[int, ...]:
    """Greedy CTC reading of one line's [T, 1, C] (or [T, C]) scores: class 0 is the blank."""
    best = scores.reshape(scores.shape[0], -1).argmax(axis=1)
    merged = [int(c) for i, c in enumerate(best) if c != 0 and (i == 0 or c != best[i - 1])]
    return tuple(merged)


def lines_read_alike(reference: list, candidate: list) -> tuple[int, int]:
    same = sum(reading(r) == reading(c) for r, c in zip(reference, candidate, strict=True))
    return same, len(reference)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "devset")
    parser.add_argument("--nncf-python", help="an interpreter that has nncf (default: create one)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "verification.json")
    parser.add_argument("--lines", type=int, default=80, help="text lines per set (80)")
    parser.add_argument("--crops", type=int, default=32, help="photo crops per set (32)")
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    paths = devset.fetch_models(args.cache)
    nncf = nncf_python(args.cache, args.nncf_python)
    results = run_record()
    results["rows"] = []
    tasks = {
        "detector": (
            paths["det"],
            "images",
            devset.photo_crops(args.crops, seed=1),
            devset.photo_crops(args.crops, seed=7),
            detections_kept,
        ),
        "recognizer": (
            paths["ocr"],
            "input1",
            devset.text_lines(args.lines, seed=0),
            devset.text_lines(args.lines, seed=5),
            lines_read_alike,
        ),
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for task, (model, name, calib_images, eval_images, measure) in tasks.items():
            calib = work / f"{task}_calib.npz"
            np.savez(calib, **{name: calib_images})
            tools = ("onnxzip", "ort", "ort13", "nncf")
            outs = {tool: work / f"{task}_{tool}.onnx" for tool in tools}
            # quantize_static writes per-channel DequantizeLinear with an axis, which only
            # opset 13 has, into these opset-11 models; what a user does next: convert first
            op13 = work / f"{task}_opset13.onnx"
            onnx.save(onnx.version_converter.convert_version(onnx.load(str(model)), 13), op13)
            commands = {
                "onnxzip": [
                    sys.executable,
                    "-m",
                    "onnxzip",
                    "quantize",
                    str(model),
                    "-o",
                    str(outs["onnxzip"]),
                    "--data",
                    str(calib),
                    "--json",
                    str(work / f"{task}_report.json"),
                ],
                "ort": ort_static_command(model, outs["ort"], calib, "MinMax", 1, work),
                "ort13": ort_static_command(op13, outs["ort13"], calib, "MinMax", 1, work),
                "nncf": [nncf, "-c", NNCF_WORKER, str(model), str(outs["nncf"]), str(calib)],
            }
            labels = {
                "onnxzip": "onnxzip quantize (defaults)",
                "ort": "onnxruntime quantize_static",
                "ort13": "quantize_static, opset 13 copy",
                "nncf": "NNCF quantize",
            }
            reference = run_each(model, eval_images, name)
            feed = {name: eval_images[:1]}
            timed = {"fp32": model}
            for tool, command in commands.items():
                ran = run_measured(command, work)
                row = {
                    "model": task,
                    "tool": labels[tool],
                    "tool_seconds": round(ran["seconds"], 1),
                    "peak_mib": round(ran["peak_mib"]),
                }
                if "error" in ran or not outs[tool].exists():
                    row["error"] = ran.get("error", "no model written")
                    results["rows"].append(row)
                    print(f"{task:10s} {labels[tool]:30s} ERROR {row['error']}", flush=True)
                    continue
                try:
                    outputs = run_each(outs[tool], eval_images, name)
                except Exception as exc:  # the tool wrote a model onnxruntime refuses
                    why = str(exc).splitlines()[0]
                    why = why.split(" Error ")[-1] if " Error " in why else why
                    row["error"] = f"onnxruntime cannot load its model: {why[:160]}"
                    results["rows"].append(row)
                    print(f"{task:10s} {labels[tool]:30s} ERROR {row['error']}", flush=True)
                    continue
                kept, total = measure(reference, outputs)
                row.update(kept=kept, total=total, share=round(kept / max(total, 1), 4))
                row["size_mib"] = round(outs[tool].stat().st_size / 2**20, 2)
                if tool == "onnxzip":
                    report = json.loads((work / f"{task}_report.json").read_text())
                    row["verdict"] = ran.get("verdict", "PASS")
                    row["mode"] = report["config"]["mode"]
                    row["fallback"] = report.get("fallback")
                    row["kept_float"] = len(report.get("kept_float") or [])
                results["rows"].append(row)
                timed[tool] = outs[tool]
            lat = latency(timed, feed)
            base = lat["fp32"]["median_ms"]
            for row in results["rows"]:
                if row["model"] != task:
                    continue
                tool = next(t for t, label in labels.items() if label == row["tool"])
                if tool in lat:
                    row["latency_ms"] = round(lat[tool]["median_ms"], 3)
                    row["latency_x_fp32"] = round(lat[tool]["median_ms"] / base, 3)
            results["rows"].append(
                {
                    "model": task,
                    "tool": "fp32",
                    "latency_ms": round(base, 3),
                    "size_mib": round(Path(model).stat().st_size / 2**20, 2),
                }
            )
            for row in results["rows"]:
                if row["model"] == task and "share" in row:
                    print(
                        f"{task:10s} {row['tool']:30s} kept {row['kept']}/{row['total']} "
                        f"({100 * row['share']:.1f} %) latency x{row.get('latency_x_fp32')}",
                        flush=True,
                    )
    floors = {}
    for task, (share_floor, latency_floor) in FLOORS.items():
        row = next(
            (r for r in results["rows"] if r["model"] == task and r["tool"].startswith("onnxzip")),
            None,
        )
        holds = row is not None and row.get("share", 0) >= share_floor
        if latency_floor is not None:
            holds = holds and row.get("latency_x_fp32", 9) <= latency_floor
        floors[task] = {
            "holds": bool(holds),
            "floor": {"share": share_floor, "latency_x_fp32": latency_floor},
            "fallback": row.get("fallback") if row else None,
        }
    results["floors"] = floors
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print()
    print("| model | tool | task kept | latency ms | x fp32 | size MiB | tool time s | note |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results["rows"]:
        kept = (
            f"{r['kept']}/{r['total']} ({100 * r['share']:.1f} %)"
            if "share" in r
            else r.get("error", "")
        )
        note = r.get("fallback") or (
            f"{r['kept_float']} layers float" if r.get("kept_float") else ""
        )
        print(
            f"| {r['model']} | {r['tool']} | {kept} | {r.get('latency_ms', '')} | "
            f"{r.get('latency_x_fp32', '')} | {r.get('size_mib', '')} | "
            f"{r.get('tool_seconds', '')} | {note} |"
        )
    print()
    for task, f in floors.items():
        print(f"floor {task}: {'holds' if f['holds'] else 'NOT met'} ({f['floor']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
