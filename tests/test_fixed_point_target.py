"""The fixed-point target: integer simulator, integer package, native INT4, keep-float, mixed precision."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import onnx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from typer.testing import CliRunner

from qcompiler import annotations as ann
from qcompiler.api import CompileConfig, compile_model
from qcompiler.cli import app
from qcompiler.data import ArrayDataset
from qcompiler.errors import QCompilerError, TargetError, UnsupportedOpError
from qcompiler.graph import values_by_name
from qcompiler.ir import normalize
from qcompiler.passes import AssignFixedPointPass, CalibratePass, DetectLayersPass
from qcompiler.qdq import fixed_codes, lower_to_qdq
from qcompiler.quantizers import quantize_fixed
from qcompiler.runtime import Runner
from qcompiler.targets import TargetConfig
from qcompiler.targets.fixed_point import FixedPointTarget
from qcompiler.targets.fixed_point.check import check_integer_simulator
from qcompiler.targets.fixed_point.package import integer_package
from qcompiler.targets.fixed_point.simulator import Fixed, IntegerSimulator, requantize, round_shift
from tests.conftest import DIGITS, GOLDEN, make_model

# Every op of the integer op set, with per-channel weight FLs, padding, a residual Add of two
# different FLs, both AveragePool divisors, a Concat of different FLs and a constant MatMul.
ALL_OPS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3, 8, 8] x) => (float[N, 6] y, float[N, 4] z) {
    c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    r1 = Relu (c1)
    c2 = Conv <pads = [1, 1, 1, 1]> (r1, w2, b2)
    s = Add (c2, c1)
    d = Sub (s, r1)
    m = MaxPool <kernel_shape = [2, 2], strides = [2, 2], pads = [0, 0, 1, 1]> (d)
    a = AveragePool <kernel_shape = [3, 3], strides = [1, 1], pads = [1, 1, 1, 1]> (d)
    a2 = AveragePool <kernel_shape = [2, 2], strides = [2, 2], count_include_pad = 1, pads = [1, 1, 0, 0]> (a)
    k = Concat <axis = 1> (m, a2)
    c3 = Conv <strides = [2, 2]> (k, w3, b3)
    t = Transpose <perm = [0, 1, 3, 2]> (c3)
    gp = GlobalAveragePool (t)
    f = Flatten (gp)
    y = Gemm <transB = 1> (f, w4, b4)
    r = Reshape (c3, shape)
    z = MatMul (r, w5)
}
"""


def _inits(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "w1": (rng.normal(0, 0.4, (4, 3, 3, 3)) * rng.uniform(0.05, 2.0, (4, 1, 1, 1))).astype(np.float32),
        "b1": rng.normal(0, 0.2, 4).astype(np.float32),
        "w2": rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32),
        "b2": rng.normal(0, 0.2, 4).astype(np.float32),
        "w3": rng.normal(0, 0.3, (8, 8, 2, 2)).astype(np.float32),
        "b3": rng.normal(0, 0.1, 8).astype(np.float32),
        "w4": rng.normal(0, 0.5, (6, 8)).astype(np.float32),
        "b4": rng.normal(0, 0.1, 6).astype(np.float32),
        "shape": np.array([0, -1], dtype=np.int64),
        "w5": rng.normal(0, 0.2, (32, 4)).astype(np.float32),
    }


def _annotate(text: str, inits: dict, x: np.ndarray, weight_bits: int, activation_bits: int):
    model = normalize(make_model(text, inits))
    for p in (DetectLayersPass(), CalibratePass(data=ArrayDataset({"x": x}), show_progress=False),
              AssignFixedPointPass(weight_bits=weight_bits, activation_bits=activation_bits)):
        p(model)
    return model


@pytest.mark.parametrize("weight_bits,activation_bits", [(8, 8), (4, 8), (2, 3), (1, 5), (5, 12), (3, 15)])
def test_integer_simulator_equals_the_qdq_model_exactly(weight_bits, activation_bits):
    rng = np.random.default_rng(weight_bits * 100 + activation_bits)
    x = rng.normal(0, 1.5, (40, 3, 8, 8)).astype(np.float32)
    model = _annotate(ALL_OPS, _inits(rng), x, weight_bits, activation_bits)
    qdq = lower_to_qdq(model)
    check = check_integer_simulator(model, qdq, ArrayDataset({"x": x}), batch_size=16)
    assert check.samples == 40 and check.quantizers == 5  # x, r1, k, f, r (MatMul input)
    assert check.codes_compared > 0
    assert check.exact, check
    assert check.float32_risks == ()


def test_sixteen_bit_layers_beyond_float32_are_named():
    """W16A16 accumulators exceed 2^24: onnxruntime's float32 sums may round there, the
    integer simulator does not; the check names those layers instead of claiming exactness."""
    rng = np.random.default_rng(16)
    x = rng.normal(0, 1.5, (16, 3, 8, 8)).astype(np.float32)
    model = _annotate(ALL_OPS, _inits(rng), x, 16, 16)
    check = check_integer_simulator(model, lower_to_qdq(model), ArrayDataset({"x": x}))
    layers = {n.name for n in model.graph if ann.get(n, ann.QuantizableLayer) is not None}
    assert set(check.float32_risks) == layers
    # off by at most one code where float32 rounded
    assert check.codes_mismatched < 0.01 * check.codes_compared


def test_simulator_drops_each_state_after_its_last_reader():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 3, 8, 8)).astype(np.float32)
    model = _annotate(ALL_OPS, _inits(rng), x, 8, 8)
    simulator = IntegerSimulator(model)
    nodes = simulator.nodes
    reads = [{v.name for v in node.inputs if v is not None and v.name} for node in nodes]
    released = {name: i for i, names in enumerate(simulator._release_after) for name in names}
    outputs = {v.name for v in model.graph.outputs}
    for node_reads in reads:
        for name in node_reads - outputs - set(simulator.constants):
            assert released[name] == max(j for j, r in enumerate(reads) if name in r)  # after its last reader
    assert not (set(released) & (outputs | set(simulator.constants)))
    assert "x" in released and len(released) >= len(nodes) - 1  # every intermediate state goes


def test_simulator_outputs_are_integers_times_the_accumulator_scale():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 3, 8, 8)).astype(np.float32)
    model = _annotate(ALL_OPS, _inits(rng), x, 8, 8)
    outputs, codes = IntegerSimulator(model).run({"x": x})
    values = values_by_name(model.graph)
    fmt_k = ann.get(values["k"], ann.FixedPoint)
    lo, hi = fmt_k.code_range()
    assert codes["k"].dtype == np.int64 and lo <= codes["k"].min() and codes["k"].max() <= hi
    w4 = ann.get(values["w4"], ann.FixedPoint)
    f_fmt = ann.get(values["f"], ann.FixedPoint)
    acc_fl = f_fmt.fl + max(w4.fl)
    scaled = outputs["y"].astype(np.float64) * 2.0**acc_fl
    assert np.array_equal(scaled, np.rint(scaled))  # the Gemm output is an exact accumulator


def test_float32_risk_is_reported_for_huge_accumulators():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4096] x) => (float[N, 2] y) {
        y = Gemm <transB = 1> (x, w, b)
    }
    """
    rng = np.random.default_rng(0)
    inits = {"w": rng.normal(size=(2, 4096)).astype(np.float32), "b": np.zeros(2, np.float32)}
    x = rng.normal(size=(4, 4096)).astype(np.float32)
    model = _annotate(text, inits, x, 16, 16)
    assert IntegerSimulator(model).float32_risks == [model.graph.node(0).name]


@given(q=st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=20), shift=st.integers(-8, 30))
@example(q=[5, 7, -5, -7, 6, -6], shift=1)  # ties both ways
def test_round_shift_is_round_half_to_even(q, shift):
    arr = np.asarray(q, dtype=np.int64)
    got = round_shift(arr, shift)
    expected = [int(np.rint(v / 2.0**shift)) if shift > 0 else v << -shift for v in q]
    # float division is exact for these magnitudes, so np.rint is the reference
    assert got.tolist() == expected


@given(q=st.lists(st.integers(-(2**20), 2**20), min_size=1, max_size=20), fl=st.integers(0, 20),
       wl=st.integers(2, 16), fl_y=st.integers(-4, 12), signed=st.booleans())
def test_integer_requantization_equals_quantize_linear(q, fl, wl, fl_y, signed):
    x = Fixed(np.asarray(q, dtype=np.int64), fl)
    fmt = ann.FixedPoint(wl=wl, fl=fl_y, signed=signed, axis=None)
    from_int = requantize(x, fmt).q
    from_float = quantize_fixed(x.to_float32(), wl, fl_y, signed)  # ONNX QuantizeLinear semantics
    assert from_int.tolist() == from_float.astype(np.int64).tolist()


# --------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("fixed") / "digits"
    config = CompileConfig(calib=DIGITS / "calib.npz", eval=DIGITS / "eval.npz", show_progress=False)
    result = compile_model(DIGITS / "digits_cnn.onnx", "fixed-point", config, out)
    return out, result


def test_digits_integer_simulator_is_exact_on_the_whole_eval_set(digits_out, digits_eval):
    _, result = digits_out
    check = check_integer_simulator(result.model, result.simulation_model, ArrayDataset(digits_eval))
    assert check.samples == 540 and check.quantizers == 5 and check.exact
    report = result.report["target_details"]["integer_simulator"]
    assert report["exact"] and report["codes_mismatched"] == 0 and report["samples"] == 256


def test_package_matches_the_qdq_model(digits_out):
    out, result = digits_out
    manifest = json.loads((out / "model.int.json").read_text())
    values = values_by_name(result.model.graph)
    qdq_inits = {v.name: v.const_value.numpy() for v in result.simulation_model.graph.initializers.values()}
    with np.load(out / "model.int.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    assert [layer["op"] for layer in manifest["layers"]] == ["Conv", "Conv", "Conv", "Gemm", "Gemm"]
    for layer in manifest["layers"]:
        w = arrays[layer["weight"]["array"]]
        assert w.dtype == np.int8
        assert np.array_equal(w, qdq_inits[f"{layer['weight']['name']}_quantized"])  # the emitted codes
        fmt = ann.get(values[layer["weight"]["name"]], ann.FixedPoint)
        assert layer["weight"]["fl"] == list(fmt.fl)
        b = arrays[layer["bias"]["array"]]
        assert b.dtype == np.int32 and layer["bias"]["fl"] == layer["accumulator_fl"]
        x_fl = layer["input"]["fl"]
        assert layer["accumulator_fl"] == [x_fl + f for f in layer["weight"]["fl"]]
        for req in layer["requantize"]:
            y_fl = ann.get(values[req["to"]], ann.FixedPoint).fl
            assert req["shift"] == [a - y_fl for a in layer["accumulator_fl"]]
    # layer 0 feeds relu's quantizer through Relu; the last Gemm feeds the graph output only
    assert manifest["layers"][0]["requantize"][0]["through"] == ["Relu"]
    assert manifest["layers"][-1]["requantize"] == []


def test_package_golden(digits_out, update_golden):
    """Manifest (formats, shifts, attributes) and a digest of every integer array."""
    import hashlib

    out, _ = digits_out
    golden = GOLDEN / "digits_fixed_point_package.json"
    with np.load(out / "model.int.npz") as npz:
        digests = {k: f"{npz[k].dtype}{list(npz[k].shape)}:{hashlib.sha256(npz[k].tobytes()).hexdigest()[:16]}"
                   for k in sorted(npz.files)}
    current = {"manifest": json.loads((out / "model.int.json").read_text()), "arrays": digests}
    if update_golden:
        golden.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    assert current == json.loads(golden.read_text())


def test_c_header_compiles_and_holds_the_arrays(digits_out, tmp_path):
    out, _ = digits_out
    header = (out / "digits_cnn_int.h").read_text()
    manifest = json.loads((out / "model.int.json").read_text())
    with np.load(out / "model.int.npz") as npz:
        w0 = npz["L000.weight"]
    assert f"static const int8_t L000_weight[{w0.size}] = {{" in header
    assert f"#define QC_NUM_LAYERS {len(manifest['layers'])}" in header
    assert f"#define L000_INPUT_FL {manifest['layers'][0]['input']['fl']}" in header
    first = header.split("L000_weight[")[1].split("{")[1].split("}")[0]
    assert [int(v) for v in first.replace("\n", " ").split(",")] == w0.reshape(-1).tolist()
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler on this machine")
    src = tmp_path / "main.c"
    src.write_text(
        f'#include "{out / "digits_cnn_int.h"}"\n'
        "int main(void) { return (QC_NUM_LAYERS == 5 && sizeof(L000_weight) == "
        f"{w0.size} && L004_bias[0] == {int(np.load(out / 'model.int.npz')['L004.bias'][0])}) ? 0 : 1; }}\n"
    )
    subprocess.run([compiler, "-std=c99", "-Wall", "-Werror", "-o", str(tmp_path / "main"), str(src)], check=True)
    assert subprocess.run([str(tmp_path / "main")]).returncode == 0


def test_c_arrays_are_sixteen_values_a_line_with_the_rest_on_the_last():
    from qcompiler.targets.fixed_point.package import _c_array

    text = _c_array("w", np.arange(-10, 25, dtype=np.int16).reshape(5, 7))
    lines = text.splitlines()
    assert lines[0] == "static const int16_t w[35] = {" and lines[-1] == "};"
    assert [line.count(",") for line in lines[1:-1]] == [16, 16, 2]  # 16, 16 and 3 values; the first two end in ","
    assert [int(v) for v in "".join(lines[1:-1]).split(",")] == list(range(-10, 25))
    assert _c_array("e", np.zeros(0, np.int8)) == "static const int8_t e[1] = {\n    0\n};\n"
    assert _c_array("u", np.array([255, 0], np.uint8)) == "static const uint8_t u[2] = {\n    255, 0\n};\n"


# --------------------------------------------------------------------------- options


def test_native_int4_weights_are_smaller_and_compute_the_same(digits_calib, digits_eval):
    config = CompileConfig(calib=digits_calib, target=TargetConfig(weight_bits=4), show_progress=False)
    plain = compile_model(DIGITS / "digits_cnn.onnx", "fixed-point", config)
    packed = compile_model(DIGITS / "digits_cnn.onnx", "fixed-point",
                           CompileConfig(calib=digits_calib, target=TargetConfig(weight_bits=4, native_int4=True),
                                         show_progress=False))
    p_proto = onnx.load_from_string(_to_bytes(packed.simulation_model))
    assert p_proto.opset_import[0].version == 21 and p_proto.ir_version >= 10
    int4 = [i for i in p_proto.graph.initializer if i.data_type == onnx.TensorProto.INT4]
    assert len(int4) == 5 * 2  # five weights and their zero points
    onnx.checker.check_model(p_proto)
    assert len(_to_bytes(packed.simulation_model)) < len(_to_bytes(plain.simulation_model)) - 20_000
    x = {"x": digits_eval["x"][:64]}
    name = plain.simulation_model.graph.outputs[0].name
    assert np.array_equal(Runner(plain.simulation_model).run(x)[name], Runner(packed.simulation_model).run(x)[name])


def _to_bytes(model) -> bytes:
    from qcompiler.ir import to_bytes

    return to_bytes(model)


def test_unrepresentable_op_is_named_and_keep_float_leaves_it_in_float():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 8] x) => (float[N, 4] y) {
        h = Gemm <transB = 1> (x, w1, b1)
        s = Sigmoid (h)
        y = Gemm <transB = 1> (s, w2, b2)
    }
    """
    rng = np.random.default_rng(1)
    inits = {"w1": rng.normal(size=(6, 8)).astype(np.float32), "b1": rng.normal(size=6).astype(np.float32),
             "w2": rng.normal(size=(4, 6)).astype(np.float32), "b2": rng.normal(size=4).astype(np.float32)}
    data = {"x": rng.normal(size=(32, 8)).astype(np.float32)}
    model = normalize(make_model(text, inits))
    with pytest.raises(UnsupportedOpError, match=r"node '.*' \(Sigmoid\): the fixed-point target cannot represent Sigmoid"):
        compile_model(model, "fixed-point", CompileConfig(calib=data, show_progress=False))
    # the verdict comes before any data is read: calibration data that does not exist is not reached
    with pytest.raises(UnsupportedOpError, match=r"\(Sigmoid\)"):
        compile_model(model, "fixed-point", CompileConfig(calib="no-such-file.npz", show_progress=False))
    with pytest.raises(QCompilerError, match="no-such-file.npz"):  # kept in float: the data is read, and missing
        compile_model(model, "fixed-point", CompileConfig(calib="no-such-file.npz", show_progress=False,
                                                          target=TargetConfig(keep_float=("Sigmoid",))))
    for keep in (("Sigmoid",), ("unsupported",)):
        result = compile_model(model, "fixed-point", CompileConfig(calib=data, eval=data, target=TargetConfig(keep_float=keep),
                                                                   show_progress=False))
        assert result.report["target_details"]["integer_simulator"]["exact"]
    second = [n.name for n in model.graph if n.op_type == "Gemm"][1]
    kept = compile_model(model, "fixed-point", CompileConfig(calib=data, target=TargetConfig(keep_float=("Sigmoid", second)),
                                                             show_progress=False))
    gemms = [n for n in kept.model.graph if n.op_type == "Gemm"]
    assert ann.get(gemms[0], ann.QuantizableLayer) is not None and ann.get(gemms[1], ann.QuantizableLayer) is None
    with pytest.raises(QCompilerError, match="--keep-float 'Softmax' is neither a node name nor an op type"):
        compile_model(model, "fixed-point", CompileConfig(calib=data, target=TargetConfig(keep_float=("Softmax",)),
                                                          show_progress=False))


def test_non_power_of_two_weight_scales_are_refused():
    model = _annotate(ALL_OPS, _inits(np.random.default_rng(0)), np.random.default_rng(0).normal(size=(4, 3, 8, 8)).astype(np.float32), 8, 8)
    values = values_by_name(model.graph)
    w = values["w4"]
    codes = fixed_codes(w, ann.get(w, ann.FixedPoint)).astype(np.float32)
    ann.remove(w, ann.FixedPoint)
    from qcompiler.graph import set_initializer

    set_initializer(model.graph, w, codes * np.float32(0.3))
    ann.set(w, ann.IntegerWeights(bits=8, q_min=-128, q_max=127, scales=(0.3,), axis=None, method="gpfq", grid="int"))
    with pytest.raises(TargetError, match=r"weight 'w4': scale 0.3 is not a power of two"):
        integer_package(model)


def test_mixed_precision_from_the_allocator_is_emitted_exactly(digits_calib, digits_eval):
    config = CompileConfig(calib={"x": digits_calib["x"][:128]}, eval={"x": digits_eval["x"][:128], "labels": digits_eval["labels"][:128]},
                           target=TargetConfig(avg_bits=4.0, allocate_scope="all"), show_progress=False)
    result = compile_model(DIGITS / "digits_cnn.onnx", "fixed-point", config)
    rows = result.report["layers"]
    weight_bits = {r["weight_bits"] for r in rows}
    activation_bits = {r["activation_bits"] for r in rows}
    assert len(weight_bits) > 1 or len(activation_bits) > 1  # really mixed
    assert activation_bits <= set(FixedPointTarget.legal_activation_bits)
    assert result.report["target_details"]["integer_simulator"]["exact"]
    manifest, _ = integer_package(result.model)
    assert sorted({layer["weight"]["wl"] for layer in manifest["layers"]}) == sorted(weight_bits)


def test_cli_keep_float_and_native_int4(tmp_path):
    runner = CliRunner()
    out = tmp_path / "o"
    args = [str(DIGITS / "digits_cnn.onnx"), "--calib", str(DIGITS / "calib.npz"), "-o", str(out), "-q"]
    ok = runner.invoke(app, [*args, "--bits", "4", "--native-int4", "--keep-float", "node_linear_1"])
    assert ok.exit_code == 0, ok.output
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["layers"]][-1] == "node_linear"
    assert report["target_details"]["opset"] == 21
    bad = runner.invoke(app, [*args, "--keep-float", "NoSuchNode"])
    assert bad.exit_code == 2 and "--keep-float 'NoSuchNode' is neither" in bad.output
    assert "Traceback" not in bad.output


def test_native_int4_on_max78000_is_a_one_line_error(tmp_path):
    out = tmp_path / "o"
    result = CliRunner().invoke(app, [str(DIGITS / "digits_cnn.onnx"), "--target", "max78000", "--calib",
                                      str(DIGITS / "calib.npz"), "--bits", "4", "--native-int4", "-q", "-o", str(out)])
    assert result.exit_code == 2 and "'max78000' does not store ONNX INT4 weights" in result.output
    assert not out.exists()
