"""The annotation schema: JSON form, versions, access helpers, round trips through files."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest

from qcompiler import annotations as ann
from qcompiler.errors import AnnotationError
from qcompiler.ir import load, save
from tests.conftest import make_model

TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 3] y) {
    y = Gemm <transB = 1> (x, w)
}
"""


def _model():
    return make_model(TEXT, {"w": np.arange(12, dtype=np.float32).reshape(3, 4)})


def test_json_is_compact_sorted_and_versioned():
    fp = ann.FixedPoint(wl=8, fl=(3, 4), signed=True, axis=0)
    text = fp.to_json()
    assert text == '{"axis":0,"fl":[3,4],"rule":"minmax","signed":true,"v":1,"wl":8}'
    assert ann.FixedPoint.from_json(text) == fp


def test_unknown_version_and_fields_are_refused():
    with pytest.raises(AnnotationError, match="schema version 99"):
        ann.FixedPoint.from_json('{"v":99,"wl":8,"fl":3}')
    with pytest.raises(AnnotationError, match="unknown fields"):
        ann.FixedPoint.from_json('{"v":1,"wl":8,"fl":3,"colour":"red"}')
    with pytest.raises(AnnotationError, match="not valid JSON"):
        ann.FixedPoint.from_json("{oops")


def test_non_finite_values_are_refused():
    with pytest.raises(AnnotationError, match="not finite"):
        ann.TensorStats(count=1, samples=1, min=float("nan"), max=1.0, absmax=1.0, mean=0.0, std=0.0).to_json()
    with pytest.raises(AnnotationError, match="inf is not finite"):  # inside a per-channel tuple
        ann.TensorStats(count=1, samples=1, min=0.0, max=1.0, absmax=1.0, mean=0.0, std=0.0,
                        channel_axis=1, channel_min=(0.0, float("inf"))).to_json()


def test_annotations_are_frozen():
    fp = ann.FixedPoint(wl=8, fl=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fp.wl = 4  # type: ignore[misc]


def test_get_set_remove_require_on_every_level():
    model = _model()
    node = next(iter(model.graph))
    w = model.graph.initializers["w"]
    x = model.graph.inputs[0]
    assert ann.get(node, ann.FixedPoint) is None
    with pytest.raises(AnnotationError, match=r"node .* has no pkg.qcompiler.fixed_point annotation \(needed by test\)"):
        ann.require(node, ann.FixedPoint, where="test")
    ann.set(w, ann.FixedPoint(wl=4, fl=(2, 2, 1), axis=0))
    ann.set(x, ann.FixedPoint(wl=8, fl=5, signed=False))
    ann.set(model, ann.Provenance(entries=({"pass": "P()", "modified": True},)))
    assert ann.require(w, ann.FixedPoint).fl == (2, 2, 1)
    ann.remove(x, ann.FixedPoint)
    assert ann.get(x, ann.FixedPoint) is None


def test_round_trip_through_save_and_load(tmp_path):
    model = _model()
    node = next(iter(model.graph))
    layer = ann.QuantizableLayer(
        op="Gemm", weight="w", bias=None, activation_input="x", output="y", channel_axis=0, weight_shape=(3, 4)
    )
    stats = ann.TensorStats(count=8, samples=2, min=-1.5, max=2.25, absmax=2.25, mean=0.1, std=0.7,
                            channel_axis=1, channel_min=(-1.5, 0.0), channel_max=(2.25, 1.0))
    ann.set(node, layer)
    ann.set(model.graph.inputs[0], stats)
    ann.set(model.graph.initializers["w"], ann.FixedPoint(wl=8, fl=(5, 4, 4), axis=0))
    ann.set(model.graph.outputs[0], ann.FixedPoint(wl=16, fl=10))
    ann.set(model, ann.Provenance(entries=({"pass": "X()", "modified": False},)))
    path = tmp_path / "m.onnx"
    save(model, path)
    onnx.checker.check_model(onnx.load(str(path)))  # annotations never break the checker
    back = load(path)
    assert ann.get(next(iter(back.graph)), ann.QuantizableLayer) == layer
    assert ann.get(back.graph.inputs[0], ann.TensorStats) == stats
    assert ann.get(back.graph.initializers["w"], ann.FixedPoint).fl == (5, 4, 4)
    assert ann.get(back.graph.outputs[0], ann.FixedPoint) == ann.FixedPoint(wl=16, fl=10)
    assert ann.dump(back) == ann.dump(model)
    dumped = ann.dump(back)
    assert dumped["values"]["w"]["pkg.qcompiler.fixed_point"]["fl"] == [5, 4, 4]
    assert dumped["model"]["pkg.qcompiler.provenance"]["entries"][0]["pass"] == "X()"


def test_fixed_point_helpers():
    fp = ann.FixedPoint(wl=4, fl=(2, -1), axis=0)
    assert fp.scales() == (0.25, 2.0)
    assert fp.code_range() == (-8, 7)
    assert ann.FixedPoint(wl=4, fl=0, signed=False).code_range() == (0, 15)
