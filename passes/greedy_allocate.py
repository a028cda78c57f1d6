"""Seed 002's greedy word-length search as a pass: ``--allocator greedy --max-loss L``.

Starts from seed 002's initial word lengths (``int_bits(max|w|) + 6``, capped to the target's
largest legal width), runs :func:`qcompiler.wl_search.greedy_wl_search` with a metric that
annotates a clone with the candidate word lengths and evaluates it (the target's passes choose
the fractional lengths), and writes :class:`~qcompiler.annotations.BitWidth` annotations.

With ``tune`` (a configured :class:`~passes.finetune.FineTunePass`, e.g. one short epoch), a
word-length cut that overshoots ``max_loss`` is retrained before it is undone: seed 002's
``tune_model``. From the float (shadow) weights, up to ``tune_trials`` times: fine-tune at the
new word lengths (weights written back on their grids), measure; on success the retrained
weights become the model's weights and the search continues from them (projected training).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import onnx_ir as ir

from qcompiler import annotations as ann
from qcompiler.fl_search import initial_wl_seed002
from qcompiler.graph import const_array, set_initializer, values_by_name
from qcompiler.passes.detect_layers import quantizable_nodes
from qcompiler.passes.max_loss_allocate import Metric
from qcompiler.wl_search import greedy_wl_search


def _annotate(model: ir.Model, word_lengths: dict[str, int], elements: dict[str, int]) -> None:
    values = values_by_name(model.graph)
    for name, wl in word_lengths.items():
        ann.set(values[name], ann.BitWidth(candidate=f"fixed:{wl}", kind="fixed", bits=wl,
                                           rate=float(wl * elements[name]), distortion=0.0, method="greedy"))


@dataclasses.dataclass(frozen=True)
class GreedyAllocatePass(ir.passes.InPlacePass):
    """Greedy WL search on weights (phases A and B) under an accuracy-loss limit.

    Attributes:
        metric: accuracy of an annotated model (higher is better).
        reference: unused by the search (it measures the starting point itself); recorded.
        max_loss: allowed drop from the starting accuracy.
        target_compression: stop once seed 002's compression rate reaches this.
        legal_bits: the target's legal weight widths (the search stays within min..max).
        tune: retraining between word-length cuts (a configured FineTunePass), or None.
        prepare: annotates a trial for the target (its passes) before ``tune`` trains it.
        tune_trials: retraining attempts per overshooting cut.
    """

    metric: Metric = dataclasses.field(repr=False, compare=False)
    reference: float = 1.0
    max_loss: float = 0.01
    target_compression: float = 0.1
    legal_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    tune: ir.passes.PassBase | None = None
    prepare: Callable[[ir.Model], None] | None = dataclasses.field(default=None, repr=False, compare=False)
    tune_trials: int = 10

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        values = values_by_name(model.graph)
        elements, initial = {}, {}
        top = max(b for b in self.legal_bits if b <= 8) if any(b <= 8 for b in self.legal_bits) else max(self.legal_bits)
        for _, layer in quantizable_nodes(model):
            w = const_array(values[layer.weight])
            elements[layer.weight] = int(w.size)
            initial[layer.weight] = min(initial_wl_seed002(float(abs(w).max())), top)

        def accuracy(word_lengths: dict[str, int]) -> float:
            trial = model.clone()
            _annotate(trial, dict(word_lengths), elements)
            return self.metric(trial)

        tune = self._tuner(model, elements) if self.tune is not None else None
        result = greedy_wl_search(elements, initial, accuracy, self.max_loss, self.target_compression,
                                  min_wl=min(self.legal_bits), tune=tune)
        ann.set(model, ann.WordLengthSearchLog(
            steps=tuple({"phase": phase, "tensor": tensor, "loss": round(loss, 6), "compression": round(c, 6)}
                        for phase, tensor, loss, c in result.log),
            evaluations=result.evaluations))
        _annotate(model, dict(result.word_lengths), elements)
        used = float(sum(result.word_lengths[n] * elements[n] for n in elements))
        ann.set(model, ann.AllocationSummary(method="greedy", rate_model="fixed", scope="weights", budget_bits=used,
                                             used_bits=used, elements=sum(elements.values()),
                                             predicted_distortion=result.loss))
        return ir.passes.PassResult(model, True)

    def _tuner(self, model: ir.Model, elements: Mapping[str, int]) -> Callable[[Mapping[str, int], float], bool]:
        """Seed 002's ``tune_model`` on this model (the float shadow weights)."""
        trainable = [n for _, layer in quantizable_nodes(model) for n in (layer.weight, layer.bias) if n]

        def tune(word_lengths: Mapping[str, int], min_accuracy: float) -> bool:
            trial = model.clone()
            _annotate(trial, dict(word_lengths), elements)
            if self.prepare is not None:
                self.prepare(trial)
            for _ in range(self.tune_trials):
                self.tune(trial)  # weights are written back on their grids: later trials continue from them
                if self.metric(trial.clone()) >= min_accuracy:
                    source, target = values_by_name(trial.graph), values_by_name(model.graph)
                    for name in trainable:
                        set_initializer(model.graph, target[name], const_array(source[name]))
                    return True
            return False

        return tune
