"""The MAX78000 simulation ONNX (max78000.md §5.3): the layer arithmetic of §5.1 in standard ops.

Tensors are integer-valued float32. Rounding is ``Floor(v + 0.5)`` (the hardware rounds half
up; ``QuantizeLinear``/``Round`` would round half to even). Average pooling truncates toward zero
via ``Sign(s)·Floor(|s|/P)`` on the exact window sum. Exact while partial sums stay below 2^24:
:func:`exactness_bound` checks ``128·(Σ|q_w[o]| + |b_hw[o]|) < 2^23`` per output channel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from qcompiler.targets.max78000.network import HwLayer
from qcompiler.targets.max78000.simulator import LayerParams

OPSET = 17
EXACT_LIMIT = 2**23


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, hint: str, value: np.ndarray | float) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], hint: str, **attrs: object) -> str:
        out = self.name(hint)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out


def _pool(b: _Builder, x: str, layer: HwLayer, spatial: int, prefix: str) -> str:
    size = list(layer.pool_size[:spatial]) if layer.pool is not None else [1] * spatial
    stride = list(layer.pool_stride[:spatial])
    if layer.pool is None and all(s == 1 for s in stride):
        return x
    if layer.pool != "avg":
        return b.op("MaxPool", [x], f"{prefix}_maxpool", kernel_shape=size, strides=stride)
    count = float(np.prod(size))
    mean = b.op("AveragePool", [x], f"{prefix}_avgpool", kernel_shape=size, strides=stride)
    total = b.op(
        "Round",
        [b.op("Mul", [mean, b.const(f"{prefix}_P", count)], f"{prefix}_sum")],
        f"{prefix}_sumr",
    )
    quotient = b.op(
        "Floor",
        [
            b.op(
                "Div",
                [b.op("Abs", [total], f"{prefix}_abs"), b.const(f"{prefix}_Pd", count)],
                f"{prefix}_div",
            )
        ],
        f"{prefix}_floor",
    )
    return b.op("Mul", [b.op("Sign", [total], f"{prefix}_sign"), quotient], f"{prefix}_trunc")


def _requantize(b: _Builder, acc: str, layer: HwLayer, shift: int, prefix: str) -> str:
    if layer.output_width == 32:
        return acc
    scaled = b.op("Mul", [acc, b.const(f"{prefix}_scale", 2.0 ** (shift - 7))], f"{prefix}_shift")
    rounded = b.op(
        "Floor",
        [b.op("Add", [scaled, b.const(f"{prefix}_half", 0.5)], f"{prefix}_half")],
        f"{prefix}_rhu",
    )
    y = b.op(
        "Clip",
        [rounded, b.const(f"{prefix}_lo", -128.0), b.const(f"{prefix}_hi", 127.0)],
        f"{prefix}_clamp",
    )
    if layer.activation == "ReLU":
        return b.op("Relu", [y], f"{prefix}_relu")
    if layer.activation == "Abs":
        absolute = b.op("Abs", [y], f"{prefix}_absv")
        return b.op(
            "Clip",
            [absolute, b.const(f"{prefix}_zero", 0.0), b.const(f"{prefix}_max", 127.0)],
            f"{prefix}_absclamp",
        )
    return y


def _layer(
    b: _Builder, x: str, layer: HwLayer, params: LayerParams | None, spatial: int, prefix: str
) -> str:
    x = _pool(b, x, layer, spatial, prefix)
    if layer.op == "passthrough":
        return x
    weights = params.weights.astype(np.float32)
    bias = 128.0 * (params.bias if params.bias is not None else np.zeros(weights.shape[0])).astype(
        np.float32
    )
    if layer.op == "mlp":
        flat = b.op("Flatten", [x], f"{prefix}_flatten", axis=1)
        acc = b.op(
            "Gemm",
            [flat, b.const(f"{prefix}_W", weights), b.const(f"{prefix}_B", bias)],
            f"{prefix}_gemm",
            transB=1,
        )
    else:
        pads = [layer.pad] * (2 * (weights.ndim - 2))
        acc = b.op(
            "Conv",
            [x, b.const(f"{prefix}_W", weights), b.const(f"{prefix}_B", bias)],
            f"{prefix}_conv",
            pads=pads,
            kernel_shape=list(weights.shape[2:]),
        )
    out = _requantize(b, acc, layer, params.shift, prefix)
    if layer.op == "mlp":
        out = b.op("Reshape", [out, _shape_const(b, prefix)], f"{prefix}_as_map")
    return out


def _shape_const(b: _Builder, prefix: str) -> str:
    name = b.name(f"{prefix}_shape")
    b.inits.append(numpy_helper.from_array(np.array([0, -1, 1, 1], dtype=np.int64), name))
    return name


def build_simulation(
    layers: Sequence[HwLayer],
    params: Sequence[LayerParams | None],
    input_shape: Sequence[int],
    input_name: str = "x",
    output_name: str = "y",
    input_scale: float | None = None,
    output_scale: float | None = None,
) -> ir.Model:
    """The §5.3 ONNX of a network.

    Args:
        layers: the hardware layers.
        params: their integer parameters.
        input_shape: ``(C, H, W)`` or ``(C, L)`` of one sample (the batch dimension is dynamic).
        input_name: the graph input's name.
        output_name: the graph output's name.
        input_scale: when set, the input is a float tensor converted with
            ``clamp(round(input_scale·a), −128, 127)`` (§6.4); otherwise integer-valued.
        output_scale: when set, the output is multiplied by it (float logits, §6.5).

    Returns:
        The model: batch ``N`` first; 1-D data stays ``(N, C, L)``; linear outputs are ``(N, O, 1, 1)``
        unless ``output_scale`` is set, which flattens them to ``(N, O)`` like a float classifier.
    """
    b = _Builder()
    spatial = len(input_shape) - 1
    x = input_name
    if input_scale is not None:
        scaled = b.op(
            "Round", [b.op("Mul", [x, b.const("in_scale", input_scale)], "in_mul")], "in_round"
        )
        x = b.op("Clip", [scaled, b.const("in_lo", -128.0), b.const("in_hi", 127.0)], "in_clamp")
    for i, (layer, layer_params) in enumerate(zip(layers, params)):
        x = _layer(b, x, layer, layer_params, spatial, f"l{i:02d}")
    if output_scale is not None:
        if layers[-1].op == "mlp":
            x = b.op("Flatten", [x], "out_flatten", axis=1)
        x = b.op("Mul", [x, b.const("out_scale", output_scale)], "out_mul")
    b.nodes.append(helper.make_node("Identity", [x], [output_name], name="output"))
    graph = helper.make_graph(
        b.nodes,
        "max78000_simulation",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", *input_shape])],
        [
            helper.make_tensor_value_info(
                output_name, TensorProto.FLOAT, _output_dims(layers[-1], spatial, output_scale)
            )
        ],
        b.inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="qcompiler"
    )
    onnx.checker.check_model(model)
    return ir.serde.deserialize_model(model)


def _output_dims(last: HwLayer, spatial: int, output_scale: float | None) -> list[str | int]:
    if last.op == "mlp":
        return ["N", "O"] if output_scale is not None else ["N", "O", 1, 1]
    return ["N", "C", *[f"D{i}" for i in range(spatial)]]


def exactness_bound(params: Sequence[LayerParams | None]) -> list[int]:
    """Indices of layers where float32 ORT may differ from the integer simulator (§5.3 bound)."""
    risky = []
    for i, p in enumerate(params):
        if p is None:
            continue
        total = np.abs(p.weights.reshape(p.weights.shape[0], -1)).sum(axis=1)
        if p.bias is not None:
            total = total + np.abs(p.bias)
        if (128 * total).max() >= EXACT_LIMIT:
            risky.append(i)
    return risky
