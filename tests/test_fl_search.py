"""Fixed-point format search: seed 002 / Ristretto fixtures (algorithms.md §1.8, §5.7)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qcompiler.fl_search import (
    FLCache,
    compression_rate,
    fixed_error,
    fl_table,
    initial_wl_seed002,
    int_bits_seed002,
    ristretto_fl,
    search_fl_faithful,
)

RNG = np.random.default_rng(8)


def test_int_bits_table_and_initial_wl():
    assert [int_bits_seed002(v) for v in (0.7, 1.0, 2.5, 128.999)] == [2, 2, 3, 9]
    assert initial_wl_seed002(0.7) == 8


def test_ristretto_rule():
    # IL_params = ceil(log2 max) + 1; a max that is an exact power of two saturates by one step
    assert ristretto_fl(0.9, 8) == 7 and ristretto_fl(1.0, 8) == 7 and ristretto_fl(3.0, 8, parameters=False) == 6


def test_faithful_search_finds_the_exhaustive_mae_argmin_on_uniform_data():
    x = RNG.uniform(-1, 1, 20_000)
    scan = [fixed_error(x, 8, fl, "mae") for fl in range(-16, 17)]
    assert search_fl_faithful(x, 8) == int(np.argmin(scan)) - 16


def test_faithful_search_returns_mid_on_a_flat_curve():
    assert search_fl_faithful(np.zeros(100), 8) == 0


@settings(max_examples=40, deadline=None)
@given(
    arrays(np.float64, st.integers(4, 200),
           elements=st.one_of(st.just(0.0), st.floats(1e-3, 50), st.floats(-50, -1e-3))),
    st.integers(3, 12),
)
def test_fl_table_equals_exhaustive_search(x, wl):
    if not np.any(x):
        return
    fl, err = fl_table(x, wl)
    scan = {f: fixed_error(x, wl, f, "mse") for f in range(-30, 31)}
    assert err == pytest.approx(min(scan.values()), rel=1e-12, abs=1e-300)
    assert scan[fl] == pytest.approx(err, rel=1e-12, abs=1e-300)


def test_cache_equals_re_search_and_invalidates_on_change():
    cache = FLCache()
    w = RNG.normal(size=500)
    first = cache.lookup("w", w, 6)
    assert cache.lookup("w", w, 6) == first == fl_table(w, 6) and cache.misses == 1
    cache.lookup("w", w * 4, 6)
    assert cache.misses == 2
    cache.lookup("w", w, 6, "mae")
    assert cache.misses == 3


def test_target_reuses_fl_searches_across_trials():
    from qcompiler.data import ArrayDataset
    from qcompiler.ir import normalize
    from qcompiler.passes import CalibratePass, DetectLayersPass
    from qcompiler.targets import FixedPointTarget, TargetConfig
    from tests.conftest import make_model

    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 16] x) => (float[N, 4] y) {
        y = Gemm <transB = 1> (x, w)
    }
    """
    target = FixedPointTarget()
    model = normalize(make_model(text, {"w": RNG.normal(size=(4, 16)).astype(np.float32)}))
    DetectLayersPass()(model)
    CalibratePass(data=ArrayDataset({"x": RNG.normal(size=(8, 16)).astype(np.float32)}), show_progress=False)(model)
    for _ in range(3):
        for p in target.passes(TargetConfig(weight_bits=4, fl_rule="mse")):
            p(model.clone())
    assert target.fl_cache.misses == 4  # one search per channel, reused by the later trials


def test_compression_rate():
    assert compression_rate([4, 32], [100, 10]) == pytest.approx((400 + 320) / (32 * 110))
    assert compression_rate([], []) == 0.0


def test_fl_rules_in_the_assignment_pass():
    from qcompiler import annotations as ann
    from qcompiler.data import ArrayDataset
    from qcompiler.ir import normalize
    from qcompiler.passes import AssignFixedPointPass, CalibratePass, DetectLayersPass
    from tests.conftest import make_model

    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 16] x) => (float[N, 4] y) {
        y = Gemm <transB = 1> (x, w)
    }
    """
    w = RNG.laplace(size=(4, 16)).astype(np.float32)
    data = ArrayDataset({"x": RNG.normal(size=(8, 16)).astype(np.float32)})
    for rule in ("minmax", "mse", "mae", "seed002", "ristretto"):
        model = normalize(make_model(text, {"w": w}))
        for p in (DetectLayersPass(), CalibratePass(data=data, show_progress=False),
                  AssignFixedPointPass(weight_bits=4, fl_rule=rule)):
            p(model)
        fmt = ann.require(model.graph.initializers["w"], ann.FixedPoint)
        assert fmt.rule == rule and len(fmt.fl) == 4
        if rule == "mse":
            assert all(f == fl_table(w[c], 4)[0] for c, f in enumerate(fmt.fl))
    with pytest.raises(ValueError, match="fl_rule must be one of"):
        AssignFixedPointPass(fl_rule="guess")
