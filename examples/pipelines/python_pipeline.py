"""A pass pipeline in Python: seed 000's adaptive quantization on the digits CNN.

Profiles dead-zone quantizers for every weight, allocates 2.5 bits per weight on average,
fine-tunes with the codebooks fixed (seed 000 step 7), and prints what each step did.

Run: ``.venv/bin/python examples/pipelines/python_pipeline.py [--epochs 5]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from qcompiler import annotations as ann
from qcompiler.candidates import candidate_set
from qcompiler.data import load_dataset
from qcompiler.ir import load_normalized
from qcompiler.passes import AllocateBitsPass, CalibratePass, FineTunePass, ProfileErrorPass
from qcompiler.passes.finetune import evaluate_top1
from qcompiler.passes.pipelines import canonical_pipeline
from qcompiler.pipeline import run_pipeline
from qcompiler.pipeline_text import format_pipeline
from qcompiler.torch_graph import GraphModule

DIGITS = Path(__file__).resolve().parents[1] / "digits"


def main(epochs: int = 5) -> dict[str, float]:
    """Run the pipeline; return top-1 before and after fine-tuning."""
    model = load_normalized(DIGITS / "digits_cnn.onnx")
    calib = DIGITS / "calib.npz"
    passes = [
        *canonical_pipeline(),
        CalibratePass(data=calib, show_progress=False),
        ProfileErrorPass(data=calib, candidates=tuple(candidate_set(bits=(2, 3, 4), kinds=("deadzone",))),
                         tensors="weights", show_progress=False),
        AllocateBitsPass(avg_bits=2.5, kinds=("deadzone",)),
    ]
    print("pipeline:", format_pipeline(passes))
    run_pipeline(model, passes)
    for value in model.graph.initializers.values():
        chosen = ann.get(value, ann.BitWidth)
        if chosen is not None:
            print(f"  {value.name:10s} {chosen.candidate:16s} distortion {chosen.distortion:.4g}")
    eval_set = load_dataset(DIGITS / "eval.npz", model)
    before = evaluate_top1(GraphModule(model), eval_set)
    train = dict(np.load(DIGITS / "train.npz"))
    FineTunePass(data=train, epochs=epochs, lr=2e-3, show_progress=False)(model)
    after = evaluate_top1(GraphModule(model), eval_set)
    print(f"top-1 with the allocated codebooks: {before:.4f}; after fine-tuning: {after:.4f}")
    return {"before": before, "after": after}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    main(parser.parse_args().epochs)
