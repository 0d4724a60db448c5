"""What onnxzip knows about ops, and the rule registry every stage uses.

``ops``: the metatype table (weights, channel axes, convolution subtypes, MACs, fused-op shapes)
and the one way to read a node's attributes, rank and identity; ``registry``: per-op rules keyed
by (domain, op type, opset range); ``contrib``: types and shapes through onnxruntime's fused ops.
"""

from onnxzip.ir import ops
from onnxzip.ir.registry import RULE_OPSETS, Registry

__all__ = ["RULE_OPSETS", "Registry", "ops"]
