"""Generic fixed-point target: power-of-two scales, QDQ simulation ONNX.

Every weight, bias and activation input of a quantizable layer carries a
:class:`~qcompiler.annotations.FixedPoint` format; emission lowers them to standard-op QDQ
(``model.qdq.onnx``), which onnxruntime runs for validation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import onnx_ir as ir

from qcompiler import annotations as ann
from qcompiler.data import ArrayDataset
from qcompiler.errors import TargetError
from qcompiler.fl_search import FLCache
from qcompiler.graph import values_by_name
from qcompiler.ir import save
from qcompiler.passes.assign_fixed_point import AssignFixedPointPass
from qcompiler.passes.detect_layers import quantizable_nodes
from qcompiler.qdq import lower_to_qdq
from qcompiler.targets.base import Artifact, TargetConfig

SIMULATION_FILE = "model.qdq.onnx"


class FixedPointTarget:
    """The ``fixed-point`` target."""

    name: ClassVar[str] = "fixed-point"
    #: Word lengths the allocator may choose (algorithms.md §2.6).
    legal_weight_bits: ClassVar[tuple[int, ...]] = (2, 3, 4, 5, 6, 7, 8, 16)
    legal_activation_bits: ClassVar[tuple[int, ...]] = (8, 16)
    #: Quantizer kinds the target represents exactly (power-of-two scales).
    legal_kinds: ClassVar[tuple[str, ...]] = ("fixed",)

    def __init__(self) -> None:
        # One FL cache per compile: accuracy-driven searches re-assign formats many times.
        self.fl_cache = FLCache()

    def passes(self, config: TargetConfig) -> Sequence[ir.passes.PassBase]:
        """Assign WL/FL formats with the configured bit widths."""
        return [
            AssignFixedPointPass(
                weight_bits=config.weight_bits,
                activation_bits=config.activation_bits,
                per_channel=config.per_channel,
                range_method=config.range_method,
                percentile=config.percentile,
                fl_rule=config.fl_rule,
                fl_cache=self.fl_cache,
            )
        ]

    def validate(self, model: ir.Model) -> None:
        """Every quantizable layer needs formats on its weight and activation input."""
        values = values_by_name(model.graph)
        for node, layer in quantizable_nodes(model):
            for role, name in (("weight", layer.weight), ("activation input", layer.activation_input)):
                if ann.get(values[name], ann.FixedPoint) is None:
                    raise TargetError(
                        f"node {node.name!r} ({node.op_type}): {role} {name!r} has no fixed-point format "
                        "(rule: every quantized layer needs WL/FL for weight and input)"
                    )

    def simulate(self, model: ir.Model) -> ir.Model:
        """The QDQ simulation model."""
        return lower_to_qdq(model)

    def emit(self, model: ir.Model, out_dir: Path, data: ArrayDataset | None = None) -> Artifact:
        """Write ``model.qdq.onnx``."""
        simulation = self.simulate(model)
        save(simulation, out_dir / SIMULATION_FILE)
        return Artifact(files=(SIMULATION_FILE,), simulation_model=simulation)
