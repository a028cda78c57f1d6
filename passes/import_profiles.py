"""Reuse rate–distortion curves measured earlier: one profile serves any number of budgets.

``qcompile profile`` writes ``model.profiled.onnx`` and every allocating compile writes
``model.annotated.onnx``; both carry :class:`~qcompiler.annotations.ErrorProfile` annotations
(algorithms.md §2.2: the profile is persisted so that one profile serves many budgets). This pass
copies them onto the model being compiled instead of measuring again, after checking that they
describe the same tensors (names and element counts) and hold every candidate the allocation
may choose.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import onnx_ir as ir

from qcompiler import annotations as ann
from qcompiler.candidates import Candidate
from qcompiler.errors import AnnotationError, DataError
from qcompiler.graph import static_size, values_by_name
from qcompiler.ir import load
from qcompiler.passes.detect_layers import layer_tensors


@dataclasses.dataclass(frozen=True)
class ImportProfilesPass(ir.passes.InPlacePass):
    """Copy the ErrorProfile annotations of another file onto this model's tensors.

    Attributes:
        source: the ONNX file holding the profiles (``model.profiled.onnx`` or
            ``model.annotated.onnx`` of the same model).
        candidates: the candidates the allocation may choose; each must be in every profile.
        tensors: ``weights`` or ``all`` (weights and the activations entering the layers).
    """

    source: str
    candidates: tuple[Candidate, ...] = ()
    tensors: str = "weights"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        try:
            source = load(Path(self.source))
        except AnnotationError as exc:
            raise DataError(f"{self.source}: {exc}") from None
        theirs = {n: p for n, v in values_by_name(source.graph).items() if (p := ann.get(v, ann.ErrorProfile))}
        values = values_by_name(model.graph)
        wanted = [label.label for label in self.candidates]
        for name, kind in self._targets(model):
            profile = theirs.get(name)
            if profile is None or profile.tensor_kind != kind:
                raise DataError(f"{self.source}: no profile of the {kind} {name!r} (profile the same model, "
                                f"with --tensors {'all' if kind == 'activation' else 'weights'})")
            missing = [c for c in wanted if c not in profile.candidates]
            if missing:
                raise DataError(f"{self.source}: the profile of {name!r} lacks the candidates {missing}")
            elements = static_size(values[name], per_sample=kind == "activation")
            if elements is not None and elements != profile.elements:
                raise DataError(f"{self.source}: {name!r} has {profile.elements} elements in the profile and "
                                f"{elements} in this model: not the same model")
            ann.set(values[name], profile)
        return ir.passes.PassResult(model, True)

    def _targets(self, model: ir.Model) -> list[tuple[str, str]]:
        weights, activations = layer_tensors(model)
        return [(n, "weight") for n in weights] + ([(n, "activation") for n in activations] if self.tensors == "all" else [])
