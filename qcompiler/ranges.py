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


@numba.njit(cache=True, nogil=True, parallel=True)
def _sq_errors(hist: np.ndarray, n: int, width: float, clips: np.ndarray, levels: int) -> np.ndarray:
    """:func:`_sq_error` at every clip of ``clips``, in parallel (each sum is the same sequential one)."""
    out = np.empty(clips.shape[0])
    for k in numba.prange(clips.shape[0]):
        out[k] = _sq_error(hist, n, width, clips[k], levels)
    return out


def mse_range(hist: np.ndarray, upper: float, bits: int, signed: bool, absmax: float) -> float:
    """The clip minimising the expected squared error (grid search + golden section)."""
    levels = levels_per_side(bits, signed)
    if absmax <= 0.0:
        return 0.0
    grid = absmax * np.arange(1, MSE_GRID + 1) / MSE_GRID
    n, width = _occupied(hist), upper / hist.size

    def cost(r: float) -> float:
        return _sq_error(hist, n, width, r, levels)

    costs = _sq_errors(hist, n, width, grid, levels)
    best = int(np.argmin(costs))
    lo = float(grid[best - 1]) if best > 0 else float(grid[0]) * 0.5
    hi = float(grid[best + 1]) if best + 1 < MSE_GRID else absmax
    return refine_minimum(cost, lo, hi, float(grid[best]), float(costs[best]))


@numba.njit(cache=True, nogil=True)
def _kl_divergence_at(hist: np.ndarray, suffix: np.ndarray, i: int, nq: int, eps: float, q: np.ndarray) -> float:
    """KL(P || Q) when the first ``i`` bins are kept (see :func:`_kl_search`); inf when P or Q
    has no mass. ``q``: scratch of at least ``i`` floats (Q before smoothing).

    The arithmetic is the array form's (TensorRT/onnxruntime: P, Q, their eps-smoothed copies,
    the sums, then the divergence, all in bin order) without building P and the smoothed
    copies: P is ``hist[:i]`` with the outliers (``suffix[i]``) added to its last bin."""
    merged = i // nq
    last_p = hist[i - 1] + suffix[i]
    zeros_p, zeros_q = 0, 0
    for k in range(nq):  # each group's value: its total over its non-empty P bins, floored
        start = k * merged
        stop = start + merged if k < nq - 1 else i
        total, norm = 0.0, 0
        for j in range(start, stop):
            total += hist[j]
            if (last_p if j == i - 1 else hist[j]) != 0:
                norm += 1
        value = np.floor(total / norm) if norm else 0.0  # onnxruntime stores q as int64
        for j in range(start, stop):
            q[j] = value if (last_p if j == i - 1 else hist[j]) != 0 else 0.0
        zeros_p += stop - start - norm
        zeros_q += stop - start - (norm if value != 0 else 0)
    if zeros_p == i or zeros_q == i:
        return np.inf
    eps_p = eps * zeros_p / (i - zeros_p)  # smoothing moves eps onto every empty bin
    eps_q = eps * zeros_q / (i - zeros_q)
    psum, qsum = 0.0, 0.0
    for j in range(i):
        pj = last_p if j == i - 1 else np.float64(hist[j])
        psum += pj + eps if pj == 0 else pj - eps_p
        qsum += q[j] + eps if q[j] == 0 else q[j] - eps_q
    kl = 0.0
    for j in range(i):
        pj = last_p if j == i - 1 else np.float64(hist[j])
        ps = (pj + eps if pj == 0 else pj - eps_p) / psum
        if ps > 0:
            qs = (q[j] + eps if q[j] == 0 else q[j] - eps_q) / qsum
            kl += ps * math.log(ps / qs) if qs > 0 else np.inf
    return kl


#: interleaved lanes of the parallel KL search (the cost of a candidate grows with its bins,
#: so contiguous ranges of candidates would give the threads unequal work)
_KL_LANES = 64


@numba.njit(cache=True, nogil=True, parallel=True)
def _kl_search(hist: np.ndarray, nq: int) -> int:
    """Number of reference bins kept that minimises KL(P || Q), as TensorRT and onnxruntime do.

    P is the first ``i`` bins with all outliers added to the last; Q merges the first ``i``
    bins (without outliers) into ``nq`` groups spread over P's non-empty bins; both are
    smoothed with eps = 1e-4 before the divergence. The candidates ``i`` are independent and
    run in parallel; the first minimum wins, as in a sequential scan.
    """
    n = hist.shape[0]
    suffix = np.zeros(n + 1)
    for j in range(n - 1, -1, -1):
        suffix[j] = suffix[j + 1] + hist[j]
    divergences = np.full(n + 1, np.inf)
    for lane in numba.prange(_KL_LANES):
        q = np.empty(n)
        for i in range(nq + lane, n + 1, _KL_LANES):
            divergences[i] = _kl_divergence_at(hist, suffix, i, nq, 1e-4, q)
    best_i, best_kl = n, np.inf
    for i in range(nq, n + 1):
        if divergences[i] < best_kl:
            best_kl, best_i = divergences[i], i
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
