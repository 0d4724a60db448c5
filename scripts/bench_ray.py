"""Benchmark: onnxzip's Ray engine against one process, side by side in one run.

A Ray cluster of 2 CPUs is started on this machine (``ray start --head --num-cpus 2``, a token of
its own), then each job runs in its own fresh process, alternating, ``--repeat`` times:

* **one process**: ``python -m onnxzip quantize ...`` (onnxruntime with its default two
  intra-op threads here);
* **Ray, 2 workers**: the same command with ``--ray ADDRESS`` (each task one CPU, onnxruntime one
  thread per task), connecting to the running cluster as users of an existing cluster do;
* once per model, ``--ray local`` (a private Ray instance started and stopped by the command:
  its start-up counts).

Jobs: the accuracy guard with a target the int8 model misses, so that it measures every
candidate layer's sensitivity (``--min-cosine``), on the two digits CNNs (real data, the
held-out digits) and on ResNet-50 (onnx's light architecture, random weights, 128 smooth random
calibration images, 32 held out; batch 16) whose calibration and guard both run on Ray; and
``compress``'s budget search on the digits nets (``--target-macs 0.3 --max-drop 0.3``: the
requested amount misses the budget, milder ones are tried; each attempt prunes, distils
through the training engine and verifies), whose attempts run two at a time on Ray; and
``stats`` (gradient statistics through the training engine) on MobileNetV2 at 112x112 with 1024
synthetic samples, one training-engine job per 512-sample shard on Ray.

Measured: wall time of each command (median), the stage times from its JSON report
(calibrate+insert, guard), peak resident memory of the driver, and whether the model bytes
are identical to the one-process model. Writes JSON and prints a Markdown table.

Usage: python scripts/bench_ray.py [--out results/ray.json] [--repeat 2] [--models ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import run_measured, run_record, smooth_images  # noqa: E402

RAY_BIN = Path(sys.executable).parent / "ray"
DIGITS_DATA = [
    "--data",
    str(ROOT / "models" / "digits_calib.npz"),
    "--verify-data",
    str(ROOT / "models" / "digits_test.npz"),
]


def models(work: Path, names: list[str]) -> dict[str, dict]:
    from onnxzip import io
    from onnxzip.data import input_specs
    from testmodels import zoo

    out = {}
    for name in names:
        if name.startswith("digits"):
            out[name] = {
                "path": ROOT / "models" / f"{name}.onnx",
                "args": [
                    *DIGITS_DATA,
                    "--min-cosine",
                    "0.99995",
                    "--calibration",
                    "percentile",
                ],
            }
            continue
        if name.startswith("compress:"):
            net = name.split(":", 1)[1]
            out[name] = {
                "path": ROOT / "models" / f"{net}.onnx",
                "command": "compress",
                "args": [
                    *DIGITS_DATA,
                    "--target-macs",
                    "0.3",
                    "--max-drop",
                    "0.3",
                    "--no-latency",
                ],
            }
            continue
        if name.startswith("stats:"):
            # gradient statistics: one training-engine job per 512-sample shard on Ray
            model = zoo.mobilenet_v2(resolution=112)
            path = work / "mobilenet_v2_112.onnx"
            io.save_model(model, path)
            out[name] = {
                "path": path,
                "command": "stats",
                "suffix": ".npz",
                "args": ["--synthetic", "1024"],
            }
            continue
        model = zoo.from_light("resnet50")
        path = work / "resnet50.onnx"
        io.save_model(model, path)
        spec = input_specs(model)[0]
        data = work / "resnet50_data.npz"
        np.savez(data, **{spec.name: smooth_images(160, 0, tuple(spec.shape[1:]))})
        out[name] = {
            "path": path,
            "args": [
                "--data",
                str(data),
                "--holdout",
                "0.2",
                "--batch-size",
                "16",
                "--min-cosine",
                "0.9999999",
            ],
        }
    return out


def start_cluster(work: Path, env: dict) -> tuple[subprocess.Popen, str, str]:
    temp = tempfile.mkdtemp(prefix="oz-ray-")  # Ray's sockets need a short path
    log = work / "ray_head.log"
    head = subprocess.Popen(
        [
            str(RAY_BIN),
            "start",
            "--head",
            "--block",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
        ],
        env=env,
        stdout=open(log, "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = re.search(r"ray start --address='([^']+)'", log.read_text(errors="replace"))
        if found:
            return head, found.group(1), temp
        if head.poll() is not None:
            raise SystemExit(f"ray start failed:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)
    raise SystemExit("ray start: no address in 120 s")


def run_job(model: dict, out: Path, report: Path, extra: list[str]) -> dict:
    cmd = [
        "-m",
        "onnxzip",
        model.get("command", "quantize"),
        str(model["path"]),
        "-o",
        str(out),
        *model["args"],
        "--json",
        str(report),
        "-q",
        *extra,
    ]
    result = run_measured([sys.executable, *cmd], ROOT)
    if "error" in result:
        raise SystemExit(f"{' '.join(cmd)}: {result['error']}")
    data = json.loads(report.read_text())
    if model.get("command") == "stats":
        with np.load(out) as arrays:
            result.update(
                search=data["seconds"],
                attempts=data["batches"],
                bytes=b"".join(k.encode() + arrays[k].tobytes() for k in sorted(arrays.files)),
            )
        return result
    if model.get("command") == "compress":
        result.update(
            search=data["seconds"].get("pruning search", 0.0),
            attempts=len(data.get("attempts") or []),
            bytes=out.read_bytes(),
        )
        return result
    seconds = data["seconds"]
    guard = data.get("guard") or {}
    result.update(
        calibrate=seconds.get("calibrate+insert", 0.0),
        guard=seconds.get("guard", 0.0),
        sensitivity=(guard.get("seconds") or {}).get("sensitivity", 0.0),
        candidates=guard.get("candidates"),
        kept_float=len(guard.get("kept_float") or []),
        bytes=out.read_bytes(),
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "ray.json")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--models",
        nargs="+",
        default=[
            "digits_resnet",
            "digits_mobilenet",
            "resnet50",
            "compress:digits_resnet",
            "compress:digits_mobilenet",
            "stats:mobilenet_v2",
        ],
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="onnxzip-bench-ray-"))
    token = work / "token"
    token.write_text(os.urandom(32).hex())
    # the cluster, and every command that joins it, authenticate with this token
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    os.environ.pop("RAY_ADDRESS", None)
    head, address, temp = start_cluster(work, dict(os.environ))
    rows, searches = [], []
    try:
        for name, model in models(work, args.models).items():
            runs: dict[str, list[dict]] = {"process": [], "ray": []}
            suffix = model.get("suffix", ".onnx")
            for i in range(args.repeat):
                for kind, extra in (("process", []), ("ray", ["--ray", address])):
                    runs[kind].append(
                        run_job(model, work / f"{kind}{i}{suffix}", work / f"{kind}{i}.json", extra)
                    )
            private = run_job(
                model, work / f"local{suffix}", work / "local.json", ["--ray", "local"]
            )
            reference = runs["process"][0]["bytes"]
            identical = all(r["bytes"] == reference for rs in runs.values() for r in rs)
            identical &= private["bytes"] == reference

            def med(kind: str, field: str, runs=runs) -> float:
                return statistics.median(r[field] for r in runs[kind])

            if model.get("command") in ("compress", "stats"):
                row = {
                    "job": name,
                    "attempts": runs["process"][0]["attempts"],
                    "identical_bytes": identical,
                }
                for kind in runs:
                    for field in ("seconds", "search", "peak_mib"):
                        row[f"{kind}_{field}"] = round(med(kind, field), 3)
                row["ray_local_seconds"] = round(private["seconds"], 3)
                row["search_speedup"] = round(
                    row["process_search"] / max(row["ray_search"], 1e-9), 2
                )
                searches.append(row)
                print(json.dumps(row), flush=True)
                continue
            row = {
                "model": name,
                "candidates": runs["process"][0]["candidates"],
                "kept_float": runs["process"][0]["kept_float"],
                "identical_bytes": identical,
            }
            for kind in runs:
                for field in ("seconds", "calibrate", "guard", "sensitivity", "peak_mib"):
                    row[f"{kind}_{field}"] = round(med(kind, field), 3)
            row["ray_local_seconds"] = round(private["seconds"], 3)
            row["sensitivity_speedup"] = round(
                row["process_sensitivity"] / max(row["ray_sensitivity"], 1e-9), 2
            )
            row["guard_speedup"] = round(row["process_guard"] / max(row["ray_guard"], 1e-9), 2)
            both = row["process_calibrate"] + row["process_guard"]
            row["calibrate_guard_ratio"] = round(
                (row["ray_calibrate"] + row["ray_guard"]) / max(both, 1e-9), 2
            )
            row["wall_ratio"] = round(row["ray_seconds"] / row["process_seconds"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(60)
        import shutil

        shutil.rmtree(temp, ignore_errors=True)
    record = {
        **run_record(),
        "cluster": "ray start --head --num-cpus 2 on this machine",
        "rows": rows,
        "searches": searches,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(
        "\n| model | layers | sensitivity s (1 process / Ray 2) | speed-up | guard s (1 process / "
        "Ray 2) | speed-up | calibrate+guard Ray/process | wall s (1 process / Ray 2 / --ray local) "
        "| identical |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['candidates']} | {r['process_sensitivity']:.2f} / "
            f"{r['ray_sensitivity']:.2f} | {r['sensitivity_speedup']:.2f}x | "
            f"{r['process_guard']:.2f} / {r['ray_guard']:.2f} | {r['guard_speedup']:.2f}x | "
            f"{r['calibrate_guard_ratio']:.2f} | {r['process_seconds']:.1f} / "
            f"{r['ray_seconds']:.1f} / {r['ray_local_seconds']:.1f} | "
            f"{'yes' if r['identical_bytes'] else 'NO'} |"
        )

    print(
        "\n| job | attempts / batches | s (1 process / Ray 2) | speed-up | "
        "wall s (1 process / Ray 2 / --ray local) | identical |"
    )
    print("|---|---|---|---|---|---|")
    for r in searches:
        print(
            f"| {r['job']} | {r['attempts']} | {r['process_search']:.2f} / {r['ray_search']:.2f} "
            f"| {r['search_speedup']:.2f}x | {r['process_seconds']:.1f} / {r['ray_seconds']:.1f} / "
            f"{r['ray_local_seconds']:.1f} | {'yes' if r['identical_bytes'] else 'NO'} |"
        )


if __name__ == "__main__":
    main()
