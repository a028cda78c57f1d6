"""Suffix and single-node models: run only what lies downstream of a tensor.

For a tensor ``t`` the suffix ``S_t`` is every node downstream of ``t``; its external inputs
``E_t`` are the non-constant values ``S_t`` consumes but does not produce (``t`` itself and, for
example, the skip input of a residual branch). The suffix model takes ``E_t`` as inputs and
returns the logits. Models are cut with ``onnx.utils.Extractor`` on the protobuf.

Profiling keeps one suffix session per tensor open at once. Each session would hold its own
copy of the weights downstream (ResNet-18: 41 suffix sessions took 3.0 GB), so the weights
become graph inputs of the suffix model instead, fed at every run from one shared set of
arrays (:func:`shared_constants`; the same 41 sessions: 20 MB, the same run time). A
convolution gives the same bits with its weight fed or constant; a Gemm or MatMul only when
onnxruntime does not prepack the constant operand, so the suffix sessions run without
prepacking, and so must every session whose values they are compared with
(``Runner(prepack=False)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

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


#: Floating-point initializers of at least this many bytes are shared between suffix sessions
#: (fed as inputs); smaller ones, and integer constants (shapes, axes, pads), stay inside each
#: suffix model.
SHARED_BYTES = 1024


def shared_constants(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The weights every suffix session of the model is fed from one copy (see the module
    docstring): floating-point initializers of at least :data:`SHARED_BYTES`, as read-only
    arrays."""
    # an initializer that is also a graph input is only a default, which a caller may override
    overridable = {value.name for value in proto.graph.input}
    out = {}
    for tensor in proto.graph.initializer:
        if tensor.name in overridable or onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).kind != "f":
            continue
        array = onnx.numpy_helper.to_array(tensor)
        if array.nbytes >= SHARED_BYTES:
            array.flags.writeable = False
            out[tensor.name] = array
    return out


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
    constants: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)  # shared weights, fed every run

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Logits for the given external inputs."""
        if self.runner is None:
            return {self.start: feeds[self.start]}
        return self.runner.run({**feeds, **self.constants}, self.outputs)


def _batch_symbol(model: ir.Model) -> object | None:
    shape = model.graph.inputs[0].shape if model.graph.inputs else None
    if shape is None or len(shape) == 0 or isinstance(shape[0], int):
        return None
    return shape[0]


def _constants_as_inputs(sub: onnx.ModelProto, constants: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Turn the initializers of ``sub`` found in ``constants`` into graph inputs; return them."""
    moved = [t for t in sub.graph.initializer if t.name in constants]
    for tensor in moved:
        sub.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    kept = [t for t in sub.graph.initializer if t.name not in constants]
    del sub.graph.initializer[:]
    sub.graph.initializer.extend(kept)
    return {t.name: constants[t.name] for t in moved}


def build_suffix(
    model: ir.Model, proto: onnx.ModelProto, start: str, threads: int = 0,
    constants: Mapping[str, np.ndarray] | None = None,
) -> Suffix:
    """The suffix model of value ``start`` (see module docstring).

    Args:
        model: the model.
        proto: its serialised form (shared by all callers).
        start: the value the suffix starts from.
        threads: the session's intra-op threads (0: onnxruntime's default).
        constants: shared weights (:func:`shared_constants`) to feed instead of copying them
            into the suffix model. The session then runs without prepacking (see the module
            docstring).
    """
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
    fed = _constants_as_inputs(sub, constants) if constants else {}
    # one per tensor, all open at once
    runner = Runner(ir.from_proto(sub), threads=threads, arena=False, prepack=constants is None)
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
    return Suffix(start, inputs, outputs, runner, safe, per_sample, unbatched, fed)


def node_model(model: ir.Model, proto: onnx.ModelProto, node: ir.Node, threads: int = 1) -> Runner:
    """A one-node model of ``node`` (taken from ``proto``, the model's serialised form, shared
    by all callers) whose weight (input 1) is a graph input; without prepacking, like the
    suffix sessions it feeds."""
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
    return Runner(ir.from_proto(sub), threads=threads, arena=False, prepack=False)
