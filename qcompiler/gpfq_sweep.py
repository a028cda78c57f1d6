"""``qcompile gpfq``: seed 004's ``main.py`` — GPFQ over a Cartesian product of settings, logged as CSV.

Every combination of bits × alphabet scalars × calibration sizes × radius percentiles ×
lambdas quantizes the (canonicalised) float model with :class:`~qcompiler.passes.gpfq.GPFQPass`
(weights only, the model's own float activations), evaluates top-1/top-5 of the float, the
GPFQ and the round-to-nearest model on held-out data, writes the quantized model under a name
with all hyper-parameters, and appends one row per run to a CSV with the seed's columns (plus
qcompiler's: grid, output errors, RTN accuracy, times). The scalar sweep of the seed's
hyper-parameter analysis is ``-s 0.8,1.0,1.16,1.37,...``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler import annotations as ann
from qcompiler.api import first_output, labelled_top1
from qcompiler.data import ArrayDataset, load_dataset
from qcompiler.errors import DataError, QCompilerError
from qcompiler.fsutil import atomic_dir, check_output_dir, write_bytes, write_json
from qcompiler.ir import load_normalized, save
from qcompiler.metrics import top1, topk
from qcompiler.passes.gpfq import GPFQPass, round_to_nearest_model
from qcompiler.passes.pipelines import canonical_pipeline
from qcompiler.pipeline import run_pipeline
from qcompiler.runtime import Runner

#: The seed's CSV columns, in its order.
SEED_COLUMNS = (
    "Model Name", "Dataset", "Quantization Batch Size", "Original Top1 Accuracy", "Quantized Top1 Accuracy",
    "Original Top5 Accuracy", "Quantized Top5 Accuracy", "Bits", "MLP_Alphabet_Scalar", "CNN_Alphabet_Scalar",
    "MLP_Percentile", "CNN_Percentile", "Stochastic Quantization", "Regularizer", "Lambda", "Original Sparsity",
    "Quantized Sparsity", "Retain_rate", "Fusion", "Seed",
)
#: qcompiler's extra columns.
EXTRA_COLUMNS = ("Grid", "RTN Top1 Accuracy", "RTN Top5 Accuracy", "GPFQ Output MSE", "RTN Output MSE",
                 "Quantization Seconds", "Evaluation Seconds")
COLUMNS = SEED_COLUMNS + EXTRA_COLUMNS


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """The seed's lists of settings; their Cartesian product is run.

    Attributes:
        bits: bit widths (``-b``).
        scalars: alphabet scalars C of conv layers (``-s``).
        linear_scalars: alphabet scalars of linear layers (default: the conv value of the run).
        samples: calibration samples per layer (``-bs``); None = all.
        percentiles: radius quantiles p (``-p``, the same for conv and linear layers).
        lambdas: regulariser thresholds (``-l``), used with ``regularizer``.
        regularizer: None, ``L0`` or ``L1`` (``-reg``).
        stochastic: stochastic rounding (``-sq``).
        grid: ``int``, ``reference`` or ``paper2022``.
        skip: layers to skip (``-ig``).
        bias_correction: ``none``, ``last`` or ``all``.
        seed: RNG seed.
        batch_size: streaming batch size.
        dataset: the data set's name for the log.
        write_models: write each quantized model.
    """

    bits: tuple[int, ...] = (4,)
    scalars: tuple[float, ...] = (1.16,)
    linear_scalars: tuple[float, ...] | None = None
    samples: tuple[int | None, ...] = (None,)
    percentiles: tuple[float, ...] = (1.0,)
    lambdas: tuple[float, ...] = (0.1,)
    regularizer: str | None = None
    stochastic: bool = False
    grid: str = "int"
    skip: tuple[str, ...] = ()
    bias_correction: str = "none"
    seed: int = 0
    batch_size: int = 64
    dataset: str = ""
    write_models: bool = True

    def runs(self) -> list[dict[str, Any]]:
        """One option mapping per combination, in the seed's nesting order."""
        linear = self.linear_scalars or (None,)
        lambdas = self.lambdas if self.regularizer else (self.lambdas[0],)
        out = []
        for bits, samples, scalar, linear_scalar, p, lam in itertools.product(
            self.bits, self.samples, self.scalars, linear, self.percentiles, lambdas
        ):
            out.append({"bits": bits, "samples": samples, "scalar": scalar,
                        "linear_scalar": linear_scalar if linear_scalar is not None else scalar,
                        "radius_quantile": p, "lam": lam})
        return out


def _logits(model: ir.Model, data: ArrayDataset, batch_size: int) -> np.ndarray:
    return first_output(Runner(model), data, batch_size)


def run_name(stem: str, options: dict[str, Any], config: SweepConfig) -> str:
    """A file name with every hyper-parameter, like the seed's saved models."""
    parts = [stem, f"b{options['bits']}", f"bs{options['samples'] or 'all'}", f"s{options['scalar']:g}",
             f"ls{options['linear_scalar']:g}", f"p{options['radius_quantile']:g}", config.grid]
    if config.stochastic:
        parts.append("sq")
    if config.regularizer:
        parts.append(f"{config.regularizer}-l{options['lam']:g}")
    if config.bias_correction != "none":
        parts.append(f"bc-{config.bias_correction}")
    return "_".join(parts) + f"_seed{config.seed}"


def run_sweep(model_path: Path, calib: Any, eval_data: Any, out: Path, config: SweepConfig,
              log: Path | None = None, show_progress: bool = True) -> list[dict[str, Any]]:
    """Run every combination; write the models, ``gpfq_log.csv`` and ``sweep.json`` into ``out``.

    With ``log``, the rows are also appended to that CSV (created with a header when new), the
    way the seed accumulates its logs across runs.
    """
    existing_log = _read_log(log) if log is not None else ""  # a wrong log fails before any work
    check_output_dir(out)
    model = load_normalized(model_path)
    calib_data = load_dataset(calib, model)
    held_out = load_dataset(eval_data, model)
    if held_out.labels is None:
        raise DataError(f"{held_out.source}: GPFQ's log needs 'labels' in the evaluation data")
    canonical = run_pipeline(model, canonical_pipeline()).model
    float_logits = _logits(canonical, held_out, config.batch_size)
    labels = held_out.labels
    original = {"top1": labelled_top1(float_logits, held_out), "top5": topk(float_logits, labels, 5)}
    rows: list[dict[str, Any]] = []
    with atomic_dir(out) as folder:
        for options in config.runs():
            rows.append(_one_run(canonical, calib_data, held_out, float_logits, original, options, config,
                                 Path(model_path).name.split(".")[0], folder, show_progress))
        text = _csv(rows, header=True)
        write_bytes(folder / "gpfq_log.csv", text.encode())
        write_json(folder / "sweep.json", {"model": str(model_path), "runs": rows})
    if log is not None:
        write_bytes(log, (existing_log + _csv(rows, header=not existing_log)).encode())
    return rows


def _one_run(
    canonical: ir.Model, calib: ArrayDataset, held_out: ArrayDataset, float_logits: np.ndarray,
    original: dict[str, float], options: dict[str, Any], config: SweepConfig, stem: str, folder: Path,
    show_progress: bool,
) -> dict[str, Any]:
    try:
        rewrite = GPFQPass(
            data=calib, bits=options["bits"], scalar=options["scalar"], linear_scalar=options["linear_scalar"],
            samples=options["samples"], grid=config.grid, radius_quantile=options["radius_quantile"],
            rounding="stochastic" if config.stochastic else "nearest", regularizer=config.regularizer,
            lam=options["lam"], skip=config.skip, bias_correction=config.bias_correction, seed=config.seed,
            batch_size=config.batch_size, show_progress=show_progress,
        )
    except ValueError as exc:
        raise QCompilerError(str(exc)) from None
    start = time.perf_counter()
    quantized = run_pipeline(canonical.clone(), [rewrite]).model
    quantize_seconds = time.perf_counter() - start
    start = time.perf_counter()
    logits = _logits(quantized, held_out, config.batch_size)
    rtn_logits = _logits(round_to_nearest_model(quantized), held_out, config.batch_size)
    eval_seconds = time.perf_counter() - start
    summary = ann.require(quantized, ann.GPFQSummary)
    labels = held_out.labels
    name = run_name(stem, options, config)
    if config.write_models:
        save(quantized, folder / f"{name}.onnx")
    row = {
        "Model Name": stem, "Dataset": config.dataset or Path(held_out.source).stem,
        "Quantization Batch Size": options["samples"] or calib.num_samples,
        "Original Top1 Accuracy": original["top1"], "Quantized Top1 Accuracy": top1(logits, labels),
        "Original Top5 Accuracy": original["top5"], "Quantized Top5 Accuracy": topk(logits, labels, 5),
        "Bits": options["bits"], "MLP_Alphabet_Scalar": options["linear_scalar"], "CNN_Alphabet_Scalar": options["scalar"],
        "MLP_Percentile": options["radius_quantile"], "CNN_Percentile": options["radius_quantile"],
        "Stochastic Quantization": config.stochastic, "Regularizer": config.regularizer or "None",
        "Lambda": options["lam"] if config.regularizer else "None",
        "Original Sparsity": summary.zero_fraction_float, "Quantized Sparsity": summary.zero_fraction,
        "Retain_rate": "None", "Fusion": True, "Seed": config.seed,
        "Grid": config.grid, "RTN Top1 Accuracy": top1(rtn_logits, labels), "RTN Top5 Accuracy": topk(rtn_logits, labels, 5),
        "GPFQ Output MSE": float(np.mean((logits.astype(np.float64) - float_logits) ** 2)),
        "RTN Output MSE": float(np.mean((rtn_logits.astype(np.float64) - float_logits) ** 2)),
        "Quantization Seconds": round(quantize_seconds, 3), "Evaluation Seconds": round(eval_seconds, 3),
    }
    row["model_file"] = f"{name}.onnx" if config.write_models else None
    row["layers"] = [
        {"name": n.name, **dataclasses.asdict(ann.get(n, ann.GPFQLayer))} for n in quantized.graph if ann.get(n, ann.GPFQLayer)
    ]
    return row


def _csv(rows: Sequence[dict[str, Any]], header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _read_log(log: Path) -> str:
    """An existing log's text ("" when new); the rows are appended to it and written atomically."""
    if not log.exists():
        return ""
    existing = log.read_text(encoding="utf-8")
    first = existing.splitlines()[0] if existing else ""
    if first and first != ",".join(COLUMNS):
        raise QCompilerError(f"{log}: not a qcompiler GPFQ log (its header differs); choose another --log file")
    return existing
