"""Benchmark: the tool time of ``onnxzip quantize`` with its defaults against onnxruntime's
``quantize_static``, on the same samples, each run in a fresh process.

onnxzip runs as a user runs it, ``python -m onnxzip quantize MODEL -o OUT --data CALIB``: a
held-out fifth kept out of calibration, bias correction decided on it (``auto``), the result
verified against the original and judged by the default floors, whose guard keeps layers in
float when a floor breaks. onnxruntime runs its recommended flow (``quant_pre_process``, then
``quantize_static``, QDQ, per-channel, MinMax) on every sample and verifies nothing. A model
whose int8 result breaks a default floor also gets a run with ``--no-floor-guard`` (what the
defaults cost when the floors hold), reported beside the full default run.

The tools alternate, ``--repeat`` rounds; the median wall time of each is reported (see the
project's benchmarking rules). Writes JSON and prints a Markdown table.

Usage: python scripts/bench_tool_time.py [--out results/tool_time.json] [--models ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import image_model, ort_static_command, run_measured, run_record  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "tool_time.json")
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet50"])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    results = run_record()
    results["rows"] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models:
            m = image_model(work, name)
            out, report = work / "out.onnx", work / "report.json"
            tools = {
                "onnxruntime quantize_static": ort_static_command(
                    m["path"], out, m["calib"], "MinMax", m["batch"], work
                ),
                "onnxzip quantize (defaults)": [
                    sys.executable,
                    "-m",
                    "onnxzip",
                    "quantize",
                    str(m["path"]),
                    "-o",
                    str(out),
                    "--data",
                    str(m["calib"]),
                    "--json",
                    str(report),
                ],
            }
            runs: dict[str, list] = {tool: [] for tool in tools}
            for _ in range(args.repeat):
                for tool, cmd in tools.items():
                    runs[tool].append(run_measured(cmd, work))
            # a default run that broke a floor ran the floor guard (its report, written by the
            # measured runs, says): also measure without it
            if json.loads(report.read_text()).get("guard") is not None:
                cmd = [*tools["onnxzip quantize (defaults)"], "--no-floor-guard"]
                runs["onnxzip quantize (defaults, --no-floor-guard)"] = [
                    run_measured(cmd, work) for _ in range(args.repeat)
                ]
            base = statistics.median(r["seconds"] for r in runs["onnxruntime quantize_static"])
            for tool, measured in runs.items():
                seconds = statistics.median(r["seconds"] for r in measured)
                results["rows"].append(
                    {
                        "model": name,
                        "tool": tool,
                        "seconds": round(seconds, 3),
                        "all_seconds": [round(r["seconds"], 3) for r in measured],
                        "peak_mib": round(statistics.median(r["peak_mib"] for r in measured)),
                        "of_quantize_static": round(seconds / base, 3),
                        "errors": sorted({r["error"] for r in measured if "error" in r}),
                    }
                )
                print(f"{name:13s} {tool:46s} {seconds:6.2f} s  {seconds / base:.2f}x", flush=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print()
    print("| model | tool | tool time s | x quantize_static | peak MiB |")
    print("| --- | --- | --- | --- | --- |")
    for r in results["rows"]:
        print(
            f"| {r['model']} | {r['tool']} | {r['seconds']:.2f} | {r['of_quantize_static']:.2f} "
            f"| {r['peak_mib']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
