"""qcompiler.ir: loading from every source, normalisation, atomic saves, external data."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qcompiler import ir as qir
from qcompiler.errors import ModelLoadError
from tests.conftest import make_model

TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 3] y) {
    h = Gemm <transB = 1> (x, w)
    y = Relu (h)
}
"""


def _model():
    return make_model(TEXT, {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)})


def _run(path_or_bytes, x):
    sess = ort.InferenceSession(path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes))
    return sess.run(None, {"x": x})[0]


def test_load_from_every_source(tmp_path):
    model = _model()
    path = tmp_path / "m.onnx"
    qir.save(model, path)
    data = path.read_bytes()
    for source in (path, str(path), data, onnx.load(str(path)), model):
        loaded = qir.load(source)
        assert isinstance(loaded, ir.Model)
        assert [n.op_type for n in loaded.graph] == ["Gemm", "Relu"]
    assert qir.load(model) is model


def test_missing_and_non_onnx_files(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        qir.load(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_text("this is not a protobuf at all \x00\xff")
    with pytest.raises(ModelLoadError, match="not an ONNX model"):
        qir.load(junk)
    with pytest.raises(ModelLoadError, match="not an ONNX model"):
        qir.load(b"")
    with pytest.raises(ModelLoadError, match="not a file"):
        qir.load(tmp_path)


def _with_external_location(tmp_path, location):
    proto = ir.to_proto(_model())
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save_model(proto, str(folder / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    proto = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    (folder / "m.onnx").write_bytes(proto.SerializeToString())
    return folder / "m.onnx"


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../x.bin"])
def test_external_data_outside_the_folder_is_refused(tmp_path, location):
    path = _with_external_location(tmp_path, location)
    with pytest.raises(ModelLoadError, match="external data location"):
        qir.load(path)


def test_external_data_symlink_out_is_refused(tmp_path):
    path = _with_external_location(tmp_path, "link.bin")
    (tmp_path / "outside.bin").write_bytes((path.parent / "weights.bin").read_bytes())
    (path.parent / "link.bin").symlink_to(tmp_path / "outside.bin")
    with pytest.raises(ModelLoadError, match="points outside"):
        qir.load(path)


def test_external_data_inside_the_folder_loads(tmp_path):
    path = _with_external_location(tmp_path, "weights.bin")
    loaded = qir.load(path)
    assert np.array_equal(loaded.graph.initializers["w"].const_value.numpy(), _model().graph.initializers["w"].const_value.numpy())


def test_save_external_data_round_trip(tmp_path):
    model = _model()
    path = tmp_path / "out" / "m.onnx"
    qir.save(model, path, external_data=True, size_threshold_bytes=0)
    assert (tmp_path / "out" / "m.onnx.data").is_file()
    x = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    back = qir.load(path)
    assert np.array_equal(back.graph.initializers["w"].const_value.numpy(), model.graph.initializers["w"].const_value.numpy())
    assert np.allclose(_run(path, x), np.maximum(x @ model.graph.initializers["w"].const_value.numpy().T, 0))
    # the in-memory model still saves inline afterwards
    qir.save(model, tmp_path / "inline.onnx")
    assert not (tmp_path / "inline.onnx.data").exists()


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    qir.save(_model(), path)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ir, "save", broken)
    with pytest.raises(OSError):
        qir.save(_model(), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_auto_external_data_threshold(monkeypatch, tmp_path):
    monkeypatch.setattr(qir, "EXTERNAL_DATA_THRESHOLD", 16)
    qir.save(_model(), tmp_path / "m.onnx", size_threshold_bytes=0)
    assert (tmp_path / "m.onnx.data").is_file()


def test_normalize_upgrades_opset_names_sorts_and_infers_shapes():
    text = """
    <ir_version: 6, opset_import: ["" : 11]>
    g (float[2, 4] x) => (float[2, 3] y) {
        y = Relu (h)
        h = Gemm <transB = 1> (x, w)
    }
    """
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((3, 4), np.float32), "w"))
    # the graph is not topologically sorted and has no node names
    model = qir.normalize(qir.load(proto))
    assert qir.default_opset(model) == 13
    assert [n.op_type for n in model.graph] == ["Gemm", "Relu"]
    names = [n.name for n in model.graph]
    assert all(names) and len(set(names)) == len(names)
    hidden = next(iter(model.graph)).outputs[0]
    assert hidden.shape == ir.Shape([2, 3]) and hidden.dtype == ir.DataType.FLOAT


def test_normalize_keeps_higher_opsets():
    model = qir.normalize(_model())
    assert qir.default_opset(model) == 17
