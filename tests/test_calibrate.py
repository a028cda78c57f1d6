"""CalibratePass: streamed statistics equal numpy's on the whole data, for any batch split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qcompiler import annotations as ann
from qcompiler.data import ArrayDataset
from qcompiler.errors import DataError
from qcompiler.graph import values_by_name
from qcompiler.ir import normalize
from qcompiler.passes import CalibratePass, DetectLayersPass
from qcompiler.pipeline import PipelineError, run_pipeline
from tests.conftest import make_model

TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 2, 5, 5] x) => (float[N, 3] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w)
    r = Relu (c)
    f = Flatten (r)
    y = Gemm <transB = 1> (f, w2)
}
"""
RNG = np.random.default_rng(3)
W = RNG.normal(size=(4, 2, 3, 3)).astype(np.float32)
W2 = RNG.normal(size=(3, 100)).astype(np.float32)


def _model():
    model = normalize(make_model(TEXT, {"w": W, "w2": W2}))
    DetectLayersPass()(model)
    return model


def _reference(x):
    """The values as the pass's session computes them: optimised, with the same values fetched
    (onnxruntime's fusions depend on them, at float rounding level)."""
    from qcompiler.passes.calibrate import activation_names
    from qcompiler.runtime import float_runner

    model = _model()
    runner = float_runner(model, [n for n in activation_names(model) if n != "x"])
    return runner.run({"x": x})


def test_run_into_writes_the_same_values_into_reused_buffers():
    from qcompiler.runtime import Runner

    runner = Runner(_model(), ["c", "f"])
    a, b, short = (RNG.normal(size=(n, 2, 5, 5)).astype(np.float32) for n in (8, 8, 3))
    first = runner.run_into({"x": a}, ["x", "c", "f"])
    buffers = {n: first[n] for n in ("c", "f")}
    second = runner.run_into({"x": b}, ["x", "c", "f"])
    want = runner.run({"x": b}, ["c", "f"])
    for name in ("c", "f"):
        assert second[name] is buffers[name]  # onnxruntime wrote into the first call's arrays
        assert np.array_equal(second[name], want[name])
    assert second["x"] is b
    other = runner.run_into({"x": short}, ["c", "f"])  # a new batch shape gets new buffers
    assert other["c"].shape == (3, 4, 5, 5)
    assert np.array_equal(other["c"], runner.run({"x": short}, ["c"])["c"])


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_stats_match_numpy(batch_size):
    x = RNG.normal(1.0, 2.0, size=(23, 2, 5, 5)).astype(np.float32)
    model = _model()
    CalibratePass(data=ArrayDataset({"x": x}), batch_size=batch_size)(model)
    values = values_by_name(model.graph)
    ref = {"x": x, **_reference(x)}
    for name in ("x", "c", "f", "y"):
        stats = ann.require(values[name], ann.TensorStats)
        t = ref[name].astype(np.float64) if name in ref else None
        if t is None:
            continue
        assert stats.count == t.size and stats.samples == 23
        assert stats.min == pytest.approx(t.min(), abs=0) and stats.max == pytest.approx(t.max(), abs=0)
        assert stats.absmax == np.abs(t).max()
        assert stats.mean == pytest.approx(t.mean(), rel=1e-9, abs=1e-12)
        assert stats.std == pytest.approx(t.std(), rel=1e-7)
        axes = tuple(a for a in range(t.ndim) if a != 1)
        assert np.array_equal(stats.channel_min, t.min(axis=axes))
        assert np.array_equal(stats.channel_max, t.max(axis=axes))


def test_iterable_of_feeds_is_accepted():
    x = RNG.normal(size=(6, 2, 5, 5)).astype(np.float32)
    a, b = _model(), _model()
    CalibratePass(data=[{"x": x[:4]}, {"x": x[4:]}])(a)
    CalibratePass(data=ArrayDataset({"x": x}), batch_size=6)(b)
    # histograms, extrema and ranges are exact for any batch split; sums agree to round-off
    for name in ("x", "c", "f", "y"):
        sa = ann.require(values_by_name(a.graph)[name], ann.TensorStats)
        sb = ann.require(values_by_name(b.graph)[name], ann.TensorStats)
        assert sa.abs_quantiles == sb.abs_quantiles and sa.ranges == sb.ranges and sa.channel_max == sb.channel_max
        assert sa.mean == pytest.approx(sb.mean, rel=1e-12, abs=1e-15) and sa.std == pytest.approx(sb.std, rel=1e-12)


def test_empty_data_is_an_error_naming_the_pass():
    with pytest.raises(PipelineError, match="pass CalibratePass failed: calibration data is empty"):
        run_pipeline(_model(), [CalibratePass(data=[])])


def test_requires_detected_layers():
    model = normalize(make_model(TEXT, {"w": W, "w2": W2}))
    with pytest.raises(PipelineError, match="run DetectLayersPass first"):
        run_pipeline(model, [CalibratePass(data=[])])


def test_nan_in_activations_is_an_error():
    x = np.full((2, 2, 5, 5), 1e38, np.float32)  # overflows to inf inside the network
    with pytest.raises(DataError, match="NaN or Inf"):
        CalibratePass(data=ArrayDataset({"x": x}))(_model())


def test_a_negative_reservoir_is_refused_when_the_pass_is_built():
    with pytest.raises(ValueError, match=r"reservoir is a sample size, >= 0 \(got -1\)"):
        CalibratePass(data=ArrayDataset({"x": np.zeros((1, 2, 5, 5), np.float32)}), reservoir=-1)


@pytest.mark.parametrize("bins, channel_bins", [(64, 256), (100, 16), (0, 16)])
def test_bad_bin_counts_are_refused_when_the_pass_is_built(bins, channel_bins):
    with pytest.raises(ValueError, match="bin"):
        CalibratePass(data=ArrayDataset({"x": np.zeros((1, 2, 5, 5), np.float32)}), bins=bins, channel_bins=channel_bins)


def test_repr_has_no_data():
    text = repr(CalibratePass(data=ArrayDataset({"x": np.zeros((1, 2, 5, 5), np.float32)}), batch_size=8))
    assert text.startswith("CalibratePass(batch_size=8, methods=('minmax', 'percentile', 'entropy', 'mse'), bits=(8,)")
    assert "array" not in text


def test_sidecar_and_dumps(tmp_path):
    x = RNG.normal(size=(10, 2, 5, 5)).astype(np.float32)
    model = _model()
    CalibratePass(data=ArrayDataset({"x": x}), batch_size=4, sidecar_dir=tmp_path / "side",
                  dump=("c",), dump_dir=tmp_path / "dump", reservoir=100)(model)
    stats = ann.require(values_by_name(model.graph)["c"], ann.TensorStats)
    with np.load(tmp_path / "side" / stats.sidecar) as npz:
        assert npz["hist"].sum() == stats.count and npz["reservoir"].size == 100
        assert npz["channel_hist"].shape == (4, 256)
    parts = sorted((tmp_path / "dump" / "c").iterdir())
    assert [p.name for p in parts] == ["00000.npy", "00001.npy", "00002.npy"]
    dumped = np.concatenate([np.load(p) for p in parts])
    assert np.allclose(dumped, _reference(x)["c"])


def test_ranges_for_every_method_and_unknown_names():
    x = RNG.normal(size=(16, 2, 5, 5)).astype(np.float32)
    model = _model()
    CalibratePass(data=ArrayDataset({"x": x}), bits=(4, 8), percentile=99.9)(model)
    stats = ann.require(values_by_name(model.graph)["x"], ann.TensorStats)
    keys = [k for k, _ in stats.ranges]
    assert keys == ["percentile:99.9", "entropy:4", "entropy:8", "mse:4", "mse:8"]
    assert stats.range("mse:4") < stats.range("mse:8") <= stats.absmax
    assert stats.range("minmax") == stats.absmax
    from qcompiler.errors import AnnotationError

    with pytest.raises(AnnotationError, match="no calibrated range 'mse:6'"):
        stats.range("mse:6")
    with pytest.raises(PipelineError, match=r"cannot dump \['nope'\]"):
        run_pipeline(_model(), [CalibratePass(data=[], dump=("nope",), dump_dir=Path("/tmp/x"))])
    with pytest.raises(ValueError, match="unknown range methods"):
        CalibratePass(data=[], methods=("kmeans",))


def test_assign_uses_the_chosen_range():
    from qcompiler.passes import AssignFixedPointPass

    x = RNG.laplace(size=(64, 2, 5, 5)).astype(np.float32)
    model = _model()
    CalibratePass(data=ArrayDataset({"x": x}), bits=(4,))(model)
    AssignFixedPointPass(activation_bits=4, range_method="mse")(model)
    fmt = ann.require(values_by_name(model.graph)["x"], ann.FixedPoint)
    stats = ann.require(values_by_name(model.graph)["x"], ann.TensorStats)
    assert fmt.rule == "mse:4"
    from qcompiler.quantizers import no_overflow_fl

    assert fmt.fl == no_overflow_fl(stats.range("mse:4"), 4, True) > no_overflow_fl(stats.absmax, 4, True)
    with pytest.raises(Exception, match="calibrate with that method"):
        AssignFixedPointPass(activation_bits=6, range_method="mse")(model)
