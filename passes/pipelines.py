"""Named pipelines: the passes ``qcompile`` runs for a target."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from qcompiler.data import ArrayDataset
from qcompiler.passes.calibrate import CalibratePass
from qcompiler.passes.canonicalize import CanonicalizePass
from qcompiler.passes.detect_layers import DetectLayersPass
from qcompiler.passes.fold_batchnorm import FoldBatchNormPass
from qcompiler.targets.base import Target, TargetConfig


def canonical_pipeline() -> list[ir.passes.PassBase]:
    """Target-independent clean-up: fold constants, fold BatchNorm, detect layers."""
    return [CanonicalizePass(), FoldBatchNormPass(), DetectLayersPass()]


def default_pipeline(
    target: Target,
    config: TargetConfig,
    calib: ArrayDataset | Iterable[Mapping[str, np.ndarray]],
    batch_size: int = 64,
    show_progress: bool = True,
) -> Sequence[ir.passes.PassBase]:
    """Canonicalisation, calibration, then the target's own passes."""
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
        *target.passes(config),
    ]
