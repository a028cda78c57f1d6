"""Integer reference simulator vs onnxruntime on the QDQ model (issue 6).

Compiles the digits CNN (and MiniLM when built) for the fixed-point target, then runs the
whole evaluation set through the bit-exact integer simulator and through onnxruntime
(optimisations off), side by side: agreement (codes and outputs) and the time ratio.

Run: ``.venv/bin/python bench/bench_integer_simulator.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qcompiler.api import CompileConfig, compile_model  # noqa: E402
from qcompiler.data import ArrayDataset  # noqa: E402
from qcompiler.targets import TargetConfig  # noqa: E402
from qcompiler.targets.fixed_point.check import check_integer_simulator  # noqa: E402


def measure(name: str, model: Path, calib: dict, evaluation: dict, target: TargetConfig) -> None:
    result = compile_model(model, "fixed-point", CompileConfig(calib=calib, target=target, show_progress=False))
    check = check_integer_simulator(result.model, result.simulation_model, ArrayDataset(evaluation))
    ratio = check.simulator_seconds / check.onnxruntime_seconds
    print(f"| {name} | {check.samples} | {check.quantizers} | {check.codes_compared:,} | {check.codes_mismatched} | "
          f"{check.output_max_abs_diff:g} | {check.simulator_seconds:.2f} | {check.onnxruntime_seconds:.2f} | {ratio:.1f} |",
          flush=True)


def main() -> None:
    print("| model | samples | quantizers | codes compared | mismatched | max output diff | simulator s | ORT s | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    digits = ROOT / "examples" / "digits"
    calib, ev = dict(np.load(digits / "calib.npz")), dict(np.load(digits / "eval.npz"))
    for bits in (8, 4, 2):
        measure(f"digits W{bits}A8", digits / "digits_cnn.onnx", calib, ev, TargetConfig(weight_bits=bits))
    minilm = ROOT / "examples" / "minilm" / "build"
    if (minilm / "minilm.onnx").exists():
        calib, ev = dict(np.load(minilm / "calib.npz")), dict(np.load(minilm / "eval.npz"))
        measure("MiniLM W8A8 (--keep-float unsupported)", minilm / "minilm.onnx", calib, ev,
                TargetConfig(keep_float=("unsupported",), range_method="percentile"))


if __name__ == "__main__":
    main()
