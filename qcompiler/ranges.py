"""Range choosers: the clipping range of an activation from its streamed ``|x|`` histogram.

- ``minmax``: the largest magnitude seen.
- ``percentile``: a quantile of ``|x|`` (e.g. 99.99 %).
- ``entropy``: the KL-divergence search (TensorRT's calibration) between the clipped reference
  distribution and its ``num_quantized_bins`` quantized version, on 2048 bins.
- ``mse``: the clip that minimises the expected squared error of a b-bit uniform quantizer,
  evaluated on the histogram's bin centres (grid of 100, then golden-section refinement).

All operate on a histogram of ``|x|`` over ``[0, upper)`` (``hist[j]`` counts values in bin ``j``).
Signed tensors use symmetric codes ``[-(2**(b-1) - 1), 2**(b-1) - 1]`` on ``|x|``; unsigned tensors
``[0, 2**b - 1]``.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from qcompiler.quantizers import refine_minimum

ENTROPY_BINS = 2048
MSE_GRID = 100


def levels_per_side(bits: int, signed: bool) -> int:
    """Number of positive code levels: 2**(b-1) - 1 signed, 2**b - 1 unsigned."""
    if bits < 1 or (signed and bits < 2):
        raise ValueError(f"{bits}-bit {'signed' if signed else 'unsigned'} codes have no positive level")
    return (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1


def _occupied(hist: np.ndarray) -> int:
    nz = np.flatnonzero(hist)
    return int(nz[-1]) + 1 if nz.size else 0


def expected_sq_error(hist: np.ndarray, upper: float, clip: float, levels: int) -> float:
    """Σ count·(Q(centre) − centre)² for a uniform quantizer with ``levels`` steps on [0, clip]."""
    n = _occupied(hist)
    if n == 0:
        return 0.0
    return _sq_error(hist, n, upper / hist.size, clip, levels)


@numba.njit(cache=True, nogil=True)
def _sq_error(hist: np.ndarray, n: int, width: float, clip: float, levels: int) -> float:
    # One pass without temporaries: the MSE chooser calls this ~130 times on 2**16 bins.
    total = 0.0
    step = clip / levels
    for j in range(n):
        centre = (j + 0.5) * width
        q = min(np.rint(centre / step), levels) * step if step > 0.0 else 0.0  # no clip: all to 0
        total += hist[j] * (q - centre) ** 2
    return total


def mse_range(hist: np.ndarray, upper: float, bits: int, signed: bool, absmax: float) -> float:
    """The clip minimising the expected squared error (grid search + golden section)."""
    levels = levels_per_side(bits, signed)
    if absmax <= 0.0:
        return 0.0
    grid = absmax * np.arange(1, MSE_GRID + 1) / MSE_GRID
    n, width = _occupied(hist), upper / hist.size

    def cost(r: float) -> float:
        return _sq_error(hist, n, width, r, levels)

    costs = np.array([cost(r) for r in grid])
    best = int(np.argmin(costs))
    lo = float(grid[best - 1]) if best > 0 else float(grid[0]) * 0.5
    hi = float(grid[best + 1]) if best + 1 < MSE_GRID else absmax
    return refine_minimum(cost, lo, hi, float(grid[best]), float(costs[best]))


@numba.njit(cache=True)
def _smooth(p: np.ndarray, eps: float) -> np.ndarray:
    """TensorRT/onnxruntime smoothing: move ``eps`` mass onto empty bins (p must have a non-zero)."""
    zeros = 0
    for v in p:
        if v == 0:
            zeros += 1
    nonzeros = p.shape[0] - zeros
    eps1 = eps * zeros / nonzeros
    out = np.empty(p.shape[0])
    for j in range(p.shape[0]):
        out[j] = p[j] + eps if p[j] == 0 else p[j] - eps1
    return out


@numba.njit(cache=True)
def _kl_search(hist: np.ndarray, nq: int) -> int:
    """Number of reference bins kept that minimises KL(P || Q), as TensorRT and onnxruntime do.

    P is the first ``i`` bins with all outliers added to the last; Q merges the first ``i``
    bins (without outliers) into ``nq`` groups spread over P's non-empty bins; both are
    smoothed with eps = 1e-4 before the divergence.
    """
    n = hist.shape[0]
    best_i, best_kl = n, np.inf
    suffix = np.zeros(n + 1)
    for j in range(n - 1, -1, -1):
        suffix[j] = suffix[j + 1] + hist[j]
    for i in range(nq, n + 1):
        p = hist[:i].astype(np.float64).copy()
        p[i - 1] += suffix[i]
        merged = i // nq
        q = np.zeros(i)
        for k in range(nq):
            start = k * merged
            stop = start + merged if k < nq - 1 else i
            total, norm = 0.0, 0
            for j in range(start, stop):
                total += hist[j]
                if p[j] != 0:
                    norm += 1
            if norm:
                value = np.floor(total / norm)  # onnxruntime stores q as int64
                for j in range(start, stop):
                    if p[j] != 0:
                        q[j] = value
        if q.sum() == 0 or p.sum() == 0:
            continue
        ps, qs = _smooth(p, 1e-4), _smooth(q, 1e-4)
        psum, qsum = ps.sum(), qs.sum()
        kl = 0.0
        for j in range(i):
            pj = ps[j] / psum
            if pj > 0:
                qj = qs[j] / qsum
                kl += pj * math.log(pj / qj) if qj > 0 else np.inf
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i


def entropy_range(hist: np.ndarray, upper: float, bits: int, signed: bool, absmax: float) -> float:
    """KL-optimal clip on a 2048-bin version of the histogram covering [0, absmax]."""
    if absmax <= 0.0:
        return 0.0
    n = _occupied(hist)
    group = max(1, math.ceil(n / ENTROPY_BINS))
    padded = np.zeros(group * math.ceil(n / group), np.int64)
    padded[:n] = hist[:n]
    coarse = padded.reshape(-1, group).sum(axis=1)
    width = upper / hist.size * group
    nq = levels_per_side(bits, signed) + 1  # quantized bins over [0, threshold]: 128 for int8
    if coarse.size <= nq:
        return float(absmax)
    i = _kl_search(coarse, nq)
    return float(min(i * width, absmax))


def percentile_range(quantile_fn, percentile: float) -> float:
    """The ``percentile`` (0-100) of ``|x|`` given a quantile function of probabilities."""
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    return float(quantile_fn(percentile / 100.0))
