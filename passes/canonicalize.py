"""Canonicalisation: constant folding, Identity/Dropout removal, Reshape-to-Flatten, cleanup.

Constant folding uses onnxscript's optimizer (the ONNX project's folding engine, which keeps
BatchNormalization); the rest are onnx_ir's common passes plus two small rewrites that make
exported graphs look like the layers targets understand.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from qcompiler.frontend import fold_shape_constants
from qcompiler.graph import attr, const_array


@dataclasses.dataclass(frozen=True)
class CanonicalizePass(ir.passes.InPlacePass):
    """Fold constants, drop Identity/Dropout, turn batch-preserving Reshapes into Flatten.

    Attributes:
        fold_constants: run constant folding.
        reshape_to_flatten: rewrite ``Reshape(x, [batch, -1])`` (as the torch exporter emits
            for ``nn.Flatten`` with a dynamic batch) into ``Flatten(x, axis=1)``.
    """

    fold_constants: bool = True
    reshape_to_flatten: bool = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = _fingerprint(model)
        if self.fold_constants:
            fold_shape_constants(model)
        _remove_dropout(model.graph)
        common_passes.IdentityEliminationPass()(model)
        if self.reshape_to_flatten:
            _reshape_to_flatten(model.graph)
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        common_passes.RemoveUnusedNodesPass()(model)
        common_passes.TopologicalSortPass()(model)
        return ir.passes.PassResult(model, _fingerprint(model) != before)


def _fingerprint(model: ir.Model) -> tuple[tuple[str, ...], int]:
    return tuple(n.op_type for n in model.graph), len(model.graph.initializers)


def _remove_dropout(graph: ir.Graph) -> None:
    """Inference-mode Dropout is the identity: route its input to its consumers."""
    for node in list(graph):
        if node.op_type != "Dropout" or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.outputs) > 1 and node.outputs[1].uses():
            continue  # the mask is used: keep the node
        src, out = node.inputs[0], node.outputs[0]
        if out.is_graph_output():
            continue
        out.replace_all_uses_with(src)
        graph.remove(node, safe=True)


def _leading_dim_source(value: ir.Value | None) -> ir.Value | None:
    """The tensor ``t`` when ``value`` is a 1-element ``[t.shape[0]]`` built from ``Shape(t)``."""
    while value is not None:
        node = value.producer()
        if node is None:
            return None
        if node.op_type in ("Unsqueeze", "Squeeze", "Reshape", "Cast", "Identity"):
            value = node.inputs[0]
        elif node.op_type == "Slice":
            starts, ends = const_array(node.inputs[1]), const_array(node.inputs[2])
            if starts is None or ends is None or starts.tolist() != [0] or ends.tolist() != [1]:
                return None
            value = node.inputs[0]
        elif node.op_type == "Gather":
            index = const_array(node.inputs[1])
            if index is None or index.size != 1 or int(index.reshape(-1)[0]) != 0:
                return None
            value = node.inputs[0]
        elif node.op_type == "Shape":
            start = attr(node, "start", 0)
            return node.inputs[0] if start == 0 else None
        else:
            return None
    return None


def _is_batch_flatten_shape(shape: ir.Value | None, x: ir.Value) -> bool:
    """True when ``shape`` is ``Concat([x.shape[0]], [-1])`` built from shape arithmetic."""
    node = shape.producer() if shape is not None else None
    if node is None or node.op_type != "Concat" or len(node.inputs) != 2:
        return False
    rest = const_array(node.inputs[1])
    if rest is None or rest.reshape(-1).tolist() != [-1]:
        return False
    source = _leading_dim_source(node.inputs[0])
    if source is None or source.shape is None or x.shape is None or len(source.shape) == 0:
        return False
    return source is x or source.shape[0] == x.shape[0]


def _reshape_to_flatten(graph: ir.Graph) -> None:
    """``Reshape(x)`` to ``[x.shape[0], prod(rest)]`` is ``Flatten(x, axis=1)``.

    Recognised from the static output shape (as the torch exporter infers it) or from the
    shape arithmetic ``Concat(Shape(x)[0:1], [-1])`` that exporters emit for a dynamic batch.
    """
    for node in list(graph):
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx"):
            continue
        x, y = node.inputs[0], node.outputs[0]
        if x is None or x.shape is None or len(x.shape) < 2:
            continue
        if not (_static_flatten(x, y) or _is_batch_flatten_shape(node.inputs[1], x)):
            continue
        flatten = ir.node("Flatten", inputs=[x], attributes={"axis": 1}, name=node.name)
        ir.convenience.replace_nodes_and_values(graph, node, [node], [flatten], [y], [flatten.outputs[0]])


def _static_flatten(x: ir.Value, y: ir.Value) -> bool:
    if y.shape is None or len(y.shape) != 2 or x.shape[0] != y.shape[0]:
        return False
    rest = x.shape[1:]
    if not all(isinstance(d, int) for d in rest) or not isinstance(y.shape[1], int):
        return False
    # allowzero does not matter: Flatten gives the same [d0, size] even for d0 == 0.
    return int(np.prod(rest)) == y.shape[1]
