"""Per-op rules keyed by (domain, op type, opset range), as onnxscript's constant folder keys
its partial evaluators. One class, one instance per stage: the channel rules of pruning and the
quantization rules. A node whose (domain, op, opset) has no entry gets None: the stage blocks it
(pruning) or keeps it in float (quantization), with that reason in its report.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

import onnx_ir as ir

from onnxzip.ir.ops import domain_of

F = TypeVar("F", bound=Callable)

# Opsets of the default domain the rules were written against: 13 is the floor models are
# converted to on load; 22-25 only widened types of the ops the rules cover.
RULE_OPSETS = (13, 25)
# com.microsoft has had one version since its ops were added
MS_OPSETS = (1, 1)


class Registry(Generic[F]):
    """Rules of one stage, registered per op type, domain and inclusive opset range."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self._rules: dict[tuple[str, str], list[tuple[int, int, F]]] = {}

    def register(
        self, *op_types: str, domain: str = "", versions: tuple[int, int] | None = None
    ) -> Callable[[F], F]:
        domain = "" if domain == "ai.onnx" else domain
        if versions is None:
            versions = RULE_OPSETS if domain == "" else MS_OPSETS

        def wrap(fn: F) -> F:
            for op in op_types:
                self._rules.setdefault((domain, op), []).append((versions[0], versions[1], fn))
            return fn

        return wrap

    def lookup(self, domain: str, op_type: str, opset: int) -> F | None:
        domain = "" if domain == "ai.onnx" else domain
        for lo, hi, fn in self._rules.get((domain, op_type), []):
            if lo <= opset <= hi:
                return fn
        return None

    def for_node(self, node: ir.Node, opsets: Mapping[str, int]) -> F | None:
        """The rule for ``node`` at the model's opset of the node's domain."""
        domain = domain_of(node)
        if domain == "":
            opset = opsets.get("", opsets.get("ai.onnx", 13))
        else:
            opset = opsets.get(domain, 1)
        return self.lookup(domain, node.op_type, opset)

    def finder(self, opsets: Mapping[str, int]) -> Callable[[ir.Node], F | None]:
        """``for_node`` bound to one model's opset imports."""
        opsets = dict(opsets)
        return lambda node: self.for_node(node, opsets)

    def ops(self) -> list[tuple[str, str]]:
        return sorted(self._rules)
