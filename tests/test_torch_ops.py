"""The torch conversion's shape, indexing, logic and reduction ops against onnxruntime.

Transformer exports (MiniLM) compute attention masks and positions with these ops; each output
of the test graph exercises one op, including its edge cases (negative indices, INT64_MAX slice
ends, scalar indices, keepdims, approximate GELU).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from qcompiler.errors import UnsupportedModelError  # noqa: E402
from qcompiler.ir import normalize  # noqa: E402
from qcompiler.torch_graph import GraphModule  # noqa: E402

INT64_MAX = np.iinfo(np.int64).max

#: (op, inputs, attributes) of each output; "x" is (2, 5, 4) float, "ids" is (2, 5) int64.
NODES = [
    ("Shape", ["x"], {}),
    ("Shape", ["x"], {"start": 1}),
    ("Gather", ["x", "neg_index"], {"axis": 1}),
    ("Gather", ["x", "scalar_index"], {"axis": 2}),
    ("Gather", ["table", "ids"], {"axis": 0}),
    ("GatherElements", ["x", "elements"], {"axis": 2}),
    ("GatherND", ["x", "nd"], {}),
    ("Expand", ["row", "expand_to"], {}),
    ("Slice", ["x", "s_start", "s_end", "s_axes", "s_steps"], {}),
    ("Slice", ["x", "s_neg_start", "s_neg_end"], {}),
    ("Range", ["r_start", "r_limit", "r_delta"], {}),
    ("Cast", ["ids"], {"to": TensorProto.FLOAT}),
    ("Cast", ["x"], {"to": TensorProto.BOOL}),
    ("Max", ["x", "row", "x"], {}),
    ("Min", ["x", "row"], {}),
    ("Where", ["positive", "x", "row"], {}),
    ("And", ["positive", "positive_row"], {}),
    ("Or", ["positive", "positive_row"], {}),
    ("Not", ["positive"], {}),
    ("Equal", ["ids", "ids_row"], {}),
    ("IsNaN", ["with_nan"], {}),
    ("ReduceSum", ["x", "axes_1"], {"keepdims": 0}),
    ("ReduceSum", ["x"], {}),
    ("ReduceMean", ["x", "axes_neg"], {}),
    ("ReduceL2", ["x", "axes_1"], {"keepdims": 1}),
    ("Gelu", ["x"], {}),
    ("Gelu", ["x"], {"approximate": "tanh"}),
    ("Erf", ["x"], {}),
    ("Sqrt", ["abs_x"], {}),
    ("Pow", ["abs_x", "two"], {}),
    ("Neg", ["x"], {}),
    ("Less", ["x", "row"], {}),
]


def _constants(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "neg_index": np.array([-1, 0, 2], dtype=np.int64),
        "scalar_index": np.array(1, dtype=np.int64),
        "table": rng.normal(size=(7, 3)).astype(np.float32),
        "elements": rng.integers(-4, 4, size=(2, 5, 3)).astype(np.int64),
        "nd": np.array([[0, 1], [1, -1], [1, 3]], dtype=np.int64),
        "row": rng.normal(size=(4,)).astype(np.float32),
        "expand_to": np.array([3, 1, 4], dtype=np.int64),
        "s_start": np.array([1, 0], dtype=np.int64),
        "s_end": np.array([INT64_MAX, 3], dtype=np.int64),
        "s_axes": np.array([1, -1], dtype=np.int64),
        "s_steps": np.array([2, 1], dtype=np.int64),
        "s_neg_start": np.array([np.iinfo(np.int64).min, -2], dtype=np.int64),
        "s_neg_end": np.array([-1, INT64_MAX], dtype=np.int64),
        "r_start": np.array(2, dtype=np.int64),
        "r_limit": np.array(11, dtype=np.int64),
        "r_delta": np.array(3, dtype=np.int64),
        "positive_row": np.array([True, False, True, True]),
        "ids_row": np.array([1, 2, 3, 4, 5], dtype=np.int64),
        "with_nan": np.array([0.0, np.nan, 1.0], dtype=np.float32),
        "axes_1": np.array([1], dtype=np.int64),
        "axes_neg": np.array([-1], dtype=np.int64),
        "two": np.array(2.0, dtype=np.float32),
    }


def _ops_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    prep = [helper.make_node("Greater", ["x", "zero"], ["positive"]), helper.make_node("Abs", ["x"], ["abs_x"])]
    nodes, outputs = [], []
    for i, (op, inputs, attrs) in enumerate(NODES):
        nodes.append(helper.make_node(op, inputs, [f"out{i}"], name=f"{op}_{i}", **attrs))
        outputs.append(helper.make_empty_tensor_value_info(f"out{i}"))
    inits = [numpy_helper.from_array(v, k) for k, v in _constants(rng).items()]
    inits.append(numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"))
    graph = helper.make_graph(
        prep + nodes, "ops",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 4]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])],
        outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def test_each_op_matches_onnxruntime():
    proto = _ops_model()
    rng = np.random.default_rng(1)
    feed = {"x": rng.normal(size=(2, 5, 4)).astype(np.float32), "ids": rng.integers(0, 7, size=(2, 5)).astype(np.int64)}
    want = ort.InferenceSession(proto.SerializeToString()).run(None, feed)
    import onnx_ir as ir

    module = GraphModule(normalize(ir.serde.deserialize_model(proto)), quantize=False).double()
    with torch.no_grad():
        got = module(**{k: torch.from_numpy(v) for k, v in feed.items()})
    assert len(got) == len(want) == len(NODES)
    for (op, _, attrs), ours, theirs in zip(NODES, got, want):
        ours = ours.numpy()
        assert ours.shape == theirs.shape, f"{op} {attrs}: shape {ours.shape} vs {theirs.shape}"
        if theirs.dtype.kind == "f":
            np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6, err_msg=f"{op} {attrs}")
        else:
            np.testing.assert_array_equal(ours, theirs, err_msg=f"{op} {attrs}")
            assert ours.dtype.kind == theirs.dtype.kind, f"{op}: dtype {ours.dtype} vs {theirs.dtype}"


@pytest.mark.parametrize(("op", "inputs", "attrs", "inits", "message"), [
    ("Slice", ["x", "a", "b", "c", "d"], {}, {"a": [0], "b": [2], "c": [0], "d": [-1]}, "steps <= 0"),
    ("GatherND", ["x", "a"], {"batch_dims": 1}, {"a": [[0]]}, "batch_dims"),
    ("Cast", ["x"], {"to": TensorProto.STRING}, {}, "target type"),
])
def test_unsupported_variants_are_one_line_errors(op, inputs, attrs, inits, message):
    import onnx_ir as ir

    graph = helper.make_graph(
        [helper.make_node(op, inputs, ["y"], name="odd", **attrs)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_empty_tensor_value_info("y")],
        [numpy_helper.from_array(np.array(v, dtype=np.int64), k) for k, v in inits.items()])
    model = normalize(ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])))
    module = GraphModule(model, quantize=False)
    with pytest.raises(UnsupportedModelError, match=message) as err:
        module(x=torch.zeros(2, 3))
    assert "'odd'" in str(err.value) and "\n" not in str(err.value)
