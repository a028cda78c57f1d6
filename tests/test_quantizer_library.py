"""The quantizer library: uniform grids, unsigned activations (seed 000), power of two, DoReFa."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qcompiler.quantizers import (
    asymmetric_params,
    dequantize_uniform,
    dorefa,
    fit_unsigned_activation,
    fit_unsigned_activation_faithful,
    power_of_two,
    quantize_uniform,
    symmetric_params,
    uniform_grid,
    unsigned_activation,
)

FINITE = st.floats(-1e3, 1e3, allow_nan=False, width=32)


def test_grids():
    assert uniform_grid(4, "signed") == (-8, 7)
    assert uniform_grid(4, "narrow") == (-7, 7)
    assert uniform_grid(4, "unsigned") == (0, 15)
    with pytest.raises(ValueError):
        uniform_grid(4, "ternary")


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.integers(2, 64), elements=FINITE), st.integers(2, 8), st.booleans())
def test_symmetric_codes_in_range_and_error_half_step(x, bits, narrow):
    scale, zero = symmetric_params(x, bits, narrow)
    lo, hi = uniform_grid(bits, "narrow" if narrow else "signed")
    q = quantize_uniform(x, scale, zero, lo, hi)
    assert q.min() >= lo and q.max() <= hi and zero == 0
    assert np.all(np.abs(dequantize_uniform(q, scale, zero) - x) <= scale / 2 * (1 + 1e-9) + 1e-12)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.integers(2, 64), elements=FINITE), st.integers(2, 8))
def test_asymmetric_keeps_zero_exact_and_covers_the_range(x, bits):
    scale, zero = asymmetric_params(x, bits)
    lo, hi = uniform_grid(bits, "unsigned")
    assert lo <= zero <= hi
    assert dequantize_uniform(quantize_uniform(np.zeros(1), scale, zero, lo, hi), scale, zero)[0] == 0.0
    q = quantize_uniform(x, scale, zero, lo, hi)
    assert np.all(np.abs(dequantize_uniform(q, scale, zero) - x) <= scale * (1 + 1e-6))


def _ort_qdq(x, scale, zero, dtype):
    elem = onnx.TensorProto.UINT8 if dtype == np.uint8 else onnx.TensorProto.INT8
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None])],
        [onnx.helper.make_tensor_value_info("q", elem, [None])],
        [onnx.helper.make_tensor("s", onnx.TensorProto.FLOAT, [], [scale]), onnx.helper.make_tensor("z", elem, [], [zero])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    return ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0].astype(np.int64)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, st.integers(2, 64), elements=FINITE))
@example(np.array([1e-45, 0.0], dtype=np.float32))  # a range whose float32 scale would underflow to 0
def test_asymmetric_uint8_equals_onnx_quantize_linear(x):
    scale, zero = asymmetric_params(x, 8)
    scale32 = float(np.float32(scale))  # ONNX stores the scale in float32
    # onnxruntime divides in float32 before rounding; with a float32 scale our float64 division
    # rounds to the same integer except at exact float32 ties, which this data does not hit
    ours = quantize_uniform(x.astype(np.float32) / np.float32(scale32), 1.0, zero, 0, 255)
    assert np.array_equal(ours, _ort_qdq(x, scale32, zero, np.uint8))


def test_unsigned_activation_fixture():
    # algorithms.md §1.10: x_i = (i + 1/2)/1e4, L = 5
    x = (np.arange(10_000) + 0.5) / 1e4
    faithful = fit_unsigned_activation_faithful(x, 5)
    assert faithful == pytest.approx(0.49873, abs=1e-5)
    yf = unsigned_activation(x, faithful, 5)
    assert sorted(set(np.rint(yf / faithful).astype(int))) == [0, 1, 2]
    assert np.mean((yf - x) ** 2) == pytest.approx(0.02067, abs=1e-5)
    recommended = fit_unsigned_activation(x, 5)
    yr = unsigned_activation(x, recommended, 5)
    assert sorted(set(np.rint(yr / recommended).astype(int))) == [0, 1, 2, 3, 4]
    assert np.mean((yr - x) ** 2) == pytest.approx(0.00412, abs=2e-5)
    assert 0.221 < recommended < 0.2235


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.integers(1, 64), elements=st.floats(-100, 100)), st.integers(-6, 0), st.integers(0, 6))
def test_power_of_two_levels(x, e_min, span):
    e_max = e_min + span
    y = power_of_two(x, e_min, e_max)
    nz = y[y != 0]
    assert np.all(np.isin(np.abs(nz), 2.0 ** np.arange(e_min, e_max + 1)))
    assert np.all((y == 0) == (np.abs(x) < 2.0 ** (e_min - 1)))
    assert np.all(np.sign(nz) == np.sign(x[y != 0]))


def test_dorefa_standard():
    x = np.array([-1.0, 0.0, 0.26, 0.5, 0.9, 2.0])
    assert dorefa(x, 2).tolist() == pytest.approx([0, 0, 1 / 3, 2 / 3, 1.0, 1.0])
    assert dorefa(x, 2, clip=0.5).tolist() == pytest.approx([0, 0, 1 / 3, 0.5, 0.5, 0.5])  # 0.26/0.5*3 = 1.56 -> 2
