"""Streaming statistics against numpy, and the range choosers on distributions with known optima."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompiler import ranges, streaming
from qcompiler.ranges import _kl_search, entropy_range, expected_sq_error, levels_per_side, mse_range, percentile_range
from qcompiler.streaming import StreamingStats, histogram_quantile, power_of_two_above

RNG = np.random.default_rng(11)


def _feed(stats, x, splits):
    for part in np.array_split(x, splits):
        stats.update(part)


@settings(max_examples=25, deadline=None)
@given(splits=st.integers(1, 9), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 10))
def test_histogram_is_exact_for_any_batch_split(splits, scale, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(3, size=(40, 3, 5)) * scale).astype(np.float32)
    x[: 40 // splits] *= 1e-2  # the first batches have a small range: the histogram must rescale
    s = StreamingStats(bins=1024, channel_bins=64)
    _feed(s, x, splits)
    a = np.abs(x.astype(np.float64))
    assert s.range == power_of_two_above(a.max())
    want = np.bincount(np.minimum(np.floor(a.reshape(-1) * (1024 / s.range)).astype(int), 1023), minlength=1024)
    assert np.array_equal(s.hist, want)
    per_channel = a.transpose(1, 0, 2).reshape(3, -1)
    for c in range(3):
        want_c = np.bincount(np.minimum(np.floor(per_channel[c] * (64 / s.range)).astype(int), 63), minlength=64)
        assert np.array_equal(s.chist[c], want_c)
    assert s.min == x.min() and s.max == x.max() and s.count == x.size and s.samples == 40
    assert s.mean == pytest.approx(x.astype(np.float64).mean(), rel=1e-9, abs=1e-12)
    assert s.std == pytest.approx(x.astype(np.float64).std(), rel=1e-9)
    assert np.array_equal(s.cmin, x.min(axis=(0, 2))) and np.array_equal(s.cmax, x.max(axis=(0, 2)))
    assert np.allclose(s.channel_mean(), x.astype(np.float64).mean(axis=(0, 2)), rtol=1e-9, atol=1e-12)
    assert np.allclose(s.channel_std(), x.astype(np.float64).std(axis=(0, 2)), rtol=1e-9, atol=1e-12)


def test_quantiles_are_within_one_bin_of_numpy():
    x = RNG.lognormal(size=(1000, 4)).astype(np.float32)
    s = StreamingStats(bins=1 << 16)
    s.update(x)
    width = s.range / s.bins
    for q in (0.1, 0.5, 0.9, 0.99, 0.999):
        assert abs(float(s.abs_quantile(q)) - np.quantile(np.abs(x), q, method="inverted_cdf")) <= width
    assert float(s.abs_quantile(1.0)) == pytest.approx(np.abs(x).max(), abs=width)
    assert histogram_quantile(np.zeros(8, np.int64), 1.0, 0.5, 0.0) == 0.0


@pytest.fixture(params=["hypergeometric", "redraw"])
def reservoir_path(request, monkeypatch):
    """Both ways the reservoir draws a batch's members: numpy's hypergeometric, and the redraw of
    k distinct integers used past numpy's 1e9 bound (forced here by a zero bound)."""
    if request.param == "redraw":
        monkeypatch.setattr(streaming, "_HYPERGEOMETRIC_LIMIT", 0)
    return request.param


def test_reservoir_is_seeded_uniform_and_bounded(reservoir_path):
    x = np.arange(100_000, dtype=np.float32).reshape(-1, 1)
    a, b = StreamingStats(reservoir=2000, seed=3), StreamingStats(reservoir=2000, seed=3)
    _feed(a, x, 7)
    _feed(b, x, 7)
    sample = a.reservoir_sample()
    assert np.array_equal(sample, b.reservoir_sample()) and sample.size == 2000
    assert len(np.unique(sample)) == 2000
    # uniform over the stream: the mean index is near the middle (std of the mean ~ 645)
    assert abs(sample.mean() - 50_000) < 4 * 645
    small = StreamingStats(reservoir=2000)
    small.update(x[:10])
    assert np.array_equal(small.reservoir_sample(), x[:10, 0])


@pytest.mark.parametrize("first", [1_000, 50_000, 90_000])
def test_reservoir_stays_uniform_after_a_large_first_batch(first, reservoir_path):
    # A first batch of n > k fills the reservoir and then replaces a hypergeometric number of
    # its slots; the stream that follows must still be sampled at the same rate.
    x = np.arange(100_000, dtype=np.float32).reshape(-1, 1)
    s = StreamingStats(reservoir=2000, seed=5)
    s.update(x[:first])
    _feed(s, x[first:], 6)
    sample = s.reservoir_sample()
    assert len(np.unique(sample)) == 2000
    share = np.mean(sample < first)
    expected = first / 100_000
    sigma = math.sqrt(expected * (1 - expected) / 2000)
    assert abs(share - expected) < 4 * sigma + 1e-9
    assert abs(sample.mean() - 50_000) < 4 * 645


def test_reservoir_over_many_batches_covers_the_stream_evenly(reservoir_path):
    x = np.arange(100_000, dtype=np.float32).reshape(-1, 1)
    s = StreamingStats(reservoir=2000, seed=9)
    _feed(s, x, 50)
    counts = np.bincount((s.reservoir_sample() // 10_000).astype(int), minlength=10)
    chi2 = float(((counts - 200.0) ** 2 / 200.0).sum())
    assert chi2 < 30.0  # 9 degrees of freedom: P(chi2 > 30) < 5e-4 for a uniform sample


def test_every_value_is_in_the_reservoir_with_probability_k_over_n(reservoir_path):
    # 100 values in batches of 10 (below k: appended), 25 and 65; k = 20. Over 2000 seeds each
    # value's inclusion count is Binomial(2000, 0.2): mean 400, variance 320.
    x = np.arange(100, dtype=np.float32).reshape(-1, 1)
    counts = np.zeros(100)
    for seed in range(2000):
        s = StreamingStats(bins=64, channel_bins=8, reservoir=20, seed=seed)
        for part in (x[:10], x[10:35], x[35:]):
            s.update(part)
        sample = s.reservoir_sample().astype(int)
        assert len(np.unique(sample)) == 20
        counts[sample] += 1
    chi2 = float(((counts - 400.0) ** 2 / 320.0).sum())
    assert chi2 < 160.0  # ~99 degrees of freedom: P(chi2 > 160) ~ 1e-4 for uniform inclusion
    assert abs(counts[:10].mean() - 400.0) < 4 * math.sqrt(320.0 / 10)  # the appended values too


def test_memory_does_not_grow_with_samples():
    s = StreamingStats(reservoir=1000)
    s.update(RNG.normal(size=(8, 4, 16)).astype(np.float32))
    sizes = (s.hist.nbytes, s.chist.nbytes, s.reservoir.nbytes)
    for _ in range(50):
        s.update(RNG.normal(size=(8, 4, 16)).astype(np.float32))
    assert (s.hist.nbytes, s.chist.nbytes, s.reservoir.nbytes) == sizes


def test_nan_is_refused():
    with pytest.raises(ValueError, match="NaN or Inf"):
        StreamingStats().update(np.array([[1.0, np.nan]], np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_a_later_batch_is_refused_and_not_counted(bad):
    # After the first batch the kernel finds the range itself: NaN and Inf land outside it.
    s = StreamingStats(bins=1024, channel_bins=64)
    s.update(np.ones((4, 3), np.float32))
    batch = np.full((4, 3), 0.5, np.float32)
    batch[2, 1] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        s.update(batch)
    assert s.count == 12 and s.hist.sum() == 12 and s.chist.sum() == 12


def test_channel_bins_cannot_exceed_bins():
    with pytest.raises(ValueError, match="channel_bins"):
        StreamingStats(bins=64, channel_bins=128)


def _stats(x):
    s = StreamingStats()
    s.update(x.astype(np.float32).reshape(-1, 1))
    return s


def _sample_mse(x, clip, bits, signed):
    levels = levels_per_side(bits, signed)
    step = clip / levels
    lo = -levels if signed else 0
    return np.mean((np.clip(np.rint(x / step), lo, levels) * step - x) ** 2)


@pytest.mark.parametrize("dist", ["gauss", "laplace", "uniform"])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_mse_chooser_matches_brute_force_on_samples(dist, bits):
    x = {"gauss": RNG.normal(size=100_000), "laplace": RNG.laplace(size=100_000),
         "uniform": RNG.uniform(-1, 1, 100_000)}[dist].astype(np.float32).astype(np.float64)
    s = _stats(x)
    clip = mse_range(s.hist, s.range, bits, True, s.absmax)
    grid = np.linspace(s.absmax / 500, s.absmax, 500)
    best = min(_sample_mse(x, c, bits, True) for c in grid)
    assert _sample_mse(x, clip, bits, True) <= best * 1.01
    if dist == "uniform" and bits == 8:
        assert clip > 0.9  # no clipping of a bounded distribution at any width worth having
    if dist == "gauss" and bits == 4:
        assert 2.3 < clip < 2.7  # the known optimum for 7 levels per side is about 2.5 sigma


def test_mse_grid_costs_in_parallel_equal_the_sequential_ones():
    s = _stats(RNG.laplace(size=50_000))
    n, width = int(np.flatnonzero(s.hist)[-1]) + 1, s.range / s.hist.size
    clips = s.absmax * np.arange(1, 101) / 100
    expected = [ranges._sq_error(s.hist, n, width, float(c), 127) for c in clips]
    assert ranges._sq_errors(s.hist, n, width, clips, 127).tolist() == expected


def test_mse_chooser_unsigned():
    x = RNG.exponential(size=50_000)
    s = _stats(x)
    clip = mse_range(s.hist, s.range, 4, False, s.absmax)
    grid = np.linspace(s.absmax / 400, s.absmax, 400)
    assert _sample_mse(x, clip, 4, False) <= min(_sample_mse(x, c, 4, False) for c in grid) * 1.01
    assert expected_sq_error(s.hist, s.range, clip, 15) > 0


def test_entropy_chooser_clips_heavy_tails_only():
    uniform = _stats(RNG.uniform(-1, 1, 200_000))
    assert entropy_range(uniform.hist, uniform.range, 8, True, uniform.absmax) == pytest.approx(uniform.absmax, rel=0.01)
    heavy = _stats(RNG.standard_t(2, size=200_000))
    clip = entropy_range(heavy.hist, heavy.range, 8, True, heavy.absmax)
    assert clip < 0.5 * heavy.absmax
    assert clip > np.quantile(np.abs(RNG.standard_t(2, size=200_000)), 0.99)


# The KL search as TensorRT/onnxruntime write it, with arrays per candidate (sequential sums in
# numba, like the compiled search): the compiled one must choose the same bins, bit for bit.
@numba.njit
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


@numba.njit
def kl_search_with_arrays(hist: np.ndarray, nq: int) -> int:
    """The array form the compiled search reproduces (the code before session 14). Number of reference bins kept that minimises KL(P || Q), as TensorRT and onnxruntime do.

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


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(130, 700), st.sampled_from([2, 4, 16, 128]),
       st.sampled_from(["normal", "t2", "exponential", "sparse", "few"]))
def test_compiled_kl_search_chooses_what_the_array_form_chooses(seed, bins, nq, kind):
    rng = np.random.default_rng(seed)
    x = {"normal": lambda: np.abs(rng.normal(size=20_000)), "t2": lambda: np.abs(rng.standard_t(2, size=20_000)),
         "exponential": lambda: rng.exponential(size=5_000), "sparse": lambda: np.abs(rng.normal(size=300)),
         "few": lambda: rng.integers(0, 5, size=1_000).astype(np.float64)}[kind]()
    hist = np.histogram(x, bins=bins, range=(0.0, float(x.max()) * 1.001 + 1e-9))[0].astype(np.int64)
    if bins <= nq:
        return
    assert _kl_search(hist, nq) == kl_search_with_arrays(hist, nq)


def test_percentile_chooser():
    s = _stats(RNG.uniform(0, 1, 100_000))
    assert percentile_range(s.abs_quantile, 99.0) == pytest.approx(0.99, abs=2e-3)
    with pytest.raises(ValueError, match="percentile must be in"):
        percentile_range(s.abs_quantile, 0.0)


@pytest.mark.parametrize(("given_policy", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_importing_qcompiler_makes_openmp_workers_sleep_unless_the_user_chose(given_policy, expected):
    # Spinning OpenMP workers of the statistics kernels slow onnxruntime's next run (issue 3);
    # the policy is read when libgomp loads, so it must be set by the import, in a fresh process.
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given_policy:
        env["OMP_WAIT_POLICY"] = given_policy
    code = "import os, qcompiler; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == expected
