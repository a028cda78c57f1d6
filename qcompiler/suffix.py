"""Suffix and single-node models: run only what lies downstream of a tensor.

For a tensor ``t`` the suffix ``S_t`` is every node downstream of ``t``; its external inputs
``E_t`` are the non-constant values ``S_t`` consumes but does not produce (``t`` itself and, for
example, the skip input of a residual branch). The suffix model takes ``E_t`` as inputs and
returns the logits. Models are cut with ``onnx.utils.Extractor`` on the protobuf.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir

from qcompiler.graph import is_constant, values_by_name
from qcompiler.runtime import Runner


def logits_names(model: ir.Model) -> list[str]:
    """The values distortion is measured on: graph outputs, or a final Softmax's input."""
    out = []
    for value in model.graph.outputs:
        producer = value.producer()
        if producer is not None and producer.op_type in ("Softmax", "LogSoftmax") and producer.inputs[0] is not None:
            out.append(producer.inputs[0].name)
        else:
            out.append(value.name)
    return out


def downstream(model: ir.Model, name: str) -> list[ir.Node]:
    """Nodes that depend on value ``name``, in graph (topological) order."""
    values = values_by_name(model.graph)
    reached: set[int] = set()
    frontier = [values[name]]
    while frontier:
        value = frontier.pop()
        for node, _ in value.uses():
            if id(node) not in reached:
                reached.add(id(node))
                frontier.extend(node.outputs)
    return [node for node in model.graph if id(node) in reached]


def external_inputs(nodes: Sequence[ir.Node], start: str) -> list[str]:
    """``E_t``: ``start`` first, then the other non-constant values the nodes consume from outside."""
    produced = {id(v) for n in nodes for v in n.outputs}
    names = [start]
    for node in nodes:
        for value in node.inputs:
            if value is None or is_constant(value) or id(value) in produced or value.name in names:
                continue
            names.append(value.name)
    return names


@dataclasses.dataclass
class Suffix:
    """A runnable suffix from value ``start`` to the logits it reaches."""

    start: str
    inputs: list[str]
    outputs: list[str]
    runner: Runner | None  # None when ``start`` is itself a logits value
    batch_safe: bool
    per_sample_bytes: int
    unbatched: frozenset[str] = frozenset()  # external inputs without the batch axis: never tiled

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Logits for the given external inputs."""
        if self.runner is None:
            return {self.start: feeds[self.start]}
        return self.runner.run(feeds, self.outputs)


def _batch_symbol(model: ir.Model) -> object | None:
    shape = model.graph.inputs[0].shape if model.graph.inputs else None
    if shape is None or len(shape) == 0 or isinstance(shape[0], int):
        return None
    return shape[0]


def build_suffix(model: ir.Model, proto: onnx.ModelProto, start: str, threads: int = 0) -> Suffix:
    """The suffix model of value ``start`` (see module docstring)."""
    logits = logits_names(model)
    if start in logits:
        return Suffix(start, [start], [start], None, True, 0)
    nodes = downstream(model, start)
    produced = {v.name for n in nodes for v in n.outputs}
    outputs = [name for name in logits if name in produced]
    inputs = external_inputs(nodes, start)
    if not outputs:
        return Suffix(start, inputs, [], None, True, 0)
    sub = onnx.utils.Extractor(proto).extract_model(inputs, outputs)
    runner = Runner(ir.from_proto(sub), threads=threads, arena=False)  # one per tensor, all open at once
    symbol = _batch_symbol(model)
    safe, per_sample = symbol is not None, 0
    values = values_by_name(model.graph)
    unbatched = frozenset(
        name for name in inputs[1:]
        if values[name].shape is None or len(values[name].shape) == 0 or values[name].shape[0] != symbol
    )
    for node in nodes:
        for value in node.outputs:
            shape = value.shape
            if shape is None or len(shape) == 0 or shape[0] != symbol:
                safe = False
                continue
            rest = shape[1:]
            if all(isinstance(d, int) for d in rest):
                per_sample = max(per_sample, int(np.prod(rest)) * 4)
            else:
                safe = False
    # A non-batched external input (e.g. a shape tensor computed from the batch size) may fix
    # the batch size inside the suffix: then candidates cannot be stacked on the batch axis.
    safe = safe and not unbatched
    return Suffix(start, inputs, outputs, runner, safe, per_sample, unbatched)


def node_model(model: ir.Model, proto: onnx.ModelProto, node: ir.Node, threads: int = 1) -> Runner:
    """A one-node model of ``node`` (taken from ``proto``, the model's serialised form, shared
    by all callers) whose weight (input 1) is a graph input."""
    values = values_by_name(model.graph)
    source = next(n for n in proto.graph.node if n.name == node.name)
    x, w = node.inputs[0], node.inputs[1]
    inits = []
    for value in node.inputs[2:]:
        if value is not None:
            inits.append(onnx.numpy_helper.from_array(ir.convenience.get_const_tensor(values[value.name]).numpy(), value.name))

    def info(value: ir.Value) -> onnx.ValueInfoProto:
        dims = [d if isinstance(d, int) else None for d in value.shape] if value.shape is not None else None
        return onnx.helper.make_tensor_value_info(value.name, value.dtype.value, dims)

    graph = onnx.helper.make_graph(
        [source], "node", [info(x), info(w)], [info(node.outputs[0])], inits
    )
    opset = [onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()]
    sub = onnx.helper.make_model(graph, opset_imports=opset, ir_version=model.ir_version)
    return Runner(ir.from_proto(sub), threads=threads, arena=False)
