"""Legalisation of a float ONNX model onto MAX78000 layers (max78000.md §6.1, §4 rows 2–14).

The model must be sequential after canonicalisation and BatchNorm folding: a weight op (Conv,
Gemm, MatMul[+Add]) opens a layer, a following Relu/Abs/Clip(0, u) becomes its activation, a
MaxPool/AveragePool becomes the pooling of the *next* layer (pooling precedes the op in
hardware), a Flatten before a Gemm sets ``flatten``; a pool with no following weight op, a
second pool in a row or a pool right before a flatten becomes a passthrough layer.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompiler.errors import UnsupportedOpError
from qcompiler.graph import attr, const_array, is_constant
from qcompiler.targets.max78000.network import HwLayer

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
POOL_OPS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")
ACTIVATION_OPS = {"Relu": "ReLU", "Abs": "Abs", "Clip": "ReLU"}
PREFIX = "max78000"


@dataclasses.dataclass(frozen=True)
class LegalLayer:
    """A hardware layer with the ONNX values it reads its float parameters from.

    Attributes:
        hw: the hardware layer (bits, offsets and processors are filled later).
        weight_node: the ONNX Conv/Gemm/MatMul node (None for passthrough layers).
        weight: float weight in hardware layout ``(O, I, ...)`` (None for passthrough).
        bias: float bias ``(O,)`` or None.
        output: the ONNX value that holds the layer's float output (after its activation).
        clip_max: ``u`` of a Clip(0, u)/ReLU6 activation, else None.
    """

    hw: HwLayer
    weight_node: str | None
    weight: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    bias: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    output: str = ""
    clip_max: float | None = None


def _fail(node: ir.Node, rule: str) -> UnsupportedOpError:
    return UnsupportedOpError(f"{PREFIX}: node {node.name!r} ({node.op_type}): {rule}")


def _dims(value: ir.Value, node: ir.Node) -> tuple[int, ...]:
    """Non-batch dims of an activation value (static)."""
    shape = value.shape
    if shape is None or any(not isinstance(d, int) for d in list(shape)[1:]):
        raise _fail(node, f"input {value.name!r} needs a static shape (except the batch dimension)")
    return tuple(int(d) for d in list(shape)[1:])


@dataclasses.dataclass
class _Builder:
    """The layer under construction while walking the graph."""

    kind: str
    nodes: list[str]
    pool_node: ir.Node | None
    flatten: bool
    in_shape: tuple[int, ...]
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    activation: str | None = None
    clip_max: float | None = None
    kernel: tuple[int, ...] = (1, 1)
    pad: int = 0
    output: str = ""
    weight_node: str | None = None
    accepts_bias: bool = False


def _pool_fields(node: ir.Node | None, shape: tuple[int, ...]) -> dict:
    """HwLayer pooling fields of a pool node applied to data of non-batch ``shape``."""
    if node is None:
        return {}
    spatial = shape[1:]
    if node.op_type.startswith("Global"):
        size = tuple(spatial)
        stride = size
        kind = "avg" if node.op_type == "GlobalAveragePool" else "max"
    else:
        size = tuple(attr(node, "kernel_shape"))
        stride = tuple(attr(node, "strides", (1,) * len(size)))
        kind = "max" if node.op_type == "MaxPool" else "avg"
        if any(attr(node, "pads", (0,) * 2 * len(size))) or attr(
            node, "auto_pad", "NOTSET"
        ) not in ("NOTSET", "VALID"):
            raise _fail(
                node, "padded pooling is not supported (rule §4.12: pooling has no padding)"
            )
        if attr(node, "ceil_mode", 0):
            raise _fail(
                node, "ceil_mode pooling is not supported (rule §4.12: floor((H - P)/s) + 1)"
            )
        if any(d != 1 for d in attr(node, "dilations", (1,) * len(size))):
            raise _fail(node, "dilated pooling is not supported (rule §4.12)")
    if len(size) == 1:
        size, stride = (size[0], 1), (stride[0], 1)
    return {"pool": kind, "pool_size": tuple(size), "pool_stride": tuple(stride)}


def _pooled(shape: tuple[int, ...], fields: dict) -> tuple[int, ...]:
    if not fields:
        return shape
    spatial = shape[1:]
    out = [(d - p) // s + 1 for d, p, s in zip(spatial, fields["pool_size"], fields["pool_stride"])]
    return (shape[0], *out)


def _conv(node: ir.Node, builder: _Builder, data_rank: int) -> None:
    weight = const_array(node.inputs[1])
    kernel = tuple(weight.shape[2:])
    if attr(node, "group", 1) != 1:
        raise _fail(
            node,
            f"groups = {attr(node, 'group', 1)}: depthwise/grouped convolution is not supported "
            "(rule §4.11: groups 1)",
        )
    if any(d != 1 for d in attr(node, "dilations", (1,) * len(kernel))):
        raise _fail(node, "dilation != 1 is not supported (rule §4.11)")
    strides = tuple(attr(node, "strides", (1,) * len(kernel)))
    if any(s != 1 for s in strides):
        raise _fail(
            node,
            f"stride {strides} is not supported (rule §4.9: stride 1; hint: a stride-s conv is a "
            "stride-1 conv followed by pool_stride s in the next layer)",
        )
    if attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise _fail(node, "auto_pad SAME is not supported; export with explicit pads")
    pads = tuple(attr(node, "pads", (0,) * 2 * len(kernel)))
    if len(set(pads)) != 1:
        raise _fail(node, f"pads {pads} are not symmetric (rule §4.10)")
    if data_rank == 2 and len(kernel) != 2 or data_rank == 1 and len(kernel) != 1:
        raise _fail(node, "only Conv1d on (N, C, L) and Conv2d on (N, C, H, W) data are supported")
    builder.weight, builder.kernel, builder.pad = weight, kernel, pads[0]
    bias = (
        const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    )
    builder.bias = bias


def _linear(node: ir.Node, builder: _Builder) -> None:
    weight = const_array(node.inputs[1])
    if node.op_type == "Gemm":
        if attr(node, "transA", 0):
            raise _fail(node, "transA = 1 is not supported")
        alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
        weight = weight if attr(node, "transB", 0) else weight.T
        weight = weight * alpha
        bias = (
            const_array(node.inputs[2])
            if len(node.inputs) > 2 and node.inputs[2] is not None
            else None
        )
        builder.bias = (
            None if bias is None else np.broadcast_to(bias * beta, (weight.shape[0],)).copy()
        )
    else:
        if weight.ndim != 2:
            raise _fail(node, "MatMul with a non-2-D weight is not a linear layer")
        weight = weight.T
        builder.accepts_bias = True
    builder.weight = np.ascontiguousarray(weight, dtype=np.float32)


def legalize(model: ir.Model) -> list[LegalLayer]:
    """Map a canonicalised, BN-folded sequential model onto hardware layers.

    Raises:
        UnsupportedOpError: an operator, attribute or topology the target cannot represent,
            naming the node and the rule.
    """
    graph = model.graph
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise UnsupportedOpError(
            f"{PREFIX}: the model must have one input and one output "
            f"(has {len(graph.inputs)} and {len(graph.outputs)})"
        )
    current = graph.inputs[0]
    layers: list[LegalLayer] = []
    builder: _Builder | None = None
    pending_pool: ir.Node | None = None
    pending_shape: tuple[int, ...] | None = None
    flatten = False
    flatten_shape: tuple[int, ...] = ()

    def close() -> None:
        nonlocal builder
        if builder is not None:
            layers.append(_finish(builder, len(layers)))
            builder = None

    def passthrough(node: ir.Node, shape: tuple[int, ...]) -> None:
        fields = _pool_fields(node, shape)
        hw = HwLayer(
            op="passthrough",
            kernel_size=(1, 1),
            pad=0,
            in_channels=shape[0],
            out_channels=shape[0],
            in_dims=shape[1:],
            nodes=(node.name,),
            name=f"l{len(layers):02d}_pool",
            **fields,
        )
        layers.append(LegalLayer(hw, None, output=node.outputs[0].name))

    for node in graph:
        data_inputs = [v for v in node.inputs if v is not None and not is_constant(v)]
        if node.op_type == "Constant":
            continue
        if len(data_inputs) != 1 or data_inputs[0] is not current or len(list(current.uses())) != 1:
            raise _fail(
                node,
                "branching topology (rule §4.2: this target supports sequential networks only)",
            )
        op = node.op_type
        out = node.outputs[0]
        if op in WEIGHT_OPS:
            close()
            shape = pending_shape if pending_pool is not None else _dims(current, node)
            shape = flatten_shape if flatten else shape
            builder = _Builder(
                kind="fc" if op != "Conv" else "conv",
                nodes=[node.name],
                pool_node=pending_pool,
                flatten=flatten,
                in_shape=shape,
                weight_node=node.name,
            )
            data_rank = len(_dims(current, node)) - 1
            if op == "Conv":
                if len(node.inputs) < 2 or not is_constant(node.inputs[1]):
                    raise _fail(node, "the weight must be a constant")
                _conv(node, builder, data_rank)
            else:
                if data_rank != 0:
                    raise _fail(
                        node, "a linear layer needs a flattened (N, K) input: insert a Flatten"
                    )
                _linear(node, builder)
            pending_pool, pending_shape, flatten = None, None, False
        elif (
            op == "Add"
            and builder is not None
            and builder.accepts_bias
            and builder.activation is None
        ):
            bias = next(const_array(v) for v in node.inputs if v is not None and is_constant(v))
            builder.bias = np.broadcast_to(bias.reshape(-1), (builder.weight.shape[0],)).astype(
                np.float32
            )
            builder.accepts_bias = False
            builder.nodes.append(node.name)
        elif op in ACTIVATION_OPS and builder is not None and builder.activation is None:
            builder.activation = ACTIVATION_OPS[op]
            if op == "Clip":
                builder.clip_max = _clip_max(node)
            builder.nodes.append(node.name)
            builder.accepts_bias = False
        elif op in POOL_OPS:
            close()
            shape = _dims(current, node)
            if pending_pool is not None:
                passthrough(pending_pool, pending_shape)
            pending_pool, pending_shape = node, shape
        elif op == "Flatten":
            close()
            if attr(node, "axis", 1) != 1:
                raise _fail(node, "only Flatten(axis=1) is supported")
            if pending_pool is not None:
                passthrough(pending_pool, pending_shape)
                pending_pool = None
            flatten, flatten_shape = True, _dims(current, node)
        else:
            raise _fail(
                node,
                f"operator {op} is not supported (rule §4.3: Conv, Gemm, MatMul+Add, MaxPool, "
                "AveragePool, Relu, Abs, Clip(0, u), Flatten)",
            )
        if builder is not None and node.name in builder.nodes:
            builder.output = out.name
        current = out
    close()
    if pending_pool is not None:
        passthrough(pending_pool, pending_shape)
    if not layers:
        raise UnsupportedOpError(f"{PREFIX}: the model has no layer")
    if current is not graph.outputs[0]:
        raise UnsupportedOpError(
            f"{PREFIX}: the graph output {graph.outputs[0].name!r} is not the last layer's output"
        )
    return layers


def _clip_max(node: ir.Node) -> float:
    bounds = [const_array(v) if v is not None else None for v in node.inputs[1:3]]
    low = float(bounds[0]) if bounds and bounds[0] is not None else -np.inf
    high = float(bounds[1]) if len(bounds) > 1 and bounds[1] is not None else np.inf
    if low != 0.0 or not np.isfinite(high) or high <= 0:
        raise _fail(
            node,
            f"Clip({low}, {high}) is not supported (rule §4.4: only Clip(0, u) maps to the int8 clamp)",
        )
    return high


def _finish(builder: _Builder, index: int) -> LegalLayer:
    shape = builder.in_shape
    pool_fields = _pool_fields(builder.pool_node, shape)
    nodes = ([builder.pool_node.name] if builder.pool_node is not None else []) + builder.nodes
    weight = builder.weight
    if builder.kind == "conv":
        op = "conv2d" if weight.ndim == 4 else "conv1d"
        channels, dims = shape[0], shape[1:]
    else:
        op = "mlp"
        pooled = _pooled(shape, pool_fields)
        channels, dims = pooled[0], (pooled[1:] if len(pooled) > 1 else (1, 1))
        if builder.flatten and pool_fields:
            raise UnsupportedOpError(
                f"{PREFIX}: layer {index} ({nodes[0]}): flatten combined with pooling (rule §4.14)"
            )
    hw = HwLayer(
        op=op,
        kernel_size=builder.kernel if op != "mlp" else (1, 1),
        pad=builder.pad,
        activation=builder.activation,
        flatten=builder.flatten and int(np.prod(dims)) > 1,
        in_channels=int(channels),
        out_channels=int(weight.shape[0]),
        in_dims=tuple(int(d) for d in dims),
        nodes=tuple(nodes),
        name=f"l{index:02d}_{builder.kind}",
        **pool_fields,
    )
    return LegalLayer(
        hw,
        builder.weight_node,
        np.asarray(weight, dtype=np.float32),
        None if builder.bias is None else np.asarray(builder.bias, dtype=np.float32),
        builder.output,
        builder.clip_max,
    )
