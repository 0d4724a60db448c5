"""Sample data: reading, validating, batching and splitting the inputs fed to models.

A data set is an ``.npz`` file whose arrays are keyed by model input name, the first axis
indexing samples, plus an optional integer array ``labels`` (one class per sample); or a folder of
such files, read one file at a time so that a data set never has to fit in memory. Every file's
array headers are validated against the model's inputs before any sample is used (names, dtypes,
ranks, fixed dimensions, sample counts), so a mistake in the last file fails at once.

Held-out split: with fraction ``f``, sample ``i`` (counted across files) is held out when
``floor((i + 1) f) > floor(i f)``. The rule needs no total count, interleaves held-out samples
through the whole set, and never changes as files are streamed: calibration and verification
can never see the same sample.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tokenize
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxzip.errors import DataError, NoSamplesError, first_line

logger = logging.getLogger(__name__)

LABELS = "labels"
DEFAULT_HOLDOUT = 0.2
SYNTHETIC_DIM = 16  # size given to symbolic non-batch dimensions of synthetic samples
# the sizes tried in turn when the model does not run at SYNTHETIC_DIM (a detector that
# downsamples 32x and adds its feature pyramid's levels needs a multiple of 32)
SYNTHETIC_DIMS_TRIED = (SYNTHETIC_DIM, 32, 64, 128, 224, 256, 320, 512, 640)


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy dtype and shape (``str`` or ``None`` for a symbolic dim)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]
    # Set when the input is a shape, size, axis or count operand of an op (e.g. "Reshape shape"):
    # random values are meaningless there and can crash a runtime, so no synthetic samples.
    operand_of: str | None = None
    # The axis that counts samples: 0 unless a state input carries the batch further in
    # ([2, batch, 128]); None for an input every sample shares (a scalar sample rate).
    batch_axis: int | None = 0

    @property
    def fixed_batch(self) -> int | None:
        if self.batch_axis is None or len(self.shape) <= self.batch_axis:
            return None
        d = self.shape[self.batch_axis]
        return d if isinstance(d, int) else None

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The inputs a caller must feed (graph inputs that are not initializers)."""
    specs = []
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        if value.type is not None and not isinstance(value.type, ir.TensorType):
            raise DataError(
                f"model input '{value.name}' has type {value.type}: onnxzip feeds tensors only"
            )
        if value.dtype is None:
            raise DataError(f"model input '{value.name}' has no element type")
        dims: tuple[int | str | None, ...] = ()
        if value.shape is not None:
            dims = tuple(d if isinstance(d, int) else d.value for d in value.shape)
        try:
            dtype = np.dtype(value.dtype.numpy())
        except Exception as exc:
            raise DataError(
                f"model input '{value.name}' has element type {value.dtype}, which numpy cannot hold"
            ) from exc
        specs.append(InputSpec(value.name, dtype, dims, _operand_role(value)))
    return specs


# Per op type, the indices of the inputs that hold shapes, sizes, axes or counts: values the
# caller must choose, not samples. Index operands such as Gather's stay: 0/1 fit any axis of size
# two or more.
_STRUCTURAL_OPERANDS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "Slice": (1, 2, 3, 4),
    "Pad": (1, 3),
    "ConstantOfShape": (0,),
    "Resize": (1, 2, 3),
    "Upsample": (1,),
    "Col2Im": (1, 2),
    "Range": (0, 1, 2),
    "TopK": (1,),
    "Split": (1,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "OneHot": (1,),
    "CenterCropPad": (1,),
    "Trilu": (1,),
    "CumSum": (1,),
    "ReduceSum": (1,),
    "ReduceMean": (1,),
    "ReduceMax": (1,),
    "ReduceMin": (1,),
    "ReduceProd": (1,),
    "ReduceL1": (1,),
    "ReduceL2": (1,),
    "ReduceLogSum": (1,),
    "ReduceLogSumExp": (1,),
    "ReduceSumSquare": (1,),
    "NonMaxSuppression": (2, 3, 4),
    "RoiAlign": (2,),
    "DFT": (1, 2),
    "STFT": (1, 3),
    "MelWeightMatrix": (0, 1, 2, 3, 4),
    "HannWindow": (0,),
    "HammingWindow": (0,),
    "BlackmanWindow": (0,),
    "MaxUnpool": (1, 2),
    "Loop": (0, 1),
}


def _operand_role(value: ir.Value) -> str | None:
    integer = value.dtype is not None and value.dtype.is_integer()
    if integer and value.shape is not None and len(value.shape) == 0:
        return "an integer scalar (a size, count or axis)"
    for node, index in value.uses():
        if node.domain not in ("", "ai.onnx"):
            continue
        if index in _STRUCTURAL_OPERANDS.get(node.op_type, ()):
            return f"input {index} of {node.op_type} '{node.name or '?'}'"
        if integer and index == 1 and node.op_type in ("Div", "Mod"):
            # An integer division by a random 0 is a hardware fault, not an error message.
            return f"the integer divisor of {node.op_type} '{node.name or '?'}'"
    return None


@dataclass
class Batch:
    """Inputs for one onnxruntime run, and the labels of those samples when known."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    count: int | None = None  # set for models without a batch axis: one feed is one sample
    # per input, the axis that counts samples when not 0 everywhere (None: shared by all)
    axes: dict[str, int | None] | None = None

    def axis(self, name: str) -> int | None:
        return 0 if self.axes is None else self.axes.get(name, 0)

    def __len__(self) -> int:
        if self.count is not None:
            return self.count
        for name, array in self.inputs.items():
            a = self.axis(name)
            if a is not None:
                return array.shape[a]
        return 1


def _is_holdout(index: np.ndarray, fraction: float) -> np.ndarray:
    return np.floor((index + 1) * fraction) > np.floor(index * fraction)


def _in_split(start: int, n: int, split: str, holdout: float) -> np.ndarray:
    """Which of the samples ``start .. start + n - 1`` belong to ``split``."""
    if split == "all":
        return np.ones(n, bool)
    held = _is_holdout(np.arange(start, start + n), holdout)
    return held if split == "holdout" else ~held


def available_memory() -> int | None:
    """Bytes of memory available now (None where the OS does not say: the checks are skipped)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of every array in an ``.npz`` without reading the data.

    Each array's size from its header is checked against what the archive holds for it and
    against the memory available, before anything is allocated: a header that declares
    gigabytes in a small file, or a compressed member that would expand beyond memory, is
    refused in one line.
    """
    headers = {}
    budget = available_memory()
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
                    else:
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
                    header_bytes = member.tell()
                name = info.filename[: -len(".npy")]
                dtype = np.dtype(dtype)
                if dtype.hasobject:
                    raise DataError(f"{path}: array '{name}' holds Python objects (not read)")
                nbytes = math.prod(shape) * dtype.itemsize
                if nbytes > info.file_size - header_bytes:
                    raise DataError(
                        f"{path}: array '{name}' declares {nbytes:,} bytes but the archive holds "
                        f"{max(info.file_size - header_bytes, 0):,}: truncated or corrupt"
                    )
                if budget is not None and nbytes > budget // 4:
                    raise DataError(
                        f"{path}: array '{name}' holds {_gib(nbytes)}, more than a quarter of the "
                        f"memory available ({_gib(budget)}): split the samples into a folder of "
                        "smaller .npz files"
                    )
                headers[name] = (tuple(shape), dtype)
    except _NPZ_ERRORS as exc:
        raise DataError(f"{path}: not a readable .npz file ({_first_line(exc)})") from exc
    return headers


# What a corrupt archive raises: zip structure, numpy's header parser (a mangled header dict is
# tokenized as Python literals: SyntaxError, TokenError), compression methods zipfile lacks.
_NPZ_ERRORS = (
    zipfile.BadZipFile,
    ValueError,
    OSError,
    EOFError,
    SyntaxError,
    tokenize.TokenError,
    NotImplementedError,
    zlib.error,
)


def _first_line(exc: BaseException) -> str:
    if isinstance(exc, (SyntaxError, tokenize.TokenError)):
        return "corrupt array header"
    return first_line(exc)


class Samples:
    """A stream of samples for a model. Subclasses yield whole chunks; this class batches them."""

    synthetic = False
    has_labels = False
    count: int | None = None
    # the most samples one run may hold, from the memory budget (``analysis.fit_memory``)
    max_batch: int | None = None

    def __init__(self, specs: list[InputSpec]):
        if not specs:
            raise DataError("the model has no inputs to feed")
        self.specs = specs
        self.unbatched = not has_batch_axis(specs)
        self.axes: dict[str, int | None] | None = (
            {s.name: s.batch_axis for s in specs} if any(s.batch_axis != 0 for s in specs) else None
        )

    def describe(self) -> str:
        raise NotImplementedError

    def chunks(self) -> Iterator[Batch]:
        """Yields the samples in order, in chunks of any size (a file, a slice)."""
        raise NotImplementedError

    def batch_size_for(self, requested: int) -> int:
        """The batch size the model accepts: a fixed batch dimension overrides the request."""
        if self.unbatched:
            return 1
        fixed = {s.fixed_batch for s in self.specs} - {None}
        if len(fixed) > 1:
            raise DataError(f"model inputs fix different batch sizes: {sorted(fixed)}")
        if fixed:
            (size,) = fixed
            if size != requested:
                logger.info(
                    "the model fixes batch size %d; using it instead of %d", size, requested
                )
            return size
        if requested < 1:
            raise DataError(f"batch size must be at least 1, got {requested}")
        if self.max_batch is not None and requested > self.max_batch:
            return self.max_batch
        return requested

    def batch_count(
        self, batch_size: int = 32, split: str = "all", holdout: float = DEFAULT_HOLDOUT
    ) -> int | None:
        """How many batches ``batches`` yields, when the sample count is known (None else)."""
        kept = self.count_in(split, holdout)
        return None if kept is None else math.ceil(kept / self.batch_size_for(batch_size))

    def count_in(self, split: str = "all", holdout: float = DEFAULT_HOLDOUT) -> int | None:
        """How many samples ``split`` holds, when the sample count is known (None else)."""
        if self.count is None:
            return None
        held = holdout_count(self.count, holdout)
        return {"all": self.count, "holdout": held}.get(split, self.count - held)

    def batches(
        self, batch_size: int = 32, split: str = "all", holdout: float = DEFAULT_HOLDOUT
    ) -> Iterator[Batch]:
        """Yields batches of ``batch_size`` samples.

        Args:
            batch_size: samples per batch (a fixed batch dimension in the model wins).
            split: ``"all"``, ``"calibration"`` (samples not held out) or ``"holdout"``.
            holdout: the held-out fraction used by the two splits, in (0, 1).
        """
        if split not in ("all", "calibration", "holdout"):
            raise ValueError(f"unknown split {split!r}")
        if split != "all" and not 0.0 < holdout < 1.0:
            raise DataError(f"held-out fraction must be in (0, 1), got {holdout}")
        if self.unbatched:
            yield from self._single_feeds(split, holdout)
            return
        size = self.batch_size_for(batch_size)
        fixed = any(s.fixed_batch is not None for s in self.specs)
        pending: list[Batch] = []
        pending_n = 0
        start = 0
        yielded = 0
        for chunk in self.chunks():
            n = len(chunk)
            if split != "all":
                chunk = _take(chunk, np.nonzero(_in_split(start, n, split, holdout))[0])
            start += n
            if len(chunk) == 0:
                continue
            if pending and not _same_trailing_shapes(pending[-1], chunk):
                # Symbolic non-batch dims differ between files: never concatenate across them.
                if not fixed:
                    yield _concat(pending)
                    yielded += pending_n
                else:
                    logger.warning(
                        "dropped %d samples: the model's fixed batch size is %d and the next file's "
                        "samples have other dimensions",
                        pending_n,
                        size,
                    )
                pending, pending_n = [], 0
            pending.append(chunk)
            pending_n += len(chunk)
            while pending_n >= size:
                merged = _concat(pending)
                yield _take(merged, np.arange(size))
                yielded += size
                rest = _take(merged, np.arange(size, len(merged)))
                pending, pending_n = ([rest], len(rest)) if len(rest) else ([], 0)
        if pending_n:
            if fixed:
                logger.warning(
                    "dropped the last %d samples: the model's fixed batch size is %d",
                    pending_n,
                    size,
                )
            else:
                yield _concat(pending)
                yielded += pending_n
        if yielded == 0:
            short = f" (fewer than the model's fixed batch size {size})" if fixed and start else ""
            raise self._no_samples(split, short)

    def _single_feeds(self, split: str, holdout: float) -> Iterator[Batch]:
        """Models without a batch axis: each sample is one whole feed (the file's first axis)."""
        start = 0
        yielded = 0
        for chunk in self.chunks():
            n = len(next(iter(chunk.inputs.values())))
            keep = _in_split(start, n, split, holdout)
            start += n
            for i in np.nonzero(keep)[0]:
                labels = None if chunk.labels is None else chunk.labels[i : i + 1]
                feed = {k: np.ascontiguousarray(v[i]) for k, v in chunk.inputs.items()}
                yield Batch(feed, labels, count=1)
                yielded += 1
        if yielded == 0:
            raise self._no_samples(split)

    def _no_samples(self, split: str, note: str = "") -> NoSamplesError:
        where = "" if split == "all" else f" in the {split} split"
        return NoSamplesError(f"{self.describe()}: no samples{where}{note}")


def has_batch_axis(specs: list[InputSpec]) -> bool:
    """Whether the inputs share a first axis that counts samples.

    Not when an input is a scalar or when inputs fix different first dimensions (a [2, 3] and a
    [3, 4] MatMul operand): then one sample is one whole feed, and data files hold a leading sample
    axis in front of each input's full shape.
    """
    if any(s.batch_axis == 0 and (len(s.shape) == 0 or s.shape[0] == 0) for s in specs):
        return False
    if all(s.batch_axis is None for s in specs):
        return False
    return len({s.fixed_batch for s in specs} - {None}) <= 1


def _take(batch: Batch, index: np.ndarray) -> Batch:
    labels = None if batch.labels is None else batch.labels[index]
    inputs = {}
    for k, v in batch.inputs.items():
        a = batch.axis(k)
        inputs[k] = v if a is None else (v[index] if a == 0 else np.take(v, index, axis=a))
    return Batch(inputs, labels, axes=batch.axes)


def _other_dims(batch: Batch, name: str) -> tuple:
    shape, a = batch.inputs[name].shape, batch.axis(name)
    return shape if a is None else shape[:a] + shape[a + 1 :]


def _same_trailing_shapes(a: Batch, b: Batch) -> bool:
    return all(_other_dims(a, k) == _other_dims(b, k) for k in a.inputs)


def _concat(batches: list[Batch]) -> Batch:
    if len(batches) == 1:
        return batches[0]
    first = batches[0]
    inputs = {}
    for k in first.inputs:
        a = first.axis(k)
        inputs[k] = (
            first.inputs[k] if a is None else np.concatenate([b.inputs[k] for b in batches], a)
        )
    labels = None
    if all(b.labels is not None for b in batches):
        labels = np.concatenate([b.labels for b in batches])
    return Batch(inputs, labels, axes=first.axes)


def assign_batch_axes(
    specs: list[InputSpec],
    headers: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None,
    given: dict[str, int | None] | None = None,
) -> list[InputSpec]:
    """Which axis of each input counts samples.

    Axis 0 everywhere, unless an input's first dimension is fixed while others are dynamic:
    a streaming model's state ``[2, batch, 128]`` next to ``input [batch, 512]``. Its batch axis
    is then the dynamic axis that holds the data's sample count (from ``headers``), or the one
    named like the others' batch dimension, or its only dynamic axis. A scalar input next to
    batched ones (a sample rate) is shared by every sample when the data holds it as one value.
    ``given`` (``--batch-axis name=axis``, ``none`` for shared) decides first. Without dynamic
    first dimensions, or when nothing fits, the specs are returned as they were.
    """
    given = dict(given or {})
    names = {s.name for s in specs}
    for name in given:
        if name not in names:
            raise DataError(f"batch axis given for '{name}', which is not a model input")
    batched = [s for s in specs if s.shape and not isinstance(s.shape[0], int)]
    if not batched and not given:
        return specs
    symbols = {s.shape[0] for s in batched if s.shape[0] is not None}
    count = None
    if headers is not None:
        counts = {
            headers[s.name][0][0] for s in batched if s.name in headers and headers[s.name][0]
        }
        count = next(iter(counts)) if len(counts) == 1 else None
    out = []
    changed = False
    for spec in specs:
        axis = spec.batch_axis
        if spec.name in given:
            axis = given[spec.name]
            if axis is not None and not 0 <= axis < max(1, len(spec.shape)):
                raise DataError(f"batch axis {axis} for input {spec.describe()}: out of its rank")
        elif spec in batched:
            axis = 0
        elif not spec.shape:
            header = headers.get(spec.name) if headers is not None else None
            if header is None or header[0] != () or not batched:
                out.append(spec)  # the old layout: a sample axis in front of each input
                continue
            axis = None
        else:
            dynamic = [k for k, d in enumerate(spec.shape) if k > 0 and not isinstance(d, int)]
            header = headers.get(spec.name) if headers is not None else None
            matching = [
                k
                for k in dynamic
                if header is not None
                and len(header[0]) == len(spec.shape)
                and header[0][k] == count
            ]
            named = [k for k in dynamic if spec.shape[k] in symbols]
            pick = matching or named or (dynamic if len(dynamic) == 1 and batched else [])
            if not pick:
                out.append(spec)
                continue
            axis = pick[0]
        if axis != spec.batch_axis:
            changed = True
        out.append(dataclasses.replace(spec, batch_axis=axis))
    return out if changed else specs


class NpzSamples(Samples):
    """Samples from an ``.npz`` file or a folder of ``.npz`` files (streamed file by file)."""

    def __init__(
        self,
        path: str | Path,
        specs: list[InputSpec],
        batch_axes: dict[str, int | None] | None = None,
    ):
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"{self.path}: no such file or folder")
        if self.path.is_dir():
            self.files = sorted(self.path.glob("*.npz"))
            if not self.files:
                raise DataError(f"{self.path}: folder holds no .npz files")
        else:
            self.files = [self.path]
        super().__init__(assign_batch_axes(specs, _npz_headers(self.files[0]), batch_axes))
        self.count = 0
        labelled = []
        for file in self.files:
            n, has_labels = self._validate(file)
            self.count += n
            labelled.append(has_labels)
        if self.count == 0:
            raise DataError(f"{self.path}: the data set is empty (0 samples)")
        if any(labelled) and not all(labelled):
            missing = [f.name for f, has in zip(self.files, labelled, strict=True) if not has][0]
            raise DataError(
                f"{self.path}: some files have 'labels' and some do not (e.g. {missing})"
            )
        self.has_labels = all(labelled)

    def describe(self) -> str:
        return str(self.path)

    def _validate(self, file: Path) -> tuple[int, bool]:
        headers = _npz_headers(file)
        names = {s.name for s in self.specs}
        for key in headers:
            if key != LABELS and key not in names:
                expected = ", ".join(sorted(names))
                raise DataError(
                    f"{file}: array '{key}' is not a model input (the model takes: {expected})"
                )
        counts = {}
        for spec in self.specs:
            if spec.name not in headers:
                raise DataError(f"{file}: no array for model input '{spec.name}'")
            shape, dtype = headers[spec.name]
            if dtype != spec.dtype:
                raise DataError(
                    f"{file}: array '{spec.name}' has dtype {dtype}, the model input expects {spec.dtype}"
                )
            # Without a batch axis, the file adds a sample axis in front of the input's shape.
            want_shape = (None, *spec.shape) if self.unbatched else spec.shape
            a = 0 if self.unbatched else spec.batch_axis
            if (want_shape or a is None) and len(shape) != len(want_shape):
                where = (
                    "an added first axis = samples"
                    if self.unbatched
                    else "one value every sample shares"
                    if a is None
                    else f"axis {a} = samples"
                )
                raise DataError(
                    f"{file}: array '{spec.name}' has shape {shape} (rank {len(shape)}); the model input "
                    f"is {spec.describe()} (rank {len(want_shape)} expected, {where})"
                )
            for axis, (got, want) in enumerate(zip(shape, want_shape, strict=True)):
                if axis != a and isinstance(want, int) and got != want:
                    raise DataError(
                        f"{file}: array '{spec.name}' has shape {shape}; the model input is "
                        f"{spec.describe()} (axis {axis} must be {want})"
                    )
            if a is not None:
                counts[spec.name] = shape[a] if shape else 1
        if len(set(counts.values())) > 1:
            raise DataError(f"{file}: arrays hold different numbers of samples: {counts}")
        n = next(iter(counts.values()))
        if LABELS in headers:
            shape, dtype = headers[LABELS]
            if dtype.kind not in "iu" or len(shape) != 1:
                raise DataError(
                    f"{file}: 'labels' must be a 1-D integer array, got {dtype}{list(shape)}"
                )
            if shape[0] != n:
                raise DataError(f"{file}: {shape[0]} labels for {n} samples")
        return n, LABELS in headers

    def chunks(self) -> Iterator[Batch]:
        for file in self.files:
            try:
                with np.load(file, allow_pickle=False) as archive:
                    inputs = {spec.name: archive[spec.name] for spec in self.specs}
                    labels = archive[LABELS].astype(np.int64) if LABELS in archive.files else None
            except _NPZ_ERRORS as exc:
                raise DataError(f"{file}: cannot be read: {_first_line(exc)}") from exc
            for name, array in inputs.items():
                if array.dtype.kind in "fc":
                    a = 0 if self.unbatched or not self.axes else self.axes.get(name, 0)
                    if a is None or array.ndim == 0:  # shared by every sample
                        rows = array.reshape(1, -1)
                    else:
                        rows = np.moveaxis(array, a, 0).reshape(array.shape[a], -1)
                    bad = ~np.isfinite(rows).all(axis=1)
                    if bad.any():
                        raise DataError(
                            f"{file}: array '{name}' contains NaN or Inf (first at sample {int(np.argmax(bad))})"
                        )
            yield Batch(inputs, labels, axes=None if self.unbatched else self.axes)


class SyntheticSamples(Samples):
    """``count`` random samples drawn from the input specs (seeded). Reports say they are synthetic.

    Floats are standard normal, integers uniform in {0, 1}, booleans fair coins; symbolic
    non-batch dimensions get size ``SYNTHETIC_DIM`` (or the size ``fit_dim`` found).
    """

    synthetic = True

    def __init__(
        self,
        specs: list[InputSpec],
        count: int,
        seed: int = 0,
        batch_axes: dict[str, int | None] | None = None,
    ):
        super().__init__(assign_batch_axes(specs, None, batch_axes))
        if count < 1:
            raise DataError(f"--synthetic needs at least 1 sample, got {count}")
        for spec in specs:
            if spec.dtype.kind not in "fiub":  # strings, bfloat16, float8: nothing to draw
                raise DataError(f"cannot synthesise samples for input {spec.describe()}")
            if spec.operand_of is not None:
                raise DataError(
                    f"cannot synthesise samples for input '{spec.name}': it is {spec.operand_of}, "
                    "whose values random samples cannot choose safely; give --data"
                )
        self.count = count
        self.seed = seed
        self.dim = SYNTHETIC_DIM

    def symbolic_dims(self) -> list[str]:
        """The names of the inputs' symbolic dimensions other than the batch axis."""
        names = []
        for spec in self.specs:
            a = spec.batch_axis
            for i, d in enumerate(spec.shape):
                if not isinstance(d, int) and (self.unbatched or i != a):
                    names.append(str(d) if d is not None else f"{spec.name}[{i}]")
        return list(dict.fromkeys(names))

    def fit_dim(self, runs) -> int:
        """Gives the symbolic non-batch dimensions the first size of ``SYNTHETIC_DIMS_TRIED``
        at which ``runs(batch)`` (one sample) says the model runs, and returns it.

        Raises:
            DataError: the model runs at none of them.
        """
        for dim in SYNTHETIC_DIMS_TRIED:
            self.dim = dim
            if runs(next(iter(self.batches(1)))):
                return dim
        self.dim = SYNTHETIC_DIM
        raise DataError(
            f"--synthetic: the model runs at none of the sizes {SYNTHETIC_DIMS_TRIED[0]}-"
            f"{SYNTHETIC_DIMS_TRIED[-1]} given to its symbolic dimensions "
            f"({', '.join(self.symbolic_dims())}); give --data with real samples"
        )

    def describe(self) -> str:
        sized = f", symbolic dimensions {self.dim}" if self.dim != SYNTHETIC_DIM else ""
        return f"{self.count} synthetic samples{sized}"

    def _sample_shape(self, spec: InputSpec) -> list[int]:
        """One sample's shape: symbolic dimensions get ``self.dim``."""
        a = spec.batch_axis
        full = spec.shape if self.unbatched or a is None else spec.shape[:a] + spec.shape[a + 1 :]
        return [d if isinstance(d, int) else self.dim for d in full]

    def chunks(self) -> Iterator[Batch]:
        rng = np.random.default_rng(self.seed)
        # Drawn as float64 / int64 before the cast: 8 bytes per element.
        per_sample = sum(8 * math.prod(self._sample_shape(spec)) for spec in self.specs)
        budget = available_memory()
        if budget is not None and per_sample > budget // 4:
            raise DataError(
                f"--synthetic: one random sample would take {_gib(per_sample)} "
                f"(memory available: {_gib(budget)}); check the model's input shapes"
            )
        # At most 256 samples per chunk, and chunks of at most 256 MiB.
        step = max(1, min(256, (2**28) // max(per_sample, 1)))
        for start in range(0, self.count, step):
            n = min(step, self.count - start)
            inputs = {}
            for spec in self.specs:
                shape = self._sample_shape(spec)
                if not self.unbatched and spec.batch_axis is not None:
                    shape.insert(spec.batch_axis, n)
                elif self.unbatched:
                    shape.insert(0, n)
                if spec.dtype.kind == "f":
                    inputs[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
                elif spec.dtype.kind in "iu":
                    inputs[spec.name] = rng.integers(0, 2, shape).astype(spec.dtype)
                else:
                    inputs[spec.name] = rng.integers(0, 2, shape).astype(bool)
            yield Batch(inputs, axes=None if self.unbatched else self.axes)


def open_samples(
    specs: list[InputSpec],
    path: str | Path | None = None,
    synthetic: int | None = None,
    seed: int = 0,
    batch_axes: dict[str, int | None] | None = None,
) -> Samples:
    """Samples from ``path`` (an .npz or a folder of them), or ``synthetic`` random ones;
    ``batch_axes`` says which axis of an input counts samples (see ``assign_batch_axes``)."""
    if path is not None and synthetic is not None:
        raise DataError("give either --data or --synthetic, not both")
    if path is not None:
        return NpzSamples(path, specs, batch_axes)
    if synthetic is not None:
        return SyntheticSamples(specs, synthetic, seed, batch_axes)
    raise DataError("no samples: give --data FILE.npz or --synthetic N")


def holdout_count(total: int, fraction: float = DEFAULT_HOLDOUT) -> int:
    """How many of ``total`` samples the held-out rule sets aside."""
    return int(math.floor(total * fraction))
