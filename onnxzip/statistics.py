"""One sweep over the samples collects what every stage asked for, as NNCF's statistics
aggregator does.

Stages register requests with a ``Collector`` on one model: the range of a tensor (min and max,
reduced inside onnxruntime by appended ReduceMin / ReduceMax / ReduceSum nodes, so only three
scalars per tensor leave the session), a tensor's histogram (the tensor is fetched whole and
reduced by numpy, one tensor per worker thread: numpy releases the GIL in the heavy loops), and
per-channel moments of a tensor along an axis (``sum x`` and ``sum x^2`` per channel, in float64;
inside the graph as Cast-to-double + ReduceSum when the tensor is not fetched anyway). ``run``
builds one session and streams the samples through it once, in shards of consecutive batches
that the active engine may run anywhere (``onnxzip.engine.cluster``).

Every statistic is a sum, a min or a max per batch, so results over shards merge exactly:
``mean = sum_b S1_b / sum_b n_b``, ``var = sum_b S2_b / n - mean^2``. Shards are merged in
stream order: the float64 sums are added in the same order on one process or on many.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxzip.engine import cluster
from onnxzip.ir import ops
from onnxzip.passes import add_initializer, claim, naming
from onnxzip.quantize import calibrate as cal
from onnxzip.runtime import Runner


@dataclass
class ChannelSums:
    """Streamed per-channel sums of one tensor along one axis."""

    count: int = 0
    sum: np.ndarray | float = 0.0
    squares: np.ndarray | float = 0.0

    def update(self, x: np.ndarray, axis: int) -> None:
        x = np.moveaxis(x.astype(np.float64), axis, 0)
        x = x.reshape(x.shape[0], -1)
        self.sum = self.sum + x.sum(axis=1)
        self.squares = self.squares + (x * x).sum(axis=1)
        self.count += x.shape[1]

    def add(self, total: np.ndarray, squares: np.ndarray | None, count: int) -> None:
        self.sum = self.sum + total
        if squares is not None:
            self.squares = self.squares + squares
        self.count += count

    def mean(self) -> np.ndarray:
        return np.asarray(self.sum) / self.count

    def std(self) -> np.ndarray:
        mean = self.mean()
        return np.sqrt(np.maximum(np.asarray(self.squares) / self.count - mean * mean, 0.0))


@dataclass
class ChannelRows:
    """Per-channel min and max of a tensor over its last axis, and a sample of its rows (the
    vectors along that axis): every ``ROWS_STRIDE``-th row of each batch, up to ``limit``, in
    stream order (so shards merge exactly: concatenated in order, cut at the limit)."""

    limit: int
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None
    rows: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        x = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
        if not len(x):
            return
        lo, hi = x.min(axis=0), x.max(axis=0)
        self._extend(lo, hi, x[:: max(1, len(x) // ROWS_PER_BATCH)])

    def merge(self, other: ChannelRows) -> None:
        if other.lo is not None:
            self._extend(other.lo, other.hi, other.rows)

    def _extend(self, lo, hi, rows) -> None:
        self.lo = lo if self.lo is None else np.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else np.maximum(self.hi, hi)
        have = 0 if self.rows is None else len(self.rows)
        if have < self.limit:
            take = rows[: self.limit - have]
            self.rows = take if self.rows is None else np.concatenate([self.rows, take])


ROWS_PER_BATCH = 64  # rows a ChannelRows keeps of each batch, at most (evenly spaced)


@dataclass
class Covariance:
    """Streamed ``sum x x^T`` over the rows of a tensor's last axis (float64), and the row
    count: the Hessian ``E[x x^T]`` of a layer reading it, as GPTQ uses it."""

    count: int = 0
    total: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        rows = x.reshape(-1, x.shape[-1]).astype(np.float64) if x.ndim else x.reshape(1, 1)
        gram = rows.T @ rows
        self.total = gram if self.total is None else self.total + gram
        self.count += len(rows)

    def merge(self, other: Covariance) -> None:
        if other.total is not None:
            self.total = other.total if self.total is None else self.total + other.total
            self.count += other.count

    def mean(self) -> np.ndarray | None:
        return None if self.total is None or not self.count else self.total / self.count


@dataclass
class Collected:
    ranges: dict[str, cal.TensorStats] = field(default_factory=dict)
    channels: dict[tuple[str, int], ChannelSums] = field(default_factory=dict)
    rows: dict[str, ChannelRows] = field(default_factory=dict)
    covariances: dict[str, Covariance] = field(default_factory=dict)
    samples: int = 0

    def merge(self, other: Collected) -> None:
        """Folds in the statistics of the samples after these (``other``'s shard)."""
        for tensor, stats in other.ranges.items():
            mine = self.ranges.get(tensor)
            self.ranges[tensor] = stats if mine is None else mine.merge(stats)
        for key, sums in other.channels.items():
            mine = self.channels.setdefault(key, ChannelSums())
            if sums.count:
                mine.add(sums.sum, sums.squares, sums.count)
        for tensor, rows in other.rows.items():
            self.rows.setdefault(tensor, ChannelRows(rows.limit)).merge(rows)
        for tensor, cov in other.covariances.items():
            self.covariances.setdefault(tensor, Covariance()).merge(cov)
        self.samples += other.samples


class Collector:
    """Requests registered on one model, collected in one sweep by ``run``.

    Args:
        model: the model whose tensors are measured (not modified).
        bins: histogram bins per sign for ``histogram`` requests.
        in_graph: reduce ranges and channel sums inside onnxruntime (False: fetch the tensors
            and reduce in numpy, e.g. because onnxruntime's reductions refuse empty tensors).
    """

    def __init__(self, model: ir.Model, *, bins: int = cal.DEFAULT_BINS, in_graph: bool = True):
        self.model = model
        self.bins = bins
        self.in_graph = in_graph
        self._ranges: dict[str, bool] = {}  # tensor -> histogram wanted
        self._channels: dict[tuple[str, int], bool] = {}  # (tensor, axis) -> squares wanted
        self._rows: dict[str, int] = {}  # tensor -> rows to keep
        self._covariances: set[str] = set()

    def range(self, tensor: str, histogram: bool = False) -> None:
        self._ranges[tensor] = self._ranges.get(tensor, False) or histogram

    def channel_moments(self, tensor: str, axis: int, squares: bool = True) -> None:
        key = (tensor, axis)
        self._channels[key] = self._channels.get(key, False) or squares

    def channel_rows(self, tensor: str, limit: int) -> None:
        """Per-channel min/max over the last axis and up to ``limit`` sampled rows
        (``ChannelRows``); the tensor is fetched."""
        self._rows[tensor] = max(self._rows.get(tensor, 0), limit)

    def covariance(self, tensor: str) -> None:
        """``sum x x^T`` over the rows of the tensor's last axis (``Covariance``); the tensor
        is fetched. Its memory is the last axis squared, in float64."""
        self._covariances.add(tensor)

    def __bool__(self) -> bool:
        return bool(self._ranges or self._channels or self._rows or self._covariances)

    def _build(self):
        """The augmented model and, per request, the session outputs that carry it."""
        model = self.model.clone()
        with naming(model.graph):
            return self._augment(model)

    def _augment(self, model: ir.Model):
        graph = model.graph
        values = {v.name: v for v in graph.inputs}
        values.update({v.name: v for node in graph for v in node.outputs})
        fetched = {t for t, hist in self._ranges.items() if hist or not self.in_graph}
        in_graph_channels = sorted(
            key
            for key in self._channels
            if self.in_graph
            and key[0] not in fetched
            and values[key[0]].shape is not None
            and len(values[key[0]].shape) > key[1]
        )
        fetched |= {key[0] for key in self._channels if key not in in_graph_channels}
        fetched |= set(self._rows) | self._covariances
        present = {v.name for v in graph.outputs}
        for name in sorted(fetched - present):
            graph.outputs.append(values[name])

        def add(op, inputs, name, dtype, shape, attributes=None, fetch=True) -> ir.Value:
            """Appends one node; its output, named ``name``, is a graph output when fetched."""
            node = ir.node(op, inputs, attributes=attributes or {}, name=name)
            out = node.outputs[0]
            out.name, out.type = name, ir.TensorType(dtype)
            out.shape = None if shape is None else ir.Shape(shape)
            claim(graph, name)
            graph.append(node)
            if fetch:
                graph.outputs.append(out)
            return out

        opset = model.opset_imports.get("", 13)

        def reduce(op, value, name, dtype, axes, shape, fetch=True) -> ir.Value:
            """``op`` over ``axes`` (all when None), axes as an input where the opset says so."""
            inputs, attributes = [value], {"keepdims": 0}
            if axes is not None:
                if ops.axes_as_input(op, opset):
                    inputs.append(add_initializer(graph, f"{name}_axes", np.array(axes, np.int64)))
                else:
                    attributes["axes"] = list(axes)
            return add(op, inputs, name, dtype, shape, attributes, fetch)

        range_outputs = {}
        for name in self._ranges:
            if name in fetched:
                continue
            value = values[name]
            # Reduced over the axes after the first two (the whole tensor when its rank is
            # unknown): onnxruntime spreads a reduction over its threads by output element, so
            # [N, C] partial minima come out about twice as fast as one scalar; numpy takes the
            # min of those (the same value). ReduceMin/Max skip NaN in onnxruntime; the sum is
            # NaN or Inf when x holds either (a finite float32 sum past 3.4e38 would also trip
            # it: no sane activation does that).
            rank = len(value.shape) if value.shape is not None else None
            axes = list(range(min(2, rank - 1), rank)) if rank is not None and rank >= 2 else None
            range_outputs[name] = tuple(
                reduce(op, value, f"{name}__{op}", value.dtype, axes, None).name
                for op in ("ReduceMin", "ReduceMax", "ReduceSum")
            )
        channel_outputs = {}
        double = ir.DataType.DOUBLE
        for name, axis in in_graph_channels:
            value = values[name]
            rank, channels = len(value.shape), value.shape[axis]
            stem = f"{name}__ch{axis}"
            squares = self._channels[(name, axis)]
            x, kept = value, rank
            if not squares and axis < rank - 1:
                # Means only (bias correction): the axes after the channel axis are summed in
                # float32 first (an image row's or a sequence's worth of values), the rest in
                # float64, so the whole tensor is never cast (the cast cost 18x the float32
                # sum). Variances keep float64 throughout: E[x^2] - E[x]^2 cancels.
                x = reduce(
                    "ReduceSum",
                    x,
                    f"{stem}_part",
                    value.dtype,
                    list(range(axis + 1, rank)),
                    value.shape[: axis + 1],
                    fetch=False,
                )
                kept = axis + 1
            x = add("Cast", [x], f"{stem}_f64", double, x.shape, {"to": double}, False)
            axes = add_initializer(
                graph, f"{stem}_axes", np.array([a for a in range(kept) if a != axis], np.int64)
            )
            summed = [x]
            if squares:
                summed.append(add("Mul", [x, x], f"{stem}_sq", double, value.shape, fetch=False))
            outs = [
                add(
                    "ReduceSum",
                    [t, axes],
                    f"{stem}_sum{'sq' if i else ''}",
                    double,
                    [channels],
                    {"keepdims": 0},
                ).name
                for i, t in enumerate(summed)
            ]
            outs.append(add("Shape", [value], f"{stem}_shape", ir.DataType.INT64, [rank]).name)
            channel_outputs[(name, axis)] = tuple(outs)
        return model, sorted(fetched), range_outputs, channel_outputs

    def run(
        self,
        samples,
        batch_size: int,
        split: str = "all",
        holdout: float = 0.5,
        *,
        name: str = "statistics model",
        desc: str = "statistics",
        optimization: str = "all",
    ) -> Collected:
        """One pass over ``samples`` (the ``split`` part) in runs of ``batch_size``.

        The batches are cut into shards of ``cluster.SHARD_SAMPLES`` samples (a count fixed by the
        batch size alone); each shard is reduced on its own, on the active engine
        (``onnxzip.engine.cluster``: this process, or a Ray task), and the shards' statistics
        are merged in stream order, so the result is the same bits wherever the shards ran."""
        model, fetched, range_outputs, channel_outputs = self._build()
        names = list(fetched)
        names += [o for outs in range_outputs.values() for o in outs]
        names += [o for outs in channel_outputs.values() for o in outs]
        numpy_jobs = [("range", t) for t in self._ranges if t in fetched]
        numpy_jobs += [("channel", key) for key in self._channels if key not in channel_outputs]
        numpy_jobs += [("rows", t) for t in self._rows]
        numpy_jobs += [("covariance", t) for t in sorted(self._covariances)]
        sweep = _Sweep(
            cluster.new_key(),
            model,
            name,
            optimization,
            names,
            numpy_jobs,
            range_outputs,
            channel_outputs,
            dict(self._ranges),
            dict(self._channels),
            self.bins,
            dict(self._rows),
            sorted(self._covariances),
        )
        per_shard, total = cluster.shard_plan(
            samples.batch_size_for(batch_size), samples.batch_count(batch_size, split, holdout)
        )
        shards = cluster.shards(samples.batches(batch_size, split, holdout), per_shard)
        result = sweep.empty()
        try:
            for part in cluster.active().map(
                _sweep_shard, shards, sweep, total=total, desc=desc, unit="shard"
            ):
                result.merge(part)
        finally:
            cluster.forget(sweep.key)
        return result


@dataclass
class _Sweep:
    """What every shard of one sweep needs: the augmented model and where each request's
    numbers come out of it."""

    key: str  # names this sweep's session in a worker's cache
    model: ir.Model
    name: str
    optimization: str
    names: list[str]
    numpy_jobs: list[tuple[str, object]]
    range_outputs: dict[str, tuple[str, str, str]]
    channel_outputs: dict[tuple[str, int], tuple[str, ...]]
    ranges: dict[str, bool]
    channels: dict[tuple[str, int], bool]
    bins: int
    rows: dict[str, int] = field(default_factory=dict)
    covariances: list[str] = field(default_factory=list)

    def empty(self) -> Collected:
        return Collected(
            ranges={t: cal.TensorStats(self.bins, hist) for t, hist in self.ranges.items()},
            channels={key: ChannelSums() for key in self.channels},
            rows={t: ChannelRows(limit) for t, limit in self.rows.items()},
            covariances={t: Covariance() for t in self.covariances},
        )


def _sweep_shard(sweep: _Sweep, batches: list) -> Collected:
    """The statistics of one shard (a task on the active engine)."""
    runner = cluster.cached(
        sweep.key,
        lambda: Runner(sweep.model, name=sweep.name, optimization=sweep.optimization),
    )
    result = sweep.empty()
    workers = (
        ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))
        if len(sweep.numpy_jobs) > 1
        else None
    )

    def reduce(job, out):
        kind, key = job
        if kind == "range":
            result.ranges[key].update(out[key])
        elif kind == "rows":
            result.rows[key].update(out[key])
        elif kind == "covariance":
            result.covariances[key].update(out[key])
        else:
            result.channels[key].update(out[key[0]], key[1])

    try:
        for batch in batches:
            out = runner.run(batch, sweep.names) if sweep.names else {}
            if workers is not None:
                list(workers.map(lambda job, out=out: reduce(job, out), sweep.numpy_jobs))
            else:
                for job in sweep.numpy_jobs:
                    reduce(job, out)
            for tensor, (lo, hi, finite) in sweep.range_outputs.items():
                if np.size(out[lo]) == 0:
                    continue  # the tensor is empty in this run: nothing to see
                if math.isfinite(float(np.sum(out[finite], dtype=np.float64))):
                    result.ranges[tensor].update_range(
                        float(np.min(out[lo])), float(np.max(out[hi])), len(batch)
                    )
                else:
                    result.ranges[tensor].update_range(math.nan, math.nan, len(batch))
            for key, outs in sweep.channel_outputs.items():
                shape = out[outs[-1]]
                count = int(np.prod(shape)) // max(1, int(shape[key[1]]))
                squares = out[outs[1]] if len(outs) == 3 else None
                result.channels[key].add(out[outs[0]], squares, count)
            result.samples += len(batch)
    finally:
        if workers is not None:
            workers.shutdown()
    return result
