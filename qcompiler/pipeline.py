"""Run passes with timing, statistics, provenance and optional IR dumps.

Each pass's repr (frozen dataclasses print their configuration) is appended to the model's
:class:`~qcompiler.annotations.Provenance`; wall times go to the returned statistics, not into
the IR, so artifacts stay byte-identical across runs. A failing pass becomes a
:class:`PipelineError` whose one-line message names the pass and the root cause.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir

from qcompiler import __version__
from qcompiler import annotations as ann
from qcompiler.errors import QCompilerError, one_line, root_cause
from qcompiler.ir import save


class PipelineError(QCompilerError):
    """A pass failed; ``pass_name`` names it and ``__cause__`` holds the original error."""

    def __init__(self, pass_name: str, cause: BaseException) -> None:
        self.pass_name = pass_name
        super().__init__(f"pass {pass_name} failed: {one_line(cause)}")


@dataclasses.dataclass(frozen=True)
class PassStat:
    """What one pass did.

    Attributes:
        name: the pass class name.
        config: the pass's repr.
        seconds: wall time.
        modified: whether the pass reported a change.
        nodes_before, nodes_after: node counts around the pass.
        annotated: number of nodes and values carrying qcompiler annotations afterwards.
    """

    name: str
    config: str
    seconds: float
    modified: bool
    nodes_before: int
    nodes_after: int
    annotated: int


@dataclasses.dataclass(frozen=True)
class PipelineResult:
    """The final model and per-pass statistics."""

    model: ir.Model
    stats: tuple[PassStat, ...]


def _annotated_count(model: ir.Model) -> int:
    """Nodes and values carrying qcompiler annotations (counted by key, nothing is parsed)."""
    objects: list[ir.Node | ir.Value] = [*model.graph, *model.graph.inputs, *model.graph.initializers.values()]
    objects += [v for node in model.graph for v in node.outputs]
    return sum(any(k.startswith(ann.PREFIX) for k in obj.metadata_props) for obj in objects)


def pass_name(pass_: ir.passes.PassBase) -> str:
    """The class name of a pass."""
    return type(pass_).__name__


def append_provenance(model: ir.Model, pass_: ir.passes.PassBase, modified: bool) -> None:
    """Add one entry for ``pass_`` to the model's provenance annotation."""
    current = ann.get(model, ann.Provenance) or ann.Provenance()
    entry = {"pass": repr(pass_), "modified": bool(modified), "qcompiler": __version__}
    ann.set(model, ann.Provenance(entries=current.entries + (entry,)))


def run_pipeline(
    model: ir.Model, passes: Sequence[ir.passes.PassBase], dump_ir: str | Path | None = None
) -> PipelineResult:
    """Run ``passes`` in order.

    Args:
        model: the model; in-place passes modify it.
        passes: the passes.
        dump_ir: folder to write the IR after each pass (``NN_<PassName>.onnx``).

    Raises:
        PipelineError: a pass failed; the message names it and the root cause.
    """
    stats = []
    dump_dir = Path(dump_ir) if dump_ir is not None else None
    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
    for index, pass_ in enumerate(passes):
        name = pass_name(pass_)
        nodes_before = len(model.graph)
        start = time.perf_counter()
        try:
            result = pass_(model)
        except Exception as exc:
            cause = root_cause(exc)
            if isinstance(cause, QCompilerError):
                raise PipelineError(name, cause) from cause
            raise PipelineError(name, cause) from exc
        seconds = time.perf_counter() - start
        model = result.model
        append_provenance(model, pass_, result.modified)
        stats.append(
            PassStat(
                name=name,
                config=repr(pass_),
                seconds=seconds,
                modified=bool(result.modified),
                nodes_before=nodes_before,
                nodes_after=len(model.graph),
                annotated=_annotated_count(model),
            )
        )
        if dump_dir is not None:
            save(model, dump_dir / f"{index:02d}_{name}.onnx")
    return PipelineResult(model, tuple(stats))
