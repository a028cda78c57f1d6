"""``qcompile inspect``: layers, parameter counts, ops and per-target support, without data."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from qcompiler.cli import app
from qcompiler.inspection import inspect_model
from tests.conftest import DIGITS, make_model


def test_inspect_digits_lists_layers_and_both_targets_support_it(tmp_path):
    result = CliRunner().invoke(app, ["inspect", str(DIGITS / "digits_cnn.onnx"), "--json", str(tmp_path / "i.json")])
    assert result.exit_code == 0, result.output
    assert "5 quantizable layers, 47,530 parameters" in result.output
    assert "target max78000: supported (6 hardware layers)" in result.output
    info = json.loads((tmp_path / "i.json").read_text())
    assert [r["op"] for r in info["layers"]] == ["Conv", "Conv", "Conv", "Gemm", "Gemm"]
    assert info["layers"][0]["weight_shape"] == [16, 1, 3, 3] and info["layers"][0]["params"] == 16 * 9 + 16
    # BatchNorm folded away: its parameters are dropped, not counted (they were, as dead initializers)
    assert info["parameters"] == info["quantizable_parameters"] == 47_530 and info["float32_bytes"] == 4 * 47_530
    assert info["ops"] == {"Conv": 3, "Flatten": 1, "Gemm": 2, "MaxPool": 2, "Relu": 4}
    assert info["targets"]["fixed-point"] == {"supported": True, "float_only_ops": {}}


def test_inspect_names_float_only_ops_and_the_max78000_rule():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 3] y) {
            h = MatMul(x, w)
            n = LayerNormalization(h, s, b)
            y = Softmax(n)
        }
        """,
        {"w": np.ones((4, 3), np.float32), "s": np.ones(3, np.float32), "b": np.zeros(3, np.float32)},
    )
    info = inspect_model(model)
    assert info["layers"][0]["op"] == "MatMul" and info["layers"][0]["params"] == 12
    fixed = info["targets"]["fixed-point"]
    assert not fixed["supported"] and fixed["float_only_ops"] == {"LayerNormalization": 1, "Softmax": 1}
    mx = info["targets"]["max78000"]
    assert not mx["supported"] and "LayerNormalization" in mx["reason"]


def test_inspect_bad_file_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    result = CliRunner().invoke(app, ["inspect", str(bad)])
    assert result.exit_code == 2 and "bad.onnx" in result.output and "Traceback" not in result.output
