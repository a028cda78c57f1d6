"""Streaming tensor statistics: one pass per batch, memory independent of the sample count.

:class:`StreamingStats` keeps, for one activation tensor (samples on axis 0, channels on axis 1):

- per tensor and per channel: count, min, max, sum and sum of squares (float64);
- a histogram of ``|x|`` with ``bins`` bins over ``[0, R)`` where ``R`` is a power of two. When a
  batch exceeds ``R``, ``R`` doubles and adjacent bins merge pairwise, which is exact (bin edges
  stay aligned), so the histogram equals the one computed on all data at the final ``R``;
- a per-channel ``|x|`` histogram with fewer bins on the same scheme;
- a seeded uniform reservoir sample of at most ``reservoir`` values (a few vectorised draws per
  batch, see :meth:`StreamingStats._reservoir_update`).

The hot loops are numba kernels (``nogil``); their results equal numpy's exactly for counts,
minima and maxima, and to float64 round-off for sums.
"""

from __future__ import annotations

import math
import threading

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, parallel=True, boundscheck=False)
def _accumulate(
    x: np.ndarray,  # (N, C, S) float32, C-contiguous
    upper: float,  # R: the histograms cover [0, R)
    inv_width: float,  # bins / R (a power of two, so a * inv_width is exact)
    shift: int,  # per-channel bin = per-tensor bin >> shift
    hist2d: np.ndarray,  # (T, B) int32, zero on entry: one private histogram per worker (fits L2)
    chist: np.ndarray,  # (C, B >> shift) int32, zero on entry: this batch's per-channel counts
    csum: np.ndarray,  # (C,) float64 outputs: this batch's per-channel sums ...
    csq: np.ndarray,  # ... sums of squares,
    cmin: np.ndarray,  # ... minima (+inf on entry)
    cmax: np.ndarray,  # ... and maxima (-inf on entry)
    top: np.ndarray,  # (T,) int64 output: highest bin each worker touched
    over: np.ndarray,  # (T,) int64 output: values each worker found >= R, or NaN
) -> None:
    """One pass over a batch: sums, extremes and both histograms of every channel.

    A value at or above R (or NaN) is counted in ``over`` and binned in the last bin; the caller
    then grows R and runs the batch again, so no separate pass is needed to find the range.
    """
    workers = hist2d.shape[0]
    last = hist2d.shape[1] - 1
    # Channels are dealt round-robin to workers; every per-channel accumulator has one writer.
    for t in numba.prange(workers):
        highest, outside = 0, 0
        for c in range(t, x.shape[1], workers):
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
                    if a < upper:  # False for NaN too
                        b = np.int64(a * inv_width)
                    else:
                        b = last
                        outside += 1
                    hist2d[t, b] += 1
                    chist[c, b >> shift] += 1
                    if b > highest:
                        highest = b
            cmin[c], cmax[c] = lo, hi
            csum[c] = s1
            csq[c] = s2
        top[t] = highest
        over[t] = outside


@numba.njit(cache=True, nogil=True)
def _fold_workers(partial: np.ndarray, used: int, hist: np.ndarray, keep: bool) -> None:
    """Add the workers' histograms (bins below ``used``) to ``hist`` if ``keep``; zero them."""
    for t in range(partial.shape[0]):
        for b in range(used):
            if keep:
                hist[b] += partial[t, b]
            partial[t, b] = 0


_SCRATCH = threading.local()
_HYPERGEOMETRIC_LIMIT = 10**9  # numpy's bound on each class of Generator.hypergeometric


def _worker_histograms(workers: int, bins: int) -> np.ndarray:
    """This thread's zeroed (workers, bins) int32 scratch; callers zero what they touch.

    Shared by every :class:`StreamingStats` updated on the thread, so memory is per thread,
    not per tensor.
    """
    scratch = getattr(_SCRATCH, "hist", None)
    if scratch is None or scratch.shape != (workers, bins):
        scratch = np.zeros((workers, bins), np.int32)
        _SCRATCH.hist = scratch
    return scratch


def _as_ncs(x: np.ndarray) -> np.ndarray:
    """View a batch as (N, C, S): axis 1 is the channel axis, the rest is flattened."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 0:
        return x.reshape(1, 1, 1)
    if x.ndim == 1:
        return x.reshape(x.shape[0], 1, 1)
    return x.reshape(x.shape[0], x.shape[1], -1)


def _finite_absmax(x: np.ndarray) -> float:
    """max |x| of a batch (numpy's SIMD reductions); ValueError on NaN or Inf."""
    lo, hi = float(x.min()), float(x.max())  # NaN propagates through both
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("contains NaN or Inf")
    return max(abs(lo), abs(hi))


def _merge_pairs(hist: np.ndarray, times: int) -> np.ndarray:
    """Merge adjacent bins ``times`` times (the range doubles each time); shape is kept."""
    for _ in range(times):
        n = hist.shape[-1]
        merged = hist.reshape(*hist.shape[:-1], n // 2, 2).sum(axis=-1)
        hist = np.concatenate([merged, np.zeros_like(merged)], axis=-1)
    return hist


def check_sizes(bins: int, channel_bins: int, reservoir: int) -> None:
    """ValueError unless both bin counts are powers of two, a channel bin merges whole bins and
    the reservoir size is not negative."""
    if reservoir < 0:
        raise ValueError(f"reservoir is a sample size, >= 0 (got {reservoir})")
    if bins < 1 or channel_bins < 1 or bins & (bins - 1) or channel_bins & (channel_bins - 1):
        raise ValueError("histogram bin counts must be powers of two")
    if channel_bins > bins:
        raise ValueError("channel_bins must not exceed bins (a channel bin merges whole tensor bins)")


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
        check_sizes(bins, channel_bins, reservoir)
        self.bins, self.channel_bins = bins, channel_bins
        self._shift = (bins // channel_bins).bit_length() - 1  # channel bin = tensor bin >> shift
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

    # ------------------------------------------------------------------ updates
    def update(self, batch: np.ndarray) -> None:
        """Fold one batch (samples on axis 0) into the statistics.

        Raises:
            ValueError: the batch contains NaN or Inf, or its channel count changed.
        """
        x = _as_ncs(batch)
        if x.size == 0:
            return
        if self.channels == 0:
            self._init_channels(x.shape[1])
        elif x.shape[1] != self.channels:
            raise ValueError(f"channel count changed from {self.channels} to {x.shape[1]}")
        if self.range == 0.0:
            self._grow_range(_finite_absmax(x))
        batch_stats = self._accumulate(x)
        if batch_stats is None:  # a value reached R: grow R (exact pairwise merges), bin again
            self._grow_range(_finite_absmax(x))
            batch_stats = self._accumulate(x)
        csum, csq, cmin, cmax = batch_stats
        flat = x.reshape(-1)
        self._reservoir_update(flat)
        self.count += flat.size
        self.ccount += x.shape[0] * x.shape[2]
        self.samples += x.shape[0]
        self.csum += csum
        self.csq += csq
        self.cmin = np.minimum(self.cmin, cmin)
        self.cmax = np.maximum(self.cmax, cmax)
        self.min, self.max = min(self.min, float(cmin.min())), max(self.max, float(cmax.max()))
        self.total += float(csum.sum())
        self.total_sq += float(csq.sum())

    def _accumulate(self, x: np.ndarray) -> tuple[np.ndarray, ...] | None:
        """Bin one batch at the current range; None (and nothing kept) if a value reached it.

        Returns:
            The batch's per-channel sums, sums of squares, minima and maxima.
        """
        workers = min(numba.get_num_threads(), x.shape[1])
        partial = _worker_histograms(workers, self.bins)
        channels = x.shape[1]
        chist = np.zeros((channels, self.channel_bins), np.int32)  # < 2**31 elements per batch
        csum, csq = np.zeros(channels), np.zeros(channels)
        cmin, cmax = np.full(channels, np.inf), np.full(channels, -np.inf)
        top, over = np.zeros(workers, np.int64), np.zeros(workers, np.int64)
        _accumulate(x, self.range, self.bins / self.range, self._shift, partial, chist, csum, csq, cmin, cmax, top, over)
        kept = not over.any()
        _fold_workers(partial, int(top.max()) + 1, self.hist, kept)
        if kept:
            self.chist += chist
        return (csum, csq, cmin, cmax) if kept else None

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
        """Keep the reservoir a uniform sample of every value seen, one batch at a time.

        While the reservoir is not full, values are appended. After that, the sample of the
        ``old`` values seen so far plus the batch's ``n`` is a uniform k-subset of ``old + n``:
        the number of its members from the batch is hypergeometric (k draws, n good, old bad),
        they are uniform distinct positions of the batch, and the members kept from before are a
        uniform subset of the current sample, so they replace uniform distinct slots. This
        draws the same law as Algorithm L (Li, 1994) with a few vectorised draws per batch
        instead of a loop over every replacement; the sample is deterministic for a seed and
        a batch split.
        """
        k = self.reservoir_size
        if k == 0:
            return
        seen = self.count
        fill = max(0, min(k - seen, flat.size))
        if fill:
            self.reservoir[seen : seen + fill] = flat[:fill]
        rest = flat[fill:]
        if rest.size == 0:
            return
        positions = self._batch_members(seen + fill, rest.size)
        if positions.size:
            slots = self._rng.choice(k, positions.size, replace=False)
            self.reservoir[slots] = rest[positions]

    def _batch_members(self, old: int, n: int) -> np.ndarray:
        """Positions in a batch of ``n`` of the members of a uniform k-subset of ``old + n``."""
        k = self.reservoir_size
        if old < _HYPERGEOMETRIC_LIMIT and n < _HYPERGEOMETRIC_LIMIT:
            taken = int(self._rng.hypergeometric(n, old, k))
            return np.sort(self._rng.choice(n, taken, replace=False))
        # numpy's hypergeometric stops at 1e9 per class: draw the k-subset of old + n itself
        # (k distinct integers, by redrawing repeats, which are rare at this size).
        draws = np.unique(self._rng.integers(0, old + n, k))
        while draws.size < k:
            draws = np.unique(np.concatenate([draws, self._rng.integers(0, old + n, k - draws.size)]))
        return draws[draws >= old] - old

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
