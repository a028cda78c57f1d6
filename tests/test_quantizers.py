"""Fixed-point quantizer arithmetic: spec fixtures and property tests against ONNX semantics."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qcompiler.quantizers import (
    channel_absmax,
    code_range,
    dequantize_fixed,
    fake_quant_fixed,
    no_overflow_fl,
    quantize_fixed,
)


def test_seed_002_fixture_wl4_fl2():
    # algorithms.md §1.10: (wl, fl) = (4, 2), round half to even
    x = np.array([0.3, 5.0, -3.0, 0.375, 0.625])
    assert fake_quant_fixed(x, 4, 2).tolist() == [0.25, 1.75, -2.0, 0.5, 0.5]


def test_code_ranges():
    assert code_range(8) == (-128, 127)
    assert code_range(8, signed=False) == (0, 255)
    assert code_range(2) == (-2, 1)
    with pytest.raises(ValueError):
        code_range(0)


@pytest.mark.parametrize("absmax, wl, signed, fl", [(1.0, 8, True, 6), (0.99, 8, True, 7), (127.0, 8, True, 0),
                                                    (127.5, 8, True, -1), (255.0, 8, False, 0), (0.0, 8, True, 7),
                                                    (3e-3, 4, True, 11)])
def test_no_overflow_fl_cases(absmax, wl, signed, fl):
    assert no_overflow_fl(absmax, wl, signed) == fl


@given(
    absmax=st.floats(min_value=1e-30, max_value=1e30, allow_nan=False, allow_infinity=False),
    wl=st.integers(2, 16),
    signed=st.booleans(),
)
def test_no_overflow_fl_is_the_largest_that_fits(absmax, wl, signed):
    fl = no_overflow_fl(absmax, wl, signed)
    qmax = code_range(wl, signed)[1]
    assert math.ldexp(absmax, fl) <= qmax < math.ldexp(absmax, fl + 1)


@given(
    x=arrays(np.float32, st.integers(1, 64), elements=st.floats(-1e4, 1e4, width=32)),
    wl=st.integers(2, 16),
    fl=st.integers(-4, 20),
    signed=st.booleans(),
)
def test_codes_in_range_and_error_bounded(x, wl, fl, signed):
    q = quantize_fixed(x, wl, fl, signed)
    lo, hi = code_range(wl, signed)
    assert q.min() >= lo and q.max() <= hi
    xhat = dequantize_fixed(q, fl)
    inside = (x >= lo * 2.0**-fl) & (x <= hi * 2.0**-fl)
    assert np.all(np.abs(xhat[inside] - x[inside]) <= 2.0 ** (-fl - 1) + 1e-12)
    # round then clip equals saturate then round (the bounds lie on the grid)
    saturated = np.clip(x.astype(np.float64), lo * 2.0**-fl, hi * 2.0**-fl)
    assert np.array_equal(q, quantize_fixed(saturated, wl, fl, signed))


def _ort_quantize(x: np.ndarray, fl: int, signed: bool) -> np.ndarray:
    elem = onnx.TensorProto.INT8 if signed else onnx.TensorProto.UINT8
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None])],
        [onnx.helper.make_tensor_value_info("q", elem, [None])],
        [onnx.helper.make_tensor("s", onnx.TensorProto.FLOAT, [], [2.0**-fl]), onnx.helper.make_tensor("z", elem, [], [0])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    return ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]


@settings(max_examples=60, deadline=None)
@given(
    x=arrays(np.float32, st.integers(1, 64), elements=st.floats(-300, 300, width=32)),
    fl=st.integers(-2, 12),
    signed=st.booleans(),
)
def test_equals_onnx_quantize_linear(x, fl, signed):
    # 8-bit fixed point is exactly QuantizeLinear with scale 2**-fl and zero point 0
    assert np.array_equal(quantize_fixed(x, 8, fl, signed), _ort_quantize(x, fl, signed).astype(np.int64))


def test_ties_round_half_to_even():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])
    assert quantize_fixed(x, 8, 0).tolist() == [0, 2, 2, 0, -2, -2]


def test_per_channel_fractional_lengths():
    w = np.array([[0.9, -0.5], [3.0, 1.0]], dtype=np.float32)
    fl = np.array([7, 5])
    q = quantize_fixed(w, 8, fl, axis=0)
    assert q.tolist() == [[115, -64], [96, 32]]
    assert np.array_equal(dequantize_fixed(q, fl, axis=0), q * np.array([[2.0**-7], [2.0**-5]]))
    assert channel_absmax(w, 0).tolist() == [0.8999999761581421, 3.0]
    with pytest.raises(ValueError, match="need an axis"):
        quantize_fixed(w, 8, fl)
