"""Serving check: compressed models in the runtimes users serve with, and in onnx's reference.

onnxzip runs on the user's (newest) onnxruntime and writes models at the input's opset; with
``--target-opset`` it writes them for older runtimes. This script

1. compresses the shipped digits models (``compress``: prune, recover, int8) and quantizes a
   BERT-style encoder (converted to opset 23 first, as today's exporters write it) and, when
   ``scripts/export_minilm.py`` has exported it, the real all-MiniLM-L6-v2 dynamically, each
   twice: at its own opset and with ``target_opset=21``;
2. checks each compressed model with ``onnx.reference.ReferenceEvaluator`` (an independent
   implementation of the ONNX operators) against onnxruntime on a few samples;
3. runs the default-opset models in this environment's onnxruntime against the fp32 model, and
   the ``target_opset=21`` models in onnxruntime 1.19.2 (the inference part of the training
   engine's interpreter, a runtime of 2024) against the fp32 outputs computed here.

Exit code 0 when every check holds, 1 otherwise. Usage:
    python scripts/serving_check.py [--training-python PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxzip  # noqa: E402
from onnxzip import engine, io  # noqa: E402
from onnxzip.data import Batch, SyntheticSamples  # noqa: E402
from onnxzip.runtime import Runner  # noqa: E402
from testmodels import zoo  # noqa: E402

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
    results["cases"][name] = {"cosine_vs_fp32": cos, "top1_vs_fp32": top1, "max_abs_vs_newest": same}
print(json.dumps(results))
"""


# Largest relative difference allowed between onnx's ReferenceEvaluator and onnxruntime. Static
# QDQ models compute the same integers in both. Dynamically quantized ones may differ more: each
# implementation derives its own run-time scales (4.7 % was once seen on MiniLM), so they get a
# wider bound, and every case must also keep a cosine of at least REFERENCE_COSINE.
STATIC_GAP, DYNAMIC_GAP, REFERENCE_COSINE = 0.05, 0.1, 0.999


def compressed_models(work: Path) -> dict[str, dict]:
    """Each case at its own opset (``compressed``) and for older runtimes (``compressed_21``)."""
    cases = {}
    for arch in ("digits_resnet", "digits_mobilenet"):
        path = ROOT / "models" / f"{arch}.onnx"
        model = onnxzip.load_model(path)
        specs = onnxzip.input_specs(model)
        calib = onnxzip.open_samples(specs, ROOT / "models" / "digits_calib.npz")
        variants = {}
        for key, opset in (("compressed", None), ("compressed_21", 21)):
            config = onnxzip.CompressConfig(latency=False, target_opset=opset)
            variants[key], _ = onnxzip.compress(model, calib, config)
        x = np.load(ROOT / "models" / "digits_test.npz")["input"][:64]
        cases[arch] = {
            "original": model,
            **variants,
            "inputs": {"input": x},
            "classifier": True,
            "min_cosine": 0.9,
            "min_top1": 0.95,
            "reference_gap": STATIC_GAP,
        }
    bert = io.convert_opset(zoo.bert_encoder(), 23)
    specs = onnxzip.input_specs(bert)
    samples = SyntheticSamples(specs, 16, seed=0)
    variants = {
        key: onnxzip.quantize(
            bert, samples, onnxzip.QuantizeConfig(mode="dynamic", holdout=0, target_opset=opset)
        )[0]
        for key, opset in (("compressed", None), ("compressed_21", 21))
    }
    rng = np.random.default_rng(1)
    inputs = {
        "input_ids": rng.integers(0, 1000, (8, 24)).astype(np.int64),
        "attention_mask": np.ones((8, 24), np.int64),
    }
    cases["bert_encoder_opset23"] = {
        "original": bert,
        **variants,
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
        variants = {
            key: onnxzip.quantize(
                model, calib, onnxzip.QuantizeConfig(mode="dynamic", target_opset=opset)
            )[0]
            for key, opset in (("compressed", None), ("compressed_21", 21))
        }
        with np.load(sentences) as archive:
            inputs = {k: archive[k][:8] for k in ("input_ids", "attention_mask")}
        cases["minilm"] = {
            "original": model,
            **variants,
            "inputs": inputs,
            "classifier": False,
            "min_cosine": 0.99,
            "min_top1": None,
            "reference_gap": DYNAMIC_GAP,
        }
    else:
        print(f"{minilm} not found (scripts/export_minilm.py makes it): MiniLM not checked")
    for name, case in cases.items():
        for key in ("compressed", "compressed_21"):
            onnxzip.save_model(case[key], work / f"{name}_{key}.onnx")
    return cases


def _vs_fp32(out: np.ndarray, ref: np.ndarray, classifier: bool) -> tuple[float, float | None]:
    out = out.astype(np.float64).reshape(len(out), -1)
    ref = ref.astype(np.float64).reshape(out.shape)
    cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1) + 1e-30)
    top1 = float(np.mean(out.argmax(1) == ref.argmax(1))) if classifier else None
    return float(np.mean(cos)), top1


def reference_check(case: dict) -> tuple[float, float]:
    """Largest relative difference and cosine between onnx's ReferenceEvaluator and onnxruntime.

    Dynamically quantized models differ a little more: each implementation derives its own
    run-time scales (DynamicQuantizeLinear), and six transformer layers carry the rounding on.
    """
    from onnx.reference import ReferenceEvaluator

    # onnx's reference implements QuantizeLinear/DequantizeLinear from opset 19 on; the
    # operators' meaning for these types did not change since 13, so older models run at opset 21.
    model = case["compressed"]
    if model.opset_imports.get("") < 21:
        model = io.convert_opset(model, 21)
    proto = io.to_proto(model)
    evaluator = ReferenceEvaluator(proto)
    feeds = {k: v[:4] for k, v in case["inputs"].items()}
    ref = evaluator.run(None, feeds)[0]
    runner = Runner(case["compressed"], optimization="none")
    ort_out = runner.run(Batch(feeds))[runner.output_names[0]]
    a, b = ref.astype(np.float64).ravel(), ort_out.astype(np.float64).ravel()
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12)), cosine


def _judge(name: str, case: dict, cosine: float, top1, failures: list[str], where: str) -> None:
    if cosine < case["min_cosine"]:
        failures.append(f"{name} ({where}): cosine {cosine:.4f} < {case['min_cosine']}")
    if case["min_top1"] is not None and top1 < case["min_top1"]:
        failures.append(f"{name} ({where}): top-1 agreement {top1:.3f} < {case['min_top1']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--training-python", help="interpreter with onnxruntime-training 1.19.2 (the old runtime)"
    )
    args = parser.parse_args(argv)
    engine.configure(args.training_python)
    import onnxruntime

    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases = compressed_models(work)
        manifest = {}
        print(f"onnxruntime {onnxruntime.__version__} (this environment):")
        for name, case in cases.items():
            opsets = {k: case[k].opset_imports.get("") for k in ("compressed", "compressed_21")}
            gap, cosine = reference_check(case)
            print(
                f"  {name} (opset {opsets['compressed']}): ReferenceEvaluator vs onnxruntime, "
                f"max relative difference {gap:.2e}, cosine {cosine:.6f}"
            )
            if gap > case["reference_gap"] or cosine < REFERENCE_COSINE:
                failures.append(
                    f"{name}: ReferenceEvaluator differs from onnxruntime by {gap:.3f} "
                    f"(cosine {cosine:.5f})"
                )
            if opsets["compressed_21"] != 21:
                failures.append(f"{name}: target_opset=21 wrote opset {opsets['compressed_21']}")
            feeds = case["inputs"]
            fp32 = Runner(case["original"]).session.run(None, feeds)[0]
            newest = Runner(case["compressed"]).session.run(None, feeds)[0]
            newest_21 = Runner(case["compressed_21"]).session.run(None, feeds)[0]
            cos, top1 = _vs_fp32(newest, fp32, case["classifier"])
            print(
                f"  {name}: cosine {cos:.5f} vs fp32"
                + ("" if top1 is None else f", top-1 agreement {top1:.3f}")
            )
            _judge(name, case, cos, top1, failures, f"onnxruntime {onnxruntime.__version__}")
            np.savez(work / f"{name}_inputs.npz", **feeds)
            np.savez(work / f"{name}_expected.npz", fp32=fp32, compressed=newest_21)
            manifest[name] = {
                "model": f"{name}_compressed_21.onnx",
                "inputs": f"{name}_inputs.npz",
                "expected": f"{name}_expected.npz",
                "classifier": case["classifier"],
            }
        (work / "cases.json").write_text(json.dumps(manifest))

        old = engine.current().python
        out = subprocess.run(
            [str(old), "-I", "-c", CHECKER, str(work)], capture_output=True, text=True
        )
        if out.returncode != 0:
            print(out.stderr[-3000:])
            return 1
        results = json.loads(out.stdout)
        print(f"onnxruntime {results['onnxruntime']} (an older runtime), models at opset 21:")
        for name, r in results["cases"].items():
            case = cases[name]
            print(
                f"  {name}: cosine {r['cosine_vs_fp32']:.5f} vs fp32"
                + (
                    ""
                    if r["top1_vs_fp32"] is None
                    else f", top-1 agreement {r['top1_vs_fp32']:.3f}"
                )
                + f", max |diff| vs the same model in the newest runtime "
                f"{r['max_abs_vs_newest']:.2e}"
            )
            _judge(
                name,
                case,
                r["cosine_vs_fp32"],
                r["top1_vs_fp32"],
                failures,
                f"onnxruntime {results['onnxruntime']}",
            )
    for f in failures:
        print("FAIL:", f)
    print("serving check:", "PASS" if not failures else "FAIL")
    return 0 if not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
