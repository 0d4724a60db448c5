"""Importance criteria: a group goes in, one score per group channel comes out (higher = keep).

* ``l1`` / ``l2``: the L1 norm / squared L2 norm of every weight slice the channel owns, summed
  over the group's producers (their output rows) and consumers (their input columns), as
  Torch-Pruning's group magnitude importance does.
* ``bn``: ``|gamma|`` of the group's BatchNormalization scales (summed when several BNs share the
  channels); a group without BatchNormalization falls back to ``l1`` and says so.

* ``taylor``, ``fisher``, ``grad-stability``: from the gate-gradient statistics of
  ``onnxzip.gradients`` (onnxruntime training artifacts), passed in by ``prune``.

Further criteria plug in through ``register``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from onnxzip.passes import const_array, dequantized_array
from onnxzip.pruning.config import GRADIENT_CRITERIA
from onnxzip.pruning.groups import Group

ScoreFn = Callable[[Group], tuple[np.ndarray, str | None]]
CRITERIA: dict[str, ScoreFn] = {}


def register(name: str):
    def wrap(fn: ScoreFn) -> ScoreFn:
        CRITERIA[name] = fn
        return fn

    return wrap


def _weights(member) -> np.ndarray | None:
    """The member's float values: quantized codes are scored through their DequantizeLinear."""
    for use in member.value.uses():
        if use.node.op_type == "DequantizeLinear" and use.idx == 0:
            return dequantized_array(use.node.outputs[0])
    return const_array(member.value)


def _slice_norms(group: Group, power: int, roles: tuple[str, ...]) -> np.ndarray:
    scores = np.zeros(group.size)
    for member in group.slices:
        if member.role not in roles:
            continue
        w = _weights(member)
        if w is None or w.ndim == 0:
            continue
        moved = np.moveaxis(np.abs(w.astype(np.float64)) ** power, member.axis, 0)
        per_position = moved.reshape(moved.shape[0], -1).sum(axis=1)
        for c, positions in enumerate(member.positions):
            scores[c] += per_position[positions].sum()
    return scores


@register("l1")
def l1(group: Group) -> tuple[np.ndarray, str | None]:
    return _slice_norms(group, 1, ("out", "in")), None


@register("l2")
def l2(group: Group) -> tuple[np.ndarray, str | None]:
    return _slice_norms(group, 2, ("out", "in")), None


@register("bn")
def bn(group: Group) -> tuple[np.ndarray, str | None]:
    scores = np.zeros(group.size)
    found = False
    for member in group.slices:
        if (
            member.role == "param"
            and member.value.uses()
            and any(
                u.node.op_type == "BatchNormalization" and u.idx == 1 for u in member.value.uses()
            )
        ):
            gamma = np.abs(const_array(member.value).astype(np.float64))
            for c, positions in enumerate(member.positions):
                scores[c] += gamma[positions].sum()
            found = True
    if not found:
        return l1(group)[0], "no BatchNormalization in the group: scored by l1"
    return scores, None


def score(
    group: Group, criterion: str, gradients: dict | None = None
) -> tuple[np.ndarray, str | None]:
    """Scores of a group's channels. Gradient criteria read ``gradients[group.id]``
    (``onnxzip.gradients.ChannelGradients``); a group without them falls back to ``l1``."""
    if criterion in GRADIENT_CRITERIA:
        stats = (gradients or {}).get(group.id)
        if stats is None or len(stats.total) != group.size:
            return l1(group)[
                0
            ], f"no gradient statistics for this group: scored by l1 instead of {criterion}"
        return stats.score(criterion), None
    if criterion not in CRITERIA:
        raise KeyError(criterion)
    return CRITERIA[criterion](group)
