"""The results table: onnxzip against the tools users would pick instead, side by side in one run.

Models: the two digits CNNs (real data, test accuracy), the real all-MiniLM-L6-v2 sentence encoder
(``scripts/export_minilm.py``; embedding cosine and nearest-neighbour agreement on the 240
committed sentences), ResNet-50 (onnx's light architecture, random weights) and the
MobileNetV2-style net of ``testmodels.zoo`` (latency; parity on smooth random images).

Rows per model:

* ``fp32``: the original;
* ``quantize_static``: onnxruntime's ``quant_pre_process`` + ``quantize_static`` (QDQ,
  per-channel, QUInt8 activations, QInt8 weights, MinMax) on the same calibration samples;
* ``quantize_dynamic`` (MiniLM only): onnxruntime's ``quantize_dynamic`` (QInt8 weights), what
  its documentation recommends for transformers;
* ``onnxzip int8``: ``python -m onnxzip quantize`` (the same job: MinMax, every sample
  calibrating; MiniLM: ``--mode dynamic``), and for MiniLM also with the accuracy guard
  (``--min-cosine 0.9993``: layers stay float until the held-out cosine holds);
* ``onnxzip prune + int8``: ``python -m onnxzip compress``: digits ``--target-macs 0.5`` with
  recovery by distillation (500 steps, no labels); ResNet-50 and MobileNetV2 ``--target-macs 0.5``
  without recovery (random weights, no data worth training on); MiniLM ``--prune 0.1
  --criterion fisher --quantize dynamic`` with 300 recovery steps.

Columns: file size, MACs (per sample; per token for MiniLM), latency (onnxruntime CPU, 2
threads, batch 1, median of interleaved rounds), quality, tool wall time and peak memory (fresh
process per tool). MiniLM also gets a pruning trade-off curve (fp32, recovery on). Writes
``results/bench.json``, ``results/bench.png`` (quality against latency) and prints Markdown.

Usage: ``python scripts/bench.py [--models ...]`` (run ``scripts/export_minilm.py`` first).
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
    ORT_STATIC_WORKER,
    image_model,
    latency,
    run_measured,
    run_record,
    sentence_embeddings,
    sentence_metrics,
)

from onnxzip import io  # noqa: E402
from onnxzip.analysis import inspect_model  # noqa: E402
from onnxzip.data import NpzSamples, input_specs  # noqa: E402
from onnxzip.verify import verify  # noqa: E402

MINILM = ROOT / ".cache" / "minilm" / "minilm.onnx"
SENTENCES = ROOT / "models" / "minilm_sentences.npz"
TRADE_OFF = (0.05, 0.1, 0.2, 0.3)

ORT_DYNAMIC = r"""
import sys
from onnxruntime.quantization import QuantType, quantize_dynamic
quantize_dynamic(sys.argv[1], sys.argv[2], weight_type=QuantType.QInt8)
"""


def onnxzip_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "onnxzip", *map(str, args), "--quiet"]


def compress_cmd(path, out, calib, *options, report="{report}") -> list[str]:
    """``onnxzip compress`` writing ``out`` and its JSON report, latency left to the benchmark."""
    return onnxzip_cmd(
        "compress", path, "-o", out, "--data", calib, *options, "--no-latency", "--json", report
    )


# MiniLM pruning: a fixed fraction of every FFN/head group, Fisher criterion, 300 recovery steps.
MINILM_PRUNE = ("--criterion", "fisher", "--recover-steps", "300")


def prepare(work: Path, name: str) -> dict:
    """Paths, data and the command of every row for one model; the fp32 reference is loaded
    (or, for MiniLM, embedded) once here and reused by every row's quality measurement."""
    if name.startswith("digits"):
        m = {
            "path": ROOT / "models" / f"{name}.onnx",
            "calib": ROOT / "models" / "digits_calib.npz",
            "val": ROOT / "models" / "digits_test.npz",
            "batch": 32,
            "kind": "accuracy",
        }
    elif name == "minilm":
        if not MINILM.exists():
            raise SystemExit(f"{MINILM} is missing: run scripts/export_minilm.py first")
        m = {"path": MINILM, "calib": SENTENCES, "val": SENTENCES, "batch": 32}
        m["kind"] = "sentences"
    else:
        m = {**image_model(work, name), "kind": "parity"}
    path, calib, batch = m["path"], m["calib"], m["batch"]
    if m["kind"] == "sentences":
        m["reference"] = sentence_embeddings(path, m["val"])
    else:
        m["reference"] = io.load_model(path)
        m["samples"] = NpzSamples(m["val"], input_specs(m["reference"]))
    rows = {
        "quantize_static": [
            sys.executable,
            "-c",
            ORT_STATIC_WORKER,
            path,
            "{out}",
            calib,
            "MinMax",
            batch,
            tempfile.mkdtemp(dir=work),
        ],
    }
    if name == "minilm":
        rows["quantize_dynamic"] = [sys.executable, "-c", ORT_DYNAMIC, path, "{out}"]
        dynamic = ["quantize", path, "-o", "{out}", "--data", calib, "--mode", "dynamic"]
        rows["onnxzip int8"] = onnxzip_cmd(*dynamic)
        rows["onnxzip int8, guarded"] = onnxzip_cmd(*dynamic, "--min-cosine", "0.9993")
        # static int8 with the transformer preset (chosen by the graph) and SmoothQuant
        rows["onnxzip static int8"] = onnxzip_cmd("quantize", path, "-o", "{out}", "--data", calib)
        rows["onnxzip prune + int8"] = compress_cmd(
            path, "{out}", calib, "--prune", "0.1", *MINILM_PRUNE, "--quantize", "dynamic"
        )
    else:
        rows["onnxzip int8"] = onnxzip_cmd(
            "quantize",
            path,
            "-o",
            "{out}",
            "--data",
            calib,
            "--holdout",
            "0",
            "--batch-size",
            batch,
        )
        steps = "500" if name.startswith("digits") else "0"
        rows["onnxzip prune + int8"] = compress_cmd(
            path,
            "{out}",
            calib,
            "--target-macs",
            "0.5",
            "--recover-steps",
            steps,
            "--batch-size",
            batch,
        )
    m["rows"] = rows
    return m


def row_output(work: Path, name: str, row: str) -> Path:
    return work / f"{name}_{row.replace(' ', '_').replace(',', '').replace('+', 'and')}.onnx"


def command(cmd: list, out: Path) -> list[str]:
    """The row's command with its output model and report paths filled in."""
    fill = {"{out}": str(out), "{report}": str(out.with_suffix(".json"))}
    return [fill.get(str(c), str(c)) for c in cmd]


def quality(m: dict, candidate: Path) -> dict:
    if m["kind"] == "sentences":
        return sentence_metrics(m["reference"], sentence_embeddings(candidate, m["val"]))
    report = verify(m["reference"], candidate, m["samples"], batch_size=m["batch"])
    o = report.outputs[0]
    result = {"cosine_mean": o.cosine_mean, "snr_db": o.snr_db}
    if o.candidate_accuracy is not None:
        result["accuracy"] = o.candidate_accuracy
    return result


def feed_for(m: dict) -> dict[str, np.ndarray]:
    with np.load(m["val"]) as archive:
        if m["kind"] == "sentences":  # one typical sentence, unpadded
            n = int(archive["attention_mask"][0].sum())
            return {k: archive[k][:1, :n] for k in ("input_ids", "attention_mask")}
        return {k: archive[k][:1] for k in archive.files if k != "labels"}


def trade_off(m: dict, work: Path) -> list[dict]:
    """MiniLM: pruning amount against embedding quality and latency (fp32, with recovery)."""
    points, paths = [], {"fp32": m["path"]}
    for ratio in TRADE_OFF:
        out = work / f"minilm_prune_{ratio}.onnx"
        report = work / f"minilm_prune_{ratio}.json"
        cmd = compress_cmd(
            m["path"],
            out,
            m["calib"],
            "--prune",
            ratio,
            *MINILM_PRUNE,
            "--quantize",
            "none",
            report=report,
        )
        run = run_measured([str(c) for c in cmd], cwd=work)
        if "error" in run:
            points.append({"ratio": ratio, "error": run["error"]})
            continue
        # MACs per token, as the table counts them (compress's report counts at the samples'
        # sequence length)
        points.append({"ratio": ratio, "macs": inspect_model(out).macs, **quality(m, out)})
        paths[str(ratio)] = out
    lat = latency(paths, feed_for(m))
    for p in points:
        if "error" not in p:
            p["latency_ms"] = lat[str(p["ratio"])]["median_ms"]
    return points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=["digits_resnet", "digits_mobilenet", "minilm", "resnet50", "mobilenet_v2"],
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench.json")
    parser.add_argument("--no-trade-off", action="store_true")
    args = parser.parse_args(argv)
    ort.set_default_logger_severity(3)
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    results = run_record()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models:
            print(f"== {name}", flush=True)
            m = prepare(work, name)
            fp32_macs = inspect_model(m["path"]).macs
            rows = {
                "fp32": {
                    "bytes": io.file_size(m["path"]),
                    "macs": fp32_macs,
                    **quality(m, m["path"]),
                }
            }
            paths = {"fp32": m["path"]}
            for row, cmd in m["rows"].items():
                out = row_output(work, name, row)
                run = run_measured(command(cmd, out), cwd=work)
                if "error" in run or not out.exists():
                    rows[row] = {"error": run.get("error", "no output"), "seconds": run["seconds"]}
                    print(f"  {row:<24}FAILED: {rows[row]['error']}", flush=True)
                    continue
                macs = fp32_macs
                if row == "onnxzip prune + int8":
                    macs = inspect_model(out).macs  # after pruning, counted as for fp32
                rows[row] = {
                    "bytes": io.file_size(out),
                    "macs": macs,
                    "seconds": run["seconds"],
                    "peak_mib": run["peak_mib"],
                    **quality(m, out),
                }
                paths[row] = out
                print(f"  {row:<24}{json.dumps(rows[row])}", flush=True)
            for row, lat in latency(paths, feed_for(m)).items():
                rows[row]["latency_ms"] = lat["median_ms"]
            entry = {"rows": rows}
            if name == "minilm" and not args.no_trade_off:
                entry["trade_off"] = trade_off(m, work)
            elif name in previous.get("models", {}) and "trade_off" in previous["models"][name]:
                entry["trade_off"] = previous["models"][name]["trade_off"]  # from an earlier run
            results["models"][name] = entry
            for row, r in rows.items():
                print(f"  {row:<24}latency {r.get('latency_ms', float('nan')):.3f} ms", flush=True)
    # Models not run this time keep their previous results (and say when they were measured).
    for name, entry in previous.get("models", {}).items():
        if name not in results["models"]:
            results["models"][name] = {**entry, "date": entry.get("date", previous.get("date"))}
    for entry in results["models"].values():
        entry.setdefault("date", results["date"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(markdown(results))
    return 0


def _quality_text(r: dict) -> str:
    if "error" in r:
        return "failed: " + r["error"][:60]
    if "neighbour_agreement" in r:
        return f"cos {r['cosine_mean']:.4f}, NN {100 * r['neighbour_agreement']:.1f} %"
    if "accuracy" in r:
        return f"acc {100 * r['accuracy']:.2f} %"
    return f"cos {r['cosine_mean']:.4f}, SNR {r['snr_db']:.1f} dB"


ORDER = ("digits_resnet", "digits_mobilenet", "minilm", "resnet50", "mobilenet_v2")


def _ordered(models: dict) -> list[tuple[str, dict]]:
    return sorted(models.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else 99)


def _num(value, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown(results: dict) -> str:
    lines = [
        "| model | row | size MB | MACs | latency ms | quality | tool s | peak MiB |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for name, entry in _ordered(results["models"]):
        for row, r in entry["rows"].items():
            macs = r.get("macs")
            lines.append(
                f"| {name} | {row} | {r.get('bytes', 0) / 1e6:.2f} | "
                f"{'' if macs is None else f'{macs / 1e6:.1f} M'} | "
                f"{_num(r.get('latency_ms'), 3)} | {_quality_text(r)} | "
                f"{_num(r.get('seconds'), 1)} | {_num(r.get('peak_mib'), 0)} |"
            )
    for name, entry in results["models"].items():
        if entry.get("trade_off"):
            lines += [
                "",
                f"{name} pruning trade-off (fp32, recovery 300 steps):",
                "",
                "| pruned | MACs per token | latency ms | cosine | NN agreement |",
                "| ---: | ---: | ---: | ---: | ---: |",
            ]
            for p in entry["trade_off"]:
                if "error" in p:
                    lines.append(f"| {p['ratio']} | failed: {p['error'][:60]} | | | |")
                    continue
                lines.append(
                    f"| {p['ratio']} | {p['macs'] / 1e6:.2f} M | {p['latency_ms']:.3f} | "
                    f"{p['cosine_mean']:.4f} | {100 * p['neighbour_agreement']:.1f} % |"
                )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (dev extra): no plot", flush=True)
        return
    models = dict(_ordered(results["models"]))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.8), squeeze=False)
    for ax, (name, entry) in zip(axes[0], models.items(), strict=True):
        for row, r in entry["rows"].items():
            if "latency_ms" not in r or "error" in r:
                continue
            y = 100 * r["accuracy"] if "accuracy" in r else r["cosine_mean"]
            ax.scatter(r["latency_ms"], y, label=row)
        for p in entry.get("trade_off", []):
            if "latency_ms" in p:
                ax.scatter(p["latency_ms"], p["cosine_mean"], marker="x", color="gray")
        ax.set_title(name)
        ax.set_xlabel("latency ms (batch 1, 2 threads)")
        ax.set_ylabel("test accuracy %" if name.startswith("digits") else "cosine to fp32")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
