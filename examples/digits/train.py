"""Train the shipped digits CNN deterministically and export it to ONNX.

The network follows a MAX78000-compatible topology: 3x3 convolutions with pad 1,
BatchNorm (kept in the export so qcompiler's own folding pass is exercised), ReLU,
2x2 max-pooling, a flatten of 16 values per channel and two linear layers.

Data: scikit-learn's ``load_digits`` (ships with scikit-learn, no download), 8x8
images resized bilinearly to 16x16 and scaled to [-1, 1]; stratified split 1257
train / 540 test (seed 0). Writes, next to this file:

- ``digits_cnn.onnx``: the float model (BatchNorm unfolded, dynamic batch);
- ``calib.npz``: 256 training images keyed by the model's input name;
- ``eval.npz``: the 540 held-out images plus ``labels``;
- ``train.npz``: the 1257 training images plus ``labels`` (fine-tuning data).

Run: ``python examples/digits/train.py`` (about 20 s on 2 cores).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
INPUT_NAME = "x"
SEED = 0


def load_digits_16x16() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (x_train, y_train, x_test, y_test); images are float32 (N, 1, 16, 16) in [-1, 1]."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    images = (images * 2.0 - 1.0).clamp(-1.0, 1.0).numpy().astype(np.float32)
    labels = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=540, stratify=labels, random_state=SEED
    )
    return x_tr, y_tr, x_te, y_te


def build_model():
    """The digits CNN (47.5k parameters plus BatchNorm)."""
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def train(epochs: int = 30) -> tuple[object, float]:
    """Train deterministically; return (model in eval mode, test accuracy)."""
    import torch

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    x_tr, y_tr, x_te, y_te = load_digits_16x16()
    model = build_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = torch.Generator().manual_seed(SEED)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean())
    return model, acc


def write_train_split(out: Path) -> None:
    """``train.npz``: the 1257 training images and labels (for fine-tuning after quantization)."""
    x_tr, y_tr, _, _ = load_digits_16x16()
    np.savez_compressed(out / "train.npz", **{INPUT_NAME: x_tr, "labels": y_tr})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()

    import torch

    from qcompiler.frontend import lower
    from qcompiler.ir import save

    model, acc = train(args.epochs)
    x_tr, _, x_te, y_te = load_digits_16x16()
    example = torch.from_numpy(x_tr[:2])
    ir_model = lower(model, (example,), input_names=[INPUT_NAME], dynamic_batch=True)
    ir_model.doc_string = f"digits CNN, float test accuracy {acc:.4f}"
    args.out.mkdir(parents=True, exist_ok=True)
    save(ir_model, args.out / "digits_cnn.onnx")
    np.savez_compressed(args.out / "calib.npz", **{INPUT_NAME: x_tr[:256]})
    np.savez_compressed(args.out / "eval.npz", **{INPUT_NAME: x_te, "labels": y_te})
    write_train_split(args.out)
    print(f"float test accuracy: {acc:.4f} ({len(y_te)} images)")


if __name__ == "__main__":
    main()
