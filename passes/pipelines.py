"""Named pipelines: the passes ``qcompile`` runs for a target."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.candidates import candidate_set
from qcompiler.data import ArrayDataset
from qcompiler.errors import QCompilerError
from qcompiler.passes.allocate_bits import AllocateBitsPass
from qcompiler.passes.import_profiles import ImportProfilesPass
from qcompiler.passes.measure_allocation import MeasureAllocationPass
from qcompiler.passes.calibrate import CalibratePass
from qcompiler.passes.canonicalize import CanonicalizePass
from qcompiler.passes.detect_layers import DetectLayersPass
from qcompiler.passes.fold_batchnorm import FoldBatchNormPass
from qcompiler.passes.gpfq import GPFQPass
from qcompiler.passes.greedy_allocate import GreedyAllocatePass
from qcompiler.passes.max_loss_allocate import MaxLossAllocatePass, Metric
from qcompiler.passes.profile_errors import ProfileErrorPass
from qcompiler.targets.base import Target, TargetConfig


def canonical_pipeline(keep_float: tuple[str, ...] = ()) -> list[ir.passes.PassBase]:
    """Target-independent clean-up: fold constants, fold BatchNorm, detect layers (except the
    nodes or op types in ``keep_float``)."""
    return [CanonicalizePass(), FoldBatchNormPass(), DetectLayersPass(keep_float=tuple(keep_float))]


def allocation_passes(
    target: Target,
    config: TargetConfig,
    calib: ArrayDataset | Iterable[Mapping[str, np.ndarray]],
    batch_size: int = 64,
    show_progress: bool = True,
    metric: Metric | None = None,
    reference: float | None = None,
    tune: ir.passes.PassBase | None = None,
) -> list[ir.passes.PassBase]:
    """Profile the target-legal candidates, then allocate bits (with a size budget), or bisect
    the budget against ``metric`` when ``config.max_loss`` is set; the greedy search retrains
    with ``tune`` between word-length cuts (seed 002's ``tune_model``)."""
    if tune is not None and config.allocator != "greedy":
        raise QCompilerError("retraining between word-length cuts needs the greedy search (--allocator greedy --max-loss L)")
    if config.allocator == "greedy" and config.max_loss is None:
        raise QCompilerError("--allocator greedy needs --max-loss (and --eval): it is driven by accuracy")
    if config.profile_from is not None and config.profile_mode != "exact":
        raise QCompilerError("--profile-from reads curves measured earlier; --profile-mode does not apply")
    if config.profile_mode == "hybrid" and config.max_loss is not None:
        raise QCompilerError("--profile-mode hybrid refines the solution of one budget; --max-loss searches many "
                             "(use exact or fast)")
    if config.avg_bits is None and config.total_bytes is None and config.max_loss is None:
        return []
    weight_bits = tuple(target.legal_weight_bits)
    activation_bits = tuple(target.legal_activation_bits) if config.allocate_scope == "all" else ()
    candidates = tuple(candidate_set(bits=tuple(sorted(set(weight_bits) | set(activation_bits))), kinds=tuple(target.legal_kinds)))
    allocate = AllocateBitsPass(
        avg_bits=config.avg_bits if config.avg_bits is not None else (None if config.total_bytes else 8.0),
        total_bytes=config.total_bytes, scope=config.allocate_scope,
        method=config.allocator if config.allocator != "greedy" else "knapsack",
        legal_bits=weight_bits, legal_activation_bits=activation_bits or None, kinds=tuple(target.legal_kinds),
    )
    if config.max_loss is not None and metric is None:
        raise ValueError("max_loss needs a metric callback and a reference value")
    if config.allocator == "greedy":
        def prepare(model: ir.Model) -> None:
            for pass_ in target.passes(config):
                pass_(model)

        return [GreedyAllocatePass(metric=metric, reference=reference, max_loss=config.max_loss,
                                   legal_bits=tuple(b for b in weight_bits if b <= 8), tune=tune, prepare=prepare)]
    tensors = "all" if config.allocate_scope == "all" else "weights"
    profile = (ImportProfilesPass(source=str(config.profile_from), candidates=candidates, tensors=tensors)
               if config.profile_from is not None else
               ProfileErrorPass(data=calib, candidates=candidates, mode=config.profile_mode,
                                allocate=allocate if config.profile_mode == "hybrid" else None,
                                tensors=tensors, batch_size=batch_size, show_progress=show_progress))
    return [
        profile,
        allocate if config.max_loss is None else MaxLossAllocatePass(
            metric=metric, reference=reference, max_loss=config.max_loss, allocate=allocate
        ),
        MeasureAllocationPass(data=calib, batch_size=batch_size),
    ]


def default_pipeline(
    target: Target,
    config: TargetConfig,
    calib: ArrayDataset | Iterable[Mapping[str, np.ndarray]],
    batch_size: int = 64,
    show_progress: bool = True,
    metric: Metric | None = None,
    reference: float | None = None,
    gpfq: GPFQPass | None = None,
    finetune: ir.passes.PassBase | None = None,
    tune: ir.passes.PassBase | None = None,
) -> Sequence[ir.passes.PassBase]:
    """Canonicalisation, calibration, [profiling + allocation], the target's own passes, then
    [GPFQ on the grids the target chose], [quantization-aware fine-tuning (a configured
    FineTunePass, with its data)]."""
    rewrite = [] if gpfq is None else [dataclasses.replace(gpfq, data=calib, show_progress=show_progress)]
    return [
        *canonical_pipeline(config.keep_float),
        CalibratePass(
            data=calib,
            batch_size=batch_size,
            methods=("minmax", config.range_method) if config.range_method != "minmax" else ("minmax",),
            bits=(config.activation_bits,),
            percentile=config.percentile,
            show_progress=show_progress,
            post_activation=getattr(target, "calibrate_post_activation", False),
        ),
        *allocation_passes(target, config, calib, batch_size, show_progress, metric, reference, tune),
        *target.passes(config),
        *rewrite,
        *([finetune] if finetune is not None else []),
    ]


#: Passes that run after the target's own passes (they rewrite on the grids the target chose).
REWRITE_PASSES = ("GPFQPass", "FineTunePass")


def text_pipeline(
    target: Target,
    config: TargetConfig,
    text: str,
    calib: ArrayDataset | Iterable[Mapping[str, np.ndarray]],
    finetune_data: Any = None,
    show_progress: bool = True,
) -> list[ir.passes.PassBase]:
    """The pipeline a ``--pipeline`` description gives: canonicalisation, the described analysis
    passes (calibrate, profile, allocate, channels), the target's passes, then the described
    rewrites (gpfq, finetune). Calibration data goes to every pass that takes ``data``, except
    ``finetune``, which takes ``finetune_data``.

    Raises:
        PipelineTextError: an unreadable description, or ``finetune`` without training data.
    """
    from qcompiler.pipeline_text import PipelineTextError, parse_pipeline

    described = parse_pipeline(text, show_progress=show_progress, data=calib)
    before, after = [], []
    for pass_ in described:
        name = type(pass_).__name__
        if name == "FineTunePass":
            if finetune_data is None:
                raise PipelineTextError("pipeline: finetune(...) needs training data (--finetune-data)")
            pass_ = dataclasses.replace(pass_, data=finetune_data)
        pass_ = _target_legal(pass_, target)
        (after if name in REWRITE_PASSES else before).append(pass_)
    allocations = [i for i, p in enumerate(before) if isinstance(p, AllocateBitsPass)]
    if allocations and not any(isinstance(p, MeasureAllocationPass) for p in before):
        # the report always gives the predicted distortion against the joint one (algorithms.md 2.4)
        before.insert(allocations[-1] + 1, MeasureAllocationPass(data=calib))
    return [*canonical_pipeline(config.keep_float), *before, *target.passes(config), *after]


def _target_legal(pass_: ir.passes.PassBase, target: Target) -> ir.passes.PassBase:
    """A described pass with the target's requirements filled in where the text left the default:
    post-activation calibration (MAX78000), the target-legal candidates and bit widths."""
    legal_bits = tuple(target.legal_weight_bits)
    if isinstance(pass_, CalibratePass) and getattr(target, "calibrate_post_activation", False):
        return dataclasses.replace(pass_, post_activation=True)
    if isinstance(pass_, ProfileErrorPass):
        if pass_.allocate is not None:  # hybrid: it solves the same allocation as the pass after it
            pass_ = dataclasses.replace(pass_, allocate=_target_legal(pass_.allocate, target))
        if pass_.candidates == tuple(candidate_set()):
            bits = tuple(sorted(set(legal_bits) | set(target.legal_activation_bits)))
            pass_ = dataclasses.replace(pass_, candidates=tuple(candidate_set(bits=bits, kinds=tuple(target.legal_kinds))))
        return pass_
    if isinstance(pass_, AllocateBitsPass) and pass_.legal_bits is None:
        activation_bits = tuple(target.legal_activation_bits) if pass_.scope == "all" else None
        return dataclasses.replace(pass_, legal_bits=legal_bits, legal_activation_bits=activation_bits,
                                   kinds=tuple(target.legal_kinds))
    return pass_
