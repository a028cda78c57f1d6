"""Pipelines as text: ``calibrate(methods=percentile),profile(mode=fast),allocate(avg_bits=4),gpfq(bits=4)``.

The text is a comma-separated list of ``name(field=value, ...)`` calls, read with Python's own
parser (:mod:`ast`): values are Python literals, and a bare word is a string (``mode=fast``).
Names are the short names in :data:`PASSES`; fields are the pass dataclass's fields that its
repr shows (the configuration, not the data or callbacks). A scalar given for a tuple field is
a one-element tuple, and profiling candidates are written as labels (``fixed:4``).

:func:`format_pipeline` writes the fields that differ from their defaults, so that
``parse_pipeline(format_pipeline(passes)) == passes`` (the passes' equality compares exactly
those fields).
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import onnx_ir as ir

from qcompiler.errors import QCompilerError


class PipelineTextError(QCompilerError):
    """A pipeline description that cannot be read."""


def _registry() -> dict[str, type]:
    from qcompiler.passes import (
        AllocateBitsPass,
        CalibratePass,
        CanonicalizePass,
        ChannelAllocationPass,
        DetectLayersPass,
        FineTunePass,
        FoldBatchNormPass,
        MeasureAllocationPass,
        ProfileErrorPass,
    )
    from qcompiler.passes.gpfq import GPFQPass

    return {
        "canonicalize": CanonicalizePass,
        "fold_batchnorm": FoldBatchNormPass,
        "detect_layers": DetectLayersPass,
        "calibrate": CalibratePass,
        "profile": ProfileErrorPass,
        "allocate": AllocateBitsPass,
        "measure_allocation": MeasureAllocationPass,
        "channels": ChannelAllocationPass,
        "gpfq": GPFQPass,
        "finetune": FineTunePass,
    }


#: Short name -> pass class (filled on first use; the passes import heavy modules).
PASSES: dict[str, type] = {}


def passes_by_name() -> dict[str, type]:
    """The short names :func:`parse_pipeline` accepts."""
    if not PASSES:
        PASSES.update(_registry())
    return PASSES


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.repr and f.init}


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _value(node: ast.expr, where: str) -> Any:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(_value(e, where) for e in node.elts)
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise PipelineTextError(f"{where}: {ast.unparse(node)!r} is not a literal") from None


def _coerce(name: str, field: dataclasses.Field, value: Any) -> Any:
    default = _default(field)
    if isinstance(default, tuple) and not isinstance(value, tuple):
        value = (value,)
    if name == "candidates":
        from qcompiler.candidates import parse_candidate

        try:
            value = tuple(parse_candidate(v) if isinstance(v, str) else v for v in value)
        except ValueError as exc:
            raise PipelineTextError(f"profile(candidates=...): {exc}") from None
    return value


def parse_pipeline(text: str, **data: Any) -> list[ir.passes.PassBase]:
    """The passes a pipeline description names, configured as written.

    Args:
        text: e.g. ``"calibrate(methods=percentile),allocate(avg_bits=4)"``.
        **data: values for fields the text cannot hold, given to every pass that has them
            (e.g. ``data=calib``, ``show_progress=False``).

    ``profile(mode=hybrid)`` refines the allocation of the ``allocate(...)`` that must follow it
    directly: that pass is bound to the profile's ``allocate`` field (which the text never holds).

    Raises:
        PipelineTextError: a syntax error, an unknown pass or field, or a value the pass rejects
            (one line naming the pass).
    """
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as exc:
        raise PipelineTextError(f"pipeline {text!r}: syntax error at column {exc.offset}") from None
    calls = tree.elts if isinstance(tree, ast.Tuple) else [tree]
    out: list[ir.passes.PassBase] = []
    hybrid: tuple[str, type, dict[str, Any]] | None = None  # profile(mode=hybrid) waits for its allocate(...)
    for call in calls:
        name, cls, kwargs = _pass_call(call, data)
        if hybrid is not None and name != "allocate":
            break
        if name == "profile" and kwargs.get("mode") == "hybrid":
            hybrid = (name, cls, kwargs)
            continue
        out.append(_construct(name, cls, kwargs))
        if hybrid is not None:
            profile_name, profile_cls, profile_kwargs = hybrid
            out.insert(len(out) - 1, _construct(profile_name, profile_cls, {**profile_kwargs, "allocate": out[-1]}))
            hybrid = None
    if hybrid is not None:
        raise PipelineTextError("pipeline: profile(mode=hybrid) refines an allocation: follow it with allocate(...)")
    return out


def _pass_call(call: ast.expr, data: Mapping[str, Any]) -> tuple[str, type, dict[str, Any]]:
    """The short name, class and keyword arguments of one ``name(field=value, ...)``."""
    if isinstance(call, ast.Name):
        call = ast.Call(func=call, args=[], keywords=[])
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
        raise PipelineTextError(f"pipeline: {ast.unparse(call)!r} is not a pass call like calibrate(...)")
    name = call.func.id
    registry = passes_by_name()
    cls = registry.get(name)
    if cls is None:
        raise PipelineTextError(f"pipeline: unknown pass {name!r} (known: {', '.join(registry)})")
    if call.args:
        raise PipelineTextError(f"pipeline: {name}(...) takes field=value arguments only")
    fields = _fields(cls)
    kwargs = {}
    for keyword in call.keywords:
        if keyword.arg not in fields:
            raise PipelineTextError(f"pipeline: {name} has no field {keyword.arg!r} (fields: {', '.join(fields)})")
        kwargs[keyword.arg] = _coerce(keyword.arg, fields[keyword.arg], _value(keyword.value, name))
    all_fields = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs.update({k: v for k, v in data.items() if k in all_fields and k not in kwargs})
    return name, cls, kwargs


def _construct(name: str, cls: type, kwargs: Mapping[str, Any]) -> ir.passes.PassBase:
    try:
        return cls(**kwargs)
    except QCompilerError as exc:
        raise PipelineTextError(f"pipeline: {name}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise PipelineTextError(f"pipeline: {name}: {exc}") from None


def _literal(value: Any) -> str:
    from qcompiler.candidates import Candidate

    if isinstance(value, tuple):
        items = [_literal(v) for v in value]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    if isinstance(value, Candidate):
        return repr(value.label)
    return repr(value)


def format_pass(pass_: ir.passes.PassBase) -> str:
    """``name(field=value, ...)`` with the fields that differ from their defaults.

    Raises:
        PipelineTextError: a pass with no short name.
    """
    names = {cls: name for name, cls in passes_by_name().items()}
    name = names.get(type(pass_))
    if name is None:
        raise PipelineTextError(f"{type(pass_).__name__} has no pipeline name (known: {', '.join(passes_by_name())})")
    parts = []
    for field_name, field in _fields(type(pass_)).items():
        value = getattr(pass_, field_name)
        if value != _default(field):
            parts.append(f"{field_name}={_literal(value)}")
    return f"{name}({', '.join(parts)})"


def format_pipeline(passes: Sequence[ir.passes.PassBase]) -> str:
    """The description :func:`parse_pipeline` reads back into equal passes."""
    return ",".join(format_pass(p) for p in passes)


def describe_pipeline(passes: Sequence[ir.passes.PassBase]) -> str:
    """:func:`format_pipeline` of the passes that have a short name (a target's own passes are
    implied by ``--target``)."""
    known = set(passes_by_name().values())
    return format_pipeline([p for p in passes if type(p) in known])
