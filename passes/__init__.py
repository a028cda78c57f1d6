"""Passes over the IR, installed as ``qcompiler.passes`` (source folder ``passes/``).

One pass per module; each is a frozen dataclass subclassing ``onnx_ir.passes.InPlacePass``.
"""

from qcompiler.passes.allocate_bits import AllocateBitsPass
from qcompiler.passes.assign_fixed_point import AssignFixedPointPass
from qcompiler.passes.calibrate import CalibratePass
from qcompiler.passes.canonicalize import CanonicalizePass
from qcompiler.passes.detect_layers import DetectLayersPass
from qcompiler.passes.channel_allocation import ChannelAllocationPass
from qcompiler.passes.finetune import FineTunePass
from qcompiler.passes.fold_batchnorm import FoldBatchNormPass
from qcompiler.passes.import_profiles import ImportProfilesPass
from qcompiler.passes.measure_allocation import MeasureAllocationPass
from qcompiler.passes.profile_errors import ProfileErrorPass

__all__ = [
    "AllocateBitsPass",
    "AssignFixedPointPass",
    "ChannelAllocationPass",
    "ProfileErrorPass",
    "CalibratePass",
    "CanonicalizePass",
    "DetectLayersPass",
    "FineTunePass",
    "FoldBatchNormPass",
    "ImportProfilesPass",
    "MeasureAllocationPass",
]
