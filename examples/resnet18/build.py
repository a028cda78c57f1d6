"""Build a ResNet-18-shaped model (ImageNet shapes, seeded random weights) for speed benchmarks.

The model is generated on demand and never checked in (about 47 MB). It has the torchvision
ResNet-18 topology (conv1 7x7/2, max-pool, four stages of two BasicBlocks, global average pool,
fc 1000x512) with BatchNorm kept, so canonicalisation and folding are exercised too.

Run: ``python examples/resnet18/build.py [--out examples/resnet18/resnet18.onnx]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent
INPUT_NAME = "image"


def build_resnet18(seed: int = 0):
    """A torch ResNet-18 (no torchvision needed) with seeded random weights in eval mode."""
    import torch
    import torch.nn as nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(out)) + identity)

    class ResNet18(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            widths, cin, layers = (64, 128, 256, 512), 64, []
            for i, w in enumerate(widths):
                layers.append(nn.Sequential(BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)))
                cin = w
            self.layer1, self.layer2, self.layer3, self.layer4 = layers
            self.fc = nn.Linear(512, 1000)

        def forward(self, x):
            x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(x.mean(dim=(2, 3)), 1))

    torch.manual_seed(seed)
    model = ResNet18()
    with torch.no_grad():  # realistic BN statistics so activations neither vanish nor explode
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.3, 0.7)
    return model.eval()


def build_onnx(out: Path, seed: int = 0) -> Path:
    """Lower the model to ONNX at ``out`` (dynamic batch) and return the path."""
    import torch

    from qcompiler.frontend import lower
    from qcompiler.ir import save

    model = lower(build_resnet18(seed), (torch.zeros(1, 3, 224, 224),), input_names=[INPUT_NAME])
    save(model, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "resnet18.onnx")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_onnx(args.out, args.seed))


if __name__ == "__main__":
    main()
