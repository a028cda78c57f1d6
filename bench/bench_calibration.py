"""Calibration cost and memory (issue 3).

- cost: CalibratePass wall time / plain onnxruntime inference over the same samples and
  batches, on the digits CNN (4096 samples: the calibration set tiled) and the ResNet-18-shaped
  model (64 random 224x224 images; built on demand). Streaming only (``minmax``) and with all
  four range choosers. Min and median of 5 runs (3 for ResNet-18).
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


def time_it(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def cost(name: str, path: Path, data, runs: int, batch: int) -> None:
    from qcompiler.data import ArrayDataset
    from qcompiler.passes import CalibratePass
    from qcompiler.runtime import Runner

    model = prepared(path)
    ds = ArrayDataset(data)
    runner = Runner(model)
    plain = time_it(lambda: [runner.run(f) for f in ds.batches(batch)], runs)
    stream = time_it(lambda: CalibratePass(data=ds, batch_size=batch, methods=("minmax",), show_progress=False)(model.clone()), runs)
    full = time_it(lambda: CalibratePass(data=ds, batch_size=batch, show_progress=False)(model.clone()), runs)
    med = statistics.median
    print(f"| {name} | {ds.num_samples} | {min(plain):.3f} / {med(plain):.3f} | {min(stream):.3f} / {med(stream):.3f} | "
          f"{med(stream) / med(plain):.2f} | {min(full):.3f} / {med(full):.3f} | {med(full) / med(plain):.2f} |")


def rss(samples: int) -> int:
    code = f"""
import resource, numpy as np
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
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    return int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()[-1])


def main() -> None:
    calib = np.load(ROOT / "examples" / "digits" / "calib.npz")["x"]
    print("| model | samples | plain ORT s (min / median) | calibrate, streaming s | ratio | calibrate + 4 choosers s | ratio |")
    print("|---|---|---|---|---|---|---|")
    cost("digits CNN", ROOT / "examples" / "digits" / "digits_cnn.onnx", {"x": np.tile(calib, (16, 1, 1, 1))}, 5, 256)
    r18 = ROOT / "examples" / "resnet18" / "resnet18.onnx"
    if not r18.exists():
        import build

        build.build_onnx(r18)
    images = np.random.default_rng(0).normal(size=(64, 3, 224, 224)).astype(np.float32)
    cost("ResNet-18-shaped", r18, {"image": images}, 3, 16)
    small, large = rss(256), rss(4096)
    print(json.dumps({"peak_rss_kib_256": small, "peak_rss_kib_4096": large, "growth": large / small - 1}))


if __name__ == "__main__":
    main()
