"""Fine-tune after quantization (issue 9): digits CNN, W2A8 and W3A8 on the fixed-point target.

Accuracy on the 540 held-out images (simulated QDQ model, onnxruntime) for PTQ only, PTQ +
GPFQ, PTQ + fine-tune and PTQ + GPFQ + fine-tune (fine-tune: 1257 training images with a 10 %
seeded hold-out for early stopping, patience 10, Adam at 2e-3, cosine schedule, KL distillation (α = 0.8) from the float
model), and the wall time per epoch against plain float training of the same model with the
same loop (side by side, same process).

Run: ``.venv/bin/python bench/bench_finetune.py [--epochs 40]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qcompiler import annotations as ann  # noqa: E402
from qcompiler.api import CompileConfig, compile_model  # noqa: E402
from qcompiler.ir import load_normalized  # noqa: E402
from qcompiler.passes.finetune import FineTunePass  # noqa: E402
from qcompiler.passes.gpfq import GPFQPass  # noqa: E402
from qcompiler.passes.pipelines import canonical_pipeline  # noqa: E402
from qcompiler.pipeline import run_pipeline  # noqa: E402
from qcompiler.targets import TargetConfig  # noqa: E402

DIGITS = ROOT / "examples" / "digits"


def top1(bits: int, gpfq: bool, finetune: FineTunePass | None) -> tuple[float, float, float]:
    config = CompileConfig(calib=DIGITS / "calib.npz", eval=DIGITS / "eval.npz", target=TargetConfig(weight_bits=bits),
                           show_progress=False, gpfq=GPFQPass(bits=bits) if gpfq else None, finetune=finetune)
    start = time.perf_counter()
    result = compile_model(DIGITS / "digits_cnn.onnx", "fixed-point", config)
    m = result.report["metrics"]
    return m["simulated"]["top1"], m["float"]["top1"], time.perf_counter() - start


def epoch_seconds(model, train: dict, epochs: int) -> list[float]:
    copy = model.clone()
    FineTunePass(data=train, epochs=epochs, patience=0, holdout=0.0, show_progress=False)(copy)
    return [e["seconds"] for e in ann.get(copy, ann.FineTuneLog).epochs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    train = dict(np.load(DIGITS / "train.npz"))
    finetune = FineTunePass(data=train, epochs=args.epochs, patience=10, lr=2e-3, distill="kl", distill_weight=0.8,
                            show_progress=False)
    print("| weights | PTQ | PTQ + GPFQ | PTQ + fine-tune | PTQ + GPFQ + fine-tune | float | compile s (FT / GPFQ+FT) |")
    print("|---|---|---|---|---|---|---|")
    for bits in (2, 3):
        ptq, ref, _ = top1(bits, False, None)
        gp, _, _ = top1(bits, True, None)
        ft, _, t_ft = top1(bits, False, finetune)
        both, _, t_both = top1(bits, True, finetune)
        print(f"| W{bits}A8 | {ptq:.4f} | {gp:.4f} | {ft:.4f} | {both:.4f} | {ref:.4f} | {t_ft:.1f} / {t_both:.1f} |", flush=True)
    # cost per epoch: quantization-aware vs plain float training of the same model, same loop
    float_model = run_pipeline(load_normalized(DIGITS / "digits_cnn.onnx"), canonical_pipeline()).model
    quantized = compile_model(DIGITS / "digits_cnn.onnx", "fixed-point",
                              CompileConfig(calib=DIGITS / "calib.npz", target=TargetConfig(weight_bits=2),
                                            show_progress=False)).model
    float_t, quant_t = [], []
    for _ in range(3):  # interleaved, so machine noise hits both
        float_t += epoch_seconds(float_model, train, 3)[1:]
        quant_t += epoch_seconds(quantized, train, 3)[1:]
    ratio = statistics.median(quant_t) / statistics.median(float_t)
    print(f"\nseconds per epoch (median of 6, 1257 images, batch 64): float {statistics.median(float_t):.3f}, "
          f"fake-quant W2A8 {statistics.median(quant_t):.3f}, ratio {ratio:.2f} (goal ≤ 2)")


if __name__ == "__main__":
    main()
