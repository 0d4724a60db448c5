"""Structured pruning: groups, per-rule behaviour, the masking-equivalence oracle, selection."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest
from conftest import run_cli
from oracles import assert_oracle, build, masked_and_pruned, prepared, with_weights

from onnxzip import io, passes
from onnxzip.analysis import inspect_model
from onnxzip.data import Batch, SyntheticSamples, input_specs
from onnxzip.errors import InputError
from onnxzip.pruning import PruneConfig, find_groups, prune
from onnxzip.runtime import Runner
from testmodels import zoo

# -- per-rule unit tests on tiny models ------------------------------------------------------------


def groups_of(model: ir.Model) -> list:
    return find_groups(model)


@pytest.mark.parametrize("bias", [True, False])
def test_conv_chain_with_and_without_bias(bias):
    text = (
        "g (float[N,3,8,8] x) => (float[N,4,8,8] y) { c = Conv <pads=[1,1,1,1]> (x, w1"
        + (", b1" if bias else "")
        + ")\n r = Relu(c)\n y = Conv (r, w2) }"
    )
    weights = {"w1": (6, 3, 3, 3), "w2": (4, 6, 1, 1)} | ({"b1": (6,)} if bias else {})
    model = build(text, weights)
    g0 = groups_of(model)[0]
    assert not g0.blocked and g0.size == 6
    roles = sorted((m.value.name, m.axis, m.role) for m in g0.slices)
    expected = [("w1", 0, "out"), ("w2", 1, "in")] + ([("b1", 0, "out")] if bias else [])
    assert roles == sorted(expected)
    assert groups_of(model)[1].reason.startswith("channels reach the graph output")
    assert assert_oracle(model) == 1


def test_depthwise_with_channel_multiplier_updates_group():
    text = (
        "g (float[N,3,8,8] x) => (float[N,5,8,8] y) { a = Conv (x, w1)\n"
        " d = Conv <group=4, pads=[1,1,1,1]> (a, wd, bd)\n y = Conv (d, w2) }"
    )
    model = build(text, {"w1": (4, 3, 1, 1), "wd": (8, 1, 3, 3), "bd": (8,), "w2": (5, 8, 1, 1)})
    g0 = groups_of(model)[0]
    assert g0.depthwise and not g0.blocked
    wd = next(m for m in g0.slices if m.value.name == "wd")
    assert [list(p) for p in wd.positions] == [[0, 1], [2, 3], [4, 5], [6, 7]]  # multiplier 2
    masked, pruned = masked_and_pruned(model, 0, [1, 3])
    dw = next(
        n
        for n in pruned.graph
        if n.name == "" and n.op_type == "Conv" and n.attributes.get("group")
    )
    assert dw.attributes["group"].as_int() == 2 and dw.inputs[1].const_value.shape == (4, 1, 3, 3)
    assert assert_oracle(model) == 1


def test_grouped_conv_blocks_naming_the_node():
    text = "g (float[N,3,8,8] x) => (float[N,4,8,8] y) { a = Conv (x, w1)\n y = Conv <group=2> (a, w2) }"
    model = build(text, {"w1": (4, 3, 1, 1), "w2": (4, 2, 1, 1)})
    g0 = groups_of(model)[0]
    assert g0.blocked and "grouped Conv" in g0.reason


def test_residual_add_and_squeeze_excite_gate_join_one_group():
    text = (
        "g (float[N,4,8,8] x) => (float[N,3,8,8] y) { a = Conv (x, w1)\n b = Conv (a, w2)\n"
        " p = GlobalAveragePool (b)\n s = Conv (p, w3)\n s2 = Relu (s)\n e = Conv (s2, w4)\n g = Sigmoid (e)\n"
        " m = Mul (b, g)\n r = Add (m, a)\n y = Conv (r, w5) }"
    )
    model = build(
        text,
        {
            "w1": (6, 4, 1, 1),
            "w2": (6, 6, 1, 1),
            "w3": (2, 6, 1, 1),
            "w4": (6, 2, 1, 1),
            "w5": (3, 6, 1, 1),
        },
    )
    g0 = groups_of(model)[0]
    # a, b (via the residual Add), e (the SE gate) are producers of one 6-channel group.
    outs = {m.value.name for m in g0.slices if m.role == "out"}
    ins = {m.value.name for m in g0.slices if m.role == "in"}
    assert outs == {"w1", "w2", "w4"} and ins == {"w2", "w3", "w5"}
    assert assert_oracle(model) >= 2


def test_concat_offsets_and_split_sizes():
    text = (
        "g (float[N,3,8,8] x) => (float[N,4,8,8] y) { a = Conv (x, w1)\n b = Conv (x, w2)\n"
        " c = Concat <axis=1> (a, b)\n s = Constant <value=int64[2] {5, 4}> ()\n"
        " p, q = Split <axis=1> (c, s)\n u = Conv (p, w3)\n v = Conv (q, w4)\n y = Add (u, v) }"
    )
    model = build(
        text, {"w1": (4, 3, 1, 1), "w2": (5, 3, 1, 1), "w3": (4, 5, 1, 1), "w4": (4, 4, 1, 1)}
    )
    groups = groups_of(model)
    ga, gb = groups[0], groups[1]
    assert ("c", 1) in ga.spaces and [list(p) for p in ga.spaces[("c", 1)]] == [[0], [1], [2], [3]]
    assert [list(p) for p in gb.spaces[("c", 1)]] == [
        [4],
        [5],
        [6],
        [7],
        [8],
    ]  # offset by a's 4 channels
    masked, pruned = masked_and_pruned(
        model, 1, [0, 4]
    )  # b's channels 0 and 4: one in each Split part
    split = next(n for n in pruned.graph if n.op_type == "Split")
    assert list(split.inputs[1].const_value.numpy()) == [4, 3]
    assert assert_oracle(model) == 2


def test_flatten_into_gemm_maps_blocks_of_features():
    text = (
        "g (float[N,3,4,4] x) => (float[N,5] y) { a = Conv (x, w1)\n r = Relu (a)\n f = Flatten (r)\n"
        " y = Gemm <transB=1> (f, w2, b2) }"
    )
    model = build(text, {"w1": (6, 3, 1, 1), "w2": (5, 96), "b2": (5,)})
    g0 = groups_of(model)[0]
    gemm = next(m for m in g0.slices if m.value.name == "w2")
    assert gemm.axis == 1 and list(gemm.positions[2]) == list(
        range(32, 48)
    )  # channel 2 -> [2*16, 3*16)
    assert assert_oracle(model) == 1


def test_reshape_shape_constant_is_rewritten():
    text = (
        "g (float[N,3,4,4] x) => (float[N,5] y) { a = Conv (x, w1)\n s = Constant <value=int64[2] {-1, 96}> ()\n"
        " f = Reshape (a, s)\n y = MatMul (f, w2) }"
    )
    model = build(text, {"w1": (6, 3, 1, 1), "w2": (96, 5)})
    masked, pruned = masked_and_pruned(model, 0, [0, 5])
    reshape = next(n for n in pruned.graph if n.op_type == "Reshape")
    assert list(reshape.inputs[1].const_value.numpy()) == [-1, 64]
    assert assert_oracle(model) == 1


def test_per_channel_constants_prelu_and_batchnorm_are_sliced():
    text = (
        "g (float[N,3,8,8] x) => (float[N,2,8,8] y) { a = Conv (x, w1)\n b = Mul (a, k)\n c = Add (b, t)\n"
        " d = PRelu (c, slope)\n e = BatchNormalization (d, sc, bi, mu, var)\n y = Conv (e, w2) }"
    )
    model = build(
        text,
        {
            "w1": (4, 3, 1, 1),
            "k": (4, 1, 1),
            "t": (1, 4, 1, 1),
            "slope": (4, 1, 1),
            "sc": (4,),
            "bi": (4,),
            "mu": (4,),
            "var": (4,),
            "w2": (2, 4, 1, 1),
        },
    )
    init = model.graph.initializers["var"]
    init.const_value = ir.tensor(np.abs(init.const_value.numpy()) + 0.5, name="var")
    g0 = groups_of(model)[0]
    params = {(m.value.name, m.axis) for m in g0.slices if m.role == "param"}
    assert params == {("k", 0), ("t", 1), ("slope", 0), ("sc", 0), ("bi", 0), ("mu", 0), ("var", 0)}
    assert assert_oracle(model) == 1


@pytest.mark.parametrize(
    "text,weights,reason",
    [
        (
            "g (float[N,3,8,8] x) => (float[N,4,8,8] y) { a = Conv (x, w1)\n y = Relu (a) }",
            {"w1": (4, 3, 1, 1)},
            "graph output",
        ),
        (
            "g (float[N,3,8,8] x) => (float[N,1,8,8] y) { a = Conv (x, w1)\n y = ReduceMean <axes=[1]> (a) }",
            {"w1": (4, 3, 1, 1)},
            "reduces over the channel axis",
        ),
        (
            "g (float[N,3,8,8] x) => (float[N,4,8,8] y) { a = Conv (x, w1)\n b = LRN <size=3> (a)\n y = Conv (b, w2) }",
            {"w1": (4, 3, 1, 1), "w2": (4, 4, 1, 1)},
            "LRN",
        ),
        (
            "g (float[N,3,8,8] x) => (float[N,4,8,8] y) { a = Conv (x, w1)\n p = Constant <value=int64[8] {0,1,0,0,0,1,0,0}> ()\n"
            " b = Pad (a, p)\n y = Conv (b, w2) }",
            {"w1": (4, 3, 1, 1), "w2": (4, 6, 1, 1)},
            "Pad pads the channel axis",
        ),
        (
            "g (float[N,3,8,8] x) => (float[N,4,8,8] y, int64[4] s) { a = Conv (x, w1)\n s = Shape (a)\n y = Conv (a, w2) }",
            {"w1": (4, 3, 1, 1), "w2": (4, 4, 1, 1)},
            "channel count is read",
        ),
    ],
)
def test_blockers_are_named_with_a_reason(text, weights, reason):
    model = build(text, weights)
    g0 = groups_of(model)[0]
    assert g0.blocked and reason in g0.reason and g0.blocked_by


def test_unknown_op_blocks():
    text = (
        '<ir_version: 8, opset_import: ["" : 17, "custom.domain" : 1]>\n'
        "g (float[N,3,8,8] x) => (float[N,4,8,8] y) { a = Conv (x, w1)\n b = custom.domain.Foo (a)\n y = Conv (b, w2) }"
    )
    proto = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    for name, shape in {"w1": (4, 3, 1, 1), "w2": (4, 4, 1, 1)}.items():
        proto.graph.initializer.append(
            onnx.numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)
        )
    model = ir.serde.deserialize_model(proto)
    for v in [n.outputs[0] for n in model.graph]:
        v.shape = ir.Shape(["N", 4, 8, 8])
    g0 = find_groups(model)[0]
    assert g0.blocked and "no channel rule for custom.domain.Foo" in g0.reason


# -- the corpus ---------------------------------------------------------------------------------


def test_masking_equivalence_digits_models(resnet_path, mobilenet_path):
    for path in (resnet_path, mobilenet_path):
        model = prepared(io.load_model(path))
        assert assert_oracle(model, samples=4) == len(
            [g for g in find_groups(model) if not g.blocked]
        )


def test_masking_equivalence_mobilenet_v2():
    model = prepared(zoo.mobilenet_v2(resolution=64, classes=16))
    assert assert_oracle(model) == 25


@pytest.mark.parametrize(
    "name,every", [("resnet50", 5), ("squeezenet", 2), ("inception_v2", 7), ("densenet121", 15)]
)
def test_masking_equivalence_light_architectures(name, every):
    model = prepared(zoo.from_light(name))
    ids = {g.id for g in find_groups(model) if not g.blocked and g.id % every == 0}
    assert assert_oracle(model, ids, samples=1) == len(ids) > 0


@pytest.mark.parametrize(
    "name", ["resnet50", "squeezenet", "inception_v1", "inception_v2", "densenet121", "vgg19"]
)
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_light_architectures_prune_at_30_and_50_percent(name, ratio, tmp_path):
    model = zoo.from_light(name)
    pruned, report = prune(model, PruneConfig(ratio=ratio))
    io.save_model(pruned, tmp_path / "p.onnx")  # full checker
    assert report.macs_after < report.macs_before
    assert report.parameters_after < report.parameters_before
    assert any(g.kept < g.channels for g in report.groups)


def test_target_macs_and_round_to():
    model = zoo.from_light("resnet50")
    pruned, report = prune(model, PruneConfig(target_macs=0.5, round_to=8))
    assert 0.45 < report.macs_after / report.macs_before <= 0.5
    assert inspect_model(pruned).macs == report.macs_after  # the estimate is what the shapes say
    for g in report.groups:
        if g.kept < g.channels:
            assert g.kept % 8 == 0


def test_local_scope_prunes_every_group_alike(resnet_path):
    _, report = prune(resnet_path, PruneConfig(ratio=0.25, scope="local"))
    for g in report.groups:
        if not g.reason:
            assert g.kept == g.channels - g.channels // 4


def test_exclude_and_bn_criterion(resnet_path):
    _, report = prune(resnet_path, PruneConfig(ratio=0.5, criterion="bn", exclude=("s1.conv1",)))
    by_root = {tuple(g.roots): g for g in report.groups}
    excluded = [g for g in report.groups if g.note == "excluded by the user"]
    assert excluded and all(g.kept == g.channels for g in excluded)
    assert by_root[("s2.conv1",)].kept < by_root[("s2.conv1",)].channels


def test_bad_options_are_input_errors(resnet_path):
    for config in (
        PruneConfig(),
        PruneConfig(ratio=1.0),
        PruneConfig(ratio=0.3, target_macs=0.5),
        PruneConfig(ratio=0.3, criterion="magic"),
        PruneConfig(target_macs=0.0),
    ):
        with pytest.raises(InputError):
            prune(resnet_path, config)


def test_cli_prune_and_inspect_groups(resnet_path, test_npz, tmp_path, capsys):
    out = tmp_path / "p.onnx"
    code, stdout, _ = run_cli(
        [
            "prune",
            resnet_path,
            "-o",
            out,
            "--target-macs",
            "0.6",
            "--data",
            test_npz,
            "--json",
            tmp_path / "r.json",
            "--no-floors",  # pruned without recovery; the verdict is tested below
        ],
        capsys,
    )
    assert code == 0 and out.exists()
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["macs_after"] <= 0.6 * data["macs_before"] and data["parity"]["samples"] == 360
    code, stdout, _ = run_cli(["inspect", resnet_path, "--groups"], capsys)
    assert code == 0 and "blocked by fc: channels reach the graph output 'logits'" in stdout
    code, _, err = run_cli(["prune", resnet_path, "-o", out, "--ratio", "1.5"], capsys)
    assert code == 2 and err.count("\n") == 1


@pytest.mark.parametrize(
    "head",
    [
        "f = Flatten (p)\n y = Gemm <transB=1> (f, w2, b2) }",  # Gemm with a bias
        "f = Flatten (p)\n y = MatMul (f, w3) }",  # MatMul: the bias becomes an Add
        "c2 = Conv (p, w4)\n y = Flatten (c2) }",  # an unpadded Conv without bias
    ],
)
def test_dead_channels_go_for_free_with_their_constant_folded_into_the_bias(head):
    text = (
        "g (float[N,3,4,4] x) => (float[N,5] y) { a = Conv (x, w1, b1)\n r = Relu (a)\n"
        " p = GlobalAveragePool (r)\n " + head
    )
    model = build(
        text,
        {
            "w1": (6, 3, 1, 1),
            "b1": (6,),
            "w2": (5, 6),
            "b2": (5,),
            "w3": (6, 5),
            "w4": (5, 6, 1, 1),
        },
    )
    inits = model.graph.initializers
    w1, b1 = inits["w1"].const_value.numpy().copy(), inits["b1"].const_value.numpy().copy()
    w1[1], b1[1] = 0.0, 0.75  # channel 1: constant 0.75 after the ReLU
    w1[4], b1[4] = 0.0, -1.0  # channel 4: a ReLU that never fires
    inits["w1"].const_value = ir.tensor(w1, name="w1")
    inits["b1"].const_value = ir.tensor(b1, name="b1")
    samples = SyntheticSamples(input_specs(model), 16, seed=2)
    pruned, report = prune(model, PruneConfig(ratio=0.0), samples=samples)
    g0 = report.groups[0]
    assert g0.kept == 4 and g0.note == "2 dead"
    batch = next(SyntheticSamples(input_specs(model), 8, seed=7).batches(8))
    a = Runner(model, optimization="none").run(batch)["y"]
    b = Runner(pruned, optimization="none").run(batch)["y"]
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)  # lossless


def test_mean_compensation_reduces_the_error_of_pruning(resnet_path, calib_npz, test_npz):
    from onnxzip.data import NpzSamples
    from onnxzip.verify import verify

    specs = input_specs(io.load_model(resnet_path))
    plain, _ = prune(resnet_path, PruneConfig(target_macs=0.7))
    compensated, _ = prune(
        resnet_path, PruneConfig(target_macs=0.7), samples=NpzSamples(calib_npz, specs)
    )
    snr = [
        verify(resnet_path, m, NpzSamples(test_npz, specs)).outputs[0].snr_db
        for m in (plain, compensated)
    ]
    assert snr[1] > snr[0] + 1.0


def test_bert_style_encoder_heads_and_ffn_groups():
    model = prepared(zoo.bert_encoder())
    groups = find_groups(model)
    heads = [g for g in groups if g.size == 4 and not g.blocked]
    ffn = [g for g in groups if g.size == 256 and not g.blocked]
    assert len(heads) == 2 and len(ffn) == 2
    members = {m.value.name for m in heads[0].slices}
    assert {
        "layer0.q.weight",
        "layer0.k.weight",
        "layer0.v.weight",
        "layer0.attn_out.weight",
    } <= members
    hidden = [g for g in groups if g.size == 64]
    assert hidden and all("LayerNormalization" in g.reason for g in hidden)
    assert assert_oracle(model, samples=3) == 4  # heads and FFN, both layers


def test_bert_style_encoder_prunes_whole_heads_and_rewrites_reshape(tmp_path):
    model = zoo.bert_encoder()
    pruned, report = prune(model, PruneConfig(ratio=0.5, scope="local"))
    io.save_model(pruned, tmp_path / "bert.onnx")
    heads = [g for g in report.groups if g.channels == 4]
    assert all(g.kept == 2 for g in heads)
    shapes = {
        tuple(n.inputs[1].const_value.numpy()) for n in pruned.graph if n.op_type == "Reshape"
    }
    assert (0, 0, 2, 16) in shapes and (0, 0, 32) in shapes  # 2 heads of 16, merged to 32 features
    q = pruned.graph.initializers["layer0.q.weight"].const_value.shape
    assert tuple(q) == (64, 32)
    assert report.macs_after < report.macs_before


@pytest.mark.parametrize("arch", ["digits_resnet", "digits_mobilenet"])
def test_recovery_by_distillation_restores_accuracy_without_labels(arch, calib_npz, test_npz):
    """Floor of the recovery issue: at half the MACs, within 1 point of the unpruned model."""
    from onnxzip.data import NpzSamples
    from onnxzip.recover import RecoverConfig, recover
    from onnxzip.verify import verify

    path = calib_npz.parent / f"{arch}.onnx"
    model = io.load_model(path)
    specs = input_specs(model)
    calib = NpzSamples(calib_npz, specs)
    pruned, report = prune(model, PruneConfig(target_macs=0.5), samples=calib)
    assert report.macs_after <= 0.5 * report.macs_before
    before = verify(model, pruned, NpzSamples(test_npz, specs)).outputs[0]
    recovered, rec = recover(model, pruned, calib, RecoverConfig(steps=500))
    after = verify(model, recovered, NpzSamples(test_npz, specs)).outputs[0]
    assert before.candidate_accuracy < 0.5  # pruning alone wrecks these small nets
    assert after.reference_accuracy - after.candidate_accuracy <= 0.01
    assert rec.last_loss < rec.first_loss / 5 and 400 * 32 < rec.samples_seen <= 500 * 32
    assert (
        inspect_model(recovered).macs <= report.macs_after
    )  # recovery changes weights, not shapes


def test_cli_prune_says_fail_and_exits_1_when_the_pruned_model_lost_its_task(
    resnet_path, test_npz, tmp_path, capsys
):
    """Half the channels removed without recovery: the digits net no longer classifies like the
    original, and the default class-score floors say so. Nothing is written to -o (it only
    ever holds a model that passed); --keep-failed writes it under a name that says so."""
    out = tmp_path / "p.onnx"
    args = ["prune", resnet_path, "-o", out, "--ratio", "0.5", "--data", test_npz]
    code, stdout, _ = run_cli(args, capsys)
    assert code == 1 and not out.exists() and not (tmp_path / "p.failed.onnx").exists()
    assert "FAIL: logits (class scores): top-1 agreement" in stdout
    assert "\nPASS" not in stdout
    assert f"FAILED: nothing written to {out} (--keep-failed writes" in stdout
    code, stdout, _ = run_cli([*args, "--keep-failed"], capsys)
    assert code == 1 and not out.exists()
    failed = tmp_path / "p.failed.onnx"
    assert f"FAILED: wrote it as {failed} (--keep-failed)" in stdout
    assert inspect_model(failed).macs < inspect_model(resnet_path).macs  # the pruned model


def test_cli_prune_with_recovery(resnet_path, calib_npz, tmp_path, capsys):
    out = tmp_path / "r.onnx"
    code, stdout, _ = run_cli(
        [
            "prune",
            resnet_path,
            "-o",
            out,
            "--target-macs",
            "0.6",
            "--data",
            calib_npz,
            "--recover-steps",
            "200",
            "--json",
            tmp_path / "r.json",
            "--no-floors",  # 200 steps on 102 held-out samples: the floors are tested elsewhere
        ],
        capsys,
    )
    assert code == 0, stdout
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["recovery"]["steps"] == 200
    assert data["parity"]["samples"] == 102  # the 20 % of --data recovery never trained on
    assert data["parity"]["outputs"][0]["top1_agreement"] > 0.9
    code, _, err = run_cli(
        ["prune", resnet_path, "-o", out, "--ratio", "0.3", "--recover-steps", "10"], capsys
    )
    assert code == 2 and "needs --data" in err


def test_already_quantized_models_prune_codes_scales_and_zero_points(
    resnet_path, calib_npz, tmp_path
):
    from onnxzip.data import NpzSamples
    from onnxzip.quantize import QuantizeConfig, quantize

    specs = input_specs(io.load_model(resnet_path))
    quantized, _ = quantize(resnet_path, NpzSamples(calib_npz, specs), QuantizeConfig(holdout=0))
    model = prepared(quantized)
    groups = find_groups(model)
    open_groups = [g for g in groups if not g.blocked]
    assert len(open_groups) == 4  # the same four groups as the float model
    g = open_groups[0]
    kinds = {(m.value.dtype, m.role) for m in g.slices}
    assert (ir.DataType.INT8, "out") in kinds and (
        ir.DataType.INT8,
        "in",
    ) in kinds  # int8 weight codes
    assert (ir.DataType.INT32, "out") in kinds  # int32 bias codes
    scales = [m for m in g.slices if m.role == "param" and m.value.dtype == ir.DataType.FLOAT]
    assert scales  # per-channel weight scales follow the channels
    assert assert_oracle(model, samples=4) == 4
    pruned, report = prune(quantized, PruneConfig(ratio=0.3))
    io.save_model(pruned, tmp_path / "pq.onnx")
    assert report.macs_after < report.macs_before


def test_compensated_bias_is_sliced_with_its_own_pruned_outputs():
    """A consumer whose input group has a dead channel (compensated into a new bias) and whose
    own output channels are pruned in another group: the new bias must lose the same channels
    (onnxruntime 1.20+ refuses a Conv whose bias is longer than its output channels)."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.5, (4, 3, 1, 1)).astype(np.float32)
    b1 = np.zeros(4, np.float32)
    w1[0], b1[0] = -np.abs(w1[0]), -100.0  # channel 0 never fires on any input: dead
    tensors = {
        "w1": w1,
        "b1": b1,
        "w2": np.abs(rng.normal(0, 0.5, (8, 4, 1, 1))),  # its outputs all fire: none dead
        "w3": rng.normal(0, 0.5, (2, 8, 1, 1)),
    }
    proto = with_weights(
        "g (float[N,3,6,6] x) => (float[N,2,6,6] y) {"
        " a = Conv (x, w1, b1)\n r = Relu (a)\n c = Conv (r, w2)\n s = Relu (c)\n"
        " y = Conv (s, w3) }",
        tensors,
    )
    model = io.load_model(proto)
    samples = SyntheticSamples(input_specs(model), 16, seed=3)
    x = np.abs(next(samples.batches(16)).inputs["x"])
    pruned, report = prune(model, PruneConfig(ratio=0.5, compensation="off"), samples=samples)
    for node in pruned.graph:
        if node.op_type == "Conv" and len(node.inputs) > 2 and node.inputs[2] is not None:
            out_channels = node.inputs[1].const_value.shape[0]
            assert node.inputs[2].const_value.shape == (out_channels,), node.name
    assert inspect_model(pruned).parameters < inspect_model(model).parameters
    out = Runner(pruned).session.run(None, {"x": x})[0]  # loads and runs in onnxruntime
    assert out.shape == (16, 2, 6, 6) and np.all(np.isfinite(out))


def test_compensated_matmul_bias_is_sliced_with_its_own_pruned_outputs():
    """A bias-free MatMul whose inputs lose channels gets its compensation as a new Add; when
    its own outputs are pruned too (a chain of MatMul-Add-Relu blocks), that Add's bias loses
    the same channels (it kept its full length and the rewrite failed shape inference)."""
    rng = np.random.default_rng(1)
    text = "g (float[N,8] x) => (float[N,8] y) {"
    tensors = {}
    for i in range(3):
        tensors[f"w{i}"] = rng.normal(0, 0.5, (8, 8))
        tensors[f"b{i}"] = rng.normal(0, 0.1, (8,))
        src = "x" if i == 0 else f"r{i - 1}"
        text += f" m{i} = MatMul ({src}, w{i})\n a{i} = Add (m{i}, b{i})\n r{i} = Relu (a{i})\n"
    text += " y = Identity (r2) }"
    model = io.load_model(with_weights(text, tensors))
    samples = SyntheticSamples(input_specs(model), 16, seed=0)
    pruned, report = prune(model, PruneConfig(ratio=0.3), samples=samples)
    biases = [n for n in pruned.graph if n.name.endswith("_pruning_bias")]
    assert biases, "the compensation was not applied"
    for add in biases:
        width = add.inputs[0].shape[-1]
        assert add.inputs[1].const_value.shape == (width,), add.name
    assert inspect_model(pruned).parameters < inspect_model(model).parameters
    x = next(samples.batches(16)).inputs["x"]
    out = Runner(pruned).session.run(None, {"x": x})[0]
    assert out.shape == (16, 8) and np.all(np.isfinite(out))


def test_unknown_ranks_block_groups_with_a_reason_instead_of_crashing(tmp_path, capsys):
    """A contrib op neither onnx nor the op table can infer (com.microsoft.Inverse, batched
    matrix inverse) leaves its output without a rank; the Concat that reads it
    (whose own rank is then unknown too) blocks the group, naming the tensor, and the command
    writes a valid model (the rules used to raise TypeError here)."""
    rng = np.random.default_rng(0)
    shapes = {"w0": (4, 3, 1, 1), "w1": (4, 3, 1, 1), "w2": (16, 8, 1, 1)}
    proto = with_weights(
        "g (float[N,3,8,8] x) => (float[N,16,8,8] y) {"
        " a = Conv (x, w1)\n r = Relu (a)\n b = Conv (x, w0)\n g = com.microsoft.Inverse (b)\n"
        " c = Concat <axis = 1> (r, g)\n y = Conv (c, w2) }",
        {name: rng.normal(0, 0.5, shape) for name, shape in shapes.items()},
        header='<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>\n',
    )
    path = tmp_path / "contrib.onnx"
    onnx.save(proto, path)
    model = io.load_model(path)
    concat = next(n for n in model.graph if n.op_type == "Concat")
    assert concat.outputs[0].shape is None  # the Concat: rank unknown
    groups = find_groups(prepared(model))
    blocked = [g for g in groups if g.blocked]
    assert blocked and any("unknown rank" in g.reason for g in blocked), [g.reason for g in groups]
    code, out, err = run_cli(
        ["prune", path, "-o", tmp_path / "p.onnx", "--ratio", "0.5", "--synthetic", "4"], capsys
    )
    assert code == 0, err
    onnx.checker.check_model(str(tmp_path / "p.onnx"), full_check=True)
    code, out, err = run_cli(
        ["quantize", path, "-o", tmp_path / "q.onnx", "--synthetic", "8", "--holdout", "0"], capsys
    )
    assert code == 0, err


def test_missing_the_macs_target_is_reported(resnet_path):
    pruned, report = prune(resnet_path, PruneConfig(target_macs=0.01))
    assert report.target_met is False
    assert report.macs_after > 0.01 * report.macs_before
    assert "NOT MET, reached" in report.format()
    _, report = prune(resnet_path, PruneConfig(target_macs=0.5))
    assert report.target_met is True and report.macs_after <= 0.5 * report.macs_before
    _, report = prune(resnet_path, PruneConfig(ratio=0.3))
    assert report.target_met is None and "target " not in report.format()


def test_reconstruction_is_exact_when_removed_channels_are_combinations_of_kept_ones():
    """Channel 3 is 0.1 x channel 0 (through the ReLU too): removing it loses nothing a refit of
    the 3x3 consumer cannot restore, so least squares must give back the original outputs."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 1.0, (4, 3, 1, 1)).astype(np.float32)
    b1 = rng.normal(0, 0.1, 4).astype(np.float32)
    w1[3], b1[3] = 0.1 * w1[0], 0.1 * b1[0]  # smallest L1 norm: pruned first
    proto = with_weights(
        "g (float[N,3,6,6] x) => (float[N,5,6,6] y) {"
        " a = Conv (x, w1, b1)\n r = Relu (a)\n"
        " y = Conv <pads = [1, 1, 1, 1]> (r, w2, b2) }",
        {"w1": w1, "b1": b1, "w2": rng.normal(0, 0.5, (5, 4, 3, 3)), "b2": np.zeros(5)},
    )
    model = io.load_model(proto)
    samples = SyntheticSamples(input_specs(model), 64, seed=1)
    x = next(SyntheticSamples(input_specs(model), 8, seed=9).batches(8)).inputs["x"]
    reference = Runner(model).session.run(None, {"x": x})[0]
    errors = {}
    for refit in (False, True):
        pruned, report = prune(
            model, PruneConfig(ratio=0.25, reconstruct=refit, compensation="off"), samples=samples
        )
        assert pruned.graph.initializers["w1"].const_value.shape[0] == 3  # channel 3 went
        out = Runner(pruned).session.run(None, {"x": x})[0]
        errors[refit] = float(np.abs(out - reference).max() / np.abs(reference).max())
    assert errors[False] > 1e-2  # removing it does cost something
    assert errors[True] < 1e-3, errors
    (fit,) = report.reconstruction
    assert fit.op_type == "Conv" and fit.error_after < 1e-3 < fit.error_before


def test_reconstruction_recovers_the_digits_nets_without_training(resnet_path, calib_npz, test_npz):
    """Floor: at half the MACs, least squares alone (no gradients, no training engine) brings
    the ResNet-style digits net from about 25 % back above 90 % test accuracy."""
    from onnxzip.data import NpzSamples
    from onnxzip.verify import verify

    specs = input_specs(io.load_model(resnet_path))
    calib, test = NpzSamples(calib_npz, specs), NpzSamples(test_npz, specs)
    accuracy = {}
    for refit in (False, True):
        pruned, report = prune(
            resnet_path, PruneConfig(target_macs=0.5, reconstruct=refit), samples=calib
        )
        accuracy[refit] = verify(resnet_path, pruned, test).outputs[0].candidate_accuracy
    assert accuracy[False] < 0.5 and accuracy[True] > 0.9, accuracy
    assert "layers refitted by least squares" in report.format()


def test_heads_behind_a_reshape_whose_target_is_computed_at_run_time():
    """Exporters with dynamic batch and sequence axes spell the head reshape as
    Concat(Gather(Shape(x)), ..., [heads], [head size]): the heads are a group (whole heads, the
    oracle holds) and the pruned model rewrites the constant pieces, sharing nothing."""
    rng = np.random.default_rng(0)
    proto = with_weights(
        "g (float[B,S,16] x) => (float[B,S,8] y) {"
        " q = MatMul (x, wq)\n sh = Shape (x)\n b = Gather (sh, i0)\n s = Gather (sh, i1)\n"
        " shape1 = Concat <axis = 0> (b, s, heads, dh)\n h = Reshape (q, shape1)\n"
        " r = Relu (h)\n shape2 = Concat <axis = 0> (b, s, hid)\n m = Reshape (r, shape2)\n"
        " y = MatMul (m, wo) }",
        {"wq": rng.normal(0, 0.5, (16, 16)), "wo": rng.normal(0, 0.5, (16, 8))},
    )
    for name, v in {"i0": [0], "i1": [1], "heads": [4], "dh": [4], "hid": [16]}.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array(v, np.int64), name))
    model = prepared(io.load_model(proto))
    groups = find_groups(model)
    heads = [g for g in groups if not g.blocked]
    assert len(heads) == 1 and heads[0].size == 4, [(g.size, g.reason) for g in groups]
    assert assert_oracle(model) == 1
    pruned, report = prune(model, PruneConfig(ratio=0.5, scope="local"))
    assert pruned.graph.initializers["wq"].const_value.shape == (16, 8)
    x = np.random.default_rng(1).normal(size=(2, 5, 16)).astype(np.float32)
    (y,) = Runner(pruned).session.run(None, {"x": x})
    assert y.shape == (2, 5, 8)
    # The same shape pieces at any batch and sequence length: the run-time dims still work.
    (y,) = Runner(pruned).session.run(None, {"x": x[:1, :3]})
    assert y.shape == (1, 3, 8)


_STACKED_QKV = """
g (float[N, T, 16] x) => (float[N, T, 16] y) {
    m = MatMul(x, wqkv)
    a = Add(m, bqkv)
    r = Reshape(a, split)
    t = Transpose<perm = [2, 0, 3, 1, 4]>(r)
    %s
    qm = Mul(q0, scale)
    qshape = Shape(q0)
    q = Reshape(qm, qshape)
    kt = Transpose<perm = [0, 1, 3, 2]>(k)
    sc = MatMul(q, kt)
    p = Softmax<axis = -1>(sc)
    c = MatMul(p, v)
    ct = Transpose<perm = [0, 2, 1, 3]>(c)
    cr = Reshape(ct, merge)
    o = MatMul(cr, wo)
    y = Add(o, bo)
}
"""
_PICKS = {
    "slice": "qs = Slice(t, i0, i1, i0)\n q0 = Squeeze(qs, i0)\n ks = Slice(t, i1, i2, i0)\n"
    "k = Squeeze(ks, i0)\n vs = Slice(t, i2, i3, i0)\n v = Squeeze(vs, i0)",
    "gather": "q0 = Gather<axis = 0>(t, s0)\n k = Gather<axis = 0>(t, s1)\n"
    "v = Gather<axis = 0>(t, s2)",
    "split": "qs, ks, vs = Split<axis = 0>(t, ones)\n q0 = Squeeze(qs, i0)\n"
    "k = Squeeze(ks, i0)\n v = Squeeze(vs, i0)",
}


def _stacked_qkv(pick: str, scale_shape: tuple = (), summed: bool = False) -> ir.Model:
    rng = np.random.default_rng(0)
    text = _STACKED_QKV % _PICKS[pick]
    if summed:  # a second projection, split alike, added after the split
        text = text.replace(
            "r = Reshape(a, split)",
            "r1 = Reshape(a, split)\n m2 = MatMul(x, w2)\n r2 = Reshape(m2, split)\n"
            " r = Add(r1, r2)",
        )
    weights = {
        "wqkv": rng.normal(0, 0.5, (16, 48)),
        "bqkv": rng.normal(0, 0.5, 48),
        "wo": rng.normal(0, 0.5, (16, 16)),
        "bo": rng.normal(0, 0.5, 16),
        "scale": rng.uniform(0.3, 0.7, scale_shape),
    }
    if summed:
        weights["w2"] = rng.normal(0, 0.5, (16, 48))
    proto = with_weights(text, weights)
    ints = {"split": [0, -1, 3, 4, 4], "merge": [0, -1, 16], "ones": [1, 1, 1]}
    ints |= {f"i{k}": [k] for k in range(4)} | {f"s{k}": k for k in range(3)}
    for name, v in ints.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array(v, np.int64), name))
    onnx.checker.check_model(proto, full_check=True)
    model = io.load_model(proto)
    passes.PRUNING(model)
    return model


@pytest.mark.parametrize("pick", sorted(_PICKS))
def test_stacked_qkv_projection_split_as_parts_heads_and_head_size_prunes_whole_heads(pick):
    """``Reshape(qkv, [0, -1, 3, H, Dh])``, a Transpose, and q, k and v picked along the
    ``3`` axis (Slice + Squeeze as paddle2onnx writes it, Gather, Split): the heads' axis is
    ``H``, each head one channel holding its features in all three parts and its output
    projection rows; the oracle holds, and the target shrinks on ``H`` only. paddle2onnx's
    ``Reshape(q * scale, Shape(q))`` follows the heads by itself."""
    model = _stacked_qkv(pick)
    groups = find_groups(model)
    heads = [g for g in groups if not g.blocked]
    assert [g.size for g in heads] == [4], [(g.size, g.reason) for g in groups]
    (weight,) = [m for m in heads[0].slices if m.value.name == "wqkv"]
    for h, p in enumerate(weight.positions):
        want = np.concatenate([np.arange(4 * h, 4 * h + 4) + 16 * part for part in range(3)])
        np.testing.assert_array_equal(p, want)
    (rows,) = [m for m in heads[0].slices if m.value.name == "wo"]
    assert [list(p) for p in rows.positions] == [list(range(4 * h, 4 * h + 4)) for h in range(4)]
    assert assert_oracle(model, samples=3) == 1
    _, pruned = masked_and_pruned(model, heads[0].id, [1, 2])
    targets = [
        n.inputs[1].const_value.numpy().tolist()
        for n in pruned.graph
        if n.op_type == "Reshape" and n.inputs[1].const_value is not None
    ]
    assert targets == [[0, -1, 3, 2, 4], [0, -1, 8]]
    x = np.random.default_rng(1).normal(size=(2, 5, 16)).astype(np.float32)
    (y,) = Runner(pruned).session.run(None, {"x": x})
    assert y.shape == (2, 5, 16)


def test_a_projection_reached_back_through_the_split_is_cut_by_whole_heads():
    """The Add after the split reaches the second projection's Reshape from its output, on the
    heads' axis: its weight columns are cut as the same slabs (oracle)."""
    model = _stacked_qkv("slice", summed=True)
    (heads,) = [g for g in find_groups(model) if not g.blocked]
    assert heads.size == 4
    (w2,) = [m for m in heads.slices if m.value.name == "w2"]
    np.testing.assert_array_equal(w2.positions[1], [4, 5, 6, 7, 20, 21, 22, 23, 36, 37, 38, 39])
    assert assert_oracle(model, samples=2) == 1


def test_a_per_head_constant_on_the_heads_axis_is_cut_with_its_heads():
    """A per-head scale broadcast over the heads' axis ([4, 1, 1]) is cut with the heads."""
    model = _stacked_qkv("gather", (4, 1, 1))
    (heads,) = [g for g in find_groups(model) if not g.blocked]
    assert heads.size == 4 and any(m.value.name == "scale" for m in heads.slices)
    assert assert_oracle(model, samples=2) == 1


def test_an_embedding_table_read_with_run_time_token_ids_is_cut_along_its_features():
    """Gather(table, ids) added to a projection: the table's feature axis joins the group
    whatever the ids hold; the oracle holds on random ids."""
    rng = np.random.default_rng(0)
    proto = with_weights(
        "g (float[N, S, 6] x, int64[N, S] ids) => (float[N, S, 3] y) {\n"
        " h = MatMul(x, w)\n e = Gather<axis = 0>(table, ids)\n s = Add(h, e)\n"
        " r = Relu(s)\n y = MatMul(r, w2)\n}",
        {
            "w": rng.normal(0, 0.5, (6, 8)),
            "table": rng.normal(0, 0.5, (2, 8)),
            "w2": rng.normal(0, 0.5, (8, 3)),
        },
    )
    model = prepared(io.load_model(proto))
    (group,) = [g for g in find_groups(model) if not g.blocked]
    assert group.size == 8 and any(m.value.name == "table" for m in group.slices)
    assert assert_oracle(model, samples=3) == 1


@pytest.mark.parametrize(
    "body, out, reason",
    [
        ("y = Gather<axis = 1>(r, i)", "[N, 2, 4]", "Gather picks along the channel axis"),
        ("b = Reshape(h, zs)\n y = MatMul(b, w)", "[N, 8]", "shape from 'z', outside the group"),
    ],
)
def test_picks_and_borrowed_shapes_that_cannot_follow_the_channels_block(body, out, reason):
    proto = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        f"g (float[N, 8] x, float[N, 8] z, int64[2] j) => (float{out} y) <float[8, 8] w> {{\n"
        "h = MatMul(x, w)\n shape = Constant<value = int64[3] {0, 2, 4}>()\n"
        "r = Reshape(h, shape)\n i = Constant<value = int64[2] {0, 1}>()\n zs = Shape(z)\n"
        f"{body}\n}}"
    )
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((8, 8), np.float32), "w"))
    model = io.load_model(proto)
    passes.PRUNING(model)
    group = find_groups(model)[0]  # the first MatMul's
    assert group.blocked and reason in group.reason, group.reason


def test_a_split_half_concatenated_with_its_own_residual_sum_holds_both_positions():
    """YOLOv8's C2f: cv1's output split in halves, the second half through a bottleneck whose
    residual Add reads it again, and Concat(half 1, half 2, half 2 + bottleneck) into cv2. The
    second half's channels reach the Concat output twice, at disjoint positions: each channel
    holds both (cv2's input rows 4 + c and 8 + c), instead of blocking the group."""
    rng = np.random.default_rng(0)
    proto = with_weights(
        "g (float[N, 3, 8, 8] x) => (float[N, 5, 8, 8] y) {\n"
        " h = Conv(x, w1)\n a = Relu(h)\n p, q = Split<axis = 1>(a, halves)\n"
        " m = Conv(q, wm)\n mr = Relu(m)\n m2 = Conv(mr, wm2)\n r = Add(q, m2)\n"
        " c = Concat<axis = 1>(p, q, r)\n y = Conv(c, w2)\n}",
        {
            "w1": rng.normal(0, 0.5, (8, 3, 1, 1)),
            "wm": rng.normal(0, 0.5, (4, 4, 3, 3)),
            "wm2": rng.normal(0, 0.5, (4, 4, 1, 1)),
            "w2": rng.normal(0, 0.5, (5, 12, 1, 1)),
        },
    )
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array([4, 4]), "halves"))
    for node in proto.graph.node:
        if node.op_type == "Conv" and node.input[1] == "wm":
            node.attribute.extend([onnx.helper.make_attribute("pads", [1, 1, 1, 1])])
    model = prepared(io.load_model(proto))
    groups = find_groups(model)
    (cv1,) = [g for g in groups if any(m.value.name == "w1" for m in g.slices)]
    assert not cv1.blocked, cv1.reason
    rows = [m.positions for m in cv1.slices if m.value.name == "w2"]
    union = [sorted(set().union(*(r[c].tolist() for r in rows))) for c in range(8)]
    assert union == [[c] for c in range(4)] + [[4 + c, 8 + c] for c in range(4)]
    assert assert_oracle(model, samples=2) >= 2  # cv1's group and the bottleneck's


def test_tied_weights_stay_tied_and_the_model_never_grows():
    """A tied embedding (read by Gather and, transposed, by the output MatMul): folding the
    Transpose would hold the embedding twice; it stays one weight, read by both."""
    text = (
        "g (int64[N, S] ids) => (float[N, S, 100] y) { e = Gather (emb, ids)\n h = MatMul (e, w1)\n"
        " r = Relu (h)\n h2 = MatMul (r, w2)\n t = Transpose <perm = [1, 0]> (emb)\n y = MatMul (h2, t) }"
    )
    rng = np.random.default_rng(0)
    proto = with_weights(
        text,
        {
            "emb": rng.normal(0, 1, (100, 32)),
            "w1": rng.normal(0, 1, (32, 64)),
            "w2": rng.normal(0, 1, (64, 32)),
        },
    )
    model = io.load_model(proto)
    before = io.weights_nbytes(model)
    work = model.clone()
    passes.PRUNING(work)
    assert io.weights_nbytes(work) == before
    emb = work.graph.initializers["emb"]
    assert {u.node.op_type for u in emb.uses()} == {"Gather", "Transpose"}
    pruned, _ = prune(model, PruneConfig(ratio=0.5))
    assert io.weights_nbytes(pruned) <= before
    tied = [v for v in pruned.graph.initializers.values() if v.const_value.shape[0] == 100]
    assert len(tied) == 1 and len(tied[0].uses()) == 2


def test_a_shared_bias_read_through_identities_is_not_left_dangling(tmp_path):
    """The TorchScript exporter writes one zero bias read by several convolutions through
    Identity nodes. The folder forwarded the Identity of the hidden shared bias to its Conv,
    which kept reading the stand-in: every command on a TorchScript MobileNetV2 ended in exit
    3 ('outer-scope value')."""
    text = (
        "g (float[N, 3, 8, 8] x) => (float[N, 300, 8, 8] y) {\n"
        " a = Conv <pads = [1, 1, 1, 1]> (x, w1, b)\n r = Relu (a)\n b2 = Identity (b)\n"
        " b3 = Identity (b)\n c = Conv <group = 300> (r, w2, b2)\n"
        " w3 = Reshape (v3, s3)\n d = Conv <group = 300> (c, w3, b3)\n y = Add (d, r) }"
    )
    rng = np.random.default_rng(0)
    proto = with_weights(
        text,
        {
            "w1": rng.normal(0, 1, (300, 3, 3, 3)),
            "b": np.full(300, 0.1),  # 1.2 KB, read three times
            "w2": rng.normal(0, 1, (300, 1, 1, 1)),
            "v3": rng.normal(0, 1, 300),  # something else to fold: the folder runs
        },
    )
    proto.graph.initializer.append(
        onnx.numpy_helper.from_array(np.array([300, 1, 1, 1], np.int64), "s3")
    )
    model = io.load_model(proto)
    work = model.clone()
    passes.PRUNING(work)
    produced = {v.name for n in work.graph for v in n.outputs}
    read = {v.name for n in work.graph for v in n.inputs if v is not None}
    assert read <= produced | {"x"} | set(work.graph.initializers), read
    work.clone()  # raised 'outer-scope value' before
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    want = Runner(model, optimization="none").run(Batch({"x": x}))["y"]
    np.testing.assert_allclose(
        Runner(work, optimization="none").run(Batch({"x": x}))["y"], want, rtol=1e-5, atol=1e-5
    )


def test_the_rewrite_reads_ranks_from_any_shape_it_has():
    """Shape inference can leave a tensor unshaped (a TorchScript LeViT at opset 11: every
    value after a Reshape to a run-time target): the rewrite took the rank of a Split's input
    from that tensor alone and ended prune and compress in exit 3 (TypeError)."""
    from onnxzip.pruning import prepared_groups, rewrite

    text = (
        "g (float[N, 6] x) => (float[N, 3] y) {\n"
        " a = MatMul (x, w1)\n r = Relu (a)\n p, q = Split <axis = -1> (r, sizes)\n"
        " c = MatMul (p, w2)\n d = MatMul (q, w3)\n y = Add (c, d) }"
    )
    rng = np.random.default_rng(0)
    proto = with_weights(
        text,
        {
            "w1": rng.normal(0, 1, (6, 12)),
            "w2": rng.normal(0, 1, (4, 3)),
            "w3": rng.normal(0, 1, (8, 3)),
        },
    )
    proto.graph.initializer.append(
        onnx.numpy_helper.from_array(np.array([4, 8], np.int64), "sizes")
    )
    model = io.load_model(proto)
    work, groups = prepared_groups(model)
    group = next(g for g in groups if g.blocked_by is None)
    for node in work.graph:  # as inference left them: only the split outputs keep a shape
        for value in node.outputs:
            if node.op_type != "Split" and not value.is_graph_output():
                value.shape = None
    masked = model.clone()
    w1 = masked.graph.initializers["w1"].const_value.numpy().copy()
    w1[:, [1, 6]] = 0.0  # one channel of each split part, zeroed: the masking oracle
    masked.graph.initializers["w1"].const_value = ir.tensor(w1, name="w1")
    pruned = rewrite.apply(work, groups, {group.id: np.array([1, 6])})
    split = next(n for n in pruned.graph if n.op_type == "Split")
    assert list(split.inputs[1].const_value.numpy()) == [3, 7]
    x = rng.normal(size=(5, 6)).astype(np.float32)
    want = Runner(masked, optimization="none").run(Batch({"x": x}))["y"]
    got = Runner(pruned, optimization="none").run(Batch({"x": x}))["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_rewrites_of_clones_share_their_cut_weights_and_inference_copies_none(resnet_path):
    """The compensation decision rewrites two clones of one model that differ in their biases
    only: each cut weight is held once, and re-inferring shapes does not copy a weight."""
    from onnxzip.pruning import prepared_groups, rewrite

    work, groups = prepared_groups(io.load_model(resnet_path))
    plain, fresh = work.clone(), work.clone()
    removal = {g.id: np.array([0, 1]) for g in groups if not g.blocked and g.size > 4}
    assert removal
    slices: dict = {}
    first = rewrite.apply(work, groups, removal, slices=slices)
    second = rewrite.apply(plain, find_groups(plain), removal, slices=slices)
    alone = rewrite.apply(fresh, find_groups(fresh), removal)
    large = [
        name
        for name, v in first.graph.initializers.items()
        if v.const_value is not None and v.const_value.size > 1024
    ]
    assert large
    held = [a for _, a in slices.values()]
    for name in large:
        a = first.graph.initializers[name].const_value.numpy()
        b = second.graph.initializers[name].const_value.numpy()
        c = alone.graph.initializers[name].const_value.numpy()
        np.testing.assert_array_equal(a, c)
        if any(np.shares_memory(a, h) for h in held):  # a cut weight: one array for both
            assert np.shares_memory(a, b)
    assert (
        sum(
            any(np.shares_memory(first.graph.initializers[n].const_value.numpy(), h) for h in held)
            for n in large
        )
        >= 2
    )
    x = np.random.default_rng(0).normal(size=(3, 1, 8, 8)).astype(np.float32)
    outs = [Runner(m).run(Batch({"input": x})) for m in (first, second, alone)]
    for out in outs[1:]:
        for name, value in outs[0].items():
            np.testing.assert_array_equal(out[name], value)


def test_nothing_prunable_skips_the_statistics_sweep_and_the_compensation_decision(monkeypatch):
    """Every group blocked: no channel can go, so prune neither sweeps the samples for channel
    statistics nor runs the two candidates of the compensation decision; the model's bytes are
    the input's."""
    import onnxzip.pruning as pruning_mod

    model = build(
        "g (float[N,3,8,8] x) => (float[N,4,8,8] y, int64[4] s) { a = Conv (x, w1)\n"
        " s = Shape (a)\n y = Conv (a, w2) }",
        {"w1": (4, 3, 1, 1), "w2": (4, 4, 1, 1)},
    )
    assert all(g.blocked for g in find_groups(model))

    def refuse(*args, **kwargs):
        raise AssertionError("a sweep ran for a model with nothing to prune")

    monkeypatch.setattr(pruning_mod, "channel_statistics", refuse)
    monkeypatch.setattr(pruning_mod, "_output_snr", refuse)
    samples = SyntheticSamples(input_specs(model), 8)
    pruned, report = prune(model, PruneConfig(ratio=0.3), samples=samples)
    assert report.compensation is None
    assert "statistics" not in report.seconds
    assert io.model_bytes(pruned) == io.model_bytes(model)


def test_an_already_quantized_model_is_named_as_such_when_nothing_can_be_pruned():
    """A model whose layers are fused int8 kernels (MatMulInteger here; QLinearConv in an older
    ddddocr recognizer) has no float weight to prune: the reason says it is already quantized
    and what to do, instead of 'no Conv, ConvTranspose, Gemm or MatMul weights'."""
    from onnx import TensorProto, helper

    from onnxzip.pruning import unprunable_because

    w = onnx.numpy_helper.from_array(
        np.random.default_rng(0).integers(-127, 127, (4, 3)).astype(np.int8), "w"
    )
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["N", 3])],
        initializer=[w],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    reason = unprunable_because(proto)
    assert reason is not None and "already quantized (1 layer in fused" in reason
    assert "prune its float original" in reason
