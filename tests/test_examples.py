"""The shipped examples: files small and valid, accuracy, deterministic training, ResNet-18 builder."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from qcompiler.metrics import top1
from tests.conftest import DIGITS, load_example

ROOT = DIGITS.parents[1]


def test_shipped_files_are_small():
    for name in ("digits_cnn.onnx", "calib.npz", "eval.npz"):
        assert (DIGITS / name).stat().st_size < 1_000_000, name


def test_shipped_model_accuracy_and_topology(digits_eval, digits_calib):
    import onnx

    proto = onnx.load(str(DIGITS / "digits_cnn.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Conv") == 3 and ops.count("BatchNormalization") == 3 and ops.count("Gemm") == 2
    sess = ort.InferenceSession(str(DIGITS / "digits_cnn.onnx"))
    logits = sess.run(None, {"x": digits_eval["x"]})[0]
    assert logits.shape == (540, 10)
    assert top1(logits, digits_eval["labels"]) >= 0.97
    assert digits_calib["x"].shape == (256, 1, 16, 16)
    assert digits_calib["x"].min() >= -1.0 and digits_calib["x"].max() <= 1.0


def test_digits_training_is_deterministic():
    torch = pytest.importorskip("torch")
    train = load_example("examples/digits/train.py", "digits_train")
    a, acc_a = train.train(epochs=2)
    b, acc_b = train.train(epochs=2)
    assert acc_a == acc_b
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_resnet18_builder(tmp_path):
    pytest.importorskip("torch")
    build = load_example("examples/resnet18/build.py", "resnet18_build")
    path = build.build_onnx(tmp_path / "r18.onnx")
    from qcompiler.ir import load_normalized
    from qcompiler.passes.pipelines import canonical_pipeline
    from qcompiler.pipeline import run_pipeline

    model = run_pipeline(load_normalized(path), canonical_pipeline()).model
    convs = [n for n in model.graph if n.op_type == "Conv"]
    assert len(convs) == 20 and sum(n.op_type == "Gemm" for n in model.graph) == 1
    assert "BatchNormalization" not in [n.op_type for n in model.graph]
    shapes = {tuple(n.inputs[1].const_value.shape) for n in convs}
    assert {(64, 64, 3, 3), (256, 256, 3, 3), (512, 512, 3, 3), (64, 3, 7, 7)} <= shapes
    x = np.random.default_rng(0).normal(size=(1, 3, 224, 224)).astype(np.float32)
    out = ort.InferenceSession(str(path)).run(None, {"image": x})[0]
    assert out.shape == (1, 1000) and np.isfinite(out).all() and out.std() > 0


def test_example_custom_pass_pins_the_edge_layers():
    module = _example_script("custom_pass")
    out = module.main()
    assert out["bits"][0] == 8 and out["bits"][-1] == 8 and max(out["bits"][1:-1]) <= 4
    assert out["metrics"]["simulated"]["top1"] > 0.97


def test_example_python_pipeline_runs_seed_000_and_fine_tunes():
    pytest.importorskip("torch")
    module = _example_script("python_pipeline")
    out = module.main(epochs=2)
    assert out["before"] > 0.9 and out["after"] >= out["before"] - 0.01


def _example_script(name: str):
    """Import ``examples/pipelines/<name>.py`` as a module (registered, as dataclasses need)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
