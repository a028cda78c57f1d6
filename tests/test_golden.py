"""Golden regression tests on graph outputs for the shipped digits example.

Refresh on purpose with ``pytest --update-golden`` after an intended change, and review the
diff of ``tests/golden/`` in the commit.
"""

from __future__ import annotations

import pytest

from qcompiler.api import CompileConfig, compile_model
from qcompiler.golden import check_golden, compare, snapshot
from tests.conftest import DIGITS, GOLDEN


@pytest.fixture(scope="module")
def compiled():
    config = CompileConfig(calib=DIGITS / "calib.npz", eval=DIGITS / "eval.npz", show_progress=False)
    return compile_model(DIGITS / "digits_cnn.onnx", "fixed-point", config)


@pytest.fixture(scope="module")
def feeds(digits_eval):
    return {"x": digits_eval["x"][:32]}


def test_annotated_ir_golden(compiled, feeds, update_golden):
    diffs = check_golden(GOLDEN, "digits_fixed_point_annotated", compiled.model, feeds, update=update_golden)
    assert not diffs, "\n".join(diffs)


def test_simulation_onnx_golden(compiled, feeds, update_golden):
    diffs = check_golden(GOLDEN, "digits_fixed_point_qdq", compiled.simulation_model, feeds, update=update_golden)
    assert not diffs, "\n".join(diffs)


def test_golden_comparison_detects_changes(compiled, feeds):
    base = snapshot(compiled.model, feeds)
    assert compare(base, base) == []
    shifted = snapshot(compiled.model, feeds)
    changed = dict(shifted.outputs)
    name = next(iter(changed))
    changed[name] = changed[name] + 1e-3
    assert any("over tolerance" in d for d in compare(base, type(base)(base.structure, base.annotations, changed)))
    assert any("structure differs" in d for d in compare(base, type(base)(base.structure + "\n", base.annotations, base.outputs)))
    tweaked = {**base.annotations, "model": {"pkg.qcompiler.provenance": {"entries": []}}}
    assert any(d.startswith("annotations/model") for d in compare(base, type(base)(base.structure, tweaked, base.outputs)))


def test_missing_golden_case_says_how_to_create_it(compiled, feeds, tmp_path):
    diffs = check_golden(tmp_path, "nothing_here", compiled.model, feeds)
    assert diffs == [f"no golden case 'nothing_here' in {tmp_path}: run pytest --update-golden to create it"]
    assert check_golden(tmp_path, "fresh", compiled.model, feeds, update=True) == []
    assert check_golden(tmp_path, "fresh", compiled.model, feeds) == []


@pytest.fixture(scope="module")
def compiled_max78000():
    config = CompileConfig(calib=DIGITS / "calib.npz", eval=DIGITS / "eval.npz", show_progress=False)
    return compile_model(DIGITS / "digits_cnn.onnx", "max78000", config)


def test_max78000_annotated_ir_golden(compiled_max78000, feeds, update_golden):
    diffs = check_golden(GOLDEN, "digits_max78000_annotated", compiled_max78000.model, feeds, update=update_golden)
    assert not diffs, "\n".join(diffs)


def test_max78000_simulation_onnx_golden(compiled_max78000, feeds, update_golden):
    diffs = check_golden(GOLDEN, "digits_max78000_sim", compiled_max78000.simulation_model, feeds,
                         update=update_golden)
    assert not diffs, "\n".join(diffs)
