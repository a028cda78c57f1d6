"""Lower :class:`~qcompiler.annotations.FixedPoint` annotations to standard-op QDQ ONNX.

- weights: integer initializer (int8 container up to 8 bits, int16 up to 16; optionally native
  INT4 for at most 4 bits, opset 21) + ``DequantizeLinear(scale 2**-fl, zero point 0, axis)``;
- biases: int32 initializer + ``DequantizeLinear`` with the accumulator scale;
- activations: ``QuantizeLinear -> DequantizeLinear`` (8 / 16 bits) or
  ``QuantizeLinear -> Clip -> DequantizeLinear`` (QCDQ) for fewer bits than the container
  (9..15 bits: int16 codes clipped as int32 between two Casts, onnxruntime has no int16 Clip).

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


#: Native INT4 storage needs opset 21 and IR version 10 (onnx_representation.md §1).
INT4_OPSET, INT4_IR_VERSION = 21, 10


def weight_bits(value: ir.Value) -> int | None:
    """The word length of a quantized constant (FixedPoint or IntegerWeights), else None."""
    fmt = ann.get(value, ann.FixedPoint)
    if fmt is not None:
        return fmt.wl
    grid = ann.get(value, ann.IntegerWeights)
    return grid.bits if grid is not None else None


def native_int4_values(model: ir.Model) -> set[str]:
    """Constants whose codes fit native INT4 storage (signed weights of at most 4 bits)."""
    out = set()
    for value in model.graph.initializers.values():
        fmt = ann.get(value, ann.FixedPoint)
        bits = weight_bits(value)
        if bits is not None and bits <= 4 and (fmt is None or fmt.signed):
            out.add(value.name)
    return out


def required_opset(model: ir.Model, native_int4: bool = False) -> int:
    """Opset the QDQ form needs: 13 (per-axis, int8), 21 when a 16-bit container or a native
    INT4 weight appears."""
    if native_int4 and native_int4_values(model):
        return INT4_OPSET
    for value in values_by_name(model.graph).values():
        bits = weight_bits(value)
        if bits is not None and 8 < bits <= 16:
            return 21
    return 13


def _scale_and_zero(fmt: ann.FixedPoint, name: str, graph: ir.Graph, dtype: np.dtype) -> tuple[ir.Value, ir.Value]:
    scales = np.asarray(fmt.scales(), dtype=np.float32)
    if fmt.axis is None:
        scales = scales.reshape(())
    zero = np.zeros(scales.shape, dtype=dtype)
    return add_initializer(graph, f"{name}_scale", scales), add_initializer(graph, f"{name}_zero_point", zero)


def _dequantize_codes(
    graph: ir.Graph, value: ir.Value, codes: np.ndarray, scales: np.ndarray, axis: int | None, anchor: ir.Node,
    int4: bool = False,
) -> ir.Value:
    """Integer ``codes`` (already in their container dtype) + ``DequantizeLinear(scales, 0, axis)``
    inserted before ``anchor``; return the DQ output that replaces ``value``. ``int4`` stores the
    codes (and the zero point) as native INT4, two per byte."""
    scales = np.asarray(scales, dtype=np.float32)
    scales = scales.reshape(()) if axis is None else scales.reshape(-1)
    zeros = np.zeros(scales.shape, dtype=codes.dtype)
    if int4:
        codes_t = ir.tensor(codes.astype(np.int8), dtype=ir.DataType.INT4, name=f"{value.name}_quantized")
        zeros_t = ir.tensor(zeros.astype(np.int8), dtype=ir.DataType.INT4, name=f"{value.name}_zero_point")
        q = add_initializer(graph, f"{value.name}_quantized", codes_t)
        zero = add_initializer(graph, f"{value.name}_zero_point", zeros_t)
    else:
        q = add_initializer(graph, f"{value.name}_quantized", codes)
        zero = add_initializer(graph, f"{value.name}_zero_point", zeros)
    scale = add_initializer(graph, f"{value.name}_scale", scales)
    attributes = {"axis": axis} if axis is not None else {}
    dq = ir.node("DequantizeLinear", inputs=[q, scale, zero], attributes=attributes, name=f"{value.name}_DequantizeLinear")
    dq.outputs[0].name = f"{value.name}_dequantized"
    dq.outputs[0].dtype = ir.DataType.FLOAT
    dq.outputs[0].shape = ir.Shape(codes.shape)
    graph.insert_before(anchor, dq)
    return dq.outputs[0]


def fixed_codes(value: ir.Value, fmt: ann.FixedPoint) -> np.ndarray:
    """The integer codes of a constant in its fixed-point format, in the container dtype."""
    fl = np.asarray(fmt.fl) if isinstance(fmt.fl, tuple) else fmt.fl
    return quantize_fixed(const_array(value), fmt.wl, fl, fmt.signed, fmt.axis).astype(container_dtype(fmt.wl, fmt.signed))


def _dequantize_constant(
    graph: ir.Graph, value: ir.Value, fmt: ann.FixedPoint, anchor: ir.Node, int4: bool = False
) -> ir.Value:
    """Replace a float initializer by integer codes + DequantizeLinear; return the DQ output."""
    return _dequantize_codes(graph, value, fixed_codes(value, fmt), np.asarray(fmt.scales()), fmt.axis, anchor, int4)


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


def _dequantize_integer(
    graph: ir.Graph, value: ir.Value, grid: ann.IntegerWeights, anchor: ir.Node, int4: bool = False
) -> ir.Value:
    """Integer codes chosen by a pass (GPFQ) + DequantizeLinear with their (not power-of-two) scales."""
    codes = integer_codes(value, grid).astype(container_dtype(grid.bits, signed=True))
    return _dequantize_codes(graph, value, codes, np.asarray(grid.scales), grid.axis, anchor, int4)


def _clip_codes(graph: ir.Graph, value: ir.Value, codes: ir.Value, fmt: ann.FixedPoint, dtype: np.dtype) -> list[ir.Node]:
    """Clip codes to the format's range inside a wider container (QCDQ). onnxruntime has no
    16-bit Clip, so 9..15-bit codes are clipped as int32 between two Casts."""
    lo, hi = fmt.code_range()
    wide = dtype.itemsize == 2
    clip_dtype = np.dtype(np.int32) if wide else dtype
    nodes = []
    if wide:
        widen = ir.node("Cast", inputs=[codes], attributes={"to": ir.DataType.INT32}, name=f"{value.name}_Widen")
        widen.outputs[0].name = f"{value.name}_widened"
        widen.outputs[0].dtype = ir.DataType.INT32
        nodes.append(widen)
        codes = widen.outputs[0]
    lo_v = add_initializer(graph, f"{value.name}_clip_min", np.array(lo, dtype=clip_dtype))
    hi_v = add_initializer(graph, f"{value.name}_clip_max", np.array(hi, dtype=clip_dtype))
    clip = ir.node("Clip", inputs=[codes, lo_v, hi_v], name=f"{value.name}_Clip")
    clip.outputs[0].name = f"{value.name}_clipped" if not wide else f"{value.name}_clipped_int32"
    clip.outputs[0].dtype = ir.DataType.from_numpy(clip_dtype)
    nodes.append(clip)
    if wide:
        narrow = ir.node("Cast", inputs=[clip.outputs[0]], attributes={"to": ir.DataType.from_numpy(dtype)},
                         name=f"{value.name}_Narrow")
        narrow.outputs[0].name = f"{value.name}_clipped"
        nodes.append(narrow)
    return nodes


def _fake_quantize_activation(graph: ir.Graph, value: ir.Value, fmt: ann.FixedPoint) -> None:
    """Insert Q -> [Clip] -> DQ after ``value`` and move its uses (not graph outputs) to DQ."""
    uses = list(value.uses())  # captured before the Q node exists (cycle pitfall)
    dtype = container_dtype(fmt.wl, fmt.signed)
    scale, zero = _scale_and_zero(fmt, value.name, graph, dtype)
    nodes = [ir.node("QuantizeLinear", inputs=[value, scale, zero], name=f"{value.name}_QuantizeLinear")]
    nodes[0].outputs[0].name = f"{value.name}_quantized"
    codes = nodes[0].outputs[0]
    if fmt.wl < dtype.itemsize * 8:
        nodes += _clip_codes(graph, value, nodes[-1].outputs[0], fmt, dtype)
        codes = nodes[-1].outputs[0]
    dq = ir.node("DequantizeLinear", inputs=[codes, scale, zero], name=f"{value.name}_DequantizeLinear")
    dq.outputs[0].name = f"{value.name}_dequantized"
    nodes.append(dq)
    for node in nodes:
        node.outputs[0].shape = value.shape
        if node.outputs[0].dtype is None:
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


def lower_to_qdq(model: ir.Model, native_int4: bool = False) -> ir.Model:
    """A new model in which every FixedPoint-annotated value is quantized in QDQ form.

    Constants (weights, biases) become integer initializers + DequantizeLinear; activations
    get QuantizeLinear -> [Clip] -> DequantizeLinear. The input model is not modified.

    Args:
        model: the annotated model.
        native_int4: store signed weights of at most 4 bits as native INT4 (raises the opset
            to 21 and the IR version to 10); otherwise int8 containers (opset 13).
    """
    out = model.clone()
    graph = out.graph
    need = required_opset(out, native_int4)
    if default_opset(out) < need:
        out.opset_imports[""] = need
    int4_values = native_int4_values(out) if native_int4 else set()
    if int4_values:
        out.ir_version = max(out.ir_version or 0, INT4_IR_VERSION)
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
                int4 = value.name in int4_values
                replaced[value.name] = (
                    _dequantize_constant(graph, value, fmt, anchor=node, int4=int4)
                    if fmt is not None
                    else _dequantize_integer(graph, value, grid, anchor=node, int4=int4)
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
