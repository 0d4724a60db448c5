"""Benchmark: gradient statistics throughput, memory, and overhead over a bare training step.

For MobileNetV2 (batch 8) and ResNet-50 (the light architecture, whose batch is fixed at 1),
random weights and smooth random images:

* ``onnxzip stats`` in a fresh process on N and 4N samples: wall time and peak memory (memory
  must not grow with the number of samples);
* per batch, in the training engine's worker: the time of onnxzip's gradient step (a training
  step plus copying the gate gradients out) against a bare ``Module`` step on the same twin and
  batches, i.e. onnxzip's overhead per step; ``setup_seconds`` is the rest of the run (twin,
  batch files, worker start, artifacts).

Usage: python scripts/bench_gradients.py [--out results/bench_gradients.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import run_measured, run_record, smooth_images  # noqa: E402

from onnxzip import engine, io, training  # noqa: E402
from onnxzip.data import NpzSamples, input_specs  # noqa: E402
from onnxzip.gradients import _gated_twin, gradient_statistics  # noqa: E402
from onnxzip.pruning import prepared_groups  # noqa: E402
from testmodels import zoo  # noqa: E402

MODELS = {
    "mobilenet_v2": (zoo.mobilenet_v2, 8, 32),
    "resnet50": (lambda: zoo.from_light("resnet50"), 1, 8),
}


def bare_steps(work, groups, samples, batch: int) -> float:
    """Seconds per batch of a bare step on the same gated twin (cross-entropy, labels): the same
    worker job reading no gradients back."""
    twin, gates = _gated_twin(work, groups)
    training.differentiable(twin)
    frozen = [
        n
        for n, v in twin.graph.initializers.items()
        if n not in gates and v.dtype.is_floating_point()
    ]
    classifier = twin.graph.outputs[0]
    twin.graph.outputs.clear()
    twin.graph.outputs.append(classifier)
    feeds = (
        {
            **{k: np.ascontiguousarray(v) for k, v in b.inputs.items()},
            "labels": np.zeros(len(b), np.int64),
        }
        for b in samples.batches(batch)
    )
    result = engine.run_job(
        twin,
        kind="gradients",
        requires_grad=list(gates),
        frozen=frozen,
        batches=feeds,
        read=[],
        loss="cross-entropy",
    )
    times = result.step_seconds
    return float(np.median(times[1:] or times))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_gradients.json")
    args = parser.parse_args(argv)
    results = run_record()
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = Path(tmp)
        for name, (build, batch, count) in MODELS.items():
            model = build()
            path = work_dir / f"{name}.onnx"
            io.save_model(model, path)
            spec = input_specs(model)[0]
            entry = {"batch": batch}
            for n in (count, 4 * count):
                # A folder of 8-sample files: onnxzip streams it file by file.
                data = work_dir / f"{name}_{n}"
                data.mkdir()
                images = smooth_images(n, 0, tuple(spec.shape[1:]))
                labels = np.random.default_rng(0).integers(0, 1000, n)
                for i in range(0, n, 8):
                    part = {spec.name: images[i : i + 8], "labels": labels[i : i + 8]}
                    np.savez(data / f"part{i:04d}.npz", **part)
                measured = run_measured(
                    [
                        sys.executable,
                        "-m",
                        "onnxzip",
                        "stats",
                        str(path),
                        "-o",
                        str(work_dir / "s.npz"),
                        "--data",
                        str(data),
                        "--batch-size",
                        str(batch),
                        "--quiet",
                    ],
                    cwd=work_dir,
                )
                entry[f"stats_{n}_samples"] = {**measured, "samples_per_s": n / measured["seconds"]}
                print(
                    f"{name}: stats on {n} samples: {measured['seconds']:.1f} s, {measured['peak_mib']:.0f} MiB",
                    flush=True,
                )
            samples = NpzSamples(work_dir / f"{name}_{count}", input_specs(model))
            work, groups = prepared_groups(model)
            _, report = gradient_statistics(work, groups, samples, batch_size=batch)
            per_batch = report.step_seconds
            bare = bare_steps(work, groups, samples, batch)
            entry.update(
                {
                    "onnxzip_seconds_per_batch": per_batch,
                    "bare_step_seconds": bare,
                    "overhead": per_batch / bare - 1,
                    "setup_seconds": report.seconds - per_batch * report.batches,
                }
            )
            print(
                f"{name}: bare step {bare:.3f} s per batch of {batch}; onnxzip {per_batch:.3f} s "
                f"(overhead {100 * (per_batch / bare - 1):.1f} %), setup {entry['setup_seconds']:.1f} s",
                flush=True,
            )
            results["models"][name] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
