"""Quantizer arithmetic (pure numpy). Rounding is round-half-to-even unless stated otherwise.

Fixed point (wl, fl): ``q = clip(rne(x * 2**fl), qmin, qmax)``, ``x_hat = q * 2**-fl``; exactly
ONNX ``QuantizeLinear``/``DequantizeLinear`` with scale ``2**-fl`` and zero point 0.
"""

from __future__ import annotations

import math

import numpy as np


def code_range(wl: int, signed: bool = True) -> tuple[int, int]:
    """Inclusive integer range of a wl-bit code."""
    if wl < 1:
        raise ValueError(f"word length must be >= 1, got {wl}")
    if signed:
        return -(1 << (wl - 1)), (1 << (wl - 1)) - 1
    return 0, (1 << wl) - 1


def no_overflow_fl(absmax: float, wl: int, signed: bool = True) -> int:
    """The largest fractional length whose wl-bit range holds ``absmax`` without saturation.

    That is the largest ``fl`` with ``absmax * 2**fl <= qmax``. A zero ``absmax`` gives
    ``wl - 1`` (any format represents zero exactly).
    """
    qmax = code_range(wl, signed)[1]
    if qmax <= 0:
        raise ValueError(f"a {wl}-bit {'signed' if signed else 'unsigned'} code has no positive level")
    if not math.isfinite(absmax):
        raise ValueError(f"range {absmax} is not finite")
    if absmax <= 0.0:
        return wl - 1
    fl = math.floor(math.log2(qmax / absmax))
    # log2 rounding can be off by one at exact powers of two: settle it exactly.
    while math.ldexp(absmax, fl) > qmax:
        fl -= 1
    while math.ldexp(absmax, fl + 1) <= qmax:
        fl += 1
    return fl


def _fl_array(fl: int | np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    fl_arr = np.asarray(fl, dtype=np.int64)
    if fl_arr.ndim == 0:
        return fl_arr
    if axis is None:
        raise ValueError("per-channel fractional lengths need an axis")
    shape = [1] * ndim
    shape[axis] = -1
    return fl_arr.reshape(shape)


def quantize_fixed(
    x: np.ndarray, wl: int, fl: int | np.ndarray, signed: bool = True, axis: int | None = None
) -> np.ndarray:
    """Integer codes (int64) of ``x`` in fixed point (wl, fl); ``fl`` may be per channel."""
    lo, hi = code_range(wl, signed)
    scale = np.ldexp(1.0, _fl_array(fl, x.ndim, axis))  # 2**fl, exact in float64
    return np.clip(np.rint(x.astype(np.float64) * scale), lo, hi).astype(np.int64)


def dequantize_fixed(q: np.ndarray, fl: int | np.ndarray, axis: int | None = None) -> np.ndarray:
    """``q * 2**-fl`` in float64 (exact)."""
    return np.ldexp(q.astype(np.float64), -_fl_array(fl, q.ndim, axis))


def fake_quant_fixed(
    x: np.ndarray, wl: int, fl: int | np.ndarray, signed: bool = True, axis: int | None = None
) -> np.ndarray:
    """Quantize then dequantize, returned in ``x``'s dtype."""
    return dequantize_fixed(quantize_fixed(x, wl, fl, signed, axis), fl, axis).astype(x.dtype)


def channel_absmax(w: np.ndarray, axis: int) -> np.ndarray:
    """max |w| over every axis but ``axis`` (float64)."""
    axes = tuple(a for a in range(w.ndim) if a != axis)
    return np.abs(w.astype(np.float64)).max(axis=axes) if axes else np.abs(w.astype(np.float64))
