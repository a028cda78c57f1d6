"""Candidate quantizers: spec fixtures for dead zones, rates, fitting against brute force."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompiler.candidates import (
    Candidate,
    FitContext,
    _deadzone_sse,
    _deadzone_sse_sorted,
    apply,
    candidate_set,
    codes,
    deadzone_quantize,
    fit,
    fit_deadzone,
    rates,
)

RNG = np.random.default_rng(5)


def test_deadzone_fixtures():
    # algorithms.md §1.10
    x = np.array([0.2, 0.25, 0.7, 0.75, 3.0, -0.8])
    assert deadzone_quantize(x, 0.25, 0.5, 5).tolist() == [0, 0.5, 0.5, 1.0, 1.0, -1.0]
    assert deadzone_quantize(np.array([1.25]), 0.25, 0.5, 7).tolist() == [1.5]  # rha, where rne gives 1.0


@settings(max_examples=50, deadline=None)
@given(st.integers(-20, 0), st.integers(1, 6))
def test_half_step_dead_zone_is_round_half_away(exp, kbits):
    delta = 2.0**exp
    levels = 2 * (2**kbits - 1) + 1
    k = (levels - 1) // 2
    x = RNG.integers(-(2**22), 2**22, size=200) * 2.0**-20  # dyadic: ties are exact
    x = np.concatenate([x, (np.arange(-5, 6) + 0.5) * delta])
    rha = np.sign(x) * np.floor(np.abs(x) / delta + 0.5)
    assert np.array_equal(deadzone_quantize(x, delta / 2, delta, levels), delta * np.clip(rha, -k, k))


@pytest.mark.parametrize("m", [0, 1, 3])
def test_integer_dead_zone_stays_on_the_grid(m):
    delta = 0.125
    lam = (m + 0.5) * delta
    x = RNG.normal(size=1000)
    q = deadzone_quantize(x, lam, delta, 15)
    assert np.allclose(q / delta, np.rint(q / delta))
    assert np.count_nonzero(q == 0) == np.count_nonzero(np.abs(x) < lam)


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5])
def test_deadzone_fit_matches_quantile_and_brute_force(ratio):
    x = RNG.laplace(size=5000)
    lam, delta = fit_deadzone(x, ratio, 7)
    a = np.abs(x)
    assert lam == (np.quantile(a, ratio, method="inverted_cdf") if ratio else 0.0)
    grid = (1.5 * a.max() - lam) * np.arange(1, 201) / (200 * 3)
    brute = min(np.sum((deadzone_quantize(x, lam, d, 7) - x) ** 2) for d in grid)
    assert np.sum((deadzone_quantize(x, lam, delta, 7) - x) ** 2) <= brute * (1 + 1e-9)
    with pytest.raises(ValueError, match="at least 3 levels, got 2"):
        fit_deadzone(x, ratio, 2)
    assert fit_deadzone(x, ratio, 8) == (lam, delta)  # an even L (the seed's lists) fits like L - 1


def test_a_shared_context_fits_every_candidate_as_alone_and_sorts_once(monkeypatch):
    # the default set's kinds on a per-channel weight (float32, one exact tie of |x| values)
    # and on an unsigned activation sample, dead-zone level counts on both sides of the
    # sorted/direct switch (k·log2 N < N)
    w = RNG.laplace(size=(8, 4, 3, 3)).astype(np.float32)
    w[0, 0, 0, :2] = (0.5, -0.5)
    sample = np.abs(RNG.normal(size=500)).astype(np.float32)
    cands = [*candidate_set(bits=(1, 2, 4, 8, 16), kinds=("uniform", "deadzone", "log", "fixed"),
                            deadzone_ratios=(0.0, 0.1, 0.5)), Candidate("deadzone", 10, 0.3, 601)]
    alone = [fit(c, w, True, axis=0 if c.kind in ("uniform", "fixed") else None) for c in cands]
    alone += [fit(c, sample, False, None, 4.0) for c in cands]
    sorts = []
    real_sort = np.sort
    monkeypatch.setattr(np, "sort", lambda a, *args, **kw: sorts.append(a.size) or real_sort(a, *args, **kw))
    on_w, on_sample = FitContext(w), FitContext(sample)
    shared = [fit(c, w, True, axis=0 if c.kind in ("uniform", "fixed") else None, context=on_w) for c in cands]
    shared += [fit(c, sample, False, None, 4.0, on_sample) for c in cands]
    for a, b in zip(alone, shared):
        assert a.candidate == b.candidate and a.axis == b.axis
        assert np.array_equal(np.asarray(a.params), np.asarray(b.params)), a.candidate
    assert sorted(sorts) == sorted([sample.size, w.size])  # one sort per tensor, not one per dead-zone candidate
    with pytest.raises(ValueError, match="another array"):
        fit(cands[0], w.copy(), True, context=on_w)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("bits", [2, 3, 8, 16])
def test_deadzone_codes_dequantize_to_the_quantizer_bit_for_bit(dtype, ratio, bits):
    from qcompiler.candidates import dequantize

    x = (0.3 * RNG.laplace(size=5000)).astype(dtype)
    x[:5] = (0.0, -0.0, 1e-30, -1e-30, 50.0)  # zeros of both signs, tiny values, one clipped
    f = fit(Candidate("deadzone", bits, ratio), x, True)
    expected = deadzone_quantize(x.astype(np.float64), *f.params, f.candidate.level_count).astype(dtype)
    got = dequantize(f, codes(f, x), x)
    assert got.dtype == dtype and np.array_equal(got.view(np.uint8), expected.view(np.uint8))


def _reference_codes_and_values(f, x):
    """The plain numpy expressions of algorithms.md §1 (``codes`` works in place; ``dequantize``
    of a dead-zone candidate works from the codes)."""
    from qcompiler.candidates import _scale_shape, code_range

    c, b, x64 = f.candidate, f.candidate.bits, x.astype(np.float64)
    shape = _scale_shape(x, f.axis)
    if c.kind == "uniform":
        levels = (1 << (b - 1)) - 1 if f.signed else (1 << b) - 1
        step = np.asarray(f.params, dtype=np.float64).reshape(shape) if f.axis is not None else f.params[0]
        q = np.clip(np.rint(x64 / step), -levels if f.signed else 0, levels).astype(np.int64)
        return q, (q.astype(np.float64) * step).astype(x.dtype)  # from the integer codes: no -0.0
    if c.kind == "deadzone":
        lam, delta = f.params
        k = (c.level_count - 1) // 2
        idx = np.clip(np.floor((np.abs(x64) - lam) / delta), 0, k - 1) + 1
        q = (np.sign(x64) * np.where(np.abs(x64) < lam, 0, idx)).astype(np.int64)
        return q, deadzone_quantize(x64, lam, delta, c.level_count).astype(x.dtype)
    fl = np.asarray(f.params, dtype=np.int64).reshape(shape) if f.axis is not None else int(f.params[0])
    lo, hi = code_range(b, f.signed)
    q = np.clip(np.rint(np.ldexp(x64, fl)), lo, hi).astype(np.int64)
    return q, np.ldexp(q.astype(np.float64), -fl).astype(x.dtype)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["uniform", "deadzone", "fixed"]), st.sampled_from([2, 3, 4, 8, 16]),
       st.sampled_from([np.float32, np.float64]), st.sampled_from([None, 0, 1, 2]), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_codes_and_values_are_the_plain_numpy_expressions_bit_for_bit(kind, bits, dtype, axis, signed, seed):
    from qcompiler.candidates import dequantize

    rng = np.random.default_rng(seed)
    x = (rng.laplace(size=(3, 5, 4)) * 10.0 ** rng.integers(-6, 4)).astype(dtype)
    x.flat[:4] = (0.0, -0.0, 1e-30, 2.5)
    if not signed:
        x = np.abs(x)
    axis = axis if kind != "deadzone" else None
    f = fit(Candidate(kind, bits, 0.3 if kind == "deadzone" else 0.0), x, signed, axis)
    q, values = codes(f, x), dequantize(f, codes(f, x), x)
    ref_q, ref_values = _reference_codes_and_values(f, x)
    assert q.dtype == np.int64 and np.array_equal(q, ref_q)
    assert values.dtype == dtype and np.array_equal(values.view(np.uint8), ref_values.view(np.uint8))
    # kept codes come back in the narrowest integer type: the same values
    narrow = q.astype(np.int32 if bits == 16 else np.int16)
    assert np.array_equal(dequantize(f, narrow, x).view(np.uint8), values.view(np.uint8))


@pytest.mark.parametrize("kind", ["uniform", "fixed"])
def test_codes_round_exact_ties_to_even(kind):
    # uniform 4-bit: max 0.875 gives the step 0.125; fixed 4-bit: max 0.75 gives FL 3 (steps of
    # 1/8): x = (j + 1/2)/8 are exact ties
    x = np.array([0.875 if kind == "uniform" else 0.75, 0.0625, 0.1875, 0.3125, -0.0625, -0.1875, -0.3125])
    f = fit(Candidate(kind, 4), x, True)
    assert codes(f, x)[1:].tolist() == [0, 2, 2, 0, -2, -2]


def test_sorted_and_direct_sse_agree():
    a = np.abs(RNG.normal(size=20000))
    s = np.sort(a)
    p1, p2 = np.concatenate(([0.0], np.cumsum(s))), np.concatenate(([0.0], np.cumsum(s * s)))
    for lam, delta, k in [(0.0, 0.1, 7), (0.4, 0.05, 127), (2.0, 1.0, 1)]:
        assert _deadzone_sse_sorted(s, p1, p2, lam, delta, k) == pytest.approx(_deadzone_sse(a, lam, delta, k), rel=1e-9)


def test_rate_fixture():
    # algorithms.md §1.10: N = 864, L = 3 (2 bits), code histogram (1/4, 1/2, 1/4)
    x = np.array([-1.0] * 216 + [0.0] * 432 + [1.0] * 216)
    f = fit(Candidate("uniform", 2), x, signed=True)
    assert sorted(np.unique(codes(f, x)).tolist()) == [-1, 0, 1]
    fixed, entropy, log2 = rates(f, x, 864)
    assert fixed == 1728 and entropy == pytest.approx(1296) and log2 == pytest.approx(1369.41, abs=0.01)


@pytest.mark.parametrize("candidate", candidate_set(bits=(1, 2, 4, 8, 16), deadzone_ratios=(0.3,)), ids=lambda c: c.label)
def test_entropy_rate_counts_codes_like_a_sort(candidate):
    # the rate counts codes by offset (bincount); the same counts in the same order as np.unique
    x = RNG.laplace(size=5_000)
    f = fit(candidate, x, signed=True)
    _, counts = np.unique(codes(f, x), return_counts=True)
    p = counts / counts.sum()
    assert rates(f, x, 5_000)[:2] == (5_000.0 * candidate.bits, 5_000 * float(-(p * np.log2(p)).sum()))


@pytest.mark.parametrize("candidate", candidate_set(bits=(2, 3, 4, 8), deadzone_ratios=(0.3,)), ids=lambda c: c.label)
def test_every_candidate_has_few_levels_and_bounded_error(candidate):
    w = RNG.normal(size=(16, 40)).astype(np.float32)
    f = fit(candidate, w, True, axis=0 if candidate.kind == "uniform" else None)
    q = apply(f, w)
    assert q.shape == w.shape and q.dtype == w.dtype
    per_row = [len(np.unique(r)) for r in q] if candidate.kind == "uniform" else [len(np.unique(q))]
    assert max(per_row) <= 2**candidate.bits
    assert np.mean((q - w) ** 2) < np.mean(w**2)


def test_more_bits_less_error_for_uniform_and_fixed():
    w = RNG.normal(size=4000)
    for kind in ("uniform", "fixed"):
        errors = [np.mean((apply(fit(Candidate(kind, b), w, True), w) - w) ** 2) for b in (3, 4, 5, 6, 8)]
        assert errors == sorted(errors, reverse=True)


def test_unsigned_activations_use_all_codes():
    x = RNG.uniform(0, 3, size=5000)
    f = fit(Candidate("uniform", 3), x, signed=False)
    assert set(np.unique(codes(f, x)).tolist()) == set(range(8))


def test_candidate_set_validation():
    assert [c.label for c in candidate_set(bits=(1, 2), kinds=("uniform", "deadzone"), deadzone_ratios=(0.5,))] == [
        "uniform:1", "uniform:2", "deadzone:2:r0.5"]
    with pytest.raises(ValueError, match="unknown quantizer kinds"):
        candidate_set(kinds=("kmeans",))
    with pytest.raises(ValueError, match="empty"):
        candidate_set(bits=(1,), kinds=("log",))


# --------------------------------------------------------------------------- explicit level counts (seed 000)
def test_dead_zones_with_explicit_level_counts_have_stable_labels():
    from qcompiler.candidates import deadzone_levels, parse_candidate

    c = deadzone_levels(41, 0.3)
    assert (c.bits, c.level_count, c.label) == (6, 41, "deadzone:L41:r0.3")
    assert parse_candidate("deadzone:L41:r0.3") == c and parse_candidate("deadzone:L65536:r0") == deadzone_levels(65536, 0.0)
    assert Candidate("deadzone", 4, 0.3).level_count == 15 and parse_candidate("deadzone:4:r0.3").levels == 0
    labels = [x.label for x in candidate_set(kinds=("deadzone", "uniform"), bits=(2,), deadzone_ratios=(0.1, 0.5),
                                             deadzone_levels_list=(5, 601))]
    assert labels == ["deadzone:L5:r0.1", "deadzone:L5:r0.5", "deadzone:L601:r0.1", "deadzone:L601:r0.5", "uniform:2"]


@pytest.mark.parametrize("make, message", [
    (lambda: Candidate("deadzone", 1, 0.0, 2), "level counts must be in 3..65536, got 2"),
    (lambda: Candidate("uniform", 3, 0.0, 5), "a level count is a dead-zone parameter"),
    (lambda: Candidate("deadzone", 4, 0.0, 41), "41 levels take 6 bits, not 4"),
    (lambda: __import__("qcompiler.candidates", fromlist=["x"]).deadzone_levels(65537, 0.1), "got 65537"),
    (lambda: __import__("qcompiler.candidates", fromlist=["x"]).parse_candidate("uniform:L5"), "malformed"),
])
def test_bad_level_counts_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_explicit_levels_follow_the_spec_fixture_and_rates():
    """algorithms.md §1.10: L = 5, λ = 0.25, δ = 0.5; L = 7 rounds 1.25 half away from zero;
    an even L has one code less than L (k = floor((L - 1) / 2))."""
    from qcompiler.candidates import Fitted, deadzone_levels, level_count

    x = np.array([0.2, 0.25, 0.7, 0.75, 3.0, -0.8])
    five = Fitted(deadzone_levels(5, 0.0), True, None, (0.25, 0.5))
    np.testing.assert_array_equal(five.apply(x), [0, 0.5, 0.5, 1.0, 1.0, -1.0])
    seven = Fitted(deadzone_levels(7, 0.0), True, None, (0.25, 0.5))
    assert seven.apply(np.array([1.25]))[0] == 1.5
    six = Fitted(deadzone_levels(6, 0.0), True, None, (0.25, 0.5))
    assert np.abs(codes(six, np.linspace(-9, 9, 101))).max() == 2
    fixed, _, log2 = rates(five, x, 864)
    assert fixed == 864 * 3 and log2 == pytest.approx(864 * np.log2(5)) and level_count(six) == 6
    assert level_count(fit(Candidate("uniform", 4), x, signed=True)) == 15
    assert level_count(fit(Candidate("uniform", 4), np.abs(x), signed=False)) == 16
    assert level_count(fit(Candidate("fixed", 4), x, signed=True)) == 16
    assert level_count(fit(Candidate("log", 4), x, signed=True)) == 15


def test_fitted_explicit_levels_use_every_code():
    from qcompiler.candidates import deadzone_levels

    x = RNG.laplace(size=20_000)
    f = fit(deadzone_levels(41, 0.3), x, signed=True)
    q = codes(f, x)
    assert q.min() == -20 and q.max() == 20 and np.mean(q == 0) == pytest.approx(0.3, abs=0.01)


def test_the_not_quantized_candidate():
    from qcompiler.candidates import not_quantized, parse_candidate

    none = not_quantized()
    assert none.label == "none" and parse_candidate("none") == none and none.bits == 32
    assert [c.label for c in candidate_set(kinds=("fixed", "none"), bits=(4,))] == ["fixed:4", "none"]
    x = RNG.normal(size=100).astype(np.float32)
    f = fit(none, x, signed=True)
    assert np.array_equal(f.apply(x), x) and rates(f, x, 100) == (3200.0, 3200.0, pytest.approx(100 * np.log2(1e8)))
    with pytest.raises(ValueError, match="unknown quantizer kinds"):
        candidate_set(kinds=("float",))
