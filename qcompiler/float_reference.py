"""The float weights that rewriting passes replaced, kept beside the IR for the float reference.

GPFQ and fine-tuning write their quantized weights into the initializers, because targets read
the codes back from them. Passes that need the float network afterwards restore the originals:
fine-tuning's distillation teacher is the float model, not the quantized one it starts from.
The originals live in ``value.meta``, which is in-process and not saved. A model rewritten in
another process has no float reference, and :func:`float_model` says so instead of silently
using the quantized weights.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler import annotations as ann
from qcompiler.errors import QCompilerError
from qcompiler.graph import const_array, set_initializer

#: ``value.meta`` key of an initializer's float array before the first rewrite.
FLOAT_META = "qcompiler.float_weight"


class NoFloatReferenceError(QCompilerError):
    """The model's weights were rewritten, and the float originals are not available."""


def remember(value: ir.Value, original: np.ndarray | None = None) -> bool:
    """Record ``original`` (default: the value's current array) as ``value``'s float original,
    unless one is recorded already: after GPFQ and then fine-tuning, the reference is still the
    float model. Call it before overwriting the initializer.

    Returns:
        Whether a new original was recorded.
    """
    if FLOAT_META in value.meta:
        return False
    value.meta[FLOAT_META] = np.array(const_array(value) if original is None else original, copy=True)
    return True


def remember_float_weights(model: ir.Model, before: ir.Model) -> int:
    """Record, on each initializer of ``model`` that a rewrite changed or added, its array in ``before``.

    For passes that rewrite initializers in many places and keep the model before the rewrite
    anyway (GPFQ). An initializer that did not exist before, such as a bias added by bias
    correction, is recorded as zeros. A zero bias computes the same as no bias.

    Args:
        model: the rewritten model (its values' meta is updated).
        before: the same model before the rewrite.

    Returns:
        The number of initializers newly recorded.
    """
    originals = before.graph.initializers
    recorded = 0
    for name, value in model.graph.initializers.items():
        if FLOAT_META in value.meta:
            continue
        now = const_array(value)
        old = const_array(originals[name]) if name in originals else np.zeros_like(now)
        if old.shape == now.shape and np.array_equal(old, now):
            continue
        recorded += remember(value, old)
    return recorded


def float_model(model: ir.Model) -> ir.Model:
    """A copy of ``model`` with every recorded float original restored: the float network.

    Raises:
        NoFloatReferenceError: a weight carries integer codes chosen by a pass
            (:class:`~qcompiler.annotations.IntegerWeights`), but its float original was not
            recorded in this process (the model was saved and loaded after the rewrite).
    """
    out = model.clone()
    for name, value in out.graph.initializers.items():
        original = value.meta.get(FLOAT_META)
        if original is not None:
            set_initializer(out.graph, value, original)
        elif (codes := ann.get(value, ann.IntegerWeights)) is not None:
            raise NoFloatReferenceError(
                f"weight {name!r}: its codes were chosen by {codes.method} and its float original is not "
                "available (run the rewrite and the pass that needs the float model in one pipeline)")
    return out
