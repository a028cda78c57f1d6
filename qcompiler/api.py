"""The Python API: ``compile_model(model, target, config, out_dir) -> CompileResult``.

Steps: load and normalise the model, validate the data, run the pipeline (canonicalise,
fold BatchNorm, detect layers, calibrate, target passes), let the target check and emit its
artifacts, validate the simulation ONNX against the float model in onnxruntime (optimisations
off = "simulated", on = "ORT kernel"), and write ``report.json``. All files go to a temporary
folder that replaces ``out_dir`` only when everything succeeded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler import __version__
from qcompiler import annotations as ann
from qcompiler.data import ArrayDataset, DataSource, load_dataset
from qcompiler.errors import DataError, QCompilerError
from qcompiler.fl_search import compression_rate
from qcompiler.float_reference import FLOAT_META
from qcompiler.fsutil import atomic_dir, check_output_dir, write_bytes, write_json
from qcompiler.graph import const_array, values_by_name, weight_count
from qcompiler.ir import ModelLike, load_normalized, save
from qcompiler.metrics import finite_or_none, mean_cosine, output_mse, sqnr_db, top1, top1_agreement
from qcompiler.passes.detect_layers import quantizable_nodes
from qcompiler.passes.gpfq import GPFQPass, gpfq_report
from qcompiler.passes.pipelines import canonical_pipeline, default_pipeline, text_pipeline
from qcompiler.pipeline_text import describe_pipeline
from qcompiler.report_html import render_html
from qcompiler.pipeline import PassStat, run_pipeline
from qcompiler.quantizers import fake_quant_fixed
from qcompiler.runtime import Runner
from qcompiler.targets import TargetConfig, get_target

ANNOTATED_FILE = "model.annotated.onnx"
REPORT_FILE = "report.json"
REPORT_HTML_FILE = "report.html"


@dataclasses.dataclass(frozen=True)
class CompileConfig:
    """Everything a compile needs besides the model and the target.

    Attributes:
        calib: calibration data (path, mapping or :class:`ArrayDataset`).
        eval: held-out evaluation data with ``labels`` (optional).
        target: target options (bit widths, per-channel).
        batch_size: batch size for calibration and validation.
        dump_ir: folder to write the IR after each pass.
        show_progress: draw progress bars on a terminal.
        gpfq: a configured :class:`GPFQPass` (its ``data`` is filled with ``calib``): rewrite the
            weights with GPFQ on the target's grid after the target's passes.
        finetune: a configured :class:`~qcompiler.passes.finetune.FineTunePass` (with its
            training data): quantization-aware fine-tuning last, on the target's quantizers.
        tune_between_cuts: the greedy word-length search retrains with ``finetune`` (one epoch
            per trial, up to 10 trials) when a cut overshoots ``max_loss`` (seed 002's ``tune_model``).
        pipeline: a textual pipeline (:mod:`qcompiler.pipeline_text`) replacing the default
            calibration, allocation and rewrite passes; ``finetune_data`` feeds its ``finetune``.
        finetune_data: training data for a ``finetune(...)`` in ``pipeline``.
    """

    calib: DataSource
    eval: DataSource | None = None
    target: TargetConfig = TargetConfig()
    batch_size: int = 64
    dump_ir: Path | None = None
    show_progress: bool = True
    gpfq: GPFQPass | None = None
    finetune: ir.passes.PassBase | None = None
    tune_between_cuts: bool = False
    pipeline: str | None = None
    finetune_data: DataSource | None = None


@dataclasses.dataclass(frozen=True)
class CompileResult:
    """The outcome of a compile.

    Attributes:
        model: the annotated IR.
        simulation_model: the target's standard-op simulation ONNX.
        report: the content of ``report.json``.
        stats: per-pass statistics.
        out_dir: where the artifacts were written (None when not written).
    """

    model: ir.Model
    simulation_model: ir.Model
    report: Mapping[str, Any]
    stats: tuple[PassStat, ...]
    out_dir: Path | None


def compile_model(
    model: ModelLike, target: str, config: CompileConfig, out_dir: str | Path | None = None
) -> CompileResult:
    """Compile ``model`` for ``target``; write artifacts and ``report.json`` to ``out_dir``.

    Raises:
        QCompilerError: any bad input or unsupported model, with a one-line message.
    """
    backend = get_target(target)
    if out_dir is not None:
        check_output_dir(out_dir)  # before the work, not after it
    source = str(model) if isinstance(model, (str, Path)) else "<memory>"
    ir_model = load_normalized(model)
    float_model = ir_model.clone()
    target_config = config.target
    if target_config.model_name is None and source != "<memory>":
        target_config = dataclasses.replace(target_config, model_name=Path(source).name.split(".")[0])
    target_config = default_weight_budget(backend, target_config, ir_model)
    check_keep_float(backend, target_config, ir_model)
    check_target_support(backend, target_config, ir_model)
    calib = load_dataset(config.calib, ir_model)
    evaluation = load_dataset(config.eval, ir_model) if config.eval is not None else None
    config = _with_training_data_loaded(config, ir_model)
    metric, reference = None, None
    if target_config.max_loss is not None:
        if evaluation is None or evaluation.labels is None:
            raise DataError("--max-loss needs held-out data with labels (--eval)")
        metric, reference = accuracy_metric(backend, target_config, float_model, evaluation, config.batch_size)
    if config.pipeline is not None:
        passes = text_pipeline(backend, target_config, config.pipeline, calib, config.finetune_data, config.show_progress)
    else:
        passes = default_pipeline(backend, target_config, calib, config.batch_size, config.show_progress, metric,
                                  reference, gpfq=config.gpfq, finetune=config.finetune, tune=_cut_tuner(config))
    result = run_pipeline(ir_model, passes, dump_ir=config.dump_ir)
    annotated = result.model
    backend.validate(annotated)
    data, split = (evaluation, "eval") if evaluation is not None else (calib, "calib")
    with contextlib.ExitStack() as stack:
        if out_dir is not None:
            folder = stack.enter_context(atomic_dir(out_dir))
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qcompile-")))
        artifact = backend.emit(annotated, folder, data=data)
        save(annotated, folder / ANNOTATED_FILE)
        metrics = validate_outputs(float_model, artifact.simulation_model, data, config.batch_size)
        report = build_report(source, backend.name, annotated, metrics, split, result.stats, artifact.files,
                              describe_pipeline(passes))
        if artifact.report:
            report["target_details"] = dict(artifact.report)
            _merge_target_layers(report)
        write_json(folder / REPORT_FILE, report)
        write_bytes(folder / REPORT_HTML_FILE, render_html(report, annotated).encode("utf-8"))
    return CompileResult(
        annotated, artifact.simulation_model, report, result.stats, Path(out_dir) if out_dir is not None else None
    )


def _with_training_data_loaded(config: CompileConfig, model: ir.Model) -> CompileConfig:
    """Fine-tuning data loaded and checked now: a wrong path or array fails before calibration,
    allocation and GPFQ have run, not after them."""
    finetune_data = getattr(config.finetune, "data", None)
    if finetune_data is not None and not isinstance(finetune_data, ArrayDataset):
        config = dataclasses.replace(config, finetune=dataclasses.replace(config.finetune, data=load_dataset(finetune_data, model)))
    if config.finetune_data is not None:
        config = dataclasses.replace(config, finetune_data=load_dataset(config.finetune_data, model))
    return config


def _cut_tuner(config: CompileConfig) -> ir.passes.PassBase | None:
    """The retraining between word-length cuts: the configured fine-tune, one epoch per trial."""
    if not config.tune_between_cuts:
        return None
    if config.finetune is None:
        raise QCompilerError("retraining between word-length cuts needs training data (--finetune-data)")
    return dataclasses.replace(config.finetune, epochs=1, holdout=0.0, patience=0, show_progress=False)


def check_keep_float(backend: Any, config: TargetConfig, model: ir.Model) -> None:
    """``--keep-float`` names must be node names or op types of the model, on a target that
    can leave nodes in float; ``--native-int4`` needs a target that stores ONNX INT4."""
    if config.native_int4 and not getattr(backend, "supports_native_int4", False):
        raise QCompilerError(f"target {backend.name!r} does not store ONNX INT4 weights: --native-int4 is not supported")
    if not config.keep_float:
        return
    if not getattr(backend, "supports_keep_float", False):
        raise QCompilerError(f"target {backend.name!r} runs every layer in integer arithmetic: --keep-float is not supported")
    known = {n.name for n in model.graph} | {n.op_type for n in model.graph} | {"unsupported"}
    unknown = [name for name in config.keep_float if name not in known]
    if unknown:
        raise QCompilerError(f"--keep-float {unknown[0]!r} is neither a node name nor an op type of the model")


def check_target_support(backend: Any, config: TargetConfig, model: ir.Model) -> None:
    """The target's verdict on the canonicalised float model (unsupported operators, topology,
    size), before calibration: the error the target would raise after calibrating and profiling
    comes in a second, not minutes later."""
    check = getattr(backend, "check_model", None)
    if check is not None:
        check(run_pipeline(model.clone(), canonical_pipeline(config.keep_float)).model, config)


def default_weight_budget(backend: Any, config: TargetConfig, model: ir.Model) -> TargetConfig:
    """A target with a fixed weight memory (``weight_memory_bytes``) gets it as the allocation
    budget when the user set none and the weights at ``--weight-bits`` would not fit."""
    memory = getattr(backend, "weight_memory_bytes", None)
    if memory is None or config.avg_bits is not None or config.total_bytes is not None or config.max_loss is not None:
        return config
    if weight_count(model) * config.weight_bits / 8 <= memory:
        return config
    return dataclasses.replace(config, total_bytes=float(memory))


def _merge_target_layers(report: dict[str, Any]) -> None:
    """Copy a target's per-layer bits, sizes, simulated output SQNR and clamped fraction onto the
    generic layer rows (matched by ONNX node)."""
    by_node = {node: row for row in report["target_details"].get("layers", []) for node in row.get("onnx_nodes", [])}
    for row in report["layers"]:
        target_row = by_node.get(row["name"])
        if target_row is None:
            continue
        if "bits" in target_row:
            row.setdefault("weight_bits", target_row["bits"])
            row.setdefault("weight_bytes", target_row.get("weight_bytes"))
        # the target layer's simulated output against float
        for key, target_key in (("output_sqnr_db", "sqnr_db"), ("saturated_fraction", "saturated_fraction")):
            if target_row.get(target_key) is not None:
                row.setdefault(key, target_row[target_key])
    report["summary"]["weight_bytes"] = sum(r.get("weight_bytes") or 0 for r in report["layers"])


def accuracy_metric(
    backend: Any, config: TargetConfig, float_model: ir.Model, data: ArrayDataset, batch_size: int
) -> tuple[Any, float]:
    """(metric, float top-1): the metric annotates a clone with the target's passes, simulates it
    in onnxruntime and returns its top-1 on ``data``."""
    reference = labelled_top1(first_output(Runner(float_model), data, batch_size), data)

    def metric(model: ir.Model) -> float:
        for pass_ in backend.passes(config):
            pass_(model)
        return labelled_top1(first_output(Runner(backend.simulate(model)), data, batch_size), data)

    return metric, reference


def profile_points(model: ir.Model) -> dict[str, Any]:
    """How the allocated tensors' curves were obtained: their modes and how many points were
    measured (the rest predicted by the additive-noise model)."""
    profiles = [p for v in values_by_name(model.graph).values()
                if ann.get(v, ann.BitWidth) is not None and (p := ann.get(v, ann.ErrorProfile)) is not None]
    return {"modes": sorted({p.mode for p in profiles}), "measured": sum(sum(p.measured) for p in profiles),
            "total": sum(len(p.measured) for p in profiles)}


def labelled_top1(logits: np.ndarray, data: ArrayDataset) -> float:
    """Top-1 of ``logits`` against ``data.labels``.

    Raises:
        DataError: naming the data file, when the output is not a classifier's (labels are one
            class per sample, so they need (samples, classes) logits).
    """
    try:
        return top1(logits, data.labels)
    except ValueError as exc:
        raise DataError(f"{data.source}: has 'labels', but {exc} from the model's first output") from None


def first_output(runner: Runner, data: ArrayDataset, batch_size: int) -> np.ndarray:
    """The runner's first model output over every batch of ``data``, concatenated."""
    name = runner.model_outputs[0]
    return runner.collect(data.batches(batch_size), [name])[name]


def validate_outputs(
    float_model: ir.Model, quant_model: ir.Model, data: ArrayDataset, batch_size: int = 64
) -> dict[str, dict[str, float | None]]:
    """Float vs quantized outputs in onnxruntime, simulated and with ORT kernels.

    Returns ``{"float": {...}, "simulated": {...}, "ort_kernel": {...}}`` with ``top1`` (when
    labels exist), ``sqnr_db``, ``top1_agreement`` and ``output_mse`` of the first output.
    """
    reference = first_output(Runner(float_model), data, batch_size)
    metrics: dict[str, dict[str, float | None]] = {"float": {}}
    if data.labels is not None:
        metrics["float"]["top1"] = labelled_top1(reference, data)
    for mode, optimize in (("simulated", False), ("ort_kernel", True)):
        out = first_output(Runner(quant_model, optimize=optimize), data, batch_size)
        entry: dict[str, float | None] = {
            "sqnr_db": finite_or_none(sqnr_db(reference, out)),
            "top1_agreement": top1_agreement(reference, out),
            "output_mse": output_mse(reference, out),
            "mean_cosine": mean_cosine(reference, out),
        }
        if data.labels is not None:
            entry["top1"] = labelled_top1(out, data)
        metrics[mode] = entry
    return metrics


def layer_table(model: ir.Model) -> list[dict[str, Any]]:
    """One entry per quantized layer: op, shapes, parameters, formats, the weight SQNR against
    the float weights, and GPFQ's and round-to-nearest's layer output errors when GPFQ ran."""
    values = values_by_name(model.graph)
    rows = []
    for node, layer in quantizable_nodes(model):
        w_fmt = ann.get(values[layer.weight], ann.FixedPoint)
        a_fmt = ann.get(values[layer.activation_input], ann.FixedPoint)
        weight = const_array(values[layer.weight])
        # A weight rewritten onto its grid (GPFQ, fine-tuning) is compared with its float
        # original while this process holds it; against itself it would read as lossless.
        reference = values[layer.weight].meta.get(FLOAT_META, weight)
        params = int(weight.size) + (int(const_array(values[layer.bias]).size) if layer.bias else 0)
        row: dict[str, Any] = {
            "name": node.name,
            "op": node.op_type,
            "weight": layer.weight,
            "weight_shape": list(layer.weight_shape),
            "params": params,
            "activation_input": layer.activation_input,
        }
        if w_fmt is not None:
            fls = w_fmt.fl if isinstance(w_fmt.fl, tuple) else (w_fmt.fl,)
            fl = np.asarray(fls) if isinstance(w_fmt.fl, tuple) else w_fmt.fl
            quantized = fake_quant_fixed(weight, w_fmt.wl, fl, w_fmt.signed, w_fmt.axis)
            row.update(
                weight_bits=w_fmt.wl,
                weight_fl_min=min(fls),
                weight_fl_max=max(fls),
                weight_scale="per-channel" if w_fmt.axis is not None else "per-tensor",
                weight_sqnr_db=finite_or_none(sqnr_db(reference, quantized)),
                weight_bytes=int(np.ceil(weight.size * w_fmt.wl / 8)),
            )
        if a_fmt is not None:
            row.update(activation_bits=a_fmt.wl, activation_fl=a_fmt.fl, activation_signed=a_fmt.signed)
        rewrite = ann.get(node, ann.GPFQLayer)
        if rewrite is not None:
            row.update(gpfq_error=rewrite.error, rtn_error=rewrite.error_rtn)
        rows.append(row)
    return rows


def _compression(model: ir.Model) -> float | None:
    """Seed 002's compression rate Σ wl·N / (32·Σ N) over quantized weights and biases."""
    values = values_by_name(model.graph)
    wls, counts = [], []
    for _, layer in quantizable_nodes(model):
        for name in (layer.weight, layer.bias):
            fmt = ann.get(values[name], ann.FixedPoint) if name else None
            if fmt is not None:
                wls.append(fmt.wl)
                counts.append(int(const_array(values[name]).size))
    return compression_rate(wls, counts) if wls else None


def _cpu() -> dict[str, Any]:
    """CPU model and whether it has VNNI (ORT's u8s8 kernels saturate without it)."""
    name, flags = platform.processor(), ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    return {"model": name, "vnni": "vnni" in flags.split()}


#: A simulated-vs-kernel SQNR gap above this is reported as a runtime effect.
KERNEL_GAP_DB = 1.0


def runtime_notes(metrics: Mapping[str, Any], cpu: Mapping[str, Any]) -> list[str]:
    """Explain a gap between the simulated and the ORT-kernel figures (a runtime effect)."""
    sim = metrics.get("simulated", {}).get("sqnr_db")
    kernel = metrics.get("ort_kernel", {}).get("sqnr_db")
    if sim is None or kernel is None or sim - kernel <= KERNEL_GAP_DB:
        return []
    why = (
        "onnxruntime's fused u8s8 integer kernels saturate int16 pair sums on CPUs without VNNI"
        if not cpu.get("vnni")
        else "onnxruntime's fused integer kernels round differently from the QDQ reference"
    )
    return [
        f"ORT-kernel logit SQNR is {sim - kernel:.1f} dB below the simulated figure: a runtime effect "
        f"({why}), not a quantization error; the simulated figure is the model's accuracy"
    ]


def build_report(
    source: str,
    target: str,
    model: ir.Model,
    metrics: Mapping[str, Any],
    split: str,
    stats: tuple[PassStat, ...],
    files: tuple[str, ...],
    pipeline_text: str | None = None,
) -> dict[str, Any]:
    """The ``report.json`` content (``pipeline_text``: the configurable passes as ``--pipeline`` text)."""
    layers = layer_table(model)
    cpu = _cpu()
    summary = ann.get(model, ann.AllocationSummary)
    allocation = None
    if summary is not None:
        allocation = dataclasses.asdict(summary)
        allocation["bits"] = {r["weight"]: r.get("weight_bits") for r in layers}
        # algorithms.md 2.4: the sum of single-tensor distortions against the joint measurement
        measured, predicted = summary.measured_distortion, summary.predicted_distortion
        allocation["additivity_ratio"] = measured / predicted if measured is not None and predicted > 0 else None
        allocation["profile_points"] = profile_points(model)
        search = ann.get(model, ann.AccuracySearch)
        if search is not None:
            allocation["max_loss_search"] = dataclasses.asdict(search)
    return {
        "allocation": allocation,
        "notes": runtime_notes(metrics, cpu),
        "qcompiler": __version__,
        "model": source,
        "target": target,
        "validation_split": split,
        "metrics": metrics,
        "layers": layers,
        "gpfq": gpfq_report(model),
        "summary": {
            "quantized_layers": len(layers),
            "params": sum(r["params"] for r in layers),
            "weight_bytes": sum(r.get("weight_bytes", 0) for r in layers),
            "compression": _compression(model),
        },
        "pipeline": [
            {"pass": s.name, "config": s.config, "seconds": round(s.seconds, 4), "modified": s.modified}
            for s in stats
        ],
        "pipeline_text": pipeline_text,
        "artifacts": sorted([*files, ANNOTATED_FILE, REPORT_FILE, REPORT_HTML_FILE]),
        "cpu": cpu,
    }
