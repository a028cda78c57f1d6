"""Error types. Every user-facing failure is a :class:`QCompilerError` with a one-line message."""

from __future__ import annotations


class QCompilerError(Exception):
    """Base class of the errors qcompiler reports to users as one line (CLI exit code 2)."""


class ModelLoadError(QCompilerError):
    """A model file is missing, is not ONNX, or is refused (e.g. unsafe external data)."""


class DataError(QCompilerError):
    """Calibration or evaluation data do not fit the model (names, shapes, dtypes, NaN/Inf)."""


class AnnotationError(QCompilerError):
    """An annotation is missing, malformed, or of an unknown version."""


class UnsupportedModelError(QCompilerError):
    """The model cannot be handled (e.g. no quantizable layer, an op a pass cannot process)."""


class OutputError(QCompilerError):
    """An output path cannot be written without destroying something qcompiler did not write."""


class TargetError(QCompilerError):
    """A target cannot represent the model; the message names the node and the rule."""


def root_cause(exc: BaseException) -> BaseException:
    """Follow ``__cause__``/``__context__`` to the innermost exception.

    onnx_ir wraps pass failures as ``PassError -> PassError -> PreconditionError``; the
    innermost one carries the message the user needs.
    """
    seen = {id(exc)}
    while True:
        nxt = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if nxt is None or id(nxt) in seen:
            return exc
        seen.add(id(nxt))
        exc = nxt


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (type name when the message is empty)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


class TargetConstraintError(TargetError):
    """A legal operator violates a hardware limit (layer count, kernel, memory, ...)."""


class UnsupportedOpError(TargetError):
    """An operator or topology the target cannot represent; the message names node and op."""


class CheckpointError(QCompilerError):
    """A PyTorch checkpoint is missing, malformed, or refused by the safe loader."""
