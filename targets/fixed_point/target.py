"""Generic fixed-point target: power-of-two scales, QDQ simulation ONNX, integer package.

Every weight, bias and activation input of a quantizable layer carries a
:class:`~qcompiler.annotations.FixedPoint` format. Emission writes

- ``model.qdq.onnx``: standard-op QDQ/QCDQ (int8 containers, or native INT4 weights at opset
  21 with ``native_int4``), which onnxruntime runs for validation;
- the integer package (``model.int.npz``, ``model.int.json``, ``<name>_int.h``);
- with data: the bit-exact integer simulator's check against the QDQ model (report section).

Ops outside the integer op set must be kept in float (``keep_float``), else validation names
the node and the op.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import onnx_ir as ir

from qcompiler import annotations as ann
from qcompiler.data import ArrayDataset
from qcompiler.errors import TargetError, UnsupportedOpError
from qcompiler.fl_search import FLCache
from qcompiler.graph import values_by_name
from qcompiler.ir import save
from qcompiler.passes.assign_fixed_point import AssignFixedPointPass
from qcompiler.passes.detect_layers import kept_float, quantizable_nodes
from qcompiler.qdq import lower_to_qdq
from qcompiler.targets.base import Artifact, TargetConfig
from qcompiler.targets.fixed_point.check import check_integer_simulator
from qcompiler.targets.fixed_point.package import integer_package, write_package
from qcompiler.targets.fixed_point.simulator import INTEGER_OPS, SHAPE_OPS

SIMULATION_FILE = "model.qdq.onnx"
#: ``--keep-float unsupported`` keeps every node the target cannot represent in float.
KEEP_UNSUPPORTED = "unsupported"
#: The integer simulator is checked at emission on at most CHECK_BATCHES x CHECK_BATCH_SIZE
#: samples (a bounded cost). Small batches bound the memory: the simulator keeps a batch's
#: int64 activations (a 64-image ResNet-18 batch peaked at 3.8 GB).
CHECK_BATCHES = 16
CHECK_BATCH_SIZE = 16


def _float_activations(model: ir.Model) -> set[str]:
    """Float values computed from the graph inputs (what quantization acts on), e.g. the
    embeddings gathered by integer token ids."""
    floats = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)
    live = {v.name for v in model.graph.inputs}
    for node in model.graph:
        if any(v is not None and v.name in live for v in node.inputs):
            live.update(o.name for o in node.outputs)
    values = values_by_name(model.graph)
    return {name for name in live if values[name].dtype in floats}


def unrepresentable(model: ir.Model, keep_float: Sequence[str]) -> list[ir.Node]:
    """Nodes on the float activation path that are outside the integer op set and not kept float."""
    keep = tuple(keep_float)
    if KEEP_UNSUPPORTED in keep:
        return []
    live = _float_activations(model)
    return [
        node for node in model.graph
        if node.op_type not in INTEGER_OPS and node.op_type not in SHAPE_OPS and not kept_float(node, keep)
        and any(v is not None and v.name in live for v in node.inputs)
    ]


def _check_representable(model: ir.Model, keep_float: Sequence[str]) -> None:
    """Raise :class:`UnsupportedOpError` naming the first node the target cannot represent."""
    bad = unrepresentable(model, keep_float)
    if bad:
        node = bad[0]
        more = f" (and {len(bad) - 1} more node(s): {', '.join(sorted({n.op_type for n in bad[1:]}))})" if len(bad) > 1 else ""
        raise UnsupportedOpError(
            f"node {node.name!r} ({node.op_type}): the fixed-point target cannot represent {node.op_type} in "
            f"integer arithmetic{more}; keep it in float with --keep-float {node.op_type} "
            f"(or --keep-float {KEEP_UNSUPPORTED})"
        )


class FixedPointTarget:
    """The ``fixed-point`` target."""

    name: ClassVar[str] = "fixed-point"
    #: Word lengths the allocator may choose (algorithms.md §2.6).
    legal_weight_bits: ClassVar[tuple[int, ...]] = (1, 2, 3, 4, 5, 6, 7, 8, 16)
    legal_activation_bits: ClassVar[tuple[int, ...]] = (2, 3, 4, 5, 6, 7, 8, 16)
    #: Quantizer kinds the target represents exactly (power-of-two scales).
    legal_kinds: ClassVar[tuple[str, ...]] = ("fixed",)
    #: Nodes may stay in float (``--keep-float``).
    supports_keep_float: ClassVar[bool] = True
    #: Weights of <= 4 bits may be stored as ONNX INT4 (``--native-int4``).
    supports_native_int4: ClassVar[bool] = True

    def __init__(self) -> None:
        # One FL cache per compile: accuracy-driven searches re-assign formats many times.
        self.fl_cache = FLCache()
        self.config = TargetConfig()

    def passes(self, config: TargetConfig) -> Sequence[ir.passes.PassBase]:
        """Assign WL/FL formats with the configured bit widths (and remember the emission options)."""
        self.config = config
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

    def check_model(self, model: ir.Model, config: TargetConfig) -> None:
        """Every node of the canonical model is representable or kept in float."""
        _check_representable(model, config.keep_float)

    def validate(self, model: ir.Model) -> None:
        """Every node is representable (or kept float); every quantizable layer has formats on
        its weight and activation input."""
        _check_representable(model, self.config.keep_float)
        values = values_by_name(model.graph)
        for node, layer in quantizable_nodes(model):
            for role, name in (("weight", layer.weight), ("activation input", layer.activation_input)):
                if ann.get(values[name], ann.FixedPoint) is None:
                    raise TargetError(
                        f"node {node.name!r} ({node.op_type}): {role} {name!r} has no fixed-point format "
                        "(rule: every quantized layer needs WL/FL for weight and input)"
                    )

    def simulate(self, model: ir.Model) -> ir.Model:
        """The QDQ simulation model (graph annotations stripped: formats are in its Q/DQ nodes,
        statistics and curves stay in ``model.annotated.onnx``)."""
        simulation = lower_to_qdq(model, native_int4=self.config.native_int4)
        ann.strip_graph(simulation)
        return simulation

    def emit(self, model: ir.Model, out_dir: Path, data: ArrayDataset | None = None) -> Artifact:
        """Write ``model.qdq.onnx`` and the integer package; with ``data``, check the integer
        simulator against the QDQ model on its first batches."""
        simulation = self.simulate(model)
        save(simulation, out_dir / SIMULATION_FILE)
        manifest, arrays = integer_package(model, self.config.model_name or "model")
        files = (SIMULATION_FILE, *write_package(out_dir, manifest, arrays))
        report: dict[str, object] = {"layers": _package_rows(manifest), "opset": _opset(simulation)}
        if data is not None:
            report["integer_simulator"] = check_integer_simulator(model, simulation, data, CHECK_BATCHES,
                                                                     CHECK_BATCH_SIZE).as_dict()
        return Artifact(files=files, simulation_model=simulation, report=report)


def _opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", 0))


def _package_rows(manifest: dict) -> list[dict]:
    """Per layer: bits and shifts for the report (matched to the generic rows by ONNX node)."""
    return [
        {"onnx_nodes": [layer["node"]], "bits": layer["weight"]["wl"],
         "accumulator_fl": [min(layer["accumulator_fl"]), max(layer["accumulator_fl"])],
         "shifts": {r["to"]: [min(r["shift"]), max(r["shift"])] for r in layer["requantize"]}}
        for layer in manifest["layers"]
    ]
