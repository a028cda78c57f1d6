"""``qcompile inspect``: what a model holds and what each target can do with it, without data.

The model is canonicalised (BatchNorm folded, as every compile does) on a copy; the answer lists
the quantizable layers with their shapes and parameter counts, the op histogram, and per
target whether it can represent the model: the fixed-point target names the ops that would
have to stay in float (``--keep-float``), the MAX78000 target gives its legalisation verdict
(the first rule a node breaks, or the hardware layers it maps to).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.errors import QCompilerError
from qcompiler.graph import const_array


def _shape(value: ir.Value | None) -> list[int | str] | None:
    if value is None or value.shape is None:
        return None
    return [d if isinstance(d, int) else str(d) for d in value.shape]


def layer_rows(model: ir.Model) -> list[dict[str, Any]]:
    """One row per quantizable layer: node, op, weight name and shape, parameters, channel axis."""
    from qcompiler.passes.detect_layers import quantizable_nodes

    initializers = model.graph.initializers
    rows = []
    for node, layer in quantizable_nodes(model):
        bias = const_array(initializers[layer.bias]) if layer.bias and layer.bias in initializers else None
        rows.append({
            "node": node.name,
            "op": node.op_type,
            "weight": layer.weight,
            "weight_shape": list(layer.weight_shape),
            "params": int(np.prod(layer.weight_shape)) + (int(bias.size) if bias is not None else 0),
            "channel_axis": layer.channel_axis,
            "input_shape": _shape(node.inputs[0]),
            "output_shape": _shape(node.outputs[0]),
        })
    return rows


def target_support(model: ir.Model) -> dict[str, dict[str, Any]]:
    """Per target: ``supported`` and the details (float-only ops, or the MAX78000 verdict)."""
    from qcompiler.targets.fixed_point.target import unrepresentable
    from qcompiler.targets.max78000.legalize import legalize

    float_only = Counter(node.op_type for node in unrepresentable(model, ()))
    fixed = {"supported": not float_only, "float_only_ops": dict(sorted(float_only.items()))}
    if float_only:
        fixed["hint"] = "compile with --keep-float unsupported (or name the ops) to leave them in float"
    try:
        layers = legalize(model)
        mx = {"supported": True, "hardware_layers": len(layers),
              "layers": [{"name": l.hw.name, "op": l.hw.op, "nodes": list(l.hw.nodes)} for l in layers]}
    except QCompilerError as exc:
        mx = {"supported": False, "reason": str(exc)}
    return {"fixed-point": fixed, "max78000": mx}


def inspect_model(source: Any) -> dict[str, Any]:
    """Everything ``qcompile inspect`` reports about ``source`` (a path or a model).

    Raises:
        QCompilerError: the model cannot be read or canonicalised.
    """
    from qcompiler.ir import initializer_bytes, load_normalized
    from qcompiler.passes.pipelines import canonical_pipeline
    from qcompiler.pipeline import run_pipeline

    model = run_pipeline(load_normalized(source), canonical_pipeline()).model
    rows = layer_rows(model)
    total = sum(int(np.prod(v.shape.numpy())) for v in model.graph.initializers.values() if v.shape is not None)
    return {
        "model": str(source) if not isinstance(source, ir.Model) else "<memory>",
        "inputs": [{"name": v.name, "shape": _shape(v), "dtype": str(v.dtype)} for v in model.graph.inputs],
        "outputs": [{"name": v.name, "shape": _shape(v), "dtype": str(v.dtype)} for v in model.graph.outputs],
        "nodes": len(list(model.graph)),
        "ops": dict(sorted(Counter(n.op_type for n in model.graph).items())),
        "parameters": total,
        "quantizable_parameters": sum(r["params"] for r in rows),
        "float32_bytes": initializer_bytes(model),
        "layers": rows,
        "targets": target_support(model),
    }
