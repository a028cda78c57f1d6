"""Digits CNN, W8A8: qcompiler fixed-point vs onnxruntime.quantization.quantize_static.

Both run side by side on the same machine, each 5 times (min and median wall time), and both
quantized models are evaluated on the same 540 held-out images, with graph optimisations off
("simulated") and on ("ORT kernel"). Run: ``.venv/bin/python bench/bench_digits_fixed_point.py``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from qcompiler.api import CompileConfig, compile_model
from qcompiler.metrics import sqnr_db, top1

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
RUNS = 5


class Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray) -> None:
        self.x, self.i = x, 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        batch = {"x": self.x[self.i : self.i + 32]}
        self.i += 32
        return batch

    def rewind(self) -> None:
        self.i = 0


def run(path: str, x: np.ndarray, optimize: bool) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return ort.InferenceSession(path, options).run(None, {"x": x})[0]


def main() -> None:
    calib = np.load(DIGITS / "calib.npz")["x"]
    ev = np.load(DIGITS / "eval.npz")
    x, labels = ev["x"], ev["labels"]
    ref = run(str(DIGITS / "digits_cnn.onnx"), x, False)
    tmp = Path(tempfile.mkdtemp())
    ours, theirs = [], []
    for _ in range(RUNS):
        t = time.perf_counter()
        compile_model(DIGITS / "digits_cnn.onnx", "fixed-point",
                      CompileConfig(calib=DIGITS / "calib.npz", show_progress=False), tmp / "q")
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        quantize_static(str(DIGITS / "digits_cnn.onnx"), str(tmp / "ort.onnx"), Reader(calib),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        theirs.append(time.perf_counter() - t)
    print(f"float top-1 {top1(ref, labels):.4f}")
    print("| tool | compile s (min / median) | top-1 sim | SQNR sim dB | top-1 kernel | SQNR kernel dB |")
    print("|---|---|---|---|---|---|")
    for name, path, times in (("qcompiler fixed-point (pow2, per-channel W, per-tensor A)", tmp / "q" / "model.qdq.onnx", ours),
                              ("ORT quantize_static QDQ per-channel MinMax", tmp / "ort.onnx", theirs)):
        sim, ker = run(str(path), x, False), run(str(path), x, True)
        print(f"| {name} | {min(times):.2f} / {statistics.median(times):.2f} | {top1(sim, labels):.4f} | "
              f"{sqnr_db(ref, sim):.1f} | {top1(ker, labels):.4f} | {sqnr_db(ref, ker):.1f} |")
    print(f"compile-time ratio (median, qcompiler / ORT): {statistics.median(ours) / statistics.median(theirs):.2f}")


if __name__ == "__main__":
    main()
