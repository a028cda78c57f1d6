"""The annotation schema: quantization decisions stored in the IR's ``metadata_props``.

Every annotation is a frozen, versioned dataclass serialised as compact JSON with sorted keys
under the key ``pkg.qcompiler.<kind>`` of a model, graph, node or value. ``metadata_props`` are
part of the ONNX file, so annotations survive ``save``/``load``; node attributes are never used
(onnx.checker and onnxruntime reject unknown attributes on standard ops).

Passes use only :func:`get`, :func:`set`, :func:`require`, :func:`remove` and :func:`dump`;
nobody reads or writes the raw strings.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import numpy as np
import onnx_ir as ir

from qcompiler.errors import AnnotationError

PREFIX = "pkg.qcompiler."

A = TypeVar("A", bound="Annotation")

_REGISTRY: dict[str, type[Annotation]] = {}


@dataclasses.dataclass(frozen=True)
class Annotation:
    """Base class: subclasses set ``KIND`` (key suffix) and ``VERSION`` (schema version)."""

    KIND: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.KIND:
            if cls.KIND in _REGISTRY:
                raise TypeError(f"annotation kind {cls.KIND!r} registered twice")
            _REGISTRY[cls.KIND] = cls

    @classmethod
    def key(cls) -> str:
        """The ``metadata_props`` key of this kind."""
        return PREFIX + cls.KIND

    def to_json(self) -> str:
        """Compact JSON with sorted keys and the schema version under ``"v"``."""
        # Fields hold only JSON-like values (no nested dataclasses), so a shallow dict suffices;
        # dataclasses.asdict deep-copies every element (a third of calibration's Python time).
        payload = _plain({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        payload["v"] = self.VERSION
        return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls: type[A], text: str, where: str = "") -> A:
        """Parse JSON written by :meth:`to_json`, refusing unknown versions and fields."""
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AnnotationError(f"{cls.key()}{_at(where)}: not valid JSON ({exc.msg})") from None
        if not isinstance(payload, dict):
            raise AnnotationError(f"{cls.key()}{_at(where)}: expected a JSON object")
        version = payload.pop("v", None)
        if version != cls.VERSION:
            raise AnnotationError(
                f"{cls.key()}{_at(where)}: schema version {version} is not supported "
                f"(this qcompiler reads version {cls.VERSION})"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(frozenset(payload) - names)
        if unknown:
            raise AnnotationError(f"{cls.key()}{_at(where)}: unknown fields {unknown}")
        try:
            return cls(**{k: _frozen(v) for k, v in payload.items()})
        except TypeError as exc:
            raise AnnotationError(f"{cls.key()}{_at(where)}: {exc}") from None


def _at(where: str) -> str:
    return f" on {where}" if where else ""


def _plain(obj: Any) -> Any:
    """Convert tuples to lists and refuse non-finite floats (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if all(type(v) is float for v in obj):  # per-channel statistics: the common, long case
            bad = next((v for v in obj if not math.isfinite(v)), None)
            if bad is not None:
                raise AnnotationError(f"annotation value {bad} is not finite")
            return list(obj)
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        raise AnnotationError(f"annotation value {obj} is not finite")
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _plain(obj.item())
    return obj


def _frozen(obj: Any) -> Any:
    """JSON lists become tuples so that annotations stay immutable and comparable."""
    if isinstance(obj, list):
        if not any(isinstance(v, (list, dict)) for v in obj):  # per-channel numbers: no recursion
            return tuple(obj)
        return tuple(_frozen(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _frozen(v) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------- the schema


@dataclasses.dataclass(frozen=True)
class QuantizableLayer(Annotation):
    """On a node: a layer whose weight qcompiler quantizes, with its activation tensors.

    Attributes:
        op: ONNX op type (Conv, ConvTranspose, Gemm, MatMul).
        weight: name of the constant weight value.
        bias: name of the constant bias value, or None.
        activation_input: name of the activation that enters the layer.
        output: name of the layer's output value.
        channel_axis: axis of the weight that indexes output channels.
        weight_shape: the weight's shape.
    """

    KIND: ClassVar[str] = "layer"
    op: str
    weight: str
    bias: str | None
    activation_input: str
    output: str
    channel_axis: int
    weight_shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TensorStats(Annotation):
    """On a value: streamed calibration statistics and the ranges the choosers picked.

    Attributes:
        count: number of elements seen.
        samples: number of samples (batch rows) seen.
        min, max, absmax, mean, std: per-tensor statistics.
        abs_quantiles: ``((q, |x| quantile), ...)`` from the histogram.
        ranges: ``((key, clip), ...)`` with keys ``minmax``, ``percentile:<p>``,
            ``entropy:<bits>``, ``mse:<bits>``.
        channel_axis: the axis of the per-channel statistics, or None.
        channel_min, channel_max, channel_mean, channel_std: per-channel statistics.
        sidecar: path (relative to the IR file) of the npz with histograms and the reservoir.
    """

    KIND: ClassVar[str] = "stats"
    count: int
    samples: int
    min: float
    max: float
    absmax: float
    mean: float
    std: float
    abs_quantiles: tuple[tuple[float, float], ...] = ()
    ranges: tuple[tuple[str, float], ...] = ()
    channel_axis: int | None = None
    channel_min: tuple[float, ...] = ()
    channel_max: tuple[float, ...] = ()
    channel_mean: tuple[float, ...] = ()
    channel_std: tuple[float, ...] = ()
    sidecar: str | None = None

    def range(self, key: str) -> float:
        """The clip range chosen by ``key`` (e.g. ``"mse:8"``); ``minmax`` is always known."""
        if key == "minmax":
            return self.absmax
        for name, value in self.ranges:
            if name == key:
                return value
        known = ", ".join(["minmax", *(name for name, _ in self.ranges)])
        raise AnnotationError(f"no calibrated range {key!r} (calibrated: {known})")


@dataclasses.dataclass(frozen=True)
class FixedPoint(Annotation):
    """On a value: a fixed-point format, value = code * 2**-fl with a wl-bit code.

    Attributes:
        wl: word length in bits (the code's width).
        fl: fractional length; one int per tensor, or one per channel along ``axis``.
        signed: signed two's complement codes, else unsigned.
        axis: channel axis of a per-channel ``fl``, or None.
        rule: how the format was chosen (e.g. ``"minmax"``).
    """

    KIND: ClassVar[str] = "fixed_point"
    wl: int
    fl: int | tuple[int, ...]
    signed: bool = True
    axis: int | None = None
    rule: str = "minmax"

    def scales(self) -> tuple[float, ...]:
        """The power-of-two scales 2**-fl (one per channel, or one)."""
        fls = self.fl if isinstance(self.fl, tuple) else (self.fl,)
        return tuple(math.ldexp(1.0, -f) for f in fls)

    def code_range(self) -> tuple[int, int]:
        """Inclusive integer code range."""
        if self.signed:
            return -(1 << (self.wl - 1)), (1 << (self.wl - 1)) - 1
        return 0, (1 << self.wl) - 1


@dataclasses.dataclass(frozen=True)
class ErrorProfile(Annotation):
    """On a weight or activation value: its rate-distortion curve, one entry per candidate.

    Attributes:
        tensor_kind: ``weight`` or ``activation``.
        elements: N (per sample for activations).
        candidates: candidate labels (``kind:bits[:rratio]``).
        bits: bit width of each candidate.
        rate_fixed: fixed-length rate N·b in bits.
        rate_entropy: entropy rate N·H in bits.
        distortion: output-logit MSE against float with only this tensor quantized.
        measured: True where the distortion was measured, False where predicted (fast mode).
        mode: ``exact``, ``fast``, ``hybrid`` or ``full``.
        split: the calibration split the distortion was measured on.
        rate_log2: ``log2`` rate N·log2 L in bits (seed 000's; empty in files written before it).
    """

    KIND: ClassVar[str] = "error_profile"
    tensor_kind: str
    elements: int
    candidates: tuple[str, ...]
    bits: tuple[int, ...]
    rate_fixed: tuple[float, ...]
    rate_entropy: tuple[float, ...]
    distortion: tuple[float, ...]
    measured: tuple[bool, ...]
    mode: str = "exact"
    split: str = "calib"
    rate_log2: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class ChannelAllocation(Annotation):
    """On a feature value: seed 001's channel-wise interval allocation and its evaluation.

    Attributes:
        quantizer: ``uniform``, ``log`` or ``log_faithful``.
        bits: the nominal bit widths b (budget C·(2**b − 1) intervals each).
        table: per bit width, the offline table's column sums T (one per channel).
        gains: the closed-form model's per-channel gains w_c.
        curves: per channel, D_c(2**b − 1) for each bit width (only channel c quantized).
        closed_form: per bit width, the closed-form counts n_c.
        mse_uniform, mse_allocated, mse_closed_form, mse_dorefa: logit MSE per bit width.
        alpha, beta, reserve: the online allocation's parameters.
    """

    KIND: ClassVar[str] = "channel_allocation"
    quantizer: str
    bits: tuple[int, ...]
    table: tuple[tuple[float, ...], ...]
    gains: tuple[float, ...]
    curves: tuple[tuple[float, ...], ...]
    closed_form: tuple[tuple[int, ...], ...]
    mse_uniform: tuple[float, ...]
    mse_allocated: tuple[float, ...]
    mse_closed_form: tuple[float, ...]
    mse_dorefa: tuple[float, ...]
    alpha: float = 0.9
    beta: float = 0.1
    reserve: int = 10


@dataclasses.dataclass(frozen=True)
class FoldedBatchNorm(Annotation):
    """On a Conv/ConvTranspose/Gemm node: the BatchNormalization folded into it, by the names of
    the original initializers (for a model lowered from torch: its ``state_dict`` keys), so
    that trained folded weights can be written back into the source module.

    Attributes:
        weight: the layer's weight before the fold.
        bias: the layer's bias before the fold, or None.
        scale, shift, mean, var: the BatchNormalization's γ, β, running mean and variance.
        epsilon: its ε.
    """

    KIND: ClassVar[str] = "folded_batchnorm"
    weight: str
    bias: str | None
    scale: str
    shift: str
    mean: str
    var: str
    epsilon: float


@dataclasses.dataclass(frozen=True)
class BitWidth(Annotation):
    """On a weight or activation value: the candidate the allocator chose.

    Attributes:
        candidate: the candidate label (``kind:bits[:rratio]``).
        kind: the quantizer kind.
        bits: the bit width (the word length on fixed-point targets).
        rate: the rate counted against the budget, in bits.
        distortion: the profiled distortion of this choice.
        method: the allocator that chose it.
    """

    KIND: ClassVar[str] = "bits"
    candidate: str
    kind: str
    bits: int
    rate: float
    distortion: float
    method: str


@dataclasses.dataclass(frozen=True)
class AllocationSummary(Annotation):
    """On the model: the budget, what the allocation used and its predicted distortion.

    Attributes:
        method: the allocator.
        rate_model: ``fixed`` or ``entropy``.
        scope: ``weights`` or ``all`` (weights and per-sample activations).
        budget_bits: the budget.
        used_bits: the rate of the chosen candidates.
        elements: the number of elements the budget covers.
        predicted_distortion: Σ D of the chosen candidates (additive model).
        measured_distortion: the logit MSE with every allocated tensor quantized at once, on
            the data the curves were measured on (:class:`MeasureAllocationPass`), or None.
    """

    KIND: ClassVar[str] = "allocation"
    method: str
    rate_model: str
    scope: str
    budget_bits: float
    used_bits: float
    elements: int
    predicted_distortion: float
    measured_distortion: float | None = None


@dataclasses.dataclass(frozen=True)
class AccuracySearch(Annotation):
    """On the model: the accuracy-aware budget search (``--max-loss``).

    Attributes:
        max_loss: the allowed metric drop.
        reference: the float model's metric.
        chosen_avg_bits: the budget kept (bits per element).
        probes: ``((avg_bits, loss), ...)`` in the order evaluated.
    """

    KIND: ClassVar[str] = "accuracy_search"
    max_loss: float
    reference: float
    chosen_avg_bits: float
    probes: tuple[tuple[float, float], ...]


@dataclasses.dataclass(frozen=True)
class IntegerWeights(Annotation):
    """On a weight value: the float initializer holds ``code·scale`` exactly, codes in ``[q_min, q_max]``.

    Written by passes that choose the integer weights themselves (GPFQ); targets read the codes
    back with ``rint(W / scale)`` instead of rounding the float weights again.

    Attributes:
        bits: the code width.
        q_min, q_max: the inclusive code range.
        scales: one scale per channel along ``axis``, or a single scale.
        axis: the weight's channel axis of per-channel scales, or None.
        method: the pass that chose the codes (``gpfq``).
        grid: the grid name (``int``, ``fixed``, ``max78000``).
    """

    KIND: ClassVar[str] = "integer_weights"
    bits: int
    q_min: int
    q_max: int
    scales: tuple[float, ...]
    axis: int | None = None
    method: str = "gpfq"
    grid: str = "int"

    def scale_array(self, ndim: int) -> np.ndarray:
        """The scales shaped to broadcast against a weight of rank ``ndim``."""
        scales = np.asarray(self.scales, dtype=np.float64)
        if self.axis is None:
            return scales.reshape(())
        shape = [1] * ndim
        shape[self.axis] = scales.size
        return scales.reshape(shape)


@dataclasses.dataclass(frozen=True)
class WeightGrid(Annotation):
    """On a weight value: the integer grid a target will store it on (``code·scale``).

    Targets whose grid is not a :class:`FixedPoint` format (e.g. MAX78000's per-layer scale
    ``λ_out/(λ_in·2^(b−1)·2^shift)``) write it so that weight-rewriting passes (GPFQ) choose
    codes on exactly that grid.

    Attributes:
        bits: the code width.
        q_min, q_max: the inclusive code range.
        scales: one scale per channel along ``axis``, or a single scale.
        axis: the channel axis of per-channel scales, or None.
        target: the target that defined the grid.
    """

    KIND: ClassVar[str] = "weight_grid"
    bits: int
    q_min: int
    q_max: int
    scales: tuple[float, ...]
    axis: int | None = None
    target: str = ""


@dataclasses.dataclass(frozen=True)
class Codebook(Annotation):
    """On a weight or activation value: the fitted profiling quantizer it is held on (seed 000's
    exported ``(dz, L, λ, δ)``, or a uniform or log codebook), fixed once fitted.

    Written by fine-tuning for tensors whose :class:`BitWidth` kind no target grid covers, so
    that the fine-tuned weights and any later evaluation use exactly the trained codebook.

    Attributes:
        candidate: the candidate label (``kind:bits[:rratio]``).
        signed: whether the tensor takes negative values.
        axis: the channel axis of per-channel parameters, or None.
        params: the fitted parameters (``(λ, δ)`` for ``deadzone``, per-channel steps for
            ``uniform`` weights, ``(e_min, e_max)`` for ``log``, FLs for ``fixed``).
    """

    KIND: ClassVar[str] = "codebook"
    candidate: str
    signed: bool
    axis: int | None
    params: tuple[float, ...]


#: How an :class:`ActivationGrid` rounds: half to even (``QuantizeLinear``), half up
#: (``floor(u + 0.5)``, MAX78000's output shift) or toward zero (MAX78000's average pooling).
ROUNDINGS = ("half_even", "half_up", "toward_zero")


@dataclasses.dataclass(frozen=True)
class ActivationGrid(Annotation):
    """On an activation value: the integer grid a target computes it on, when that grid is not
    a :class:`FixedPoint` format (e.g. MAX78000's Q7 codes ``λ/128`` with output shifts).

    The value is stored as ``clamp(rounding(x / scale), q_min, q_max)·scale``. Before rounding,
    ``x / scale`` is a multiple of ``1/lattice`` in the target's integer arithmetic (an
    accumulator shifted right by ``log2(lattice)`` bits, or a pooling sum divided by the window
    size); simulations snap to that lattice first, so that a float forward pass rounds the
    exact ties the way the hardware does. ``lattice`` 0 means the value is not on a lattice
    (a model input).

    Attributes:
        scale: the float value of one code.
        q_min, q_max: the inclusive code range.
        rounding: one of :data:`ROUNDINGS`.
        lattice: see above (0 = none).
        target: the target that defined the grid.
    """

    KIND: ClassVar[str] = "activation_grid"
    scale: float
    q_min: int
    q_max: int
    rounding: str = "half_even"
    lattice: int = 0
    target: str = ""


@dataclasses.dataclass(frozen=True)
class GPFQLayer(Annotation):
    """On a node: what GPFQ did to its weight, with round-to-nearest on the same grid as baseline.

    Attributes:
        bits: weight bits.
        grid: ``int``, ``fixed``, ``max78000``, ``reference`` or ``paper2022``.
        scalar: the alphabet scalar C.
        rows: calibration rows m (samples times output positions).
        columns: d, columns per group.
        groups: independent groups.
        error: ``‖XWᵀ − X̃Qᵀ‖_F / ‖XWᵀ‖_F`` of GPFQ.
        error_rtn: the same for round-to-nearest on the same grid (fed the same X̃).
        error_group_mean: the mean of the per-group relative errors (the reference's number).
        residual_norm: ``‖XWᵀ − X̃Qᵀ‖_F`` (the reference's ``‖U‖_F``).
        zero_fraction: fraction of exactly-zero weights after GPFQ.
        bias_corrected: whether the bias was corrected.
    """

    KIND: ClassVar[str] = "gpfq"
    bits: int
    grid: str
    scalar: float
    rows: int
    columns: int
    groups: int
    error: float
    error_rtn: float
    error_group_mean: float
    residual_norm: float
    zero_fraction: float
    bias_corrected: bool = False


@dataclasses.dataclass(frozen=True)
class GPFQSummary(Annotation):
    """On the model: GPFQ against round-to-nearest at the output, on the calibration samples.

    Attributes:
        samples: calibration samples used for the comparison.
        output_mse: logit MSE against float, GPFQ.
        output_mse_rtn: the same, round-to-nearest on the same grids.
        sqnr_db, sqnr_db_rtn: logit SQNR.
        top1_agreement, top1_agreement_rtn: arg-max agreement with the float model; None when
            the output is not a classifier's (:func:`~qcompiler.metrics.class_scores`).
        zero_fraction_float, zero_fraction: exactly-zero weights and biases before and after.
        skipped: ``((node, reason), ...)`` weight layers GPFQ left alone.
    """

    KIND: ClassVar[str] = "gpfq_summary"
    samples: int
    output_mse: float
    output_mse_rtn: float
    sqnr_db: float
    sqnr_db_rtn: float
    top1_agreement: float | None
    top1_agreement_rtn: float | None
    zero_fraction_float: float
    zero_fraction: float
    skipped: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Provenance(Annotation):
    """On the model: the passes that produced it, in order.

    Attributes:
        entries: one mapping per pass run: ``pass`` (repr), ``seconds``, ``modified``, ``qcompiler``.
    """

    KIND: ClassVar[str] = "provenance"
    entries: tuple[Mapping[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class FineTuneLog(Annotation):
    """On the model: the quantization-aware fine-tuning run.

    Attributes:
        epochs: one mapping per epoch: ``epoch``, ``train_loss``, ``lr``, ``seconds`` and
            ``eval_top1`` and ``eval_loss`` when held-out data was given.
        best_epoch: the epoch whose weights were kept.
        stopped_early: training stopped before the last epoch (no held-out improvement).
    """

    KIND: ClassVar[str] = "finetune_log"
    epochs: tuple[Mapping[str, Any], ...] = ()
    best_epoch: int = 0
    stopped_early: bool = False


@dataclasses.dataclass(frozen=True)
class WordLengthSearchLog(Annotation):
    """On the model: seed 002's greedy word-length search, step by step (its
    ``acc_vs_compress_log.txt``).

    Attributes:
        steps: one mapping per committed step: ``phase`` (``compress_first``, ``loss_first``
            or ``tune`` for a successful retraining), ``tensor``, ``loss`` and ``compression``.
        evaluations: metric calls.
    """

    KIND: ClassVar[str] = "wl_search_log"
    steps: tuple[Mapping[str, Any], ...] = ()
    evaluations: int = 0


# --------------------------------------------------------------------------- access

Annotatable = ir.Model | ir.Graph | ir.Node | ir.Value


def _describe(obj: Annotatable) -> str:
    if isinstance(obj, ir.Node):
        return f"node {obj.name!r} ({obj.op_type})"
    if isinstance(obj, ir.Value):
        return f"value {obj.name!r}"
    if isinstance(obj, ir.Graph):
        return f"graph {obj.name!r}"
    return "model"


def get(obj: Annotatable, kind: type[A]) -> A | None:
    """Return the annotation of ``kind`` on ``obj``, or None when absent."""
    text = obj.metadata_props.get(kind.key())
    if text is None:
        return None
    return kind.from_json(text, where=_describe(obj))


def set(obj: Annotatable, value: Annotation) -> None:  # noqa: A001 - the schema's verb
    """Store ``value`` on ``obj`` (replacing an annotation of the same kind)."""
    obj.metadata_props[type(value).key()] = value.to_json()


def remove(obj: Annotatable, kind: type[Annotation]) -> None:
    """Delete the annotation of ``kind`` from ``obj`` if present."""
    obj.metadata_props.pop(kind.key(), None)


def require(obj: Annotatable, kind: type[A], where: str = "") -> A:
    """Return the annotation of ``kind`` or raise :class:`AnnotationError` naming what is missing.

    Args:
        obj: the model, graph, node or value.
        kind: the annotation class.
        where: the pass or step that needs it, for the message.
    """
    found = get(obj, kind)
    if found is None:
        need = f" (needed by {where})" if where else ""
        raise AnnotationError(f"{_describe(obj)} has no {kind.key()} annotation{need}")
    return found


def _props(obj: Annotatable) -> dict[str, Any]:
    out = {}
    for key, text in sorted(obj.metadata_props.items()):
        if key.startswith(PREFIX):
            kind = _REGISTRY.get(key[len(PREFIX) :])
            out[key] = json.loads(text) if kind is None else json.loads(kind.from_json(text).to_json())
    return out


def dump(model: ir.Model) -> dict[str, Any]:
    """All qcompiler annotations of a model as plain JSON-able data, keyed stably.

    The result is what golden tests compare: ``{"model": {...}, "nodes": {name: {...}},
    "values": {name: {...}}}`` with only the ``pkg.qcompiler.*`` keys.
    """
    nodes: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for node in model.graph:
        props = _props(node)
        if props:
            nodes[node.name or f"<{node.op_type}>"] = props
    seen: dict[str, ir.Value] = {}
    for value in list(model.graph.inputs) + list(model.graph.initializers.values()):
        seen.setdefault(value.name, value)
    for node in model.graph:
        for value in node.outputs:
            seen.setdefault(value.name, value)
    for name, value in seen.items():
        props = _props(value)
        if props:
            values[name] = props
    return {"model": _props(model), "nodes": nodes, "values": values}


def strip_graph(model: ir.Model) -> None:
    """Remove every qcompiler annotation from the graph's nodes and values (in place); the
    model-level ones (provenance, summaries) stay. For deployable artifacts, where calibration
    histograms and error curves would only add size."""
    objects: list[Annotatable] = [*model.graph.inputs, *model.graph.initializers.values()]
    for node in model.graph:
        objects.append(node)
        objects.extend(node.outputs)
    for obj in objects:
        for key in [k for k in obj.metadata_props if k.startswith(PREFIX)]:
            del obj.metadata_props[key]


def kinds() -> Mapping[str, type[Annotation]]:
    """The registered annotation kinds by key suffix."""
    return dict(_REGISTRY)
