"""An annotated ONNX IR as a trainable ``torch.nn.Module`` with the targets' own quantizers.

:class:`GraphModule` runs the graph node by node with ``torch.nn.functional``; the weights and
biases of quantizable layers are ``nn.Parameter``\\ s. With ``quantize=True`` every value the
target quantizes is fake-quantized exactly as the target emits it:

- activations with a :class:`~qcompiler.annotations.FixedPoint` format:
  ``clamp(round_half_even(x·2^fl), lo, hi)·2^-fl`` (``QuantizeLinear``/``DequantizeLinear``);
- activations with a target grid (:class:`~qcompiler.annotations.ActivationGrid`, e.g.
  MAX78000's Q7 codes: the output shift rounds half up, average pooling truncates toward zero):
  ``clamp(rounding(snap(x/scale)), lo, hi)·scale``;
- weights and biases with a ``FixedPoint`` format (per-channel FLs), integer codes chosen by a
  pass (:class:`~qcompiler.annotations.IntegerWeights`, e.g. GPFQ) or a target grid
  (:class:`~qcompiler.annotations.WeightGrid`, e.g. MAX78000's per-layer step):
  ``clamp(round_half_even(w/s), q_min, q_max)·s``.

Gradients pass through the rounding unchanged and are zero where the clamp saturates (the
clipped straight-through estimator). Run in float64 (``module.double()``), the forward pass is
exact in the integer domain and equals the fixed-point target's integer simulator and the
MAX78000 layer simulator code for code.

Supported ops (:data:`TORCH_OPS`); any other op is a one-line error naming node and op.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from qcompiler import annotations as ann
from qcompiler.errors import UnsupportedModelError
from qcompiler.graph import attr, const_array
from qcompiler.candidates import NOT_QUANTIZED, Fitted, parse_candidate
from qcompiler.candidates import codes as codebook_codes
from qcompiler.passes.calibrate import META_KEY
from qcompiler.passes.detect_layers import quantizable_nodes
from qcompiler.passes.profile_errors import fit_activation, fit_weight


class _RoundingSTE(torch.autograd.Function):
    """An integer rounding forward, the identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rounder: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:  # noqa: D102
        return rounder(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        return grad, None


#: The roundings of :data:`~qcompiler.annotations.ROUNDINGS` (``torch.round`` is half to even).
ROUNDERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "half_even": torch.round,
    "half_up": lambda u: torch.floor(u + 0.5),
    "toward_zero": torch.trunc,
}


def _round(u: torch.Tensor, rounding: str = "half_even") -> torch.Tensor:
    """``u`` rounded to an integer as ``rounding`` says, with the straight-through estimator."""
    return _RoundingSTE.apply(u, ROUNDERS[rounding])


def fake_quant(x: torch.Tensor, scale: torch.Tensor, q_min: int, q_max: int,
               rounding: str = "half_even", lattice: int = 0) -> torch.Tensor:
    """``clamp(rounding(x/scale), q_min, q_max)·scale`` with the clipped straight-through estimator.

    With ``lattice`` > 0, ``x/scale`` is first snapped to the nearest multiple of ``1/lattice``
    (it is one in the target's integer arithmetic; the float forward pass is only off by
    rounding noise, which would otherwise decide exact ties)."""
    u = x / scale
    if lattice > 0:
        u = _round(u * lattice) / lattice
    return torch.clamp(_round(u, rounding), q_min, q_max) * scale


class Quantizer(torch.nn.Module):
    """A fixed integer grid: per-channel (or one) scale, a code range and a rounding."""

    def __init__(self, scales: Sequence[float], q_min: int, q_max: int, axis: int | None, ndim: int,
                 rounding: str = "half_even", lattice: int = 0) -> None:
        super().__init__()
        shape = [1] * ndim
        if axis is not None and len(scales) > 1:
            shape[axis] = -1
        self.register_buffer("scale", torch.tensor(np.asarray(scales, dtype=np.float64)).reshape(shape if ndim else ()))
        self.q_min, self.q_max = int(q_min), int(q_max)
        self.rounding, self.lattice = rounding, int(lattice)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return fake_quant(x, self.scale.to(x.dtype), self.q_min, self.q_max, self.rounding, self.lattice)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes of ``x`` (no gradient)."""
        with torch.no_grad():
            return torch.round(self.forward(x) / self.scale.to(x.dtype))


def fixed_point_quantizer(fmt: ann.FixedPoint, ndim: int) -> Quantizer:
    """The quantizer of a fixed-point format (scales ``2^-fl``)."""
    lo, hi = fmt.code_range()
    return Quantizer(fmt.scales(), lo, hi, fmt.axis, ndim)


def weight_quantizer(value: ir.Value, ndim: int) -> Quantizer | None:
    """The grid a target stores ``value`` on: FixedPoint, then IntegerWeights, then WeightGrid."""
    fmt = ann.get(value, ann.FixedPoint)
    if fmt is not None:
        return fixed_point_quantizer(fmt, ndim)
    for kind in (ann.IntegerWeights, ann.WeightGrid):
        grid = ann.get(value, kind)
        if grid is not None:
            return Quantizer(grid.scales, grid.q_min, grid.q_max, grid.axis, ndim)
    return None


def activation_quantizer(value: ir.Value) -> Quantizer | None:
    """The grid a target computes an activation on: an ActivationGrid, else its FixedPoint format."""
    grid = ann.get(value, ann.ActivationGrid)
    if grid is not None:
        return Quantizer((grid.scale,), grid.q_min, grid.q_max, None, 0, grid.rounding, grid.lattice)
    fmt = ann.get(value, ann.FixedPoint)
    return fixed_point_quantizer(fmt, 0) if fmt is not None else None


class _CodebookSTE(torch.autograd.Function):
    """A fitted profiling quantizer (``candidates.apply``) forward; the clipped STE backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fitted: Fitted, top: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(x.abs() <= top)
        return torch.from_numpy(np.ascontiguousarray(fitted.apply(x.detach().cpu().numpy()))).to(x.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: D102
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None


class CodebookQuantizer(torch.nn.Module):
    """A profiling candidate (uniform, dead-zone, log, fixed) fitted once and held fixed, as
    seed 000 fine-tunes with fixed codebooks; the forward pass is :func:`qcompiler.candidates.apply`.

    Args:
        fitted: the fitted candidate.
        shape: the tensor's shape (weights, whose parameters may be per channel) or None
            (activations, per tensor).
    """

    def __init__(self, fitted: Fitted, shape: Sequence[int] | None = None) -> None:
        super().__init__()
        self.fitted = fitted
        # the largest reconstruction magnitude (per element for per-channel weights): the STE
        # passes gradients only inside it
        big = np.full(tuple(shape) if shape is not None else (1,), np.finfo(np.float32).max / 4, dtype=np.float64)
        top = np.abs(fitted.apply(big)).reshape(tuple(shape) if shape is not None else ())
        self.register_buffer("top", torch.from_numpy(top))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return _CodebookSTE.apply(x, self.fitted, self.top.to(x.dtype))

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The codebook indices of ``x`` (no gradient)."""
        return torch.from_numpy(codebook_codes(self.fitted, x.detach().cpu().numpy()))

    def annotation(self) -> ann.Codebook:
        """The :class:`~qcompiler.annotations.Codebook` that records this quantizer."""
        f = self.fitted
        return ann.Codebook(f.candidate.label, bool(f.signed), f.axis, tuple(float(v) for v in np.ravel(f.params)))


def codebook_of(value: ir.Value, array: np.ndarray | None, weight_axis: int | None = None) -> Fitted | None:
    """A value's fixed codebook: its :class:`~qcompiler.annotations.Codebook`, else its allocated
    :class:`~qcompiler.annotations.BitWidth` fitted to ``array`` exactly as error profiling fits
    it; None when neither annotation is present (or there is nothing to fit to yet).

    Args:
        value: the weight or activation value.
        array: the weight, or an activation sample.
        weight_axis: the weight's channel axis (None for activations).
    """
    book = ann.get(value, ann.Codebook)
    if book is not None:
        params = np.asarray(book.params) if book.axis is not None else book.params
        return Fitted(parse_candidate(book.candidate), book.signed, book.axis, params)
    chosen = ann.get(value, ann.BitWidth)
    if chosen is None or array is None:
        return None
    candidate = parse_candidate(chosen.candidate)
    if candidate.kind == NOT_QUANTIZED:  # allocated to stay float: no quantizer
        return None
    if weight_axis is not None:
        return fit_weight(candidate, array, weight_axis)
    return fit_activation(candidate, value, array)


# --------------------------------------------------------------------------- ops


def _pads(node: ir.Node, nd: int) -> tuple[int, ...]:
    if str(attr(node, "auto_pad", "NOTSET")) not in ("NOTSET", "VALID"):
        raise UnsupportedModelError(f"node {node.name!r} ({node.op_type}): auto_pad SAME is not supported in torch conversion")
    return tuple(int(p) for p in attr(node, "pads", None) or (0,) * (2 * nd))


def _torch_pad(pads: tuple[int, ...]) -> list[int]:
    """ONNX ``[b1, b2, …, e1, e2, …]`` to F.pad's last-axis-first ``[b_n, e_n, …, b_1, e_1]``."""
    nd = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(nd)):
        out += [pads[i], pads[i + nd]]
    return out


def _conv(node: ir.Node, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    nd = w.dim() - 2
    pads = _pads(node, nd)
    stride = [int(s) for s in attr(node, "strides", None) or (1,) * nd]
    dilation = [int(d) for d in attr(node, "dilations", None) or (1,) * nd]
    groups = int(attr(node, "group", 1))
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    if pads[:nd] == pads[nd:]:
        return conv(x, w, b, stride=stride, padding=list(pads[:nd]), dilation=dilation, groups=groups)
    return conv(F.pad(x, _torch_pad(pads)), w, b, stride=stride, dilation=dilation, groups=groups)


def _gemm(node: ir.Node, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    a = a.t() if attr(node, "transA", 0) else a
    b = b.t() if attr(node, "transB", 0) else b
    y = a @ b
    alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
    y = y * alpha if alpha != 1.0 else y
    return y if c is None else y + (c * beta if beta != 1.0 else c)


def _pool(node: ir.Node, x: torch.Tensor) -> torch.Tensor:
    kernel = [int(k) for k in attr(node, "kernel_shape")]
    nd = len(kernel)
    pads = _pads(node, nd)
    stride = [int(s) for s in attr(node, "strides", None) or (1,) * nd]
    ceil = bool(attr(node, "ceil_mode", 0))
    if node.op_type == "MaxPool":
        dilation = [int(d) for d in attr(node, "dilations", None) or (1,) * nd]
        padded = F.pad(x, _torch_pad(pads), value=-math.inf) if any(pads) else x
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
        return pool(padded, kernel, stride, 0, dilation, ceil_mode=ceil)
    include = bool(attr(node, "count_include_pad", 0))
    if pads[:nd] != pads[nd:]:
        raise UnsupportedModelError(f"node {node.name!r} (AveragePool): asymmetric pads are not supported in torch conversion")
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
    return pool(x, kernel, stride, list(pads[:nd]), ceil_mode=ceil, count_include_pad=include)


def _reshape(node: ir.Node, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    dims = [int(d) for d in shape.tolist()]
    if not attr(node, "allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _axes(node: ir.Node, given: torch.Tensor | None) -> list[int]:
    if given is not None:
        return [int(a) for a in given.tolist()]
    return [int(a) for a in attr(node, "axes", None) or ()]


def _squeeze(node: ir.Node, x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
    dims = _axes(node, axes)
    return x.squeeze(tuple(dims)) if dims else x.squeeze()


def _unsqueeze(node: ir.Node, x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
    out = x
    for a in sorted(a % (x.dim() + len(_axes(node, axes))) for a in _axes(node, axes)):
        out = out.unsqueeze(a)
    return out


def _clip(node: ir.Node, x: torch.Tensor, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None) -> torch.Tensor:
    return torch.clamp(x, None if lo is None else lo.item(), None if hi is None else hi.item())


def _flatten(node: ir.Node, x: torch.Tensor) -> torch.Tensor:
    axis = int(attr(node, "axis", 1)) % max(x.dim(), 1)
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _layer_norm(node: ir.Node, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    axis = int(attr(node, "axis", -1)) % x.dim()
    return F.layer_norm(x, x.shape[axis:], scale, bias, eps=float(attr(node, "epsilon", 1e-5)))


def _shape(node: ir.Node, x: torch.Tensor) -> torch.Tensor:
    dims = list(x.shape)
    start, end = int(attr(node, "start", 0)), attr(node, "end", None)
    return torch.tensor(dims[start:None if end is None else int(end)], dtype=torch.int64)


#: ONNX TensorProto data types (``Cast``'s ``to``) as torch dtypes.
TORCH_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
    9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16,
}


def _cast(node: ir.Node, x: torch.Tensor) -> torch.Tensor:
    to = int(attr(node, "to"))
    if to not in TORCH_DTYPES:
        raise UnsupportedModelError(f"node {node.name!r} (Cast): target type {to} is not supported in torch conversion")
    dtype = TORCH_DTYPES[to]
    # A cast to float follows the module's float precision (float64 runs stay exact).
    return x.to(x.dtype if dtype.is_floating_point and x.is_floating_point() else dtype)


def _wrapped(indices: torch.Tensor, size: int) -> torch.Tensor:
    """ONNX indices may count from the end (``-1`` is the last); torch's ``gather`` may not."""
    return torch.where(indices < 0, indices + size, indices)


def _gather(node: ir.Node, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    axis = int(attr(node, "axis", 0)) % x.dim()
    return x[(slice(None),) * axis + (_wrapped(indices, x.shape[axis]),)]


def _gather_elements(node: ir.Node, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    axis = int(attr(node, "axis", 0)) % x.dim()
    return torch.gather(x, axis, _wrapped(indices, x.shape[axis]))


def _gather_nd(node: ir.Node, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    if int(attr(node, "batch_dims", 0)) != 0:
        raise UnsupportedModelError(f"node {node.name!r} (GatherND): batch_dims != 0 is not supported in torch conversion")
    return x[tuple(_wrapped(indices[..., i], x.shape[i]) for i in range(indices.shape[-1]))]


def _expand(node: ir.Node, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(int(d) for d in shape.tolist())))


def _slice(node: ir.Node, x: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
           axes: torch.Tensor | None = None, steps: torch.Tensor | None = None) -> torch.Tensor:
    axes_list = [int(a) % x.dim() for a in axes.tolist()] if axes is not None else list(range(len(starts)))
    steps_list = [int(s) for s in steps.tolist()] if steps is not None else [1] * len(axes_list)
    index: list[slice] = [slice(None)] * x.dim()
    for axis, start, end, step in zip(axes_list, starts.tolist(), ends.tolist(), steps_list):
        if step <= 0:
            raise UnsupportedModelError(f"node {node.name!r} (Slice): steps <= 0 are not supported in torch conversion")
        size = x.shape[axis]
        # ONNX clamps out-of-range starts and ends (e.g. INT64_MAX for "to the end")
        index[axis] = slice(max(-size, min(int(start), size)), max(-size, min(int(end), size)), step)
    return x[tuple(index)]


def _reduce_axes(node: ir.Node, x: torch.Tensor, axes: torch.Tensor | None) -> list[int] | None:
    """The reduced axes (input since opset 13/18, else attribute); None reduces nothing."""
    dims = _axes(node, axes)
    if dims:
        return [d % x.dim() for d in dims]
    return None if attr(node, "noop_with_empty_axes", 0) else list(range(x.dim()))


def _reduce(reduction: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """An ONNX Reduce* op from a torch reduction taking ``dim`` and ``keepdim``."""
    def reduce(node: ir.Node, x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
        dims = _reduce_axes(node, x, axes)
        return x if dims is None else reduction(x, dim=dims, keepdim=bool(attr(node, "keepdims", 1)))
    return reduce


#: Op → torch implementation (node, *inputs); inputs absent in the node are None.
TORCH_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": lambda n, a, b: a @ b,
    "Add": lambda n, a, b: a + b,
    "Sub": lambda n, a, b: a - b,
    "Mul": lambda n, a, b: a * b,
    "Div": lambda n, a, b: a / b,
    "Relu": lambda n, x: F.relu(x),
    "Sigmoid": lambda n, x: torch.sigmoid(x),
    "Tanh": lambda n, x: torch.tanh(x),
    "Clip": _clip,
    "MaxPool": _pool,
    "AveragePool": _pool,
    "GlobalAveragePool": lambda n, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": lambda n, x: x.permute(*[int(p) for p in attr(n, "perm", None) or reversed(range(x.dim()))]),
    "Concat": lambda n, *xs: torch.cat([x for x in xs if x is not None], dim=int(attr(n, "axis"))),
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Identity": lambda n, x: x,
    "Dropout": lambda n, x, *rest: x,
    "Softmax": lambda n, x: torch.softmax(x, dim=int(attr(n, "axis", -1))),
    "LayerNormalization": _layer_norm,
    "Gelu": lambda n, x: F.gelu(x, approximate=str(attr(n, "approximate", "none"))),
    "Erf": lambda n, x: torch.erf(x),
    "Sqrt": lambda n, x: torch.sqrt(x),
    "Pow": lambda n, x, y: torch.pow(x, y),
    "Neg": lambda n, x: -x,
    "Abs": lambda n, x: torch.abs(x),
    "Greater": lambda n, a, b: a > b,
    "Less": lambda n, a, b: a < b,
    "Shape": _shape,
    "Cast": _cast,
    "Gather": _gather,
    "GatherElements": _gather_elements,
    "GatherND": _gather_nd,
    "Expand": _expand,
    "Slice": _slice,
    "Range": lambda n, start, limit, delta: torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype),
    "Max": lambda n, *xs: functools.reduce(torch.maximum, [x for x in xs if x is not None]),
    "Min": lambda n, *xs: functools.reduce(torch.minimum, [x for x in xs if x is not None]),
    "Where": lambda n, c, a, b: torch.where(c, a, b),
    "And": lambda n, a, b: torch.logical_and(a, b),
    "Or": lambda n, a, b: torch.logical_or(a, b),
    "Not": lambda n, x: torch.logical_not(x),
    "Equal": lambda n, a, b: a == b,
    "IsNaN": lambda n, x: torch.isnan(x),
    "ReduceSum": _reduce(torch.sum),
    "ReduceMean": _reduce(torch.mean),
    "ReduceL2": _reduce(torch.linalg.vector_norm),
}


# --------------------------------------------------------------------------- the module


def _key(name: str) -> str:
    """A ParameterDict key for an initializer name (no dots allowed there)."""
    return name.replace(".", "__dot__")


class GraphModule(torch.nn.Module):
    """The graph as a torch module; quantizable layers' weights and biases are parameters.

    Args:
        model: the (annotated) IR; not modified.
        quantize: fake-quantize what the target quantizes (else a plain float copy).

    Raises:
        UnsupportedModelError: an op outside :data:`TORCH_OPS` (naming node and op).
    """

    def __init__(self, model: ir.Model, quantize: bool = True) -> None:
        super().__init__()
        self.nodes = list(model.graph)
        for node in self.nodes:
            if node.op_type not in TORCH_OPS or node.domain not in ("", "ai.onnx"):
                supported = ", ".join(sorted(TORCH_OPS))
                raise UnsupportedModelError(
                    f"node {node.name!r} ({node.op_type}): cannot be converted to torch (supported ops: {supported})"
                )
        self.input_names = [v.name for v in model.graph.inputs]
        self.output_names = [v.name for v in model.graph.outputs]
        trainable: dict[str, int | None] = {}  # name → the channel axis of weights (None for biases)
        for _, layer in quantizable_nodes(model):
            trainable[layer.weight] = layer.channel_axis
            if layer.bias:
                trainable[layer.bias] = None
        self.params = torch.nn.ParameterDict()
        self.constants: dict[str, torch.Tensor] = {}
        self.weight_quantizers = torch.nn.ModuleDict()
        for value in model.graph.initializers.values():
            array = const_array(value)
            tensor = torch.from_numpy(np.array(array))
            if value.name in trainable:
                self.params[_key(value.name)] = torch.nn.Parameter(tensor.float())
                quantizer = weight_quantizer(value, array.ndim) if quantize else None
                if quantizer is None and quantize and trainable[value.name] is not None:
                    fitted = codebook_of(value, array, trainable[value.name])
                    quantizer = CodebookQuantizer(fitted, array.shape) if fitted is not None else None
                if quantizer is not None:
                    self.weight_quantizers[_key(value.name)] = quantizer
            else:
                self.constants[value.name] = tensor
        self.activation_quantizers = torch.nn.ModuleDict()
        #: activations with an allocated codebook and no calibration sample: fitted on the first batch
        self.pending_codebooks: dict[str, ir.Value] = {}
        if quantize:
            for node in self.nodes:
                for value in [*node.outputs]:
                    self._add_activation_quantizer(value)
            for value in model.graph.inputs:
                self._add_activation_quantizer(value)

    def _add_activation_quantizer(self, value: ir.Value) -> None:
        if value.is_initializer():
            return
        quantizer = activation_quantizer(value)
        if quantizer is None and ann.get(value, ann.BitWidth) is not None:
            stats = value.meta.get(META_KEY)
            sample = stats.reservoir_sample() if stats is not None and stats.reservoir_size and stats.count else None
            fitted = codebook_of(value, sample)
            if fitted is None:
                self.pending_codebooks[value.name] = value
            else:
                quantizer = CodebookQuantizer(fitted)
        if quantizer is not None:
            self.activation_quantizers[_key(value.name)] = quantizer

    def fit_pending_codebooks(self, feed: Mapping[str, torch.Tensor]) -> None:
        """Fit the codebooks of allocated activations that had no calibration sample, on the
        float values ``feed`` produces (one forward pass; they are fixed afterwards)."""
        if self.pending_codebooks:
            with torch.no_grad():
                self(**feed)

    def codebooks(self) -> dict[str, ann.Codebook]:
        """The fixed codebooks in use, by value name (to record on the IR)."""
        return {k.replace("__dot__", "."): q.annotation()
                for group in (self.weight_quantizers, self.activation_quantizers)
                for k, q in group.items() if isinstance(q, CodebookQuantizer)}

    def parameter_names(self) -> list[str]:
        """The IR names of the trainable initializers."""
        return [k.replace("__dot__", ".") for k in self.params]

    def quantized_weight(self, name: str) -> torch.Tensor:
        """A trainable initializer as the target will store it (fake-quantized when it has a grid)."""
        p = self.params[_key(name)]
        q = self.weight_quantizers[_key(name)] if _key(name) in self.weight_quantizers else None
        return q(p) if q is not None else p

    def forward(self, *args: torch.Tensor, codes: dict[str, torch.Tensor] | None = None, **kwargs: torch.Tensor) -> list[torch.Tensor]:
        """Run the graph; inputs by position or name. ``codes`` (optional) receives the integer
        codes of every quantized activation. Returns the graph outputs (un-quantized, as in the
        QDQ form, which quantizes the uses of a value, not the graph output)."""
        feed = dict(zip(self.input_names, args)) | kwargs
        env: dict[str, torch.Tensor] = {}
        raw: dict[str, torch.Tensor] = {}
        dtype = next(iter(self.params.values())).dtype if len(self.params) else torch.float32
        for name in self.input_names:
            x = feed[name]
            env[name] = x.to(dtype) if torch.is_floating_point(x) else x
            self._quantize(name, env, raw, codes)
        for node in self.nodes:
            inputs = [self._lookup(v, env, dtype) for v in node.inputs]
            out = TORCH_OPS[node.op_type](node, *inputs)
            env[node.outputs[0].name] = out
            self._quantize(node.outputs[0].name, env, raw, codes)
        return [raw.get(n, env[n]) for n in self.output_names]

    def _lookup(self, value: ir.Value | None, env: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor | None:
        if value is None or not value.name:
            return None
        name = value.name
        if name in env:
            return env[name]
        if _key(name) in self.params:
            return self.quantized_weight(name)
        const = self.constants[name]
        return const.to(dtype) if torch.is_floating_point(const) else const

    def _quantize(self, name: str, env: dict[str, torch.Tensor], raw: dict[str, torch.Tensor],
                  codes: dict[str, torch.Tensor] | None) -> None:
        key = _key(name)
        if name in self.pending_codebooks:  # fitted once, on the first batch's float values
            fitted = codebook_of(self.pending_codebooks.pop(name), env[name].detach().cpu().numpy().astype(np.float64))
            self.activation_quantizers[key] = CodebookQuantizer(fitted)
        if key not in self.activation_quantizers:
            return
        quantizer = self.activation_quantizers[key]
        if name in self.output_names:
            raw[name] = env[name]
        if codes is not None:
            codes[name] = quantizer.codes(env[name].detach())
        env[name] = quantizer(env[name])
