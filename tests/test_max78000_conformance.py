"""MAX78000 conformance on the shared ai8x-synthesis data (max78000.md §8, tests 1–6 and 8).

Skipped, with the reason, when ``../shared/data/max78000`` is absent (users outside this repo).
"""

from __future__ import annotations

import fractions
import pickle
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import SHARED_MAX78000

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.skipif(
    not SHARED_MAX78000.is_dir(), reason=f"conformance data folder {SHARED_MAX78000} is absent"
)

from qcompiler.errors import CheckpointError  # noqa: E402
from qcompiler.runtime import Runner  # noqa: E402
from qcompiler.targets.max78000.checkpoint import load_checkpoint  # noqa: E402
from qcompiler.targets.max78000.network import Network, load_network, processor_count  # noqa: E402
from qcompiler.targets.max78000.onnx_model import build_simulation  # noqa: E402
from qcompiler.targets.max78000.quantize import QuantizeOptions, convert_checkpoint, quantize_file  # noqa: E402
from qcompiler.targets.max78000.simulator import params_from_state_dict, simulate  # noqa: E402

D = SHARED_MAX78000
PAIRS = [
    ("ai85-cifar10-qat8.pth.tar", "ai85-cifar10-qat8-q.pth.tar"),
    ("ai85-kws20_v3-qat8.pth.tar", "ai85-kws20_v3-qat8-q.pth.tar"),
    ("ai85-mnist-extrasmall-qat8.original.pth.tar", "ai85-mnist-extrasmall-qat8-q.pth.tar"),
]
KATS = {
    "cifar10": ("ai85-cifar10-qat8-q.pth.tar", "cifar10-nas.yaml", "sample_cifar-10.npy", "kat-cifar10-nas.npy",
                "ai85-cifar10-qat8.pth.tar"),
    "kws20": ("ai85-kws20_v3-qat8-q.pth.tar", "kws20-v3-hwc.yaml", "sample_kws_20.npy", "kat-kws20_v3.npy",
              "ai85-kws20_v3-qat8.pth.tar"),
    "mnist": ("ai85-mnist-extrasmall-qat8-q.pth.tar", "mnist-chw-extrasmall-ai85.yaml", "sample_mnist.npy",
              "kat-mnist-extrasmall.npy", "ai85-mnist-extrasmall-qat8.original.pth.tar"),
}


def assert_state_dicts_equal(ours: dict, golden: dict) -> None:
    assert list(ours) == list(golden)
    for key, value in golden.items():
        mine = ours[key]
        assert mine.dtype == value.dtype, key
        assert mine.shape == value.shape, key
        assert torch.equal(mine, value), key


# --- 1. quantize.py bit-exactness -------------------------------------------------------------------

@pytest.mark.parametrize("raw, golden", PAIRS)
def test_quantize_qat_mode_is_bit_exact(tmp_path: Path, raw: str, golden: str) -> None:
    out = tmp_path / "q.pth.tar"
    quantize_file(D / raw, out, QuantizeOptions(device="MAX78000"))
    ours = torch.load(out, map_location="cpu", weights_only=True)
    expected = torch.load(D / golden, map_location="cpu", weights_only=True)
    assert_state_dicts_equal(ours["state_dict"], expected["state_dict"])
    assert ours["extras"]["clipping_method"] == "MAX_BIT_SHIFT"
    assert ours["extras"] == expected["extras"]
    assert ours["epoch"] == expected["epoch"] and ours["arch"] == expected["arch"]


def test_kws20_duplicates_are_quantized_too() -> None:
    result = convert_checkpoint(load_checkpoint(D / "ai85-kws20_v3-qat8.pth.tar"))
    assert len(result.layers) == 18
    assert sum(key.startswith("module.") for key in (layer.key for layer in result.layers)) == 9


def test_lower_bits_follow_the_qat_formulas() -> None:
    """b < 8: weights in the b-bit range, stored bias = Bq·2^(b−1), output_shift range."""
    checkpoint = load_checkpoint(D / "ai85-mnist-extrasmall-qat8.original.pth.tar")
    # weight_bits 0 (pre-QAT) → --qat-weight-bits applies
    checkpoint["state_dict"] = {k: (torch.tensor([0.0]) if k.endswith("weight_bits") else v)
                                for k, v in checkpoint["state_dict"].items()}
    result = convert_checkpoint(checkpoint, QuantizeOptions(qat_weight_bits=4))
    state = result.checkpoint["state_dict"]
    for layer in result.layers:
        assert layer.bits == 4
        prefix = layer.key[: -len(".op.weight")]
        q = state[layer.key]
        assert q.min() >= -8 and q.max() <= 7
        assert float(state[f"{prefix}.weight_bits"]) == 4.0
        if f"{prefix}.op.bias" in state:
            stored = state[f"{prefix}.op.bias"]
            assert torch.equal(stored, torch.round(stored / 8) * 8)
            assert (stored / 8).abs().max() <= 8
        s = float(state[f"{prefix}.output_shift"])
        assert 4 - 23 <= s <= 4 + 7


# --- 2./3. known-answer tests -----------------------------------------------------------------------

def _simulate_golden(name: str) -> tuple[np.ndarray, np.ndarray, Network, list]:
    ckpt, yaml_file, sample, kat, _ = KATS[name]
    network = load_network(D / yaml_file)
    params = params_from_state_dict(network, load_checkpoint(D / ckpt)["state_dict"])
    x = np.load(D / sample)
    return np.asarray(simulate(network, params, x)), np.load(D / kat), network, params


@pytest.mark.parametrize("name", sorted(KATS))
def test_simulator_reproduces_kat(name: str) -> None:
    out, kat, _, _ = _simulate_golden(name)
    assert out.dtype == np.int64 and kat.dtype == np.int64
    assert np.array_equal(out.reshape(kat.shape), kat)


@pytest.mark.parametrize("name", sorted(KATS))
@pytest.mark.parametrize("optimize", [False, True])
def test_simulation_onnx_reproduces_kat(name: str, optimize: bool) -> None:
    _, kat, network, params = _simulate_golden(name)
    x = np.load(D / KATS[name][2])
    model = build_simulation(network.layers, params, x.shape)
    out = Runner(model, optimize=optimize).run({"x": x[None].astype(np.float32)})["y"][0]
    assert np.array_equal(out.astype(np.int64).reshape(kat.shape), kat)


def test_kws20_hardware_network_has_no_bias() -> None:
    _, _, _, params = _simulate_golden("kws20")
    assert all(p.bias is None for p in params if p is not None)


@pytest.mark.parametrize("name", sorted(KATS))
def test_end_to_end_raw_to_kat(tmp_path: Path, name: str) -> None:
    ckpt, yaml_file, sample, kat, raw = KATS[name]
    out = tmp_path / "q.pth.tar"
    quantize_file(D / raw, out)
    network = load_network(D / yaml_file)
    params = params_from_state_dict(network, load_checkpoint(out)["state_dict"])
    result = simulate(network, params, np.load(D / sample))
    assert np.array_equal(np.asarray(result).reshape(np.load(D / kat).shape), np.load(D / kat))


# --- 4. safe loading ----------------------------------------------------------------------------------

def test_plain_weights_only_load_fails_on_training_checkpoint() -> None:
    with pytest.raises(pickle.UnpicklingError, match="torch.optim.sgd.SGD"):
        torch.load(D / "ai85-mnist-extrasmall-qat8.original.pth.tar", map_location="cpu", weights_only=True)


def test_safe_loader_never_uses_weights_only_false(monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch.load
    calls = []

    def guarded(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        assert kwargs.get("weights_only") is True
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", guarded)
    checkpoint = load_checkpoint(D / "ai85-mnist-extrasmall-qat8.original.pth.tar")
    assert len(checkpoint["state_dict"]) == 25
    assert "optimizer_type" not in checkpoint
    assert calls and all(call is True for call in calls)


def test_safe_loader_refuses_other_globals(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth.tar"
    torch.save({"epoch": 1, "state_dict": {}, "extras": {"ratio": fractions.Fraction(1, 3)}}, path)
    with pytest.raises(CheckpointError, match="fractions.Fraction"):
        load_checkpoint(path)


# --- 5. non-QAT modes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["AVGMAX", "MAX", "STDDEV", "SCALE"])
def test_clip_methods_run_on_checkpoints_with_biases(method: str) -> None:
    checkpoint = load_checkpoint(D / "ai85-cifar10-qat8.pth.tar")
    result = convert_checkpoint(checkpoint, QuantizeOptions(clip_method=method))
    state = result.checkpoint["state_dict"]
    assert result.checkpoint["extras"]["clipping_method"] == method
    for layer in result.layers:
        prefix = layer.key[: -len(".op.weight")]
        assert f"{prefix}.output_shift" in state
        q = state[layer.key]
        assert torch.equal(q, torch.round(q)) and q.abs().max() <= 128


def test_max_method_equals_qat_with_quantile_one() -> None:
    checkpoint = load_checkpoint(D / "ai85-cifar10-qat8.pth.tar")
    forced = dict(checkpoint)
    forced["state_dict"] = {k: (torch.tensor([1.0]) if k.endswith("shift_quantile") else v)
                            for k, v in checkpoint["state_dict"].items()}
    qat = convert_checkpoint(forced).checkpoint["state_dict"]
    clip = convert_checkpoint(checkpoint, QuantizeOptions(clip_method="MAX")).checkpoint["state_dict"]
    for key in qat:
        if not key.endswith("shift_quantile"):
            assert torch.equal(qat[key], clip[key]), key


# --- 8. verbose format --------------------------------------------------------------------------------

def test_verbose_lines_match_upstream() -> None:
    lines: list[str] = []
    convert_checkpoint(load_checkpoint(D / "ai85-cifar10-qat8.pth.tar"), verbose=lines.append)
    stats = [line for line in lines if " avg_max: " in line]
    assert stats[0] == ("conv1_1.op.weight avg_max: 0.3132246 max: 0.94858176 mean: -0.0014164174 "
                        "factor: [128.] bits: 8")
    assert stats[1] == ("conv1_1.op.bias avg_max: 0.0030013784 max: 0.10726776 mean: 0.0030013784 "
                        "factor: [128.] bits: 8")
    lines.clear()
    convert_checkpoint(load_checkpoint(D / "ai85-mnist-extrasmall-qat8.original.pth.tar"), verbose=lines.append)
    assert lines[-1] == "fc.op.bias avg_max: 0.24276097 max: 1.0022885 mean: -0.24276097 factor: 64.0 bits: 8"
    assert lines[0] == "" and lines[1] == "Model keys (state_dict):"


# --- 6. YAML generation from a float ONNX rebuilt from the -q checkpoints ------------------------------

def _dequantized(state: dict, key: str) -> tuple[np.ndarray, np.ndarray | None]:
    """§5.2: W = q_w·2^s/2^(b−1), B = Bq·2^s/2^(b−1) with Bq = Bs/2^(b−1)."""
    prefix = key[: -len(".weight")]
    layer = prefix.rsplit(".", 1)[0]
    bits = int(state[f"{layer}.weight_bits"].reshape(-1)[0]) or 8
    s = float(state[f"{layer}.output_shift"].reshape(-1)[0])
    scale = 2.0**s / 2 ** (bits - 1)
    weight = state[key].numpy().astype(np.float32) * scale
    bias = state.get(f"{prefix}.bias")
    return weight, None if bias is None else (bias.numpy() / 2 ** (bits - 1) * scale).astype(np.float32)


def float_onnx_from(network: Network, state: dict, sample_shape: tuple[int, ...]) -> onnx.ModelProto:
    """The float ONNX of a shipped topology, with the dequantized weights of a -q checkpoint."""
    keys = [k for k in state if k.endswith(".weight")]
    nodes, inits, x, key_index = [], [], "x", 0
    spatial = len(sample_shape) - 1
    for i, layer in enumerate(network.layers):
        if layer.pool is not None:
            op = "MaxPool" if layer.pool == "max" else "AveragePool"
            size, stride = list(layer.pool_size[:spatial]), list(layer.pool_stride[:spatial])
            nodes.append(helper.make_node(op, [x], [f"p{i}"], kernel_shape=size, strides=stride))
            x = f"p{i}"
        if layer.op == "passthrough":
            continue
        weight, bias = _dequantized(state, keys[key_index])
        key_index += 1
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        inputs = [x, f"w{i}"]
        if bias is not None:
            inits.append(numpy_helper.from_array(bias, f"b{i}"))
            inputs.append(f"b{i}")
        if layer.op == "mlp":
            nodes.append(helper.make_node("Flatten", [x], [f"f{i}"], axis=1))
            inputs[0] = f"f{i}"
            nodes.append(helper.make_node("Gemm", inputs, [f"y{i}"], transB=1))
        else:
            nodes.append(helper.make_node("Conv", inputs, [f"y{i}"], pads=[layer.pad] * (2 * spatial),
                                          kernel_shape=list(weight.shape[2:])))
        x = f"y{i}"
        if layer.activation == "ReLU":
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *sample_shape])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("name", sorted(KATS))
def test_generated_yaml_matches_shipped_topology(name: str) -> None:
    from qcompiler.ir import load_normalized
    from qcompiler.passes.pipelines import canonical_pipeline
    from qcompiler.pipeline import run_pipeline
    from qcompiler.targets.max78000 import constraints
    from qcompiler.targets.max78000.legalize import legalize
    from qcompiler.targets.max78000.network import network_yaml, parse_network

    ckpt, yaml_file, sample, kat, _ = KATS[name]
    shipped = load_network(D / yaml_file)
    state = load_checkpoint(D / ckpt)["state_dict"]
    x = np.load(D / sample)
    model = run_pipeline(load_normalized(float_onnx_from(shipped, state, x.shape)), canonical_pipeline()).model
    placed = constraints.place([layer.hw for layer in legalize(model)])
    assert len(placed) == len(shipped.layers)
    for ours, theirs in zip(placed, shipped.layers):
        for field in ("op", "kernel_size", "pad", "pool", "activation", "flatten"):
            assert getattr(ours, field) == getattr(theirs, field), (field, ours, theirs)
        if theirs.pool is not None:
            assert (ours.pool_size, ours.pool_stride) == (theirs.pool_size, theirs.pool_stride)
    assert placed[-1].output_width == shipped.layers[-1].output_width == 32
    # processor maps (§4 rows 5–6) and data memory (rows 16–17)
    for layer in placed:
        chw = layer.data_format == "CHW"
        assert bin(layer.processors).count("1") == (layer.in_channels if chw else processor_count(layer.in_channels))
    bits = [8 if layer.op != "passthrough" else None for layer in placed]
    constraints.check(placed, bits, [0 if b else None for b in bits], [False] * len(placed))
    # round trip through YAML text, then simulate the golden checkpoint with it
    import yaml

    generated = parse_network(yaml.safe_load(network_yaml(Network("net", "net", tuple(placed)))))
    params = params_from_state_dict(generated, state)
    out = np.asarray(simulate(generated, params, x))
    assert np.array_equal(out.reshape(np.load(D / kat).shape), np.load(D / kat))
