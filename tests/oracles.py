"""Oracles shared by the tests: the pruning masking-equivalence check and the builders of
small models from ONNX text."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir

from onnxzip import io, passes
from onnxzip.data import SyntheticSamples, input_specs
from onnxzip.pruning import find_groups, rewrite
from onnxzip.runtime import Runner

H = '<ir_version: 8, opset_import: ["" : 17]>\n'


def build(text: str, weights: dict, seed: int = 0) -> ir.Model:
    proto = onnx.parser.parse_model(H + text)
    rng = np.random.default_rng(seed)
    for name, shape in weights.items():
        proto.graph.initializer.append(
            onnx.numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), name)
        )
    onnx.checker.check_model(proto, full_check=True)
    return prepared(io.load_model(proto))


def with_weights(text: str, tensors: dict, header: str = H) -> onnx.ModelProto:
    """A model from ONNX text with the given arrays as float32 initializers."""
    proto = onnx.parser.parse_model(header + text)
    for name, array in tensors.items():
        proto.graph.initializer.append(
            onnx.numpy_helper.from_array(np.asarray(array, np.float32), name)
        )
    return proto


def prepared(model: ir.Model) -> ir.Model:
    model = model.clone()
    passes.drop_initializer_inputs(model)
    passes.lift_constants(model)
    passes.sum_to_add(model)
    return model


def masked_and_pruned(model: ir.Model, gid: int, channels: list[int]) -> tuple[ir.Model, ir.Model]:
    """The oracle: zeroing the consumers' slices of some channels == removing those channels."""
    work = model.clone()
    groups = find_groups(work)
    group = groups[gid]
    masked = model.clone()
    inits = masked.graph.initializers
    for m in group.slices:
        if m.role != "in":
            continue
        w = inits[m.value.name].const_value.numpy().copy()
        index = [slice(None)] * w.ndim
        index[m.axis] = np.concatenate([m.positions[c] for c in channels])
        w[tuple(index)] = 0
        inits[m.value.name].const_value = ir.tensor(w, name=m.value.name)
    pruned = rewrite.apply(work, groups, {gid: np.array(channels)})
    return masked, pruned


def assert_oracle(model: ir.Model, group_ids=None, samples: int = 2) -> int:
    groups = find_groups(model.clone())
    batch = next(SyntheticSamples(input_specs(model), samples, seed=1).batches(samples))
    checked = 0
    for g in groups:
        if g.blocked or g.size < 2 or (group_ids is not None and g.id not in group_ids):
            continue  # a one-channel group is never emptied
        channels = list(range(g.size % 2, g.size, 3))[: max(1, g.size // 2)]
        masked, pruned = masked_and_pruned(model, g.id, channels)
        onnx.checker.check_model(io.to_proto(pruned), full_check=True)
        a = Runner(masked, optimization="none").run(batch)
        b = Runner(pruned, optimization="none").run(batch)
        for name in a:
            scale = np.abs(a[name]).max() + 1e-12
            assert np.abs(a[name] - b[name]).max() / scale < 2e-5, (g.id, g.roots, name)
        checked += 1
    return checked
