"""What each output is, and the floor a compressed model must hold on it to still do its job.

Every output (or every slice of an output built by concatenating different things) is given a
*kind* from the graph: what produced it, its element type and its shape. Each kind has default
floors, checked by ``verify`` unless explicit thresholds are given (they replace the floors) or
floors are turned off. PASS means every floor held.

| kind | recognised by | default floors |
| --- | --- | --- |
| class scores | float ``[N, C]``, ``C >= 2``, not L2-normalised, and not a raw head beside another output's Softmax | top-1 agreement >= 0.98; with labels, accuracy drop <= 1 point |
| class scores per position | float, rank >= 3, Softmax / LogSoftmax over the last axis, or a MatMul / Gemm projection to more features than it reads (float or quantized; CTC and language-model logits) | argmax agreement per position >= 0.99; for sequences of at most 128 positions (text lines), the whole argmax sequence identical in >= 0.95 of the samples |
| mask | float ``[N, C, H, W]``, ``C >= 2``, from Softmax over axis 1, Conv, ConvTranspose or Resize | per-pixel argmax agreement >= 0.95 |
| probabilities | produced by Sigmoid, HardSigmoid or Softmax (not the above) | SNR >= 10 dB; F1 of the 0.5 decision >= 0.9 where the reference has positives |
| embedding | L2-normalised ``[N, D]``, or ``[N, S, D]`` with ``D >= 16`` (hidden states) | mean cosine >= 0.99, min cosine >= 0.95 |
| one value | one float per sample (``[N]``, ``[N, 1]``, a scalar) | SNR >= 20 dB over the samples (a cosine of one value is always 1) |
| regression | any other float output (boxes, coordinates, depth, feature maps; an ``[N, D]`` head the model leaves raw while another output is its Softmax) | SNR >= 20 dB |
| integer | integer or boolean outputs (indices, ids, masks) | exact element agreement >= 0.99 |

Slices: an output whose non-batch axis is filled by a ``Concat`` of parts of different kinds
(box coordinates and class probabilities, say) is measured part by part, each part with its own
kind and floors; the whole output's floors are then not applied (its numbers are dominated by
its largest part). The Concat is found through Identity, Transpose, Reshape (dims up to the
axis unchanged) and Concats along other axes whose inputs are all split the same way (a
detector's per-scale heads joined along the anchors). A declared output shape that the runs
contradict (rank) is replaced by the observed one.

Metrics, with ``r`` the reference and ``c`` the candidate:

* top-1 / argmax agreement: the fraction of rows (samples, positions, pixels) with the same
  argmax along the class axis, a row whose argmaxes differ only between classes that both models
  score within ``TIE_LOG_RATIO`` (2^-10, float16's resolution) in log-probability counting as
  the same (a tie, reported);
* decision F1: with ``R = r >= 0.5`` and ``C = c >= 0.5``, ``2 |R & C| / (|R| + |C|)``;
* SNR: ``10 log10(sum r^2 / sum (r - c)^2)``; cosine per sample over its flattened values;
* exact agreement: the fraction of equal elements;
* whole-sequence agreement: the fraction of samples whose argmax at every position is the same
  (stricter than equal decoded text, which ignores changes between blanks and repeats).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxzip import metrics as metrics_mod
from onnxzip.ir.ops import LAYOUT_OPS, attr

CLASS_SCORES = "class scores"
CLASS_PER_POSITION = "class scores per position"
MASK = "mask"
PROBABILITIES = "probabilities"
EMBEDDING = "embedding"
ONE_VALUE = "one value"
REGRESSION = "regression"
INTEGER = "integer"


@dataclass(frozen=True)
class Floor:
    metric: str  # top1 | accuracy_drop | snr_db | decision_f1 | cosine_mean | cosine_min | exact
    bound: float
    at_most: bool = False  # accuracy_drop is an upper bound, the rest lower bounds

    def describe(self) -> str:
        unit = " dB" if self.metric == "snr_db" else ""
        return f"{METRIC_NAMES[self.metric]} {'<=' if self.at_most else '>='} {self.bound:g}{unit}"


METRIC_NAMES = {
    "top1": "top-1 agreement",
    "accuracy_drop": "accuracy drop",
    "snr_db": "SNR",
    "decision_f1": "F1 of the 0.5 decision",
    "cosine_mean": "mean cosine",
    "cosine_min": "min cosine",
    "exact": "exact agreement",
    "sequence": "whole-sequence agreement",
    "task": "task metric",
}
# sequences up to this many positions (a text line, a label sequence) must keep every argmax in
# most samples; longer ones (a language model's tokens) are judged per position only
SHORT_SEQUENCE = 128

DEFAULT_FLOORS: dict[str, tuple[Floor, ...]] = {
    CLASS_SCORES: (Floor("top1", 0.98), Floor("accuracy_drop", 0.01, at_most=True)),
    CLASS_PER_POSITION: (Floor("top1", 0.99), Floor("sequence", 0.95)),
    MASK: (Floor("top1", 0.95),),
    # SNR over every element counts the noise on the many near-zero scores that decide nothing:
    # 10 dB, measured on real models: a detector's objectness at 12.3 dB kept 99.2 % of its
    # detections; class scores at 2.2 dB kept 4 of 10, a voice-activity output at 6.6 dB 79 % of
    # its frames. The decision F1 is the sharper check.
    PROBABILITIES: (Floor("snr_db", 10.0), Floor("decision_f1", 0.9)),
    EMBEDDING: (Floor("cosine_mean", 0.99), Floor("cosine_min", 0.95)),
    ONE_VALUE: (Floor("snr_db", 20.0),),
    REGRESSION: (Floor("snr_db", 20.0),),
    INTEGER: (Floor("exact", 0.99),),
}

# ops that move values without changing what they mean
_MOVES = LAYOUT_OPS | {"Cast"}
_PROBABILITY_OPS = ("Sigmoid", "HardSigmoid", "Softmax")


@dataclass
class Part:
    """One measured part of an output: the whole of it, or a slice along ``axis``."""

    output: str
    kind: str
    why: str
    axis: int | None = None  # slice axis of the output, None for the whole output
    start: int = 0
    stop: int = 0
    class_axis: int | None = None  # where argmax agreement is taken
    floors: tuple[Floor, ...] = ()
    # class scores that are probabilities (a Softmax's output): ties are judged on their logs
    probabilities: bool = False

    @property
    def name(self) -> str:
        if self.axis is None:
            return self.output
        return f"{self.output}[{self.start}:{self.stop} on axis {self.axis}]"


def _source(value: ir.Value) -> ir.Node | None:
    """The producer of ``value`` past the ops that only move values."""
    node = value.producer()
    while (
        node is not None and node.op_type in _MOVES and node.inputs and node.inputs[0] is not None
    ):
        node = node.inputs[0].producer()
    return node


def _beside_a_softmax_head(value: ir.Value) -> bool:
    """Whether another output of the graph is a Softmax/LogSoftmax: a model that turns one head
    into class probabilities itself leaves its raw heads as regressions (MTCNN's face score
    beside its box offsets and landmarks), whose argmax decides nothing."""
    src = value.producer()
    graph = src.graph if src is not None else None
    if graph is None:
        return False
    for other in graph.outputs:
        head = _source(other) if other is not value else None
        if head is not None and head.op_type in ("Softmax", "LogSoftmax"):
            return True
    return False


def is_l2_normalised(value: ir.Value) -> bool:
    """``LpNormalization(p=2)``, or ``x / f(ReduceL2(x))`` with f a clamp such as Max or Clip."""
    node = value.producer()
    if node is None:
        return False
    if node.op_type == "LpNormalization":
        return True
    if node.op_type != "Div" or len(node.inputs) < 2:
        return False
    norm = node.inputs[1].producer() if node.inputs[1] is not None else None
    while norm is not None and norm.op_type in ("Max", "Clip", "Add", "Unsqueeze", "Reshape"):
        norm = norm.inputs[0].producer() if norm.inputs[0] is not None else None
    return norm is not None and norm.op_type == "ReduceL2"


_PROJECTIONS = (
    "MatMul",
    "Gemm",
    "MatMulInteger",
    "QLinearMatMul",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "MatMulNBits",
    "QGemm",
)


def _projection(node: ir.Node | None, depth: int = 0) -> ir.Node | None:
    """The MatMul / Gemm (float or quantized) behind ``node``, through the Add of a bias, a Mul
    by a scale (Gemm's alpha, or a dynamic quantization's) or a Cast; None if there is none."""
    if node is None or depth > 4:
        return None
    if node.op_type in _PROJECTIONS:
        return node
    if node.op_type in ("Add", "Mul", "Cast", "DequantizeLinear"):
        for v in node.inputs:
            found = _projection(v.producer(), depth + 1) if v is not None else None
            if found is not None:
                return found
    return None


def _widens(node: ir.Node) -> bool:
    """A projection to more features than it reads: to a vocabulary or a set of classes (a
    CTC or language-model head), not to hidden features."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if w is not None and w.shape is not None and len(w.shape) == 2:
        # the weight says it even where activations are untyped: [K, C], Gemm transB [C, K]
        k, c = w.shape
        if node.op_type == "Gemm" and attr(node, "transB", 0):
            k, c = c, k
        return isinstance(k, int) and isinstance(c, int) and c > k
    x, out = node.inputs[0] if node.inputs else None, node.outputs[0]
    if x is None or x.shape is None or out.shape is None or not x.shape or not out.shape:
        return False
    k, c = x.shape[-1], out.shape[-1]
    return isinstance(k, int) and isinstance(c, int) and c > k


def _keeps_last_axis(value: ir.Value, src: ir.Node) -> bool:
    """``value`` is ``src``'s output, or a Reshape of it that keeps the last axis (a Softmax
    below opset 13 over the last axis, written as Reshape-Softmax-Reshape on loading)."""
    producer = value.producer()
    if producer is src:
        return True
    if producer is None or producer.op_type != "Reshape" or producer.inputs[0] is None:
        return False
    if producer.inputs[0].producer() is not src:
        return False
    inner = src.outputs[0].shape
    last = value.shape[-1] if value.shape is not None and len(value.shape) else None
    return isinstance(last, int) and (inner is None or inner[-1] == last)


def _static(shape) -> list[int | None]:
    return [d if isinstance(d, int) else None for d in shape]


def classify(value: ir.Value, shape=None) -> Part:
    """The kind of one output (or of one part of it, with ``shape`` the part's shape)."""
    if shape is None:
        shape = value.shape
    shape = None if shape is None else _static(shape)
    dtype = value.dtype
    name = value.name
    if dtype is not None and not dtype.is_floating_point():
        return Part(name, INTEGER, f"{dtype.name.lower()} elements")
    src = _source(value)
    op = src.op_type if src is not None else None
    if shape is None:
        if op in _PROBABILITY_OPS:
            return Part(name, PROBABILITIES, f"from {op}")
        return Part(name, REGRESSION, "shape unknown")
    rank = len(shape)
    per_sample = math.prod(d for d in shape[1:] if d is not None) if rank > 1 else 1
    unknown_tail = any(d is None for d in shape[1:])
    if rank <= 1 or (per_sample == 1 and not unknown_tail):
        if op in _PROBABILITY_OPS:
            return Part(name, PROBABILITIES, f"one value per sample, from {op}")
        return Part(name, ONE_VALUE, "one value per sample")
    if rank == 2:
        if is_l2_normalised(value):
            return Part(name, EMBEDDING, "L2-normalised [N, D]")
        if op == "Sigmoid":
            return Part(name, PROBABILITIES, "[N, C] from Sigmoid (independent probabilities)")
        if op not in ("Softmax", "LogSoftmax") and _beside_a_softmax_head(value):
            return Part(name, REGRESSION, "[N, D] raw values beside a Softmax head (boxes, points)")
        if shape[1] is not None and shape[1] >= 2:
            return Part(
                name,
                CLASS_SCORES,
                f"[N, {shape[1]}] class scores",
                class_axis=1,
                probabilities=op == "Softmax",
            )
        return Part(name, REGRESSION, "[N, D] with D unknown")
    softmax_axis = None
    if src is not None and src.op_type in ("Softmax", "LogSoftmax"):
        # Softmax keeps its input's shape: the output's rank counts where the input's is unknown
        known = src.inputs[0].shape
        softmax_axis = attr(src, "axis", -1) % (len(known) if known is not None else rank)
    if src is not None and _keeps_last_axis(value, src) and softmax_axis == rank - 1:
        return Part(
            name,
            CLASS_PER_POSITION,
            f"{src.op_type} over the last axis",
            class_axis=rank - 1,
            probabilities=src.op_type == "Softmax",
        )
    head = _projection(src)
    if head is not None and _widens(head) and shape[-1] is not None and shape[-1] >= 2:
        # per-position logits of a final projection (CTC recognizers, language-model heads)
        return Part(
            name, CLASS_PER_POSITION, f"{src.op_type} projection per position", class_axis=rank - 1
        )
    if rank == 4 and shape[1] is not None and shape[1] >= 2:
        if src is value.producer() and (
            softmax_axis == 1 or op in ("Conv", "ConvTranspose", "Resize", "Upsample")
        ):
            return Part(
                name,
                MASK,
                f"[N, {shape[1]}, H, W] from {op}",
                class_axis=1,
                probabilities=op == "Softmax",
            )
    if op in _PROBABILITY_OPS:
        return Part(name, PROBABILITIES, f"from {op}")
    if rank == 3 and shape[-1] is not None and shape[-1] >= 16:
        return Part(name, EMBEDDING, f"[N, S, {shape[-1]}] hidden states (cosine per sample)")
    return Part(name, REGRESSION, f"rank-{rank} values")


def _same_dims(a, b) -> bool:
    return len(a) == len(b) and all(
        x == y if isinstance(x, int) or isinstance(y, int) else x.value == y.value and x.value
        for x, y in zip(a, b, strict=True)
    )


def trace_pieces(value: ir.Value, axis: int, depth: int = 0):
    """The pieces ``(value, start, stop)`` that fill ``axis`` of ``value``: found at a Concat
    along that axis, through Identity, Transpose (the axis permuted), Reshape (when the dims up
    to the axis are unchanged) and Concats along other axes whose inputs are all filled the same
    way (a detector's heads per scale, concatenated along the anchors). None when not found."""
    node = value.producer()
    if node is None or value.shape is None or depth > 16:
        return None
    rank = len(value.shape)
    op = node.op_type
    first = node.inputs[0] if node.inputs else None
    if op == "Identity" and first is not None:
        return trace_pieces(first, axis, depth + 1)
    if op == "Transpose" and first is not None and first.shape is not None:
        perm = list(attr(node, "perm", list(range(rank))[::-1]))
        return trace_pieces(first, perm[axis], depth + 1)
    if op == "Reshape" and first is not None and first.shape is not None:
        # the dims from after the batch up to the axis unchanged (the batch may be -1 there)
        if len(first.shape) > axis and _same_dims(
            first.shape[1 : axis + 1], value.shape[1 : axis + 1]
        ):
            return trace_pieces(first, axis, depth + 1)
        return None
    if op != "Concat" or len(node.inputs) < 2:
        return None
    cat = attr(node, "axis", 0) % rank
    if cat == axis:
        pieces, start = [], 0
        for piece in node.inputs:
            if piece is None or piece.shape is None or len(piece.shape) != rank:
                return None
            size = piece.shape[axis]
            if not isinstance(size, int):
                return None
            pieces.append((piece, start, start + size))
            start += size
        return pieces
    found = [trace_pieces(piece, axis, depth + 1) for piece in node.inputs if piece is not None]
    if not found or any(f is None for f in found):
        return None
    layout = [(s, e) for _, s, e in found[0]]
    if all([(s, e) for _, s, e in f] == layout for f in found):
        return found[0]
    return None


def parts_of(value: ir.Value, shape=None) -> list[Part]:
    """The parts whose floors are checked for one output: the whole of it, or its slices along
    the first non-batch axis that concatenates parts of different kinds. ``shape`` overrides a
    declared shape that the runs contradict."""
    whole = classify(value, shape)
    whole.floors = DEFAULT_FLOORS[whole.kind]
    if whole.kind == INTEGER or value.shape is None:
        return [whole]
    if shape is not None and len(shape) != len(value.shape):
        return [whole]  # the graph's axes are not the run's: no slices from the graph
    full = list(shape) if shape is not None else list(value.shape)
    for axis in range(1, len(full)):
        pieces = trace_pieces(value, axis)
        if not pieces:
            continue
        sliced = []
        for piece, start, stop in pieces:
            dims = list(full)
            dims[axis] = stop - start
            part = classify(piece, dims)
            part.output, part.axis, part.start, part.stop = value.name, axis, start, stop
            if part.class_axis is not None and part.class_axis == axis:
                # a slice of the classes is not a classifier of its own
                part.kind, part.class_axis, part.why = REGRESSION, None, "part of a class axis"
            part.floors = DEFAULT_FLOORS[part.kind]
            sliced.append(part)
        if len({p.kind for p in sliced}) > 1:
            return sliced
    return [whole]


# -- measuring ------------------------------------------------------------------------------------


def cosine_rows(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row pair (two all-zero rows count as 1, one as 0)."""
    nr = np.linalg.norm(r, axis=1)
    nc = np.linalg.norm(c, axis=1)
    dot = (r * c).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / (nr * nc)
    both_zero = (nr == 0) & (nc == 0)
    cos = np.where(both_zero, 1.0, np.where((nr == 0) | (nc == 0), 0.0, cos))
    cos = np.where((r == c).all(axis=1), 1.0, cos)  # identical rows: exactly 1, not 1 - 1e-16
    return np.clip(cos, -1.0, 1.0)


@dataclass
class PartAccumulator:
    """Streamed statistics of one part, enough for every floor of its kind."""

    part: Part
    rows: int = 0
    sum_ref2: float = 0.0
    sum_diff2: float = 0.0
    cosines: list = field(default_factory=list)
    agree: int = 0
    positions: int = 0
    both: int = 0  # decision: reference and candidate positive
    ref_pos: int = 0
    cand_pos: int = 0
    equal: int = 0
    elements: int = 0
    ref_correct: int = 0
    cand_correct: int = 0
    labelled: int = 0
    sequences: int = 0
    same_sequences: int = 0
    sequence_length: int = 0
    ties: int = 0  # rows whose argmaxes differ between classes both models score as tied

    def add(
        self,
        ref: np.ndarray,
        cand: np.ndarray,
        labels,
        rows: int | None,
        samples: int | None = None,
    ) -> None:
        """One batch; ``rows`` as in ``OutputAccumulator.add``, ``samples`` the batch's sample
        count (to find a sequence output's batch axis)."""
        p = self.part
        if p.axis is not None:
            index = [slice(None)] * np.ndim(ref)
            index[p.axis] = slice(p.start, p.stop)
            ref, cand = ref[tuple(index)], cand[tuple(index)]
        rows = rows if rows is not None else (len(ref) if np.ndim(ref) else 1)
        if np.size(ref) == 0:
            return
        if p.kind == INTEGER:
            self.equal += int(np.count_nonzero(np.asarray(ref) == np.asarray(cand)))
            self.elements += int(np.size(ref))
            return
        r = np.asarray(ref, np.float64)
        c = np.asarray(cand, np.float64)
        d = r - c
        self.sum_ref2 += float((r * r).sum())
        self.sum_diff2 += float((d * d).sum())
        self.rows += rows
        self.cosines.append(cosine_rows(r.reshape(rows, -1), c.reshape(rows, -1)))
        if p.class_axis is not None and r.ndim > p.class_axis:
            ra, ca = r.argmax(axis=p.class_axis), c.argmax(axis=p.class_axis)
            tied = tied_rows(r, c, ra, ca, p.class_axis, p.probabilities)
            self.ties += int(tied.sum())
            self.agree += int((ra == ca).sum()) + int(tied.sum())
            self.positions += int(ra.size)
            if p.kind == CLASS_PER_POSITION and ra.ndim >= 2:
                # One sequence per sample: its batch axis is the first of the size of the batch
                # (recognizers write [T, N, C] as often as [N, T, C]).
                n = samples if samples is not None else rows
                axis = next((a for a in range(ra.ndim) if ra.shape[a] == n), 0)
                same = (
                    np.moveaxis((ra == ca) | tied, axis, 0).reshape(ra.shape[axis], -1).all(axis=1)
                )
                self.sequences += int(same.size)
                self.same_sequences += int(same.sum())
                self.sequence_length = max(self.sequence_length, ra.size // max(1, same.size))
            if labels is not None and p.kind == CLASS_SCORES and ra.shape == np.shape(labels):
                self.ref_correct += int((ra == labels).sum())
                self.cand_correct += int((ca == labels).sum())
                self.labelled += len(labels)
        if p.kind == PROBABILITIES:
            rp, cp = r >= 0.5, c >= 0.5
            self.both += int(np.count_nonzero(rp & cp))
            self.ref_pos += int(np.count_nonzero(rp))
            self.cand_pos += int(np.count_nonzero(cp))

    def merge(self, other: PartAccumulator) -> None:
        """Folds in the statistics of the batches after these (every field a sum, the
        cosines a list, the sequence length a maximum)."""
        for f in dataclasses.fields(self):
            if f.name == "part":
                continue
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, list):
                mine.extend(theirs)
            elif f.name == "sequence_length":
                setattr(self, f.name, max(mine, theirs))
            else:
                setattr(self, f.name, mine + theirs)

    def counts(self) -> dict[str, int]:
        """The rows each rate metric counted."""
        return {"top1": self.positions, "sequence": self.sequences, "exact": self.elements}

    def metrics(self) -> dict[str, float]:
        m: dict[str, float] = {}
        if self.part.kind == INTEGER:
            if self.elements:
                m["exact"] = self.equal / self.elements
            return m
        if self.rows == 0:
            return m
        if self.sum_diff2 == 0:
            m["snr_db"] = math.inf
        elif self.sum_ref2 == 0:
            m["snr_db"] = -math.inf
        else:
            m["snr_db"] = 10.0 * math.log10(self.sum_ref2 / self.sum_diff2)
        cos = np.concatenate(self.cosines)
        m["cosine_mean"], m["cosine_min"] = float(cos.mean()), float(cos.min())
        if self.positions:
            m["top1"] = self.agree / self.positions
        if self.sequences and self.sequence_length <= SHORT_SEQUENCE:
            m["sequence"] = self.same_sequences / self.sequences
        if self.labelled:
            m["accuracy_drop"] = (self.ref_correct - self.cand_correct) / self.labelled
        if self.ref_pos:
            m["decision_f1"] = 2 * self.both / (self.ref_pos + self.cand_pos)
        return m


# Two classes whose scores differ by less than this in log-probability (logits: their
# difference; probabilities: the log of their ratio) are tied: float16's machine epsilon, the
# resolution at which the same model served in half precision could tell them apart.
TIE_LOG_RATIO = 2.0**-10


def tied_rows(
    r: np.ndarray,
    c: np.ndarray,
    ra: np.ndarray,
    ca: np.ndarray,
    axis: int,
    probabilities: bool,
) -> np.ndarray:
    """Where the argmaxes ``ra`` of ``r`` and ``ca`` of ``c`` differ only between tied classes:
    the reference scores the candidate's class within ``TIE_LOG_RATIO`` of its own top class,
    and the candidate scores the reference's class within it of its top class. Such a row is an
    agreement: its order is below what either model resolves (a random-weight classifier's
    almost flat softmax), while a candidate that has lost the task puts other classes clearly
    first. One class confidently first in either model is never a tie."""
    differ = ra != ca
    if not differ.any():
        return differ
    i, j = np.expand_dims(ra, axis), np.expand_dims(ca, axis)

    def log(x):
        return np.log(np.maximum(x, np.finfo(np.float64).tiny)) if probabilities else x

    r_i, r_j = log(np.take_along_axis(r, i, axis)), log(np.take_along_axis(r, j, axis))
    c_i, c_j = log(np.take_along_axis(c, i, axis)), log(np.take_along_axis(c, j, axis))
    close = (r_i - r_j <= TIE_LOG_RATIO) & (c_j - c_i <= TIE_LOG_RATIO)
    return differ & np.squeeze(close, axis)


# rate floors whose evidence grows with the rows counted (samples, positions, pixels, elements)
RATE_METRICS = ("top1", "sequence", "exact")
# A rate floor p held on n rows with none differing shows, at 95 % confidence, a differing rate
# of at most 3 / n (the rule of three): below 3 / (1 - p) rows, even a perfect score cannot show
# the floor, and PASS says so.
RULE_OF_THREE = 3.0


@dataclass
class FloorCheck:
    part: str
    kind: str
    floor: Floor
    value: float | None  # None: not measurable on these samples (no labels, no positives)
    count: int | None = None  # the rows a rate metric counted
    ties: int = 0  # of those, rows counted as agreeing because their classes are tied

    @property
    def rows_needed(self) -> int | None:
        """The rows on which a perfect score shows this rate floor at 95 % confidence."""
        f = self.floor
        if f.metric not in RATE_METRICS or f.at_most or not 0 < f.bound < 1:
            return None
        return math.ceil(RULE_OF_THREE / (1.0 - f.bound) - 1e-9)

    @property
    def weak(self) -> bool:
        """Held, but on fewer rows than could show it."""
        needed = self.rows_needed
        return (
            self.passed
            and self.value is not None
            and self.count is not None
            and needed is not None
            and self.count < needed
        )

    @property
    def passed(self) -> bool:
        if self.value is None:
            return True
        if self.floor.at_most:
            return self.value <= self.floor.bound + 1e-12
        return self.value >= self.floor.bound - 1e-12

    def describe(self) -> str:
        unit = " dB" if self.floor.metric == "snr_db" else ""
        got = "n/a" if self.value is None else f"{self.value:.4g}{unit}"
        return f"{self.part} ({self.kind}): {METRIC_NAMES[self.floor.metric]} {got}, floor {self.floor.describe()}"


def check(accumulators: list[PartAccumulator]) -> list[FloorCheck]:
    checks = []
    for acc in accumulators:
        metrics = acc.metrics()
        for floor in acc.part.floors:
            checks.append(
                FloorCheck(
                    acc.part.name,
                    acc.part.kind,
                    floor,
                    metrics.get(floor.metric),
                    acc.counts().get(floor.metric),
                    acc.ties if floor.metric == "top1" else 0,
                )
            )
    return checks


class Judge:
    """What decides PASS for one candidate, batch by batch: a task metric when one is given
    (``onnxzip.metrics``), else the default floors of every output's parts. ``verify`` and the
    quantization guard both judge through it.

    The parts are made at the first batch: a declared output shape whose rank the run
    contradicts (stale shapes written by an exporter) gives way to the observed one.
    """

    def __init__(self, outputs: list[ir.Value], task=None):
        self.outputs = outputs
        self.task = task
        self.parts: list[PartAccumulator] | None = None
        self._total = self._weight = 0.0

    def add(self, reference: dict, candidate: dict, batch) -> None:
        if self.task is not None:
            self._total += metrics_mod.score(self.task, reference, candidate, batch) * len(batch)
            self._weight += len(batch)
            return
        if self.parts is None:
            self.parts = []
            for value in self.outputs:
                observed = list(np.shape(reference[value.name]))
                declared = value.shape
                shape = observed if declared is None or len(declared) != len(observed) else None
                self.parts += [PartAccumulator(p) for p in parts_of(value, shape)]
        for acc in self.parts:
            name = acc.part.output
            acc.add(reference[name], candidate[name], batch.labels, batch.count, len(batch))

    def merge(self, other: Judge) -> None:
        """Folds in another judge's batches (those after these)."""
        self._total += other._total
        self._weight += other._weight
        if other.parts is None:
            return
        if self.parts is None:
            self.parts = other.parts
            return
        for mine, theirs in zip(self.parts, other.parts, strict=True):
            mine.merge(theirs)

    @property
    def task_part(self) -> str:
        return f"task metric {self.task.name}"

    @property
    def task_score(self) -> float | None:
        return self._total / self._weight if self._weight else None

    def checks(self) -> list[FloorCheck]:
        if self.task is None:
            return check(self.parts or [])
        if self.task.floor is None:
            return []  # reported, not checked
        return [FloorCheck(self.task_part, "task", Floor("task", self.task.floor), self.task_score)]

    def levels(self) -> dict[str, float]:
        """Per checked part, what a search should raise: its SNR in dB, or the task score."""
        if self.task is not None:
            return {self.task_part: self.task_score}
        return {acc.part.name: acc.metrics().get("snr_db", math.inf) for acc in self.parts or []}
