"""AllocateBitsPass on profiled models, mixed precision through the fixed-point target."""

from __future__ import annotations

import numpy as np
import pytest

from qcompiler import annotations as ann
from qcompiler.allocation import AllocationError
from qcompiler.api import CompileConfig, compile_model
from qcompiler.candidates import candidate_set
from qcompiler.data import ArrayDataset
from qcompiler.graph import values_by_name
from qcompiler.ir import normalize
from qcompiler.passes import AllocateBitsPass, CalibratePass, DetectLayersPass, ProfileErrorPass
from qcompiler.pipeline import PipelineError, run_pipeline
from qcompiler.targets import TargetConfig
from tests.conftest import DIGITS, make_model

TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 8] x) => (float[N, 4] y) {
    h = Gemm <transB = 1> (x, w1)
    r = Relu (h)
    y = Gemm <transB = 1> (r, w2)
}
"""
RNG = np.random.default_rng(4)
INITS = {"w1": RNG.normal(size=(64, 8)).astype(np.float32), "w2": RNG.normal(0, 0.1, size=(4, 64)).astype(np.float32)}
DATA = ArrayDataset({"x": RNG.normal(size=(64, 8)).astype(np.float32)})


@pytest.fixture(scope="module")
def profiled():
    model = normalize(make_model(TEXT, INITS))
    run_pipeline(model, [DetectLayersPass(), CalibratePass(data=DATA, show_progress=False),
                         ProfileErrorPass(data=DATA, candidates=tuple(candidate_set(bits=(2, 3, 4, 8), kinds=("fixed", "uniform"))),
                                          tensors="all", show_progress=False)])
    return model


def _run(model, **kwargs):
    clone = model.clone()
    AllocateBitsPass(**kwargs)(clone)
    values = values_by_name(clone.graph)
    return clone, {n: ann.get(values[n], ann.BitWidth) for n in ("w1", "w2", "x", "r")}


def test_budget_is_respected_and_matches_the_curves(profiled):
    model, chosen = _run(profiled, avg_bits=3.0)
    summary = ann.require(model, ann.AllocationSummary)
    assert summary.elements == 512 + 256 and summary.budget_bits == 3.0 * 768
    assert summary.used_bits <= summary.budget_bits
    assert chosen["x"] is None and chosen["r"] is None  # scope: weights
    assert chosen["w1"].kind == "fixed" and chosen["w1"].rate == chosen["w1"].bits * 512
    assert summary.used_bits == chosen["w1"].rate + chosen["w2"].rate
    profile = ann.get(values_by_name(model.graph)["w2"], ann.ErrorProfile)
    assert chosen["w2"].distortion == profile.distortion[profile.candidates.index(chosen["w2"].candidate)]


def test_knapsack_never_worse_than_pareto_and_uniform(profiled):
    results = {}
    for method in ("knapsack", "pareto", "uniform", "hull-fill"):
        model, _ = _run(profiled, avg_bits=3.0, method=method)
        results[method] = ann.require(model, ann.AllocationSummary).predicted_distortion
    assert results["knapsack"] <= results["pareto"] + 1e-12
    assert results["knapsack"] <= results["uniform"] + 1e-12
    assert results["knapsack"] <= results["hull-fill"] + 1e-12


def test_legal_sets_and_scope_all(profiled):
    _, chosen = _run(profiled, avg_bits=8.0, legal_bits=(2, 4))
    assert chosen["w1"].bits in (2, 4) and chosen["w2"].bits in (2, 4)
    _, chosen = _run(profiled, avg_bits=5.0, scope="all", legal_activation_bits=(8,))
    assert chosen["x"].bits == 8 and chosen["r"].bits == 8
    _, chosen = _run(profiled, total_bytes=200, kinds=("uniform",))
    assert chosen["w1"].kind == "uniform" and (chosen["w1"].rate + chosen["w2"].rate) <= 1600


def test_bad_budgets(profiled):
    with pytest.raises(AllocationError, match="impossible budget"):
        _run(profiled, avg_bits=1.0)
    with pytest.raises(AllocationError, match="no profiled candidate is legal"):
        _run(profiled, avg_bits=4.0, legal_bits=(5,))
    with pytest.raises(ValueError, match="give avg_bits or total_bytes"):
        AllocateBitsPass()
    with pytest.raises(ValueError, match="unknown allocator"):
        AllocateBitsPass(avg_bits=3, method="magic")
    bare = normalize(make_model(TEXT, INITS))
    DetectLayersPass()(bare)
    with pytest.raises(PipelineError, match="run ProfileErrorPass first"):
        run_pipeline(bare, [AllocateBitsPass(avg_bits=4)])


def test_mixed_precision_compile_on_digits():
    config = CompileConfig(calib=DIGITS / "calib.npz", eval=DIGITS / "eval.npz", show_progress=False,
                           target=TargetConfig(avg_bits=3.5, allocator="knapsack"))
    result = compile_model(DIGITS / "digits_cnn.onnx", "fixed-point", config)
    report = result.report
    bits = [layer["weight_bits"] for layer in report["layers"]]
    assert len(set(bits)) > 1  # really mixed
    weights = sum(layer["weight_shape"][0] * int(np.prod(layer["weight_shape"][1:])) for layer in report["layers"])
    assert report["allocation"]["used_bits"] <= 3.5 * weights
    assert sum(b * int(np.prod(l["weight_shape"])) for b, l in zip(bits, report["layers"])) == report["allocation"]["used_bits"]
    # the emitted QDQ model keeps each layer's integer codes inside its word length
    inits = result.simulation_model.graph.initializers
    for layer in report["layers"]:
        codes = inits[f"{layer['weight']}_quantized"].const_value.numpy()
        lim = 2 ** (layer["weight_bits"] - 1)
        assert codes.min() >= -lim and codes.max() <= lim - 1
    assert report["metrics"]["simulated"]["top1"] >= report["metrics"]["float"]["top1"] - 0.01


def test_max_loss_bisection_with_a_synthetic_oracle(profiled):
    from qcompiler.passes.max_loss_allocate import MaxLossAllocatePass

    calls = []

    def oracle(model):  # accuracy rises with the allocated bits: monotone in the budget
        summary = ann.require(model, ann.AllocationSummary)
        calls.append(summary.used_bits / summary.elements)
        return 1.0 - 0.5 * 2.0 ** (-(summary.used_bits / summary.elements))

    model = profiled.clone()
    MaxLossAllocatePass(metric=oracle, reference=1.0, max_loss=0.05, allocate=AllocateBitsPass(avg_bits=8.0),
                        probes=8)(model)
    search = ann.require(model, ann.AccuracySearch)
    assert len(calls) <= 8 and len(search.probes) == len(calls)
    summary = ann.require(model, ann.AllocationSummary)
    # the kept budget meets the loss, and no cheaper probed budget did
    assert 0.5 * 2.0 ** (-(summary.used_bits / summary.elements)) <= 0.05 + 1e-12
    feasible = [avg for avg, loss in search.probes if loss <= 0.05]
    assert search.chosen_avg_bits == min(feasible)


def test_max_loss_that_cannot_be_met(profiled):
    from qcompiler.errors import QCompilerError
    from qcompiler.passes.max_loss_allocate import MaxLossAllocatePass

    with pytest.raises(QCompilerError, match="cannot be met"):
        MaxLossAllocatePass(metric=lambda m: 0.0, reference=1.0, max_loss=0.01,
                            allocate=AllocateBitsPass(avg_bits=8.0))(profiled.clone())


def test_max_loss_cli(tmp_path):
    from typer.testing import CliRunner

    from qcompiler.cli import app

    out = tmp_path / "ml"
    result = CliRunner().invoke(app, [str(DIGITS / "digits_cnn.onnx"), "--calib", str(DIGITS / "calib.npz"),
                                      "--eval", str(DIGITS / "eval.npz"), "--max-loss", "0.01", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    import json

    report = json.loads((out / "report.json").read_text())
    search = report["allocation"]["max_loss_search"]
    assert report["metrics"]["float"]["top1"] - report["metrics"]["simulated"]["top1"] <= 0.01 + 1e-9
    assert len(search["probes"]) <= 8 and search["chosen_avg_bits"] < 8
    missing = CliRunner().invoke(app, [str(DIGITS / "digits_cnn.onnx"), "--calib", str(DIGITS / "calib.npz"),
                                       "--max-loss", "0.01", "-o", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "--max-loss needs held-out data with labels" in missing.output


def test_log2_rate_model_counts_the_codes_each_candidate_can_produce(profiled):
    """Seed 000's rate N·log2 L: a signed 4-bit uniform weight has 15 codes, fixed point 16."""
    model, chosen = _run(profiled, avg_bits=3.0, rate_model="log2", kinds=("fixed", "uniform"))
    profile = ann.get(values_by_name(profiled.graph)["w1"], ann.ErrorProfile)
    log2 = dict(zip(profile.candidates, profile.rate_log2))
    assert log2["uniform:4"] == pytest.approx(512 * np.log2(15)) and log2["fixed:4"] == pytest.approx(512 * 4)
    summary = ann.require(model, ann.AllocationSummary)
    assert summary.rate_model == "log2" and summary.used_bits <= 3.0 * 768
    assert summary.used_bits == pytest.approx(chosen["w1"].rate + chosen["w2"].rate)
    old = profiled.clone()  # a profile written before log2 rates existed
    for value in values_by_name(old.graph).values():
        if (p := ann.get(value, ann.ErrorProfile)) is not None:
            ann.set(value, __import__("dataclasses").replace(p, rate_log2=()))
    with pytest.raises(PipelineError, match="no log2 rates"):
        run_pipeline(old, [AllocateBitsPass(avg_bits=3.0, rate_model="log2")])
