"""Accuracy-aware allocation: the smallest budget whose accuracy loss stays within ``max_loss``.

algorithms.md §5.4 item 4: bisection on the average bit budget, each probe one allocation
(:class:`~qcompiler.passes.allocate_bits.AllocateBitsPass`) plus **one** accuracy evaluation
of the emitted model on held-out data, through a user metric callback. Returns the smallest
probed budget whose loss is at most ``max_loss`` (the search log goes into the model's
:class:`~qcompiler.annotations.AccuracySearch` annotation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import onnx_ir as ir

from qcompiler import annotations as ann
from qcompiler.allocation import AllocationError
from qcompiler.errors import QCompilerError
from qcompiler.graph import values_by_name
from qcompiler.passes.allocate_bits import AllocateBitsPass

#: accuracy(model with BitWidth annotations) -> top-1 (or any higher-is-better metric)
Metric = Callable[[ir.Model], float]


@dataclasses.dataclass(frozen=True)
class MaxLossAllocatePass(ir.passes.InPlacePass):
    """Bisect the budget of :class:`AllocateBitsPass` against a metric.

    Attributes:
        metric: accuracy of an allocated model (emits and evaluates it; higher is better).
        reference: the float model's metric.
        max_loss: the allowed drop ``reference − metric`` (e.g. 0.01 for one top-1 point).
        allocate: the allocation to bisect (its ``avg_bits`` is replaced at each probe).
        probes: at most this many metric evaluations.
    """

    metric: Metric = dataclasses.field(repr=False, compare=False)
    reference: float = 1.0
    max_loss: float = 0.01
    allocate: AllocateBitsPass = AllocateBitsPass(avg_bits=8.0)
    probes: int = 8

    def _bounds(self, model: ir.Model) -> tuple[float, float]:
        profiles = [p for v in values_by_name(model.graph).values() if (p := ann.get(v, ann.ErrorProfile))]
        scoped = [p for p in profiles if p.tensor_kind == "weight" or self.allocate.scope == "all"]
        elements = sum(p.elements for p in scoped)
        legal = [self.allocate.legal_indices(p) for p in scoped]
        rates = [self.allocate.rates_of(p) for p in scoped]  # the allocation's rate model, as it counts the budget
        low = sum(min(r[i] for i in idx) for r, idx in zip(rates, legal)) / elements
        high = sum(max(r[i] for i in idx) for r, idx in zip(rates, legal)) / elements
        return low, high

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        low, high = self._bounds(model)
        log: list[tuple[float, float]] = []

        def loss_at(avg: float) -> float:
            trial = model.clone()
            dataclasses.replace(self.allocate, avg_bits=avg, total_bytes=None)(trial)
            loss = self.reference - self.metric(trial)
            log.append((avg, loss))
            return loss

        if loss_at(high) > self.max_loss:
            raise QCompilerError(
                f"max-loss {self.max_loss:g} cannot be met: even the largest legal widths ({high:g} bits per "
                f"element) lose {log[-1][1]:g}"
            )
        best = high
        lo, hi = low, high
        for _ in range(self.probes - 1):
            mid = (lo + hi) / 2.0
            try:
                feasible = loss_at(mid) <= self.max_loss
            except AllocationError:
                feasible = False
            if feasible:
                best, hi = mid, mid
            else:
                lo = mid
            if hi - lo < 1e-3:
                break
        dataclasses.replace(self.allocate, avg_bits=best, total_bytes=None)(model)
        ann.set(model, ann.AccuracySearch(max_loss=self.max_loss, reference=self.reference, chosen_avg_bits=best,
                                          probes=tuple(log)))
        return ir.passes.PassResult(model, True)
