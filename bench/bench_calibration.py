"""Calibration cost and memory (issue 3).

- cost: CalibratePass wall time / plain onnxruntime inference over the same samples and
  batches, on the digits CNN (4096 samples: the calibration set tiled) and the ResNet-18-shaped
  model (64 random 224x224 images; built on demand). Streaming only (``minmax``) and with all
  four range choosers. Plain inference is an ``InferenceSession`` with onnxruntime's default
  options (all graph optimisations), as a user runs the model; the pass creates its own session,
  so plain inference is given both without and with creating a session. Sessions 7-16 measured
  against unoptimised sessions (``Runner``'s default), which run these models 1.5-2.2x slower;
  that column is kept for comparison with their tables. Runs alternate, medians of 7 (5 for
  ResNet-18).
- memory: peak RSS of a fresh process calibrating 256 vs 4096 digits samples.

Run: ``.venv/bin/python bench/bench_calibration.py``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "resnet18"))


def prepared(path: Path):
    from qcompiler.ir import load_normalized
    from qcompiler.passes.pipelines import canonical_pipeline
    from qcompiler.pipeline import run_pipeline

    return run_pipeline(load_normalized(path), canonical_pipeline()).model


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cost(name: str, path: Path, data, runs: int, batch: int) -> None:
    """Plain inference and calibration timed in alternation (the machine drifts), medians."""
    import onnxruntime as ort

    from qcompiler.data import ArrayDataset
    from qcompiler.ir import to_bytes
    from qcompiler.passes import CalibratePass
    from qcompiler.runtime import Runner

    model = prepared(path)
    ds = ArrayDataset(data)
    blob = to_bytes(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # quiet; every other option is onnxruntime's default

    def session() -> ort.InferenceSession:
        return ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])

    plain = session()
    unoptimised = Runner(model)
    times: dict[str, list[float]] = {"run": [], "session+run": [], "unoptimised": [], "stream": [], "full": []}
    for _ in range(runs):
        times["run"].append(timed(lambda: [plain.run(None, f) for f in ds.batches(batch)]))
        times["session+run"].append(timed(lambda: [s.run(None, f) for s in [session()] for f in ds.batches(batch)]))
        times["unoptimised"].append(timed(lambda: [unoptimised.run(f) for f in ds.batches(batch)]))
        for key, methods in (("stream", ("minmax",)), ("full", None)):
            clone = model.clone()  # the pass annotates in place; cloning is not part of its cost
            chooser = {"methods": methods} if methods else {}
            calibrate = CalibratePass(data=ds, batch_size=batch, show_progress=False, **chooser)
            times[key].append(timed(lambda: calibrate(clone)))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"| {name} | {ds.num_samples} | {med['run']:.3f} | {med['session+run']:.3f} | {med['unoptimised']:.3f} | "
          f"{med['stream']:.3f} | {med['stream'] / med['run']:.2f} | {med['stream'] / med['session+run']:.2f} | "
          f"{med['stream'] / med['unoptimised']:.2f} | {med['full']:.3f} | {med['full'] / med['session+run']:.2f} |")


def rss(samples: int) -> int:
    code = f"""
import sys, numpy as np
sys.path.insert(0, '{ROOT}/bench')
from peak_rss import peak_rss_kib
from pathlib import Path
from qcompiler.ir import load_normalized
from qcompiler.passes.pipelines import canonical_pipeline
from qcompiler.passes import CalibratePass
from qcompiler.pipeline import run_pipeline
from qcompiler.data import ArrayDataset
x = np.load('{ROOT}/examples/digits/calib.npz')['x']
x = np.concatenate([x] * ({samples} // len(x) + 1))[:{samples}]
m = run_pipeline(load_normalized('{ROOT}/examples/digits/digits_cnn.onnx'), canonical_pipeline()).model
CalibratePass(data=ArrayDataset({{'x': x}}), show_progress=False)(m)
print(peak_rss_kib())
"""
    return int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()[-1])


def main() -> None:
    calib = np.load(ROOT / "examples" / "digits" / "calib.npz")["x"]
    print("| model | samples | plain: runs s | plain: session + runs s | unoptimised runs s | calibrate (streaming) s | "
          "ratio to runs | ratio to session + runs | ratio to unoptimised runs | calibrate + 4 choosers s | "
          "ratio to session + runs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    cost("digits CNN", ROOT / "examples" / "digits" / "digits_cnn.onnx", {"x": np.tile(calib, (16, 1, 1, 1))}, 7, 256)
    r18 = ROOT / "examples" / "resnet18" / "resnet18.onnx"
    if not r18.exists():
        import build

        build.build_onnx(r18)
    images = np.random.default_rng(0).normal(size=(64, 3, 224, 224)).astype(np.float32)
    cost("ResNet-18-shaped", r18, {"image": images}, 5, 16)
    small, large = rss(256), rss(4096)
    print(json.dumps({"peak_rss_kib_256": small, "peak_rss_kib_4096": large, "growth": large / small - 1}))


if __name__ == "__main__":
    main()
