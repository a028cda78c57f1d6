"""Quantization-aware fine-tuning: the torch graph, its quantizers, the pass, re-emission, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

torch = pytest.importorskip("torch")

from qcompiler import annotations as ann  # noqa: E402
from qcompiler.api import CompileConfig, compile_model  # noqa: E402
from qcompiler.cli import app  # noqa: E402
from qcompiler.data import ArrayDataset  # noqa: E402
from qcompiler.errors import DataError, UnsupportedModelError  # noqa: E402
from qcompiler.graph import const_array, values_by_name  # noqa: E402
from qcompiler.ir import normalize  # noqa: E402
from qcompiler.passes.finetune import FineTuneConfigError, FineTunePass, split_holdout  # noqa: E402
from qcompiler.qdq import integer_codes  # noqa: E402
from qcompiler.runtime import Runner  # noqa: E402
from qcompiler.targets import TargetConfig  # noqa: E402
from qcompiler.targets.fixed_point.simulator import IntegerSimulator  # noqa: E402
from qcompiler.torch_graph import GraphModule, fake_quant  # noqa: E402
from tests.conftest import DIGITS, make_model  # noqa: E402


@pytest.fixture(scope="module")
def train() -> dict[str, np.ndarray]:
    with np.load(DIGITS / "train.npz") as npz:
        return {k: npz[k] for k in npz.files}


def _compiled(bits: int, target: str = "fixed-point", **config):
    return compile_model(DIGITS / "digits_cnn.onnx", target,
                         CompileConfig(calib=DIGITS / "calib.npz", target=TargetConfig(weight_bits=bits),
                                       show_progress=False, **config))


@pytest.mark.parametrize("bits", [2, 8])
def test_fake_quant_forward_equals_the_integer_simulator_bit_exactly(bits, digits_eval):
    model = _compiled(bits).model
    x = digits_eval["x"][:96]
    module = GraphModule(model).double()
    codes: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        out = module(x=torch.from_numpy(x), codes=codes)[0].numpy()
    sim_out, sim_codes = IntegerSimulator(model).run({"x": x})
    assert sorted(codes) == sorted(sim_codes) and len(codes) == 5
    for name in codes:
        assert np.array_equal(codes[name].numpy().astype(np.int64), sim_codes[name]), name
    assert np.array_equal(out.astype(np.float32), sim_out[model.graph.outputs[0].name])


@pytest.mark.parametrize("bits", [2, 8])
def test_max78000_fake_quant_equals_the_layer_simulator_bit_exactly(bits, digits_eval):
    """Q7 activations (input rounding, half-up output shifts, int8 clamps), weight and bias codes:
    every layer's codes equal the MAX78000 simulator's (max78000.md §5.1) on 64 eval images."""
    from qcompiler.targets.max78000.target import compile_network, convert_input
    from qcompiler.targets.max78000.simulator import simulate

    model = _compiled(bits, "max78000").model
    compiled = compile_network(model)
    x = digits_eval["x"][:64]
    codes: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        out = GraphModule(model).double()(x=torch.from_numpy(x), codes=codes)[0].numpy()
    inputs = convert_input(x, compiled.lambda_input)
    assert np.array_equal(codes[model.graph.inputs[0].name].numpy(), inputs)
    nodes = {n.name: n for n in model.graph}
    per_layer = [np.stack(layer) for layer in zip(*(simulate(compiled.network, compiled.params, s, keep_all=True)
                                                    for s in inputs))]
    checked = 0
    for legal, hw, expected in zip(compiled.legal, compiled.network.layers, per_layer):
        if legal.weight_node is None or hw.output_width == 32:
            continue
        last = nodes[hw.nodes[-1]]
        before = (last.inputs[0] if hw.activation else last.outputs[0]).name
        got = codes[before].numpy().astype(np.int64)
        got = np.clip(got, 0, 127) if hw.activation == "ReLU" else got
        assert np.array_equal(got, expected.reshape(got.shape)), legal.hw.name
        checked += 1
    assert checked == 4
    assert np.array_equal(np.rint(out / compiled.output_scale()).astype(np.int64), per_layer[-1].reshape(out.shape))
    # the biases are trained on their hardware grid too (int8 b_hw, 128 accumulator units each)
    bias = nodes[compiled.legal[0].weight_node].inputs[2]
    assert ann.require(bias, ann.WeightGrid).q_max == 127


def test_float32_module_matches_the_qdq_model(digits_eval):
    result = _compiled(4)
    x = digits_eval["x"][:64]
    with torch.no_grad():
        ours = GraphModule(result.model)(x=torch.from_numpy(x))[0].numpy()
    ref = Runner(result.simulation_model).run({"x": x})[result.simulation_model.graph.outputs[0].name]
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_straight_through_estimator_passes_gradients_inside_the_range():
    x = torch.tensor([-3.0, -0.3, 0.26, 0.74, 5.0], requires_grad=True)
    y = fake_quant(x, torch.tensor(0.5), -4, 3)  # range [-2.0, 1.5]
    assert y.tolist() == [-2.0, -0.5, 0.5, 0.5, 1.5]  # round half to even: 0.26/0.5 = 0.52 -> 1
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # clipped STE


def test_weights_get_gradients_through_their_quantizers(train):
    model = _compiled(2).model
    module = GraphModule(model)
    out = module(x=torch.from_numpy(train["x"][:32]))[0]
    torch.nn.functional.cross_entropy(out, torch.from_numpy(train["labels"][:32])).backward()
    grads = [p.grad for p in module.params.values()]
    assert len(grads) == 10 and all(g is not None and float(g.abs().sum()) > 0 for g in grads)


@pytest.fixture(scope="module")
def tuned_fixed(train):
    finetune = FineTunePass(data=train, epochs=3, show_progress=False, seed=1)
    return _compiled(2, eval=DIGITS / "eval.npz", finetune=finetune)


def test_finetune_recovers_w2_accuracy_and_logs_epochs(tuned_fixed):
    ptq = _compiled(2, eval=DIGITS / "eval.npz").report["metrics"]["simulated"]["top1"]
    tuned = tuned_fixed.report["metrics"]["simulated"]["top1"]
    assert ptq < 0.7 and tuned > 0.93  # 0.639 -> ~0.96 after three epochs
    log = ann.require(tuned_fixed.model, ann.FineTuneLog)
    assert [e["epoch"] for e in log.epochs] == [1, 2, 3]
    assert log.epochs[-1]["train_loss"] < log.epochs[0]["train_loss"]
    assert all(0.0 <= e["eval_top1"] <= 1.0 for e in log.epochs) and 1 <= log.best_epoch <= 3


def test_finetuned_weights_lie_on_their_grids_and_re_emit_exactly(tuned_fixed):
    model = tuned_fixed.model
    values = values_by_name(model.graph)
    for node in model.graph:
        layer = ann.get(node, ann.QuantizableLayer)
        if layer is None:
            continue
        fmt = ann.get(values[layer.weight], ann.FixedPoint)
        w = const_array(values[layer.weight]).astype(np.float64)
        scaled = w * (2.0 ** np.asarray(fmt.fl, dtype=np.float64)).reshape(-1, *([1] * (w.ndim - 1)))
        assert np.array_equal(scaled, np.rint(scaled))  # exactly code·2^-fl
        lo, hi = fmt.code_range()
        assert scaled.min() >= lo and scaled.max() <= hi
    assert tuned_fixed.report["target_details"]["integer_simulator"]["exact"]


def test_finetuned_model_re_emits_through_max78000_and_its_simulator(train, tmp_path):
    from qcompiler.targets.max78000.checkpoint import load_checkpoint
    from qcompiler.targets.max78000.network import load_network
    from qcompiler.targets.max78000.simulator import params_from_state_dict, simulate
    from qcompiler.targets.max78000.target import compile_network

    out = tmp_path / "mx"
    finetune = FineTunePass(data=train, epochs=2, show_progress=False)
    result = compile_model(DIGITS / "digits_cnn.onnx", "max78000",
                           CompileConfig(calib=DIGITS / "calib.npz", eval=DIGITS / "eval.npz",
                                         target=TargetConfig(weight_bits=2), finetune=finetune, show_progress=False), out)
    assert result.report["metrics"]["simulated"]["top1"] > 0.9  # PTQ on this grid: 0.73
    compiled = compile_network(result.model)
    nodes = {n.name: n for n in result.model.graph}
    for legal, quantized in zip(compiled.legal, compiled.quantized):
        if quantized is None:
            continue
        weight = nodes[legal.weight_node].inputs[1]
        grid = ann.require(weight, ann.IntegerWeights)
        assert grid.method == "finetune" and grid.grid == "max78000"
        codes = integer_codes(weight, grid).reshape(quantized.params.weights.shape)
        assert np.array_equal(codes.astype(np.int64), quantized.params.weights)
    network = load_network(out / "digits_cnn.yaml")
    params = params_from_state_dict(network, load_checkpoint(out / "digits_cnn.pth.tar")["state_dict"])
    sample, kat = np.load(out / "sample_digits_cnn.npy"), np.load(out / "kat-digits_cnn.npy")
    assert np.array_equal(np.asarray(simulate(network, params, sample)), kat)


def test_same_seed_gives_identical_weights(train):
    small = {"x": train["x"][:256], "labels": train["labels"][:256]}
    models = []
    for _ in range(2):
        model = _compiled(3).model
        FineTunePass(data=small, epochs=1, show_progress=False, seed=5)(model)
        models.append({v.name: const_array(v) for v in model.graph.initializers.values()})
    assert all(np.array_equal(models[0][k], models[1][k]) for k in models[0])


def test_holdout_split_is_seeded_and_disjoint():
    data = ArrayDataset({"x": np.arange(100, dtype=np.float32)[:, None]}, np.arange(100))
    a, b = split_holdout(data, 0.1, 0)
    assert a.num_samples == 90 and b.num_samples == 10
    assert not set(a.labels) & set(b.labels)
    assert np.array_equal(split_holdout(data, 0.1, 0)[1].labels, b.labels)


def test_bad_input_is_a_clear_error(train):
    model = _compiled(4).model
    with pytest.raises(DataError, match="fine-tune data has no 'labels' array"):
        FineTunePass(data={"x": train["x"][:64]}, epochs=1, show_progress=False)(model.clone())
    with pytest.raises(DataError, match=r"'labels' must be a 1-D integer array, got float32"):
        FineTunePass(data={"x": train["x"][:64], "labels": train["labels"][:64].astype(np.float32)}, epochs=1,
                     show_progress=False)(model.clone())
    with pytest.raises(DataError, match=r"labels span \[12, 12\] but the model.s first output has shape \[2, 10\]"):
        FineTunePass(data={"x": train["x"][:64], "labels": np.full(64, 12)}, epochs=1, holdout=0.0,
                     show_progress=False)(model.clone())
    with pytest.raises(FineTuneConfigError, match="fine-tune: epochs must be >= 1, got 0"):
        FineTunePass(epochs=0)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 3] y) {
        h = Gemm <transB = 1> (x, w, b)
        y = Hardmax (h)
    }
    """
    odd = normalize(make_model(text, {"w": np.ones((3, 4), np.float32), "b": np.zeros(3, np.float32)}))
    with pytest.raises(UnsupportedModelError, match=r"node '.*' \(Hardmax\): cannot be converted to torch"):
        GraphModule(odd)


def test_cli_finetune(tmp_path):
    out = tmp_path / "o"
    args = [str(DIGITS / "digits_cnn.onnx"), "--bits", "2", "--calib", str(DIGITS / "calib.npz"), "-o", str(out), "-q",
            "--finetune-data", str(DIGITS / "train.npz"), "--epochs", "1"]
    ok = CliRunner().invoke(app, args)
    assert ok.exit_code == 0, ok.output
    report = json.loads((out / "report.json").read_text())
    assert report["pipeline"][-1]["pass"] == "FineTunePass"
    bad = CliRunner().invoke(app, [*args[:-2], "--epochs", "0"])
    assert bad.exit_code == 2 and "fine-tune: epochs must be >= 1, got 0" in bad.output
    missing = CliRunner().invoke(app, [*args[:-4], "--finetune-data", str(DIGITS / "calib.npz")])
    assert missing.exit_code == 2 and "fine-tune data has no 'labels' array" in missing.output


def test_cli_gpfq_then_distillation_without_labels(tmp_path):
    """Unlabelled data distils from the float model (α = 1) after GPFQ rewrote the weights."""
    out = tmp_path / "o"
    args = [str(DIGITS / "digits_cnn.onnx"), "--bits", "4", "--calib", str(DIGITS / "calib.npz"), "-o", str(out), "-q",
            "--gpfq", "--finetune-data", str(DIGITS / "calib.npz"), "--finetune-distill", "mse",
            "--finetune-distill-weight", "1", "--epochs", "1", "--finetune-lr", "1e-4"]
    ok = CliRunner().invoke(app, args)
    assert ok.exit_code == 0, ok.output
    report = json.loads((out / "report.json").read_text())
    assert [p["pass"] for p in report["pipeline"]][-2:] == ["GPFQPass", "FineTunePass"]
    bad = CliRunner().invoke(app, [*args[:-2], "--finetune-distill-weight", "2"])
    assert bad.exit_code == 2 and "distill_weight must be in [0, 1], got 2.0" in bad.output


@pytest.fixture(scope="module")
def deadzone_allocated():
    """Seed 000's flow on digits: dead-zone candidates profiled for weights and activations,
    allocated at 2 bits per weight on average (ternary codebooks) and 8-bit activations."""
    from qcompiler.candidates import candidate_set
    from qcompiler.ir import load
    from qcompiler.passes import AllocateBitsPass, CalibratePass, ProfileErrorPass
    from qcompiler.passes.pipelines import canonical_pipeline
    from qcompiler.pipeline import run_pipeline

    model = load(DIGITS / "digits_cnn.onnx")
    calib = DIGITS / "calib.npz"
    run_pipeline(model, [*canonical_pipeline(), CalibratePass(data=calib, show_progress=False),
                         ProfileErrorPass(data=calib, candidates=tuple(candidate_set(bits=(2, 8), kinds=("deadzone",))),
                                          tensors="all", show_progress=False),
                         AllocateBitsPass(avg_bits=2.0, scope="weights", kinds=("deadzone",))])
    for value in model.graph.inputs:  # quantize the input activation with the 8-bit dead-zone codebook too
        ann.set(value, ann.BitWidth("deadzone:8:r0.1", "deadzone", 8, 0.0, 0.0, "test"))
    return model


def test_deadzone_codebooks_are_the_profiling_quantizers(deadzone_allocated):
    from qcompiler.candidates import apply, fit, parse_candidate
    from qcompiler.passes.calibrate import META_KEY

    module = GraphModule(deadzone_allocated)
    values = values_by_name(deadzone_allocated.graph)
    weights = [n for n in module.parameter_names() if n.replace(".", "__dot__") in module.weight_quantizers]
    assert len(weights) == 5
    for name in weights:
        w = const_array(values[name])
        chosen = ann.require(values[name], ann.BitWidth)
        assert chosen.kind == "deadzone" and chosen.bits == 2
        expected = apply(fit(parse_candidate(chosen.candidate), w, True), w)
        got = module.quantized_weight(name).detach().numpy()
        assert np.array_equal(got, expected) and len(np.unique(got)) <= 3
    # the input codebook is fitted on the calibration reservoir (as profiling fits it) and fixed
    x = values["x"]
    sample = x.meta[META_KEY].reservoir_sample()
    fitted = fit(parse_candidate("deadzone:8:r0.1"), sample, False, None, ann.require(x, ann.TensorStats).absmax)
    probe = torch.linspace(-0.5, 20.0, 999, dtype=torch.float64)
    assert np.array_equal(module.activation_quantizers["x"](probe).numpy(), apply(fitted, probe.numpy()))
    # gradients flow through the codebook (STE) inside the largest level, not beyond it
    w = module.params[weights[0].replace(".", "__dot__")]
    module.quantized_weight(weights[0]).sum().backward()
    assert w.grad is not None and bool((w.grad != 0).any())


def test_finetune_with_fixed_deadzone_codebooks(deadzone_allocated, digits_eval, train):
    """Seed 000 step 7: QAT with the fixed codebooks and STE; ternary weights recover."""
    from qcompiler.passes.finetune import evaluate_top1

    from qcompiler.passes.calibrate import META_KEY

    model = deadzone_allocated.clone()
    model.graph.inputs[0].meta.pop(META_KEY, None)  # no calibration sample: fitted on the training data
    assert list(GraphModule(model).pending_codebooks) == ["x"]
    eval_set = ArrayDataset({"x": digits_eval["x"]}, digits_eval["labels"], "eval")
    before = evaluate_top1(GraphModule(model), eval_set, 256)
    FineTunePass(data=train, epochs=3, lr=2e-3, show_progress=False)(model)
    values = values_by_name(model.graph)
    books = {name: ann.require(values[name], ann.Codebook) for name in ("x", *[n for n in GraphModule(model).parameter_names() if n.endswith("weight")])}
    assert all(b.candidate.startswith("deadzone:") for b in books.values())
    after = evaluate_top1(GraphModule(model), eval_set, 256)
    assert before < 0.93 and after > 0.97, (before, after)
    for name in [n for n in GraphModule(model).parameter_names() if n.endswith("weight")]:  # the written weights lie on their codebooks
        assert len(np.unique(const_array(values[name]))) <= 3


def test_greedy_wl_search_retrains_between_cuts(train, digits_eval):
    """Seed 002's tune_model: a cut that overshoots max_loss is retrained instead of undone, so
    the search compresses further at the same accuracy limit."""
    from qcompiler.api import accuracy_metric
    from qcompiler.ir import load
    from qcompiler.passes import CalibratePass
    from qcompiler.passes.greedy_allocate import GreedyAllocatePass
    from qcompiler.passes.pipelines import canonical_pipeline
    from qcompiler.pipeline import run_pipeline
    from qcompiler.targets import get_target

    backend, config = get_target("fixed-point"), TargetConfig()
    eval_set = ArrayDataset({"x": digits_eval["x"][:270]}, digits_eval["labels"][:270], "eval")
    small = {"x": train["x"][:640], "labels": train["labels"][:640]}

    def prepare(model):
        for pass_ in backend.passes(config):
            pass_(model)

    results = {}
    for name, tune in (("plain", None), ("tuned", FineTunePass(data=small, epochs=1, holdout=0.0, patience=0, lr=2e-3,
                                                               show_progress=False))):
        model = load(DIGITS / "digits_cnn.onnx")
        metric, _ = accuracy_metric(backend, config, model.clone(), eval_set, 270)
        run_pipeline(model, [*canonical_pipeline(), CalibratePass(data=DIGITS / "calib.npz", show_progress=False)])
        before = {n: const_array(v).copy() for n, v in values_by_name(model.graph).items() if n.endswith("weight")}
        GreedyAllocatePass(metric=metric, max_loss=0.02, target_compression=0.07, legal_bits=(1, 2, 3, 4, 5, 6, 7, 8),
                           tune=tune, prepare=prepare)(model)
        log = ann.require(model, ann.WordLengthSearchLog)
        changed = any(not np.array_equal(before[n], const_array(v)) for n, v in values_by_name(model.graph).items() if n in before)
        results[name] = (log.steps[-1]["compression"], log.steps[-1]["loss"], [s["phase"] for s in log.steps], changed)
    plain, tuned = results["plain"], results["tuned"]
    assert "tune" not in plain[2] and not plain[3]
    assert "tune" in tuned[2] and tuned[3]  # retrained weights became the model's weights
    assert tuned[0] < plain[0] - 0.005 and tuned[1] <= 0.02, results


def test_cli_tune_cuts_needs_training_data_and_the_greedy_search(tmp_path):
    runner = CliRunner()
    base = [str(DIGITS / "digits_cnn.onnx"), "--calib", str(DIGITS / "calib.npz"), "--eval", str(DIGITS / "eval.npz"),
            "-q", "-o", str(tmp_path / "out")]
    result = runner.invoke(app, [*base, "--allocator", "greedy", "--max-loss", "0.01", "--tune-cuts"])
    assert result.exit_code == 2 and "--finetune-data" in result.output
    result = runner.invoke(app, [*base, "--avg-bits", "4", "--tune-cuts", "--finetune-data", str(DIGITS / "train.npz")])
    assert result.exit_code == 2 and "greedy" in result.output
    assert not (tmp_path / "out").exists()


def test_module_lowered_from_torch_is_trained_in_place(train, tmp_path):
    """FineTunePass(module=...) writes the trained weights into the source nn.Module, folded
    BatchNorms become the identity, and lowering the module again gives the fine-tuned weights."""
    from qcompiler.frontend import lower
    from qcompiler.passes.pipelines import canonical_pipeline
    from qcompiler.pipeline import run_pipeline

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 16 * 16, 10),
    )
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    model = lower(net, [torch.zeros(2, 1, 16, 16)], input_names=["x"])
    data = {"x": train["x"][:512], "labels": train["labels"][:512]}
    result = compile_model(model, "fixed-point", CompileConfig(
        calib={"x": train["x"][:128]}, target=TargetConfig(weight_bits=4), show_progress=False,
        finetune=FineTunePass(data=data, epochs=2, lr=3e-3, show_progress=False, module=net)))
    assert not torch.equal(before["0.weight"], net.state_dict()["0.weight"])
    x = torch.from_numpy(train["x"][600:700])
    with torch.no_grad():
        ours = net(x).numpy()
        expected = GraphModule(result.model, quantize=False)(x=x)[0].numpy()
    assert np.allclose(ours, expected, atol=1e-4), np.abs(ours - expected).max()
    assert torch.equal(net.state_dict()["1.weight"], torch.ones(8)) and torch.equal(net.state_dict()["4.running_mean"], torch.zeros(8))
    again = lower(net, [torch.zeros(2, 1, 16, 16)], input_names=["x"])
    run_pipeline(again, canonical_pipeline())
    tuned = values_by_name(result.model.graph)
    for name in ("0.weight", "3.weight", "7.weight"):
        assert np.allclose(const_array(values_by_name(again.graph)[name]), const_array(tuned[name]), atol=1e-6), name


def test_write_into_module_names_a_missing_parameter():
    from qcompiler.errors import QCompilerError
    from qcompiler.passes.finetune import write_into_module

    model = _compiled(8).model
    with pytest.raises(QCompilerError, match="no parameter or buffer '0.weight'"):
        write_into_module(model, torch.nn.Linear(2, 2))


def test_finetune_takes_a_torch_dataloader(train):
    """The training data may be a torch DataLoader of (inputs, labels) or of feed dicts."""
    from torch.utils.data import DataLoader, TensorDataset

    from qcompiler.data import load_dataset

    model = _compiled(4).model
    x, y = torch.from_numpy(train["x"][:200]), torch.from_numpy(train["labels"][:200])
    pairs = DataLoader(TensorDataset(x, y), batch_size=64)
    dataset = load_dataset(pairs, model)
    assert dataset.num_samples == 200 and np.array_equal(dataset.labels, train["labels"][:200])
    dicts = [{"x": x[i:i + 50], "labels": y[i:i + 50]} for i in range(0, 200, 50)]
    assert np.array_equal(load_dataset(dicts, model).arrays["x"], train["x"][:200])
    tuned = model.clone()
    FineTunePass(data=pairs, epochs=1, show_progress=False)(tuned)
    assert ann.require(tuned, ann.FineTuneLog).epochs[0]["epoch"] == 1
    with pytest.raises(DataError, match="batch 0: expected a feed mapping or an"):
        load_dataset([x[:4]], model)
