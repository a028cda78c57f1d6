"""Canonicalisation: constant folding, Identity/Dropout removal, Reshape-to-Flatten, cleanup.

Constant folding uses onnxscript's optimizer (the ONNX project's folding engine, which keeps
BatchNormalization); the rest are onnx_ir's common passes plus two small rewrites that make
exported graphs look like the layers targets understand.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from qcompiler.frontend import fold_shape_constants


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


def _reshape_to_flatten(graph: ir.Graph) -> None:
    """``Reshape(x)`` whose output is ``[d0, prod(rest)]`` with d0 == x.shape[0] is a Flatten."""
    for node in list(graph):
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx"):
            continue
        x, y = node.inputs[0], node.outputs[0]
        if x is None or x.shape is None or y.shape is None or len(y.shape) != 2:
            continue
        if len(x.shape) < 2 or x.shape[0] != y.shape[0]:
            continue
        rest = x.shape[1:]
        if not all(isinstance(d, int) for d in rest) or not isinstance(y.shape[1], int):
            continue
        size = 1
        for d in rest:
            size *= d
        # allowzero does not matter: Flatten gives the same [d0, size] even for d0 == 0.
        if size != y.shape[1]:
            continue
        flatten = ir.node("Flatten", inputs=[x], attributes={"axis": 1}, name=node.name)
        ir.convenience.replace_nodes_and_values(graph, node, [node], [flatten], [y], [flatten.outputs[0]])
