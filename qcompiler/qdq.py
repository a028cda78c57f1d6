"""Lower :class:`~qcompiler.annotations.FixedPoint` annotations to standard-op QDQ ONNX.

- weights: integer initializer (int8 container up to 8 bits, int16 up to 16) +
  ``DequantizeLinear(scale 2**-fl, zero point 0, axis)``;
- biases: int32 initializer + ``DequantizeLinear`` with the accumulator scale;
- activations: ``QuantizeLinear -> DequantizeLinear`` (8 / 16 bits) or
  ``QuantizeLinear -> Clip -> DequantizeLinear`` (QCDQ) for fewer bits than the container.

The result runs in onnxruntime; with graph optimisations off it is the reference fake-quant
semantics of the file. Insertion follows the cycle-safe recipe of onnx_representation.md §6.3:
capture a value's uses before creating the Q node, then rewire only those uses.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from qcompiler import annotations as ann
from qcompiler.errors import AnnotationError
from qcompiler.graph import add_initializer, const_array, values_by_name
from qcompiler.ir import default_opset
from qcompiler.quantizers import quantize_fixed


def container_dtype(wl: int, signed: bool) -> np.dtype:
    """Smallest integer container for a wl-bit code (int8/int16/int32 or unsigned)."""
    for bits in (8, 16, 32):
        if wl <= bits:
            return np.dtype(f"{'int' if signed else 'uint'}{bits}")
    raise ValueError(f"word length {wl} exceeds 32 bits")


def required_opset(model: ir.Model) -> int:
    """Opset the QDQ form needs: 13 (per-axis, int8), 21 when a 16-bit container appears."""
    need = 13
    for value in values_by_name(model.graph).values():
        fmt = ann.get(value, ann.FixedPoint)
        grid = ann.get(value, ann.IntegerWeights)
        if (fmt is not None and 8 < fmt.wl <= 16) or (grid is not None and grid.bits > 8):
            need = 21
    return need


def _scale_and_zero(fmt: ann.FixedPoint, name: str, graph: ir.Graph, dtype: np.dtype) -> tuple[ir.Value, ir.Value]:
    scales = np.asarray(fmt.scales(), dtype=np.float32)
    if fmt.axis is None:
        scales = scales.reshape(())
    zero = np.zeros(scales.shape, dtype=dtype)
    return add_initializer(graph, f"{name}_scale", scales), add_initializer(graph, f"{name}_zero_point", zero)


def _dequantize_codes(
    graph: ir.Graph, value: ir.Value, codes: np.ndarray, scales: np.ndarray, axis: int | None, anchor: ir.Node
) -> ir.Value:
    """Integer ``codes`` (already in their container dtype) + ``DequantizeLinear(scales, 0, axis)``
    inserted before ``anchor``; return the DQ output that replaces ``value``."""
    q = add_initializer(graph, f"{value.name}_quantized", codes)
    scales = np.asarray(scales, dtype=np.float32)
    scales = scales.reshape(()) if axis is None else scales.reshape(-1)
    scale = add_initializer(graph, f"{value.name}_scale", scales)
    zero = add_initializer(graph, f"{value.name}_zero_point", np.zeros(scales.shape, dtype=codes.dtype))
    attributes = {"axis": axis} if axis is not None else {}
    dq = ir.node("DequantizeLinear", inputs=[q, scale, zero], attributes=attributes, name=f"{value.name}_DequantizeLinear")
    dq.outputs[0].name = f"{value.name}_dequantized"
    dq.outputs[0].dtype = ir.DataType.FLOAT
    dq.outputs[0].shape = ir.Shape(codes.shape)
    graph.insert_before(anchor, dq)
    return dq.outputs[0]


def _dequantize_constant(graph: ir.Graph, value: ir.Value, fmt: ann.FixedPoint, anchor: ir.Node) -> ir.Value:
    """Replace a float initializer by integer codes + DequantizeLinear; return the DQ output."""
    dtype = container_dtype(fmt.wl, fmt.signed)
    fl = np.asarray(fmt.fl) if isinstance(fmt.fl, tuple) else fmt.fl
    codes = quantize_fixed(const_array(value), fmt.wl, fl, fmt.signed, fmt.axis).astype(dtype)
    return _dequantize_codes(graph, value, codes, np.asarray(fmt.scales()), fmt.axis, anchor)


def integer_codes(value: ir.Value, grid: ann.IntegerWeights) -> np.ndarray:
    """The integer codes of a weight whose values a pass placed on an integer grid.

    Raises:
        AnnotationError: a weight is not ``code·scale`` with codes in range (it was changed
            after the pass that chose the codes).
    """
    array = const_array(value).astype(np.float64)
    scale = grid.scale_array(array.ndim)
    codes = np.rint(array / scale)
    if codes.size and (codes.min() < grid.q_min or codes.max() > grid.q_max or not np.allclose(codes * scale, array, rtol=1e-6, atol=0.0)):
        raise AnnotationError(
            f"weight {value.name!r} does not lie on its {grid.bits}-bit {grid.method} grid (changed after {grid.method}?)"
        )
    return codes


def _dequantize_integer(graph: ir.Graph, value: ir.Value, grid: ann.IntegerWeights, anchor: ir.Node) -> ir.Value:
    """Integer codes chosen by a pass (GPFQ) + DequantizeLinear with their (not power-of-two) scales."""
    codes = integer_codes(value, grid).astype(container_dtype(grid.bits, signed=True))
    return _dequantize_codes(graph, value, codes, np.asarray(grid.scales), grid.axis, anchor)


def _fake_quantize_activation(graph: ir.Graph, value: ir.Value, fmt: ann.FixedPoint) -> None:
    """Insert Q -> [Clip] -> DQ after ``value`` and move its uses (not graph outputs) to DQ."""
    uses = list(value.uses())  # captured before the Q node exists (cycle pitfall)
    dtype = container_dtype(fmt.wl, fmt.signed)
    scale, zero = _scale_and_zero(fmt, value.name, graph, dtype)
    nodes = [ir.node("QuantizeLinear", inputs=[value, scale, zero], name=f"{value.name}_QuantizeLinear")]
    nodes[0].outputs[0].name = f"{value.name}_quantized"
    codes = nodes[0].outputs[0]
    if fmt.wl < dtype.itemsize * 8:
        lo, hi = fmt.code_range()
        lo_v = add_initializer(graph, f"{value.name}_clip_min", np.array(lo, dtype=dtype))
        hi_v = add_initializer(graph, f"{value.name}_clip_max", np.array(hi, dtype=dtype))
        clip = ir.node("Clip", inputs=[codes, lo_v, hi_v], name=f"{value.name}_Clip")
        clip.outputs[0].name = f"{value.name}_clipped"
        nodes.append(clip)
        codes = clip.outputs[0]
    dq = ir.node("DequantizeLinear", inputs=[codes, scale, zero], name=f"{value.name}_DequantizeLinear")
    dq.outputs[0].name = f"{value.name}_dequantized"
    nodes.append(dq)
    for node in nodes:
        node.outputs[0].shape = value.shape
    for node in nodes[:-1]:
        node.outputs[0].dtype = ir.DataType.from_numpy(dtype)
    dq.outputs[0].dtype = ir.DataType.FLOAT
    producer = value.producer()
    if producer is None:
        first = next(iter(graph))
        graph.insert_before(first, nodes)
    else:
        graph.insert_after(producer, nodes)
    for node, index in uses:
        node.replace_input_with(index, dq.outputs[0])


def lower_to_qdq(model: ir.Model) -> ir.Model:
    """A new model in which every FixedPoint-annotated value is quantized in QDQ form.

    Constants (weights, biases) become integer initializers + DequantizeLinear; activations
    get QuantizeLinear -> [Clip] -> DequantizeLinear. The input model is not modified.
    """
    out = model.clone()
    graph = out.graph
    need = required_opset(out)
    if default_opset(out) < need:
        out.opset_imports[""] = need
    replaced: dict[str, ir.Value] = {}
    for node in list(graph):
        for index, value in enumerate(node.inputs):
            if value is None or not value.is_initializer():
                continue
            fmt = ann.get(value, ann.FixedPoint)
            grid = ann.get(value, ann.IntegerWeights) if fmt is None else None
            if fmt is None and grid is None:
                continue
            if value.name not in replaced:
                replaced[value.name] = (
                    _dequantize_constant(graph, value, fmt, anchor=node)
                    if fmt is not None
                    else _dequantize_integer(graph, value, grid, anchor=node)
                )
            node.replace_input_with(index, replaced[value.name])
    activations = [
        v for v in values_by_name(graph).values() if not v.is_initializer() and ann.get(v, ann.FixedPoint) is not None
    ]
    for value in activations:
        _fake_quantize_activation(graph, value, ann.get(value, ann.FixedPoint))
    common_passes.RemoveUnusedNodesPass()(out)
    common_passes.TopologicalSortPass()(out)
    return out
