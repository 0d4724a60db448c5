"""``QuantizeConfig``: the options of ``quantize``, each declared once (type, default, choices,
help), from which ``onnxzip quantize``'s option groups are generated."""

from __future__ import annotations

from dataclasses import dataclass

from onnxzip.config import (
    ActivationType,
    Calibration,
    ConfigError,
    IgnoredScope,
    Mode,
    Preset,
    Switch,
    WeightFormat,
    WeightMethod,
    check,
    coerce,
    one_of,
    option,
)
from onnxzip.quantize.calibrate import DEFAULT_BINS
from onnxzip.quantize.weight_only import BLOCK_SIZES


@dataclass
class QuantizeConfig:
    """Options of ``quantize``; the defaults are what ``onnxzip quantize`` does with no flags."""

    mode: Mode = option(
        Mode.STATIC,
        "static: calibrated QDQ; dynamic: int8 MatMul/Gemm weights, activations quantized at "
        "run time (transformers); weight-only: block-wise int4/int8 MatMul weights, float "
        "activations (decoders, served as MatMulNBits)",
    )
    calibration: Calibration = option(Calibration.MINMAX, "how activation ranges are chosen")
    percentile: float = option(99.99, "for calibration percentile", metavar="P")
    bins: int = option(DEFAULT_BINS, "histogram bins per sign", metavar="B")
    per_channel: bool = option(
        True,
        "one weight scale per output channel",
        negate="--per-tensor",
        negate_help="one weight scale per tensor instead of per channel",
    )
    activation_type: ActivationType = option(ActivationType.UINT8, "activation codes")
    symmetric_activations: bool = option(False, "zero-point 0 (int8) or 128 (uint8)")
    exclude: IgnoredScope = option(
        IgnoredScope(),
        "node names or op types to keep in float",
        metavar="NAME_OR_OP",
        patterns_flag="--exclude-pattern",
        patterns_help="keep in float every node whose whole name matches this regular expression",
    )
    quantize_softmax: bool = option(False, "also quantize Softmax")
    batch_size: int = option(32, cli=False)
    # fraction of the samples kept for verification; 0 calibrates on all
    holdout: float = option(0.2, cli=False)
    weight_bits: int = option(4, "weight-only: bits per weight", choices=(4, 8))
    block_size: int = option(32, "weight-only: rows of the weight per scale", choices=BLOCK_SIZES)
    weight_zero_point: bool = option(
        False, "weight-only: asymmetric blocks, a zero point each (default symmetric)"
    )
    weight_format: WeightFormat = option(
        WeightFormat.AUTO,
        "weight-only: qdq: DequantizeLinear with block_size (standard ONNX, opset 21+; "
        "onnxruntime fuses it into MatMulNBits); nbits: com.microsoft MatMulNBits directly; "
        "auto: qdq at opset 21+, else nbits",
    )
    weight_method: WeightMethod = option(
        WeightMethod.MSE,
        "weight-only: rtn: round to nearest; mse: each block's range clipped to minimise the "
        "output error weighted by the inputs' E[x^2] on the samples; gptq: GPTQ, each row's "
        "rounding error compensated by the rows not yet quantized, through the inputs' E[x x^T] "
        "(memory: K^2 x 8 bytes per distinct MatMul input)",
    )
    accuracy_level: int = option(
        4,
        "weight-only nbits: MatMulNBits compute: 4 int8 inside the kernel, as onnxruntime "
        "picks for the fused qdq form; 0 float",
        choices=(0, 1, 2, 3, 4),
    )
    # accuracy guard: top-1 points (against labels, else agreement)
    max_drop: float | None = option(
        None,
        "accuracy guard: keep the most harmful layers in float until top-1 drops by at most X "
        "points (against labels, else agreement with the original); --min-cosine works as a "
        "guard target too",
        metavar="X",
    )
    min_cosine: float | None = option(None, cli=False)  # accuracy guard: mean output cosine
    guard_samples: int = option(512, cli=False)  # held-out samples the guard scores on
    # when the result breaks the default floors (and no explicit guard target is set), keep the
    # layers that break them in float until the floors hold (onnxzip.floors)
    floor_guard: bool = option(
        True,
        "keep the layers that break a default floor in float",
        negate="--no-floor-guard",
        negate_help="when the result breaks a default floor, write it anyway (exit 1) instead "
        "of keeping the layers that break it in float",
    )
    bias_correction: Switch = option(
        Switch.AUTO,
        "empirical per-channel bias correction from the calibration samples; auto keeps it "
        "when the held-out output SNR improves",
    )
    # on: weight scales keep onnxruntime's 16-bit pair sums on x86 CPUs without VNNI from
    # saturating (params.weight_params); auto: on when this machine is such a CPU; off
    reduce_range: Switch = option(
        Switch.AUTO,
        "on: weight scales chosen so that onnxruntime's 16-bit sums of two products on x86 "
        "CPUs without VNNI cannot saturate (costs at most one bit); auto: on when this machine "
        "is such a CPU; use on when the serving machines may be",
    )
    # write this default-domain opset (for runtimes older than the installed onnxruntime);
    # None keeps the model's own
    target_opset: int | None = option(None, cli=False)
    preset: Preset = option(
        Preset.AUTO,
        "static int8 layout: transformer quantizes only MatMul/Gemm weights and their inputs "
        "(outputs, attention, softmax and normalisation stay float) with SmoothQuant; default "
        "every op with an int8 kernel; auto picks transformer for graphs with softmax "
        "attention, a normalisation and more weight MatMuls than convolutions",
    )
    smooth_quant: Switch = option(
        Switch.AUTO,
        "SmoothQuant: per-channel factors move activation outliers into the MatMul weights "
        "(exact in float); auto: on in the transformer preset",
    )
    smooth_alpha: float | None = option(
        None,
        "SmoothQuant strength in [0, 1] (default: searched per MatMul input from the quantized "
        "product's error on the calibration samples)",
        metavar="A",
    )

    def __post_init__(self) -> None:
        coerce(self)

    @property
    def guarded(self) -> bool:
        return self.max_drop is not None or self.min_cosine is not None

    def validate(self) -> None:
        check(self)
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ConfigError(
                "accuracy_level", f"{{name}} must be 0 to 4, got {self.accuracy_level}"
            )
        if self.weight_bits not in (4, 8):
            raise ConfigError("weight_bits", f"{{name}} must be 4 or 8, got {self.weight_bits}")
        if self.block_size not in BLOCK_SIZES:
            raise ConfigError(
                "block_size", f"{{name}} must be {one_of(BLOCK_SIZES)}, got {self.block_size}"
            )
        if not 0 < self.percentile <= 100:
            raise ConfigError("percentile", f"{{name}} must be in (0, 100], got {self.percentile}")
        if not 0 <= self.holdout < 1:
            raise ConfigError("holdout", f"{{name}} must be in [0, 1), got {self.holdout}")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"{{name}} must be at least 1, got {self.batch_size}")
        if self.max_drop is not None and self.max_drop < 0:
            raise ConfigError("max_drop", f"{{name}} must be at least 0, got {self.max_drop}")
        if self.min_cosine is not None and not -1 <= self.min_cosine <= 1:
            raise ConfigError("min_cosine", f"{{name}} must be in [-1, 1], got {self.min_cosine}")
        if self.bins < 16:
            raise ConfigError("bins", f"{{name}} must be at least 16, got {self.bins}")
        if self.smooth_alpha is not None and not 0 <= self.smooth_alpha <= 1:
            raise ConfigError(
                "smooth_alpha",
                f"{{name}}: SmoothQuant strength must be in [0, 1], got {self.smooth_alpha}",
            )
