"""Lowering torch modules: BatchNorm kept, names kept, quiet, dynamic batch, same numbers."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from qcompiler.frontend import lower  # noqa: E402
from qcompiler.ir import to_bytes  # noqa: E402


def _net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 5 * 5, 3),
    )
    with torch.no_grad():  # non-trivial BN statistics
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.uniform_(0.5, 1.5)
    return net.eval()


def test_lower_keeps_batchnorm_and_state_dict_names(capfd):
    net = _net()
    model = lower(net, (torch.zeros(1, 2, 5, 5),), input_names=["image"])
    ops = [n.op_type for n in model.graph]
    assert "BatchNormalization" in ops
    assert model.graph.inputs[0].name == "image"
    # the exporter's optimiser would fold BN into 0.weight; lowering must keep the original values
    assert np.array_equal(model.graph.initializers["0.weight"].const_value.numpy(), net[0].weight.detach().numpy())
    assert "1.running_var" in model.graph.initializers
    out, err = capfd.readouterr()
    assert out == "" and "torchvision" not in err


@pytest.mark.parametrize("batch", [1, 5])
def test_lowered_model_matches_torch_with_dynamic_batch(batch):
    net = _net()
    model = lower(net, (torch.zeros(2, 2, 5, 5),))
    x = np.random.default_rng(batch).normal(size=(batch, 2, 5, 5)).astype(np.float32)
    sess = ort.InferenceSession(to_bytes(model))
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    want = net(torch.from_numpy(x)).detach().numpy()
    assert got.shape == (batch, 3)
    assert np.allclose(got, want, atol=1e-5)


def test_export_failure_is_one_line():
    from qcompiler.errors import UnsupportedModelError

    class Bad(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom in forward")

    with pytest.raises(UnsupportedModelError, match="torch export failed.*boom in forward"):
        lower(Bad(), (torch.zeros(1, 2),), dynamic_batch=False)
    with pytest.raises(UnsupportedModelError, match="not a torch.nn.Module"):
        lower("model.pt", (torch.zeros(1, 2),))
