"""Measure an allocation jointly: every allocated tensor quantized at once (algorithms.md §2.4).

The allocators add the distortions of the tensors' curves, each measured with only that tensor
quantized (the additive model). This pass quantizes every allocated weight and activation with
its chosen candidate at the same time, runs the model over the calibration data in
onnxruntime and records the logit MSE against float next to the prediction: their ratio, the
*additivity ratio*, says how far the sum of single-tensor distortions is from the joint one.

The candidates are fitted exactly as :class:`~qcompiler.passes.profile_errors.ProfileErrorPass`
fits them (the same weights, reservoir samples and clips), so the numbers are comparable.
Quantized weights replace the initializers of a copy of the model; quantized activations are
values the model is cut at: the copy runs in segments, each from the graph inputs and the
quantized activations before it to the next allocated activation, the last to the logits.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import onnx_ir as ir

from qcompiler import annotations as ann
from qcompiler.candidates import Fitted, apply, parse_candidate
from qcompiler.data import ArrayDataset, iter_feeds, load_dataset
from qcompiler.errors import DataError
from qcompiler.graph import const_array, set_initializer, values_by_name
from qcompiler.passes.detect_layers import quantizable_nodes
from qcompiler.passes.profile_errors import activation_sample, fit_activation, fit_weight
from qcompiler.prefixes import segment_model
from qcompiler.runtime import Runner
from qcompiler.suffix import logits_names


@dataclasses.dataclass(frozen=True)
class MeasureAllocationPass(ir.passes.InPlacePass):
    """Record the measured joint distortion of the allocation on its :class:`AllocationSummary`.

    Attributes:
        data: calibration data (an :class:`ArrayDataset` or an iterable of feed dicts): the
            data the curves were measured on, so that prediction and measurement compare.
        batch_size: batch size used with an :class:`ArrayDataset`.
    """

    data: ArrayDataset | Iterable[Mapping[str, np.ndarray]] = dataclasses.field(repr=False, compare=False)
    batch_size: int = 64

    def requires(self, model: ir.Model) -> None:
        if ann.get(model, ann.AllocationSummary) is None:
            raise ir.passes.PreconditionError("no AllocationSummary: run AllocateBitsPass first")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if isinstance(self.data, (str, os.PathLike, Mapping)):
            return dataclasses.replace(self, data=load_dataset(self.data, model)).call(model)
        summary = ann.require(model, ann.AllocationSummary)
        measured = joint_distortion(model, self.data, self.batch_size)
        ann.set(model, dataclasses.replace(summary, measured_distortion=measured))
        return ir.passes.PassResult(model, True)


def chosen_quantizers(model: ir.Model, first: Mapping[str, np.ndarray]) -> tuple[dict[str, Fitted], dict[str, Fitted]]:
    """(weights, activations): every allocated value's chosen candidate (``BitWidth``), fitted as
    profiling fits it; activations on calibration's reservoir, else on ``first`` (one batch)."""
    layers = {layer.weight: layer for _, layer in quantizable_nodes(model)}
    values = values_by_name(model.graph)
    chosen = {n: parse_candidate(b.candidate) for n, v in values.items() if (b := ann.get(v, ann.BitWidth)) is not None}
    weights = {n: fit_weight(c, const_array(values[n]), layers[n].channel_axis)
               for n, c in chosen.items() if n in layers and values[n].const_value is not None}
    names = [n for n in chosen if n not in weights]
    sample_of = Runner(model, [n for n in names if n not in first]).run(first, names) if names else {}
    activations = {n: fit_activation(chosen[n], values[n], activation_sample(values[n], sample_of[n])) for n in names}
    return weights, activations


def _in_order(model: ir.Model, names: Iterable[str]) -> list[str]:
    """Value names in the order the graph computes them (graph inputs first)."""
    position = {v.name: -1 for v in model.graph.inputs}
    for index, node in enumerate(model.graph):
        for out in node.outputs:
            position[out.name] = index
    return sorted(names, key=lambda n: (position[n], n))


class _QuantizedRunner:
    """A model with quantized weights, run in segments cut at its quantized activations."""

    def __init__(self, model: ir.Model, weights: Mapping[str, Fitted], cuts: Mapping[str, Fitted], logits: list[str]):
        clone = model.clone()
        values = values_by_name(clone.graph)
        for name, fitted in weights.items():
            w = const_array(values[name])
            set_initializer(clone.graph, values[name], apply(fitted, w).astype(w.dtype))
        self.inputs = [v.name for v in clone.graph.inputs]
        self.cuts = cuts
        self.order = _in_order(clone, cuts)
        self.segments = []
        for i, target in enumerate([*self.order, None]):
            available = [*self.inputs, *(n for n in self.order[:i] if n not in self.inputs)]
            outputs = [target] if target is not None else logits
            self.segments.append(None if target in self.inputs else Runner(segment_model(clone, available, outputs)))
        self.logits = logits

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = dict(feed)
        for name, segment in zip(self.order, self.segments):
            raw = values[name] if segment is None else segment.run(values, [name])[name]
            values[name] = apply(self.cuts[name], raw).astype(raw.dtype)
        return self.segments[-1].run(values, self.logits)


def joint_outputs(model: ir.Model, data: ArrayDataset | Iterable[Mapping[str, np.ndarray]], batch_size: int = 64,
                  quantizers: tuple[Mapping[str, Fitted], Mapping[str, Fitted]] | None = None,
                  ) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Per batch: the float logits and the logits with every allocated tensor quantized by its
    chosen candidate, by logits name.

    Args:
        model: the model with its ``BitWidth`` annotations.
        data: the data.
        batch_size: batch size used with an :class:`ArrayDataset`.
        quantizers: :func:`chosen_quantizers` when the caller has them (default: fitted here).

    Raises:
        DataError: the data is empty.
    """
    logits = logits_names(model)
    float_runner = Runner(model, [n for n in logits if n not in {v.name for v in model.graph.outputs}])
    feeds = iter(iter_feeds(data, batch_size, model))
    first = next(feeds, None)
    if first is None:
        raise DataError("allocation measurement: the data is empty")
    weights, cuts = quantizers if quantizers is not None else chosen_quantizers(model, first)
    quantized = _QuantizedRunner(model, weights, cuts, logits)
    for feed in itertools.chain([first], feeds):
        yield float_runner.run(feed, logits), quantized.run(feed)


def squared_error(reference: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray]) -> float:
    """One batch's share of the profiles' logit MSE: per sample, the mean squared difference over
    its logits; summed over samples and over the logits outputs."""
    total = 0.0
    for name, value in reference.items():
        r = value.astype(np.float64)
        total += float(((test[name].astype(np.float64) - r) ** 2).reshape(r.shape[0], -1).mean(axis=1).sum())
    return total


def joint_distortion(model: ir.Model, data: ArrayDataset | Iterable[Mapping[str, np.ndarray]], batch_size: int = 64) -> float:
    """Logit MSE against float with every allocated tensor quantized by its chosen candidate
    (averaged like the profiles': :func:`squared_error` over every batch, per sample).

    Raises:
        DataError: the data is empty.
    """
    total, samples = 0.0, 0
    for ref, got in joint_outputs(model, data, batch_size):
        total += squared_error(ref, got)
        samples += next(iter(ref.values())).shape[0]
    return total / samples
