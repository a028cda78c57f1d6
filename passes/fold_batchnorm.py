"""Fold inference-mode BatchNormalization into the preceding Conv, ConvTranspose or Gemm.

Standard formula with ``k = gamma / sqrt(var + eps)`` per output channel::

    W' = W * k   (along the layer's output-channel axis)
    b' = (b - mean) * k + beta

The fold is done in float64 and stored as float32. A BatchNormalization whose input is not the
sole use of such a layer's output (or whose parameters are not constant) is left in place and
named in the pass's ``skipped`` statistics by :func:`foldable`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from qcompiler import annotations as ann
from qcompiler.graph import add_initializer, attr, const_array, set_initializer

_FOLDABLE = ("Conv", "ConvTranspose", "Gemm")


def output_channel_axis(node: ir.Node) -> int | None:
    """The weight axis that indexes output channels, or None when a fold is not expressible."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1 if attr(node, "group", 1) == 1 else None
    if node.op_type == "Gemm":
        return 0 if attr(node, "transB", 0) else 1
    return None


def foldable(bn: ir.Node) -> tuple[ir.Node | None, str]:
    """The layer ``bn`` can be folded into, or (None, reason)."""
    x = bn.inputs[0]
    layer = x.producer() if x is not None else None
    if layer is None or layer.op_type not in _FOLDABLE or layer.domain not in ("", "ai.onnx"):
        return None, "input is not produced by Conv/ConvTranspose/Gemm"
    if len(x.uses()) != 1 or x.is_graph_output():
        return None, f"output of {layer.name!r} has other consumers"
    if any(const_array(v) is None for v in bn.inputs[1:5]):
        return None, "BatchNormalization parameters are not constant"
    if const_array(layer.inputs[1]) is None:
        return None, f"weight of {layer.name!r} is not constant"
    if len(layer.inputs) > 2 and layer.inputs[2] is not None and const_array(layer.inputs[2]) is None:
        return None, f"bias of {layer.name!r} is not constant"
    if layer.op_type == "Gemm" and (attr(layer, "beta", 1.0) != 1.0):
        return None, "Gemm with beta != 1"
    if output_channel_axis(layer) is None:
        return None, "grouped ConvTranspose"
    if len(bn.outputs) > 1 and any(o.uses() for o in bn.outputs[1:]):
        return None, "training-mode outputs are used"
    return layer, ""


def _fold(graph: ir.Graph, layer: ir.Node, bn: ir.Node) -> None:
    gamma, beta, mean, var = (const_array(v).astype(np.float64) for v in bn.inputs[1:5])
    eps = float(attr(bn, "epsilon", 1e-5))
    k = gamma / np.sqrt(var + eps)
    w_value = layer.inputs[1]
    w = const_array(w_value).astype(np.float64)
    axis = output_channel_axis(layer)
    shape = [1] * w.ndim
    shape[axis] = -1
    if layer.op_type == "Gemm":
        w = w * attr(layer, "alpha", 1.0)
        layer.attributes.pop("alpha", None)
    new_w = (w * k.reshape(shape)).astype(np.float32)
    has_bias = len(layer.inputs) > 2 and layer.inputs[2] is not None
    b = const_array(layer.inputs[2]).astype(np.float64) if has_bias else np.zeros_like(k)
    folded = ann.FoldedBatchNorm(
        weight=w_value.name, bias=layer.inputs[2].name if has_bias else None, scale=bn.inputs[1].name,
        shift=bn.inputs[2].name, mean=bn.inputs[3].name, var=bn.inputs[4].name, epsilon=eps)
    new_b = ((b - mean) * k + beta).astype(np.float32)

    # A weight shared with another node must not change under it: give this layer its own copy.
    if len(w_value.uses()) == 1:
        set_initializer(graph, w_value, new_w)
    else:
        layer.replace_input_with(1, add_initializer(graph, f"{w_value.name}_bnfold", new_w))
    if has_bias and len(layer.inputs[2].uses()) == 1 and layer.inputs[2].is_initializer():
        set_initializer(graph, layer.inputs[2], new_b)
    else:
        bias = add_initializer(graph, f"{layer.name}_bias", new_b)
        if has_bias:
            layer.replace_input_with(2, bias)
        else:
            layer.resize_inputs(3)
            layer.replace_input_with(2, bias)
    ann.set(layer, folded)
    out = bn.outputs[0]
    name = out.name
    ir.convenience.replace_all_uses_with(out, layer.outputs[0], replace_graph_outputs=True)
    graph.remove(bn, safe=True)
    # The layer output takes the BN output's name: downstream names and graph outputs stay.
    layer.outputs[0].name = name


@dataclasses.dataclass(frozen=True)
class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold every foldable BatchNormalization into its producer layer (see module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in list(model.graph):
            if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
                continue
            layer, _reason = foldable(node)
            if layer is not None:
                _fold(model.graph, layer, node)
                modified = True
        if modified:
            # The folded BatchNormalizations' parameters (and replaced weights) are used by no
            # node any more: drop them, so no artifact carries them and onnxruntime does not
            # warn about them. FoldedBatchNorm keeps their names.
            common_passes.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified)
