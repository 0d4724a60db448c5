"""Transformers as ``torch.onnx`` exports them (both exporters): heads and GQA as pruning groups.

The fixtures under ``tests/data/exported/`` are ``scripts/export_transformers.py``'s output
(torch 2.13, transformers 5): a BERT encoder (4 heads of 8) and a Llama-style decoder (8 query
heads sharing 2 key/value heads, RMSNorm, rotary), each from the dynamo exporter (external data,
``-1`` head counts, K-transpose spelled Reshape-Transpose-Reshape) and the TorchScript exporter
(run-time ``Shape`` reads, GQA's ``expand(-1)`` guard). Every check runs the real graphs in
onnxruntime on the fixtures' token sequences.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnx.parser
import pytest
from conftest import ROOT
from oracles import masked_and_pruned

from onnxzip import io, passes
from onnxzip.data import Batch
from onnxzip.pruning import find_groups
from onnxzip.runtime import Runner

DATA = ROOT / "tests" / "data" / "exported"
EXPORTS = ["bert_dynamo", "bert_ts", "llama_dynamo", "llama_ts"]
# per layer: (channels of the attention group, positions per channel in q, k, v and o)
HEADS = {"bert": (4, 8, 8, 8, 8), "llama": (2, 32, 8, 8, 32), "gpt2": (4, 24, 24, 24, 8)}
FUSED = ["gpt2_dynamo", "gpt2_ts"]  # one Gemm projects q|k|v, split in three


def _load(name: str):
    return io.load_model(onnx.load(DATA / f"{name}.onnx"))  # external data read in


def _batch(name: str, rows=slice(-6, None)) -> Batch:
    data = np.load(DATA / f"{name.split('_')[0]}_ids.npz")
    return Batch({k: data[k][rows] for k in data.files})


def _prepared(name: str):
    model = _load(name)
    passes.PRUNING(model)
    return model


def _attention_groups(model, name: str):
    """The unblocked groups of the attention's channel count (FFN groups are 64 or 128 wide)."""
    channels = HEADS[name.split("_")[0]][0]
    return [g for g in find_groups(model.clone()) if not g.blocked and g.size == channels]


@pytest.mark.parametrize("name", EXPORTS)
def test_every_layer_has_one_attention_group_over_q_k_v_and_o(name):
    model = _prepared(name)
    groups = _attention_groups(model, name)
    channels, q, k, v, o = HEADS[name.split("_")[0]]
    assert len(groups) == 2  # one per layer
    for g in groups:
        assert g.size == channels
        outs = [m for m in g.slices if m.role == "out"]
        ins = [m for m in g.slices if m.role == "in"]
        widths = sorted(len(m.positions[0]) for m in outs)
        assert widths == sorted([q, k, v])  # query, key and value projections
        assert [len(m.positions[0]) for m in ins] == [o]  # rows of the output projection
        # every channel is whole heads: blocks of the head size (8) starting at multiples of it
        for m in outs + ins:
            for p in m.positions:
                blocks = np.sort(p).reshape(-1, 8)
                assert np.all(blocks[:, 0] % 8 == 0) and np.all(np.diff(blocks, axis=1) == 1)


@pytest.mark.parametrize("name", EXPORTS + FUSED)
def test_removing_heads_equals_masking_their_output_rows(name):
    """The masking oracle on the exported graph: zeroing the output projection's rows of some
    heads (the original graph otherwise) computes what the graph with those heads removed
    computes, in onnxruntime, on real token sequences with padding."""
    model = _prepared(name)
    batch = _batch(name)
    original = Runner(model, optimization="none").run(batch)
    checked = 0
    for g in _attention_groups(model, name):
        masked, pruned = masked_and_pruned(model, g.id, [0])
        onnx.checker.check_model(io.to_proto(pruned), full_check=True)
        a = Runner(masked, optimization="none").run(batch)
        b = Runner(pruned, optimization="none").run(batch)
        for out in a:
            assert np.abs(original[out] - a[out]).max() > 1e-4  # the mask does change it
            scale = np.abs(a[out]).max()
            assert np.abs(a[out] - b[out]).max() / scale < 2e-5, (name, g.id, out)
        assert io.weights_nbytes(pruned) < io.weights_nbytes(model)
        checked += 1
    assert checked == 2


@pytest.mark.parametrize("name", FUSED)
def test_a_fused_qkv_projection_ties_each_query_head_to_its_key_and_value_head(name):
    """GPT-2's ``c_attn`` computes q|k|v in one Gemm; its 96 output features start as 96
    channels, become heads at the head reshapes, and merge where query head h meets key head h
    (the attention scores) and value head h: one channel per head, holding features
    ``[8h, 8h + 8)`` of each of the three parts, and the output projection's rows of head h."""
    model = _prepared(name)
    groups = _attention_groups(model, name)
    assert len(groups) == 2
    for g in groups:
        (weight,) = [
            m for m in g.slices if m.role == "out" and m.value.const_value.shape.rank() == 2
        ]
        for h, p in enumerate(weight.positions):
            want = np.concatenate([np.arange(8 * h, 8 * h + 8) + 32 * part for part in range(3)])
            np.testing.assert_array_equal(p, want)
        (rows,) = [m for m in g.slices if m.role == "in"]
        assert [list(p) for p in rows.positions] == [
            list(range(8 * h, 8 * h + 8)) for h in range(4)
        ]


def test_dynamo_key_transpose_becomes_one_transpose_with_the_same_outputs():
    model = _load("bert_dynamo")
    before = Runner(model, optimization="none").run(_batch("bert_dynamo"))
    reshapes = sum(n.op_type == "Reshape" for n in model.graph)
    done = passes.PRUNING(model)
    assert done["transposes_unfolded"] == 2  # one K^T per layer
    assert sum(n.op_type == "Reshape" for n in model.graph) == reshapes - 4
    after = Runner(model, optimization="none").run(_batch("bert_dynamo"))
    np.testing.assert_allclose(after["last_hidden_state"], before["last_hidden_state"], atol=1e-6)


def test_head_counts_spelled_minus_one_are_inferred_next_to_run_time_dims():
    """onnx's inference leaves ``Reshape(x, Concat(batch, seq, [-1], [8]))`` with an unknown
    head count; onnxruntime's symbolic inference fills it (and the dims read with Shape)."""
    model = _load("bert_ts")
    shapes = {
        n.name: n.outputs[0].shape
        for n in model.graph
        if n.op_type == "Reshape" and "self" in n.name
    }
    head = shapes["/inner/encoder/layer.0/attention/self/Reshape"]
    assert [d if isinstance(d, int) else d.value for d in head] == ["batch", "sequence", 4, 8]


@pytest.mark.parametrize("name", EXPORTS + FUSED)
def test_prune_removes_heads_from_the_exported_model(tmp_path, name):
    out, report = tmp_path / "pruned.onnx", tmp_path / "r.json"
    data = DATA / f"{name.split('_')[0]}_ids.npz"
    run = subprocess.run(
        [sys.executable, "-m", "onnxzip", "prune", str(DATA / f"{name}.onnx"), "-o", str(out)]
        + ["--ratio", "0.7", "--data", str(data), "--no-floors", "--json", str(report)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    onnx.checker.check_model(str(out), full_check=True)
    channels = HEADS[name.split("_")[0]][0]
    heads = [g for g in json.loads(report.read_text())["groups"] if g["channels"] == channels]
    assert len(heads) == 2 and all(g["blocked_by"] is None for g in heads)
    assert any(g["kept"] < channels for g in heads)  # heads went, not only FFN channels
    pruned, original = io.load_model(out), _load(name)
    assert io.weights_nbytes(pruned) < 0.7 * io.weights_nbytes(original)
    got = Runner(pruned).run(_batch(name))
    assert all(np.isfinite(v).all() for v in got.values())
    written = sorted(p.name for p in tmp_path.iterdir())
    # the dynamo exports keep their weights in a data file, and so does the output
    assert len(written) == (2 if name.endswith("_ts") else 3) and written[-1] == "r.json"
    assert written[0] == "pruned.onnx" and all(w.startswith("pruned.onnx.") for w in written[1:-1])


def test_a_shape_read_of_the_channel_count_for_anything_but_a_reshape_still_blocks():
    """Reading the channel count into arithmetic on data (a mean over the features, written by
    hand) would change what the graph computes: the group blocks, naming the Shape."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 8] x) => (float[N, 4] y) <float[8, 6] w, float[6, 4] w2> {
        h = MatMul(x, w)
        s = Shape(h)
        i = Constant<value = int64 {1}>()
        c = Gather<axis = 0>(s, i)
        f = Cast<to = 1>(c)
        d = Div(h, f)
        y = MatMul(d, w2)
    }
    """
    proto = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    for name, shape in (("w", (8, 6)), ("w2", (6, 4))):
        proto.graph.initializer.append(
            onnx.numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)
        )
    model = io.load_model(proto)
    passes.PRUNING(model)
    (group,) = [g for g in find_groups(model) if g.size == 6]
    assert group.blocked and "channel count is read" in group.reason


@pytest.mark.parametrize("name", ["gpt2_dynamo", "gpt2_ts"])
def test_gemm_ffn_between_run_time_reshapes_is_a_group(name):
    """GPT-2's Conv1D projections are exported as Gemm on ``[batch * sequence, features]``
    between run-time reshapes (the TorchScript exporter reads the feature count back with
    Shape): the FFN is one group per layer, and removing its channels equals masking them."""
    model = _prepared(name)
    batch = _batch(name)
    ffn = [g for g in find_groups(model.clone()) if not g.blocked and g.size == 128]
    assert len(ffn) == 2
    for g in ffn:
        masked, pruned = masked_and_pruned(model, g.id, list(range(0, 128, 3)))
        gemms = [n for n in pruned.graph if n.op_type == "Gemm"]
        widths = sorted(int(d) for n in gemms for d in n.inputs[1].const_value.shape)
        assert widths.count(128 - 43) == 2  # c_fc's output and c_proj's input features
        a = Runner(masked, optimization="none").run(batch)
        b = Runner(pruned, optimization="none").run(batch)
        np.testing.assert_allclose(b["logits"], a["logits"], atol=2e-5 * np.abs(a["logits"]).max())


def test_outputs_keep_the_exporters_external_data_layout(tmp_path):
    """torch.onnx's dynamo exporter keeps every weight in ``model.onnx.data``: the output does
    the same (one data file named for this write), and a single-file input stays single-file."""
    for name, external in (("llama_dynamo", True), ("llama_ts", False)):
        folder = tmp_path / name
        folder.mkdir()
        out = folder / "q.onnx"
        run = subprocess.run(
            [sys.executable, "-m", "onnxzip", "quantize", str(DATA / f"{name}.onnx")]
            + ["-o", str(out), "--mode", "dynamic", "--synthetic", "8", "--no-floors"],
            capture_output=True,
            text=True,
            cwd=folder,
        )
        assert run.returncode == 0, run.stderr
        files = sorted(p.name for p in folder.iterdir())
        if external:
            assert len(files) == 2 and files[0] == "q.onnx" and files[1].startswith("q.onnx.")
            assert files[1].endswith(".data") and io.external_data_files(out)
        else:
            assert files == ["q.onnx"]
        onnx.checker.check_model(str(out), full_check=True)


def test_vision_transformer_with_merged_norm_weights_recovers_by_distillation():
    """The dynamo exporter merges equal initializers: every LayerNorm of a ViT trained from a
    fresh config reads one scale and one bias. onnxruntime-training rejected that twin
    ('Duplicate definition of name (…layernorm_before.weight_grad)') and compress fell back to
    reconstruction; now it distils, and the model keeps one shared scale."""
    from onnxzip import PruneConfig
    from onnxzip.compress import CompressConfig, compress
    from onnxzip.data import NpzSamples, input_specs

    model = _load("vit_dynamo")
    norms = [n for n in model.graph if n.op_type == "LayerNormalization"]
    assert len(norms) == 5 and len({n.inputs[1].name for n in norms}) == 1  # the layout tested
    samples = NpzSamples(DATA / "vit_pixels.npz", input_specs(model))
    small, report = compress(  # no quantization: SmoothQuant may give each norm its own scale
        model, samples, CompressConfig(prune=PruneConfig(ratio=0.5), quantize=None, latency=False)
    )
    # distillation ran (kept, or measured against reconstruction on the held-out rows)
    assert not report.recovery_skipped, report.recovery_skipped
    assert report.recovery is not None or "with it" in report.recovery_not_kept
    assert report.after["parameters"] < report.before["parameters"]
    norms = [n for n in small.graph if n.op_type == "LayerNormalization"]
    assert len({n.inputs[1].name for n in norms}) == 1
