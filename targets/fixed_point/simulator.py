"""Bit-exact integer reference simulator of the fixed-point target.

Every tensor the quantized graph computes is a dyadic rational: ``value = q · 2^-fl`` with an
int64 ``q`` (:class:`Fixed`). The simulator carries those integers through the graph:

- **quantizers** (values with a ``FixedPoint`` annotation): round half to even and saturate,
  explicitly, at every layer boundary — ``q_y = sat(rhe(q · 2^(fl_y − fl)))``, an integer shift;
- **Conv / ConvTranspose / Gemm / MatMul**: integer products and sums (int64; float64 BLAS
  when the worst-case sum stays below 2^53, where it is exact), per-channel weight FLs
  aligned to the largest one by left shifts, the int32 bias added in the accumulator format;
- **Add / Sub / Mul / Relu**: integer arithmetic (operands aligned to the larger FL);
- **MaxPool, Concat, Flatten, Reshape, Transpose, Squeeze, Unsqueeze, Identity, Slice, Gather**:
  pure selection, computed on the codes (exact in float64 below 2^53);
- **AveragePool / GlobalAveragePool**: the integer window sum, then one float32 division by
  the window size — exactly what onnxruntime computes (``sum / k``, checked), so the next
  quantizer sees the same float;
- anything else (nodes kept in float, shape computations): the node alone in onnxruntime.

Against the simulation ONNX run with graph optimisations off, every quantizer's codes and
every output agree exactly as long as onnxruntime's float32 sums are exact, i.e. every partial
sum stays below 2^24 in its own units (onnx_representation.md §2); :attr:`IntegerSimulator.float32_risks`
names the layers whose worst case exceeds that bound.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from qcompiler import annotations as ann
from qcompiler.errors import TargetError
from qcompiler.graph import attr, const_array, values_by_name
from qcompiler.ir import default_opset
from qcompiler.layer_matrix import LayerGeometry, geometry, im2col, rows, same_pads, weight_matrix
from qcompiler.qdq import fixed_codes, integer_codes
from qcompiler.targets.fixed_point.package import pow2_fl
from qcompiler.runtime import session_options

#: float64 represents every integer below this exactly.
FLOAT64_EXACT = 2**53
#: float32 partial sums are exact below this (in units of the operands' product scale).
FLOAT32_EXACT = 2**24


@dataclasses.dataclass(frozen=True)
class Fixed:
    """A tensor ``q · 2^-fl`` with int64 codes ``q`` and one fractional length."""

    q: np.ndarray
    fl: int

    def to_float32(self) -> np.ndarray:
        """The float32 value (exact while ``|q|`` has at most 24 significant bits)."""
        return np.ldexp(self.q.astype(np.float64), -self.fl).astype(np.float32)

    def aligned(self, fl: int) -> Fixed:
        """The same values with a larger (or equal) fractional length: a left shift."""
        if fl < self.fl:
            raise ValueError("alignment only raises the fractional length")
        return Fixed(self.q << (fl - self.fl), fl)


State = Fixed | np.ndarray


def round_shift(q: np.ndarray, shift: int) -> np.ndarray:
    """``rhe(q · 2^-shift)`` in integers: an arithmetic right shift with round half to even
    (a left shift when ``shift`` is negative)."""
    if shift <= 0:
        return q << -shift
    floor = q >> shift
    rem = q - (floor << shift)
    half = np.int64(1) << (shift - 1)
    up = (rem > half) | ((rem == half) & ((floor & 1) == 1))
    return floor + up.astype(np.int64)


def requantize(x: State, fmt: ann.FixedPoint) -> Fixed:
    """Quantize to ``fmt`` (per-tensor): the integer shift of a :class:`Fixed`, or
    ``rhe(x · 2^fl)`` of a float (what ``QuantizeLinear`` with scale ``2^-fl`` computes);
    then saturate to the format's code range."""
    if isinstance(fmt.fl, tuple):
        raise TargetError(f"per-channel activation formats are not supported (fl={fmt.fl})")
    lo, hi = fmt.code_range()
    if isinstance(x, Fixed):
        codes = round_shift(x.q, x.fl - fmt.fl)
    else:
        scaled = np.clip(np.ldexp(np.asarray(x, dtype=np.float64), fmt.fl), lo - 1, hi + 1)
        codes = np.rint(scaled).astype(np.int64)
    return Fixed(np.clip(codes, lo, hi), fmt.fl)


# --------------------------------------------------------------------------- constants


def _aligned_channels(codes: np.ndarray, fls: Sequence[int], axis: int | None) -> Fixed:
    """Per-channel codes with different FLs as one :class:`Fixed` at the largest FL."""
    q = codes.astype(np.int64)
    if axis is None or len(set(fls)) == 1:
        return Fixed(q, int(fls[0]))
    top = max(fls)
    shape = [1] * q.ndim
    shape[axis] = -1
    return Fixed(q << (top - np.asarray(fls, dtype=np.int64)).reshape(shape), int(top))


def constant_state(value: ir.Value) -> State:
    """A constant as the simulator sees it: integer codes when it carries a quantized format."""
    fmt = ann.get(value, ann.FixedPoint)
    if fmt is not None:
        fls = fmt.fl if isinstance(fmt.fl, tuple) else (fmt.fl,)
        return _aligned_channels(fixed_codes(value, fmt), fls, fmt.axis)
    grid = ann.get(value, ann.IntegerWeights)
    if grid is not None:
        fls = tuple(pow2_fl(s, value.name) for s in grid.scales)
        return _aligned_channels(integer_codes(value, grid), fls, grid.axis)
    return const_array(value)


# --------------------------------------------------------------------------- integer kernels


def exact_dtype(a_max: float, b_max: float, depth: int) -> type | None:
    """The cheapest float dtype in which a product of integer matrices is exact whatever the
    summation order (every partial sum is an integer below the mantissa's limit), or None."""
    bound = a_max * b_max * depth
    if bound < FLOAT32_EXACT:
        return np.float32
    if bound < FLOAT64_EXACT:
        return np.float64
    if bound >= 2.0**63:
        raise TargetError("integer simulation overflows int64 (accumulator above 2^63)")
    return None


def _absmax(a: np.ndarray) -> float:
    return float(np.abs(a).max()) if a.size else 0.0


def exact_matmul(a: np.ndarray, b: np.ndarray, dtype: type | None = None) -> np.ndarray:
    """``a @ b`` of integer arrays, exactly, as int64: float32 or float64 BLAS when every
    partial sum stays within the mantissa, else int64 arithmetic. ``dtype`` skips the bound
    computation when the caller knows it (:func:`exact_dtype`)."""
    if dtype is None:
        dtype = exact_dtype(_absmax(a), _absmax(b), a.shape[-1] if a.ndim else 1)
    if dtype is None or dtype == np.int64:
        return np.matmul(a.astype(np.int64), b.astype(np.int64))
    return np.rint(np.matmul(a.astype(dtype, copy=False), b.astype(dtype, copy=False))).astype(np.int64)


def _output_spatial(geo: LayerGeometry, spatial: tuple[int, ...]) -> tuple[int, ...]:
    nd = len(geo.kernel)
    if geo.op == "ConvTranspose":
        pads = geo.pads or (0,) * (2 * nd)
        return tuple(
            (n - 1) * s - pads[i] - pads[i + nd] + (k - 1) * d + 1 + geo.output_padding[i]
            for i, (n, s, k, d) in enumerate(zip(spatial, geo.strides, geo.kernel, geo.dilations))
        )
    pads = geo.pads if geo.pads is not None else same_pads(spatial, geo)
    return tuple(
        (n + pads[i] + pads[i + nd] - ((k - 1) * d + 1)) // s + 1
        for i, (n, s, k, d) in enumerate(zip(spatial, geo.strides, geo.kernel, geo.dilations))
    )


def _add_bias(acc: Fixed, bias: State | None, channel_axis: int) -> Fixed | None:
    if bias is None:
        return acc
    if not isinstance(bias, Fixed):
        return None
    fl = max(acc.fl, bias.fl)
    shape = [1] * acc.q.ndim
    shape[channel_axis] = -1
    return Fixed(acc.aligned(fl).q + bias.aligned(fl).q.reshape(shape), fl)


def _conv(node: ir.Node, x: Fixed, w: Fixed, bias: State | None = None) -> Fixed | None:
    geo = geometry(node, w.q.shape)
    out_sp = _output_spatial(geo, x.q.shape[2:])
    # im2col in the matmul's exact dtype: float32 codes are 2x smaller than int64 ones
    dtype = exact_dtype(_absmax(x.q), _absmax(w.q), geo.columns) or np.int64
    patches = rows(geo, x.q.astype(dtype))  # (g, m, d)
    acc = exact_matmul(patches, np.swapaxes(weight_matrix(geo, w.q), 1, 2), dtype)  # (g, m, n)
    out = acc.transpose(1, 0, 2).reshape(x.q.shape[0], *out_sp, -1)
    return _add_bias(Fixed(np.moveaxis(out, -1, 1), x.fl + w.fl), bias, 1)


def _gemm(node: ir.Node, a: Fixed, b: Fixed, c: State | None = None) -> Fixed | None:
    if attr(node, "transA", 0) or float(attr(node, "alpha", 1.0)) != 1.0 or float(attr(node, "beta", 1.0)) != 1.0:
        return None
    matrix = b.q.T if attr(node, "transB", 0) else b.q
    acc = Fixed(exact_matmul(a.q, matrix), a.fl + b.fl)
    if c is None:
        return acc
    if not isinstance(c, Fixed):
        return None
    fl = max(acc.fl, c.fl)
    return Fixed(acc.aligned(fl).q + c.aligned(fl).q, fl)


def _matmul(node: ir.Node, a: Fixed, b: Fixed) -> Fixed:
    return Fixed(exact_matmul(a.q, b.q), a.fl + b.fl)


def _add(node: ir.Node, a: Fixed, b: Fixed) -> Fixed:
    fl = max(a.fl, b.fl)
    return Fixed(a.aligned(fl).q + b.aligned(fl).q, fl)


def _sub(node: ir.Node, a: Fixed, b: Fixed) -> Fixed:
    fl = max(a.fl, b.fl)
    return Fixed(a.aligned(fl).q - b.aligned(fl).q, fl)


def _mul(node: ir.Node, a: Fixed, b: Fixed) -> Fixed:
    return Fixed(a.q * b.q, a.fl + b.fl)


def _relu(node: ir.Node, x: Fixed) -> Fixed:
    return Fixed(np.maximum(x.q, 0), x.fl)


def _pool_windows(node: ir.Node, q: np.ndarray, fill: int) -> tuple[np.ndarray, tuple[int, ...]] | None:
    """The pooling windows of ``q`` as ``(B, C, *out, ∏k)`` (pads filled with ``fill``), or
    None for options the integer path does not cover (ceil_mode, SAME auto_pad)."""
    if attr(node, "ceil_mode", 0) or str(attr(node, "auto_pad", "NOTSET")) not in ("NOTSET", "VALID"):
        return None
    kernel = tuple(int(k) for k in attr(node, "kernel_shape"))
    nd = len(kernel)
    strides = tuple(int(s) for s in attr(node, "strides", None) or (1,) * nd)
    dilations = tuple(int(d) for d in attr(node, "dilations", None) or (1,) * nd)
    pads = tuple(int(p) for p in attr(node, "pads", None) or (0,) * (2 * nd))
    widths = [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)]
    padded = np.pad(q, widths, constant_values=fill)
    cols = im2col(padded, kernel, strides, (0,) * (2 * nd), dilations)  # (B·∏out, C·∏k)
    batch, channels = q.shape[:2]
    out = tuple(
        (n + pads[i] + pads[i + nd] - ((k - 1) * d + 1)) // s + 1
        for i, (n, s, k, d) in enumerate(zip(q.shape[2:], strides, kernel, dilations))
    )
    windows = cols.reshape(batch, *out, channels, -1)
    return np.moveaxis(windows, 1 + nd, 1), pads


def _maxpool(node: ir.Node, x: Fixed) -> Fixed | None:
    if len(node.outputs) > 1 and node.outputs[1].name:
        return None  # the Indices output
    found = _pool_windows(node, x.q, np.iinfo(np.int64).min)
    return None if found is None else Fixed(found[0].max(axis=-1), x.fl)


def _divide_like_ort(sums: np.ndarray, fl: int, counts: np.ndarray | int) -> np.ndarray:
    """onnxruntime's average: the (exact) float32 sum divided by the count in float32."""
    total = np.ldexp(sums.astype(np.float64), -fl).astype(np.float32)
    return total / np.asarray(counts, dtype=np.float32)


def _averagepool(node: ir.Node, x: Fixed) -> np.ndarray | None:
    found = _pool_windows(node, x.q, 0)
    if found is None:
        return None
    windows, pads = found
    if attr(node, "count_include_pad", 0) or not any(pads):
        counts: np.ndarray | int = windows.shape[-1]
    else:
        ones = _pool_windows(node, np.ones((1, 1, *x.q.shape[2:]), dtype=np.int64), 0)[0]
        counts = ones.sum(axis=-1)
    return _divide_like_ort(windows.sum(axis=-1), x.fl, counts)


def _global_averagepool(node: ir.Node, x: Fixed) -> np.ndarray:
    axes = tuple(range(2, x.q.ndim))
    return _divide_like_ort(x.q.sum(axis=axes, keepdims=True), x.fl, int(np.prod(x.q.shape[2:])))


#: Integer kernels by op; their arguments are the node's inputs (None for an absent optional).
INTEGER_KERNELS: dict[str, Callable[..., State | None]] = {
    "Conv": _conv,
    "ConvTranspose": _conv,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Add": _add,
    "Sub": _sub,
    "Mul": _mul,
    "Relu": _relu,
    "MaxPool": _maxpool,
    "AveragePool": _averagepool,
    "GlobalAveragePool": _global_averagepool,
}
#: Ops that only move or select elements: computed on the codes, the FL passes through.
SELECTION_OPS = frozenset(
    {"Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Concat", "Slice", "Gather", "MaxPool"}
)
#: What the fixed-point target represents in integer arithmetic (the rest must be kept float).
INTEGER_OPS = frozenset(INTEGER_KERNELS) | SELECTION_OPS
#: Ops that only compute shapes or constants.
SHAPE_OPS = frozenset({"Shape", "Size", "Constant", "ConstantOfShape"})


# --------------------------------------------------------------------------- the simulator


def _float32_bound(node: ir.Node, x_fmt: ann.FixedPoint, w: Fixed, w_fmt: ann.FixedPoint, bias: State | None) -> float:
    """Worst-case accumulator of a quantized layer in each channel's own units
    (``2^-(fl_x + fl_w[o])``): ``max_o (Σ_k |w_q[o,k]|·max|x_q| + |b_q[o]|)``."""
    lo, hi = x_fmt.code_range()
    x_max = float(max(abs(lo), abs(hi)))
    geo = geometry(node, w.q.shape)
    per_row = np.abs(weight_matrix(geo, w.q)).sum(axis=-1).reshape(-1).astype(np.float64) * x_max
    acc_fl = w.fl + x_fmt.fl  # the aligned units of the simulator
    if isinstance(bias, Fixed):
        per_row = per_row + np.ldexp(np.abs(bias.q).reshape(-1).astype(np.float64), acc_fl - bias.fl)
    fls = np.asarray(w_fmt.fl if isinstance(w_fmt.fl, tuple) else (w_fmt.fl,) * per_row.size, dtype=np.int64)
    own = np.ldexp(per_row, -(w.fl - fls))  # each channel's aligned codes carry a left shift
    return float(own.max()) if own.size else 0.0


class IntegerSimulator:
    """Runs an annotated fixed-point model in integer arithmetic.

    Args:
        model: the annotated IR (formats on weights, biases and activation inputs).
        threads: onnxruntime threads for the nodes that run in float.

    Attributes:
        float32_risks: quantized layers whose worst-case float32 accumulation reaches 2^24
            (onnxruntime may round there; the simulator does not).
    """

    def __init__(self, model: ir.Model, threads: int = 1) -> None:
        self.model = model
        self.opset = default_opset(model)
        self.threads = threads
        self.nodes = list(model.graph)
        for node in self.nodes:
            if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
                raise TargetError(f"node {node.name!r} ({node.op_type}): subgraphs are not supported by the integer simulator")
        self.constants: dict[str, State] = {
            v.name: constant_state(v) for v in model.graph.initializers.values()
        }
        self.formats = {
            v.name: fmt
            for v in values_by_name(model.graph).values()
            if not v.is_initializer() and (fmt := ann.get(v, ann.FixedPoint)) is not None
        }
        self.outputs = [v.name for v in model.graph.outputs]
        self._release_after = self._last_uses()
        self._sessions: dict[tuple, ort.InferenceSession] = {}
        self.float32_risks = self._float32_risks()

    def _last_uses(self) -> list[list[str]]:
        """Per node, the values no later node reads (graph outputs and constants excepted): a
        batch's states are dropped once used, so memory holds the live ones, not every layer's."""
        last: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            for v in node.inputs:
                if v is not None and v.name:
                    last[v.name] = i
        release: list[list[str]] = [[] for _ in self.nodes]
        for name, i in last.items():
            if name not in self.constants and name not in self.outputs:
                release[i].append(name)
        return release

    def _float32_risks(self) -> list[str]:
        risks = []
        for node in self.nodes:
            layer = ann.get(node, ann.QuantizableLayer)
            if layer is None or layer.weight not in self.constants:
                continue
            w = self.constants[layer.weight]
            x_fmt = self.formats.get(layer.activation_input)
            w_fmt = ann.get(node.inputs[1], ann.FixedPoint)
            if not isinstance(w, Fixed) or x_fmt is None or w_fmt is None:
                continue
            bias = self.constants.get(layer.bias) if layer.bias else None
            if _float32_bound(node, x_fmt, w, w_fmt, bias) >= FLOAT32_EXACT:
                risks.append(node.name)
        return risks

    def run(self, feed: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Simulate one batch.

        Returns:
            (outputs, codes): the graph outputs as float32 (integers scaled exactly), and the
            int64 codes of every quantized activation, by the activation's name.
        """
        env: dict[str, State] = dict(self.constants)
        codes: dict[str, np.ndarray] = {}
        raw: dict[str, State] = {}
        for value in self.model.graph.inputs:
            if value.name not in feed:
                raise TargetError(f"input {value.name!r} is missing from the feed")
            env[value.name] = np.asarray(feed[value.name])
            self._quantize(value.name, env, codes, raw)
        for node, release in zip(self.nodes, self._release_after):
            args = [env[v.name] if v is not None and v.name else None for v in node.inputs]
            results = self._execute(node, args)
            for out, state in zip(node.outputs, results):
                env[out.name] = state
                self._quantize(out.name, env, codes, raw)
            for name in release:
                env.pop(name, None)
        outputs = {}
        for name in self.outputs:
            state = raw.get(name, env[name])
            outputs[name] = state.to_float32() if isinstance(state, Fixed) else np.asarray(state)
        return outputs, codes

    def _quantize(self, name: str, env: dict[str, State], codes: dict[str, np.ndarray], raw: dict[str, State]) -> None:
        fmt = self.formats.get(name)
        if fmt is None:
            return
        if name in self.outputs:
            raw[name] = env[name]  # the QDQ form quantizes the uses, not the graph output
        env[name] = requantize(env[name], fmt)
        codes[name] = env[name].q

    def _execute(self, node: ir.Node, args: list[State | None]) -> list[State]:
        fixed_args = all(a is None or isinstance(a, Fixed) or not _is_float(a) for a in args)
        kernel = INTEGER_KERNELS.get(node.op_type)
        if kernel is not None and all(isinstance(a, Fixed) or a is None for a in args):
            result = kernel(node, *args)
            if result is not None:
                return [result]
        if node.op_type in SELECTION_OPS and fixed_args and any(isinstance(a, Fixed) for a in args):
            return self._select(node, args)
        return self._run_node(node, [a.to_float32() if isinstance(a, Fixed) else a for a in args], output_float=None)

    def _select(self, node: ir.Node, args: list[State | None]) -> list[State]:
        """A selection op on the codes (as float64, exact below 2^53), FLs aligned first."""
        fl = max(a.fl for a in args if isinstance(a, Fixed))
        plain = [a.aligned(fl).q.astype(np.float64) if isinstance(a, Fixed) else a for a in args]
        outs = self._run_node(node, plain, output_float=np.float64)
        return [Fixed(np.rint(o).astype(np.int64), fl) if o.dtype == np.float64 else o for o in outs]

    def _run_node(self, node: ir.Node, args: list[np.ndarray | None], output_float: type | None) -> list[np.ndarray]:
        """Run ``node`` alone in onnxruntime (optimisations off, as the simulation ONNX)."""
        dtypes = tuple(None if a is None else np.asarray(a).dtype.str for a in args)
        key = (node.name, dtypes)
        session = self._sessions.get(key)
        if session is None:
            session = self._sessions[key] = self._node_session(node, args, output_float)
        feed = {node.inputs[i].name: np.asarray(a) for i, a in enumerate(args) if a is not None}
        return [np.asarray(o) for o in session.run(None, feed)]

    def _node_session(self, node: ir.Node, args: list[np.ndarray | None], output_float: type | None) -> ort.InferenceSession:
        proto = ir.serde.serialize_node(node)
        inputs, seen = [], set()
        for i, a in enumerate(args):
            name = node.inputs[i].name if node.inputs[i] is not None else ""
            if a is None or not name or name in seen:
                continue
            seen.add(name)
            elem = onnx.helper.np_dtype_to_tensor_dtype(np.asarray(a).dtype)
            inputs.append(onnx.helper.make_tensor_value_info(name, elem, None))
        outputs = []
        for out in node.outputs:
            if not out.name:
                continue
            elem = int(out.dtype) if out.dtype is not None else onnx.TensorProto.FLOAT
            if output_float is not None and elem == onnx.TensorProto.FLOAT:
                elem = onnx.TensorProto.DOUBLE
            outputs.append(onnx.helper.make_tensor_value_info(out.name, elem, None))
        graph = onnx.helper.make_graph([proto], node.name or node.op_type, inputs, outputs)
        opsets = [onnx.helper.make_opsetid(d, v) for d, v in self.model.opset_imports.items()]
        model = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=self.model.ir_version or 10)
        try:
            return ort.InferenceSession(model.SerializeToString(), session_options(False, self.threads),
                                        providers=["CPUExecutionProvider"])
        except Exception as exc:
            detail = " ".join(str(exc).split())[:300]
            raise TargetError(f"node {node.name!r} ({node.op_type}): cannot run it alone in onnxruntime: {detail}") from exc

    def collect(self, batches: Sequence[Mapping[str, np.ndarray]] | object) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Run every batch; concatenate outputs and codes along axis 0."""
        outs: dict[str, list[np.ndarray]] = {}
        codes: dict[str, list[np.ndarray]] = {}
        for feed in batches:  # type: ignore[union-attr]
            o, c = self.run(feed)
            for k, v in o.items():
                outs.setdefault(k, []).append(v)
            for k, v in c.items():
                codes.setdefault(k, []).append(v)
        cat = lambda d: {k: np.concatenate(v, axis=0) for k, v in d.items()}  # noqa: E731
        return cat(outs), cat(codes)


def _is_float(a: object) -> bool:
    return isinstance(a, np.ndarray) and np.issubdtype(a.dtype, np.floating)

