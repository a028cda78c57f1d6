"""The float originals of rewritten weights: GPFQ and fine-tuning keep them, distillation's teacher uses them."""

from __future__ import annotations

import numpy as np
import pytest

from qcompiler import annotations as ann
from qcompiler.float_reference import FLOAT_META, NoFloatReferenceError, float_model
from qcompiler.graph import const_array
from qcompiler.ir import load_normalized, save
from qcompiler.passes.gpfq import GPFQPass
from qcompiler.passes.pipelines import canonical_pipeline
from qcompiler.pipeline import PipelineError, run_pipeline
from qcompiler.runtime import Runner
from tests.test_gpfq import grouped_data, grouped_model

pytest.importorskip("torch")

from qcompiler.passes.finetune import FineTunePass, _teacher_logits  # noqa: E402


@pytest.fixture(scope="module")
def rewritten():
    """The grouped test model in float, and rewritten at 3 bits with bias correction (which adds a
    bias to the Conv ``c2``: it has none)."""
    reference = run_pipeline(grouped_model(), canonical_pipeline()).model
    model = run_pipeline(reference.clone(), [GPFQPass(data=grouped_data(), bits=3, bias_correction="all",
                                                      show_progress=False)]).model
    return reference, model


def test_gpfq_records_every_initializer_it_changed(rewritten):
    reference, model = rewritten
    before = reference.graph.initializers
    changed = {name for name, value in model.graph.initializers.items()
               if name not in before or not np.array_equal(const_array(value), const_array(before[name]))}
    assert {"w1", "w2", "w3", "b1"} <= changed  # the weights, and the corrected bias
    assert any(name not in before for name in changed)  # the bias added to c2
    assert {name for name, value in model.graph.initializers.items() if FLOAT_META in value.meta} == changed


def test_float_model_computes_the_float_network(rewritten):
    reference, model = rewritten
    x = grouped_data(16).arrays["x"]
    want = Runner(reference).run({"x": x})["y"]
    assert np.abs(Runner(model).run({"x": x})["y"] - want).max() > 1e-3  # the rewrite changed the outputs
    np.testing.assert_allclose(Runner(float_model(model)).run({"x": x})["y"], want, rtol=1e-5, atol=1e-5)
    assert ann.get(model.graph.initializers["w1"], ann.IntegerWeights) is not None  # model itself untouched


def test_distillation_teacher_is_the_float_model_and_survives_fine_tuning(rewritten):
    reference, model = rewritten
    data = grouped_data(32)
    want = Runner(reference).run({"x": data.arrays["x"]})["y"]
    np.testing.assert_allclose(_teacher_logits(model, data, 16), want, rtol=1e-5, atol=1e-5)
    tuned = run_pipeline(model.clone(), [FineTunePass(data=data, distill="mse", distill_weight=1.0, holdout=0,
                                                      epochs=1, show_progress=False)]).model
    # a second distillation after fine-tuning still learns from the float model
    np.testing.assert_allclose(_teacher_logits(tuned, data, 16), want, rtol=1e-5, atol=1e-5)


def test_a_reloaded_rewrite_has_no_float_reference(rewritten, tmp_path):
    _, model = rewritten
    save(model, tmp_path / "gpfq.onnx")
    loaded = load_normalized(tmp_path / "gpfq.onnx")
    with pytest.raises(NoFloatReferenceError, match="'w1'.*gpfq") as err:
        float_model(loaded)
    assert "\n" not in str(err.value)
    with pytest.raises(PipelineError, match="float original is not available"):
        run_pipeline(loaded, [FineTunePass(data=grouped_data(32), distill="mse", distill_weight=1.0, holdout=0,
                                           epochs=1, show_progress=False)])
