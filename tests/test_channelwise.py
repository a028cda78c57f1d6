"""Seed 001 channel-wise allocation: quantizers, table, online step, closed form (algorithms.md §4.7)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qcompiler import channelwise as cw

RNG = np.random.default_rng(9)
W_TOY = RNG.normal(size=(3, 4)).astype(np.float32)


def toy_backend(x: np.ndarray) -> np.ndarray:
    """A fixed random 1x1 conv (4 -> 3 channels), then global average pooling."""
    # float64 inside: per-sample results do not depend on the batch they are computed in
    out = np.einsum("oc,nchw->no", W_TOY.astype(np.float64), x.astype(np.float64)) / (x.shape[2] * x.shape[3])
    return out.astype(np.float32)


def _features(n=6):
    x = RNG.gamma(2.0, size=(n, 4, 5, 5)).astype(np.float32)
    x[:, 1] *= 3.0  # channels of different importance and range
    return x


def test_uniform_interval_quantizer_error_bound_and_degenerate_range():
    x = _features(3)
    n = np.array([1, 3, 7, 15])
    q = cw.uniform_intervals(x, n)
    mx, mn = x.max(axis=(1, 2, 3)), x.min(axis=(1, 2, 3))
    bound = (mx - mn)[:, None, None, None] / (2 * n[None, :, None, None])
    assert np.all(np.abs(q - x) <= bound * (1 + 1e-5) + 1e-6)
    for c, k in enumerate(n):
        assert all(len(np.unique(q[s, c])) <= k + 1 for s in range(3))
    flat = np.full((1, 4, 2, 2), 0.7, np.float32)
    assert np.array_equal(cw.uniform_intervals(flat, n), flat)


def test_log_quantizer_consistent_and_faithful_levels():
    x = _features(2)
    n = np.full(4, 7)
    for faithful in (False, True):
        q = cw.log_intervals(x, n, faithful)
        assert q.shape == x.shape and np.isfinite(q).all()
    mx, mn = x[0].max(), x[0].min()
    # consistent: codes never exceed n; faithful: the top value reaches rne(n / ln 2)
    m_consistent, m_faithful = math.log2(mx - mn + 1), math.log(mx - mn + 1)
    assert round(math.log2(mx - mn + 1) / m_consistent * 7) == 7
    assert round(math.log2(mx - mn + 1) / m_faithful * 7) == cw.log_levels_used(7) == 10


def test_dorefa_seed_is_flat_in_bits():
    x = np.linspace(0, 5, 1000, dtype=np.float32).reshape(1, 1, 10, 100)
    errs = [np.mean((cw.dorefa_seed(x, b) - x) ** 2) for b in (2, 4, 7)]
    assert max(errs) - min(errs) < 0.1 * max(errs)  # dominated by the clip at 0.9


def test_offline_table_invariants_and_equivalence_with_the_naive_loop():
    x = _features(3)
    bits = (2, 3, 4)
    tables = cw.offline_table(toy_backend, "uniform", x, bits)
    for b in bits:
        assert tables[b].shape == (3, 4)
        assert np.all(tables[b].sum(axis=1) == 4 * (2**b - 1)) and tables[b].min() >= 1
    assert np.all(tables[2] <= tables[3]) and np.all(tables[3] <= tables[4])
    naive = cw.offline_table_naive(toy_backend, "uniform", x, bits)
    for b in bits:
        assert np.array_equal(tables[b], naive[b])


def test_batched_single_channel_distortions_equal_looped():
    x = _features(4)
    ref = toy_backend(x)
    n = RNG.integers(1, 20, size=(4, 4))
    batched = cw.all_channel_distortions(toy_backend, cw.uniform_intervals, x, ref, n)
    for s in range(4):
        for c in range(4):
            counts = np.ones(4)
            counts[c] = n[s, c]
            variant = x[s : s + 1].copy()
            variant[0, c] = cw.uniform_intervals(x[s : s + 1], counts)[0, c]
            want = np.mean((toy_backend(variant).astype(np.float64) - ref[s : s + 1]) ** 2)
            assert batched[s, c] == pytest.approx(want, rel=1e-12, abs=1e-18)


def test_q001_6_float_round_off_drops_an_interval():
    rows = np.ones((5, 49))
    n = cw.table_allocation(rows, 2)
    assert np.all(n == 2)  # 1/49*49*3 = 2.9999999999999996 in float64
    assert 49 * 3 - n.sum() == 49


def test_online_allocation_spends_the_budget():
    x = _features(4)
    tables = cw.offline_table(toy_backend, "uniform", x, (3,))
    for reserve in (0, 2, 10):
        n = cw.online_allocation(toy_backend, "uniform", x, tables[3], 3, reserve=reserve)
        assert np.all(n.sum(axis=1) == 4 * 7) and n.min() >= 1
    # diff < 0: the table already exceeds the budget; no channel changes
    rich = np.full((2, 4), 10.0)
    rich[:, 0] = 0.0
    base = cw.table_allocation(rich, 2)
    assert base.sum() > 12
    assert np.array_equal(cw.online_allocation(toy_backend, "uniform", x[:2], rich, 2, reserve=3), np.tile(base, (2, 1)))


def test_dead_channel_scores():
    x = _features(1)[0]
    x[2] = 0.0
    scores = cw.priority_scores(x, 0.9, 0.1)
    assert np.isfinite(scores).all()
    assert np.isnan(cw.priority_scores(x, 0.9, 0.1, faithful=True)).any()  # Q001-8, kept in faithful mode


def test_closed_form_ratios():
    n = cw.closed_form_allocation(np.array([1.0, 8.0]), 300, "intervals")
    assert n.sum() == 300 and n[1] / n[0] == pytest.approx(2.0, rel=0.02)
    b = cw.closed_form_allocation(np.array([1.0, 8.0]), 300, "bits")
    assert b.sum() == 300 and b[1] / b[0] == pytest.approx(2 * math.sqrt(2), rel=0.02)
    with pytest.raises(ValueError, match="below"):
        cw.closed_form_allocation(np.ones(4), 3)


def test_greedy_marginal_equals_exhaustive_on_model_curves():
    w = np.array([0.5, 2.0, 7.0])
    budget = 12
    best = min(
        ((a, b, budget - a - b) for a in range(1, budget) for b in range(1, budget - a)),
        key=lambda n: sum(wi / ni**2 for wi, ni in zip(w, n)),
    )
    assert tuple(cw.closed_form_allocation(w, budget, "intervals")) == best


def test_allocation_beats_uniform_on_unequal_channels():
    x_table, x_eval = _features(6), _features(10)
    report, _, gains = cw.evaluate(toy_backend, "uniform", x_table, x_eval, bits=(2, 3), reserve=2)
    assert report.allocated[0] < report.uniform[0]
    assert gains.shape == (4,) and np.all(gains > 0)
