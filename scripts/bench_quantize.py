"""Benchmark: onnxzip quantize against onnxruntime's quantize_static, side by side in one run.

For each model (the two digits CNNs with real data, ResNet-50 from onnx's light architectures
with random weights, a MobileNetV2 built by testmodels.zoo) and each calibration method (MinMax,
Percentile 99.99, Entropy), both tools run in their own fresh process on the same samples:

* onnxzip:  ``python -m onnxzip quantize MODEL -o OUT --data CALIB --holdout 0 --calibration M``:
  the same job as onnxruntime's, every sample calibrating and nothing verified. With nothing
  held out, automatic bias correction has nothing to decide on and stays off; its effect is
  reported separately in README.
* onnxruntime: ``quant_pre_process`` then ``quantize_static`` (QDQ, per-channel, QUInt8
  activations, QInt8 weights), its recommended flow.

Measured: tool wall time (median of ``--repeat`` runs, the tools alternating) and peak resident
memory of each process (``os.wait4`` in a small launcher process), model size,
parity against fp32 on held-out samples (cosine, SNR, top-1 agreement), digits test accuracy,
and latency (onnxruntime CPU, 2 threads, batch 1, default optimisation; 3 warm-up runs, then 5
interleaved rounds of about a second per model; median per model). Writes JSON and prints a
Markdown table.

Usage: python scripts/bench_quantize.py [--out results/bench_quantize.json] [--models ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (  # noqa: E402
    image_model,
    latency,
    ort_static_command,
    run_measured,
    run_record,
)

from onnxzip import io  # noqa: E402
from onnxzip.data import NpzSamples, input_specs  # noqa: E402
from onnxzip.verify import verify  # noqa: E402

METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


def prepare_models(work: Path, names: list[str]) -> dict[str, dict]:
    models = {}
    for name in names:
        if name.startswith("digits"):
            models[name] = {
                "path": ROOT / "models" / f"{name}.onnx",
                "calib": ROOT / "models" / "digits_calib.npz",
                "val": ROOT / "models" / "digits_test.npz",
                "batch": 32,
                "real_data": True,
            }
            continue
        models[name] = {**image_model(work, name), "real_data": False}
    return models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_quantize.json")
    parser.add_argument(
        "--models",
        nargs="+",
        default=["digits_resnet", "digits_mobilenet", "resnet50", "mobilenet_v2"],
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each tool; the median time is reported"
    )
    args = parser.parse_args(argv)
    ort.set_default_logger_severity(3)
    results = run_record()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = prepare_models(work, args.models)
        for name, m in models.items():
            print(f"== {name}", flush=True)
            entry = {"fp32_bytes": io.file_size(m["path"]), "runs": {}}
            outputs = {"fp32": m["path"]}
            for method in args.methods:
                commands, outs = {}, {}
                for tool in ("onnxzip", "onnxruntime"):
                    out = work / f"{name}_{tool}_{method}.onnx"
                    outs[tool] = out
                    if tool == "onnxzip":
                        commands[tool] = [
                            sys.executable,
                            "-m",
                            "onnxzip",
                            "quantize",
                            str(m["path"]),
                            "-o",
                            str(out),
                            "--data",
                            str(m["calib"]),
                            "--holdout",
                            "0",
                            "--calibration",
                            method,
                            "--batch-size",
                            str(m["batch"]),
                            "--quiet",
                        ]
                    else:
                        scratch = tempfile.mkdtemp(dir=work)
                        commands[tool] = ort_static_command(
                            m["path"], out, m["calib"], METHODS[method], m["batch"], scratch
                        )
                # Alternate the two tools, `repeat` times each: the median wall time and the
                # largest peak memory are reported.
                measured = {tool: [] for tool in commands}
                for _ in range(args.repeat):
                    for tool, cmd in commands.items():
                        measured[tool].append(run_measured(cmd, cwd=work))
                for tool, runs in measured.items():
                    failed = [r for r in runs if "error" in r]
                    key = f"{tool}/{method}"
                    if failed:
                        entry["runs"][key] = failed[0]
                        print(f"  {tool:<12}{method:<11}FAILED: {failed[0]['error']}", flush=True)
                        continue
                    summary = {
                        "seconds": float(np.median([r["seconds"] for r in runs])),
                        "seconds_all": [r["seconds"] for r in runs],
                        "peak_mib": max(r["peak_mib"] for r in runs),
                    }
                    specs = input_specs(io.load_model(m["path"]))
                    parity = verify(
                        m["path"], outs[tool], NpzSamples(m["val"], specs), batch_size=m["batch"]
                    )
                    o = parity.outputs[0]
                    entry["runs"][key] = {
                        **summary,
                        "bytes": io.file_size(outs[tool]),
                        "cosine": o.cosine_mean,
                        "snr_db": o.snr_db,
                        "top1_agreement": o.top1_agreement,
                        "accuracy": o.candidate_accuracy,
                        "fp32_accuracy": o.reference_accuracy,
                    }
                    outputs[key] = outs[tool]
                    print(
                        f"  {tool:<12}{method:<11}{summary['seconds']:7.2f} s {summary['peak_mib']:7.0f} MiB "
                        f"cos {o.cosine_mean:.5f} SNR {o.snr_db:6.2f}"
                        + (
                            f" acc {100 * o.candidate_accuracy:.2f}"
                            if o.candidate_accuracy is not None
                            else ""
                        ),
                        flush=True,
                    )
            feed_data = np.load(m["val"])
            feed = {k: feed_data[k][:1] for k in feed_data.files if k != "labels"}
            lat_keys = {k: v for k, v in outputs.items() if k == "fp32" or k.endswith("/minmax")}
            entry["latency"] = latency(lat_keys, feed)
            for k, v in entry["latency"].items():
                print(f"  latency {k:<22}{v['median_ms']:8.2f} ms ({v['runs']} runs)", flush=True)
            results["models"][name] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, allow_nan=False, default=str) + "\n")
    print(markdown(results))
    return 0


def _fmt(value, scale: float = 1.0, digits: int = 2) -> str:
    return "" if value is None else f"{scale * value:.{digits}f}"


def markdown(results: dict) -> str:
    lines = [
        "| model | tool / method | tool time s | peak MiB | size KiB | cosine | SNR dB | top-1 agree % "
        "| accuracy % | latency ms | speed-up vs fp32 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, entry in results["models"].items():
        fp32 = entry["latency"]["fp32"]["median_ms"]
        acc = next(iter(entry["runs"].values()))["fp32_accuracy"]
        lines.append(
            f"| {name} | fp32 | | | {entry['fp32_bytes'] / 1024:.0f} | | | | {_fmt(acc, 100)} | {fp32:.2f} | 1.00 |"
        )
        for key, r in entry["runs"].items():
            if "error" in r:
                lines.append(f"| {name} | {key} | failed: {r['error'][:80]} |" + " |" * 8)
                continue
            lat = entry["latency"].get(key, {}).get("median_ms")
            cells = [
                name,
                key,
                _fmt(r["seconds"], digits=1),
                _fmt(r["peak_mib"], digits=0),
                _fmt(r["bytes"] / 1024, digits=0),
                _fmt(r["cosine"], digits=5),
                _fmt(r["snr_db"]),
                _fmt(r["top1_agreement"], 100, 1),
                _fmt(r["accuracy"], 100),
                _fmt(lat),
                "" if lat is None else f"{fp32 / lat:.2f}x",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
