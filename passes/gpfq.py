"""GPFQ rewrite: greedy path-following quantization of Conv, ConvTranspose, Gemm and MatMul weights.

Layers are processed one at a time in topological order (algorithms.md §6.4). For each layer
the calibration batches are streamed through two prefix models, the float model (``X``) and
the current partly rewritten model (``X̃``, including activation fake-quant when the target
annotated activation formats). Only ``H = X̃ᵀX̃``, ``G = X̃ᵀX`` and ``F = XᵀX`` (d×d per group)
are kept, ``G`` and ``F`` only as their projections on ``W`` when a layer has few output rows
(:class:`~qcompiler.gpfq.GramAccumulator`); :func:`~qcompiler.gpfq.gpfq_sweep` then chooses the
levels, which replace the float weights in place. Integer grids also get an :class:`~qcompiler.annotations.IntegerWeights`
annotation (codes and scales), so every target emits exactly these codes.

Grids (``grid``): ``auto`` uses the weight's :class:`~qcompiler.annotations.FixedPoint` format
when a target assigned one (power-of-two scales), else a target's
:class:`~qcompiler.annotations.WeightGrid` (``max78000``: one power-of-two-derived scale per
layer, codes in ``[−2^(b−1), 2^(b−1) − 1]``), else ``int``; ``int`` is per-channel
``s_n = C·quantile(|W_n|, p)/(2^(b−1) − 1)`` with codes in ``[−2^(b−1), 2^(b−1) − 1]``;
``reference`` and ``paper2022`` are the seed's alphabets (simulation only).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from qcompiler import annotations as ann
from qcompiler.data import ArrayDataset, iter_feeds
from qcompiler.errors import DataError, QCompilerError, UnsupportedModelError
from qcompiler.gpfq import (
    AlphabetGrid,
    GramAccumulator,
    Grid,
    ReferenceGrid,
    UniformGrid,
    act_order,
    act_order_of_rows,
    channel_scales,
    code_range,
    data_form_is_cheaper,
    gpfq_blocked,
    gpfq_data,
    gpfq_sweep,
    lower_projection,
    mse_channel_scales,
    paper_alphabet,
    projection_is_cheaper,
    reference_step,
    relative_error_from_projections,
    relative_error_on_rows,
    sample_slices,
)
from qcompiler import float_reference
from qcompiler.graph import add_initializer, const_array, set_initializer, values_by_name
from qcompiler.layer_matrix import (
    LayerGeometry,
    RowBuffer,
    from_weight_matrix,
    geometry,
    rows,
    rows_per_sample,
    weight_matrix,
)
from qcompiler.metrics import sqnr_db, top1_agreement
from qcompiler.passes.assign_fixed_point import accumulator_format
from qcompiler.passes.detect_layers import quantizable_nodes
from qcompiler.progress import progress_bar
from qcompiler.qdq import lower_to_qdq
from qcompiler.quantizers import no_overflow_fl
from qcompiler.prefixes import IncrementalPrefix, PrefixRunner
from qcompiler.suffix import logits_names

#: ``value.meta`` key of a rewritten weight's round-to-nearest baseline (in memory only).
RTN_META = "qcompiler.gpfq_rtn_weight"
GRIDS = ("auto", "int", "fixed", "max78000", "reference", "paper2022")
BIAS_CORRECTION = ("none", "last", "all")
TARGET_INPUTS = ("fp", "quantized")
#: SQNR reported when the outputs are identical (JSON has no infinity).
SQNR_CAP_DB = 300.0


class GPFQConfigError(QCompilerError):
    """A GPFQ option is out of range or names a layer that does not exist."""


@dataclasses.dataclass(frozen=True)
class GPFQPass(ir.passes.InPlacePass):
    """Rewrite weights with GPFQ (seed 004, the d×d blocked form).

    Attributes:
        data: calibration data (inputs only; an :class:`ArrayDataset` or a list of feed dicts).
        bits: weight bits of conv layers (``-b``); an allocation or target format overrides it.
        linear_bits: weight bits of Gemm/MatMul layers (default: ``bits``).
        scalar: alphabet scalar C of conv layers (``-s``).
        linear_scalar: alphabet scalar of Gemm/MatMul layers (default: ``scalar``).
        samples: calibration samples per conv layer (``-bs``; default all).
        linear_samples: calibration samples per Gemm/MatMul layer (default: ``samples``).
        grid: ``auto``, ``int``, ``fixed``, ``reference`` or ``paper2022`` (see module docstring).
        per_channel: one scale per output channel (``int``/``fixed``), else one per tensor.
        radius_quantile: the row quantile p of ``|W_n|`` behind the scale (``-p``; 1 = max).
        scale_search: ``int`` grid scales from the row maximum (``max``, times C) or by a
            per-channel MSE search of the clip ratio before GPFQ (``mse``).
        rounding: ``nearest`` or ``stochastic`` (``-sq``, seeded).
        regularizer: None, ``L0`` or ``L1`` (``-reg``) with threshold ``lam`` (``-l``).
        lam: the regulariser's threshold in weight units.
        skip: layers left in float (node names, or indices among the weight layers) (``-ig``).
        bias_correction: ``none``, ``last`` or ``all``: ``b' = b + W·μ_X − Q·μ_X̃``.
        target_inputs: ``fp`` (follow the float outputs, the reference) or ``quantized`` (G = H).
        act_order: process columns by descending ``diag(H)``.
        damping: ``λ`` as a fraction of the mean of ``diag(H)``; GPFQ then follows
            ``‖XWᵀ − X̃Qᵀ‖² + λ‖W − Q‖²`` (``H`` and ``G`` get ``+λI``: the data augmented by
            ``√λ·I`` rows). It keeps layers whose calibration rows do not span their columns
            (fewer tokens than features) from fitting the calibration set alone.
        token_mask: a model input of shape (batch, tokens) (e.g. ``attention_mask``): rows of
            (batch, tokens, features) activations whose mask is 0 (padding) are left out.
        block_size: columns per lazy-update block (does not change the result).
        batch_size: samples per streamed batch.
        cache_mb: memory for the activations at the frontier of the float and the quantized
            network (incremental prefixes: each layer runs only the nodes between the previous
            layer's input and its own); a frontier that does not fit is recomputed from the
            model inputs. 0 always recomputes. With ``samples`` limits the frontiers cover the
            batches of the largest limit.
        seed: seed of the stochastic rounding.
        show_progress: a progress bar over layers (only on a terminal).
    """

    # Empty by default so that a configured pass can be built before the data is known
    # (``dataclasses.replace(template, data=calib)``).
    data: ArrayDataset | Sequence[Mapping[str, np.ndarray]] = dataclasses.field(default=(), repr=False, compare=False)
    bits: int = 4
    linear_bits: int | None = None
    scalar: float = 1.0
    linear_scalar: float | None = None
    samples: int | None = None
    linear_samples: int | None = None
    grid: str = "auto"
    per_channel: bool = True
    radius_quantile: float = 1.0
    scale_search: str = "max"
    rounding: str = "nearest"
    regularizer: str | None = None
    lam: float = 0.1
    skip: tuple[str | int, ...] = ()
    bias_correction: str = "none"
    target_inputs: str = "fp"
    act_order: bool = False
    damping: float = 0.0
    token_mask: str | None = None
    block_size: int = 32
    batch_size: int = 32
    # memory, not a result parameter: left out of the recorded configuration like show_progress
    cache_mb: int = dataclasses.field(default=1024, repr=False, compare=False)
    seed: int = 0
    show_progress: bool = dataclasses.field(default=True, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("bits", "linear_bits"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= 16:
                raise GPFQConfigError(f"GPFQ: {name} must be in 1..16, got {value}")
        for name in ("scalar", "linear_scalar"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise GPFQConfigError(f"GPFQ: {name} (the alphabet scalar C) must be > 0, got {value}")
        for name in ("samples", "linear_samples", "batch_size", "block_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise GPFQConfigError(f"GPFQ: {name} must be >= 1, got {value}")
        if self.cache_mb < 0:
            raise GPFQConfigError(f"GPFQ: cache_mb must be >= 0, got {self.cache_mb}")
        choices = (("grid", GRIDS), ("scale_search", ("max", "mse")), ("rounding", ("nearest", "stochastic")), ("regularizer", (None, "L0", "L1")),
                   ("bias_correction", BIAS_CORRECTION), ("target_inputs", TARGET_INPUTS))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise GPFQConfigError(f"GPFQ: {name} must be one of {', '.join(map(str, allowed))}, got {getattr(self, name)!r}")
        if not 0.0 < self.radius_quantile <= 1.0:
            raise GPFQConfigError(f"GPFQ: radius_quantile must be in (0, 1], got {self.radius_quantile}")
        if self.lam < 0:
            raise GPFQConfigError(f"GPFQ: lam must be >= 0, got {self.lam}")
        if not (math.isfinite(self.damping) and self.damping >= 0):
            raise GPFQConfigError(f"GPFQ: damping must be >= 0, got {self.damping}")

    # ------------------------------------------------------------------ selection

    def selected(self, model: ir.Model) -> tuple[list[tuple[ir.Node, ann.QuantizableLayer]], list[tuple[str, str]]]:
        """(layers to rewrite, skipped ``(node, reason)``); unknown ``skip`` entries raise."""
        layers = quantizable_nodes(model)
        names = [node.name for node, _ in layers]
        for item in self.skip:
            if isinstance(item, int) or (isinstance(item, str) and item.isdigit()):
                if not 0 <= int(item) < len(layers):
                    raise GPFQConfigError(f"GPFQ: skip index {item} is out of range (the model has {len(layers)} weight layers)")
            elif item not in names:
                raise GPFQConfigError(f"GPFQ: skip names no weight layer {item!r} (layers: {', '.join(names[:8])}{', …' if len(names) > 8 else ''})")
        skip_index = {int(i) for i in self.skip if isinstance(i, int) or str(i).isdigit()}
        keep, skipped = [], []
        for i, (node, layer) in enumerate(layers):
            if i in skip_index or node.name in self.skip:
                skipped.append((node.name, "skipped by request"))
            else:
                keep.append((node, layer))
        return keep, skipped

    def requires(self, model: ir.Model) -> None:
        if not quantizable_nodes(model):
            raise ir.passes.PreconditionError("no QuantizableLayer annotations: run DetectLayersPass first")
        self.selected(model)

    # ------------------------------------------------------------------ the pass

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        feeds = list(iter_feeds(self.data, self.batch_size, model))
        if not feeds:
            raise DataError("GPFQ: calibration data is empty")
        layers, skipped = self.selected(model)
        calibration = self._calibration(feeds, layers)
        float_model = model.clone()
        quantize_activations = _has_activation_formats(model)
        zero_before = _zero_fraction(model, layers)
        with progress_bar("gpfq", len(layers), enabled=self.show_progress) as advance:
            for index, (node, layer) in enumerate(layers):
                last = index == len(layers) - 1
                rtn = self._rewrite(model, float_model, node, layer, calibration, quantize_activations, last)
                values_by_name(model.graph)[layer.weight].meta[RTN_META] = rtn
                advance(1)
        float_reference.remember_float_weights(model, float_model)
        ann.set(model, self._summary(model, float_model, calibration, quantize_activations, skipped, zero_before, layers))
        return ir.passes.PassResult(model, True)

    def _calibration(
        self, feeds: list[Mapping[str, np.ndarray]], layers: Sequence[tuple[ir.Node, ann.QuantizableLayer]]
    ) -> _Calibration:
        """The batches the layers read (up to the largest ``samples`` limit), with incremental
        prefixes over them unless ``cache_mb`` is 0."""
        limits = {self._layer_options(layer)[2] for _, layer in layers}
        feeds = _cut_at(feeds, [limit for limit in limits if limit is not None], None in limits)
        if not self.cache_mb:
            return _Calibration(feeds)
        budget = self.cache_mb * 2**20 // 2  # half for the float network, half for the quantized one
        return _Calibration(feeds, IncrementalPrefix(len(feeds), budget), IncrementalPrefix(len(feeds), budget))

    def _layer_options(self, layer: ann.QuantizableLayer) -> tuple[int, float, int | None]:
        linear = layer.op in ("Gemm", "MatMul")
        bits = self.linear_bits if linear and self.linear_bits is not None else self.bits
        scalar = self.linear_scalar if linear and self.linear_scalar is not None else self.scalar
        samples = self.linear_samples if linear and self.linear_samples is not None else self.samples
        return bits, scalar, samples

    def _rewrite(
        self, model: ir.Model, float_model: ir.Model, node: ir.Node, layer: ann.QuantizableLayer,
        calibration: _Calibration, quantize_activations: bool, last: bool,
    ) -> np.ndarray:
        """GPFQ one layer in place; return its round-to-nearest weights (the baseline)."""
        values = values_by_name(model.graph)
        weight_value = values[layer.weight]
        w = const_array(weight_value)
        geo = geometry(node, tuple(w.shape))
        bits, scalar, samples = self._layer_options(layer)
        grid_name, grids, rtn_grids, integer = self._grids(model, node, layer, geo, w, bits, scalar)
        wm = weight_matrix(geo, w).astype(np.float64)
        acc = self._accumulate(model, float_model, node, layer, geo, wm, calibration, samples, quantize_activations)
        q = np.empty_like(wm)
        rtn = np.empty_like(wm)
        errors, rtn_errors, refs = [], [], []
        kept = acc.kept_rows()
        # The damped data form runs on d more rows (the √λ·I rows); the choice is the same for every group.
        fit_rows = acc.rows + (geo.columns if self.damping else 0)
        on_rows = kept is not None and data_form_is_cheaper(wm.shape[1], geo.columns, fit_rows, self.block_size)
        for k in range(geo.groups):
            rtn[k] = rtn_grids[k].quantize(wm[k], 0)
            if on_rows:
                x, x_tilde = kept[0][k], kept[1][k]
                q[k] = self._solve_on_rows(wm[k], x, x_tilde, grids[k])
                reference = x @ wm[k].T
                refs.append(float(np.sum(reference**2)))
                errors.append(relative_error_on_rows(wm[k], q[k], x, x_tilde, reference))
                rtn_errors.append(relative_error_on_rows(wm[k], rtn[k], x, x_tilde, reference))
                continue
            q[k] = self._solve_on_products(wm[k], acc, k, grids[k])
            wg, energy = acc.report_terms(k)
            refs.append(energy)
            errors.append(relative_error_from_projections(q[k], acc.h[k], wg, energy))
            rtn_errors.append(relative_error_from_projections(rtn[k], acc.h[k], wg, energy))
        corrected = self._correct_bias(model, node, layer, geo, wm, q, acc, last)
        set_initializer(model.graph, weight_value, from_weight_matrix(geo, q, w.dtype))
        if integer is not None:
            ann.set(weight_value, integer)
        total_ref = math.sqrt(sum(refs)) or 1.0
        ann.set(node, ann.GPFQLayer(
            bits=integer.bits if integer is not None else bits, grid=grid_name, scalar=float(scalar), rows=int(acc.rows), columns=int(geo.columns),
            groups=geo.groups,
            error=math.sqrt(sum(e[0] ** 2 for e in errors)) / total_ref,
            error_rtn=math.sqrt(sum(e[0] ** 2 for e in rtn_errors)) / total_ref,
            error_group_mean=float(np.mean([e[1] for e in errors])),
            residual_norm=math.sqrt(sum(e[0] ** 2 for e in errors)),
            zero_fraction=float(np.mean(q == 0.0)),
            bias_corrected=corrected,
        ))
        return from_weight_matrix(geo, rtn, w.dtype)

    def _solve_on_products(self, w: np.ndarray, acc: GramAccumulator, group: int, grid: Grid) -> np.ndarray:
        """The levels of one group from the streamed ``H`` and ``G`` (the d×d form; ``G`` possibly
        only as its projection ``W·tril(G)ᵀ``, which is all the sweep needs in column order)."""
        h = acc.h[group]
        lam = _damping_value(h, self.damping)
        h_fit = h + lam * np.eye(h.shape[0]) if lam else h
        if not self.act_order:
            # G + λI projects to W·tril(G)ᵀ + λ·W
            a = lower_projection(w, h_fit) if self.target_inputs == "quantized" else acc.lower_projection(group) + lam * w
            return gpfq_sweep(a, h_fit, grid, self.block_size)
        # act_order permutes the columns after streaming, so it needs the whole G (never projected)
        target_g = h_fit if self.target_inputs == "quantized" else acc.g[group] + lam * np.eye(h.shape[0])
        perm = act_order(h)
        q = gpfq_blocked(w[:, perm], h_fit[np.ix_(perm, perm)], target_g[np.ix_(perm, perm)], grid, self.block_size)
        return q[:, np.argsort(perm)]

    def _solve_on_rows(self, w: np.ndarray, x: np.ndarray, x_tilde: np.ndarray, grid: Grid) -> np.ndarray:
        """The levels of one group from the kept rows (the data form, same levels as the d×d form)."""
        x_fit = x_tilde if self.target_inputs == "quantized" else x
        if self.damping:  # the √λ·I rows that H + λI and G + λI stand for
            root = math.sqrt(self.damping * float(np.mean(np.sum(x_tilde**2, axis=0))))
            eye = root * np.eye(x.shape[1])
            x_fit, x_tilde = np.concatenate([x_fit, eye]), np.concatenate([x_tilde, eye])
        if not self.act_order:
            return gpfq_data(w, x_fit, x_tilde, grid, self.block_size)
        perm = act_order_of_rows(x_tilde)
        return gpfq_data(w[:, perm], x_fit[:, perm], x_tilde[:, perm], grid, self.block_size)[:, np.argsort(perm)]

    # ------------------------------------------------------------------ grids

    def _grids(
        self, model: ir.Model, node: ir.Node, layer: ann.QuantizableLayer, geo: LayerGeometry,
        w: np.ndarray, bits: int, scalar: float,
    ) -> tuple[str, list[Grid], list[Grid], ann.IntegerWeights | None]:
        """(grid name, GPFQ grid per group, round-to-nearest grid per group, integer annotation)."""
        values = values_by_name(model.graph)
        fmt = ann.get(values[layer.weight], ann.FixedPoint)
        target_grid = ann.get(values[layer.weight], ann.WeightGrid)
        name = self.grid
        if name == "auto":
            name = "fixed" if fmt is not None else (target_grid.target if target_grid is not None else "int")
        groups = geo.groups
        wm = weight_matrix(geo, w).reshape(-1, geo.columns)  # every output neuron is a row
        if name in ("reference", "paper2022"):
            if name == "reference":
                l0 = self.lam if self.regularizer == "L0" else None
                step = reference_step(wm, bits, scalar, self.radius_quantile, l0)
                try:
                    grids = [ReferenceGrid(step, 1 << (bits - 1), self.rounding, self.regularizer, self.lam, self.seed)
                             for _ in range(groups)]
                except ValueError as exc:
                    raise GPFQConfigError(f"GPFQ: node {node.name!r}: {exc}") from None
                rtn = [ReferenceGrid(reference_step(wm, bits, scalar, self.radius_quantile), 1 << (bits - 1)) for _ in range(groups)]
            else:
                alphabet = AlphabetGrid(paper_alphabet(wm, bits, scalar, self.radius_quantile))
                grids, rtn = [alphabet] * groups, [alphabet] * groups
            return name, grids, rtn, None
        if name == "fixed":
            scales, q_min, q_max, axis = self._fixed_scales(values, node, layer, w, bits, scalar, fmt)
        elif target_grid is not None and name == target_grid.target:
            q_min, q_max, axis, bits = target_grid.q_min, target_grid.q_max, target_grid.axis, target_grid.bits
            scales = np.asarray(target_grid.scales, dtype=np.float64)
            scales = scales if axis is not None else scales[0]
        elif name != "int":
            raise GPFQConfigError(f"GPFQ: node {node.name!r}: no {name!r} grid (the target did not define one)")
        else:
            rows_w = np.moveaxis(w, layer.channel_axis, 0)
            rows_w = rows_w if self.per_channel else rows_w.reshape(1, -1)
            if self.scale_search == "mse":
                scales = mse_channel_scales(rows_w, bits)
            else:
                scales = channel_scales(rows_w, bits, scalar, self.radius_quantile)
            axis = layer.channel_axis if self.per_channel else None
            scales = scales if self.per_channel else scales[0]
            # float32 scales: code·scale is then the same number in the IR and in DequantizeLinear
            scales = np.asarray(scales, dtype=np.float32).astype(np.float64)
            q_min, q_max = code_range(bits)
        row_scales = np.broadcast_to(np.asarray(scales, dtype=np.float64), (geo.out_channels,)).reshape(groups, -1)
        grids = [UniformGrid(row_scales[k], q_min, q_max, self.rounding, self.regularizer, self.lam, self.seed + k)
                 for k in range(groups)]
        rtn = [UniformGrid(row_scales[k], q_min, q_max) for k in range(groups)]
        integer = ann.IntegerWeights(bits=int(fmt.wl if name == "fixed" and fmt is not None else bits), q_min=int(q_min),
                                     q_max=int(q_max), scales=tuple(float(s) for s in np.atleast_1d(scales)),
                                     axis=axis, method="gpfq", grid=name)
        return name, grids, rtn, integer

    def _fixed_scales(
        self, values: dict[str, ir.Value], node: ir.Node, layer: ann.QuantizableLayer, w: np.ndarray,
        bits: int, scalar: float, fmt: ann.FixedPoint | None,
    ) -> tuple[np.ndarray, int, int, int | None]:
        """Power-of-two scales: the target's format, re-derived from ``C·max|W_n|`` when C ≠ 1
        (the bias format follows, ``fl_bias = fl_in + fl_w``)."""
        if fmt is None or scalar != 1.0:
            wl = fmt.wl if fmt is not None else bits
            moved = np.moveaxis(w, layer.channel_axis, 0).reshape(w.shape[layer.channel_axis], -1)
            per_channel = fmt.axis is not None if fmt is not None else self.per_channel
            if per_channel:
                fl: int | tuple[int, ...] = tuple(no_overflow_fl(scalar * float(np.abs(r).max()), wl) for r in moved)
            else:
                fl = no_overflow_fl(scalar * float(np.abs(w).max()), wl)
            fmt = ann.FixedPoint(wl=wl, fl=fl, signed=True, axis=layer.channel_axis if per_channel else None,
                                 rule=f"gpfq:C={scalar:g}")
            ann.set(values[layer.weight], fmt)
            self._update_bias_format(values, layer, fmt)
        q_min, q_max = fmt.code_range()
        scales = np.asarray(fmt.scales(), dtype=np.float64)
        return (scales if fmt.axis is not None else scales[0]), q_min, q_max, fmt.axis

    @staticmethod
    def _update_bias_format(values: dict[str, ir.Value], layer: ann.QuantizableLayer, fmt: ann.FixedPoint) -> None:
        if layer.bias is None:
            return
        act = ann.get(values[layer.activation_input], ann.FixedPoint)
        bias_fmt = ann.get(values[layer.bias], ann.FixedPoint)
        if act is None or bias_fmt is None:
            return
        ann.set(values[layer.bias], accumulator_format(act, fmt, layer.weight_shape[layer.channel_axis]))

    # ------------------------------------------------------------------ data

    def _accumulate(
        self, model: ir.Model, float_model: ir.Model, node: ir.Node, layer: ann.QuantizableLayer,
        geo: LayerGeometry, wm: np.ndarray, calibration: _Calibration, samples: int | None,
        quantize_activations: bool,
    ) -> GramAccumulator:
        """Stream the batches through the float and the partly quantized prefixes."""
        view = lower_to_qdq(model) if quantize_activations else model
        tilde_name = _input_of(view, node.name)
        matched = not quantize_activations and not _rewritten_upstream(model, layer.activation_input)
        float_source = calibration.source(calibration.float_prefix, float_model, layer.activation_input)
        tilde_source = None if matched else calibration.source(calibration.tilde_prefix, view, tilde_name)
        # Rows are kept while they take no more memory than one d×d product (see the data form).
        # G and F only projected on W when that is cheaper; act_order needs the whole G.
        project = not self.act_order and projection_is_cheaper(wm.shape[1], geo.columns)
        acc = GramAccumulator(geo.columns, geo.groups, matched=matched, keep_rows=geo.columns, weights=wm, project=project)
        seen, buffers = 0, (RowBuffer(), RowBuffer())
        for index, feed in enumerate(calibration.feeds):
            wanted = samples is None or seen < samples  # the batches end at every layer's sample limit
            if not wanted and not calibration.incremental:
                break
            # an incremental prefix keeps each batch's frontier for the next layer, which may read
            # more samples: every batch runs, the ones past this layer's limit are not read
            x_batch = float_source(index, feed)
            xt_batch = None if tilde_source is None else tilde_source(index, feed)
            if not wanted:
                continue
            keep = self._kept_rows(feed, x_batch, geo)
            per_sample = rows_per_sample(geo, x_batch.shape)  # per batch: feeds may differ in shape
            for part in sample_slices(len(x_batch), per_sample):
                # float64 before im2col: the accumulator works in float64, and the patches are
                # written once. A few samples at a time, so the patches (up to 2·k² times the
                # batch's activations) are bounded by ROWS_PER_UPDATE rows, not the batch size,
                # and into the same memory each time unless the accumulator keeps them.
                x_buffer, xt_buffer = (None, None) if acc.keeps((part.stop - part.start) * per_sample) else buffers
                x = rows(geo, x_batch[part], np.float64, x_buffer)
                x_tilde = None if xt_batch is None else rows(geo, xt_batch[part], np.float64, xt_buffer)
                if keep is not None:
                    kept = keep[part.start * per_sample:part.stop * per_sample]
                    x = x[:, kept]
                    x_tilde = None if x_tilde is None else x_tilde[:, kept]
                acc.update(x, x_tilde)
            seen += len(next(iter(feed.values())))
        return acc

    def _kept_rows(self, batch: Mapping[str, np.ndarray], x: np.ndarray, geo: LayerGeometry) -> np.ndarray | None:
        """Row selector of the non-padding tokens, or None to keep every row."""
        if self.token_mask is None or geo.op not in ("Gemm", "MatMul"):
            return None
        if self.token_mask not in batch:
            raise DataError(f"GPFQ: token_mask {self.token_mask!r} is not a model input (inputs: {', '.join(batch)})")
        mask = np.asarray(batch[self.token_mask])
        if x.ndim != 3 or mask.shape != x.shape[:2]:
            return None  # not a per-token activation (e.g. after pooling): keep every row
        return mask.reshape(-1) != 0

    # ------------------------------------------------------------------ bias

    def _correct_bias(
        self, model: ir.Model, node: ir.Node, layer: ann.QuantizableLayer, geo: LayerGeometry,
        wm: np.ndarray, q: np.ndarray, acc: GramAccumulator, last: bool,
    ) -> bool:
        """``b' = b + W·μ_X − Q·μ_X̃`` per output channel (Conv and Gemm; a MatMul needs a bias Add)."""
        if self.bias_correction == "none" or (self.bias_correction == "last" and not last):
            return False
        mu_x, mu_xt = acc.mean_x(), acc.mean_x_tilde()
        delta = np.concatenate([wm[k] @ mu_x[k] - q[k] @ mu_xt[k] for k in range(geo.groups)])
        values = values_by_name(model.graph)
        if layer.bias is not None:
            bias_value = values[layer.bias]
            bias = const_array(bias_value)
            if node.op_type == "Gemm":
                delta = delta / float(node.attributes["beta"].value) if "beta" in node.attributes else delta
            set_initializer(model.graph, bias_value, (bias.astype(np.float64) + delta).astype(bias.dtype))
            return True
        if node.op_type == "MatMul":
            return False  # no bias operand to correct; the report says bias_corrected = False
        if node.op_type == "Gemm" and "beta" in node.attributes and float(node.attributes["beta"].value) != 1.0:
            return False
        bias_value = add_initializer(model.graph, f"{node.name}_gpfq_bias", delta.astype(np.float32))
        while len(node.inputs) < 3:
            node.resize_inputs(len(node.inputs) + 1)
        node.replace_input_with(2, bias_value)
        ann.set(node, dataclasses.replace(layer, bias=bias_value.name))
        weight_fmt = ann.get(values[layer.weight], ann.FixedPoint)
        act_fmt = ann.get(values[layer.activation_input], ann.FixedPoint)
        if weight_fmt is not None and act_fmt is not None:
            ann.set(bias_value, accumulator_format(act_fmt, weight_fmt, layer.weight_shape[layer.channel_axis]))
        return True

    # ------------------------------------------------------------------ summary

    def _summary(
        self, model: ir.Model, float_model: ir.Model, calibration: _Calibration, quantize_activations: bool,
        skipped: list[tuple[str, str]], zero_before: float, layers: list[tuple[ir.Node, ann.QuantizableLayer]],
    ) -> ann.GPFQSummary:
        """Output-level comparison with round-to-nearest on the same grids, over the calibration
        samples the layers read (every batch of ``calibration``).

        The float and the rewritten network continue from their frontiers (only the nodes past
        the last layer's input run); the round-to-nearest copy differs everywhere and runs whole.
        """
        rtn_model = round_to_nearest_model(model)
        view, rtn_view = (lower_to_qdq(m) if quantize_activations else m for m in (model, rtn_model))
        name = logits_names(float_model)[0]
        sources = (calibration.source(calibration.float_prefix, float_model, name),
                   calibration.source(calibration.tilde_prefix, view, name),
                   calibration.source(None, rtn_view, name))
        outputs: list[list[np.ndarray]] = [[], [], []]
        for index, feed in enumerate(calibration.feeds):
            for out, source in zip(outputs, sources):
                out.append(source(index, feed))
        ref, gp, rt = (_stacked(o) for o in outputs)
        return ann.GPFQSummary(
            samples=sum(len(batch) for batch in outputs[0]),
            output_mse=float(np.mean((gp - ref) ** 2)),
            output_mse_rtn=float(np.mean((rt - ref) ** 2)),
            sqnr_db=_capped(sqnr_db(ref, gp)),
            sqnr_db_rtn=_capped(sqnr_db(ref, rt)),
            top1_agreement=top1_agreement(ref, gp),
            top1_agreement_rtn=top1_agreement(ref, rt),
            zero_fraction_float=zero_before,
            zero_fraction=_zero_fraction(model, layers),
            skipped=tuple(skipped),
        )


def _stacked(batches: list[np.ndarray]) -> np.ndarray:
    """The batches' outputs along the sample axis (float64); flattened when their shapes differ
    beyond it (feeds of different token lengths), which leaves the element-wise metrics exact
    and top-1 undefined."""
    if len({batch.shape[1:] for batch in batches}) == 1:
        return np.concatenate(batches).astype(np.float64)
    return np.concatenate([batch.reshape(-1) for batch in batches]).astype(np.float64)


def round_to_nearest_model(model: ir.Model) -> ir.Model:
    """A copy of a model GPFQ rewrote in this process, with round-to-nearest weights on the same
    grids instead (the baseline every report carries)."""
    out = model.clone()
    targets = values_by_name(out.graph)
    for name, value in values_by_name(model.graph).items():
        rtn = value.meta.get(RTN_META)
        if rtn is not None:
            set_initializer(out.graph, targets[name], rtn)
    return out


def gpfq_report(model: ir.Model) -> dict[str, object] | None:
    """The report section of a GPFQ-rewritten model: per-layer errors and the output comparison
    with round-to-nearest on the same grids; None when GPFQ did not run."""
    summary = ann.get(model, ann.GPFQSummary)
    if summary is None:
        return None
    layers = []
    for node in model.graph:
        layer = ann.get(node, ann.GPFQLayer)
        if layer is not None:
            layers.append({"name": node.name, "op": node.op_type, **dataclasses.asdict(layer)})
    out: dict[str, object] = dataclasses.asdict(summary)
    out["skipped"] = [list(item) for item in summary.skipped]
    out["layers"] = layers
    provenance = ann.get(model, ann.Provenance)
    configs = [e.get("pass", "") for e in (provenance.entries if provenance else ()) if str(e.get("pass", "")).startswith("GPFQPass(")]
    out["config"] = configs[-1] if configs else None
    return out


def _capped(value: float) -> float:
    return float(min(max(value, -SQNR_CAP_DB), SQNR_CAP_DB))


def _zero_fraction(model: ir.Model, layers: Iterable[tuple[ir.Node, ann.QuantizableLayer]]) -> float:
    """Exactly-zero weights and biases over the given layers (the seed's sparsity)."""
    values = values_by_name(model.graph)
    zeros = total = 0
    for _, layer in layers:
        for name in (layer.weight, layer.bias):
            if name is None:
                continue
            array = const_array(values[name])
            zeros += int(np.count_nonzero(array == 0))
            total += int(array.size)
    return zeros / total if total else 0.0


def _has_activation_formats(model: ir.Model) -> bool:
    """True when a target assigned fixed-point formats to activations (X̃ is then fake-quantized)."""
    return any(
        not v.is_initializer() and ann.get(v, ann.FixedPoint) is not None for v in values_by_name(model.graph).values()
    )


def _damping_value(h: np.ndarray, damping: float) -> float:
    """``λ = damping·mean(diag H)``: ``H + λI`` and ``G + λI`` are the products of the data augmented
    by ``√λ·I`` rows in both ``X`` and ``X̃``, so GPFQ also weighs ``λ‖W − Q‖²``."""
    return damping * float(np.mean(np.diag(h))) if damping else 0.0


@dataclasses.dataclass
class _Calibration:
    """The calibration batches and the incremental prefixes (or none) that give each layer its
    ``X`` (float network) and ``X̃`` (quantized network)."""

    feeds: list[Mapping[str, np.ndarray]]
    float_prefix: IncrementalPrefix | None = None
    tilde_prefix: IncrementalPrefix | None = None

    @property
    def incremental(self) -> bool:
        """Every request must run every batch (the frontiers are kept per batch)."""
        return self.float_prefix is not None

    @staticmethod
    def source(
        prefix: IncrementalPrefix | None, model: ir.Model, name: str
    ) -> Callable[[int, Mapping[str, np.ndarray]], np.ndarray]:
        """``(batch index, feed) -> value of name``: from the frontier, or the whole prefix."""
        if prefix is not None:
            return prefix.request(model, name)
        runner = PrefixRunner(model, name)
        return lambda index, feed: runner.run(feed)


def _cut_at(
    feeds: list[Mapping[str, np.ndarray]], limits: Sequence[int], everything: bool
) -> list[Mapping[str, np.ndarray]]:
    """The batches split so that one ends at every sample limit, and none starts past the largest
    limit unless some layer reads ``everything``: a layer then reads whole batches only."""
    ends = sorted(set(limits))
    last = None if everything or not ends else ends[-1]
    out: list[Mapping[str, np.ndarray]] = []
    seen = 0
    for feed in feeds:
        size = len(next(iter(feed.values())))
        start = 0
        for end in [e - seen for e in ends if seen < e < seen + size] + [size]:
            if last is not None and seen + start >= last:
                break
            out.append(feed if (start, end) == (0, size) else {k: v[start:end] for k, v in feed.items()})
            start = end
        seen += size
        if last is not None and seen >= last:
            break
    return out


def _input_of(model: ir.Model, node_name: str) -> str:
    """The name of a node's activation input in ``model`` (node names survive the QDQ lowering)."""
    for node in model.graph:
        if node.name == node_name:
            return node.inputs[0].name
    raise UnsupportedModelError(f"GPFQ: node {node_name!r} disappeared from the quantized view")


def _rewritten_upstream(model: ir.Model, name: str) -> bool:
    """Whether any GPFQ-rewritten layer feeds value ``name`` (else ``X̃ = X``)."""
    values = values_by_name(model.graph)
    stack, seen = [values[name]], set()
    while stack:
        value = stack.pop()
        producer = value.producer()
        if producer is None or id(producer) in seen:
            continue
        seen.add(id(producer))
        if ann.get(producer, ann.GPFQLayer) is not None:
            return True
        stack.extend(v for v in producer.inputs if v is not None)
    return False
