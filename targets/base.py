"""The target interface and the configuration every target receives."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import onnx_ir as ir

from qcompiler.data import ArrayDataset


@dataclasses.dataclass(frozen=True)
class TargetConfig:
    """Quantization choices a target turns into passes.

    Attributes:
        weight_bits: weight word length.
        activation_bits: activation word length.
        per_channel: per-output-channel weight scales.
        range_method: calibrated activation range (``minmax``, ``percentile``, ``entropy``, ``mse``).
        percentile: the percentile of the ``percentile`` range.
        avg_bits: mixed precision: average bits per element the allocator may spend, or None.
        total_bytes: mixed precision: total size budget in bytes, or None.
        allocator: ``knapsack``, ``pareto``, ``pareto-faithful``, ``hull``, ``hull-fill``, ``uniform``.
        allocate_scope: ``weights`` or ``all`` (weights and activations).
        profile_mode: the distortion curves the allocator reads: ``exact``, ``fast`` or
            ``hybrid`` (:class:`~qcompiler.passes.profile_errors.ProfileErrorPass`).
        profile_from: an ONNX file whose ErrorProfile annotations the allocator reads instead
            of profiling (``model.profiled.onnx`` or ``model.annotated.onnx`` of this model).
        fl_rule: weight FL choice: ``minmax``, ``mse``, ``mae``, ``seed002`` or ``ristretto``.
        max_loss: accuracy-aware mode: the smallest budget whose held-out top-1 drop is at most
            this (a fraction, 0.01 = one point); needs evaluation data with labels.
        model_name: the model's name (file stem), used by targets that name their artifacts.
        keep_float: node names or op types left in float (``--keep-float``); the keyword
            ``unsupported`` keeps every node the target cannot represent.
        native_int4: store weights of at most 4 bits as native INT4 (opset 21) instead of
            int8 containers (targets that emit QDQ ONNX).
    """

    weight_bits: int = 8
    activation_bits: int = 8
    per_channel: bool = True
    range_method: str = "minmax"
    percentile: float = 99.99
    avg_bits: float | None = None
    total_bytes: float | None = None
    allocator: str = "knapsack"
    allocate_scope: str = "weights"
    profile_mode: str = "exact"
    profile_from: str | None = None
    fl_rule: str = "minmax"
    max_loss: float | None = None
    model_name: str | None = None
    keep_float: tuple[str, ...] = ()
    native_int4: bool = False


@dataclasses.dataclass(frozen=True)
class Artifact:
    """What a target wrote.

    Attributes:
        files: the files written, relative to the output folder.
        simulation_model: the standard-op ONNX that onnxruntime runs for validation.
        report: target-specific report section (e.g. the MAX78000 memory map).
    """

    files: tuple[str, ...]
    simulation_model: ir.Model
    report: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class Target(Protocol):
    """A backend: passes that legalise and annotate, validation, emission."""

    name: ClassVar[str]

    def check_model(self, model: ir.Model, config: TargetConfig) -> None:
        """Raise the error :meth:`validate` would raise for what the target cannot represent in
        the canonicalised float model (operators, topology, size), before any data is used."""
        ...

    def passes(self, config: TargetConfig) -> Sequence[ir.passes.PassBase]:
        """Target-specific passes run after calibration."""
        ...

    def validate(self, model: ir.Model) -> None:
        """Raise :class:`~qcompiler.errors.TargetError` naming the node and the rule."""
        ...

    def simulate(self, model: ir.Model) -> ir.Model:
        """The standard-op simulation ONNX of an annotated model (nothing written)."""
        ...

    def emit(self, model: ir.Model, out_dir: Path, data: ArrayDataset | None = None) -> Artifact:
        """Write the artifacts into ``out_dir`` (a fresh folder the caller renames atomically);
        ``data`` supplies sample inputs for targets that emit known-answer tests."""
        ...
