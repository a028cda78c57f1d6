"""A weight layer as a matrix product: ``output = rows(x) · Wᵀ`` per group.

Layer-wise algorithms (GPFQ) see every quantizable layer as ``N×d`` weight matrices, one per
group, and ``m×d`` input rows:

- **Conv** (1-D/2-D/3-D): full im2col with the node's own strides, dilations, pads (ONNX
  ``[begin…, end…]`` order, ``auto_pad`` resolved) and groups; column order ``(c_in, k…)``
  matches the ONNX weight layout ``(M, C/g, k…)``.
- **ConvTranspose**: the equivalent stride-1 convolution over the zero-inserted input with the
  flipped, transposed kernel (``output_shape`` and ``auto_pad`` are not supported).
- **Gemm**: ``W = B`` if ``transB`` else ``Bᵀ``; ``alpha`` is folded into the rows.
- **MatMul** with a constant right operand ``B`` (K×N): ``W = Bᵀ``, rows = the input flattened
  to ``(−1, K)``.

:func:`rows` and :func:`weight_matrix` are exact: ``rows(x) @ W_gᵀ`` reproduces the node's
output (before the bias) up to float round-off; :func:`from_weight_matrix` inverts
:func:`weight_matrix`.
"""

from __future__ import annotations

import dataclasses
import math

import numba
import numpy as np
import onnx_ir as ir

from qcompiler.errors import UnsupportedModelError
from qcompiler.graph import attr


@dataclasses.dataclass(frozen=True)
class LayerGeometry:
    """How a node's weight and input map to matrices.

    Attributes:
        op: Conv, ConvTranspose, Gemm or MatMul.
        name: the node's name (for messages).
        weight_shape: the weight's shape.
        groups: the number of independent groups.
        kernel: spatial kernel shape (convolutions).
        strides, dilations: per spatial axis.
        pads: ``[begin…, end…]``; None means ``auto_pad`` resolved per input.
        auto_pad: NOTSET, SAME_UPPER, SAME_LOWER or VALID.
        output_padding: ConvTranspose's extra end padding.
        trans_b: Gemm's ``transB``.
        alpha: Gemm's ``alpha``.
    """

    op: str
    name: str
    weight_shape: tuple[int, ...]
    groups: int = 1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads: tuple[int, ...] | None = ()
    auto_pad: str = "NOTSET"
    output_padding: tuple[int, ...] = ()
    trans_b: bool = False
    alpha: float = 1.0

    @property
    def out_channels(self) -> int:
        """Rows of the whole weight matrix (output neurons)."""
        if self.op == "Conv":
            return self.weight_shape[0]
        if self.op == "ConvTranspose":
            return self.weight_shape[1] * self.groups
        if self.op == "Gemm":
            return self.weight_shape[0] if self.trans_b else self.weight_shape[1]
        return self.weight_shape[1]

    @property
    def columns(self) -> int:
        """``d``: columns per group."""
        if self.op == "Conv":
            return int(np.prod(self.weight_shape[1:]))
        if self.op == "ConvTranspose":
            return self.weight_shape[0] // self.groups * int(np.prod(self.kernel))
        if self.op == "Gemm":
            return self.weight_shape[1] if self.trans_b else self.weight_shape[0]
        return self.weight_shape[0]


def geometry(node: ir.Node, weight_shape: tuple[int, ...]) -> LayerGeometry:
    """The geometry of a quantizable node; unsupported attributes raise a one-line error."""
    op = node.op_type
    if op in ("Gemm", "MatMul"):
        if op == "Gemm" and attr(node, "transA", 0):
            raise UnsupportedModelError(f"node {node.name!r} (Gemm): transA=1 is not supported")
        return LayerGeometry(op, node.name, weight_shape, trans_b=bool(attr(node, "transB", 0)),
                             alpha=float(attr(node, "alpha", 1.0)))
    if op not in ("Conv", "ConvTranspose"):
        raise UnsupportedModelError(f"node {node.name!r} ({op}): not a weight layer")
    kernel = tuple(int(k) for k in weight_shape[2:])
    nd = len(kernel)
    auto_pad = str(attr(node, "auto_pad", "NOTSET"))
    pads = attr(node, "pads", None)
    if op == "ConvTranspose" and (auto_pad not in ("NOTSET", "VALID") or attr(node, "output_shape", None) is not None):
        raise UnsupportedModelError(
            f"node {node.name!r} (ConvTranspose): output_shape and SAME auto_pad are not supported"
        )
    return LayerGeometry(
        op, node.name, weight_shape, groups=int(attr(node, "group", 1)), kernel=kernel,
        strides=tuple(int(s) for s in attr(node, "strides", None) or (1,) * nd),
        dilations=tuple(int(s) for s in attr(node, "dilations", None) or (1,) * nd),
        pads=None if auto_pad in ("SAME_UPPER", "SAME_LOWER") else tuple(int(p) for p in pads or (0,) * (2 * nd)),
        auto_pad=auto_pad,
        output_padding=tuple(int(p) for p in attr(node, "output_padding", None) or (0,) * nd),
    )


# --------------------------------------------------------------------------- weights


def weight_matrix(geo: LayerGeometry, w: np.ndarray) -> np.ndarray:
    """The weight as ``(groups, N/groups, d)`` matrices, one row per output neuron."""
    g = geo.groups
    if geo.op == "Conv":
        return w.reshape(g, w.shape[0] // g, -1)
    if geo.op == "ConvTranspose":
        c, m = w.shape[0] // g, w.shape[1]
        flipped = np.flip(w, axis=tuple(range(2, w.ndim)))
        per_group = flipped.reshape(g, c, m, *geo.kernel)
        return np.moveaxis(per_group, 2, 1).reshape(g, m, -1)
    if geo.op == "Gemm":
        return (w if geo.trans_b else w.T)[None]
    return w.T[None]


def from_weight_matrix(geo: LayerGeometry, q: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Inverse of :func:`weight_matrix`: ``(groups, N/groups, d)`` back to the ONNX layout."""
    g = geo.groups
    if geo.op == "Conv":
        return q.reshape(geo.weight_shape).astype(dtype)
    if geo.op == "ConvTranspose":
        c, m = geo.weight_shape[0] // g, geo.weight_shape[1]
        per_group = np.moveaxis(q.reshape(g, m, c, *geo.kernel), 1, 2)
        w = np.flip(per_group.reshape(geo.weight_shape), axis=tuple(range(2, len(geo.weight_shape))))
        return np.ascontiguousarray(w).astype(dtype)
    if geo.op == "Gemm":
        return (q[0] if geo.trans_b else q[0].T).astype(dtype)
    return np.ascontiguousarray(q[0].T).astype(dtype)


# --------------------------------------------------------------------------- inputs


def same_pads(spatial: tuple[int, ...], geo: LayerGeometry) -> tuple[int, ...]:
    """``[begin…, end…]`` pads of ``auto_pad`` SAME_UPPER / SAME_LOWER for an input size."""
    begin, end = [], []
    for size, k, s, d in zip(spatial, geo.kernel, geo.strides, geo.dilations):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        first = small if geo.auto_pad == "SAME_UPPER" else total - small
        begin.append(first)
        end.append(total - first)
    return (*begin, *end)


#: element types the compiled 2-D im2col is used for (others, e.g. float16, take the numpy form)
_COMPILED_DTYPES = tuple(np.dtype(t) for t in ("float32", "float64", "int32", "int64"))


class RowBuffer:
    """Reusable memory for the rows of one stream of batches (see :func:`rows`).

    Writing a batch's patches into fresh memory costs about as much as the patches themselves
    (page faults and zeroing): 18.7 against 9.3 ms for 72 MB (bench/RESULTS.md, issue 5). Each
    call returns a view of the same memory, so a caller must be done with the previous rows (or
    have copied them) before asking for the next.
    """

    def __init__(self) -> None:
        self._data = np.empty(0)

    def view(self, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
        """An uninitialised C-contiguous ``shape`` array of ``dtype`` in the buffer (grown if needed)."""
        size = shape[0] * shape[1]
        if self._data.dtype != dtype or self._data.size < size:
            self._data = np.empty(size, dtype)
        return self._data[:size].reshape(shape)


def im2col(
    x: np.ndarray, kernel: tuple[int, ...], strides: tuple[int, ...], pads: tuple[int, ...], dilations: tuple[int, ...],
    buffer: RowBuffer | None = None,
) -> np.ndarray:
    """Patches of ``x`` (B, C, *spatial) as rows ``(B·∏out, C·∏kernel)``, columns ``(c, k…)``.

    Negative pads crop. Rows are ordered (batch, output position) in C order. With ``buffer``,
    2-D patches are written into its memory (see :class:`RowBuffer`).
    """
    if len(kernel) == 2 and x.dtype in _COMPILED_DTYPES:
        return _im2col_2d(x, kernel, strides, pads, dilations, buffer)
    return im2col_windows(x, kernel, strides, pads, dilations)


def im2col_windows(
    x: np.ndarray, kernel: tuple[int, ...], strides: tuple[int, ...], pads: tuple[int, ...], dilations: tuple[int, ...]
) -> np.ndarray:
    """:func:`im2col` for any number of spatial axes, from numpy's sliding windows."""
    nd = len(kernel)
    widths = [(0, 0), (0, 0)] + [(max(pads[i], 0), max(pads[i + nd], 0)) for i in range(nd)]
    padded = np.pad(x, widths) if any(p > 0 for p in pads) else x
    crop = tuple(slice(max(-pads[i], 0), padded.shape[2 + i] - max(-pads[i + nd], 0)) for i in range(nd))
    padded = padded[(slice(None), slice(None), *crop)]
    span = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilations))
    windows = np.lib.stride_tricks.sliding_window_view(padded, span, axis=tuple(range(2, 2 + nd)))
    windows = windows[(slice(None), slice(None), *(slice(None, None, s) for s in strides), *(slice(None, None, d) for d in dilations))]
    # (B, C, *out, *k) -> (B, *out, C, *k)
    order = (0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
    moved = windows.transpose(order)
    return moved.reshape(int(np.prod(moved.shape[: 1 + nd])), -1)


def _im2col_2d(
    x: np.ndarray, kernel: tuple[int, ...], strides: tuple[int, ...], pads: tuple[int, ...], dilations: tuple[int, ...],
    buffer: RowBuffer | None = None,
) -> np.ndarray:
    """:func:`im2col` of a 2-D input in one compiled pass, without numpy's padded copy and
    strided window copy (bench/RESULTS.md, session 13)."""
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    out_h = (x.shape[2] + pads[0] + pads[2] - spans[0]) // strides[0] + 1
    out_w = (x.shape[3] + pads[1] + pads[3] - spans[1]) // strides[1] + 1
    shape = (x.shape[0] * max(out_h, 0) * max(out_w, 0), x.shape[1] * kernel[0] * kernel[1])
    out = np.empty(shape, dtype=x.dtype) if buffer is None else buffer.view(shape, x.dtype)
    if out.size:
        _fill_im2col_2d(np.ascontiguousarray(x), kernel[0], kernel[1], strides[0], strides[1], pads[0], pads[1],
                        dilations[0], dilations[1], out_h, out_w, out)
    return out


@numba.njit(cache=True, nogil=True, parallel=True)
def _fill_im2col_2d(
    x: np.ndarray, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, dh: int, dw: int, out_h: int, out_w: int,
    out: np.ndarray,
) -> None:
    """Row ``(n, i, j)``, column ``(c, u, v)`` = ``x[n, c, i·sh − ph + u·dh, j·sw − pw + v·dw]``, 0 outside.

    One output row ``i`` at a time, column by column: the reads run along an input row and the
    ``out_w`` written rows stay in cache (1.5× faster than filling row by row, which reads
    across channels)."""
    batch, channels, height, width = x.shape
    for r in numba.prange(batch * out_h):
        n, i = r // out_h, r % out_h
        base = r * out_w
        col = 0
        for c in range(channels):
            for u in range(kh):
                y = i * sh - ph + u * dh
                inside = 0 <= y < height
                for v in range(kw):
                    for j in range(out_w):
                        xx = j * sw - pw + v * dw
                        out[base + j, col] = x[n, c, y, xx] if inside and 0 <= xx < width else 0
                    col += 1


def _zero_insert(x: np.ndarray, strides: tuple[int, ...]) -> np.ndarray:
    if all(s == 1 for s in strides):
        return x
    shape = (*x.shape[:2], *((n - 1) * s + 1 for n, s in zip(x.shape[2:], strides)))
    out = np.zeros(shape, dtype=x.dtype)
    out[(slice(None), slice(None), *(slice(None, None, s) for s in strides))] = x
    return out


def _spatial_rank(geo: LayerGeometry, ndim: int) -> int:
    """A convolution's spatial rank; UnsupportedModelError when its input rank does not match."""
    nd = len(geo.kernel)
    if ndim != 2 + nd:
        raise UnsupportedModelError(f"node {geo.name!r} ({geo.op}): input rank {ndim} does not match the kernel")
    return nd


def rows_per_sample(geo: LayerGeometry, shape: tuple[int, ...]) -> int:
    """How many rows :func:`rows` gives per sample of an input of ``shape``, without unfolding it:
    a convolution's output positions, a Gemm's or MatMul's rows per leading index."""
    if geo.op in ("Gemm", "MatMul"):
        return math.prod(shape[1:-1])
    nd = _spatial_rank(geo, len(shape))
    spatial = shape[2:]
    spans = [(k - 1) * d + 1 for k, d in zip(geo.kernel, geo.dilations)]
    if geo.op == "Conv":
        pads = geo.pads if geo.pads is not None else same_pads(spatial, geo)
        sizes = [(n + pads[i] + pads[i + nd] - spans[i]) // geo.strides[i] + 1 for i, n in enumerate(spatial)]
    else:  # ConvTranspose, as rows() unfolds it: zeros inserted, then stride 1 over full pads
        pads = geo.pads or (0,) * (2 * nd)
        sizes = [(n - 1) * geo.strides[i] + spans[i] - pads[i] - pads[i + nd] + geo.output_padding[i]
                 for i, n in enumerate(spatial)]
    return math.prod(max(size, 0) for size in sizes)


def rows(
    geo: LayerGeometry, x: np.ndarray, dtype: np.dtype | type | None = None, buffer: RowBuffer | None = None
) -> np.ndarray:
    """The layer's input rows as ``(groups, m, d)`` for an input batch ``x``.

    ``dtype``: the rows' type (default ``x``'s). A convolution converts its input before im2col,
    so the patches are written once, in the wanted type; Gemm's ``alpha`` is applied first.
    ``buffer``: memory for a 2-D convolution's patches, reused from call to call (the rows
    returned before are overwritten).
    """
    if geo.op in ("Gemm", "MatMul"):
        flat = x.reshape(-1, x.shape[-1])
        flat = flat * np.float32(geo.alpha) if geo.alpha != 1.0 else flat
        return (flat if dtype is None else flat.astype(dtype, copy=False))[None]
    nd = _spatial_rank(geo, x.ndim)
    x = x if dtype is None else x.astype(dtype, copy=False)
    if geo.op == "Conv":
        pads = geo.pads if geo.pads is not None else same_pads(x.shape[2:], geo)
        cols = im2col(x, geo.kernel, geo.strides, pads, geo.dilations, buffer)
    else:
        span = [(k - 1) * d for k, d in zip(geo.kernel, geo.dilations)]
        pads = geo.pads or (0,) * (2 * nd)
        full = (*(span[i] - pads[i] for i in range(nd)), *(span[i] - pads[i + nd] + geo.output_padding[i] for i in range(nd)))
        cols = im2col(_zero_insert(x, geo.strides), geo.kernel, (1,) * nd, full, geo.dilations)
    g = geo.groups
    return cols.reshape(cols.shape[0], g, -1).transpose(1, 0, 2)
