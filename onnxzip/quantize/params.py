"""Scale and zero-point maths for linear int8/uint8 quantization, pure numpy.

The affine map between a real value ``r`` and its integer code ``q`` is::

    r = S (q - Z)            q = saturate(round(r / S) + Z)

with scale ``S > 0`` (float32) and zero-point ``Z`` an integer of the code type. ``round`` is
round-half-to-even, as ONNX ``QuantizeLinear`` specifies, and ``saturate`` clips to the code
type's range: [0, 255] for uint8, [-128, 127] for int8 activations and [-127, 127] for
symmetric int8 weights (the symmetric range keeps ``-r`` representable for every ``r``, and is
what onnxruntime's int8 kernels expect for weights).

Choices and why:

* The range ``[lo, hi]`` is first widened to contain 0, so that real zero (padding, ReLU's
  floor) is exactly the integer ``Z``: ``Z = round(qmin - lo / S)`` is an integer by construction
  and the widening guarantees it lies inside [qmin, qmax].
* Activations: asymmetric uint8 by default (``S = (hi - lo) / 255``); symmetric int8 as an option
  (``S = max(|lo|, |hi|) / 127``, ``Z = 0``).
* Weights: symmetric int8 per output channel, ``S_c = max|W_c| / 127``, ``Z_c = 0``.
* Reduced weight range (``pair_safe``): x86-64 CPUs without VNNI run onnxruntime's uint8 x int8
  kernels with ``vpmaddubsw``, which adds the products of two neighbouring codes in a saturating
  int16: ``a1 w1 + a2 w2`` with ``a`` up to 255 overflows once ``|w1| + |w2| > 128`` for two
  weights of the same sign. ``S_c = T_c / 127``, with ``T_c`` the larger of the sums of the two
  largest positive and of the two largest negative weights of the channel, keeps every such sum
  of codes at most 128 whatever the pairing (``round`` adds at most 1/2 per code), so
  ``255 * 128 = 32640`` fits. It costs at most one bit (``T_c <= 2 max|W_c|``); onnxruntime's
  own ``reduce_range`` always costs one.
* Bias: int32 with ``S_b[c] = S_x * S_w[c]`` and ``Z_b = 0``, so the integer accumulator of a
  quantized Conv or Gemm can add it directly.
* Degenerate ranges: an all-zero tensor or channel (``lo = hi = 0``) gets ``S = 1``, ``Z`` the code
  of 0, and quantizes exactly. Scales below ``MIN_SCALE`` are raised to it so that no division
  overflows to Inf. NaN or Inf in a range is an error: the caller names the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_SCALE = float(np.finfo(np.float32).tiny) * 2**20  # ~1.2e-32: keeps r / S finite in float32
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

QRANGES = {
    "uint8": (0, 255),
    "int8": (-128, 127),
}


class RangeError(ValueError):
    """A calibrated or weight range holds NaN or Inf."""


@dataclass(frozen=True)
class QParams:
    """Scale (float32) and zero-point (code type) of a tensor; arrays of shape [C] per channel."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None

    @property
    def dtype(self) -> np.dtype:
        return self.zero_point.dtype


def qrange(dtype: str, symmetric: bool = False) -> tuple[int, int]:
    """Integer range of a code type; symmetric int8 drops -128."""
    lo, hi = QRANGES[dtype]
    if symmetric and dtype == "int8":
        lo = -127
    return lo, hi


def _check_finite(lo, hi) -> None:
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise RangeError("range contains NaN or Inf")


def activation_params(
    lo: float, hi: float, dtype: str = "uint8", symmetric: bool = False
) -> QParams:
    """Per-tensor parameters for an activation whose observed range is ``[lo, hi]``.

    Raises:
        RangeError: ``lo`` or ``hi`` is NaN or Inf.
    """
    _check_finite(lo, hi)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    np_dtype = np.dtype(dtype)
    if symmetric:
        qmin, qmax = qrange(dtype, symmetric=True)
        bound = max(-lo, hi)
        if dtype == "uint8":
            scale = 2 * bound / (qmax - qmin)
            zero = 128
        else:
            scale = bound / qmax
            zero = 0
    else:
        qmin, qmax = qrange(dtype)
        scale = (hi - lo) / (qmax - qmin)
        zero = None
    if scale == 0:
        scale = 1.0
    scale = max(float(np.float32(scale)), MIN_SCALE)
    if zero is None:
        zero = int(np.clip(np.round(qmin - lo / scale), qmin, qmax))
    return QParams(np.array(scale, dtype=np.float32), np.array(zero, dtype=np_dtype))


def weight_params(
    w: np.ndarray, axis: int | None, dtype: str = "int8", pair_safe: bool = False
) -> QParams:
    """Symmetric parameters for a weight: per channel along ``axis``, or per tensor if None.
    ``pair_safe`` bounds every same-sign pair of codes by 128 in magnitude (see the module text).

    Raises:
        RangeError: the weight holds NaN or Inf.
    """
    w = np.asarray(w, dtype=np.float32)
    if not np.all(np.isfinite(w)):
        raise RangeError("weight contains NaN or Inf")
    qmin, qmax = qrange(dtype, symmetric=True)
    if axis is not None:
        axis = axis % w.ndim
    rows = _channel_rows(w, axis)
    if pair_safe:
        bound = _pair_bound(rows)
    else:
        bound = np.max(np.abs(rows), axis=1, initial=0.0)
    if axis is None:
        bound = bound.reshape(())
    scale = (bound.astype(np.float64) / qmax).astype(np.float32)
    scale = np.where(scale == 0, np.float32(1.0), scale)
    scale = np.maximum(scale, np.float32(MIN_SCALE)).astype(np.float32)
    zero = np.zeros_like(scale, dtype=np.dtype(dtype))
    if dtype == "uint8":
        zero = np.full_like(scale, 128, dtype=np.uint8)
    return QParams(scale, zero, axis)


def _channel_rows(w: np.ndarray, axis: int | None) -> np.ndarray:
    """One row per channel along ``axis`` (a single row for per-tensor)."""
    if axis is None:
        return w.reshape(1, -1)
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def _pair_bound(rows: np.ndarray) -> np.ndarray:
    """Per row, the largest magnitude two same-sign entries can sum to."""
    return np.maximum(_top2_sum(rows), _top2_sum(-rows))


def _top2_sum(rows: np.ndarray) -> np.ndarray:
    """Per row, the sum of its two largest positive entries (0 where there are none)."""
    pos = np.maximum(rows, 0.0)  # a copy: its largest entry is cleared below
    if pos.shape[1] < 2:
        return pos.sum(axis=1)
    # the largest, then the largest of the rest: two passes of max (and one of argmax), about
    # 4x faster than np.partition on ResNet-50's weights, and the same values
    first = np.argmax(pos, axis=1)
    picked = np.arange(pos.shape[0])
    top = pos[picked, first]
    pos[picked, first] = 0.0
    return top + pos.max(axis=1)


def pair_overflow_channels(codes: np.ndarray, axis: int) -> int:
    """How many channels along ``axis`` of int8 weight codes hold two same-sign codes whose
    magnitudes sum past 128: the channels that can saturate a 16-bit pair sum (module text)."""
    rows = _channel_rows(np.asarray(codes, dtype=np.int64), axis % codes.ndim)
    return int(np.count_nonzero(_pair_bound(rows) > 128))


def _broadcast(p: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None or p.ndim == 0:
        return p
    shape = [1] * ndim
    shape[axis] = p.shape[0]
    return p.reshape(shape)


def quantize(x: np.ndarray, params: QParams, symmetric_weight: bool = False) -> np.ndarray:
    """``saturate(round_half_even(x / S) + Z)``, computed in float32 as QuantizeLinear does."""
    x = np.asarray(x, dtype=np.float32)
    dtype = params.dtype
    qmin, qmax = qrange(str(dtype), symmetric=symmetric_weight)
    scale = _broadcast(params.scale.astype(np.float32), x.ndim, params.axis)
    zero = _broadcast(params.zero_point.astype(np.int64), x.ndim, params.axis)
    q = np.rint(x / scale).astype(np.int64) + zero
    return np.clip(q, qmin, qmax).astype(dtype)


def dequantize(q: np.ndarray, params: QParams) -> np.ndarray:
    """``S (q - Z)`` in float32, as DequantizeLinear does."""
    scale = _broadcast(params.scale.astype(np.float32), q.ndim, params.axis)
    zero = _broadcast(params.zero_point.astype(np.int32), q.ndim, params.axis)
    return ((q.astype(np.int32) - zero).astype(np.float32) * scale).astype(np.float32)


def bias_params(x_scale: np.ndarray, w_params: QParams) -> QParams:
    """int32 bias parameters: ``S_b = S_x * S_w`` per channel, zero-point 0."""
    scale = (np.float32(x_scale) * w_params.scale.astype(np.float32)).astype(np.float32)
    scale = np.maximum(scale, np.float32(MIN_SCALE))
    axis = 0 if scale.ndim else None
    return QParams(scale, np.zeros(scale.shape, dtype=np.int32), axis)


# The largest bias code a weight's scale is raised to keep within: half the int32 range, so
# that the accumulator the bias starts adds the products to has room left.
BIAS_CODE_LIMIT = 2**30


def fit_bias(w_params: QParams, x_scale, b: np.ndarray) -> tuple[QParams, int]:
    """Weight parameters whose scales are raised, channel by channel, until ``b`` in int32 at
    ``S_x * S_w`` stays within BIAS_CODE_LIMIT; and how many channels were raised.

    A channel whose weights are nearly zero but whose (folded BatchNorm) bias is not gets a
    tiny weight scale, and its bias code ``b / (S_x S_w)`` then overflows int32: saturated, the
    channel's output is wrong by most of its bias. Its weights lose resolution instead, which
    costs little: they are small next to the bias they feed (onnxruntime's quantizer adjusts
    weight scales for int32 biases the same way).
    """
    scale = w_params.scale.astype(np.float64)
    need = np.abs(np.asarray(b, np.float64)) / (float(x_scale) * BIAS_CODE_LIMIT)
    if scale.ndim == 0:
        need = np.asarray(need.max(initial=0.0))
    elif need.shape != scale.shape:
        return w_params, 0
    raised = need > scale
    if not raised.any():
        return w_params, 0
    fitted = np.where(raised, need, scale).astype(np.float32)
    return QParams(fitted, w_params.zero_point, w_params.axis), int(np.count_nonzero(raised))


def quantize_bias(b: np.ndarray, params: QParams) -> tuple[np.ndarray, int]:
    """Bias codes in int32 and how many saturated (a sign the input scale is far too small)."""
    b = np.asarray(b, dtype=np.float64)
    if not np.all(np.isfinite(b)):
        raise RangeError("bias contains NaN or Inf")
    q = np.rint(b / params.scale.astype(np.float64))
    saturated = int(np.count_nonzero((q < INT32_MIN) | (q > INT32_MAX)))
    return np.clip(q, INT32_MIN, INT32_MAX).astype(np.int32), saturated
