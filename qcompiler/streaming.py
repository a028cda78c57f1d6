"""Streaming tensor statistics: one pass per batch, memory independent of the sample count.

:class:`StreamingStats` keeps, for one activation tensor (samples on axis 0, channels on axis 1):

- per tensor and per channel: count, min, max, sum and sum of squares (float64);
- a histogram of ``|x|`` with ``bins`` bins over ``[0, R)`` where ``R`` is a power of two. When a
  batch exceeds ``R``, ``R`` doubles and adjacent bins merge pairwise, which is exact (bin edges
  stay aligned), so the histogram equals the one computed on all data at the final ``R``;
- a per-channel ``|x|`` histogram with fewer bins on the same scheme;
- a seeded reservoir sample (Algorithm R) of at most ``reservoir`` values.

The hot loops are numba kernels (``nogil``); their results equal numpy's exactly for counts,
minima and maxima, and to float64 round-off for sums.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _minmax(x: np.ndarray) -> tuple[float, float, int]:
    lo, hi, nans = np.inf, -np.inf, 0
    for v in x:
        if v != v:
            nans += 1
        elif v < lo:
            lo = v
        if v > hi:
            hi = v
    return lo, hi, nans


@numba.njit(cache=True, nogil=True, parallel=True)
def _accumulate(
    x: np.ndarray,  # (N, C, S) float32, C-contiguous
    inv_width: float,
    inv_cwidth: float,
    hist2d: np.ndarray,  # (T, B) int32: one private histogram per worker (fits L2), summed by the caller
    chist: np.ndarray,  # (C, Bc) int64
    csum: np.ndarray,
    csq: np.ndarray,
    cmin: np.ndarray,
    cmax: np.ndarray,
) -> None:
    workers = hist2d.shape[0]
    nb = hist2d.shape[1]
    ncb = chist.shape[1]
    channels = x.shape[1]
    # Channels are dealt round-robin to workers; every per-channel accumulator has one writer.
    for t in numba.prange(workers):
        for c in range(t, channels, workers):
            s1, s2 = 0.0, 0.0
            lo, hi = cmin[c], cmax[c]
            for n in range(x.shape[0]):
                for s in range(x.shape[2]):
                    v = np.float64(x[n, c, s])
                    s1 += v
                    s2 += v * v
                    if v < lo:
                        lo = v
                    if v > hi:
                        hi = v
                    a = abs(v)
                    b = int(a * inv_width)
                    hist2d[t, b if b < nb else nb - 1] += 1
                    bc = int(a * inv_cwidth)
                    chist[c, bc if bc < ncb else ncb - 1] += 1
            cmin[c], cmax[c] = lo, hi
            csum[c] += s1
            csq[c] += s2


@numba.njit(cache=True, nogil=True)
def _algorithm_l(
    flat: np.ndarray, offset: int, reservoir: np.ndarray, next_index: int, w: float, uniforms: np.ndarray
) -> tuple[int, float]:
    """Replace reservoir slots until the next index leaves this batch or the uniforms run out."""
    k = reservoir.shape[0]
    end = offset + flat.shape[0]
    i = 0
    while next_index < end and i + 3 <= uniforms.shape[0]:
        slot = min(int(uniforms[i] * k), k - 1)
        reservoir[slot] = flat[next_index - offset]
        w *= math.exp(math.log(uniforms[i + 1]) / k)
        next_index += int(math.floor(math.log(uniforms[i + 2]) / math.log1p(-w))) + 1
        i += 3
    return next_index, w


def _as_ncs(x: np.ndarray) -> np.ndarray:
    """View a batch as (N, C, S): axis 1 is the channel axis, the rest is flattened."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 0:
        return x.reshape(1, 1, 1)
    if x.ndim == 1:
        return x.reshape(x.shape[0], 1, 1)
    return x.reshape(x.shape[0], x.shape[1], -1)


def _merge_pairs(hist: np.ndarray, times: int) -> np.ndarray:
    """Merge adjacent bins ``times`` times (the range doubles each time); shape is kept."""
    for _ in range(times):
        n = hist.shape[-1]
        merged = hist.reshape(*hist.shape[:-1], n // 2, 2).sum(axis=-1)
        hist = np.concatenate([merged, np.zeros_like(merged)], axis=-1)
    return hist


def power_of_two_above(value: float) -> float:
    """The smallest power of two strictly greater than ``value`` (>= 2**-126)."""
    if value <= 0.0:
        return 2.0**-126
    exponent = math.floor(math.log2(value)) + 1
    r = math.ldexp(1.0, exponent)
    while r <= value:
        r *= 2.0
    return r


class StreamingStats:
    """Streaming statistics of one tensor; see the module docstring.

    Args:
        bins: per-tensor ``|x|`` histogram bins (a power of two).
        channel_bins: per-channel histogram bins (a power of two).
        reservoir: reservoir sample size (0 disables it).
        seed: seed of the reservoir's random generator.
    """

    def __init__(self, bins: int = 1 << 16, channel_bins: int = 256, reservoir: int = 0, seed: int = 0) -> None:
        if bins & (bins - 1) or channel_bins & (channel_bins - 1):
            raise ValueError("histogram bin counts must be powers of two")
        self.bins, self.channel_bins = bins, channel_bins
        self.count = 0
        self.samples = 0
        self.min, self.max = math.inf, -math.inf
        self.total, self.total_sq = 0.0, 0.0
        self.range = 0.0  # R: histograms cover [0, R)
        self.hist = np.zeros(bins, np.int64)
        self.channels = 0
        self.chist = np.zeros((0, channel_bins), np.int64)
        self.csum = self.csq = self.cmin = self.cmax = np.zeros(0)
        self.ccount = 0  # elements per channel
        self.reservoir_size = reservoir
        self.reservoir = np.zeros(reservoir, np.float32)
        self._rng = np.random.default_rng(seed)
        self._w = 0.0  # Algorithm L state: current weight and index of the next replacement
        self._next = 0

    # ------------------------------------------------------------------ updates
    def update(self, batch: np.ndarray) -> None:
        """Fold one batch (samples on axis 0) into the statistics.

        Raises:
            ValueError: the batch contains NaN or Inf, or its channel count changed.
        """
        x = _as_ncs(batch)
        if x.size == 0:
            return
        flat = x.reshape(-1)
        lo, hi, nans = _minmax(flat)
        if nans or not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("contains NaN or Inf")
        if self.channels == 0:
            self._init_channels(x.shape[1])
        elif x.shape[1] != self.channels:
            raise ValueError(f"channel count changed from {self.channels} to {x.shape[1]}")
        self._grow_range(max(abs(lo), abs(hi)))
        before_sum, before_sq = self.csum.sum(), self.csq.sum()
        workers = min(numba.get_num_threads(), x.shape[1])
        partial = np.zeros((workers, self.bins), np.int32)  # < 2**31 elements per batch and worker
        _accumulate(
            x, self.bins / self.range, self.channel_bins / self.range, partial, self.chist,
            self.csum, self.csq, self.cmin, self.cmax,
        )
        self.hist += partial.sum(axis=0)
        total, total_sq = self.csum.sum() - before_sum, self.csq.sum() - before_sq
        self._reservoir_update(flat)
        self.count += flat.size
        self.ccount += x.shape[0] * x.shape[2]
        self.samples += x.shape[0]
        self.min, self.max = min(self.min, float(lo)), max(self.max, float(hi))
        self.total += total
        self.total_sq += total_sq

    def _init_channels(self, channels: int) -> None:
        self.channels = channels
        self.chist = np.zeros((channels, self.channel_bins), np.int64)
        self.csum, self.csq = np.zeros(channels), np.zeros(channels)
        self.cmin, self.cmax = np.full(channels, np.inf), np.full(channels, -np.inf)

    def _grow_range(self, absmax: float) -> None:
        if self.range == 0.0:
            self.range = power_of_two_above(absmax)
            return
        times = 0
        while absmax >= self.range:
            self.range *= 2.0
            times += 1
        if times:
            self.hist = _merge_pairs(self.hist, times)
            self.chist = _merge_pairs(self.chist, times)

    def _reservoir_update(self, flat: np.ndarray) -> None:
        """Algorithm L (Li, 1994): uniform reservoir sampling with geometric skips.

        The cost is proportional to the number of replacements (about k·log(N/k) over the whole
        stream), not to the number of elements. The loop runs in numba on uniforms drawn in
        bulk from the seeded generator, so the sample is deterministic for a seed and a batch
        split.
        """
        k = self.reservoir_size
        if k == 0:
            return
        seen = self.count
        fill = max(0, min(k - seen, flat.size))
        if fill:
            self.reservoir[seen : seen + fill] = flat[:fill]
            if seen + fill == k:
                u = 1.0 - self._rng.random(2)  # in (0, 1]
                self._w = math.exp(math.log(u[0]) / k)
                self._next = k - 1 + int(math.floor(math.log(u[1]) / math.log1p(-self._w))) + 1
        if seen + fill < k:
            return
        end = seen + flat.size
        while self._next < end:
            expected = int(k * math.log(end / max(self._next, 1))) + 64
            uniforms = 1.0 - self._rng.random(3 * expected)
            self._next, self._w = _algorithm_l(flat, seen, self.reservoir, self._next, self._w, uniforms)

    # ------------------------------------------------------------------ results
    @property
    def mean(self) -> float:
        """Mean over all elements."""
        return self.total / self.count

    @property
    def std(self) -> float:
        """Population standard deviation over all elements."""
        return math.sqrt(max(self.total_sq / self.count - self.mean**2, 0.0))

    @property
    def absmax(self) -> float:
        """max |x|."""
        return max(abs(self.min), abs(self.max))

    def channel_mean(self) -> np.ndarray:
        """Per-channel means."""
        return self.csum / self.ccount

    def channel_std(self) -> np.ndarray:
        """Per-channel population standard deviations."""
        mean = self.channel_mean()
        return np.sqrt(np.maximum(self.csq / self.ccount - mean**2, 0.0))

    def reservoir_sample(self) -> np.ndarray:
        """The reservoir (at most ``reservoir`` values, in slot order)."""
        return self.reservoir[: min(self.count, self.reservoir_size)].copy()

    def bin_edges(self, channel: bool = False) -> np.ndarray:
        """Edges of the per-tensor (or per-channel) histogram."""
        return np.linspace(0.0, self.range, (self.channel_bins if channel else self.bins) + 1)

    def abs_quantile(self, q: float | np.ndarray) -> np.ndarray:
        """Quantiles of |x| from the histogram (linear inside a bin; exact to one bin width)."""
        return histogram_quantile(self.hist, self.range, q, self.absmax)

    def channel_abs_quantile(self, q: float) -> np.ndarray:
        """Per-channel quantiles of |x| from the per-channel histograms."""
        cabs = np.maximum(np.abs(self.cmin), np.abs(self.cmax))
        return np.array([histogram_quantile(h, self.range, q, m) for h, m in zip(self.chist, cabs)])


def histogram_quantile(hist: np.ndarray, upper: float, q: float | np.ndarray, absmax: float) -> np.ndarray:
    """Quantile ``q`` of values histogrammed over ``[0, upper)``, capped at the true maximum."""
    total = hist.sum()
    if total == 0:
        return np.zeros_like(np.asarray(q, dtype=np.float64))
    cum = np.cumsum(hist)
    width = upper / hist.size
    target = np.asarray(q, dtype=np.float64) * total
    idx = np.searchsorted(cum, target, side="left")
    idx = np.minimum(idx, hist.size - 1)
    before = np.where(idx > 0, cum[np.maximum(idx - 1, 0)], 0)
    inside = hist[idx]
    frac = np.where(inside > 0, (target - before) / np.maximum(inside, 1), 1.0)
    return np.minimum((idx + np.clip(frac, 0.0, 1.0)) * width, absmax)
