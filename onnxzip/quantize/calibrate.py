"""Activation ranges from sample data: streamed, mergeable statistics and four range methods.

One onnxruntime session exposes every activation that needs a range. Each batch is reduced at
once to a ``TensorStats`` per tensor: min, max, element count and, for the histogram methods, a
histogram with fixed edges. So memory is (tensors x bins) plus one batch, whatever the number
of samples, and two ``TensorStats`` computed on different shards merge exactly.

The histogram covers ``[-R, R]`` with ``2B`` equal bins, where ``R = 2^e`` is the smallest power of
two holding every value seen so far. When a larger value arrives ``R`` doubles and adjacent
bin pairs merge, which is exact because the edges of the coarser grid are edges of the finer
one; two statistics with different ``R`` merge by coarsening the finer one first.

Methods (``[lo, hi]`` is then widened to contain 0 by the parameter maths):

* ``minmax``: the observed min and max.
* ``percentile`` p: clips a fraction ``1 - p/100`` of the values, split between both tails,
  read from the histogram's cumulative counts; never outside [min, max].
* ``entropy``: TensorRT's KL-divergence calibration on the histogram of |x| (exact zeros left
  out: they quantize without error at any threshold): for each candidate
  threshold ``T`` (bin edges from ``levels`` bins up to the last non-empty bin, searched coarse
  to fine), the clipped
  distribution P (outliers added to the last bin) is compared with its quantization Q to
  ``levels`` levels; the ``T`` with the smallest KL(P || Q) wins. The range is ``[-T, T]``
  intersected with [min, max].

Both clipping methods (percentile, entropy) keep their range only if its quantize-dequantize
error over the histogram is no larger than that of [min, max]; otherwise [min, max] is used.
* ``mse``: the range ``[a lo, a hi]``, over a grid of shrink factors ``a`` in (0, 1], whose
  quantize-dequantize error summed over the histogram (bin centres weighted by counts) is
  smallest. All candidates are evaluated in one vectorised array operation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from onnxzip.quantize.params import activation_params, qrange

logger = logging.getLogger(__name__)

DEFAULT_BINS = 2048


_MIN_RADIUS = 2.0**-100  # keeps bins / radius finite in float32


def _radius_for(absmax: float) -> float:
    if absmax <= _MIN_RADIUS or not math.isfinite(absmax):
        return _MIN_RADIUS
    return 2.0 ** math.ceil(math.log2(absmax))


@dataclass
class TensorStats:
    """Mergeable statistics of one tensor's values."""

    bins: int = DEFAULT_BINS  # per side: the histogram has 2 * bins bins over [-radius, radius]
    histogram: bool = True
    min: float = math.inf
    max: float = -math.inf
    count: int = 0  # values seen (samples, where only ranges were reported)
    zeros: int = 0  # exact zeros: quantized without error whatever the range
    nonfinite: int = 0
    radius: float = 0.0
    hist: np.ndarray | None = field(default=None, repr=False)

    def _coarsen_to(self, radius: float) -> None:
        assert self.hist is not None
        while self.radius < radius:
            # Doubling R: the middle B bins of the new grid each merge two old bins.
            pairs = self.hist.reshape(-1, 2).sum(axis=1)  # 2B -> B bins over [-R, R]
            new = np.zeros_like(self.hist)
            b = self.bins
            new[b // 2 : b // 2 + b] = pairs
            self.hist = new
            self.radius *= 2

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x).reshape(-1)
        if x.size == 0:
            return
        if x.dtype.kind != "f":
            x = x.astype(np.float32)
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN or Inf show up in min or max
            finite = np.isfinite(x)
            self.nonfinite += int(x.size - finite.sum())
            x = x[finite]
            if x.size == 0:
                return
            lo, hi = float(x.min()), float(x.max())
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        self.count += int(x.size)
        if not self.histogram:
            return
        self.zeros += int(x.size - np.count_nonzero(x))
        radius = _radius_for(max(abs(self.min), abs(self.max)))
        if self.hist is None:
            self.hist = np.zeros(2 * self.bins, dtype=np.int64)
            self.radius = radius
        elif radius > self.radius:
            self._coarsen_to(radius)
        # Bin index floor((x + R) / w) with w = R / B. R is a power of two, so the scale B / R
        # is exact in float32, and x * (B / R) + B >= 0 truncates like floor.
        idx = (x * np.float32(self.bins / self.radius) + np.float32(self.bins)).astype(np.int32)
        counts = np.bincount(idx, minlength=2 * self.bins + 1)
        counts[2 * self.bins - 1] += counts[2 * self.bins]  # x == R belongs to the last bin
        self.hist += counts[: 2 * self.bins]

    def update_range(self, lo: float, hi: float, samples: int) -> None:
        """Folds in a batch already reduced to its min and max (no histogram)."""
        if self.histogram:
            raise ValueError("a histogram needs the values, not just their range")
        if not (math.isfinite(lo) and math.isfinite(hi)):
            self.nonfinite += samples  # the batch held NaN or Inf somewhere
            return
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        self.count += samples

    def merge(self, other: TensorStats) -> TensorStats:
        """Combines two statistics as if one pass had seen both sets of values."""
        if other.bins != self.bins or other.histogram != self.histogram:
            raise ValueError("cannot merge statistics with different histogram settings")
        out = TensorStats(self.bins, self.histogram)
        out.min, out.max = min(self.min, other.min), max(self.max, other.max)
        out.count = self.count + other.count
        out.zeros = self.zeros + other.zeros
        out.nonfinite = self.nonfinite + other.nonfinite
        if self.histogram:
            parts = [s for s in (self, other) if s.hist is not None]
            if parts:
                out.radius = max(s.radius for s in parts)
                out.hist = np.zeros(2 * self.bins, dtype=np.int64)
                for s in parts:
                    copy = TensorStats(s.bins, True, radius=s.radius, hist=s.hist.copy())
                    copy._coarsen_to(out.radius)
                    out.hist += copy.hist
        return out

    # -- ranges -----------------------------------------------------------------------------

    def edges(self) -> np.ndarray:
        return np.linspace(-self.radius, self.radius, 2 * self.bins + 1)

    def range(
        self,
        method: str = "minmax",
        *,
        percentile: float = 99.99,
        dtype: str = "uint8",
        symmetric: bool = False,
    ) -> tuple[float, float]:
        if self.count == 0:
            return 0.0, 0.0
        if method == "minmax" or self.hist is None or self.min == self.max:
            return self.min, self.max
        if method == "percentile":
            return self._unless_worse(self._percentile(percentile), dtype, symmetric)
        if method == "entropy":
            return self._unless_worse(self._entropy(dtype, symmetric), dtype, symmetric)
        if method == "mse":
            return self._mse(dtype, symmetric)
        raise ValueError(f"unknown calibration method {method!r}")

    def _percentile(self, p: float) -> tuple[float, float]:
        tail = (1.0 - p / 100.0) / 2.0
        cdf = np.cumsum(self.hist) / self.hist.sum()
        edges = self.edges()
        lo_bin = int(np.searchsorted(cdf, tail, side="right"))
        hi_bin = int(np.searchsorted(cdf, 1.0 - tail, side="left"))
        lo = max(self.min, edges[lo_bin])
        hi = min(self.max, edges[min(hi_bin + 1, len(edges) - 1)])
        return float(lo), float(hi)

    def _abs_hist(self) -> np.ndarray:
        b = self.bins
        return self.hist[b:] + self.hist[:b][::-1]

    def _entropy(self, dtype: str, symmetric: bool) -> tuple[float, float]:
        qmin, qmax = qrange(dtype, symmetric=symmetric)
        levels = (qmax - qmin + 1) // 2 if (symmetric or self.min < 0) else qmax - qmin + 1
        hist = self._abs_hist().astype(np.float64)
        # Exact zeros (a ReLU's floor) cost nothing at any threshold; left in, their spike in the
        # first bin dominates the divergence and drags the threshold far below the data.
        hist[0] -= self.zeros
        nonzero = np.nonzero(hist)[0]
        last = int(nonzero[-1]) + 1 if nonzero.size else 0
        width = self.radius / self.bins
        if last <= levels:
            threshold = last * width
        else:
            tail = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])

            # Coarse-to-fine search over thresholds: 24 candidates, then 16 around the best, each
            # set scored in one array operation.
            coarse = np.unique(
                np.linspace(levels, last, num=min(last - levels + 1, 24)).astype(int)
            )
            best = int(coarse[np.argmin(_divergences(hist, tail, coarse, levels))])
            step = max(1, (last - levels) // 23)
            fine = np.arange(
                max(levels, best - step), min(last, best + step) + 1, max(1, step // 8)
            )
            best = int(fine[np.argmin(_divergences(hist, tail, fine, levels))])
            threshold = best * width
        return float(max(self.min, -threshold)), float(min(self.max, threshold))

    def _unless_worse(
        self, clipped: tuple[float, float], dtype: str, symmetric: bool
    ) -> tuple[float, float]:
        """A clipped range is kept only when it does not raise the tensor's own quantization
        error over its histogram: on small nets the clipped outliers can matter more than the
        finer steps gained."""
        if self._histogram_mse(*clipped, dtype, symmetric) > self._histogram_mse(
            self.min, self.max, dtype, symmetric
        ):
            return self.min, self.max
        return clipped

    def _centres(self) -> tuple[np.ndarray, np.ndarray]:
        """The non-empty bins' centres (clipped to [min, max]) and their counts."""
        centres = (self.edges()[:-1] + self.edges()[1:]) / 2
        keep = self.hist > 0
        return np.clip(centres[keep], self.min, self.max), self.hist[keep].astype(np.float64)

    def _histogram_mse(self, lo: float, hi: float, dtype: str, symmetric: bool) -> float:
        """Quantize-dequantize squared error of the histogram (bin centres, weighted by counts)
        with the parameters ``activation_params`` gives the range [lo, hi]."""
        p = activation_params(lo, hi, dtype, symmetric)
        c, h = self._centres()
        scale = np.array([float(p.scale)])
        zero = np.array([float(p.zero_point)])
        return float(_qdq_errors(c, h, scale, zero, *qrange(dtype, symmetric=symmetric))[0])

    def _mse(self, dtype: str, symmetric: bool) -> tuple[float, float]:
        c, h = self._centres()
        lo0, hi0 = min(self.min, 0.0), max(self.max, 0.0)
        alphas = np.linspace(0.02, 1.0, 50)
        qmin, qmax = qrange(dtype, symmetric=symmetric)
        if symmetric:
            bound = alphas * max(-lo0, hi0)
            scale = np.maximum(bound / (qmax if dtype == "int8" else (qmax - qmin) / 2), 1e-30)
            zero = np.zeros_like(scale) if dtype == "int8" else np.full_like(scale, 128.0)
        else:
            scale = np.maximum(alphas * (hi0 - lo0) / (qmax - qmin), 1e-30)
            zero = np.clip(np.round(qmin - alphas * lo0 / scale), qmin, qmax)
        err = _qdq_errors(c, h, scale, zero, qmin, qmax)
        a = alphas[int(np.argmin(err))]
        return float(a * lo0) if self.min < 0 else self.min, float(
            a * hi0
        ) if self.max > 0 else self.max


def _qdq_errors(
    c: np.ndarray, h: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmin: int, qmax: int
) -> np.ndarray:
    """For each candidate (``scale[k]``, ``zero[k]``), the squared quantize-dequantize error of
    the values ``c`` weighted by the counts ``h``."""
    q = np.clip(np.rint(c[None, :] / scale[:, None]) + zero[:, None], qmin, qmax)
    return ((q - zero[:, None]) * scale[:, None] - c[None, :]) ** 2 @ h


def _divergences(
    hist: np.ndarray, tail: np.ndarray, candidates: np.ndarray, levels: int
) -> np.ndarray:
    """KL(P || Q) for every candidate threshold ``i`` (in bins, each >= ``levels``) at once.

    P is ``hist[:i]`` with the mass beyond ``i`` added to its last bin; Q merges ``hist[:i]`` into
    ``levels`` chunks (chunk ``j`` covers bins ``[floor(j i / L), floor((j + 1) i / L))``) and
    spreads each chunk's mass evenly over its non-empty bins. Rows are candidates, columns bins;
    chunk sums come from cumulative sums, so no per-candidate loop is needed.
    """
    i = candidates.astype(np.int64)[:, None]
    width = int(candidates.max())
    b = np.arange(width)[None, :]
    valid = b < i
    h = np.where(valid, hist[None, :width], 0.0)
    p = h.copy()
    p[np.arange(len(candidates)), candidates - 1] += tail[candidates]
    chunk = np.minimum(-((-(b + 1) * levels) // i) - 1, levels - 1)  # ceil((b+1)L/i) - 1
    start = (chunk * i) // levels
    end = np.minimum(((chunk + 1) * i) // levels, i)
    sums = np.concatenate([[0.0], np.cumsum(hist[:width])])
    nonzero = np.concatenate([[0.0], np.cumsum(hist[:width] > 0)])
    chunk_sum = sums[end] - sums[start]
    chunk_nz = nonzero[end] - nonzero[start]
    q = np.where(valid & (h > 0), chunk_sum / np.maximum(chunk_nz, 1), 0.0)
    ps = p / p.sum(axis=1, keepdims=True)
    qs = q / np.maximum(q.sum(axis=1, keepdims=True), 1e-300)
    mask = ps > 0
    qs = np.where(mask & (qs == 0), 1e-12, qs)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(mask, ps * np.log(np.where(mask, ps, 1.0) / np.where(mask, qs, 1.0)), 0.0)
    return terms.sum(axis=1)


def params_for(stats: TensorStats, method: str, *, percentile: float, dtype: str, symmetric: bool):
    lo, hi = stats.range(method, percentile=percentile, dtype=dtype, symmetric=symmetric)
    return activation_params(lo, hi, dtype, symmetric), (lo, hi)
