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

    That is the largest ``fl`` with ``absmax * 2**fl <= qmax`` (``|qmin| = 1`` for the 1-bit
    signed code {-1, 0}). A zero ``absmax`` gives ``wl - 1`` (any format represents zero exactly).
    """
    lo, qmax = code_range(wl, signed)
    if qmax <= 0:
        # A 1-bit signed code is {-1, 0}: its one non-zero level bounds the magnitude
        # (positive values saturate to 0; MAX78000 defines 1-bit weights the same way).
        qmax = -lo
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


def refine_minimum(f, lo: float, hi: float, x0: float, f0: float) -> float:
    """Refine a grid minimum ``x0`` (value ``f0``) on [lo, hi] with scipy's bounded Brent search;
    keep ``x0`` when the refinement is not better (so a refined fit never loses to the grid)."""
    from scipy.optimize import minimize_scalar

    if not hi > lo:
        return x0
    result = minimize_scalar(f, bounds=(lo, hi), method="bounded", options={"xatol": (hi - lo) * 1e-6})
    return float(result.x) if result.success and result.fun <= f0 else x0


def channel_absmax(w: np.ndarray, axis: int) -> np.ndarray:
    """max |w| over every axis but ``axis`` (float64)."""
    axes = tuple(a for a in range(w.ndim) if a != axis)
    return np.abs(w.astype(np.float64)).max(axis=axes) if axes else np.abs(w.astype(np.float64))


# --------------------------------------------------------------------------- uniform integer grids


def uniform_grid(bits: int, kind: str = "signed") -> tuple[int, int]:
    """(q_min, q_max) of a b-bit grid: ``signed`` full, ``narrow`` signed, or ``unsigned``."""
    if kind == "signed":
        return code_range(bits, True)
    if kind == "narrow":
        lo, hi = code_range(bits, True)
        return lo + 1, hi
    if kind == "unsigned":
        return code_range(bits, False)
    raise ValueError(f"grid kind must be signed, narrow or unsigned, got {kind!r}")


def quantize_uniform(x: np.ndarray, scale: float | np.ndarray, zero_point: int | np.ndarray, q_min: int, q_max: int) -> np.ndarray:
    """``clip(rne(x/s) + z, q_min, q_max)`` as int64: exactly ONNX QuantizeLinear."""
    return np.clip(np.rint(x.astype(np.float64) / scale) + zero_point, q_min, q_max).astype(np.int64)


def dequantize_uniform(q: np.ndarray, scale: float | np.ndarray, zero_point: int | np.ndarray) -> np.ndarray:
    """``s·(q − z)``: ONNX DequantizeLinear (in float64)."""
    return (q.astype(np.float64) - zero_point) * scale


#: The smallest scale a quantizer chooses: ONNX stores scales as float32, where anything
#: smaller is denormal or 0 (then QuantizeLinear divides by zero).
MIN_SCALE = float(np.finfo(np.float32).tiny)


def symmetric_params(x: np.ndarray, bits: int, narrow: bool = False, alphabet_scalar: float = 1.0) -> tuple[float, int]:
    """(scale, 0) with s = C·max|x| / (2**(b−1) − 1) (algorithms.md §1.1)."""
    if bits < 2:
        raise ValueError("a symmetric integer grid needs at least 2 bits")
    absmax = float(np.abs(x).max()) if x.size else 0.0
    levels = (1 << (bits - 1)) - 1
    scale = alphabet_scalar * absmax / levels
    return (max(scale, MIN_SCALE) if scale > 0 else 1.0), 0


def asymmetric_params(x: np.ndarray, bits: int) -> tuple[float, int]:
    """(scale, zero point) covering [min(x, 0), max(x, 0)] on the unsigned grid, 0 exact."""
    q_min, q_max = uniform_grid(bits, "unsigned")
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if hi == lo:
        return 1.0, 0
    scale = max((hi - lo) / (q_max - q_min), MIN_SCALE)
    zero = int(np.clip(np.rint(q_min - lo / scale), q_min, q_max))
    return scale, zero


# --------------------------------------------------------------------------- unsigned activations (seed 000)


def unsigned_activation(x: np.ndarray, delta: float, levels: int) -> np.ndarray:
    """``δ·clip(rne(x/δ), 0, L − 1)`` (algorithms.md §1.4)."""
    return delta * np.clip(np.rint(x.astype(np.float64) / delta), 0, levels - 1)


def fit_unsigned_activation(x: np.ndarray, levels: int) -> float:
    """δ* = argmin over 1.5·max(x)·i/(200·(L − 1)), i = 1..200, then golden-section refinement.

    Fitted for unsigned use, so all L codes are reachable (the seed's symmetric fit, Q000-4,
    leaves about half of them unused; see :func:`fit_unsigned_activation_faithful`).
    """
    top = float(x.max())
    if top <= 0:
        return 1.0
    x64 = x.astype(np.float64).reshape(-1)

    def sse(delta: float) -> float:
        return float(np.sum((unsigned_activation(x64, delta, levels) - x64) ** 2))

    grid = 1.5 * top * np.arange(1, 201) / (200 * (levels - 1))
    costs = [sse(d) for d in grid]
    i = int(np.argmin(costs))
    return refine_minimum(sse, float(grid[max(i - 1, 0)]), float(grid[min(i + 1, 199)]), float(grid[i]), costs[i])


def fit_unsigned_activation_faithful(x: np.ndarray, levels: int) -> float:
    """Seed 000's δ: the symmetric dead-zone codebook fitted with ratio 0 (Q000-4)."""
    from qcompiler.candidates import fit_deadzone

    _, delta = fit_deadzone(x.astype(np.float64), 0.0, levels, refine=False)
    return delta


# --------------------------------------------------------------------------- power of two, DoReFa


def power_of_two(x: np.ndarray, e_min: int, e_max: int) -> np.ndarray:
    """Levels {0} ∪ {±2**e : e_min ≤ e ≤ e_max}, rounding in the log domain (algorithms.md §1.6)."""
    x64 = x.astype(np.float64)
    a = np.abs(x64)
    with np.errstate(divide="ignore"):
        e = np.clip(np.rint(np.log2(np.where(a > 0, a, 1.0))), e_min, e_max)
    return np.where(a < 2.0 ** (e_min - 1), 0.0, np.sign(x64) * np.exp2(e))


def dorefa(x: np.ndarray, bits: int, clip: float = 1.0) -> np.ndarray:
    """Standard DoReFa with clip value c: ``c·rne(clip(x, 0, c)/c·(2**b − 1))/(2**b − 1)``."""
    levels = (1 << bits) - 1
    return clip * np.rint(np.clip(x.astype(np.float64), 0.0, clip) / clip * levels) / levels
