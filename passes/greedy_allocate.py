"""Seed 002's greedy word-length search as a pass: ``--allocator greedy --max-loss L``.

Starts from seed 002's initial word lengths (``int_bits(max|w|) + 6``, capped to the target's
largest legal width), runs :func:`qcompiler.wl_search.greedy_wl_search` with a metric that
annotates a clone with the candidate word lengths and evaluates it (the target's passes choose
the fractional lengths), and writes :class:`~qcompiler.annotations.BitWidth` annotations.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from qcompiler import annotations as ann
from qcompiler.fl_search import initial_wl_seed002
from qcompiler.graph import const_array, values_by_name
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
    """

    metric: Metric = dataclasses.field(repr=False, compare=False)
    reference: float = 1.0
    max_loss: float = 0.01
    target_compression: float = 0.1
    legal_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)

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

        result = greedy_wl_search(elements, initial, accuracy, self.max_loss, self.target_compression,
                                  min_wl=min(self.legal_bits))
        _annotate(model, dict(result.word_lengths), elements)
        used = float(sum(result.word_lengths[n] * elements[n] for n in elements))
        ann.set(model, ann.AllocationSummary(method="greedy", rate_model="fixed", scope="weights", budget_bits=used,
                                             used_bits=used, elements=sum(elements.values()),
                                             predicted_distortion=result.loss))
        return ir.passes.PassResult(model, True)
