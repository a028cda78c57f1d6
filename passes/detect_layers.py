"""Detect quantizable layers: Conv, ConvTranspose, Gemm and MatMul with a constant weight.

Each one gets a :class:`~qcompiler.annotations.QuantizableLayer` annotation naming its weight,
bias, activation input and output, and the weight's output-channel axis. The pass's
:func:`find_layers` also reports every candidate op it skips, with the reason.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompiler import annotations as ann
from qcompiler.errors import UnsupportedModelError
from qcompiler.graph import attr, const_array, is_constant

QUANTIZABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _channel_axis(node: ir.Node, weight_ndim: int) -> int:
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if attr(node, "transB", 0) else 1
    if node.op_type == "MatMul":
        return weight_ndim - 1
    return 0


def describe(node: ir.Node) -> tuple[ann.QuantizableLayer | None, str]:
    """The layer annotation for ``node``, or (None, why it is not quantizable)."""
    if node.op_type not in QUANTIZABLE_OPS or node.domain not in ("", "ai.onnx"):
        return None, "not a quantizable op"
    x = node.inputs[0] if node.inputs else None
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if x is None or w is None:
        return None, "missing input"
    if is_constant(x):
        return None, "activation input is constant"
    weight = const_array(w)
    if weight is None:
        return None, "weight is not constant"
    if weight.dtype.kind != "f":
        return None, f"weight dtype {weight.dtype} is not floating point"
    if node.op_type == "MatMul" and weight.ndim != 2:
        return None, "MatMul weight is not 2-D"
    if node.op_type == "Gemm" and attr(node, "transA", 0):
        return None, "Gemm with transA=1"
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and not is_constant(bias):
        return None, "bias is not constant"
    return (
        ann.QuantizableLayer(
            op=node.op_type,
            weight=w.name,
            bias=bias.name if bias is not None else None,
            activation_input=x.name,
            output=node.outputs[0].name,
            channel_axis=_channel_axis(node, weight.ndim),
            weight_shape=tuple(int(d) for d in weight.shape),
        ),
        "",
    )


def kept_float(node: ir.Node, keep_float: tuple[str, ...]) -> bool:
    """Whether the user asked to leave ``node`` in float (by node name or op type)."""
    return node.name in keep_float or node.op_type in keep_float


def find_layers(
    model: ir.Model, keep_float: tuple[str, ...] = ()
) -> tuple[list[tuple[ir.Node, ann.QuantizableLayer]], list[tuple[ir.Node, str]]]:
    """(quantizable nodes with their annotation, skipped candidate nodes with the reason).

    Nodes named in ``keep_float`` (by name or op type) are skipped: they stay in float.
    """
    found, skipped = [], []
    for node in model.graph:
        if node.op_type not in QUANTIZABLE_OPS:
            continue
        if kept_float(node, keep_float):
            skipped.append((node, "kept in float (--keep-float)"))
            continue
        layer, reason = describe(node)
        if layer is None:
            skipped.append((node, reason))
        else:
            found.append((node, layer))
    return found, skipped


def quantizable_nodes(model: ir.Model) -> list[tuple[ir.Node, ann.QuantizableLayer]]:
    """The annotated quantizable layers of a model, in graph (topological) order."""
    out = []
    for node in model.graph:
        layer = ann.get(node, ann.QuantizableLayer)
        if layer is not None:
            out.append((node, layer))
    return out


def layer_tensors(model: ir.Model) -> tuple[list[str], list[str]]:
    """The weights of the quantizable layers and the activations entering them, each in layer
    order without repeats (the order of profiles, allocations and seed 000's files)."""
    weights: list[str] = []
    activations: list[str] = []
    for _, layer in quantizable_nodes(model):
        for name, bucket in ((layer.weight, weights), (layer.activation_input, activations)):
            if name not in bucket:
                bucket.append(name)
    return weights, activations


def _check_finite(model: ir.Model, node: ir.Node, layer: ann.QuantizableLayer) -> None:
    """Quantizing a NaN/Inf weight or bias would silently produce garbage: refuse it."""
    for role, value in (("weight", node.inputs[1]), ("bias", node.inputs[2] if len(node.inputs) > 2 else None)):
        array = const_array(value)
        if array is not None and array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            raise UnsupportedModelError(
                f"{role} {value.name!r} of node {node.name!r} ({node.op_type}) contains {bad} NaN or Inf values"
            )


@dataclasses.dataclass(frozen=True)
class DetectLayersPass(ir.passes.InPlacePass):
    """Annotate quantizable layers; fail when there is none (nothing to quantize).

    Attributes:
        require_any: raise :class:`UnsupportedModelError` when no layer is found.
        keep_float: node names or op types left in float (never annotated as layers).
    """

    require_any: bool = True
    keep_float: tuple[str, ...] = ()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        found, skipped = find_layers(model, self.keep_float)
        if not found and self.require_any:
            detail = "; ".join(f"{n.name} ({n.op_type}): {why}" for n, why in skipped[:5])
            raise UnsupportedModelError(
                "model has no quantizable layer (Conv, ConvTranspose, Gemm or MatMul with a "
                f"constant weight){': ' + detail if detail else ''}"
            )
        for node, layer in found:
            _check_finite(model, node, layer)
        modified = False
        for node, _ in skipped:
            if ann.get(node, ann.QuantizableLayer) is not None:
                ann.remove(node, ann.QuantizableLayer)
                modified = True
        for node, layer in found:
            if ann.get(node, ann.QuantizableLayer) != layer:
                ann.set(node, layer)
                modified = True
        return ir.passes.PassResult(model, modified)
