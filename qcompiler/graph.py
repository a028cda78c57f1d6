"""Small read/write helpers over ``onnx_ir`` graphs, and a networkx analysis view."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import onnx_ir as ir


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant array behind ``value`` (initializer or Constant node), else None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None
    return tensor.numpy()


def is_constant(value: ir.Value | None) -> bool:
    """True when ``value`` is an initializer or the output of a Constant node."""
    return value is not None and ir.convenience.get_const_tensor(value) is not None


def attr(node: ir.Node, name: str, default: object = None) -> object:
    """An attribute's Python value, or ``default`` when the node does not set it."""
    a = node.attributes.get(name)
    return default if a is None else a.value


def values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every named value of the graph: inputs, initializers and node outputs."""
    out: dict[str, ir.Value] = {}
    for value in graph.inputs:
        out[value.name] = value
    for name, value in graph.initializers.items():
        out[name] = value
    for node in graph:
        for value in node.outputs:
            if value.name:
                out[value.name] = value
    return out


def nodes_by_name(graph: ir.Graph) -> dict[str, ir.Node]:
    """The graph's nodes by name (names are unique after normalisation)."""
    return {node.name: node for node in graph if node.name}


def set_initializer(graph: ir.Graph, value: ir.Value, array: np.ndarray) -> None:
    """Replace the constant data of an initializer value, keeping its name and annotations."""
    value.const_value = ir.tensor(array, name=value.name)
    value.dtype = value.const_value.dtype
    value.shape = ir.Shape(array.shape)


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray | ir.TensorProtocol) -> ir.Value:
    """Register a new initializer under a name that is unique in the graph."""
    existing = values_by_name(graph)
    unique, i = name, 1
    while unique in existing:
        unique, i = f"{name}_{i}", i + 1
    tensor = array if isinstance(array, ir.TensorProtocol) else ir.tensor(array, name=unique)
    tensor.name = unique
    value = ir.Value(name=unique, const_value=tensor, type=ir.TensorType(tensor.dtype), shape=tensor.shape)
    graph.register_initializer(value)
    return value


#: Operators whose second input is a weight tensor.
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def weight_count(model: ir.Model) -> int:
    """Elements of the constant weight tensors (second inputs) of Conv, ConvTranspose, Gemm and
    MatMul nodes."""
    count = 0
    for node in model.graph:
        if node.op_type in WEIGHT_OPS and len(node.inputs) > 1:
            weight = const_array(node.inputs[1])
            count += int(weight.size) if weight is not None else 0
    return count


def to_networkx(model: ir.Model) -> nx.DiGraph:
    """A read-only analysis view: one graph node per ONNX node (by name), edges along values.

    Edge attribute ``value`` names the tensor. Graph inputs and outputs appear as nodes
    ``input:<name>`` / ``output:<name>``. Never mutate the model through this view.
    """
    g = nx.DiGraph()
    for value in model.graph.inputs:
        g.add_node(f"input:{value.name}", op_type="Input")
    for node in model.graph:
        g.add_node(node.name, op_type=node.op_type)
        for inp in node.inputs:
            if inp is None or inp.is_initializer():
                continue
            producer = inp.producer()
            src = producer.name if producer is not None else f"input:{inp.name}"
            if g.has_node(src):
                g.add_edge(src, node.name, value=inp.name)
    for value in model.graph.outputs:
        producer = value.producer()
        g.add_node(f"output:{value.name}", op_type="Output")
        src = producer.name if producer is not None else f"input:{value.name}"
        g.add_edge(src, f"output:{value.name}", value=value.name)
    return g


def static_size(value: ir.Value, per_sample: bool = False) -> int | None:
    """A value's element count (per sample: without axis 0) when its shape is static, else None."""
    if value.shape is None:
        return None
    dims = list(value.shape)[1 if per_sample else 0 :]
    if not all(isinstance(d, int) for d in dims):
        return None
    return math.prod(dims)
