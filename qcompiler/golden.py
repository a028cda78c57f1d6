"""Golden regression files for graph outputs: structure, annotations and onnxruntime outputs.

A golden case ``NAME`` in a folder is three files:

- ``NAME.onnxtxt``: the graph as ONNX text without initializers (``ir.to_onnx_text`` omits
  ``metadata_props``, hence the second file);
- ``NAME.annotations.json``: :func:`qcompiler.annotations.dump` of the model;
- ``NAME.outputs.npz``: onnxruntime outputs (graph optimisations off) on fixed inputs.

:func:`check_golden` compares a model against them (structure and annotations exactly, floats
in annotations and outputs with tolerances) and, with ``update=True``, rewrites them instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler import annotations as ann
from qcompiler.fsutil import write_bytes, write_json, write_npz
from qcompiler.runtime import Runner


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What a golden case records."""

    structure: str
    annotations: Mapping[str, Any]
    outputs: Mapping[str, np.ndarray]


def snapshot(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> Snapshot:
    """Take the structure, annotations and onnxruntime outputs (optimisations off) of ``model``."""
    structure = ir.to_onnx_text(model, exclude_initializers=True)
    outputs = Runner(model).run(feeds)
    return Snapshot(structure, ann.dump(model), outputs)


def _close(a: Any, b: Any, rtol: float, atol: float, path: str, diffs: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                diffs.append(f"{path}/{key}: present in only one side")
            else:
                _close(a[key], b[key], rtol, atol, f"{path}/{key}", diffs)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            diffs.append(f"{path}: length {len(a)} != {len(b)}")
        else:
            for i, (x, y) in enumerate(zip(a, b)):
                _close(x, y, rtol, atol, f"{path}[{i}]", diffs)
    elif isinstance(a, float) or isinstance(b, float):
        if not (isinstance(a, (int, float)) and isinstance(b, (int, float))) or not math.isclose(
            a, b, rel_tol=rtol, abs_tol=atol
        ):
            diffs.append(f"{path}: {a!r} != {b!r}")
    elif a != b:
        diffs.append(f"{path}: {a!r} != {b!r}")


def compare(
    expected: Snapshot, actual: Snapshot, rtol: float = 1e-5, atol: float = 1e-6
) -> list[str]:
    """Differences between two snapshots (empty when they match within tolerance)."""
    diffs: list[str] = []
    if expected.structure != actual.structure:
        import difflib

        delta = difflib.unified_diff(
            expected.structure.splitlines(), actual.structure.splitlines(), "golden", "actual", lineterm="", n=1
        )
        diffs.append("structure differs:\n" + "\n".join(list(delta)[:40]))
    _close(
        json.loads(json.dumps(expected.annotations)),
        json.loads(json.dumps(actual.annotations)),
        rtol,
        atol,
        "annotations",
        diffs,
    )
    for name in sorted(set(expected.outputs) | set(actual.outputs)):
        if name not in expected.outputs or name not in actual.outputs:
            diffs.append(f"output {name!r}: present in only one side")
            continue
        e, a = expected.outputs[name], actual.outputs[name]
        if e.shape != a.shape:
            diffs.append(f"output {name!r}: shape {e.shape} != {a.shape}")
        elif not np.allclose(e, a, rtol=rtol, atol=atol):
            diffs.append(f"output {name!r}: max |diff| {float(np.max(np.abs(e - a))):.3g} over tolerance")
    return diffs


def write(folder: Path, name: str, snap: Snapshot) -> None:
    """Write the three golden files of case ``name``."""
    write_bytes(folder / f"{name}.onnxtxt", snap.structure.encode())
    write_json(folder / f"{name}.annotations.json", snap.annotations)
    write_npz(folder / f"{name}.outputs.npz", **{k: np.asarray(v) for k, v in snap.outputs.items()})


def read(folder: Path, name: str) -> Snapshot:
    """Read the golden files of case ``name``."""
    structure = (folder / f"{name}.onnxtxt").read_text()
    annotations = json.loads((folder / f"{name}.annotations.json").read_text())
    with np.load(folder / f"{name}.outputs.npz") as npz:
        outputs = {k: npz[k] for k in npz.files}
    return Snapshot(structure, annotations, outputs)


def check_golden(
    folder: Path,
    name: str,
    model: ir.Model,
    feeds: Mapping[str, np.ndarray],
    update: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> list[str]:
    """Compare ``model`` with golden case ``name`` (or rewrite it when ``update``).

    Returns the differences; a missing golden case is a difference that tells how to create it.
    """
    actual = snapshot(model, feeds)
    if update:
        write(folder, name, actual)
        return []
    if not (folder / f"{name}.onnxtxt").exists():
        return [f"no golden case {name!r} in {folder}: run pytest --update-golden to create it"]
    return compare(read(folder, name), actual, rtol, atol)
