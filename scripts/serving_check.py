"""Serving check: compressed models run in the newest plain onnxruntime and in onnx's reference.

Users serve with the plain ``onnxruntime`` package, not the training build onnxzip runs on, and
"framework-agnostic" means any compliant runtime. This script

1. compresses the shipped digits models (``compress``: prune, recover, int8) and quantizes a
   BERT-style encoder and, when ``scripts/export_minilm.py`` has exported it, the real
   all-MiniLM-L6-v2 dynamically, in this environment;
2. checks each compressed model with ``onnx.reference.ReferenceEvaluator`` (an independent
   implementation of the ONNX operators) against onnxruntime on a few samples;
3. creates a separate virtual environment with the newest ``onnxruntime`` from PyPI (it cannot
   share an environment with onnxruntime-training), loads every compressed model there and
   compares its outputs with the original fp32 model's outputs computed here.

Exit code 0 when every check holds, 1 otherwise. Usage:
    python scripts/serving_check.py [--venv .serving-venv] [--keep]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxzip  # noqa: E402
from onnxzip import io, zoo  # noqa: E402
from onnxzip.data import Batch, SyntheticSamples  # noqa: E402
from onnxzip.runtime import Runner  # noqa: E402

CHECKER = r"""
import json, sys
import numpy as np
import onnxruntime as ort
folder = sys.argv[1]
cases = json.load(open(folder + "/cases.json"))
results = {"onnxruntime": ort.__version__, "cases": {}}
for name, case in cases.items():
    data = np.load(folder + "/" + case["inputs"])
    expected = np.load(folder + "/" + case["expected"])
    session = ort.InferenceSession(folder + "/" + case["model"], providers=["CPUExecutionProvider"])
    feeds = {i.name: data[i.name] for i in session.get_inputs()}
    out = session.run(None, feeds)[0].astype(np.float64).reshape(len(data[session.get_inputs()[0].name]), -1)
    ref = expected["fp32"].astype(np.float64).reshape(out.shape)
    cos = float(np.mean((out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1) + 1e-30)))
    same = float(np.max(np.abs(out - expected["compressed"].reshape(out.shape))))
    top1 = float(np.mean(out.argmax(1) == ref.argmax(1))) if case["classifier"] else None
    results["cases"][name] = {"cosine_vs_fp32": cos, "top1_vs_fp32": top1, "max_abs_vs_training_build": same}
print(json.dumps(results))
"""


# Largest relative difference allowed between onnx's ReferenceEvaluator and onnxruntime. Static
# QDQ models compute the same integers in both. Dynamically quantized ones may differ more: each
# implementation derives its own run-time scales (4.7 % was once seen on MiniLM), so they get a
# wider bound, and every case must also keep a cosine of at least REFERENCE_COSINE.
STATIC_GAP, DYNAMIC_GAP, REFERENCE_COSINE = 0.05, 0.1, 0.999


def compressed_models(work: Path) -> dict[str, dict]:
    cases = {}
    for arch in ("digits_resnet", "digits_mobilenet"):
        path = ROOT / "models" / f"{arch}.onnx"
        model = onnxzip.load_model(path)
        specs = onnxzip.input_specs(model)
        calib = onnxzip.open_samples(specs, ROOT / "models" / "digits_calib.npz")
        small, _ = onnxzip.compress(model, calib, onnxzip.CompressConfig(latency=False))
        onnxzip.save_model(small, work / f"{arch}_compressed.onnx")
        x = np.load(ROOT / "models" / "digits_test.npz")["input"][:64]
        cases[arch] = {
            "original": model,
            "compressed": small,
            "inputs": {"input": x},
            "classifier": True,
            "min_cosine": 0.9,
            "min_top1": 0.95,
            "reference_gap": STATIC_GAP,
        }
    bert = zoo.bert_encoder()
    specs = onnxzip.input_specs(bert)
    samples = SyntheticSamples(specs, 16, seed=0)
    small, _ = onnxzip.quantize(bert, samples, onnxzip.QuantizeConfig(mode="dynamic", holdout=0))
    onnxzip.save_model(small, work / "bert_encoder_compressed.onnx")
    rng = np.random.default_rng(1)
    inputs = {
        "input_ids": rng.integers(0, 1000, (8, 24)).astype(np.int64),
        "attention_mask": np.ones((8, 24), np.int64),
    }
    cases["bert_encoder"] = {
        "original": bert,
        "compressed": small,
        "inputs": inputs,
        "classifier": False,
        "min_cosine": 0.99,
        "min_top1": None,
        "reference_gap": DYNAMIC_GAP,
    }
    minilm = ROOT / ".cache" / "minilm" / "minilm.onnx"
    if minilm.exists():  # the real all-MiniLM-L6-v2, from scripts/export_minilm.py
        model = onnxzip.load_model(minilm)
        sentences = ROOT / "models" / "minilm_sentences.npz"
        calib = onnxzip.open_samples(onnxzip.input_specs(model), sentences)
        small, _ = onnxzip.quantize(model, calib, onnxzip.QuantizeConfig(mode="dynamic"))
        onnxzip.save_model(small, work / "minilm_compressed.onnx")
        with np.load(sentences) as archive:
            inputs = {k: archive[k][:8] for k in ("input_ids", "attention_mask")}
        cases["minilm"] = {
            "original": model,
            "compressed": small,
            "inputs": inputs,
            "classifier": False,
            "min_cosine": 0.99,
            "min_top1": None,
            "reference_gap": DYNAMIC_GAP,
        }
    else:
        print(f"{minilm} not found (scripts/export_minilm.py makes it): MiniLM not checked")
    return cases


def reference_check(case: dict) -> tuple[float, float]:
    """Largest relative difference and cosine between onnx's ReferenceEvaluator and onnxruntime.

    Dynamically quantized models differ a little more: each implementation derives its own
    run-time scales (DynamicQuantizeLinear), and six transformer layers carry the rounding on.
    """
    from onnx.reference import ReferenceEvaluator

    # onnx's reference implements QuantizeLinear/DequantizeLinear from opset 19 on; the
    # operators' meaning for these types did not change since 13, so the check runs at opset 21.
    proto = io.to_proto(io.convert_opset(case["compressed"], 21))
    evaluator = ReferenceEvaluator(proto)
    feeds = {k: v[:4] for k, v in case["inputs"].items()}
    ref = evaluator.run(None, feeds)[0]
    runner = Runner(case["compressed"], optimization="none")
    ort_out = runner.run(Batch(feeds))[runner.output_names[0]]
    a, b = ref.astype(np.float64).ravel(), ort_out.astype(np.float64).ravel()
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12)), cosine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=ROOT / ".serving-venv")
    parser.add_argument("--keep", action="store_true", help="keep the serving virtual environment")
    args = parser.parse_args(argv)
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases = compressed_models(work)
        manifest = {}
        for name, case in cases.items():
            gap, cosine = reference_check(case)
            print(
                f"{name}: ReferenceEvaluator vs onnxruntime, max relative difference {gap:.2e}, "
                f"cosine {cosine:.6f}"
            )
            if gap > case["reference_gap"] or cosine < REFERENCE_COSINE:
                failures.append(
                    f"{name}: ReferenceEvaluator differs from onnxruntime by {gap:.3f} "
                    f"(cosine {cosine:.5f})"
                )
            original = Runner(case["original"]).session
            compressed = Runner(case["compressed"]).session
            feeds = case["inputs"]
            np.savez(work / f"{name}_inputs.npz", **feeds)
            np.savez(
                work / f"{name}_expected.npz",
                fp32=original.run(None, feeds)[0],
                compressed=compressed.run(None, feeds)[0],
            )
            manifest[name] = {
                "model": f"{name}_compressed.onnx",
                "inputs": f"{name}_inputs.npz",
                "expected": f"{name}_expected.npz",
                "classifier": case["classifier"],
            }
        (work / "cases.json").write_text(json.dumps(manifest))

        if not (args.venv / "bin" / "python").exists():
            venv.create(args.venv, with_pip=True)
        py = str(args.venv / "bin" / "python")
        subprocess.run(
            [py, "-m", "pip", "install", "--quiet", "--upgrade", "onnxruntime", "numpy"], check=True
        )
        out = subprocess.run([py, "-c", CHECKER, str(work)], capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:])
            return 1
        results = json.loads(out.stdout)
        print(f"plain onnxruntime {results['onnxruntime']}:")
        for name, r in results["cases"].items():
            case = cases[name]
            print(
                f"  {name}: cosine {r['cosine_vs_fp32']:.5f} vs fp32"
                + (
                    ""
                    if r["top1_vs_fp32"] is None
                    else f", top-1 agreement {r['top1_vs_fp32']:.3f}"
                )
                + f", max |diff| vs the training build {r['max_abs_vs_training_build']:.2e}"
            )
            if r["cosine_vs_fp32"] < case["min_cosine"]:
                failures.append(f"{name}: cosine {r['cosine_vs_fp32']:.4f} < {case['min_cosine']}")
            if case["min_top1"] is not None and r["top1_vs_fp32"] < case["min_top1"]:
                failures.append(
                    f"{name}: top-1 agreement {r['top1_vs_fp32']:.3f} < {case['min_top1']}"
                )
    if not args.keep:
        import shutil

        shutil.rmtree(args.venv, ignore_errors=True)
    for f in failures:
        print("FAIL:", f)
    print("serving check:", "PASS" if not failures else "FAIL")
    return 0 if not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
