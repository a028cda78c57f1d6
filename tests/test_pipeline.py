"""The pipeline runner: provenance, statistics, IR dumps, one-line failures."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

from qcompiler import annotations as ann
from qcompiler.errors import UnsupportedModelError
from qcompiler.ir import load, normalize
from qcompiler.passes import CanonicalizePass, DetectLayersPass
from qcompiler.pipeline import PipelineError, run_pipeline
from tests.conftest import make_model

TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 3] y) {
    i = Identity (x)
    y = Gemm <transB = 1> (i, w)
}
"""


def _model():
    return normalize(make_model(TEXT, {"w": np.ones((3, 4), np.float32)}))


@dataclasses.dataclass(frozen=True)
class ExplodingPass(ir.passes.InPlacePass):
    message: str = "boom"

    def call(self, model):
        raise UnsupportedModelError(self.message)


@dataclasses.dataclass(frozen=True)
class NeedsNothingPass(ir.passes.InPlacePass):
    def requires(self, model):
        raise ir.passes.PreconditionError("the model lacks pkg.qcompiler.stats on value 'x'")

    def call(self, model):  # pragma: no cover - never reached
        return ir.passes.PassResult(model, False)


def test_provenance_and_stats(tmp_path):
    result = run_pipeline(_model(), [CanonicalizePass(), DetectLayersPass()], dump_ir=tmp_path / "ir")
    entries = ann.require(result.model, ann.Provenance).entries
    assert [e["pass"] for e in entries] == [
        "CanonicalizePass(fold_constants=True, reshape_to_flatten=True)",
        "DetectLayersPass(require_any=True, keep_float=())",
    ]
    assert [s.name for s in result.stats] == ["CanonicalizePass", "DetectLayersPass"]
    first = result.stats[0]
    assert first.nodes_before == 2 and first.nodes_after == 1 and first.modified and first.seconds >= 0
    assert result.stats[1].annotated == 1
    dumped = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert dumped == ["00_CanonicalizePass.onnx", "01_DetectLayersPass.onnx"]
    reloaded = load(tmp_path / "ir" / "01_DetectLayersPass.onnx")
    assert ann.dump(reloaded) == ann.dump(result.model)


def test_failure_is_one_line_naming_pass_and_root_cause():
    with pytest.raises(PipelineError) as info:
        run_pipeline(_model(), [CanonicalizePass(), ExplodingPass("weights are on fire")])
    assert str(info.value) == "pass ExplodingPass failed: weights are on fire"
    assert info.value.pass_name == "ExplodingPass"


def test_precondition_failure_reaches_the_root():
    with pytest.raises(PipelineError, match=r"^pass NeedsNothingPass failed: the model lacks pkg.qcompiler.stats on value 'x'$"):
        run_pipeline(_model(), [NeedsNothingPass()])
