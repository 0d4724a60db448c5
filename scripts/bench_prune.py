"""Benchmark: structured pruning, MACs against real latency, side by side in one run.

For ResNet-50 (light architecture, random weights), MobileNetV2 and a BERT-style encoder
(testmodels.zoo; 4 layers, hidden 256, 4 heads, FFN 1024; MACs per token, latency at 128 tokens)
and the two digits CNNs: ``onnxzip prune --target-macs F`` for several F, each in a fresh process (wall time and
peak memory), then MACs, parameters, latency of every pruned model interleaved with the
original's (onnxruntime CPU, 2 threads, batch 1, median), and for the digits models the test
accuracy before any recovery. Writes JSON and prints a Markdown table.

Usage: python scripts/bench_prune.py [--out results/bench_prune.json]
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

from benchlib import latency, run_measured, run_record  # noqa: E402

from onnxzip import io  # noqa: E402
from onnxzip.analysis import inspect_model  # noqa: E402
from onnxzip.data import NpzSamples, input_specs  # noqa: E402
from onnxzip.verify import verify  # noqa: E402
from testmodels import zoo  # noqa: E402

TARGETS = {
    "resnet50": [0.7, 0.5, 0.3],
    "mobilenet_v2": [0.7, 0.5],
    "bert_encoder": [0.7, 0.5],
    "digits_resnet": [0.7, 0.5],
    "digits_mobilenet": [0.7, 0.5],
}
SEQUENCE = 128  # tokens per sample for the BERT-style encoder's latency
BUILDERS = {
    "resnet50": lambda: zoo.from_light("resnet50"),
    "mobilenet_v2": lambda: zoo.mobilenet_v2(),
    "bert_encoder": lambda: zoo.bert_encoder(layers=4, hidden=256, heads=4, ffn=1024, vocab=8000),
}


def feed_for(model) -> dict[str, np.ndarray]:
    """One sample: an image of the model's size, or a 128-token sentence with a full mask."""
    rng = np.random.default_rng(0)
    feed = {}
    for spec in input_specs(model):
        shape = [1] + [d if isinstance(d, int) else SEQUENCE for d in spec.shape[1:]]
        if spec.dtype.kind == "f":
            feed[spec.name] = rng.normal(size=shape).astype(spec.dtype)
        elif "mask" in spec.name:
            feed[spec.name] = np.ones(shape, dtype=spec.dtype)
        else:
            feed[spec.name] = rng.integers(0, 1000, shape).astype(spec.dtype)
    return feed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_prune.json")
    parser.add_argument("--models", nargs="+", default=list(TARGETS))
    args = parser.parse_args(argv)
    ort.set_default_logger_severity(3)
    results = run_record()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models:
            if name.startswith("digits"):
                path = ROOT / "models" / f"{name}.onnx"
            else:
                path = work / f"{name}.onnx"
                io.save_model(BUILDERS[name](), path)
            base = inspect_model(path)
            entry = {"macs": base.macs, "parameters": base.parameters, "runs": {}}
            paths = {"original": path}
            print(f"== {name}", flush=True)
            for target in TARGETS[name]:
                out = work / f"{name}_{target}.onnx"
                measured = run_measured(
                    [
                        sys.executable,
                        "-m",
                        "onnxzip",
                        "prune",
                        str(path),
                        "-o",
                        str(out),
                        "--target-macs",
                        str(target),
                        "--quiet",
                    ],
                    cwd=work,
                )
                if "error" in measured:
                    entry["runs"][str(target)] = measured
                    print(f"  target {target}: FAILED {measured['error']}")
                    continue
                info = inspect_model(out)
                run = {**measured, "macs": info.macs, "parameters": info.parameters}
                if name.startswith("digits"):
                    test = ROOT / "models" / "digits_test.npz"
                    o = verify(
                        path, out, NpzSamples(test, input_specs(io.load_model(path)))
                    ).outputs[0]
                    run["accuracy"], run["fp32_accuracy"] = (
                        o.candidate_accuracy,
                        o.reference_accuracy,
                    )
                entry["runs"][str(target)] = run
                paths[str(target)] = out
                print(
                    f"  target {target}: MACs {info.macs / base.macs:.3f} params {info.parameters / base.parameters:.3f} "
                    f"tool {measured['seconds']:.2f} s {measured['peak_mib']:.0f} MiB",
                    flush=True,
                )
            feed = feed_for(io.load_model(path))
            entry["latency"] = latency(paths, feed)
            for key, value in entry["latency"].items():
                print(f"  latency {key:<10}{value['median_ms']:8.3f} ms", flush=True)
            results["models"][name] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    return 0


def markdown(results: dict) -> str:
    lines = [
        "| model | target MACs | MACs | parameters | latency ms | latency vs original | tool s | accuracy % |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, entry in results["models"].items():
        base = entry["latency"]["original"]["median_ms"]
        lines.append(
            f"| {name} | 1.0 | {entry['macs']:,} | {entry['parameters']:,} | {base:.3f} | 1.00 | | |"
        )
        for target, r in entry["runs"].items():
            if "error" in r:
                lines.append(f"| {name} | {target} | failed: {r['error'][:60]} | | | | | |")
                continue
            lat = entry["latency"][target]["median_ms"]
            acc = "" if r.get("accuracy") is None else f"{100 * r['accuracy']:.2f}"
            lines.append(
                f"| {name} | {target} | {r['macs']:,} ({r['macs'] / entry['macs']:.2f}) | {r['parameters']:,} | "
                f"{lat:.3f} | {lat / base:.2f} | {r['seconds']:.1f} | {acc} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
