"""MeasureAllocationPass: the joint distortion of an allocation, against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qcompiler import annotations as ann
from qcompiler.candidates import apply, parse_candidate
from qcompiler.graph import values_by_name
from qcompiler.passes import MeasureAllocationPass, ProfileErrorPass
from qcompiler.passes.measure_allocation import joint_distortion
from qcompiler.passes.profile_errors import activation_sample, fit_activation, fit_weight
from tests.test_profile import CANDIDATES, DATA, INITS, _model


def _choose(model, chosen: dict[str, str]) -> None:
    values = values_by_name(model.graph)
    for name, label in chosen.items():
        c = parse_candidate(label)
        ann.set(values[name], ann.BitWidth(candidate=label, kind=c.kind, bits=c.bits, rate=0.0, distortion=0.0,
                                           method="test"))
    ann.set(model, ann.AllocationSummary(method="test", rate_model="fixed", scope="all", budget_bits=1.0,
                                         used_bits=1.0, elements=1, predicted_distortion=1.0))


@pytest.fixture(scope="module")
def profiled():
    model = _model()
    ProfileErrorPass(data=DATA, candidates=CANDIDATES, batch_size=16, show_progress=False)(model)
    return model


@pytest.mark.parametrize("name, label", [("w2", "fixed:3"), ("w3", "deadzone:2:r0.3"), ("r1", "uniform:3"),
                                         ("f", "deadzone:3:r0.3"), ("x", "fixed:2")])
def test_one_allocated_tensor_measures_its_profile_point(profiled, name: str, label: str) -> None:
    """With one tensor allocated, the joint measurement is that tensor's exact profile point
    (the suffix engine, another code path): r1 feeds both the second conv and the Add."""
    model = profiled.clone()
    _choose(model, {name: label})
    profile = ann.get(values_by_name(profiled.graph)[name], ann.ErrorProfile)
    for value in values_by_name(model.graph).values():  # clone() drops meta: carry the reservoirs
        value.meta.update(values_by_name(profiled.graph)[value.name].meta)
    got = joint_distortion(model, DATA, batch_size=16)
    np.testing.assert_allclose(got, profile.distortion[profile.candidates.index(label)], rtol=1e-9)


def test_joint_measurement_equals_a_torch_forward_with_every_tensor_quantized(profiled) -> None:
    chosen = {"w1": "fixed:3", "w2": "uniform:2", "w3": "deadzone:3:r0.3", "r1": "uniform:3", "f": "fixed:4"}
    model = profiled.clone()
    for value in values_by_name(model.graph).values():
        value.meta.update(values_by_name(profiled.graph)[value.name].meta)
    _choose(model, chosen)
    MeasureAllocationPass(data=DATA, batch_size=16)(model)
    got = ann.require(model, ann.AllocationSummary).measured_distortion

    values = values_by_name(model.graph)
    layers = {layer.weight: layer for n in model.graph if (layer := ann.get(n, ann.QuantizableLayer))}
    w = {n: apply(fit_weight(parse_candidate(chosen[n]), INITS[n], layers[n].channel_axis), INITS[n]) for n in ("w1", "w2", "w3")}
    q = {n: fit_activation(parse_candidate(chosen[n]), values[n], activation_sample(values[n], None)) for n in ("r1", "f")}
    t = lambda a: torch.from_numpy(np.asarray(a, np.float32))  # noqa: E731
    x = t(DATA.arrays["x"])

    def forward(w1, w2, w3, quantize):
        r1 = quantize("r1", torch.relu(F.conv2d(x, t(w1), t(INITS["b1"]), padding=1)))
        r2 = torch.relu(F.conv2d(r1, t(w2), padding=1) + r1)
        f = quantize("f", r2.flatten(1))
        return (f @ t(w3).T + t(INITS["b3"])).double().numpy()

    ref = forward(INITS["w1"], INITS["w2"], INITS["w3"], lambda n, v: v)
    out = forward(w["w1"], w["w2"], w["w3"], lambda n, v: t(apply(q[n], v.numpy())))
    np.testing.assert_allclose(got, np.mean((out - ref) ** 2), rtol=1e-5)
    assert got > 0


def test_the_compile_report_gives_the_additivity_ratio(tmp_path) -> None:
    from typer.testing import CliRunner

    from qcompiler.cli import app
    from tests.conftest import DIGITS

    out = tmp_path / "o"
    result = CliRunner().invoke(app, [str(DIGITS / "digits_cnn.onnx"), "--calib", str(DIGITS / "calib.npz"),
                                      "--avg-bits", "4", "--allocate", "all", "-q", "-o", str(out)])
    assert result.exit_code == 0, result.output
    import json

    allocation = json.loads((out / "report.json").read_text())["allocation"]
    assert allocation["measured_distortion"] > 0
    assert allocation["additivity_ratio"] == pytest.approx(allocation["measured_distortion"] / allocation["predicted_distortion"])
    assert 0.2 < allocation["additivity_ratio"] < 5
    page = (out / "report.html").read_text()
    assert f"(additivity ratio {allocation['additivity_ratio']:.2f})" in page


def test_measuring_needs_an_allocation() -> None:
    from qcompiler.pipeline import PipelineError, run_pipeline

    with pytest.raises(PipelineError, match="no AllocationSummary"):
        run_pipeline(_model(), [MeasureAllocationPass(data=DATA)])
