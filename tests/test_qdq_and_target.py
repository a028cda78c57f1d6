"""QDQ lowering of fixed-point annotations and the fixed-point target."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qcompiler import annotations as ann
from qcompiler.data import ArrayDataset
from qcompiler.errors import TargetError
from qcompiler.graph import values_by_name
from qcompiler.ir import normalize
from qcompiler.passes import AssignFixedPointPass, CalibratePass, DetectLayersPass
from qcompiler.qdq import lower_to_qdq
from qcompiler.quantizers import quantize_fixed
from qcompiler.runtime import Runner, float_runner, is_float_graph
from qcompiler.targets import FixedPointTarget, get_target
from qcompiler.errors import QCompilerError
from tests.conftest import make_model

TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 2, 6, 6] x) => (float[N, 5] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    r = Relu (c)
    p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r)
    f = Flatten (p)
    y = Gemm <transB = 1> (f, w2, b2)
}
"""
RNG = np.random.default_rng(7)
INITS = {
    "w": RNG.normal(0, 0.5, size=(4, 2, 3, 3)).astype(np.float32),
    "b": RNG.normal(0, 0.1, size=4).astype(np.float32),
    "w2": RNG.normal(0, 0.2, size=(5, 36)).astype(np.float32),
    "b2": RNG.normal(0, 0.1, size=5).astype(np.float32),
}
X = RNG.normal(size=(32, 2, 6, 6)).astype(np.float32)


def _annotated(weight_bits=8, activation_bits=8, per_channel=True):
    model = normalize(make_model(TEXT, INITS))
    for p in (DetectLayersPass(), CalibratePass(data=ArrayDataset({"x": X})),
              AssignFixedPointPass(weight_bits=weight_bits, activation_bits=activation_bits, per_channel=per_channel)):
        p(model)
    return model


def test_formats_hold_the_calibrated_range_without_overflow():
    model = _annotated()
    values = values_by_name(model.graph)
    x_fmt = ann.get(values["x"], ann.FixedPoint)
    assert x_fmt.signed and x_fmt.wl == 8
    assert np.abs(X).max() * 2.0**x_fmt.fl <= 127 < np.abs(X).max() * 2.0 ** (x_fmt.fl + 1)
    f_fmt = ann.get(values["f"], ann.FixedPoint)
    assert not f_fmt.signed  # after ReLU: unsigned, full 8 bits
    w_fmt = ann.get(values["w"], ann.FixedPoint)
    assert w_fmt.axis == 0 and len(w_fmt.fl) == 4
    b_fmt = ann.get(values["b"], ann.FixedPoint)
    assert b_fmt.wl == 32 and b_fmt.fl == tuple(x_fmt.fl + f for f in w_fmt.fl)


def test_qdq_model_is_valid_and_reproduces_the_integer_codes():
    model = _annotated()
    qdq = lower_to_qdq(model)
    onnx.checker.check_model(ir.to_proto(qdq), full_check=True)
    assert "DequantizeLinear" in [n.op_type for n in qdq.graph]
    assert [n.op_type for n in model.graph] == ["Conv", "Relu", "MaxPool", "Flatten", "Gemm"]  # input untouched
    inits = qdq.graph.initializers
    w_fmt = ann.get(model.graph.initializers["w"], ann.FixedPoint)
    codes = inits["w_quantized"].const_value.numpy()
    assert codes.dtype == np.int8
    assert np.array_equal(codes, quantize_fixed(INITS["w"], 8, np.array(w_fmt.fl), axis=0))
    assert inits["b_quantized"].const_value.numpy().dtype == np.int32
    assert np.array_equal(inits["w_scale"].const_value.numpy(), np.ldexp(1.0, -np.array(w_fmt.fl)).astype(np.float32))
    # DequantizeLinear output is exactly codes * 2**-fl
    out = Runner(qdq, ["w_dequantized"]).run({"x": X[:1]})["w_dequantized"]
    assert np.array_equal(out, codes * np.ldexp(1.0, -np.array(w_fmt.fl)).reshape(-1, 1, 1, 1).astype(np.float32))


@pytest.mark.parametrize("bits", [2, 3, 5, 7])
def test_sub_8_bit_activations_use_clip_and_limit_the_levels(bits):
    model = _annotated(activation_bits=bits)
    qdq = lower_to_qdq(model)
    assert "Clip" in [n.op_type for n in qdq.graph]
    out = Runner(qdq, ["f_dequantized"]).run({"x": X})["f_dequantized"]
    assert len(np.unique(out)) <= 2**bits


def test_quantized_outputs_are_close_to_float_at_8_bits():
    model = _annotated()
    ref = Runner(normalize(make_model(TEXT, INITS))).run({"x": X})["y"]
    got = Runner(lower_to_qdq(model)).run({"x": X})["y"]
    sqnr = 10 * np.log10(np.sum(ref**2) / np.sum((ref - got) ** 2))
    assert sqnr > 30


def test_float_runner_optimises_float_graphs_only():
    """Calibration's sessions: onnxruntime's graph optimisations on a float model (its values
    move at float rounding level only), none on a Q/DQ model, whose literal run is the simulation."""
    level = ort.GraphOptimizationLevel
    float_model = normalize(make_model(TEXT, INITS))
    qdq = lower_to_qdq(_annotated())
    assert is_float_graph(float_model) and not is_float_graph(qdq)
    fast = float_runner(float_model, ["c"])
    assert fast.session.get_session_options().graph_optimization_level == level.ORT_ENABLE_ALL
    literal = float_runner(qdq)
    assert literal.session.get_session_options().graph_optimization_level == level.ORT_DISABLE_ALL
    plain = Runner(float_model, ["c"])
    for name in ("c", "y"):
        np.testing.assert_allclose(fast.run({"x": X})[name], plain.run({"x": X})[name], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(literal.run({"x": X})["y"], Runner(qdq).run({"x": X})["y"])


def test_profiling_sessions_return_their_memory_after_each_run():
    """One suffix session per profiled tensor stays open: without onnxruntime's arena each run
    gives its memory back (ResNet-18, 4 images: peak 9.5 -> 7.0 GB), with the same values."""
    from qcompiler.suffix import build_suffix

    model = normalize(make_model(TEXT, INITS))
    suffix = build_suffix(model, ir.to_proto(model), "r")
    assert not suffix.runner.session.get_session_options().enable_cpu_mem_arena
    assert Runner(model).session.get_session_options().enable_cpu_mem_arena
    r = Runner(model, ["r"]).run({"x": X})["r"]
    np.testing.assert_array_equal(suffix.run({"r": r})["y"], Runner(model).run({"x": X})["y"])


def test_quantization_operators_in_a_local_function_keep_a_graph_unoptimised():
    from onnx import TensorProto, helper

    def calling(body: list) -> ir.Model:
        scale = helper.make_node("Constant", [], ["s"], value=helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]))
        function = helper.make_function("local", "f", ["x"], ["y"], [scale, *body], [helper.make_opsetid("", 17)])
        io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("x", "y")]
        graph = helper.make_graph([helper.make_node("f", ["x"], ["y"], domain="local")], "g", io[:1], io[1:])
        return ir.from_proto(helper.make_model(graph, functions=[function], opset_imports=[
            helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]))

    fake_quant = [helper.make_node("QuantizeLinear", ["x", "s"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s"], ["y"])]
    assert not is_float_graph(calling(fake_quant))
    assert is_float_graph(calling([helper.make_node("Mul", ["x", "s"], ["y"])]))


def test_per_tensor_weights():
    model = _annotated(per_channel=False)
    fmt = ann.get(model.graph.initializers["w"], ann.FixedPoint)
    assert fmt.axis is None and isinstance(fmt.fl, int)
    Runner(lower_to_qdq(model)).run({"x": X[:2]})


def test_target_validate_names_node_and_rule():
    model = _annotated()
    ann.remove(model.graph.initializers["w2"], ann.FixedPoint)
    with pytest.raises(TargetError, match=r"node '.*' \(Gemm\): weight 'w2' has no fixed-point format"):
        FixedPointTarget().validate(model)


def test_target_registry():
    assert isinstance(get_target("fixed-point"), FixedPointTarget)
    with pytest.raises(QCompilerError, match="unknown target 'tpu' \\(known: fixed-point, max78000\\)"):
        get_target("tpu")


def test_bad_bit_widths_are_refused():
    with pytest.raises(ValueError, match=r"weight_bits must be in 1\.\.16"):
        AssignFixedPointPass(weight_bits=0)
    with pytest.raises(ValueError, match=r"activation_bits must be in 2\.\.16"):
        AssignFixedPointPass(activation_bits=1)
