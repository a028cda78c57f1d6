"""Bit allocation: choose one profiled candidate per tensor under a size budget (seeds 000, 002).

Reads the :class:`~qcompiler.annotations.ErrorProfile` curves, keeps the target-legal
candidates (bit widths and quantizer kinds), and solves ``min Σ D s.t. Σ R ≤ B`` with one of
:mod:`qcompiler.allocation`'s solvers, or picks one uniform bit width. The budget is an average
number of bits per element (over the weights, or the weights plus one sample's activations),
a total size in bytes, or both (the tighter wins). Writes a
:class:`~qcompiler.annotations.BitWidth` on every tensor and an
:class:`~qcompiler.annotations.AllocationSummary` on the model.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from qcompiler import annotations as ann
from qcompiler.allocation import Allocation, AllocationError, Curve, allocate
from qcompiler.graph import values_by_name

METHODS = ("knapsack", "pareto", "pareto-faithful", "hull", "hull-fill", "uniform")
RATE_MODELS = ("fixed", "entropy", "log2")


@dataclasses.dataclass(frozen=True)
class AllocateBitsPass(ir.passes.InPlacePass):
    """Allocate bits across tensors from their rate-distortion curves.

    Attributes:
        avg_bits: budget in bits per element of the covered tensors, or None.
        total_bytes: budget in bytes, or None.
        scope: ``weights`` (activations keep their configured width) or ``all``.
        method: ``knapsack`` (exact MCKP, never worse than ``pareto``), ``pareto`` (equal-slope
            Lagrangian), ``pareto-faithful`` (seed 000's float32 bisection), ``hull``,
            ``hull-fill`` or ``uniform`` (the largest single bit width that fits).
        rate_model: ``fixed`` (N·b), ``entropy`` (N·H) or ``log2`` (N·log2 L, seed 000's).
        legal_bits: allowed bit widths for weights (target-legal), or None for all profiled.
        legal_activation_bits: allowed bit widths for activations, or None.
        kinds: allowed quantizer kinds.
    """

    avg_bits: float | None = None
    total_bytes: float | None = None
    scope: str = "weights"
    method: str = "knapsack"
    rate_model: str = "fixed"
    legal_bits: tuple[int, ...] | None = None
    legal_activation_bits: tuple[int, ...] | None = None
    kinds: tuple[str, ...] = ("fixed",)

    def __post_init__(self) -> None:
        if self.avg_bits is None and self.total_bytes is None:
            raise ValueError("give avg_bits or total_bytes as the budget")
        if self.avg_bits is not None and self.avg_bits <= 0 or self.total_bytes is not None and self.total_bytes <= 0:
            raise ValueError("the budget must be positive")
        if self.scope not in ("weights", "all"):
            raise ValueError(f"scope must be 'weights' or 'all', got {self.scope!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown allocator {self.method!r} (known: {', '.join(METHODS)})")
        if self.rate_model not in RATE_MODELS:
            raise ValueError(f"rate_model must be one of {', '.join(RATE_MODELS)}, got {self.rate_model!r}")

    def _profiles(self, model: ir.Model) -> list[tuple[ir.Value, ann.ErrorProfile]]:
        out = []
        for value in values_by_name(model.graph).values():
            profile = ann.get(value, ann.ErrorProfile)
            if profile is None:
                continue
            if profile.tensor_kind == "weight" or self.scope == "all":
                out.append((value, profile))
        return out

    def requires(self, model: ir.Model) -> None:
        profiles = self._profiles(model)
        if not any(p.tensor_kind == "weight" for _, p in profiles):
            raise ir.passes.PreconditionError("no weight has an ErrorProfile: run ProfileErrorPass first")

    def rates_of(self, profile: ann.ErrorProfile) -> tuple[float, ...]:
        """The profile's rates under this allocation's rate model.

        Raises:
            AllocationError: a ``log2`` allocation of a profile written without those rates.
        """
        if self.rate_model == "log2" and len(profile.rate_log2) != len(profile.candidates):
            raise AllocationError("the profile has no log2 rates (written before they existed): profile again")
        return {"fixed": profile.rate_fixed, "entropy": profile.rate_entropy, "log2": profile.rate_log2}[self.rate_model]

    def legal_indices(self, profile: ann.ErrorProfile) -> list[int]:
        """Indices of the profile's candidates this allocation may choose (kind and bit width)."""
        allowed = self.legal_bits if profile.tensor_kind == "weight" else self.legal_activation_bits
        return [
            i
            for i, (label, bits) in enumerate(zip(profile.candidates, profile.bits))
            if label.split(":")[0] in self.kinds and (allowed is None or bits in allowed)
        ]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        entries = self._profiles(model)
        curves, legal = [], []
        for value, profile in entries:
            idx = self.legal_indices(profile)
            if not idx:
                raise AllocationError(
                    f"{profile.tensor_kind} {value.name!r}: no profiled candidate is legal "
                    f"(kinds {list(self.kinds)}, bits {self.legal_bits if profile.tensor_kind == 'weight' else self.legal_activation_bits})"
                )
            rates = self.rates_of(profile)
            curves.append(Curve(tuple(rates[i] for i in idx), tuple(profile.distortion[i] for i in idx), value.name))
            legal.append(idx)
        elements = sum(p.elements for _, p in entries)
        budgets = []
        if self.avg_bits is not None:
            budgets.append(self.avg_bits * elements)
        if self.total_bytes is not None:
            budgets.append(8.0 * self.total_bytes)
        budget = min(budgets)
        result = self._uniform(entries, curves, legal, budget) if self.method == "uniform" else allocate(curves, budget, self.method)
        for (value, profile), idx, curve, choice in zip(entries, legal, curves, result.choice):
            i = idx[choice]
            label = profile.candidates[i]
            ann.set(value, ann.BitWidth(candidate=label, kind=label.split(":")[0], bits=profile.bits[i],
                                        rate=curve.rates[choice], distortion=curve.distortions[choice], method=self.method))
        ann.set(model, ann.AllocationSummary(method=self.method, rate_model=self.rate_model, scope=self.scope,
                                             budget_bits=budget, used_bits=result.rate, elements=elements,
                                             predicted_distortion=result.distortion))
        return ir.passes.PassResult(model, True)

    def _uniform(self, entries, curves: list[Curve], legal: list[list[int]], budget: float) -> Allocation:
        """The largest bit width available to every tensor whose total fits; best kind per tensor."""
        common = None
        for (_, profile), idx in zip(entries, legal):
            widths = {profile.bits[i] for i in idx}
            common = widths if common is None else common & widths
        for bits in sorted(common or (), reverse=True):
            choice = []
            for (_, profile), idx, curve in zip(entries, legal, curves):
                options = [k for k, i in enumerate(idx) if profile.bits[i] == bits]
                choice.append(min(options, key=lambda k: curve.distortions[k]))
            rate = sum(c.rates[k] for c, k in zip(curves, choice))
            if rate <= budget:
                return Allocation(tuple(choice), rate, sum(c.distortions[k] for c, k in zip(curves, choice)), "uniform")
        raise AllocationError(f"impossible budget: no single bit width fits {budget:g} bits for every tensor")
