"""Weight-only int4 against onnxruntime's quantizers on a Llama-style decoder export.

The decoder is ``scripts/export_transformers.py --bench``'s (torch.onnx dynamo export at its
defaults, external data; 4 layers, hidden 512, 8 query heads over 2 key/value heads, RMSNorm,
rotary, vocabulary 8192; random weights, so parity only, no task accuracy). Each tool runs in its
own process:

* ``onnxzip quantize --mode weight-only`` at its defaults (int4, blocks of 32, symmetric,
  clipping by the inputs' E[x^2] on the samples; MatMulNBits at this opset), with
  ``--weight-method rtn`` and with ``--weight-method gptq``;
* onnxruntime's ``MatMulNBitsQuantizer`` at the same bits and block (its default algorithm,
  MLAS round to nearest, symmetric);
* onnxruntime's ``quantize_dynamic`` (int8 weights, QOperator) and onnxzip's dynamic int8.

Measured: file size, latency (batch 1; a 32-token prompt and a single token, the weight-bound
case of a decode step; interleaved rounds, benchlib), and parity
against fp32 on the 16 held-out sequences calibration never saw: next-token top-1 agreement over
every unpadded position, and the mean cosine of the logits.

Usage: ``python scripts/bench_int4.py --model DIR/llama_bench.onnx [--out results/int4.json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import benchlib  # noqa: E402

NBITS_WORKER = r"""
import sys, onnx
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
model, out = sys.argv[1:3]
q = MatMulNBitsQuantizer(onnx.load(model), block_size=32, is_symmetric=True)
q.process()
q.model.save_model_to_file(out, use_external_data_format=False)
"""

DYNAMIC_WORKER = r"""
import sys
from onnxruntime.quantization import QuantType, quantize_dynamic
model, out = sys.argv[1:3]
quantize_dynamic(model, out, weight_type=QuantType.QInt8, per_channel=True)
"""


def _file_bytes(path: Path) -> int:
    from onnxzip import io

    return io.file_size(path)


def parity(reference: Path, candidate: Path, data: dict[str, np.ndarray]) -> dict:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    ref = ort.InferenceSession(str(reference), options, providers=["CPUExecutionProvider"])
    cand = ort.InferenceSession(str(candidate), options, providers=["CPUExecutionProvider"])
    agree, total, cosines = 0, 0, []
    for i in range(len(data["input_ids"])):
        feed = {k: v[i : i + 1] for k, v in data.items()}
        a, b = ref.run(None, feed)[0][0], cand.run(None, feed)[0][0]
        keep = feed["attention_mask"][0].astype(bool)
        a, b = a[keep], b[keep]
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += int(keep.sum())
        cosines += list((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1))
    return {"next_token_agreement": agree / total, "mean_cosine": float(np.mean(cosines))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "int4.json")
    args = parser.parse_args()
    model = args.model.resolve()
    ids = model.with_name(model.stem + "_ids.npz")
    with np.load(ids) as archive:
        data = {k: archive[k] for k in archive.files}
    record = benchlib.run_record()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calib, held = work / "calib.npz", {k: v[-16:] for k, v in data.items()}
        np.savez(calib, **{k: v[:-16] for k, v in data.items()})
        runs = {
            "onnxzip int4 (defaults)": (
                ["-m", "onnxzip", "quantize", model, "-o", work / "zip4.onnx"]
                + ["--mode", "weight-only", "--data", calib, "--holdout", "0"],
                work / "zip4.onnx",
            ),
            "onnxzip int4 rtn": (
                ["-m", "onnxzip", "quantize", model, "-o", work / "zip4rtn.onnx"]
                + ["--mode", "weight-only", "--weight-method", "rtn", "--data", calib]
                + ["--holdout", "0"],
                work / "zip4rtn.onnx",
            ),
            "onnxzip int4 gptq": (
                ["-m", "onnxzip", "quantize", model, "-o", work / "zip4gptq.onnx"]
                + ["--mode", "weight-only", "--weight-method", "gptq", "--data", calib]
                + ["--holdout", "0"],
                work / "zip4gptq.onnx",
            ),
            "MatMulNBitsQuantizer int4": (
                ["-c", NBITS_WORKER, model, work / "ort4.onnx"],
                work / "ort4.onnx",
            ),
            "quantize_dynamic int8": (
                ["-c", DYNAMIC_WORKER, model, work / "dyn.onnx"],
                work / "dyn.onnx",
            ),
            "onnxzip dynamic int8": (
                ["-m", "onnxzip", "quantize", model, "-o", work / "zipdyn.onnx"]
                + ["--mode", "dynamic", "--data", calib, "--holdout", "0"],
                work / "zipdyn.onnx",
            ),
        }
        rows = {"fp32": {"bytes": _file_bytes(model)}}
        paths = {"fp32": model}
        for name, (cmd, out) in runs.items():
            measured = benchlib.run_measured([sys.executable, *map(str, cmd)], work)
            rows[name] = {
                "tool_seconds": measured["seconds"],
                "tool_peak_mib": measured["peak_mib"],
            }
            if "error" in measured:
                rows[name]["error"] = measured["error"]
                continue
            rows[name]["bytes"] = _file_bytes(out)
            rows[name].update(parity(model, out, held))
            paths[name] = out
        # a 32-token prompt (compute-bound) and one token (a decode step: weight-bound)
        for label, tokens in (("prompt32", 32), ("token1", 1)):
            feed = {k: v[:1, :tokens] for k, v in data.items()}
            times = benchlib.latency(paths, feed)
            for name, t in times.items():
                rows[name][f"latency_{label}_ms"] = t["median_ms"]
                rows[name][f"latency_{label}_vs_fp32"] = t["median_ms"] / times["fp32"]["median_ms"]
        for row in rows.values():
            row["size_vs_fp32"] = row["bytes"] / rows["fp32"]["bytes"]
    record["models"]["llama_bench"] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    for name, row in rows.items():
        print(
            f"{name:28s} "
            + "  ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
            )
        )


if __name__ == "__main__":
    main()
