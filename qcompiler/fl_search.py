"""Fixed-point format search (seed 002 and Ristretto, algorithms.md §1.8 and §5).

- :func:`int_bits_seed002`: seed 002's integer length (binary digits of ⌊v⌋, plus 1).
- :func:`ristretto_fl`: Ristretto's max-range rule (IL = ⌈log2 max⌉ + 1 for parameters, ⌈log2 max⌉
  for activations; fl = bw − IL).
- :func:`search_fl_faithful`: seed 002's bisection over fl ∈ [−16, 16] on the mean absolute error,
  probes widened on ties (Q002-3).
- :func:`fl_table`: the recommended search: the error of every fl in [fl₀ − 3, fl₀ + 3]
  (fl₀ the no-overflow start), vectorised, argmin; MSE by default, MAE on request.
- :class:`FLCache`: fl*(tensor, wl) cached and invalidated when the tensor's values change
  (Q002-10: identical results, no repeated searches).
- :func:`compression_rate`: seed 002's Σ (wl·N) / (32·Σ N).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np

from qcompiler.quantizers import code_range, fake_quant_fixed

FL_MIN, FL_MAX = -16, 16


def int_bits_seed002(value: float) -> int:
    """Binary digits of ⌊|v|⌋ plus one: 0.7 → 2, 1.0 → 2, 2.5 → 3, 128.999 → 9 (Q002-2)."""
    return len(bin(int(math.floor(abs(value))))) - 2 + 1


def initial_wl_seed002(max_abs: float, init_fl: int = 6) -> int:
    """Seed 002's initial kernel word length: int_bits(max|w|) + init_fl."""
    return int_bits_seed002(max_abs) + init_fl


def ristretto_fl(max_abs: float, bits: int, parameters: bool = True) -> int:
    """Ristretto's dynamic fixed point: fl = bw − IL with IL = ⌈log2 max⌉ (+1 for parameters)."""
    if max_abs <= 0:
        return bits - 1
    il = math.ceil(math.log2(max_abs)) + (1 if parameters else 0)
    return bits - il


def fixed_error(x: np.ndarray, wl: int, fl: int, objective: str = "mae") -> float:
    """Mean absolute (``mae``) or squared (``mse``) error of seed 002's quantizer (rne, then clip)."""
    diff = np.asarray(x, np.float64) - fake_quant_fixed(np.asarray(x, np.float64), wl, fl)
    return float(np.mean(np.abs(diff)) if objective == "mae" else np.mean(diff * diff))


def search_fl_faithful(x: np.ndarray, wl: int, objective: str = "mae") -> int:
    """Seed 002's ``FlSerachAgent.search_fl``: bisection on [−16, 16], probes widened on ties."""
    error = {}

    def e(fl: int) -> float:
        if fl not in error:
            error[fl] = fixed_error(x, wl, fl, objective)
        return error[fl]

    lo, hi = FL_MIN, FL_MAX
    mid = (lo + hi) // 2
    p, m = mid + 1, mid - 1
    while hi - lo != 1:
        if e(m) > e(p):
            lo = mid
        elif e(m) < e(p):
            hi = mid
        else:
            p, m = min(p + 1, FL_MAX), max(m - 1, FL_MIN)
            if p == FL_MAX and m == FL_MIN:
                return mid
            continue
        mid = (lo + hi) // 2
        p, m = mid + 1, mid - 1
    return lo if e(lo) < e(hi) else hi


def no_overflow_start(max_abs: float, wl: int) -> int:
    """fl₀(wl) = wl − 1 − ⌈log2 max|x|⌉ (algorithms.md §1.8)."""
    if max_abs <= 0:
        return wl - 1
    return wl - 1 - math.ceil(math.log2(max_abs))


def fl_table(x: np.ndarray, wl: int, objective: str = "mse", radius: int = 3) -> tuple[int, float]:
    """(fl*, error) over fl ∈ [fl₀ − radius, fl₀ + radius], all candidates in one vectorised pass."""
    values = np.asarray(x, np.float64).reshape(-1)
    start = no_overflow_start(float(np.abs(values).max()) if values.size else 0.0, wl)
    fls = np.arange(start - radius, start + radius + 1)
    lo, hi = code_range(wl)
    scale = np.ldexp(1.0, fls)[:, None]
    q = np.clip(np.rint(values[None, :] * scale), lo, hi) / scale
    diff = q - values[None, :]
    errors = np.mean(np.abs(diff), axis=1) if objective == "mae" else np.mean(diff * diff, axis=1)
    best = int(np.argmin(errors))  # the first (smallest fl) on ties
    return int(fls[best]), float(errors[best])


class FLCache:
    """fl*(tensor, wl) memoised by name, word length, objective and a digest of the values.

    The digest makes a changed tensor (e.g. after fine-tuning) miss instead of reusing a stale
    format, so cached results are always those of a fresh search (Q002-10).
    """

    def __init__(self, objective: str = "mse") -> None:
        self.objective = objective
        self._table: dict[tuple[str, int, str, str], tuple[int, float]] = {}
        self.misses = 0

    def lookup(self, name: str, x: np.ndarray, wl: int, objective: str | None = None) -> tuple[int, float]:
        """(fl*, error) for ``x`` at ``wl``; searched once per distinct values."""
        objective = objective or self.objective
        digest = hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest()
        key = (name, wl, objective, digest)
        if key not in self._table:
            self.misses += 1
            self._table[key] = fl_table(x, wl, objective)
        return self._table[key]


def compression_rate(word_lengths: Sequence[int], elements: Sequence[int]) -> float:
    """Seed 002's compression: Σ wl_i·N_i / (32·Σ N_i) over kernels and biases."""
    total = sum(elements)
    if total == 0:
        return 0.0
    return sum(w * n for w, n in zip(word_lengths, elements)) / (32.0 * total)
