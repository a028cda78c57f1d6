"""Channel-wise interval allocation for one feature tensor (seed 001, algorithms.md §4).

A feature ``x`` (per sample ``C×H×W``) is quantized per channel with ``n_c`` intervals over the
sample's global range ``[mn, mx]`` and the rest of the network (the suffix) runs on it. ``D_c(n)``
is the logit MSE when only channel ``c`` is quantized with ``n`` intervals.

- :func:`offline_table`: the seed's greedy table (flag 0): starting from ``n_c = 1``, one interval
  at a time goes to the channel with the largest current distortion (minimax, Q001-4); the state
  at ``Σ n = C·(2**b − 1)`` is the row of bit width ``b``. Only the changed channel's distortion
  is recomputed, and all images advance together in one batched suffix call per step
  (Q001-9 fixed; same table as the naive loop).
- :func:`online_allocation`: the seed's flag 1: the table's column sums scaled to the budget (in
  the seed's float64 operation order, Q001-6), a mean/spread score for the remainder, then
  ``reserve`` iterative steps on measured distortions.
- :func:`closed_form_allocation`: the recommended version: ``D_c(n) ≈ w_c·(mx − mn)²/(12 n²)``
  with ``w_c`` from one probe per channel; ``n_c ∝ w_c^(1/3)`` for an interval budget or
  ``n_c ∝ √w_c`` for a bit budget, then integer repair by greedy marginal gains.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Callable

import numpy as np

Backend = Callable[[np.ndarray], np.ndarray]
BITS = (2, 3, 4, 5, 6, 7)


# --------------------------------------------------------------------------- quantizers


def _range(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample global max and min over all channels, shaped to broadcast over (N, C, ...)."""
    axes = tuple(range(1, x.ndim))
    shape = (-1,) + (1,) * (x.ndim - 1)
    return x.max(axis=axes).reshape(shape), x.min(axis=axes).reshape(shape)


def _per_channel(n: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Interval counts (C,) or (N, C) shaped to broadcast over x (N, C, ...)."""
    n = np.asarray(n, dtype=np.float32)
    if n.ndim == 1:
        n = n[None, :]
    return n.reshape(n.shape + (1,) * (x.ndim - 2))


def uniform_intervals(x: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Seed 001 "uniform": ``x̂_c = rne((x_c − mn)/(mx − mn)·n_c)·(mx − mn)/n_c + mn`` (float32)."""
    x = x.astype(np.float32, copy=False)
    mx, mn = _range(x)
    span = (mx - mn).astype(np.float32)
    nc = _per_channel(n, x)
    safe = np.where(span > 0, span, np.float32(1))
    q = np.rint((x - mn) / safe * nc)
    out = q * (safe / nc) + mn
    return np.where(span > 0, out, x).astype(np.float32)


def log_intervals(x: np.ndarray, n: np.ndarray, faithful: bool = False) -> np.ndarray:
    """Seed 001 "log"; ``faithful`` uses ln for the range and log2 for the data (Q001-1)."""
    x = x.astype(np.float32, copy=False)
    mx, mn = _range(x)
    nc = _per_channel(n, x)
    m = np.log(mx - mn + 1) if faithful else np.log2(mx - mn + 1)
    safe = np.where(m > 0, m, np.float32(1))
    q = np.rint(np.log2(x - mn + 1) / safe * nc)
    out = np.exp2(q * safe / nc) + mn - 1
    return np.where(m > 0, out, x).astype(np.float32)


def dorefa_seed(x: np.ndarray, bits: int, clip: float = 0.9) -> np.ndarray:
    """Seed 001's DoReFa baseline: ``rne(clip(x, 0, 0.9)·(2**b − 1))/(2**b − 1)`` (Q001-2)."""
    levels = (1 << bits) - 1
    return (np.rint(np.clip(x, 0, clip) * levels) / levels).astype(np.float32)


QUANTIZERS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "uniform": uniform_intervals,
    "log": lambda x, n: log_intervals(x, n, faithful=False),
    "log_faithful": lambda x, n: log_intervals(x, n, faithful=True),
}


# --------------------------------------------------------------------------- distortions


def _logit_mse(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per-sample mean squared difference (float64)."""
    d = out.astype(np.float64) - ref.astype(np.float64)
    return (d * d).reshape(d.shape[0], -1).mean(axis=1)


def single_channel_distortion(
    backend: Backend, quantize: Callable, x: np.ndarray, ref: np.ndarray, channel: np.ndarray, n: np.ndarray
) -> np.ndarray:
    """``D`` per sample when only ``channel[s]`` of sample ``s`` is quantized with ``n[s]`` intervals.

    The quantized channel uses the sample's global range, so each variant is one sample of a batch.
    """
    s = np.arange(x.shape[0])
    counts = np.ones((x.shape[0], x.shape[1]), np.float32)
    counts[s, channel] = n
    quantized = quantize(x, counts)
    variant = x.copy()
    variant[s, channel] = quantized[s, channel]
    return _logit_mse(backend(variant), ref)


def all_channel_distortions(backend: Backend, quantize: Callable, x: np.ndarray, ref: np.ndarray, n: np.ndarray) -> np.ndarray:
    """``D[s, c]`` for every sample and channel at the counts ``n[s, c]`` (C batched suffix calls)."""
    out = np.empty(n.shape)
    for c in range(x.shape[1]):
        out[:, c] = single_channel_distortion(backend, quantize, x, ref, np.full(x.shape[0], c), n[:, c])
    return out


# --------------------------------------------------------------------------- offline table


def offline_table(backend: Backend, quantizer: str, x: np.ndarray, bits: tuple[int, ...] = BITS) -> dict[int, np.ndarray]:
    """The seed's greedy interval table: ``{b: (S, C) counts}``, one row per calibration sample.

    Every row has ``Σ_c n_c = C·(2**b − 1)`` and ``n_c ≥ 1``; row ``b`` is a prefix state of row
    ``b + 1``. Ties go to the first channel (``argmax``).
    """
    quantize = QUANTIZERS[quantizer]
    samples, channels = x.shape[:2]
    ref = backend(x)
    n = np.ones((samples, channels), np.int64)
    dist = all_channel_distortions(backend, quantize, x, ref, n)
    targets = {channels * ((1 << b) - 1): b for b in bits}
    tables: dict[int, np.ndarray] = {}
    total = channels
    if total in targets:
        tables[targets[total]] = n.copy()
    rows = np.arange(samples)
    while total < max(targets):
        k = np.argmax(dist, axis=1)
        n[rows, k] += 1
        total += 1
        dist[rows, k] = single_channel_distortion(backend, quantize, x, ref, k, n[rows, k])
        if total in targets:
            tables[targets[total]] = n.copy()
    return tables


def offline_table_naive(backend: Backend, quantizer: str, x: np.ndarray, bits: tuple[int, ...] = BITS) -> dict[int, np.ndarray]:
    """The seed's loop without caching (every distortion recomputed each step), for tests."""
    quantize = QUANTIZERS[quantizer]
    channels = x.shape[1]
    tables: dict[int, list[np.ndarray]] = {b: [] for b in bits}
    targets = {channels * ((1 << b) - 1): b for b in bits}
    for s in range(x.shape[0]):
        xs = x[s : s + 1]
        ref = backend(xs)
        n = np.ones((1, channels), np.int64)
        total = channels
        if total in targets:
            tables[targets[total]].append(n[0].copy())
        while total < max(targets):
            d = all_channel_distortions(backend, quantize, xs, ref, n)
            n[0, int(np.argmax(d[0]))] += 1
            total += 1
            if total in targets:
                tables[targets[total]].append(n[0].copy())
    return {b: np.stack(rows) for b, rows in tables.items()}


# --------------------------------------------------------------------------- online allocation


def table_allocation(table_rows: np.ndarray, bits: int) -> np.ndarray:
    """``n = ⌊T/ΣT·C·(2**b − 1)⌋`` in float64, the seed's operation order (Q001-6), then clip ≥ 1."""
    t = np.floor(table_rows.sum(axis=0)).astype(np.float64)
    channels = t.size
    n = np.floor(t / t.sum() * channels * ((1 << bits) - 1)).astype(np.int64)
    return np.clip(n, 1, max(1, int(n.max())))


def priority_scores(x: np.ndarray, alpha: float, beta: float, faithful: bool = False) -> np.ndarray:
    """``α·mean_c/Σ mean + β·p_c/Σ p`` with ``p_c = exp(−cv_c/Σ cv)``, cv of ``x_c/mean_c``.

    A dead channel (mean 0) makes cv = 0/0; ``faithful`` keeps the seed's NaN (Q001-8), else
    its cv is 0 and its score comes from the mean term.
    """
    flat = x.reshape(x.shape[0], -1).astype(np.float64)
    mean = flat.mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cv = (flat / mean[:, None]).std(axis=1, ddof=1)
    if not faithful:
        cv = np.where(np.isfinite(cv), cv, 0.0)
    total_cv = cv.sum()
    p = np.exp(-cv / total_cv) if total_cv != 0 else np.ones_like(cv)
    total_mean = mean.sum()
    mean_term = mean / total_mean if total_mean != 0 else np.zeros_like(mean)
    return alpha * mean_term + beta * p / p.sum()


def online_allocation(
    backend: Backend,
    quantizer: str,
    x: np.ndarray,
    table_rows: np.ndarray,
    bits: int,
    alpha: float = 0.9,
    beta: float = 0.1,
    reserve: int = 10,
    faithful: bool = False,
) -> np.ndarray:
    """The seed's per-image allocation (flag 1) for every sample of ``x``: ``(S, C)`` counts."""
    quantize = QUANTIZERS[quantizer]
    samples, channels = x.shape[:2]
    budget = channels * ((1 << bits) - 1)
    base = table_allocation(table_rows, bits)
    n = np.tile(base, (samples, 1))
    diff = budget - int(base.sum())
    extra = max(diff - reserve, 0)
    for s in range(samples):
        order = np.argsort(-priority_scores(x[s], alpha, beta, faithful), kind="stable")
        n[s, order[:extra]] += 1
    steps = max(min(reserve, diff), 0)
    if steps:
        ref = backend(x)
        rows = np.arange(samples)
        dist = all_channel_distortions(backend, quantize, x, ref, n)
        for _ in range(steps):
            k = np.argmax(dist, axis=1)
            n[rows, k] += 1
            dist[rows, k] = single_channel_distortion(backend, quantize, x, ref, k, n[rows, k])
    return n


# --------------------------------------------------------------------------- closed form


def channel_gains(backend: Backend, quantizer: str, x: np.ndarray, probe_bits: int = 4) -> np.ndarray:
    """``w_c`` of the model ``D_c(n) = w_c·(mx − mn)²/(12 n²)`` from one probe per channel, averaged over samples."""
    quantize = QUANTIZERS[quantizer]
    n_probe = (1 << probe_bits) - 1
    ref = backend(x)
    counts = np.full((x.shape[0], x.shape[1]), n_probe, np.int64)
    d = all_channel_distortions(backend, quantize, x, ref, counts)
    mx, mn = _range(x)
    span2 = ((mx - mn).reshape(-1).astype(np.float64)) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        w = d * 12.0 * n_probe**2 / span2[:, None]
    return np.nan_to_num(w).mean(axis=0)


def closed_form_allocation(w: np.ndarray, budget: int, rule: str = "intervals", n_min: int = 1) -> np.ndarray:
    """Integer counts summing to ``budget`` that minimise ``Σ w_c/n_c²`` (``intervals``) or follow
    ``n_c ∝ √w_c`` (``bits``), repaired to integers by greedy marginal gains on the model curves.
    """
    if rule not in ("intervals", "bits"):
        raise ValueError(f"rule must be 'intervals' or 'bits', got {rule!r}")
    channels = w.size
    if budget < channels * n_min:
        raise ValueError(f"budget {budget} is below {channels} channels x {n_min}")
    w = np.maximum(np.asarray(w, dtype=np.float64), 1e-30)
    share = np.cbrt(w) if rule == "intervals" else np.sqrt(w)
    n = np.maximum(np.floor(share / share.sum() * budget), n_min).astype(np.int64)
    while n.sum() > budget:  # the floor of n_min may overshoot: take back where it costs least
        cost = w / (n - 1).clip(min=1) ** 2 - w / n**2
        cost[n <= n_min] = np.inf
        n[int(np.argmin(cost))] -= 1
    # Both rules repair on the same distortion model D_c(n) = w_c/n²; they differ in the start.
    def model(c: int, k: int) -> float:
        return w[c] / k**2

    heap = [(-(model(c, n[c]) - model(c, n[c] + 1)), c) for c in range(channels)]
    heapq.heapify(heap)
    for _ in range(budget - int(n.sum())):
        _, c = heapq.heappop(heap)
        n[c] += 1
        heapq.heappush(heap, (-(model(c, n[c]) - model(c, n[c] + 1)), c))
    return n


def channel_curves(backend: Backend, quantizer: str, x: np.ndarray, bits: tuple[int, ...] = BITS) -> np.ndarray:
    """Per-channel distortion curves: ``D_c(2**b − 1)`` averaged over samples, shape (C, len(bits))."""
    quantize = QUANTIZERS[quantizer]
    ref = backend(x)
    curves = np.empty((x.shape[1], len(bits)))
    for j, b in enumerate(bits):
        counts = np.full((x.shape[0], x.shape[1]), (1 << b) - 1, np.int64)
        curves[:, j] = all_channel_distortions(backend, quantize, x, ref, counts).mean(axis=0)
    return curves


# --------------------------------------------------------------------------- evaluation


@dataclasses.dataclass(frozen=True)
class ChannelReport:
    """Logit MSE per bit width, the way seed 001 reports it (mean over images)."""

    bits: tuple[int, ...]
    uniform: tuple[float, ...]
    allocated: tuple[float, ...]
    closed_form: tuple[float, ...]
    dorefa: tuple[float, ...]


def evaluate(
    backend: Backend,
    quantizer: str,
    x_table: np.ndarray,
    x_eval: np.ndarray,
    bits: tuple[int, ...] = BITS,
    alpha: float = 0.9,
    beta: float = 0.1,
    reserve: int = 10,
) -> tuple[ChannelReport, dict[int, np.ndarray], np.ndarray]:
    """Offline table on ``x_table``, then per-bit-width MSE on ``x_eval`` for: uniform per tensor
    (``n_c = 2**b − 1``), the seed's online allocation, the closed form, and DoReFa."""
    quantize = QUANTIZERS[quantizer]
    tables = offline_table(backend, quantizer, x_table, bits)
    gains = channel_gains(backend, quantizer, x_table)
    ref = backend(x_eval)
    channels = x_eval.shape[1]
    rows = {"uniform": [], "allocated": [], "closed_form": [], "dorefa": []}
    for b in bits:
        levels = (1 << b) - 1
        rows["uniform"].append(float(_logit_mse(backend(quantize(x_eval, np.full(channels, levels))), ref).mean()))
        n = online_allocation(backend, quantizer, x_eval, tables[b], b, alpha, beta, reserve)
        rows["allocated"].append(float(_logit_mse(backend(quantize(x_eval, n)), ref).mean()))
        closed = closed_form_allocation(gains, channels * levels, "intervals")
        rows["closed_form"].append(float(_logit_mse(backend(quantize(x_eval, closed)), ref).mean()))
        rows["dorefa"].append(float(_logit_mse(backend(dorefa_seed(x_eval, b)), ref).mean()))
    report = ChannelReport(tuple(bits), *(tuple(rows[k]) for k in ("uniform", "allocated", "closed_form", "dorefa")))
    return report, tables, gains


def log_levels_used(n: int) -> int:
    """Highest code the faithful log quantizer reaches for ``n`` intervals: rne(n/ln 2)."""
    return int(np.rint(n / math.log(2)))
