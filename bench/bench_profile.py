"""Error profiling (issue 3): exact (suffix-cached) vs the naive full-forward loop, and fast vs exact.

Digits CNN, 256 calibration images, all 10 tensors (5 weights, 5 activations), candidates
uniform/dead-zone (ratio 0.3)/fixed/log at 2, 3, 4, 5, 6, 8 bits (24 per tensor). Each mode
runs twice side by side in one process; the minimum is reported. Run:
``.venv/bin/python bench/bench_profile.py``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from qcompiler import annotations as ann
from qcompiler.candidates import candidate_set
from qcompiler.data import load_dataset
from qcompiler.graph import values_by_name
from qcompiler.ir import load_normalized
from qcompiler.passes import CalibratePass
from qcompiler.passes.pipelines import canonical_pipeline
from qcompiler.passes.profile_errors import ProfileErrorPass, agreement
from qcompiler.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = tuple(candidate_set(bits=(2, 3, 4, 5, 6, 8), kinds=("uniform", "deadzone", "fixed", "log"), deadzone_ratios=(0.3,)))


def run(mode: str, base, data, candidates=CANDIDATES, only=(), repeats=2, batch_size=64, times=None):
    """The fastest of ``repeats`` runs (all of them appended to ``times`` if given) and the profiles."""
    best, profiles = float("inf"), None
    for _ in range(repeats):
        model = base.clone()
        t = time.perf_counter()
        ProfileErrorPass(data=data, candidates=candidates, mode=mode, only=only, batch_size=batch_size,
                         show_progress=False)(model)
        seconds = time.perf_counter() - t
        best = min(best, seconds)
        if times is not None:
            times.append(seconds)
        profiles = {n: p for n, v in values_by_name(model.graph).items() if (p := ann.get(v, ann.ErrorProfile))}
    return best, profiles


def main() -> None:
    model = load_normalized(ROOT / "examples" / "digits" / "digits_cnn.onnx")
    data = load_dataset(ROOT / "examples" / "digits" / "calib.npz", model)
    base = run_pipeline(model, [*canonical_pipeline(), CalibratePass(data=data, show_progress=False)]).model
    t_exact, exact = run("exact", base, data)
    t_full, full = run("full", base, data)
    t_fast, fast = run("fast", base, data)
    worst = max(float(np.max(np.abs(np.array(exact[n].distortion) - full[n].distortion) / np.maximum(full[n].distortion, 1e-30))) for n in exact)
    print(f"tensors {len(exact)}, candidates per tensor {len(CANDIDATES)}")
    print("| mode | seconds (min of 2) | speed-up vs full |")
    print("|---|---|---|")
    for name, t in (("full (naive loop)", t_full), ("exact (suffix-cached)", t_exact), ("fast (linear model)", t_fast)):
        print(f"| {name} | {t:.2f} | {t_full / t:.1f}x |")
    print(f"exact vs full: max relative difference {worst:.2e}")
    print("| tensor | kind | Spearman fast vs exact | median relative error |")
    print("|---|---|---|---|")
    rhos, rels = [], []
    for name in exact:
        a = agreement(exact[name], fast[name])
        rhos.append(a["spearman"])
        rels.append(a["median_relative_error"])
        print(f"| {name} | {exact[name].tensor_kind} | {a['spearman']:.3f} | {a['median_relative_error']:.2f} |")
    print(f"mean Spearman {np.mean(rhos):.3f}, median relative error {np.median(rels):.2f}")
    resnet()


def resnet() -> None:
    """ResNet-18-shaped model, 16 random images, 4 weights and 2 activations of the later stages."""
    import sys

    from qcompiler.data import ArrayDataset
    from qcompiler.passes import DetectLayersPass
    from qcompiler.passes.detect_layers import quantizable_nodes

    sys.path.insert(0, str(ROOT / "examples" / "resnet18"))
    import build

    path = ROOT / "examples" / "resnet18" / "resnet18.onnx"
    if not path.exists():
        build.build_onnx(path)
    model = load_normalized(path)
    data = ArrayDataset({"image": np.random.default_rng(0).normal(size=(16, 3, 224, 224)).astype(np.float32)})
    base = run_pipeline(model, [*canonical_pipeline(), DetectLayersPass()]).model
    layers = [layer for _, layer in quantizable_nodes(base)]
    only = tuple([l.weight for l in layers[-5:-1]] + [layers[-6].activation_input, layers[-3].activation_input])
    cands = tuple(candidate_set(bits=(2, 4, 8), kinds=("uniform", "fixed")))
    # the naive loop takes long: one run of it; exact twice (the first run in a process pays
    # first-touch costs: both are printed, the speed-up is given against each)
    exact_times: list[float] = []
    _, exact = run("exact", base, data, cands, only, repeats=2, batch_size=8, times=exact_times)
    t_full, full = run("full", base, data, cands, only, repeats=1, batch_size=8)
    worst = max(float(np.max(np.abs(np.array(exact[n].distortion) - full[n].distortion) / np.maximum(full[n].distortion, 1e-30))) for n in exact)
    print(f"ResNet-18-shaped, 16 images, {len(only)} tensors ({', '.join(only)}) x {len(cands)} candidates:")
    print(f"full {t_full:.1f} s, exact {exact_times[0]:.1f} s (first run) / {exact_times[1]:.1f} s (second), "
          f"speed-up {t_full / exact_times[0]:.1f}x / {t_full / exact_times[1]:.1f}x, max relative difference {worst:.2e}")


if __name__ == "__main__":
    main()
