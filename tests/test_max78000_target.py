"""The max78000 target on ONNX models: digits end to end, determinism, the §4 constraints, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from conftest import DIGITS, SHARED_MAX78000

torch = pytest.importorskip("torch")

from qcompiler.api import CompileConfig, compile_model  # noqa: E402
from qcompiler.cli import app  # noqa: E402
from qcompiler.errors import QCompilerError, TargetConstraintError, TargetError, UnsupportedOpError  # noqa: E402
from qcompiler.pipeline import PipelineError  # noqa: E402
from qcompiler.runtime import Runner  # noqa: E402
from qcompiler.targets import TargetConfig  # noqa: E402
from qcompiler.targets.max78000.checkpoint import load_checkpoint  # noqa: E402
from qcompiler.targets.max78000.network import load_network  # noqa: E402
from qcompiler.targets.max78000.simulator import params_from_state_dict, simulate  # noqa: E402
from qcompiler.targets.max78000.target import compile_network, convert_input  # noqa: E402

ARTIFACTS = ("digits_cnn.pth.tar", "digits_cnn.yaml", "sample_digits_cnn.npy", "kat-digits_cnn.npy",
             "digits_cnn.sim.onnx", "model.sim.onnx", "digits_cnn.layers.json")


@pytest.fixture(scope="module")
def digits_out(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("mx") / "digits"
    config = CompileConfig(calib=DIGITS / "calib.npz", eval=DIGITS / "eval.npz", show_progress=False)
    result = compile_model(DIGITS / "digits_cnn.onnx", "max78000", config, out)
    return result, out


def test_digits_artifacts_and_accuracy(digits_out) -> None:
    result, out = digits_out
    for name in ARTIFACTS:
        assert (out / name).is_file(), name
    metrics = result.report["metrics"]
    assert metrics["float"]["top1"] - metrics["simulated"]["top1"] <= 0.01
    assert metrics["simulated"]["sqnr_db"] > 25.0
    details = result.report["target_details"]
    assert details["input_conversion"]["lambda_0"] == pytest.approx(128 / 127, rel=1e-6)
    assert [row["op"] for row in details["layers"]] == ["conv2d", "conv2d", "conv2d", "passthrough", "mlp", "mlp"]
    assert details["memory"]["kernel_words_max"] <= 768
    for row in details["layers"]:  # §6.6: per-layer SQNR of the integer simulation and saturation
        assert row["sqnr_db"] > 20.0
        assert row["saturated_fraction"] is None or 0.0 <= row["saturated_fraction"] < 0.01
    assert all(row.get("weight_bits") == 8 for row in result.report["layers"])
    # the generic layer rows carry the target layer's simulated output SQNR and clamped fraction
    by_node = {node: row for row in details["layers"] for node in row["onnx_nodes"]}
    for row in result.report["layers"]:
        assert row["output_sqnr_db"] == by_node[row["name"]]["sqnr_db"]
        assert row.get("saturated_fraction") == by_node[row["name"]]["saturated_fraction"]


def test_terminal_layer_table_shows_the_columns_the_layers_have(digits_out) -> None:
    """MAX78000 rows have no fixed-point formats: their columns are left out, and the target's
    simulated output SQNR and clamped fraction shown instead."""
    from rich.console import Console

    from qcompiler.cli import layer_summary_table

    result, _ = digits_out
    console = Console(width=200, record=True)
    console.print(layer_summary_table(result.report["layers"]))
    text = console.export_text()
    assert "out SQNR dB" in text and "clamped %" in text
    assert "W FL" not in text and "A FL" not in text and "W SQNR" not in text
    first = result.report["layers"][0]
    assert f"{first['output_sqnr_db']:.1f}" in text
    fixed = [{"name": "c", "op": "Conv", "params": 10, "weight_bits": 8, "weight_fl_min": 5, "weight_fl_max": 7,
              "activation_bits": 8, "activation_fl": 6, "weight_sqnr_db": 41.25}]
    console = Console(width=200, record=True)
    console.print(layer_summary_table(fixed))
    text = console.export_text()
    assert "5..7" in text and "41.2" in text and "out SQNR" not in text


def test_digits_checkpoint_format(digits_out) -> None:
    _, out = digits_out
    checkpoint = torch.load(out / "digits_cnn.pth.tar", map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"epoch", "arch", "state_dict", "extras"}
    assert checkpoint["epoch"] == 0 and checkpoint["arch"] == "digits_cnn"
    keys = list(checkpoint["state_dict"])
    assert keys[:7] == ["l00_conv.output_shift", "l00_conv.weight_bits", "l00_conv.bias_bits",
                        "l00_conv.quantize_activation", "l00_conv.adjust_output_shift", "l00_conv.op.weight",
                        "l00_conv.op.bias"]
    for key, value in checkpoint["state_dict"].items():
        assert value.dtype == torch.float32, key
        if key.endswith(".op.weight"):
            assert torch.equal(value, torch.round(value)) and value.abs().max() <= 128


def test_digits_kat_reproduced_from_emitted_files(digits_out) -> None:
    """ai8xize's view: YAML + checkpoint + sample → the KAT, through the simulator and the ONNX."""
    _, out = digits_out
    network = load_network(out / "digits_cnn.yaml")
    params = params_from_state_dict(network, load_checkpoint(out / "digits_cnn.pth.tar")["state_dict"])
    sample, kat = np.load(out / "sample_digits_cnn.npy"), np.load(out / "kat-digits_cnn.npy")
    assert sample.dtype == np.int64 and sample.shape == (1, 16, 16) and kat.shape == (10, 1, 1)
    assert np.array_equal(np.asarray(simulate(network, params, sample)), kat)
    integer_model = ir.load(out / "digits_cnn.sim.onnx")
    for optimize in (False, True):
        y = Runner(integer_model, optimize=optimize).run({"x": sample[None].astype(np.float32)})["y"][0]
        assert np.array_equal(y.astype(np.int64), kat)


def test_float_simulation_equals_integer_simulator(digits_out) -> None:
    result, _ = digits_out
    compiled = compile_network(result.model)
    with np.load(DIGITS / "eval.npz") as npz:
        batch = npz["x"][:32]
    expected = np.stack([np.asarray(simulate(compiled.network, compiled.params, x))
                         for x in convert_input(batch, compiled.lambda_input)])
    got = Runner(result.simulation_model, optimize=False).run({"x": batch})
    logits = next(iter(got.values()))
    assert np.array_equal(logits, expected.reshape(32, 10) * np.float32(compiled.output_scale()))


def test_digits_artifacts_are_deterministic(digits_out, tmp_path: Path) -> None:
    _, first = digits_out
    config = CompileConfig(calib=DIGITS / "calib.npz", eval=DIGITS / "eval.npz", show_progress=False)
    compile_model(DIGITS / "digits_cnn.onnx", "max78000", config, tmp_path / "again")
    for name in ARTIFACTS:
        assert (first / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_mixed_bits_from_a_size_budget(tmp_path: Path) -> None:
    config = CompileConfig(calib=DIGITS / "calib.npz", eval=DIGITS / "eval.npz", show_progress=False,
                           target=TargetConfig(total_bytes=20000))
    result = compile_model(DIGITS / "digits_cnn.onnx", "max78000", config, tmp_path / "out")
    bits = [row["bits"] for row in result.report["target_details"]["layers"] if "bits" in row]
    assert set(bits) <= {1, 2, 4, 8} and len(set(bits)) > 1
    assert result.report["target_details"]["weight_bytes"] <= 20000
    network = load_network(tmp_path / "out" / "digits_cnn.yaml")
    assert [layer.quantization for layer in network.layers if layer.op != "passthrough"] == bits
    params = params_from_state_dict(network, load_checkpoint(tmp_path / "out" / "digits_cnn.pth.tar")["state_dict"])
    kat = np.load(tmp_path / "out" / "kat-digits_cnn.npy")
    assert np.array_equal(simulate(network, params, np.load(tmp_path / "out" / "sample_digits_cnn.npy")), kat)


# --- §4 constraints: one minimal violating network per checkable row --------------------------------

def _net(shape: list[int], layers: list[tuple], bias: bool = True) -> onnx.ModelProto:
    """A sequential float ONNX: ``("conv", out, k, pad, extra attrs)``, ``("relu",)``, ``("pool", op, k, s)``,
    ``("flatten",)``, ``("fc", out)``, ``("op", type)`` (any element-wise op)."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    channels = shape[0]
    for i, spec in enumerate(layers):
        kind, y = spec[0], f"t{i}"
        if kind == "conv":
            _, out, k, pad, attrs = (*spec, {})[:5]
            kernel = [k] * (len(shape) - 1) if isinstance(k, int) else list(k)
            w = rng.normal(0, 0.3, (out, channels // attrs.get("group", 1), *kernel)).astype(np.float32)
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            inputs = [x, f"w{i}"]
            if bias:
                inits.append(numpy_helper.from_array(rng.normal(0, 0.1, out).astype(np.float32), f"b{i}"))
                inputs.append(f"b{i}")
            pads = pad if isinstance(pad, list) else [pad] * (2 * len(kernel))
            nodes.append(helper.make_node("Conv", inputs, [y], kernel_shape=kernel, pads=pads, **attrs))
            channels = out
        elif kind == "fc":
            features = spec[2] if len(spec) > 2 else channels
            w = rng.normal(0, 0.1, (spec[1], features)).astype(np.float32)
            inits += [numpy_helper.from_array(w, f"w{i}"),
                      numpy_helper.from_array(np.zeros(spec[1], np.float32), f"b{i}")]
            nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [y], transB=1))
            channels = spec[1]
        elif kind == "pool":
            nodes.append(helper.make_node(spec[1], [x], [y], kernel_shape=spec[2], strides=spec[3]))
        elif kind == "flatten":
            nodes.append(helper.make_node("Flatten", [x], [y], axis=1))
        elif kind == "relu":
            nodes.append(helper.make_node("Relu", [x], [y]))
        elif kind == "op":
            nodes.append(helper.make_node(spec[1], [x], [y], **(spec[2] if len(spec) > 2 else {})))
        elif kind == "add_branch":  # y = x + conv(x): two consumers of x
            w = rng.normal(0, 0.3, (channels, channels, 1, 1)).astype(np.float32)
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], kernel_shape=[1, 1]),
                      helper.make_node("Add", [x, f"c{i}"], [y])]
        x = y
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


CASES = {
    "1 layer count": ([4, 4, 4], [("conv", 4, 1, 0), ("relu",)] * 33, TargetConstraintError, "layer count"),
    "2 branches": ([4, 4, 4], [("conv", 4, 3, 1), ("relu",), ("add_branch",)], UnsupportedOpError, "sequential"),
    "3 operator": ([4, 4, 4], [("conv", 4, 3, 1), ("op", "Sigmoid")], UnsupportedOpError, "Sigmoid"),
    "4 activation": ([4, 4, 4], [("conv", 4, 3, 1), ("op", "LeakyRelu")], UnsupportedOpError, "LeakyRelu"),
    "6 channels": ([4, 2, 2], [("conv", 1100, 1, 0), ("relu",), ("conv", 4, 1, 0)], TargetConstraintError,
                   "channels"),
    "7 conv2d kernel": ([4, 8, 8], [("conv", 4, 5, 2)], TargetConstraintError, "kernel = 5x5"),
    "8 conv1d kernel": ([4, 32], [("conv", 4, 11, 1)], TargetConstraintError, "conv1d kernel = 11"),
    "9 stride": ([4, 8, 8], [("conv", 4, 3, 1, {"strides": [2, 2]})], UnsupportedOpError, "stride"),
    "10 asymmetric pad": ([4, 8, 8], [("conv", 4, 3, [0, 0, 1, 1])], UnsupportedOpError, "symmetric"),
    "10 pad >= kernel": ([4, 8, 8], [("conv", 4, 1, 1)], TargetConstraintError, "pad = 1"),
    "11 groups": ([4, 8, 8], [("conv", 4, 3, 1, {"group": 2})], UnsupportedOpError, "groups"),
    "11 dilation": ([4, 8, 8], [("conv", 4, 3, 2, {"dilations": [2, 2]})], UnsupportedOpError, "dilation"),
    "12 pool size": ([4, 40, 40], [("pool", "MaxPool", [17, 17], [1, 1]), ("conv", 4, 3, 1)],
                     TargetConstraintError, "pooling"),
    "12 pool stride square": ([4, 8, 8], [("pool", "MaxPool", [2, 2], [2, 1]), ("conv", 4, 3, 1)],
                              TargetConstraintError, "square"),
    "13 passthrough channels": ([4, 8, 8], [("conv", 128, 1, 0), ("relu",), ("pool", "MaxPool", [2, 2], [2, 2]),
                                            ("pool", "MaxPool", [2, 2], [2, 2]), ("conv", 4, 1, 0)],
                                TargetConstraintError, "passthrough channels"),
    "14 flatten size": ([4, 17, 17], [("conv", 4, 3, 1), ("relu",), ("flatten",), ("fc", 10, 4 * 17 * 17)],
                        TargetConstraintError, "flattened"),
    "15 dims": ([4, 1100], [("conv", 4, 3, 1)], TargetConstraintError, "dims"),
    "16 data memory": ([16, 100, 100], [("conv", 16, 3, 1)], TargetConstraintError, "data memory"),
    "17 CHW channels": ([32, 80, 80], [("conv", 4, 3, 1)], TargetConstraintError, "input size"),
    # 36,864 weight bytes fit the byte budget, but 1,024 3x3 kernels per input processor do not
    "19 kernel memory": ([4, 4, 4], [("conv", 1024, 3, 1)], TargetConstraintError, "kernel memory"),
    "20 bias memory": ([4, 2, 2], [("conv", 600, 1, 0), ("relu",), ("conv", 4, 1, 0)], TargetConstraintError,
                       "bias bytes"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_constraint_violation_names_rule_and_writes_nothing(case: str, tmp_path: Path) -> None:
    shape, layers, error, text = CASES[case]
    model = _net(shape, layers)
    rng = np.random.default_rng(1)
    calib = {"x": rng.normal(0, 1, (4, *shape)).astype(np.float32)}
    out = tmp_path / "out"
    with pytest.raises(QCompilerError, match=text) as info:
        compile_model(model, "max78000", CompileConfig(calib=calib, show_progress=False), out)
    cause = info.value.__cause__ if isinstance(info.value, PipelineError) else info.value
    assert isinstance(cause, error)
    assert str(cause).startswith("max78000:") and "\n" not in str(info.value)
    assert not out.exists()


def test_a_model_the_target_cannot_take_is_refused_before_any_data_is_read(tmp_path: Path) -> None:
    """Legalisation and the weight-memory bound run on the canonical model first: the calibration
    file, which does not exist, is never reached (a ResNet-18 used to calibrate and profile for
    two minutes before failing)."""
    missing = CompileConfig(calib=tmp_path / "no-such-file.npz", show_progress=False)
    with pytest.raises(UnsupportedOpError, match=r"max78000: node .* stride \(2, 2\) is not supported"):
        compile_model(_net([4, 8, 8], [("conv", 4, 3, 1, {"strides": [2, 2]})]), "max78000", missing, tmp_path / "out")
    # four 1024x1024 layers legalise, but 4,194,304 weights need 524,288 bytes even at 1 bit
    fc = _net([64, 4, 4], [("flatten",), ("fc", 1024, 1024), ("relu",), ("fc", 1024), ("relu",), ("fc", 1024),
                           ("relu",), ("fc", 1024)])
    with pytest.raises(TargetError, match=r"4,194,304 weights; even at 1 bit each they take 524,288 bytes, more than "
                                          r"the 442,368-byte weight memory \(§4 rule 19"):
        compile_model(fc, "max78000", missing, tmp_path / "out")
    three = _net([64, 4, 4], [("flatten",), ("fc", 1024, 1024), ("relu",), ("fc", 1024), ("relu",), ("fc", 1024)])
    with pytest.raises(QCompilerError, match="no-such-file.npz"):  # 3,145,728 weights may fit at 1 bit: data is read
        compile_model(three, "max78000", missing, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_weight_bits_outside_1_2_4_8_refused(tmp_path: Path) -> None:
    config = CompileConfig(calib=DIGITS / "calib.npz", show_progress=False, target=TargetConfig(weight_bits=3))
    with pytest.raises(TargetError, match="rule §4.18"):
        compile_model(DIGITS / "digits_cnn.onnx", "max78000", config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_conv1d_network_compiles_and_matches(tmp_path: Path) -> None:
    model = _net([8, 32], [("conv", 16, 3, 1), ("relu",), ("pool", "AveragePool", [2], [2]), ("conv", 16, 3, 1),
                           ("relu",), ("flatten",), ("fc", 5, 16 * 16)])
    rng = np.random.default_rng(2)
    calib = {"x": rng.normal(0, 1, (64, 8, 32)).astype(np.float32)}
    result = compile_model(model, "max78000", CompileConfig(calib=calib, show_progress=False), tmp_path / "o")
    assert result.report["metrics"]["simulated"]["sqnr_db"] > 20
    network = load_network(tmp_path / "o" / "qcnet.yaml")
    assert [layer.op for layer in network.layers] == ["conv1d", "conv1d", "mlp"]
    assert network.layers[1].pool == "avg"
    params = params_from_state_dict(network, load_checkpoint(tmp_path / "o" / "qcnet.pth.tar")["state_dict"])
    sample = np.load(tmp_path / "o" / "sample_qcnet.npy")
    assert np.array_equal(simulate(network, params, sample), np.load(tmp_path / "o" / "kat-qcnet.npy"))


# --- CLI ----------------------------------------------------------------------------------------------

def test_cli_compile_max78000(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, [str(DIGITS / "digits_cnn.onnx"), "--target", "max78000", "--calib",
                                      str(DIGITS / "calib.npz"), "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert (out / "digits_cnn.pth.tar").is_file() and (out / "kat-digits_cnn.npy").is_file()


@pytest.mark.skipif(not SHARED_MAX78000.is_dir(), reason=f"conformance data folder {SHARED_MAX78000} is absent")
def test_cli_quantize_mode(tmp_path: Path) -> None:
    out = tmp_path / "q.pth.tar"
    raw = SHARED_MAX78000 / "ai85-mnist-extrasmall-qat8.original.pth.tar"
    result = CliRunner().invoke(app, [str(raw), "--target", "max78000", "-o", str(out), "-v"])
    assert result.exit_code == 0, result.output
    assert "Configuring device: MAX78000" in result.output
    assert "fc.op.bias avg_max: 0.24276097 max: 1.0022885 mean: -0.24276097 factor: 64.0 bits: 8" in result.output
    golden = torch.load(SHARED_MAX78000 / "ai85-mnist-extrasmall-qat8-q.pth.tar", weights_only=True)["state_dict"]
    ours = torch.load(out, weights_only=True)["state_dict"]
    assert list(ours) == list(golden) and all(torch.equal(ours[k], golden[k]) for k in golden)


@pytest.mark.parametrize("args, text", [
    (["missing.pth.tar", "--target", "max78000", "-o", "OUT"], "no such checkpoint file"),
    (["RAW", "--target", "fixed-point", "-o", "OUT"], "only be quantized for --target max78000"),
    (["RAW", "--target", "max78000"], "-o OUT.pth.tar"),
    (["RAW", "--target", "max78000", "-o", "OUT", "--clip-method", "FOO"], "--clip-method"),
    (["RAW", "--target", "max78000", "-o", "OUT", "-c", "BADYAML"], "unknown key"),
    (["NOTCKPT", "--target", "max78000", "-o", "OUT"], "not a PyTorch checkpoint"),
])
def test_cli_quantize_mode_bad_input(tmp_path: Path, args: list[str], text: str) -> None:
    raw = tmp_path / "raw.pth.tar"
    torch.save({"epoch": 1, "state_dict": {"a.op.weight": torch.ones(2, 2, 3, 3)}}, raw)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("arch: a\ndataset: b\nlayers:\n  - {processors: 1, colour: red}\n")
    not_ckpt = tmp_path / "notckpt.pth.tar"
    not_ckpt.write_text("hello")
    mapping = {"RAW": str(raw), "OUT": str(tmp_path / "out.pth.tar"), "BADYAML": str(bad_yaml),
               "NOTCKPT": str(not_ckpt), "missing.pth.tar": str(tmp_path / "missing.pth.tar")}
    result = CliRunner().invoke(app, [mapping.get(a, a) for a in args])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.strip().splitlines() if not line.startswith("warning: ")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and text in errors[0]
    assert not (tmp_path / "out.pth.tar").exists()


def test_weight_threshold_rules() -> None:
    """``max`` never clips; ``mse`` trades clipping for resolution and lowers the weight error at 2 bits;
    ``auto`` is ``max`` at 8 bits and ``mse`` below."""
    from qcompiler.targets.max78000.legalize import LegalLayer
    from qcompiler.targets.max78000.network import HwLayer
    from qcompiler.targets.max78000.rescale import quantize_layer

    rng = np.random.default_rng(0)
    weight = rng.standard_t(3, (32, 16, 3, 3)).astype(np.float32) * 0.05
    layer = LegalLayer(HwLayer(op="conv2d"), "n", weight, np.zeros(32, np.float32), "y")

    def error(q) -> float:
        deq = q.params.weights * 2.0 ** q.output_shift / 2 ** (q.params.bits - 1)
        return float(((deq - weight) ** 2).sum())

    for bits in (2, 4, 8):
        by_max = quantize_layer(layer, bits, 1.0, 1.0, threshold_rule="max")
        by_mse = quantize_layer(layer, bits, 1.0, 1.0, threshold_rule="mse")
        auto = quantize_layer(layer, bits, 1.0, 1.0, threshold_rule="auto")
        assert by_max.clamped_weights <= 1  # only +2^(b-1) can clamp at the maximum
        assert error(by_mse) <= error(by_max)
        assert auto.bit_shift == (by_max if bits == 8 else by_mse).bit_shift
    assert error(quantize_layer(layer, 2, 1.0, 1.0, threshold_rule="mse")) < 0.8 * error(
        quantize_layer(layer, 2, 1.0, 1.0, threshold_rule="max"))


def test_weight_memory_is_the_default_budget(tmp_path: Path) -> None:
    """524k weights do not fit the 432 KiB weight memory at 8 bits: the knapsack gets it as budget.
    (The byte budget is necessary, not sufficient: kernel words per processor are checked after.)"""
    model = _net([1024], [("fc", 512), ("relu",), ("fc", 10)])
    calib = {"x": np.random.default_rng(3).normal(0, 1, (32, 1024)).astype(np.float32)}
    result = compile_model(model, "max78000", CompileConfig(calib=calib, show_progress=False), tmp_path / "o")
    details = result.report["target_details"]
    assert details["weight_bytes"] <= 442_368
    assert details["layers"][0]["bits"] < 8
    assert details["memory"]["kernel_words_max"] <= 768


def test_emitted_checkpoint_needs_no_unsafe_globals(digits_out) -> None:
    """Only tensors and containers are pickled, so weights_only loading works on old and new torch."""
    _, out = digits_out
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(out / "digits_cnn.pth.tar")) == []


@pytest.fixture(scope="module")
def digits_gpfq_w2(tmp_path_factory: pytest.TempPathFactory):
    from qcompiler.passes.gpfq import GPFQPass

    out = tmp_path_factory.mktemp("mxg") / "digits"
    config = CompileConfig(calib=DIGITS / "calib.npz", eval=DIGITS / "eval.npz", show_progress=False,
                           target=TargetConfig(weight_bits=2), gpfq=GPFQPass())
    return compile_model(DIGITS / "digits_cnn.onnx", "max78000", config, out), out


def test_gpfq_on_the_max78000_grid_is_emitted_exactly(digits_gpfq_w2) -> None:
    """GPFQ codes on the target's grid are the checkpoint's codes, and the KAT still holds."""
    from qcompiler import annotations as ann
    from qcompiler.qdq import integer_codes

    result, out = digits_gpfq_w2
    compiled = compile_network(result.model)
    nodes = {n.name: n for n in result.model.graph}
    checked = 0
    for legal, quantized in zip(compiled.legal, compiled.quantized):
        if quantized is None:
            continue
        weight = nodes[legal.weight_node].inputs[1]
        grid = ann.require(weight, ann.IntegerWeights)
        assert grid.grid == "max78000" and grid.bits == 2 and (grid.q_min, grid.q_max) == (-2, 1)
        codes = integer_codes(weight, grid).reshape(quantized.params.weights.shape)
        assert np.array_equal(codes.astype(np.int64), quantized.params.weights)
        checked += 1
    assert checked == 5
    network = load_network(out / "digits_cnn.yaml")
    params = params_from_state_dict(network, load_checkpoint(out / "digits_cnn.pth.tar")["state_dict"])
    sample, kat = np.load(out / "sample_digits_cnn.npy"), np.load(out / "kat-digits_cnn.npy")
    assert np.array_equal(np.asarray(simulate(network, params, sample)), kat)


def test_gpfq_keeps_w2_digits_within_a_point_of_float(digits_gpfq_w2, tmp_path: Path) -> None:
    result, _ = digits_gpfq_w2
    metrics, section = result.report["metrics"], result.report["gpfq"]
    assert metrics["float"]["top1"] - metrics["simulated"]["top1"] <= 0.01  # RTN on this grid: 0.73
    assert section["sqnr_db"] > section["sqnr_db_rtn"] + 6.0
    assert all(row["grid"] == "max78000" for row in section["layers"])
