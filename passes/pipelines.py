"""Named pipelines: the passes ``qcompile`` runs for a target."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from qcompiler.candidates import candidate_set
from qcompiler.data import ArrayDataset
from qcompiler.passes.allocate_bits import AllocateBitsPass
from qcompiler.passes.calibrate import CalibratePass
from qcompiler.passes.canonicalize import CanonicalizePass
from qcompiler.passes.detect_layers import DetectLayersPass
from qcompiler.passes.fold_batchnorm import FoldBatchNormPass
from qcompiler.passes.profile_errors import ProfileErrorPass
from qcompiler.targets.base import Target, TargetConfig


def canonical_pipeline() -> list[ir.passes.PassBase]:
    """Target-independent clean-up: fold constants, fold BatchNorm, detect layers."""
    return [CanonicalizePass(), FoldBatchNormPass(), DetectLayersPass()]


def allocation_passes(
    target: Target,
    config: TargetConfig,
    calib: ArrayDataset | Iterable[Mapping[str, np.ndarray]],
    batch_size: int = 64,
    show_progress: bool = True,
) -> list[ir.passes.PassBase]:
    """Profile the target-legal candidates, then allocate bits (only with a size budget)."""
    if config.avg_bits is None and config.total_bytes is None:
        return []
    weight_bits = tuple(target.legal_weight_bits)
    activation_bits = tuple(target.legal_activation_bits) if config.allocate_scope == "all" else ()
    candidates = tuple(candidate_set(bits=tuple(sorted(set(weight_bits) | set(activation_bits))), kinds=tuple(target.legal_kinds)))
    return [
        ProfileErrorPass(data=calib, candidates=candidates, mode="exact",
                         tensors="all" if config.allocate_scope == "all" else "weights",
                         batch_size=batch_size, show_progress=show_progress),
        AllocateBitsPass(avg_bits=config.avg_bits, total_bytes=config.total_bytes, scope=config.allocate_scope,
                         method=config.allocator, legal_bits=weight_bits, legal_activation_bits=activation_bits or None,
                         kinds=tuple(target.legal_kinds)),
    ]


def default_pipeline(
    target: Target,
    config: TargetConfig,
    calib: ArrayDataset | Iterable[Mapping[str, np.ndarray]],
    batch_size: int = 64,
    show_progress: bool = True,
) -> Sequence[ir.passes.PassBase]:
    """Canonicalisation, calibration, [profiling + allocation], then the target's own passes."""
    return [
        *canonical_pipeline(),
        CalibratePass(
            data=calib,
            batch_size=batch_size,
            methods=("minmax", config.range_method) if config.range_method != "minmax" else ("minmax",),
            bits=(config.activation_bits,),
            percentile=config.percentile,
            show_progress=show_progress,
        ),
        *allocation_passes(target, config, calib, batch_size, show_progress),
        *target.passes(config),
    ]
