"""Scale and zero-point maths: hand-computed cases, rounding ties, saturation, degenerate ranges."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest

from onnxzip.quantize import params as qp
from onnxzip.runtime import int8_pairs_saturate


@pytest.mark.parametrize(
    "lo,hi,dtype,symmetric,scale,zero",
    [
        (0.0, 2.55, "uint8", False, 0.01, 0),
        # 1 / float32(2/255) = 127.49999...: the zero-point comes from the stored float32 scale.
        (-1.0, 1.0, "uint8", False, 2 / 255, 127),
        (-0.5, 1.5, "uint8", False, 2 / 255, 64),  # 0.5 / (2/255) = 63.75 -> 64
        (1.0, 2.0, "uint8", False, 2 / 255, 0),  # widened to [0, 2]: zero stays representable
        (-3.0, -1.0, "uint8", False, 3 / 255, 255),  # widened to [-3, 0]
        (-1.0, 2.0, "int8", True, 2 / 127, 0),
        (-1.0, 2.0, "uint8", True, 4 / 255, 128),
        (-1.0, 1.0, "int8", False, 2 / 255, -1),
        (0.0, 0.0, "uint8", False, 1.0, 0),  # all zero: any scale works, 1 is safe
        (5.0, 5.0, "uint8", False, 5 / 255, 0),  # a constant tensor
    ],
)
def test_activation_params_hand_computed(lo, hi, dtype, symmetric, scale, zero):
    p = qp.activation_params(lo, hi, dtype, symmetric)
    assert p.scale.dtype == np.float32 and p.zero_point.dtype == np.dtype(dtype)
    assert float(p.scale) == pytest.approx(scale, rel=1e-6)
    assert int(p.zero_point) == zero


@pytest.mark.parametrize("lo,hi", [(np.nan, 1.0), (0.0, np.inf), (-np.inf, 0.0)])
def test_non_finite_ranges_are_errors(lo, hi):
    with pytest.raises(qp.RangeError):
        qp.activation_params(lo, hi)


def test_real_zero_is_exact_for_random_ranges():
    rng = np.random.default_rng(0)
    for _ in range(500):
        lo, hi = sorted(rng.normal(0, 10, 2))
        for dtype in ("uint8", "int8"):
            p = qp.activation_params(lo, hi, dtype)
            zero = qp.quantize(np.zeros(1, np.float32), p)
            assert qp.dequantize(zero, p)[0] == 0.0
            # The whole range maps inside the code range (no saturation at its ends).
            codes = qp.quantize(np.array([min(lo, 0), max(hi, 0)], np.float32), p).astype(int)
            qmin, qmax = qp.QRANGES[dtype]
            assert qmin <= codes.min() and codes.max() <= qmax


def _ort_quantize(x: np.ndarray, scale: float, zero: np.ndarray) -> np.ndarray:
    elem = onnx.helper.np_dtype_to_tensor_dtype(zero.dtype)
    graph = oh.make_graph(
        [oh.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])],
        "q",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x.shape))],
        [oh.make_tensor_value_info("y", elem, list(x.shape))],
        [
            onnx.numpy_helper.from_array(np.array(scale, np.float32), "s"),
            onnx.numpy_helper.from_array(zero, "z"),
        ],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_rounding_and_saturation_match_onnxruntime_quantizelinear(dtype):
    zero = np.array(10, dtype=dtype)
    p = qp.QParams(np.array(0.5, np.float32), zero)
    x = np.array([0.25, 0.75, 1.25, -0.25, -0.75, 1000.0, -1000.0, 0.0, 3.3, -7.1], np.float32)
    ours = qp.quantize(x, p)
    np.testing.assert_array_equal(ours, _ort_quantize(x, 0.5, zero))
    # Ties go to even: 0.25 / 0.5 = 0.5 -> 0, 0.75 / 0.5 = 1.5 -> 2, 1.25 / 0.5 = 2.5 -> 2.
    assert list(ours[:3].astype(int) - 10) == [0, 2, 2]
    qmin, qmax = qp.QRANGES[dtype]
    assert ours[5] == qmax and ours[6] == qmin


def test_weight_params_per_channel_symmetric():
    w = np.zeros((3, 2, 2, 2), np.float32)
    w[1] = 1.27
    w[2, 0, 0, 0] = -2.54
    p = qp.weight_params(w, axis=0)
    np.testing.assert_allclose(p.scale, [1.0, 0.01, 0.02], rtol=1e-6)  # all-zero channel: scale 1
    assert p.zero_point.dtype == np.int8 and not p.zero_point.any()
    codes = qp.quantize(w, p, symmetric_weight=True)
    assert codes.dtype == np.int8
    assert (codes[0] == 0).all() and (codes[1] == 127).all() and codes[2, 0, 0, 0] == -127
    np.testing.assert_allclose(qp.dequantize(codes, p), w, atol=1e-6)


def test_weight_params_other_axis_and_per_tensor():
    w = np.arange(12, dtype=np.float32).reshape(3, 4) - 5
    per_col = qp.weight_params(w, axis=1)
    np.testing.assert_allclose(per_col.scale * 127, np.abs(w).max(axis=0), rtol=1e-6)
    per_tensor = qp.weight_params(w, axis=None)
    assert per_tensor.scale.shape == () and float(per_tensor.scale) * 127 == pytest.approx(6.0)
    with pytest.raises(qp.RangeError):
        qp.weight_params(np.array([1.0, np.nan], np.float32), axis=None)


def test_bias_is_int32_with_product_scale():
    w = qp.weight_params(np.array([[1.27], [0.254]], np.float32), axis=0)  # scales 0.01, 0.002
    p = qp.bias_params(np.float32(0.5), w)
    np.testing.assert_allclose(p.scale, [0.005, 0.001], rtol=1e-6)
    codes, saturated = qp.quantize_bias(np.array([1.0, -0.0105], np.float32), p)
    assert (
        codes.dtype == np.int32 and list(codes) == [200, -10] and saturated == 0
    )  # -10.5 -> -10 (even)
    huge, saturated = qp.quantize_bias(np.array([1e30, 0.0], np.float32), p)
    assert saturated == 1 and huge[0] == 2**31 - 1


def test_pair_safe_weight_scale_hand_computed():
    # Channel 0: two largest positives 1.0 + 0.5 -> S = 1.5 / 127; channel 1: negatives
    # -0.8 - 0.8 outweigh the lone positive 1.2 -> S = 1.6 / 127; channel 2: one weight.
    w = np.array([[1.0, 0.5, -0.9, 0.1], [1.2, -0.8, -0.8, 0.0], [0.0, 0.0, 0.0, -0.4]], np.float32)
    p = qp.weight_params(w, axis=0, pair_safe=True)
    np.testing.assert_allclose(p.scale * 127, [1.5, 1.6, 0.4], rtol=1e-6)
    per_tensor = qp.weight_params(w, axis=None, pair_safe=True)
    assert per_tensor.scale.shape == () and float(per_tensor.scale) * 127 == pytest.approx(2.2)


@pytest.mark.parametrize("seed", range(5))
def test_pair_safe_codes_never_overflow_a_16_bit_pair_sum(seed):
    """Any two same-sign codes of a channel sum to at most 128 in magnitude, so 255 * (|q1| + |q2|)
    fits in int16; the scale is never coarser than twice the plain one."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(3, (32, 16, 3, 3)) * rng.uniform(0.01, 2, (32, 1, 1, 1))).astype(np.float32)
    plain = qp.weight_params(w, axis=0)
    safe = qp.weight_params(w, axis=0, pair_safe=True)
    assert np.all(safe.scale >= plain.scale) and np.all(safe.scale <= 2 * plain.scale * (1 + 1e-6))
    codes = qp.quantize(w, safe, symmetric_weight=True).astype(np.int64).reshape(32, -1)
    for sign in (1, -1):
        top2 = np.sort(np.maximum(sign * codes, 0), axis=1)[:, -2:].sum(axis=1)
        assert top2.max() <= 128  # 255 * 128 = 32640 <= 32767


CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma {}\n"


@pytest.mark.parametrize(
    ("flags", "machine", "saturates"),
    [
        ("", "x86_64", True),  # AVX2 only (Zen 2/3, Haswell-Skylake client)
        ("avx512f avx512bw", "x86_64", True),  # Skylake-SP: AVX-512 without VNNI
        ("avx512f avx512_vnni", "x86_64", False),
        ("avx_vnni", "x86_64", False),
        ("", "aarch64", False),
    ],
)
def test_which_cpus_saturate_int8_pair_sums(flags, machine, saturates):
    why = int8_pairs_saturate(CPUINFO.format(flags), machine)
    assert (why is not None) == saturates
    if saturates:
        assert "VNNI" in why
