"""Assign fixed-point formats (WL/FL, power-of-two scales) to weights, biases and activations.

Word lengths come from the allocator's :class:`~qcompiler.annotations.BitWidth` where present
(mixed precision), else from ``weight_bits``/``activation_bits``. Rule ``minmax``: every format is the largest fractional length that holds the tensor's range
without saturation (weights per output channel by default, activations per tensor from the
calibrated min/max, unsigned when the calibrated minimum is >= 0). Biases get 32-bit codes in
the accumulator's format, ``fl_bias = fl_input + fl_weight`` per output channel.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompiler import annotations as ann
from qcompiler.errors import AnnotationError
from qcompiler.graph import const_array, values_by_name
from qcompiler.passes.calibrate import range_key
from qcompiler.passes.detect_layers import quantizable_nodes
from qcompiler.fl_search import FLCache, fl_table, ristretto_fl, search_fl_faithful
from qcompiler.quantizers import no_overflow_fl

BIAS_BITS = 32
FL_RULES = ("minmax", "mse", "mae", "seed002", "ristretto")


@dataclasses.dataclass(frozen=True)
class AssignFixedPointPass(ir.passes.InPlacePass):
    """Choose WL/FL for each quantizable layer's weight, bias and activation input.

    Attributes:
        weight_bits: weight word length (1..16; 1 bit is the signed code {-1, 0}).
        activation_bits: activation word length (2..16).
        per_channel: one weight FL per output channel (else one per tensor).
        range_method: the calibrated activation range to use: ``minmax``, ``percentile``,
            ``entropy`` or ``mse`` (the latter two at ``activation_bits``).
        percentile: the percentile of the ``percentile`` range.
        fl_rule: how weight FLs are chosen: ``minmax`` (largest FL without overflow), ``mse``
            or ``mae`` (search over fl₀ ± 3, cached per tensor and WL), ``seed002`` (the
            seed's bisection on the MAE over [−16, 16]) or ``ristretto`` (max-range rule).
    """

    weight_bits: int = 8
    activation_bits: int = 8
    per_channel: bool = True
    range_method: str = "minmax"
    percentile: float = 99.99
    fl_rule: str = "minmax"
    # Shared across the repeated assignments of one compile (greedy and max-loss trials).
    fl_cache: FLCache | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 1 <= self.weight_bits <= 16:
            raise ValueError(f"weight_bits must be in 1..16, got {self.weight_bits}")
        if not 2 <= self.activation_bits <= 16:
            raise ValueError(f"activation_bits must be in 2..16, got {self.activation_bits}")
        if self.fl_rule not in FL_RULES:
            raise ValueError(f"fl_rule must be one of {', '.join(FL_RULES)}, got {self.fl_rule!r}")

    def requires(self, model: ir.Model) -> None:
        values = values_by_name(model.graph)
        layers = quantizable_nodes(model)
        if not layers:
            raise ir.passes.PreconditionError("no QuantizableLayer annotations: run DetectLayersPass first")
        for _, layer in layers:
            ann.require(values[layer.activation_input], ann.TensorStats, where="AssignFixedPointPass")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        values = values_by_name(model.graph)
        for _, layer in quantizable_nodes(model):
            act = self._activation_format(values[layer.activation_input])
            ann.set(values[layer.activation_input], act)
            w_fmt = self._weight_format(values[layer.weight], layer)
            ann.set(values[layer.weight], w_fmt)
            if layer.bias is not None:
                ann.set(values[layer.bias], accumulator_format(act, w_fmt, layer.weight_shape[layer.channel_axis]))
        return ir.passes.PassResult(model, True)

    def _activation_format(self, value: ir.Value) -> ann.FixedPoint:
        stats = ann.require(value, ann.TensorStats, where="AssignFixedPointPass")
        signed = stats.min < 0.0
        bits = _allocated_bits(value, self.activation_bits)
        key = range_key(self.range_method, bits, self.percentile)
        try:
            clip = stats.range(key)
        except AnnotationError as exc:
            raise AnnotationError(f"value {value.name!r}: {exc}; calibrate with that method and bit width") from None
        fl = no_overflow_fl(clip, bits, signed)
        return ann.FixedPoint(wl=bits, fl=fl, signed=signed, axis=None, rule=key)

    def _weight_format(self, value: ir.Value, layer: ann.QuantizableLayer) -> ann.FixedPoint:
        w = const_array(value)
        if w is None:
            raise AnnotationError(f"weight {value.name!r} is not constant")
        bits = _allocated_bits(value, self.weight_bits)
        if self.per_channel:
            moved = np.moveaxis(w, layer.channel_axis, 0)
            fls = tuple(self._weight_fl(f"{value.name}[{c}]", moved[c], bits) for c in range(moved.shape[0]))
            return ann.FixedPoint(wl=bits, fl=fls, signed=True, axis=layer.channel_axis, rule=self.fl_rule)
        fl = self._weight_fl(value.name, w, bits)
        return ann.FixedPoint(wl=bits, fl=fl, signed=True, axis=None, rule=self.fl_rule)

    def _weight_fl(self, name: str, w: np.ndarray, bits: int) -> int:
        absmax = float(np.abs(w).max()) if w.size else 0.0
        if self.fl_rule == "minmax":
            return no_overflow_fl(absmax, bits)
        if self.fl_rule == "ristretto":
            return ristretto_fl(absmax, bits, parameters=True)
        if self.fl_rule == "seed002":
            return search_fl_faithful(w, bits, "mae")
        if self.fl_cache is not None:
            return self.fl_cache.lookup(name, w, bits, self.fl_rule)[0]
        return fl_table(w, bits, self.fl_rule)[0]


def accumulator_format(activation: ann.FixedPoint, weight: ann.FixedPoint, channels: int) -> ann.FixedPoint:
    """The bias format of a layer: 32-bit codes in the accumulator's format,
    ``fl_bias = fl_input + fl_weight`` per output channel."""
    w_fls = weight.fl if isinstance(weight.fl, tuple) else (weight.fl,) * channels
    return ann.FixedPoint(wl=BIAS_BITS, fl=tuple(activation.fl + f for f in w_fls), signed=True, axis=0,
                          rule="accumulator")


def _allocated_bits(value: ir.Value, default: int) -> int:
    """The word length the allocator chose for ``value`` (a BitWidth annotation), else ``default``."""
    chosen = ann.get(value, ann.BitWidth)
    return chosen.bits if chosen is not None else default
