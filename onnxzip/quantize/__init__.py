"""Static int8 quantization with QDQ: prepare, plan, calibrate, insert, verify.

``quantize(model, samples, config) -> (model, QuantizeReport)``:

1. prepare: initializer inputs dropped, two-input Sum as Add, BatchNormalization folded into
   the preceding convolution (``onnxzip.passes``);
2. plan: per-op rules (``rules.py``) mark activations, weights and biases, fold ReLU/Clip into
   their producer's range, and give a reason for every weighted node kept in float;
3. calibrate: one onnxruntime session exposes every planned activation; each batch is reduced
   to mergeable statistics (``calibrate.py``) and the chosen method turns them into ranges;
4. insert: one inserter (``qdq.py``) builds all Q/DQ pairs, int8 weights and int32 biases;
5. verify: the quantized model against the original on held-out samples calibration never saw.

Modules: ``config`` (QuantizeConfig), ``plan`` (what is quantized, calibration sweep),
``builder`` (a quantized model for any set of layers kept in float), ``bias_correction``,
``guard`` (the accuracy guard), ``pipeline`` (``quantize`` itself), ``report``; the
arithmetic in ``params``, the statistics in ``calibrate``, the per-op rules in ``rules``, the
Q/DQ inserter in ``qdq``, and the other modes in ``dynamic`` and ``weight_only``.
"""

from onnxzip.quantize.bias_correction import correct_biases
from onnxzip.quantize.config import QuantizeConfig
from onnxzip.quantize.pipeline import quantize
from onnxzip.quantize.plan import plan_quantization
from onnxzip.quantize.report import (
    GuardReport,
    GuardStep,
    KeptFloat,
    QuantizeReport,
    TensorRange,
    kept_float_lines,
    nothing_quantized_because,
)

__all__ = [
    "GuardReport",
    "GuardStep",
    "KeptFloat",
    "QuantizeConfig",
    "QuantizeReport",
    "TensorRange",
    "correct_biases",
    "kept_float_lines",
    "nothing_quantized_because",
    "plan_quantization",
    "quantize",
]
