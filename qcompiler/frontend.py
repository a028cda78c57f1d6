"""Frontends: a ``torch.nn.Module`` or an ONNX file becomes an ``onnx_ir.Model``.

The torch exporter's default optimiser folds BatchNormalization into the preceding Conv under
the same initializer name, silently changing the weights. :func:`lower` therefore exports with
``optimize=False`` (BatchNormalization stays a node) and only folds constant shape subgraphs;
qcompiler's own :class:`~qcompiler.passes.fold_batchnorm.FoldBatchNormPass` folds BN and records
it in the provenance.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import onnx_ir as ir

from qcompiler.errors import UnsupportedModelError, one_line, root_cause
from qcompiler.ir import ModelLike, load

#: Loggers of the torch exporter that print progress and the torchvision warning.
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[io.StringIO]:
    """Silence the exporter's prints, warnings and log records; yield what it printed."""
    buffer = io.StringIO()
    saved = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(
            buffer
        ):
            warnings.simplefilter("ignore")
            yield buffer
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def lower(
    module: Any,
    example_inputs: Sequence[Any],
    input_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
) -> ir.Model:
    """Export a ``torch.nn.Module`` to the IR, keeping BatchNormalization unfolded.

    Args:
        module: the torch module; it is put in eval mode.
        example_inputs: example tensors, one per ``forward`` argument.
        input_names: names of the graph inputs (default: the ``forward`` argument names).
        dynamic_batch: make dimension 0 of every input symbolic (``batch``).

    Returns:
        The exported model with constant shape subgraphs folded.

    Raises:
        UnsupportedModelError: the exporter failed; the message gives its root cause.
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        raise UnsupportedModelError(f"cannot lower {type(module).__name__}: not a torch.nn.Module")
    module.eval()
    args = tuple(example_inputs)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        dynamic_shapes = tuple({0: batch} for _ in args)
    with _quiet_exporter() as printed:
        try:
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                optimize=False,
                verbose=False,
                input_names=list(input_names) if input_names else None,
                dynamic_shapes=dynamic_shapes,
                report=False,
            )
        except Exception as exc:
            # The exporter wraps the real error in a multi-line, coloured explanation.
            detail = re.sub(r"\x1b\[[0-9;]*m", "", one_line(root_cause(exc)))[:300]
            raise UnsupportedModelError(f"torch export failed: {detail}") from exc
    del printed
    model = program.model
    fold_shape_constants(model)
    return model


def fold_shape_constants(model: ir.Model) -> None:
    """Fold constant subgraphs (shape arithmetic, constant Expand) in place; BN nodes stay."""
    import onnxscript.optimizer

    with _quiet_exporter():
        onnxscript.optimizer.fold_constants(model)
    import onnx_ir.passes.common as common_passes

    common_passes.RemoveUnusedNodesPass()(model)


def from_onnx(source: ModelLike) -> ir.Model:
    """An ONNX model as it is (see :func:`qcompiler.ir.load`)."""
    return load(source)
