"""Canonicalisation, BatchNorm folding and layer detection: structure and numerics."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from qcompiler import annotations as ann
from qcompiler.errors import UnsupportedModelError
from qcompiler.ir import normalize, to_bytes
from qcompiler.passes import CanonicalizePass, DetectLayersPass, FoldBatchNormPass
from qcompiler.passes.detect_layers import find_layers
from qcompiler.passes.fold_batchnorm import foldable
from tests.conftest import make_model

RNG = np.random.default_rng(0)


def _run(model, feeds):
    return ort.InferenceSession(to_bytes(model)).run(None, feeds)[0]


def _bn_params(c):
    return {
        "g": RNG.uniform(0.5, 1.5, c).astype(np.float32),
        "b": RNG.normal(size=c).astype(np.float32),
        "m": RNG.normal(size=c).astype(np.float32),
        "v": RNG.uniform(0.2, 2.0, c).astype(np.float32),
    }


CONV_BN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3, 6, 6] x) => (float[N, 4, 6, 6] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w)
    y = BatchNormalization <epsilon = 0.001> (c, g, b, m, v)
}
"""


def test_fold_conv_bn_without_bias_preserves_outputs():
    inits = {"w": RNG.normal(size=(4, 3, 3, 3)).astype(np.float32), **_bn_params(4)}
    model = normalize(make_model(CONV_BN, inits))
    x = {"x": RNG.normal(size=(2, 3, 6, 6)).astype(np.float32)}
    before = _run(model, x)
    result = FoldBatchNormPass()(model)
    assert result.modified
    assert [n.op_type for n in model.graph] == ["Conv"]
    assert model.graph.outputs[0].name == "y"
    assert np.allclose(_run(model, x), before, atol=1e-5)
    # standard formula, checked directly
    k = inits["g"] / np.sqrt(inits["v"] + 1e-3)
    conv = next(iter(model.graph))
    assert np.allclose(conv.inputs[1].const_value.numpy(), inits["w"] * k[:, None, None, None], rtol=1e-6)
    assert np.allclose(conv.inputs[2].const_value.numpy(), inits["b"] - inits["m"] * k, rtol=1e-5, atol=1e-6)
    # the BatchNormalization's parameters go with it; the annotation keeps their names
    assert sorted(model.graph.initializers) == sorted(v.name for v in conv.inputs[1:])
    folded = ann.require(conv, ann.FoldedBatchNorm)
    assert (folded.scale, folded.shift, folded.mean, folded.var) == ("g", "b", "m", "v")


GEMM_BN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 5] x) => (float[N, 3] y) {
    h = Gemm <transB = 0, alpha = 0.5> (x, w, bias)
    y = BatchNormalization (h, g, b, m, v)
}
"""


def test_fold_gemm_bn_with_alpha_and_untransposed_weight():
    inits = {"w": RNG.normal(size=(5, 3)).astype(np.float32), "bias": RNG.normal(size=3).astype(np.float32), **_bn_params(3)}
    model = normalize(make_model(GEMM_BN, inits))
    x = {"x": RNG.normal(size=(4, 5)).astype(np.float32)}
    before = _run(model, x)
    FoldBatchNormPass()(model)
    assert [n.op_type for n in model.graph] == ["Gemm"]
    assert np.allclose(_run(model, x), before, atol=1e-5)


SHARED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3, 4, 4] x) => (float[N, 3, 4, 4] y, float[N, 3, 4, 4] z) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w)
    y = BatchNormalization (c, g, b, m, v)
    z = Conv <pads = [1, 1, 1, 1]> (x, w)
}
"""


def test_shared_weight_gets_its_own_folded_copy():
    inits = {"w": RNG.normal(size=(3, 3, 3, 3)).astype(np.float32), **_bn_params(3)}
    model = normalize(make_model(SHARED, inits))
    x = {"x": RNG.normal(size=(1, 3, 4, 4)).astype(np.float32)}
    sess = ort.InferenceSession(to_bytes(model))
    before = sess.run(None, x)
    FoldBatchNormPass()(model)
    after = ort.InferenceSession(to_bytes(model)).run(None, x)
    assert np.allclose(after[0], before[0], atol=1e-5) and np.allclose(after[1], before[1], atol=1e-6)
    assert np.array_equal(model.graph.initializers["w"].const_value.numpy(), inits["w"])
    assert sorted(model.graph.initializers) == sorted({"w", "w_bnfold", *(v.name for n in model.graph for v in n.inputs[2:] if v)})


def test_bn_with_a_second_consumer_is_not_folded():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3, 4, 4] x) => (float[N, 3, 4, 4] y, float[N, 3, 4, 4] c) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w)
        y = BatchNormalization (c, g, b, m, v)
    }
    """
    model = normalize(make_model(text, {"w": RNG.normal(size=(3, 3, 3, 3)).astype(np.float32), **_bn_params(3)}))
    bn = [n for n in model.graph if n.op_type == "BatchNormalization"][0]
    layer, reason = foldable(bn)
    assert layer is None and "other consumers" in reason
    assert not FoldBatchNormPass()(model).modified


def test_canonicalize_removes_identity_dropout_and_makes_flatten():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 2, 3, 3] x) => (float[N, 4] y) {
        i = Identity (x)
        d = Dropout (i)
        s = Shape (d)
        n = Slice (s, zero, one)
        shp = Concat <axis = 0> (n, minus_one)
        f = Reshape (d, shp)
        y = Gemm <transB = 1> (f, w)
    }
    """
    inits = {
        "zero": np.array([0], np.int64), "one": np.array([1], np.int64), "minus_one": np.array([-1], np.int64),
        "w": RNG.normal(size=(4, 18)).astype(np.float32),
    }
    model = normalize(make_model(text, inits))
    x = {"x": RNG.normal(size=(3, 2, 3, 3)).astype(np.float32)}
    before = _run(model, x)
    assert CanonicalizePass()(model).modified
    assert [n.op_type for n in model.graph] == ["Flatten", "Gemm"]
    assert np.allclose(_run(model, x), before, atol=1e-6)
    assert not CanonicalizePass()(model).modified  # idempotent


DETECT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 2, 4, 4] x, float[N, 8] a) => (float[N, 3] y, float[N, 8] z, float[N, 3, 4, 4] t) {
    c = Conv <pads = [1, 1, 1, 1]> (x, wc, bc)
    t = ConvTranspose <pads = [1, 1, 1, 1]> (c, wt)
    f = Flatten (c)
    y = Gemm (f, wg)
    m = MatMul (a, wm)
    m2 = Relu (m)
    z = MatMul (m, m2)
}
"""


def test_detect_layers_finds_constant_weight_layers_with_channel_axes():
    inits = {
        "wc": RNG.normal(size=(3, 2, 3, 3)).astype(np.float32), "bc": np.zeros(3, np.float32),
        "wt": RNG.normal(size=(3, 3, 3, 3)).astype(np.float32),
        "wg": RNG.normal(size=(48, 3)).astype(np.float32),
        "wm": RNG.normal(size=(8, 8)).astype(np.float32),
    }
    model = normalize(make_model(DETECT, inits))
    DetectLayersPass()(model)
    layers = {n.op_type: ann.get(n, ann.QuantizableLayer) for n in model.graph if ann.get(n, ann.QuantizableLayer)}
    assert set(layers) == {"Conv", "ConvTranspose", "Gemm", "MatMul"}
    assert layers["Conv"].channel_axis == 0 and layers["Conv"].bias == "bc" and layers["Conv"].activation_input == "x"
    assert layers["ConvTranspose"].channel_axis == 1
    assert layers["Gemm"].channel_axis == 1  # transB = 0: weight is (K, N)
    assert layers["MatMul"].channel_axis == 1 and layers["MatMul"].weight == "wm"
    _, skipped = find_layers(model)
    assert [(n.op_type, why) for n, why in skipped] == [("MatMul", "weight is not constant")]


def test_no_quantizable_layer_is_an_error():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x, float[4, 4] w) => (float[N, 4] y) {
        y = MatMul (x, w)
    }
    """
    model = normalize(make_model(text))
    with pytest.raises(UnsupportedModelError, match="no quantizable layer.*weight is not constant"):
        DetectLayersPass()(model)


def test_networkx_view_follows_the_dataflow():
    from qcompiler.graph import to_networkx

    model = normalize(make_model(GEMM_BN, {"w": RNG.normal(size=(5, 3)).astype(np.float32),
                                           "bias": np.zeros(3, np.float32), **_bn_params(3)}))
    g = to_networkx(model)
    gemm, bn = [n.name for n in model.graph]
    assert list(g.successors("input:x")) == [gemm]
    assert g.edges[gemm, bn]["value"] == "h"
    assert list(g.successors(bn)) == ["output:y"]
    assert g.nodes[gemm]["op_type"] == "Gemm" and g.number_of_edges() == 3
