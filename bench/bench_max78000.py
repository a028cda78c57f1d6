"""MAX78000 target benchmark: digits accuracy per weight-bit setting, compile time, simulator speed.

Run: ``.venv/bin/python bench/bench_max78000.py`` (about a minute on 2 cores). Prints a
markdown table for bench/RESULTS.md.

- Digits CNN compiled for MAX78000 at 8/4/2 weight bits and under knapsack size budgets:
  simulated top-1 (the §5.3 ONNX, equal to the bit-exact simulator), logit SQNR, weight bytes,
  compile wall time.
- Simulator throughput on the shared networks (if ``../shared/data/max78000`` exists): the
  numpy integer simulator vs the §5.3 simulation ONNX in onnxruntime, per sample.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from qcompiler.api import CompileConfig, compile_model
from qcompiler.runtime import Runner
from qcompiler.targets import TargetConfig

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
SHARED = ROOT.parent / "shared" / "data" / "max78000"


def digits_rows() -> list[str]:
    rows = ["| setting | float top-1 | simulated top-1 | logit SQNR (dB) | weight bytes | compile (s) |",
            "|---|---|---|---|---|---|"]
    settings = [("W8", TargetConfig(weight_bits=8)), ("W4", TargetConfig(weight_bits=4)),
                ("W2", TargetConfig(weight_bits=2)), ("knapsack 24 KB", TargetConfig(total_bytes=24000)),
                ("knapsack 12 KB", TargetConfig(total_bytes=12000))]
    for label, target in settings:
        config = CompileConfig(calib=DIGITS / "calib.npz", eval=DIGITS / "eval.npz", target=target,
                               show_progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            result = compile_model(DIGITS / "digits_cnn.onnx", "max78000", config, Path(tmp) / "o")
            seconds = time.perf_counter() - start
        m = result.report["metrics"]
        rows.append(f"| {label} | {m['float']['top1']:.4f} | {m['simulated']['top1']:.4f} | "
                    f"{m['simulated']['sqnr_db']:.2f} | {result.report['target_details']['weight_bytes']} | "
                    f"{seconds:.2f} |")
    return rows


def simulator_rows() -> list[str]:
    from qcompiler.targets.max78000.checkpoint import load_checkpoint
    from qcompiler.targets.max78000.network import load_network
    from qcompiler.targets.max78000.onnx_model import build_simulation
    from qcompiler.targets.max78000.simulator import params_from_state_dict, simulate

    cases = [("cifar10-nas", "ai85-cifar10-qat8-q.pth.tar", "cifar10-nas.yaml", "sample_cifar-10.npy"),
             ("kws20_v3", "ai85-kws20_v3-qat8-q.pth.tar", "kws20-v3-hwc.yaml", "sample_kws_20.npy"),
             ("mnist-extrasmall", "ai85-mnist-extrasmall-qat8-q.pth.tar", "mnist-chw-extrasmall-ai85.yaml",
              "sample_mnist.npy")]
    rows = ["| network | numpy simulator (ms/sample) | ORT §5.3 ONNX (ms/sample) | ratio |", "|---|---|---|---|"]
    for name, ckpt, yaml_file, sample in cases:
        network = load_network(SHARED / yaml_file)
        params = params_from_state_dict(network, load_checkpoint(SHARED / ckpt)["state_dict"])
        x = np.load(SHARED / sample)
        runner = Runner(build_simulation(network.layers, params, x.shape))
        feed = {"x": x[None].astype(np.float32)}
        sim = statistics.median(_time(lambda: simulate(network, params, x)) for _ in range(7))
        ort = statistics.median(_time(lambda: runner.run(feed)) for _ in range(7))
        rows.append(f"| {name} | {sim * 1e3:.2f} | {ort * 1e3:.2f} | {sim / ort:.2f}x |")
    return rows


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    print("\n".join(digits_rows()))
    if SHARED.is_dir():
        print()
        print("\n".join(simulator_rows()))


if __name__ == "__main__":
    main()
