"""Hybrid profiling against exact and fast, for the allocation they feed (algorithms.md §2.3-2.4).

For each model and candidate set: the exact and fast profiles are measured once and allocated at
every budget; hybrid runs once per budget (it refines that budget's solution). Per budget: the
weights' bit widths each mode chooses, whether they equal exact's choice, the candidates hybrid
measured, and the logit MSE of each allocation measured jointly on the calibration data
(:class:`MeasureAllocationPass`; scope: weights).

- digits CNN, 256 calibration images: the fixed-point target's set (fixed point at 2-8 and 16
  bits, 8 candidates) and a large set (uniform, dead zone r = 0.1/0.3/0.5, log and fixed point
  at the same widths, 48 candidates, any kind allowed);
- ResNet-18-shaped model, 16 random images, the fixed-point set (``--part resnet``).

Run: ``.venv/bin/python bench/bench_hybrid.py [--part digits|resnet|all]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "examples" / "resnet18"))

WIDTHS = (2, 3, 4, 5, 6, 7, 8, 16)
ALL_KINDS = ("uniform", "deadzone", "log", "fixed")


def calibrated(path: Path, data):
    from bench_calibration import prepared

    from qcompiler.passes import CalibratePass

    model = prepared(path)
    CalibratePass(data=data, show_progress=False)(model)
    return model


def choices(model) -> dict[str, str]:
    from qcompiler import annotations as ann
    from qcompiler.graph import values_by_name

    return {n: b.candidate for n, v in values_by_name(model.graph).items() if (b := ann.get(v, ann.BitWidth))}


def measured_count(model) -> tuple[int, int]:
    from qcompiler import annotations as ann
    from qcompiler.graph import values_by_name

    profiles = [p for v in values_by_name(model.graph).values() if (p := ann.get(v, ann.ErrorProfile))]
    return sum(sum(p.measured) for p in profiles), sum(len(p.measured) for p in profiles)


def joint(model, data) -> float:
    from qcompiler import annotations as ann
    from qcompiler.passes import MeasureAllocationPass

    MeasureAllocationPass(data=data)(model)
    return ann.require(model, ann.AllocationSummary).measured_distortion


def compare(name: str, path: Path, data, kinds: tuple[str, ...], budgets: tuple[float, ...]) -> None:
    from qcompiler.candidates import candidate_set
    from qcompiler.passes import AllocateBitsPass, ProfileErrorPass

    candidates = tuple(candidate_set(bits=WIDTHS, kinds=kinds, deadzone_ratios=(0.1, 0.3, 0.5)))
    profiled, seconds = {}, {}
    for mode in ("exact", "fast"):
        model = calibrated(path, data)
        start = time.perf_counter()
        ProfileErrorPass(data=data, candidates=candidates, mode=mode, tensors="weights", show_progress=False)(model)
        seconds[mode] = time.perf_counter() - start
        profiled[mode] = model
    print(f"\n{name}, {len(candidates)} candidates per weight: exact profile {seconds['exact']:.2f} s, "
          f"fast profile {seconds['fast']:.2f} s")
    print("| avg bits | exact: bits, joint MSE | fast: bits, joint MSE | hybrid: bits, joint MSE | hybrid = exact | "
          "hybrid measured | hybrid s | exact s / hybrid s |")
    print("|---|---|---|---|---|---|---|---|")
    for avg in budgets:
        allocate = AllocateBitsPass(avg_bits=avg, legal_bits=WIDTHS, kinds=kinds)
        rows = {}
        for mode in ("exact", "fast"):
            model = profiled[mode].clone()
            allocate(model)
            rows[mode] = (choices(model), joint(model, data))
        model = calibrated(path, data)
        start = time.perf_counter()
        ProfileErrorPass(data=data, candidates=candidates, mode="hybrid", allocate=allocate, tensors="weights",
                         show_progress=False)(model)
        hybrid_seconds = time.perf_counter() - start
        rows["hybrid"] = (choices(model), joint(model, data))
        done, total = measured_count(model)
        cells = [f"{'/'.join(c.split(':', 1)[1] if kinds == ('fixed',) else c for c in bits.values())}, {mse:.4g}"
                 for bits, mse in rows.values()]
        print(f"| {avg} | {' | '.join(cells)} | {'yes' if rows['hybrid'][0] == rows['exact'][0] else 'no'} | "
              f"{done}/{total} | {hybrid_seconds:.2f} | {seconds['exact'] / hybrid_seconds:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=("digits", "resnet", "all"), default="all")
    part = parser.parse_args().part
    from qcompiler.data import ArrayDataset

    if part in ("digits", "all"):
        digits = ArrayDataset({"x": np.load(ROOT / "examples" / "digits" / "calib.npz")["x"]})
        path = ROOT / "examples" / "digits" / "digits_cnn.onnx"
        compare("digits CNN, fixed-point set", path, digits, ("fixed",), (2.5, 3.0, 3.5, 4.0, 5.0))
        compare("digits CNN, large set", path, digits, ALL_KINDS, (2.5, 3.0, 4.0))
    if part in ("resnet", "all"):
        r18 = ROOT / "examples" / "resnet18" / "resnet18.onnx"
        if not r18.exists():
            import build

            build.build_onnx(r18)
        images = np.random.default_rng(0).normal(size=(16, 3, 224, 224)).astype(np.float32)
        compare("ResNet-18-shaped, fixed-point set", r18, ArrayDataset({"image": images}), ("fixed",), (3.0, 4.0))


if __name__ == "__main__":
    main()
