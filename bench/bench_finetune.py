"""Fine-tune after quantization (issue 9): digits CNN, W2A8 and W3A8 on the fixed-point target.

Accuracy on the 540 held-out images (simulated QDQ model, onnxruntime) for PTQ only, PTQ +
GPFQ, PTQ + fine-tune and PTQ + GPFQ + fine-tune (fine-tune: 1257 training images with a 10 %
seeded hold-out for early stopping, patience 10, Adam at 2e-3, cosine schedule, KL distillation (α = 0.8) from the float
model), and the wall time per epoch against plain float training of the same model with the
same loop (side by side, same process).

Other parts (``--part``): ``max78000`` (W2/W4 on the MAX78000 target, Q7 activations with
output shifts, bit-exact simulation; cost per epoch), ``deadzone`` (seed 000: ternary dead-zone
codebooks allocated by profiling, fine-tuned with the codebooks fixed), ``tune-cuts`` (seed 002:
the greedy word-length search with and without retraining between cuts).

Run: ``.venv/bin/python bench/bench_finetune.py [--part fixed|max78000|deadzone|tune-cuts] [--epochs 40]``.
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


def max78000_part(train: dict, epochs: int) -> None:
    print("| MAX78000 weights | PTQ top-1 | PTQ + fine-tune top-1 | SQNR PTQ / FT dB | compile s |")
    print("|---|---|---|---|---|")
    for bits in (2, 4):
        rows = []
        for finetune in (None, FineTunePass(data=train, epochs=epochs, patience=10, lr=2e-3, distill="kl",
                                            distill_weight=0.8, show_progress=False)):
            config = CompileConfig(calib=DIGITS / "calib.npz", eval=DIGITS / "eval.npz",
                                   target=TargetConfig(weight_bits=bits), show_progress=False, finetune=finetune)
            start = time.perf_counter()
            m = compile_model(DIGITS / "digits_cnn.onnx", "max78000", config).report["metrics"]["simulated"]
            rows.append((m["top1"], m["sqnr_db"], time.perf_counter() - start))
        print(f"| W{bits} | {rows[0][0]:.4f} | {rows[1][0]:.4f} | {rows[0][1]:.2f} / {rows[1][1]:.2f} | {rows[1][2]:.1f} |",
              flush=True)
    float_model = run_pipeline(load_normalized(DIGITS / "digits_cnn.onnx"), canonical_pipeline()).model
    quantized = compile_model(DIGITS / "digits_cnn.onnx", "max78000",
                              CompileConfig(calib=DIGITS / "calib.npz", target=TargetConfig(weight_bits=2),
                                            show_progress=False)).model
    _cost(float_model, quantized, train, "MAX78000 W2 (Q7 activations)")


def _cost(float_model, quantized, train: dict, label: str) -> None:
    float_t, quant_t = [], []
    for _ in range(3):  # interleaved, so machine noise hits both
        float_t += epoch_seconds(float_model, train, 3)[1:]
        quant_t += epoch_seconds(quantized, train, 3)[1:]
    ratio = statistics.median(quant_t) / statistics.median(float_t)
    print(f"\nseconds per epoch (median of 6, 1257 images, batch 64): float {statistics.median(float_t):.3f}, "
          f"fake-quant {label} {statistics.median(quant_t):.3f}, ratio {ratio:.2f} (goal ≤ 2)")


def deadzone_part(train: dict, epochs: int) -> None:
    from qcompiler.candidates import candidate_set
    from qcompiler.data import load_dataset
    from qcompiler.passes import AllocateBitsPass, CalibratePass, ProfileErrorPass
    from qcompiler.passes.finetune import evaluate_top1
    from qcompiler.torch_graph import GraphModule

    calib = DIGITS / "calib.npz"
    print("| dead-zone allocation (weights) | avg bits | PTQ (codebooks) top-1 | fine-tuned top-1 | profile + allocate s | fine-tune s |")
    print("|---|---|---|---|---|---|")
    for avg in (2.0, 2.5):
        model = load_normalized(DIGITS / "digits_cnn.onnx")
        start = time.perf_counter()
        run_pipeline(model, [*canonical_pipeline(), CalibratePass(data=calib, show_progress=False),
                             ProfileErrorPass(data=calib, candidates=tuple(candidate_set(bits=(2, 3, 4), kinds=("deadzone",))),
                                              show_progress=False),
                             AllocateBitsPass(avg_bits=avg, kinds=("deadzone",))])
        t_alloc = time.perf_counter() - start
        eval_set = load_dataset(DIGITS / "eval.npz", model)
        before = evaluate_top1(GraphModule(model), eval_set, 256)
        start = time.perf_counter()
        FineTunePass(data=train, epochs=epochs, patience=10, lr=2e-3, distill="kl", distill_weight=0.8,
                     show_progress=False)(model)
        t_ft = time.perf_counter() - start
        after = evaluate_top1(GraphModule(model), eval_set, 256)
        print(f"| {avg} bits | {avg} | {before:.4f} | {after:.4f} | {t_alloc:.1f} | {t_ft:.1f} |", flush=True)


def tune_cuts_part(train: dict) -> None:
    from qcompiler.api import accuracy_metric
    from qcompiler.data import load_dataset
    from qcompiler.passes import CalibratePass
    from qcompiler.passes.greedy_allocate import GreedyAllocatePass
    from qcompiler.targets import get_target

    backend, config = get_target("fixed-point"), TargetConfig()

    def prepare(model) -> None:
        for pass_ in backend.passes(config):
            pass_(model)

    print("| greedy WL search (max_loss 0.02, target compression 0.05) | final compression | avg weight bits | loss | tunes | s |")
    print("|---|---|---|---|---|---|")
    for label, tune in (("no retraining (undo)", None),
                        ("tune_model between cuts", FineTunePass(data=train, epochs=1, holdout=0.0, patience=0, lr=2e-3,
                                                                 show_progress=False))):
        model = load_normalized(DIGITS / "digits_cnn.onnx")
        metric, _ = accuracy_metric(backend, config, model.clone(), load_dataset(DIGITS / "eval.npz", model), 256)
        run_pipeline(model, [*canonical_pipeline(), CalibratePass(data=DIGITS / "calib.npz", show_progress=False)])
        start = time.perf_counter()
        GreedyAllocatePass(metric=metric, max_loss=0.02, target_compression=0.05, legal_bits=(1, 2, 3, 4, 5, 6, 7, 8),
                           tune=tune, prepare=prepare)(model)
        log = ann.get(model, ann.WordLengthSearchLog)
        last = log.steps[-1]
        tunes = sum(s["phase"] == "tune" for s in log.steps)
        print(f"| {label} | {last['compression']:.4f} | {32 * last['compression']:.2f} | {last['loss']:.4f} | {tunes} | "
              f"{time.perf_counter() - start:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--part", choices=("fixed", "max78000", "deadzone", "tune-cuts"), default="fixed")
    args = parser.parse_args()
    train = dict(np.load(DIGITS / "train.npz"))
    if args.part == "max78000":
        return max78000_part(train, args.epochs)
    if args.part == "deadzone":
        return deadzone_part(train, args.epochs)
    if args.part == "tune-cuts":
        return tune_cuts_part(train)
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
    _cost(float_model, quantized, train, "fixed-point W2A8")


if __name__ == "__main__":
    main()
