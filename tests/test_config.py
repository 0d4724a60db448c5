"""Configs declare each option once: enums coerce and refuse by field, the ignored scope matches
names, op types and patterns, the command line is generated from the fields (same defaults,
same choices) and names the flag where the library names the field, and compress nests the
stage configs."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import run_cli

from onnxzip import CompressConfig, IgnoredScope, PruneConfig, QuantizeConfig, RecoverConfig
from onnxzip.cli import compress as compress_cli
from onnxzip.cli.main import build_parser
from onnxzip.config import Calibration, ConfigError, Mode, Switch
from onnxzip.data import NpzSamples, input_specs
from onnxzip.io import load_model
from onnxzip.quantize import quantize


def test_strings_become_enum_members_and_bad_values_name_the_field():
    config = QuantizeConfig(mode="dynamic", calibration="entropy", bias_correction="off")
    assert config.mode is Mode.DYNAMIC and config.calibration is Calibration.ENTROPY
    assert config.bias_correction is Switch.OFF
    assert config.mode == "dynamic" and f"{config.mode}" == "dynamic"  # compares as its value
    assert json.dumps({"m": config.mode}) == '{"m": "dynamic"}'
    with pytest.raises(ConfigError, match=r"^mode must be one of static, dynamic or weight-only"):
        QuantizeConfig(mode="int4").validate()
    with pytest.raises(ConfigError) as caught:
        QuantizeConfig(smooth_alpha=1.5).validate()
    assert caught.value.field == "smooth_alpha" and str(caught.value).startswith("smooth_alpha:")
    assert caught.value.named("--smooth-alpha").startswith("--smooth-alpha:")
    with pytest.raises(ConfigError, match="criterion must be one of"):
        PruneConfig(ratio=0.5, criterion="random").validate()
    with pytest.raises(ConfigError, match="steps must be at least 1"):
        RecoverConfig(steps=0).validate()


def test_ignored_scope_matches_names_types_and_whole_name_patterns(resnet_path, calib_npz):
    model = load_model(resnet_path)
    convs = [n for n in model.graph if n.op_type == "Conv"]
    scope = IgnoredScope(names=(convs[0].name,), types=("Gemm",), patterns=(r"s2\..*",))
    matched = {n.name for n in model.graph if scope.matches(n)}
    expected = {convs[0].name} | {n.name for n in model.graph if n.op_type == "Gemm"}
    expected |= {n.name for n in model.graph if n.name.startswith("s2.")}
    assert matched == expected and any(n.startswith("s2.") for n in matched)
    assert not IgnoredScope(patterns=("s2",)).matches_name("s2.conv1")  # whole name only
    with pytest.raises(ConfigError, match="not a regular expression"):
        IgnoredScope(patterns=("(",)).validate()
    # quantize keeps every matched weighted layer in float, saying why
    samples = NpzSamples(calib_npz, input_specs(model))
    _, report = quantize(
        model, samples, QuantizeConfig(exclude=IgnoredScope(patterns=(r"s2\..*",)), holdout=0)
    )
    kept = {k.node: k.reason for k in report.kept_float}
    s2 = {
        node.name for node in model.graph if node.name.startswith("s2.") and node.op_type == "Conv"
    }
    assert s2 and all(kept.get(name) == "excluded by the user" for name in s2)
    assert not any(k.startswith("s1.") for k in kept)


def _quantize_args(*extra):
    return build_parser().parse_args(
        ["quantize", "m.onnx", "-o", "o.onnx", "--synthetic", "4", *extra]
    )


def test_quantize_options_are_the_config_fields_with_their_defaults():
    from onnxzip.cli import quantize as quantize_cli
    from onnxzip.cli.options import config_kwargs

    names = quantize_cli.QUANTIZATION + quantize_cli.WEIGHT_ONLY
    built = QuantizeConfig(**config_kwargs(QuantizeConfig, _quantize_args(), names))
    defaults = QuantizeConfig()
    for name in names:
        assert getattr(built, name) == getattr(defaults, name), name
    declared = {f.name for f in dataclasses.fields(QuantizeConfig) if f.metadata.get("cli", True)}
    assert declared == set(names)  # every option a field declares is on the command line
    args = _quantize_args(
        "--per-tensor", "--calibration", "mse", "--exclude-pattern", "head.*", "--exclude", "Gemm"
    )
    built = QuantizeConfig(**config_kwargs(QuantizeConfig, args, names))
    assert built.per_channel is False and built.calibration is Calibration.MSE
    assert built.exclude == IgnoredScope(names=("Gemm",), types=("Gemm",), patterns=("head.*",))


def test_the_command_line_names_the_flag_of_a_bad_value(resnet_path, calib_npz, tmp_path, capsys):
    out = tmp_path / "q.onnx"
    base = ["quantize", resnet_path, "-o", out, "--data", calib_npz]
    code, _, err = run_cli([*base, "--smooth-alpha", "1.5"], capsys)
    assert code == 2 and "error: --smooth-alpha: SmoothQuant strength must be in [0, 1]" in err
    code, _, err = run_cli([*base, "--exclude-pattern", "("], capsys)
    assert code == 2 and "--exclude: pattern '(' is not a regular expression" in err
    code, _, err = run_cli([*base, "--holdout", "1"], capsys)
    assert code == 2 and "--holdout must be in [0, 1), got 1.0" in err
    assert not out.exists()


def test_compress_options_fill_each_stage_config():
    parse = build_parser().parse_args
    base = ["compress", "m.onnx", "-o", "o.onnx", "--data", "d.npz"]
    config = compress_cli.config_of(parse(base))
    assert config == CompressConfig(batch_size=32)  # the defaults are the library's
    config = compress_cli.config_of(
        parse(
            [
                *base,
                "--prune",
                "0.3",
                "--criterion",
                "l2",
                "--recover-steps",
                "0",
                "--quantize",
                "dynamic",
                "--calibration",
                "entropy",
                "--exclude",
                "fc",
                "--max-drop",
                "1",
            ]
        )
    )
    assert config.prune == PruneConfig(
        ratio=0.3, criterion="l2", exclude=IgnoredScope(("fc",), ("fc",))
    )
    assert config.recover is None and config.max_drop == 1.0
    assert config.quantize.mode is Mode.DYNAMIC and config.quantize.calibration == "entropy"
    assert config.quantize.exclude == config.prune.exclude
    config = compress_cli.config_of(parse([*base, "--no-prune", "--quantize", "none"]))
    assert config.prune is None and config.quantize is None and config.recover is not None


def test_compress_gives_the_job_fields_to_every_stage():
    config = CompressConfig(
        quantize=QuantizeConfig(holdout=0.5, batch_size=4, max_drop=9.0),
        holdout=0.3,
        batch_size=16,
        max_drop=1.0,
    )
    stage = config.stage(config.quantize)
    assert (stage.holdout, stage.batch_size, stage.max_drop) == (0.3, 16, 1.0)
    assert config.stage(config.prune).batch_size == 16
    with pytest.raises(ConfigError, match="holdout must be in"):
        CompressConfig(holdout=0).validate()
    with pytest.raises(ConfigError, match="calibration must be one of"):
        CompressConfig(quantize=QuantizeConfig(calibration="kl")).validate()
