"""Coupled-channel groups over the onnx_ir graph (the dependency graph of structured pruning).

A *channel space* is a tensor together with one of its axes. A group starts at a channel
producer (a Conv's output channels, a Gemm's or constant-weight MatMul's output features) and
is the closure of every space and every weight slice whose index must be removed together with
the producer's channel ``c``. Each space carries a map from the group's channel ``c`` to the
positions that channel occupies on its axis: the identity at the producer, shifted by offsets
through Concat and Split, widened to blocks ``[c k, (c + 1) k)`` through Flatten/Reshape and
depthwise channel multipliers.

The closure walks both ways: from a space to every consumer (forward) and to its producer
(backward), so a residual ``Add`` pulls the other branch's producer into the group and every
other reader of that branch too. Per-op rules (``rules.py``) say, for an op entered on one
port, which slices to take and which spaces continue. An op without a rule, a graph input or
output, or a rule's refusal *blocks* the group; the group records which node blocked it and why
and is never pruned.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxzip.ir.ops import node_key

Positions = list  # per group channel: np.ndarray of positions on the space's axis


def identity(size: int) -> Positions:
    return [np.array([c], dtype=np.int64) for c in range(size)]


def same_positions(a: Positions, b: Positions) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


logger = logging.getLogger(__name__)


@dataclass
class SliceMember:
    """An initializer sliced along ``axis`` at the positions of the group's channels."""

    node: str
    value: ir.Value
    axis: int
    positions: Positions
    role: (
        str  # "out" (producer weights/bias), "in" (consumer weights), "param" (per-channel params)
    )
    source: tuple[str, int] | None = None  # for "in": the (tensor, axis) space the weights read
    owner: str | None = None  # the weighted op the slice belongs to (``node`` reads the tensor)


@dataclass
class Group:
    id: int
    size: int
    roots: list[str] = field(default_factory=list)
    spaces: dict[tuple[str, int], Positions] = field(default_factory=dict)
    slices: list[SliceMember] = field(default_factory=list)
    depthwise: list[str] = field(
        default_factory=list
    )  # Conv nodes whose `group` follows the channels
    blocked_by: str | None = None
    reason: str | None = None

    @property
    def blocked(self) -> bool:
        return self.reason is not None

    def members(self) -> list[str]:
        seen = []
        for s in self.slices:
            if s.owner not in seen:
                seen.append(s.owner)
        return seen


class GroupBuilder:
    """The worklist closure of one group; rules call ``visit``, ``take`` and ``block``."""

    def __init__(self, graph: ir.Graph, group: Group):
        self.graph = graph
        self.group = group
        self.queue: deque = deque()
        # Conditions on the finished closure (node, check): a check returns a reason to block.
        self.checks: list[tuple[ir.Node, object]] = []

    # -- called by rules ------------------------------------------------------------------------
    def visit(
        self,
        value: ir.Value,
        axis: int,
        positions: Positions,
        from_node: ir.Node | None,
        from_port: tuple[str, int] | None = None,
    ) -> None:
        """The channels also live on ``value``'s ``axis`` at ``positions``."""
        self.queue.append((value, axis, positions, from_node, from_port))

    def take(
        self,
        node: ir.Node,
        value: ir.Value,
        axis: int,
        positions: Positions,
        role: str,
        source: tuple[str, int] | None = None,
    ) -> None:
        producer = value.producer()
        if (
            value.const_value is None
            and producer is not None
            and producer.op_type == "DequantizeLinear"
        ):
            # A quantized weight: cut its codes, and its scales and zero-points when they are per
            # channel along the same axis.
            q, scale = producer.inputs[0], producer.inputs[1]
            zero = producer.inputs[2] if len(producer.inputs) > 2 else None
            rank = len(q.const_value.shape)
            attr = producer.attributes.get("axis")
            dq_axis = (attr.as_int() if attr is not None else 1) % rank
            name = node_key(producer)
            owner = node_key(node)
            self.group.slices.append(SliceMember(name, q, axis, positions, role, source, owner))
            if (
                scale.const_value is not None
                and scale.const_value.shape.numpy() != ()
                and dq_axis == axis
            ):
                if scale.const_value.shape[0] > 1:
                    self.group.slices.append(
                        SliceMember(name, scale, 0, positions, "param", None, owner)
                    )
                    if zero is not None:
                        self.group.slices.append(
                            SliceMember(name, zero, 0, positions, "param", None, owner)
                        )
            return
        self.group.slices.append(
            SliceMember(node_key(node), value, axis, positions, role, source, node_key(node))
        )

    def coarsen(self, partition: list[np.ndarray]):
        """Merges the group's channels: new channel ``h`` is the union of ``partition[h]``.

        Used when the channels must go in blocks (attention heads): every recorded map, slice
        and pending visit is re-indexed, so the group's unit becomes the block.
        """

        def merge(positions: Positions) -> Positions:
            # unique: merged channels may share a position (a query head and its key head on the
            # attention scores' head axis)
            return [np.unique(np.concatenate([positions[c] for c in part])) for part in partition]

        g = self.group
        g.spaces = {k: merge(v) for k, v in g.spaces.items()}
        for m in g.slices:
            m.positions = merge(m.positions)
        self.queue = deque((v, a, merge(p), n, port) for v, a, p, n, port in self.queue)
        g.size = len(partition)
        return merge

    def _reconcile(self, seen: Positions, positions: Positions) -> bool:
        """A space reached with two channel maps over the same positions: the channels that
        share a position must go together, so they merge into one (GPT-2's fused q|k|v: query
        head ``h`` and key head ``h`` meet on the attention scores' head axis). False when the
        maps cover different positions, or when everything would merge into one channel."""

        def owners(maps: Positions) -> dict[int, list[int]]:
            found: dict[int, list[int]] = {}
            for c, p in enumerate(maps):
                for x in p.tolist():
                    found.setdefault(x, []).append(c)
            return found

        a, b = owners(seen), owners(positions)
        if set(a) != set(b):
            return False
        parent = list(range(self.group.size))

        def root(c: int) -> int:
            while parent[c] != c:
                parent[c] = parent[parent[c]]
                c = parent[c]
            return c

        for x in a:
            first, *rest = a[x] + b[x]
            for c in rest:
                parent[root(c)] = root(first)
        parts: dict[int, list[int]] = {}
        for c in range(self.group.size):
            parts.setdefault(root(c), []).append(c)
        if len(parts) < 2:
            return False
        self.coarsen(sorted((np.array(p) for p in parts.values()), key=lambda p: p[0]))
        return True

    def check_at_end(self, node: ir.Node, check) -> None:
        """``check(spaces)`` runs once the closure is complete (it may need spaces reached
        later); a reason it returns blocks the group at ``node``."""
        self.checks.append((node, check))

    def block(self, node: ir.Node | None, reason: str) -> None:
        if self.group.reason is None:
            self.group.blocked_by = node_key(node) if node is not None else None
            self.group.reason = reason

    # -- the closure ----------------------------------------------------------------------------
    def run(self, rule_for) -> None:
        self._close(rule_for)
        for node, check in self.checks:
            if self.group.blocked:
                break
            reason = check(self.group.spaces)
            if reason is not None:
                self.block(node, reason)

    def _close(self, rule_for) -> None:
        while self.queue and not self.group.blocked:
            value, axis, positions, from_node, from_port = self.queue.popleft()
            key = (value.name, axis)
            seen = self.group.spaces.get(key)
            if seen is not None:
                if same_positions(seen, positions) or self._reconcile(seen, positions):
                    continue
                if not _disjoint(seen, positions):
                    self.block(
                        from_node,
                        f"tensor '{value.name}' is reached with two different channel maps",
                    )
                    continue
                # The channels also occupy other positions of this axis (YOLOv8's C2f block
                # concatenates a split half and the residual sum of that same half): each
                # channel holds both sets, and the new positions go on to the tensor's readers
                # and producer like a first visit.
                self.group.spaces[key] = [
                    np.union1d(a, b) for a, b in zip(seen, positions, strict=True)
                ]
                self._spread(rule_for, value, axis, positions, from_node, from_port)
                continue
            if (
                value.shape is None
                or axis >= len(value.shape)
                or not isinstance(value.shape[axis], int)
            ):
                self.block(from_node, f"tensor '{value.name}' has no static size on axis {axis}")
                continue
            self.group.spaces[key] = positions
            if value.is_graph_output():
                self.block(value.producer(), f"channels reach the graph output '{value.name}'")
                continue
            self._spread(rule_for, value, axis, positions, from_node, from_port)

    def _spread(self, rule_for, value, axis, positions, from_node, from_port) -> None:
        """Applies the rules of ``value``'s producer and readers to the channels at
        ``positions`` on its ``axis`` (except the node they came from)."""
        producer = value.producer()
        if producer is None:
            if value.is_graph_input():
                self.block(None, f"channels reach the graph input '{value.name}'")
            elif value.const_value is not None and from_node is not None:
                # A constant that reaches the channels through ops (Unsqueeze of a per-channel
                # scale, say) is cut where it is stored.
                self.take(from_node, value, axis, positions, "param")
            return
        if producer is not from_node:
            index = list(producer.outputs).index(value)
            self._apply(rule_for, producer, ("out", index), axis, positions)
        for use in value.uses():
            if use.node is from_node and from_port == ("in", use.idx):
                continue
            if use.node is from_node and from_port is None:
                continue
            self._apply(rule_for, use.node, ("in", use.idx), axis, positions)
            if self.group.blocked:
                break

    def _apply(
        self, rule_for, node: ir.Node, port: tuple[str, int], axis: int, positions: Positions
    ) -> None:
        if node.graph is not self.graph:
            self.block(node, "channels reach a subgraph (If/Loop/Scan body)")
            return
        rule = rule_for(node)
        if rule is None:
            self.block(
                node,
                f"no channel rule for {node.domain + '.' if node.domain else ''}{node.op_type}",
            )
            return
        unknown = _unknown_rank(node)
        if unknown is not None:
            self.block(node, f"{node.op_type} tensor '{unknown}' has an unknown rank")
            return
        try:
            rule(self, node, port, axis, positions)
        except (TypeError, ValueError, IndexError, KeyError, ZeroDivisionError) as exc:
            # Shapes a rule was not written for block the group (with the reason); they never
            # end the run.
            logger.warning(
                "%s: the %s channel rule failed: %s: %s",
                node_key(node),
                node.op_type,
                type(exc).__name__,
                exc,
            )
            self.block(node, f"the {node.op_type} channel rule cannot handle this node's shapes")


def _unknown_rank(node: ir.Node) -> str | None:
    """The first tensor the node reads, or writes for a reader, whose rank is unknown."""
    for value in node.inputs:
        if value is not None and value.shape is None:
            return value.name
    for value in node.outputs:
        if value.shape is None and (value.uses() or value.is_graph_output()):
            return value.name
    return None


def _disjoint(seen: Positions, positions: Positions) -> bool:
    """Two maps of the same channels whose positions never meet (neither within a channel nor
    across channels)."""
    if len(seen) != len(positions):
        return False
    a = np.concatenate(seen) if seen else np.array([], np.int64)
    b = np.concatenate(positions) if positions else np.array([], np.int64)
    return len(np.intersect1d(a, b)) == 0 and len(np.unique(b)) == len(b)
