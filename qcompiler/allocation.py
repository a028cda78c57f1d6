"""Bit-allocation solvers (algorithms.md §2.5): one candidate per tensor, minimise Σ D s.t. Σ R ≤ B.

A problem is a list of curves, one per tensor; each curve holds candidate points (rate, distortion).

- :func:`lagrangian_faithful` (a): seed 000's slope bisection in float32, returning the selection
  at the last midpoint, feasible or not (Q000-1); it stops when the float32 interval stops
  shrinking instead of looping forever (Q000-2).
- :func:`lagrangian` (b): float64, at most 200 iterations, returns the best feasible iterate.
- :func:`hull_greedy` (c): lower convex hulls and a heap of segment slopes; ``fill`` spends the
  leftover budget with single-tensor moves.
- :func:`knapsack` (d): the exact multiple-choice knapsack DP on a rate grid ``u``; rates are
  rounded up, so it is never over budget, and exact when ``u`` divides every rate.
- :func:`water_filling` (e): the closed-form high-rate allocation of real-valued bit widths.
- :func:`allocate`: the better of (d) and (b), so never worse than the Lagrangian.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Sequence
from functools import reduce

import numba
import numpy as np

from qcompiler.errors import QCompilerError


class AllocationError(QCompilerError):
    """The problem has no solution (impossible budget, empty candidate set, bad values)."""


@dataclasses.dataclass(frozen=True)
class Curve:
    """The candidates of one tensor: parallel arrays of rates (bits) and distortions."""

    rates: tuple[float, ...]
    distortions: tuple[float, ...]
    name: str = ""

    def __post_init__(self) -> None:
        if not self.rates:
            raise AllocationError(f"tensor {self.name!r} has an empty candidate set")
        if len(self.rates) != len(self.distortions):
            raise AllocationError(f"tensor {self.name!r}: {len(self.rates)} rates for {len(self.distortions)} distortions")
        if not all(math.isfinite(v) and v >= 0 for v in (*self.rates, *self.distortions)):
            raise AllocationError(f"tensor {self.name!r}: rates and distortions must be finite and >= 0")


@dataclasses.dataclass(frozen=True)
class Allocation:
    """A selection: one candidate index per tensor, with its totals."""

    choice: tuple[int, ...]
    rate: float
    distortion: float
    method: str


def _totals(curves: Sequence[Curve], choice: Sequence[int], method: str) -> Allocation:
    rate = float(sum(c.rates[i] for c, i in zip(curves, choice)))
    dist = float(sum(c.distortions[i] for c, i in zip(curves, choice)))
    return Allocation(tuple(int(i) for i in choice), rate, dist, method)


def check_budget(curves: Sequence[Curve], budget: float) -> None:
    """Raise :class:`AllocationError` when even the smallest rates exceed the budget."""
    if not curves:
        raise AllocationError("no tensors to allocate")
    least = sum(min(c.rates) for c in curves)
    if least > budget:
        raise AllocationError(f"impossible budget: the smallest candidates need {least:g} bits, the budget is {budget:g}")


def _select(curves: Sequence[Curve], slope: float, dtype: type = np.float64) -> list[int]:
    """For each tensor the first argmin of D − slope·R (a hull vertex touched by that slope)."""
    out = []
    for c in curves:
        r = np.asarray(c.rates, dtype=dtype)
        d = np.asarray(c.distortions, dtype=dtype)
        out.append(int(np.argmin(d - dtype(slope) * r)))
    return out


def _slope_bound(curves: Sequence[Curve]) -> float:
    """A slope so negative that every tensor picks its least rate."""
    bound = 1.0
    for c in curves:
        r = np.asarray(c.rates)
        steps = np.diff(np.unique(r))
        if steps.size:
            bound = max(bound, (max(c.distortions) - min(c.distortions) + 1.0) / steps.min())
    return -2.0 * bound


def lagrangian_faithful(curves: Sequence[Curve], budget: float, eps: float = 1e-10) -> Allocation:
    """Seed 000's float32 bisection; returns the selection at its final midpoint (may exceed B)."""
    check_budget(curves, budget)
    lo, hi = np.float32(-1e8), np.float32(0.0)
    choice = _select(curves, float(lo), np.float32)
    while hi - lo >= eps:
        mid = np.float32((lo + hi) / np.float32(2))
        if mid == lo or mid == hi:  # the float32 interval cannot shrink further (Q000-2)
            break
        choice = _select(curves, float(mid), np.float32)
        if sum(c.rates[i] for c, i in zip(curves, choice)) > budget:
            hi = mid
        else:
            lo = mid
    return _totals(curves, choice, "pareto-faithful")


def lagrangian(curves: Sequence[Curve], budget: float, iterations: int = 200) -> Allocation:
    """Slope bisection in float64 keeping only feasible iterates (the fixed version, (b))."""
    check_budget(curves, budget)
    lo, hi = _slope_bound(curves), 0.0
    best = _select(curves, lo)
    top = _select(curves, hi)
    if sum(c.rates[i] for c, i in zip(curves, top)) <= budget:
        return _totals(curves, top, "pareto")
    for _ in range(iterations):
        if hi - lo <= 1e-12 * max(1.0, abs(lo)):
            break
        mid = (lo + hi) / 2.0
        choice = _select(curves, mid)
        if sum(c.rates[i] for c, i in zip(curves, choice)) > budget:
            hi = mid
        else:
            lo, best = mid, choice
    return _totals(curves, best, "pareto")


def lower_hull(rates: Sequence[float], distortions: Sequence[float]) -> list[int]:
    """Indices of the lower convex hull of the non-dominated points, by increasing rate."""
    order = sorted(range(len(rates)), key=lambda i: (rates[i], distortions[i], i))
    frontier: list[int] = []
    for i in order:  # drop dominated points: keep strictly decreasing distortion
        if not frontier or distortions[i] < distortions[frontier[-1]]:
            if frontier and rates[i] == rates[frontier[-1]]:
                continue
            frontier.append(i)
    hull: list[int] = []
    for i in frontier:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (rates[b] - rates[a]) * (distortions[i] - distortions[a]) - (distortions[b] - distortions[a]) * (rates[i] - rates[a])
            if cross <= 0:
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def hull_greedy(curves: Sequence[Curve], budget: float, fill: bool = False) -> Allocation:
    """Walk the hull segments by steepest slope while they fit (c); ``fill`` spends the rest."""
    check_budget(curves, budget)
    hulls = [lower_hull(c.rates, c.distortions) for c in curves]
    position = [0] * len(curves)
    choice = [h[0] for h in hulls]
    rate = sum(c.rates[i] for c, i in zip(curves, choice))
    heap: list[tuple[float, int]] = []

    def push(t: int) -> None:
        h, p = hulls[t], position[t]
        if p + 1 < len(h):
            a, b = h[p], h[p + 1]
            slope = (curves[t].distortions[b] - curves[t].distortions[a]) / (curves[t].rates[b] - curves[t].rates[a])
            heapq.heappush(heap, (slope, t))

    for t in range(len(curves)):
        push(t)
    while heap:
        _, t = heapq.heappop(heap)
        nxt = hulls[t][position[t] + 1]
        step = curves[t].rates[nxt] - curves[t].rates[choice[t]]
        if rate + step > budget:
            if not fill:
                break
            continue  # freeze this tensor and keep going
        position[t] += 1
        choice[t] = nxt
        rate += step
        push(t)
    if fill:
        improved = True
        while improved:  # single-tensor moves to any point, best gain per bit first
            improved, best = False, None
            for t, c in enumerate(curves):
                for i in range(len(c.rates)):
                    dr = c.rates[i] - c.rates[choice[t]]
                    dd = c.distortions[i] - c.distortions[choice[t]]
                    if dd < 0 and rate + dr <= budget:
                        score = -dd / dr if dr > 0 else math.inf
                        if best is None or score > best[0]:
                            best = (score, t, i, dr)
            if best is not None:
                _, t, i, dr = best
                choice[t] = i
                rate += dr
                improved = True
    return _totals(curves, choice, "hull-fill" if fill else "hull")


def _rate_unit(curves: Sequence[Curve], budget: float, max_cells: int) -> float:
    rates = [r for c in curves for r in c.rates]
    if all(float(r).is_integer() for r in rates) and float(budget) >= 1:
        unit = float(reduce(math.gcd, (int(r) for r in rates if r > 0), 0) or 1)
    else:
        unit = budget / max_cells
    return max(unit, budget / max_cells)


@numba.njit(cache=True, nogil=True)
def _knapsack_layer(dp: np.ndarray, weights: np.ndarray, distortions: np.ndarray, new: np.ndarray, arg: np.ndarray) -> None:
    """new[j] = min_c dp[j − w_c] + D_c (first c on ties), arg[j] = that c."""
    for j in range(dp.shape[0]):
        best, best_i = np.inf, 0
        for i in range(weights.shape[0]):
            w = weights[i]
            if w <= j:
                v = dp[j - w] + distortions[i]
                if v < best:
                    best, best_i = v, i
        new[j] = best
        arg[j] = best_i


def knapsack(curves: Sequence[Curve], budget: float, unit: float | None = None, max_cells: int = 200_000) -> Allocation:
    """Exact multiple-choice knapsack by dynamic programming on the rate grid ``unit`` (d).

    Rates are rounded up to whole units, so the result never exceeds the budget; it is exact
    when ``unit`` divides every rate (by default the gcd of integer rates, as long as the grid
    has at most ``max_cells`` cells).
    """
    check_budget(curves, budget)
    u = unit if unit is not None else _rate_unit(curves, budget, max_cells)
    cells = int(math.floor(budget / u + 1e-9))
    dp = np.full(cells + 1, np.inf)
    dp[0] = 0.0
    back = np.zeros((len(curves), cells + 1), np.int32)
    new = np.empty(cells + 1)
    # A point another one beats on rate and distortion is never in an optimum: the DP runs on each
    # curve's front only (seed 000's lists share a rate across dead-zone ratios: 730 -> <= 73).
    fronts = [undominated(c) for c in curves]
    for t, (c, front) in enumerate(zip(curves, fronts)):
        weights = np.array([int(math.ceil(c.rates[i] / u - 1e-9)) for i in front], np.int64)
        _knapsack_layer(dp, weights, np.array([c.distortions[i] for i in front], np.float64), new, back[t])
        dp, new = new, dp
    end = int(np.argmin(dp))
    if not np.isfinite(dp[end]):
        raise AllocationError(f"no selection fits the budget {budget:g} on a {u:g}-bit grid")
    choice = [0] * len(curves)
    for t in range(len(curves) - 1, -1, -1):
        i = fronts[t][int(back[t, end])]
        choice[t] = i
        end -= int(math.ceil(curves[t].rates[i] / u - 1e-9))
    return _totals(curves, choice, "knapsack")


def undominated(curve: Curve) -> list[int]:
    """Indices of the curve's points that no other point beats on both rate and distortion, in
    increasing rate (of equal points, the first)."""
    order = sorted(range(len(curve.rates)), key=lambda i: (curve.rates[i], curve.distortions[i], i))
    kept: list[int] = []
    for i in order:
        if not kept or curve.distortions[i] < curve.distortions[kept[-1]]:
            kept.append(i)
    return kept


def allocate(curves: Sequence[Curve], budget: float, method: str = "knapsack") -> Allocation:
    """Solve with ``method``: ``knapsack`` (the better of (d) and (b)), ``pareto``,
    ``pareto-faithful``, ``hull`` or ``hull-fill``."""
    if method == "knapsack":
        exact, lagr = knapsack(curves, budget), lagrangian(curves, budget)
        return exact if exact.distortion <= lagr.distortion else dataclasses.replace(lagr, method="knapsack")
    solvers = {
        "pareto": lagrangian,
        "pareto-faithful": lagrangian_faithful,
        "hull": lambda c, b: hull_greedy(c, b, fill=False),
        "hull-fill": lambda c, b: hull_greedy(c, b, fill=True),
    }
    if method not in solvers:
        raise AllocationError(f"unknown allocator {method!r} (known: knapsack, {', '.join(solvers)})")
    return solvers[method](curves, budget)


def water_filling(
    gains: np.ndarray, elements: np.ndarray, average_bits: float, b_min: float = 0.0, b_max: float = 32.0
) -> np.ndarray:
    """Real-valued bits ``b_t = clip(½·log2(g_t/N_t) + θ, b_min, b_max)`` with ``Σ N_t·b_t = b̄·Σ N_t`` (e).

    ``gains`` are ``g_t·c_t`` of the model ``D_t = g_t·c_t·2**(−2 b_t)``.
    """
    g, n = np.asarray(gains, np.float64), np.asarray(elements, np.float64)
    target = average_bits * n.sum()
    base = 0.5 * np.log2(np.maximum(g, 1e-300) / n)
    lo, hi = b_min - base.max() - 1.0, b_max - base.min() + 1.0
    for _ in range(200):
        theta = (lo + hi) / 2.0
        total = float(np.sum(n * np.clip(base + theta, b_min, b_max)))
        if total > target:
            hi = theta
        else:
            lo = theta
    return np.clip(base + (lo + hi) / 2.0, b_min, b_max)
