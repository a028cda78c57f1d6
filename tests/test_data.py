"""Data validation: every bad calibration/evaluation input is one clear DataError."""

from __future__ import annotations

import numpy as np
import pytest

from qcompiler.data import ArrayDataset, load_dataset
from qcompiler.errors import DataError
from qcompiler.ir import normalize
from tests.conftest import make_model

TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3, 4] x) => (float[N, 2] y) {
    f = Flatten (x)
    y = Gemm <transB = 1> (f, w)
}
"""


@pytest.fixture
def model():
    return normalize(make_model(TEXT, {"w": np.ones((2, 12), np.float32)}))


def _x(n=5):
    return np.random.default_rng(0).normal(size=(n, 3, 4)).astype(np.float32)


def test_valid_npz_with_labels(tmp_path, model):
    np.savez(tmp_path / "d.npz", x=_x(5), labels=np.arange(5))
    data = load_dataset(tmp_path / "d.npz", model)
    assert data.num_samples == 5 and data.labels.tolist() == [0, 1, 2, 3, 4]
    batches = list(data.batches(2))
    assert [b["x"].shape[0] for b in batches] == [2, 2, 1]
    assert np.array_equal(np.concatenate([b["x"] for b in batches]), _x(5))


def test_npy_for_a_single_input(tmp_path, model):
    np.save(tmp_path / "d.npy", _x(3))
    assert load_dataset(tmp_path / "d.npy", model).num_samples == 3


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"image": _x()}, r"array names do not match the model inputs \['x'\] \(missing \['x'\]; unknown \['image'\]\)"),
        ({"x": _x().astype(np.float64)}, "array 'x' has dtype float64, the model expects float32"),
        ({"x": _x()[:, :, :3]}, r"array 'x' has shape \(5, 3, 3\), the model expects \[N, 3, 4\] \(axis 2\)"),
        ({"x": _x()[:, 0]}, "the model expects rank 3"),
        ({"x": _x()[:0]}, "holds no samples"),
        ({"x": np.where(np.arange(60).reshape(5, 3, 4) == 7, np.nan, _x()).astype(np.float32)}, "contains 1 NaN or Inf"),
        ({"x": np.full((5, 3, 4), np.inf, np.float32)}, "contains 60 NaN or Inf"),
        ({"x": _x(), "labels": np.arange(4)}, "4 labels for 5 samples"),
        ({"x": _x(), "labels": np.ones(5, np.float32)}, "'labels' must be a 1-D integer array"),
    ],
)
def test_bad_arrays(tmp_path, model, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message) as info:
        load_dataset(tmp_path / "bad.npz", model)
    assert "bad.npz" in str(info.value) and "\n" not in str(info.value)


def test_missing_and_unreadable_files(tmp_path, model):
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "none.npz", model)
    (tmp_path / "junk.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read arrays"):
        load_dataset(tmp_path / "junk.npz", model)


def test_pickled_object_arrays_are_refused(tmp_path, model):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="cannot read arrays"):
        load_dataset(tmp_path / "obj.npy", model)


def test_in_memory_sources(model):
    assert load_dataset({"x": _x(2)}, model).num_samples == 2
    assert load_dataset(ArrayDataset({"x": _x(4)}), model).take(3).num_samples == 3


def test_passes_accept_a_data_path_and_iter_feeds_needs_a_model_for_it():
    from qcompiler import annotations as ann
    from qcompiler.data import iter_feeds
    from qcompiler.ir import load
    from qcompiler.passes import CalibratePass, DetectLayersPass
    from tests.conftest import DIGITS

    model = load(DIGITS / "digits_cnn.onnx")
    DetectLayersPass()(model)
    CalibratePass(data=str(DIGITS / "calib.npz"), show_progress=False)(model)
    assert ann.require(model.graph.inputs[0], ann.TensorStats).samples == 256
    with pytest.raises(DataError, match="load_dataset"):
        next(iter_feeds(DIGITS / "calib.npz", 8))
