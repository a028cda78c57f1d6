"""GPFQ: greedy path-following quantization of one layer (algorithms.md §6).

A layer has weights ``W`` (N×d, one row per output neuron), float inputs ``X`` (m×d) and
inputs ``X̃`` from the partly quantized network. GPFQ picks ``Q`` column by column so that
``X̃·Qᵀ`` follows ``X·Wᵀ``:

- :func:`gpfq_columns` is the published per-column recursion over the residual ``U`` (N×m),
  kept as the reference and the speed baseline;
- :func:`gpfq_blocked` is the d×d form: with ``H = X̃ᵀX̃`` and ``G = X̃ᵀX`` (streamed by
  :class:`GramAccumulator`), ``v_t = (Σ_{j≤t} G[t,j]·W[:,j] − Σ_{j<t} H[t,j]·Q[:,j]) / H[t,t]``,
  evaluated with lazy block updates. Both give the same levels for the same data.

A *grid* turns the column's target values ``v`` (length N) into levels. :class:`UniformGrid` is
the ONNX-representable grid (per-row scale, integer codes in ``[q_min, q_max]``);
:class:`ReferenceGrid` is the seed's 2^b+1-level alphabet (MSQ with ``rhu`` ties) and
:class:`AlphabetGrid` the paper-era non-uniform alphabet. Stochastic rounding draws one uniform
per row and column from a seeded generator in column order, so both forms draw identically.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numba
import numpy as np

from qcompiler.quantizers import MIN_SCALE

ROUNDINGS = ("nearest", "stochastic")
REGULARIZERS = (None, "L0", "L1")


class Grid(Protocol):
    """Maps target values ``v`` of column ``t`` (one per row) to quantized levels."""

    def quantize(self, v: np.ndarray, t: int) -> np.ndarray:
        """The levels chosen for ``v`` (same shape)."""
        ...


def rhu(x: np.ndarray) -> np.ndarray:
    """Round half up: ``⌊x + ½⌋`` (the reference implementation's tie rule)."""
    return np.floor(x + 0.5)


def _check_regularizer(regularizer: str | None) -> None:
    if regularizer not in REGULARIZERS:
        raise ValueError(f"regularizer must be L0 or L1, got {regularizer!r}")


class _Rounder:
    """Nearest (``rne`` or ``rhu``) or stochastic rounding with a seeded generator."""

    def __init__(self, rounding: str, seed: int, ties: str = "rne") -> None:
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
        self.stochastic = rounding == "stochastic"
        self.rng = np.random.default_rng(seed) if self.stochastic else None
        self.ties = ties

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.stochastic:
            low = np.floor(x)
            return low + (self.rng.random(x.shape) < (x - low))
        return np.rint(x) if self.ties == "rne" else rhu(x)


@dataclasses.dataclass
class UniformGrid:
    """Levels ``s_n·k`` with integer ``k`` in ``[q_min, q_max]`` and one scale per row.

    Attributes:
        scales: per-row scale (N,), or a scalar broadcast to every row.
        q_min, q_max: the integer code range.
        rounding: ``nearest`` (ties to even) or ``stochastic``.
        regularizer: None, ``L1`` (shrink |v| by ``lam`` first) or ``L0`` (0 when |v| ≤ ``lam``).
        lam: the regulariser's threshold, in weight units.
        seed: seed of the stochastic rounding.
    """

    scales: np.ndarray
    q_min: int
    q_max: int
    rounding: str = "nearest"
    regularizer: str | None = None
    lam: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.scales = np.asarray(self.scales, dtype=np.float64)
        if np.any(self.scales <= 0):
            raise ValueError("grid scales must be positive")
        _check_regularizer(self.regularizer)
        self._round = _Rounder(self.rounding, self.seed)

    def codes(self, v: np.ndarray) -> np.ndarray:
        """Integer codes (as floats) of ``v`` for this grid, rows along axis 0."""
        scales = self.scales if self.scales.ndim == 0 else self.scales.reshape((-1,) + (1,) * (v.ndim - 1))
        if self.regularizer == "L1":
            v = np.sign(v) * np.maximum(np.abs(v) - self.lam, 0.0)
        k = np.clip(self._round(v / scales), self.q_min, self.q_max)
        if self.regularizer == "L0":
            k = np.where(np.abs(v) <= self.lam, 0.0, k)
        return k

    def quantize(self, v: np.ndarray, t: int) -> np.ndarray:
        scales = self.scales if self.scales.ndim == 0 else self.scales.reshape((-1,) + (1,) * (v.ndim - 1))
        return self.codes(v) * scales


@dataclasses.dataclass
class ReferenceGrid:
    """The seed's alphabet: levels ``jδ``, ``j = −K..K`` (2^b+1 levels), MSQ with ``rhu`` ties.

    With ``regularizer="L0"`` the alphabet is ``{0} ∪ ±(λ + jδ)`` and ``δ`` must already be the
    reduced step (see :func:`reference_step`). Not storable in b bits (quirk Q004-1): for
    simulation and the faithful mode.
    """

    delta: float
    K: int
    rounding: str = "nearest"
    regularizer: str | None = None
    lam: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.delta <= 0:
            raise ValueError(
                f"the alphabet step is {self.delta:.6g} <= 0 (L0 with lambda too large for the layer's radius)"
            )
        _check_regularizer(self.regularizer)
        self._stochastic = _Rounder(self.rounding, self.seed) if self.rounding == "stochastic" else None

    def quantize(self, v: np.ndarray, t: int) -> np.ndarray:
        if self.regularizer == "L1":
            v = np.sign(v) * np.maximum(np.abs(v) - self.lam, 0.0)
        if self.regularizer == "L0":
            magnitude = self.lam + self.delta * np.minimum(np.abs(rhu((np.abs(v) - self.lam) / self.delta)), self.K)
            return np.where(np.abs(v) <= self.lam, 0.0, np.sign(v) * magnitude)
        if self._stochastic is not None:
            return np.clip(self._stochastic(v / self.delta), -self.K, self.K) * self.delta
        return np.sign(v) * self.delta * np.minimum(np.abs(rhu(v / self.delta)), self.K)


@dataclasses.dataclass
class AlphabetGrid:
    """Nearest level of a sorted alphabet (the paper-era ``C·rad·(linspace(−1, 1, 2^b) ∪ {0})``);
    a tie goes to the lower level, as ``argmin`` does."""

    levels: np.ndarray

    def __post_init__(self) -> None:
        self.levels = np.unique(np.asarray(self.levels, dtype=np.float64))

    def quantize(self, v: np.ndarray, t: int) -> np.ndarray:
        index = np.abs(v[..., None] - self.levels).argmin(axis=-1)
        return self.levels[index]


def layer_radius(w: np.ndarray, quantile: float = 1.0) -> float:
    """``rad``: the mean over rows of ``quantile(|W_n|, p)`` (the reference's step base)."""
    a = np.abs(w.reshape(w.shape[0], -1))
    per_row = a.max(axis=1) if quantile >= 1.0 else np.quantile(a, quantile, axis=1)
    return float(per_row.mean())


def reference_step(w: np.ndarray, bits: int, scalar: float, quantile: float = 1.0, l0_lambda: float | None = None) -> float:
    """``δ = (C/K)·rad`` with ``K = 2^(b−1)``; reduced to ``(C/K)·rad − λ/K`` for L0."""
    K = 1 << (bits - 1)
    delta = scalar * layer_radius(w, quantile) / K
    return delta - l0_lambda / K if l0_lambda is not None else delta


def paper_alphabet(w: np.ndarray, bits: int, scalar: float, quantile: float = 1.0) -> np.ndarray:
    """``C·rad·(linspace(−1, 1, 2^b) ∪ {0})`` (quirk Q004-11)."""
    return np.union1d(scalar * layer_radius(w, quantile) * np.linspace(-1.0, 1.0, 1 << bits), [0.0])


def channel_scales(w: np.ndarray, bits: int, scalar: float = 1.0, quantile: float = 1.0) -> np.ndarray:
    """Per-row scales ``s_n = C·quantile(|W_n|, p)/(2^(b−1) − 1)`` (rows with no weight get 1).

    At 1 bit (codes {−1, 0}) the denominator is 1.
    """
    a = np.abs(w.reshape(w.shape[0], -1)).astype(np.float64)
    per_row = a.max(axis=1) if quantile >= 1.0 else np.quantile(a, quantile, axis=1)
    scales = scalar * per_row / max((1 << (bits - 1)) - 1, 1)
    return np.where(scales > 0, np.maximum(scales, MIN_SCALE), 1.0)


def mse_channel_scales(w: np.ndarray, bits: int, steps: int = 80, lowest: float = 0.2) -> np.ndarray:
    """Per-row scales minimising the round-to-nearest squared error ``‖W_n − s·clip(rne(W_n/s))‖²``.

    Tries clip ratios ``r`` in ``[lowest, 1]`` of the row maximum (``s = r·max|W_n|/(2^(b−1) − 1)``);
    ties keep the larger ratio. GPFQ then only decides the rounding on that grid.
    """
    rows_w = w.reshape(w.shape[0], -1).astype(np.float64)
    base = channel_scales(rows_w, bits)
    q_min, q_max = code_range(bits)
    best = base.copy()
    best_error = np.full(rows_w.shape[0], np.inf)
    for ratio in np.linspace(1.0, lowest, steps):
        s = (base * ratio)[:, None]
        error = ((np.clip(np.rint(rows_w / s), q_min, q_max) * s - rows_w) ** 2).sum(axis=1)
        better = error < best_error
        best[better], best_error[better] = s[better, 0], error[better]
    return np.maximum(best, MIN_SCALE)


def code_range(bits: int, narrow: bool = False) -> tuple[int, int]:
    """Signed integer codes of a b-bit grid: ``[−2^(b−1) (+1 if narrow), 2^(b−1) − 1]``."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return (lo + 1 if narrow and bits > 1 else lo), hi


# --------------------------------------------------------------------------- the two forms


def gpfq_columns(w: np.ndarray, x: np.ndarray, x_tilde: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """The published per-column recursion (reference and baseline).

    Args:
        w: weights (N, d).
        x: float-network inputs (m, d).
        x_tilde: quantized-network inputs (m, d).
        grid: the column quantizer.

    Returns:
        ``(Q, U)``: the levels (N, d) and the final residual ``U = X·Wᵀ − X̃·Qᵀ`` transposed (N, m).
    """
    w = np.asarray(w, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    x_tilde = np.asarray(x_tilde, dtype=np.float64)
    n, d = w.shape
    u = np.zeros((n, x.shape[0]))
    q = np.zeros((n, d))
    for t in range(d):
        u += np.outer(w[:, t], x[:, t])
        norm = float(x_tilde[:, t] @ x_tilde[:, t])
        v = u @ x_tilde[:, t] / norm if norm > 0 else np.zeros(n)
        q[:, t] = grid.quantize(v, t)
        u -= np.outer(q[:, t], x_tilde[:, t])
    return q, u


@numba.njit(cache=True, nogil=True)
def _uniform_block(
    a: np.ndarray, b: np.ndarray, h: np.ndarray, scales: np.ndarray, q_min: float, q_max: float,
    regularizer: int, lam: float, q: np.ndarray,
) -> None:
    """One block of the sweep with a :class:`UniformGrid` (nearest rounding), compiled: the same
    arithmetic as the Python loop of :func:`_sweep_block`. ``a``, ``b``: the block's columns of A
    and B (N, k); ``h``: H restricted to the block and transposed (k, k), so that the updates
    after column ``i`` read ``H[i+1:, i]`` in memory order; ``q``: the block's output columns.
    ``regularizer``: 0 none, 1 L1, 2 L0.

    Rows are independent inside a block (each has its own scale, ``A`` and ``B`` row), so each
    row runs through its columns with its ``B`` row in cache; every ``B[r, j]`` receives the same
    terms in the same order as in the column-by-column loop. (Not ``parallel``: numba's threads
    and the BLAS threads of the GEMMs between blocks slow each other down, measured 2×.)"""
    n, k = a.shape
    for r in range(n):
        scale = scales[r]
        for i in range(k):
            diag = h[i, i]
            v = (a[r, i] - b[r, i]) / diag if diag > 0 else 0.0
            raw = v
            if regularizer == 1:
                raw = np.sign(v) * max(abs(v) - lam, 0.0)
            code = min(max(np.rint(raw / scale), q_min), q_max)
            if regularizer == 2 and abs(v) <= lam:
                code = 0.0
            qi = code * scale
            q[r, i] = qi
            for j in range(i + 1, k):
                b[r, j] += qi * h[i, j]


def _compiled_grid(grid: Grid) -> bool:
    return isinstance(grid, UniformGrid) and grid.rounding == "nearest"


def _sweep_block(a: np.ndarray, b: np.ndarray, h: np.ndarray, diag: np.ndarray, grid: Grid, start: int) -> np.ndarray:
    """Levels of one block of columns ``start..start+k``: ``v_t = (A[:, t] − B[:, t]) / H[t, t]``,
    with ``B`` brought up to date by rank-1 updates inside the block.

    Args:
        a: ``Σ_{j≤t} G[t, j]·W[:, j]`` (plus the residual's projection in the data form) (N, k).
        b: ``Σ_{j<start} H[t, j]·Q[:, j]`` for the block's columns (N, k); updated in place.
        h: ``H`` restricted to the block (k, k).
        diag: ``diag(H)`` of the block (k,).
        grid: the column quantizer (``t`` is the global column index).
        start: the block's first column.

    Returns:
        The block's levels (N, k).
    """
    n, k = a.shape
    out = np.zeros((n, k))
    if _compiled_grid(grid):
        scales = np.ascontiguousarray(np.broadcast_to(grid.scales, (n,)), dtype=np.float64)
        regularizer = {None: 0, "L1": 1, "L0": 2}[grid.regularizer]
        _uniform_block(np.ascontiguousarray(a), np.ascontiguousarray(b), np.ascontiguousarray(h.T), scales,
                       float(grid.q_min), float(grid.q_max), regularizer, float(grid.lam), out)
        return out
    for i in range(k):
        v = (a[:, i] - b[:, i]) / diag[i] if diag[i] > 0 else np.zeros(n)
        out[:, i] = grid.quantize(v, start + i)
        if i + 1 < k:
            b[:, i + 1 :] += np.outer(out[:, i], h[i + 1 :, i])
    return out


def _check_block(block: int) -> None:
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")


def lower_projection(w: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``A = W·tril(G)ᵀ``, i.e. ``A[:, t] = Σ_{j≤t} G[t, j]·W[:, j]``: all the sweep needs of ``G`` (N, d)."""
    return np.asarray(w, dtype=np.float64) @ np.tril(np.asarray(g, dtype=np.float64)).T


def gpfq_sweep(a: np.ndarray, h: np.ndarray, grid: Grid, block: int = 32) -> np.ndarray:
    """The d×d form's lazy blocked sweep from ``A = W·tril(G)ᵀ`` (:func:`lower_projection`) and ``H``.

    Args:
        a: ``W·tril(G)ᵀ`` (N, d).
        h: ``X̃ᵀX̃`` (d, d).
        grid: the column quantizer.
        block: columns per block (the result does not depend on it).

    Returns:
        The levels ``Q`` (N, d).
    """
    _check_block(block)
    a = np.asarray(a, dtype=np.float64)
    h = np.asarray(h, dtype=np.float64)
    n, d = a.shape
    diag = np.diag(h).copy()
    q = np.zeros((n, d))
    for start in range(0, d, block):
        end = min(start + block, d)
        # B[:, t] = Σ_{j<t} Q[:, j]·H[t, j]: the columns left of the block in one GEMM
        b = q[:, :start] @ h[start:end, :start].T if start else np.zeros((n, end - start))
        q[:, start:end] = _sweep_block(a[:, start:end], b, h[start:end, start:end], diag[start:end], grid, start)
    return q


def gpfq_blocked(w: np.ndarray, h: np.ndarray, g: np.ndarray, grid: Grid, block: int = 32) -> np.ndarray:
    """The d×d form with lazy block updates (float64): :func:`gpfq_sweep` of ``W·tril(G)ᵀ`` and ``H``.

    Args:
        w: weights (N, d).
        h: ``X̃ᵀX̃`` (d, d).
        g: ``X̃ᵀX`` (d, d).
        grid: the column quantizer.
        block: columns per block (the result does not depend on it).

    Returns:
        The levels ``Q`` (N, d).
    """
    _check_block(block)
    return gpfq_sweep(lower_projection(w, g), h, grid, block)


def gpfq_data(w: np.ndarray, x: np.ndarray, x_tilde: np.ndarray, grid: Grid, block: int = 32) -> np.ndarray:
    """The blocked recursion on the data itself: the per-column recursion with lazy residual updates.

    The residual ``U`` (N×m) is brought up to date once per block of columns by two GEMMs;
    inside a block the columns need only the block's own ``X̃ᵀX̃`` and ``X̃ᵀX`` (k×k). This costs
    ``O(N·m·d + m·d·k)`` in BLAS-3 products, against ``O(m·d²)`` for the d×d form's ``H`` and
    ``G``: it is the cheaper exact form when the layer has fewer output rows (or fewer samples)
    than columns, and it needs ``X`` and ``X̃`` in memory (``m·d``, no more than the d×d
    products when ``m ≤ d``). Same levels as :func:`gpfq_columns` and :func:`gpfq_blocked`.

    Args:
        w: weights (N, d).
        x: float-network inputs (m, d).
        x_tilde: quantized-network inputs (m, d).
        grid: the column quantizer.
        block: columns per block (the result does not depend on it).

    Returns:
        The levels ``Q`` (N, d).
    """
    _check_block(block)
    w = np.asarray(w, dtype=np.float64)
    n, d = w.shape
    m = x.shape[0]
    u = np.zeros((n, m))
    q = np.zeros((n, d))
    for start in range(0, d, block):
        end = min(start + block, d)
        k = end - start
        # The block's columns side by side, contiguous float64: Z = [X̃_b | X_b] (m, 2k)
        z = np.empty((m, 2 * k))
        z[:, :k] = x_tilde[:, start:end]
        z[:, k:] = x[:, start:end]
        products = z[:, :k].T @ z  # [X̃_bᵀX̃_b | X̃_bᵀX_b] in one GEMM
        h, g = products[:, :k], products[:, k:]
        # A[:, t] = U·X̃_t + Σ_{start≤j≤t} G[t, j]·W[:, j] (U: the residual left of the block)
        a = u @ z[:, :k] + w[:, start:end] @ np.tril(g).T
        q[:, start:end] = _sweep_block(a, np.zeros((n, k)), h, np.diag(h).copy(), grid, start)
        # U += W_b·X_bᵀ − Q_b·X̃_bᵀ in one GEMM
        u += np.concatenate([-q[:, start:end], w[:, start:end]], axis=1) @ z.T
    return q


def data_form_is_cheaper(n: int, d: int, m: int, block: int = 32) -> bool:
    """Whether :func:`gpfq_data` needs fewer flops than the d×d form for an N×d layer with m rows.

    Data form: ``U·X̃_b`` and the two residual updates (``6·N·m·d``) plus the in-block products
    (``4·m·d·k``). d×d form: ``H`` and ``G`` (``4·m·d²``) plus the sweep's ``A`` and ``B``
    products (``2·N·d²``).
    """
    return 6 * n * m * d + 4 * m * d * block < 4 * m * d * d + 2 * n * d * d


def act_order(h: np.ndarray) -> np.ndarray:
    """The column permutation by descending ``diag(H)`` (stable, so ties keep their order)."""
    return np.argsort(-np.diag(h), kind="stable")


def act_order_of_rows(x_tilde: np.ndarray) -> np.ndarray:
    """:func:`act_order` from the rows: ``diag(H)`` is the column sums of ``X̃²``."""
    return np.argsort(-np.sum(np.asarray(x_tilde, dtype=np.float64) ** 2, axis=0), kind="stable")


def output_energy(w: np.ndarray, f: np.ndarray) -> float:
    """``‖XWᵀ‖_F² = tr(W·F·Wᵀ)`` with ``F = XᵀX``."""
    w = np.asarray(w, dtype=np.float64)
    return float(np.einsum("ij,ij->", w @ f, w))


def relative_error(
    w: np.ndarray, q: np.ndarray, h: np.ndarray, g: np.ndarray, f: np.ndarray, reference: float | None = None
) -> tuple[float, float]:
    """``(‖XWᵀ − X̃Qᵀ‖_F, ‖XWᵀ − X̃Qᵀ‖_F / ‖XWᵀ‖_F)`` from the streamed d×d products.

    ``‖XWᵀ − X̃Qᵀ‖² = tr(W·F·Wᵀ) − 2·tr(Q·G·Wᵀ) + tr(Q·H·Qᵀ)`` with ``F = XᵀX``;
    ``reference`` is :func:`output_energy` when the caller has it already.
    """
    w = np.asarray(w, dtype=np.float64)
    energy = output_energy(w, f) if reference is None else reference
    return relative_error_from_projections(q, h, w @ np.asarray(g, dtype=np.float64).T, energy)


def relative_error_from_projections(q: np.ndarray, h: np.ndarray, wg: np.ndarray, energy: float) -> tuple[float, float]:
    """:func:`relative_error` from ``W·Gᵀ`` (N, d) and ``‖XWᵀ‖²`` instead of ``W``, ``G`` and ``F``:
    ``tr(Q·G·Wᵀ)`` is the sum of ``Q ∘ (W·Gᵀ)``, so the report needs nothing more of ``G`` and ``F``."""
    q = np.asarray(q, dtype=np.float64)
    err = energy - 2.0 * float(np.einsum("ij,ij->", q, wg)) + float(np.einsum("ij,ij->", q @ h, q))
    norm = float(np.sqrt(max(err, 0.0)))
    return norm, norm / np.sqrt(energy) if energy > 0 else 0.0


def relative_error_on_rows(
    w: np.ndarray, q: np.ndarray, x: np.ndarray, x_tilde: np.ndarray, reference: np.ndarray | None = None
) -> tuple[float, float]:
    """:func:`relative_error` from the rows themselves: ``‖XWᵀ − X̃Qᵀ‖_F`` and its ratio to ``‖XWᵀ‖_F``;
    ``reference`` is ``XWᵀ`` when the caller has it already."""
    if reference is None:
        reference = x @ np.asarray(w, dtype=np.float64).T
    norm = float(np.linalg.norm(reference - x_tilde @ np.asarray(q, dtype=np.float64).T))
    ref = float(np.linalg.norm(reference))
    return norm, norm / ref if ref > 0 else 0.0


#: Columns per block of the in-block products when ``G`` is streamed projected (they cost
#: ``2·m·d·block`` flops; the GEMMs against ``X·Wᵀ`` get thin below ~64).
PROJECTION_BLOCK = 64


def projection_is_cheaper(n: int, d: int, block: int = PROJECTION_BLOCK) -> bool:
    """Whether streaming ``G`` and ``F`` projected on an N×d layer's weights beats streaming them whole.

    Whole: ``G`` (``2·m·d²`` flops) and ``F`` (``m·d²``, a ``syrk``). Projected (see
    :class:`GramAccumulator`): ``X·Wᵀ`` and its products with ``X̃`` for ``A`` and for ``W·Gᵀ``
    (``6·m·d·N``) plus the in-block products (``2·m·d·block``). The projected GEMMs are thin
    (N columns) and run slower per flop than the square ones: measured, the two break even near
    ``N = d/3`` (d = 576 to 2304; bench/RESULTS.md), where the flop counts alone would put it
    near ``N = d/2``; hence ``2·d`` rather than ``3·d`` on the right.
    """
    return 6 * n + 2 * block < 2 * d


#: Rows per :meth:`GramAccumulator.update` when a pass streams a batch in parts (see
#: :func:`sample_slices`). A batch's float64 im2col rows take up to 2·k² times the memory of
#: its float32 activations (a 7×7 stem: 98×); slices of this many rows bound that whatever the
#: batch size. They are not cache-sized: in probes, fewer rows per update made the products
#: slower by up to 1.4× and the whole run no faster (bench/RESULTS.md, issue 5).
ROWS_PER_UPDATE = 16384


def sample_slices(samples: int, rows_per_sample: int, rows: int | None = None) -> list[slice]:
    """Consecutive slices of a batch's samples, each giving at most ``rows`` layer rows (but at
    least one sample).

    Args:
        samples: samples in the batch.
        rows_per_sample: layer rows per sample (output positions of a convolution, tokens of a MatMul).
        rows: wanted rows per slice (default :data:`ROWS_PER_UPDATE`).
    """
    rows = ROWS_PER_UPDATE if rows is None else rows
    step = max(1, rows // max(rows_per_sample, 1))
    return [slice(start, min(start + step, samples)) for start in range(0, samples, step)]


@dataclasses.dataclass
class GramAccumulator:
    """Streamed ``H = X̃ᵀX̃``, ``G = X̃ᵀX``, ``F = XᵀX`` and column sums, float64, O(d²) memory.

    With ``keep_rows`` the rows themselves are kept instead while there are at most that many
    (per group): :func:`gpfq_data` can then run on them, which is cheaper than the d×d form when
    a layer has few rows. Past the limit they are folded into the products and dropped, so
    memory stays ``O(d²)`` when ``keep_rows ≤ d``. The products are computed from kept rows on
    first access.

    With ``project``, ``G`` and ``F`` are never formed: the sweep needs only
    ``A = W·tril(G)ᵀ`` and the error report only ``W·Gᵀ`` and ``‖XWᵀ‖²``, and all three are
    sums over rows, streamed as ``O(N·d)`` products of each batch with ``P = X·Wᵀ``.
    Column block by block, ``A[:, b] += Pᵀ_{<b}·X̃_b + W_b·tril(X̃_bᵀX_b)ᵀ`` with ``P_{<b}`` the
    part of ``P`` from the columns left of ``b``. That is ``6·m·d·N + 2·m·d·block`` flops
    instead of ``3·m·d²`` (see :func:`projection_is_cheaper`); the values equal the projections
    of the whole ``G`` and ``F`` up to float64 rounding.

    Args:
        d: columns per group.
        groups: independent groups (grouped convolutions), each with its own products.
        matched: ``X̃`` is ``X`` for every batch (only ``H`` is kept; ``G = F = H``).
        with_f: also stream ``F = XᵀX`` (with ``project``: ``W·Gᵀ`` and ``‖XWᵀ‖²``), needed
            only to report ``‖XWᵀ − X̃Qᵀ‖``.
        keep_rows: keep up to this many rows per group (0: stream the products from the start).
        weights: the layer's weights per group (groups, N, d), for :meth:`lower_projection`
            and :meth:`report_terms`.
        project: keep ``G`` and ``F`` only as their projections on ``weights`` (ignored when
            ``matched``: ``G = H`` costs nothing).
    """

    d: int
    groups: int = 1
    matched: bool = False
    with_f: bool = True
    keep_rows: int = 0
    weights: np.ndarray | None = dataclasses.field(default=None, repr=False)
    project: bool = False

    def __post_init__(self) -> None:
        if self.weights is not None:
            self.weights = np.asarray(self.weights, dtype=np.float64)
            if self.weights.ndim != 3 or self.weights.shape[0] != self.groups or self.weights.shape[2] != self.d:
                raise ValueError(f"weights must be (groups, N, d) = ({self.groups}, N, {self.d}), got {self.weights.shape}")
        elif self.project:
            raise ValueError("project needs the layer's weights")
        self._projecting = self.project and not self.matched
        self._h: np.ndarray | None = None
        self._g: np.ndarray | None = None
        self._f: np.ndarray | None = None
        self._kept: list[tuple[np.ndarray, np.ndarray]] | None = [] if self.keep_rows > 0 else None
        if self._kept is None:
            self._start_products()
        self.sum_x = np.zeros((self.groups, self.d))
        self.sum_x_tilde = self.sum_x if self.matched else np.zeros((self.groups, self.d))
        self.rows = 0

    def _start_products(self) -> None:
        shape = (self.groups, self.d, self.d)
        self._h = np.zeros(shape)
        if self._projecting:
            projected = (self.groups, self.weights.shape[1], self.d)
            self._a = np.zeros(projected)
            self._wg = np.zeros(projected) if self.with_f else None
            self._energy = np.zeros(self.groups)
            return
        self._g = self._h if self.matched else np.zeros(shape)
        self._f = self._h if self.matched else (np.zeros(shape) if self.with_f else None)

    def update(self, x: np.ndarray, x_tilde: np.ndarray | None = None) -> None:
        """Add a batch of rows: ``x`` and ``x_tilde`` are (groups, m_b, d)."""
        x = np.asarray(x, dtype=np.float64)
        if self.matched or x_tilde is None:
            if not self.matched:
                raise ValueError("x_tilde is required unless the accumulator is matched")
            x_tilde = x
        else:
            x_tilde = np.asarray(x_tilde, dtype=np.float64)
        for k in range(self.groups):
            self.sum_x[k] += x[k].sum(axis=0)
            if not self.matched:
                self.sum_x_tilde[k] += x_tilde[k].sum(axis=0)
        self.rows += x.shape[1]
        if self._kept is not None:
            if self.rows <= self.keep_rows:
                self._kept.append((x, x_tilde))  # by reference: see keeps
                return
            self._fold_kept_rows()  # too many rows to keep: the products from here on
        self._add_products(x, x_tilde)

    def keeps(self, rows: int) -> bool:
        """Whether an :meth:`update` with ``rows`` rows would keep its arrays (by reference, for
        the data form): such rows must not be overwritten afterwards (no :class:`RowBuffer`)."""
        return self._kept is not None and self.rows + rows <= self.keep_rows

    def _add_products(self, x: np.ndarray, x_tilde: np.ndarray) -> None:
        for k in range(self.groups):
            xt = x_tilde[k]
            self._h[k] += xt.T @ xt
            if self._projecting:
                self._add_projections(k, x[k], xt)
            elif not self.matched:
                self._g[k] += xt.T @ x[k]
                if self._f is not None:
                    self._f[k] += x[k].T @ x[k]

    def _add_projections(self, k: int, x: np.ndarray, x_tilde: np.ndarray) -> None:
        """One batch's share of ``A = W·tril(G)ᵀ``, ``W·Gᵀ`` and ``‖XWᵀ‖²`` for group ``k``."""
        w, a = self.weights[k], self._a[k]
        p = np.zeros((x.shape[0], w.shape[0]))  # X·Wᵀ over the columns done so far
        for start in range(0, self.d, PROJECTION_BLOCK):
            end = min(start + PROJECTION_BLOCK, self.d)
            x_b, xt_b, w_b = x[:, start:end], x_tilde[:, start:end], w[:, start:end]
            if start:
                a[:, start:end] += p.T @ xt_b
            a[:, start:end] += w_b @ np.tril(xt_b.T @ x_b).T
            p += x_b @ w_b.T
        if self._wg is not None:
            self._wg[k] += p.T @ x_tilde
            self._energy[k] += float(np.vdot(p, p))

    def _fold_kept_rows(self) -> None:
        kept, self._kept = self._kept, None
        self._start_products()
        for x, x_tilde in kept:
            self._add_products(x, x_tilde)

    def kept_rows(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(X, X̃)`` as (groups, m, d) when every row was kept, else None."""
        if self._kept is None or not self._kept:
            return None
        x = np.concatenate([b[0] for b in self._kept], axis=1)
        x_tilde = x if self.matched else np.concatenate([b[1] for b in self._kept], axis=1)
        return x, x_tilde

    def _products(self) -> None:
        if self._kept is not None:
            self._fold_kept_rows()

    def _whole(self) -> None:
        self._products()
        if self._projecting:
            raise AttributeError("G and F are kept only as projections on the weights (project=True)")

    @property
    def h(self) -> np.ndarray:
        """``X̃ᵀX̃`` per group (groups, d, d)."""
        self._products()
        return self._h

    @property
    def g(self) -> np.ndarray:
        """``X̃ᵀX`` per group (groups, d, d)."""
        self._whole()
        return self._g

    @property
    def f(self) -> np.ndarray | None:
        """``XᵀX`` per group (groups, d, d), or None without ``with_f``."""
        self._whole()
        return self._f

    def _weights(self, group: int) -> np.ndarray:
        if self.weights is None:
            raise ValueError("the projections need the layer's weights (GramAccumulator(weights=...))")
        return self.weights[group]

    def lower_projection(self, group: int) -> np.ndarray:
        """``A = W·tril(G)ᵀ`` of one group (N, d): what the sweep needs of ``G``."""
        w = self._weights(group)
        self._products()
        return self._a[group] if self._projecting else lower_projection(w, self._g[group])

    def report_terms(self, group: int) -> tuple[np.ndarray, float]:
        """``(W·Gᵀ, ‖XWᵀ‖²)`` of one group: what the error report needs of ``G`` and ``F``
        (:func:`relative_error_from_projections`)."""
        w = self._weights(group)
        self._products()
        if not self.with_f:
            raise ValueError("the error report needs with_f=True")
        if self._projecting:
            return self._wg[group], float(self._energy[group])
        return w @ self._g[group].T, output_energy(w, self._f[group])

    def mean_x(self) -> np.ndarray:
        """Column means of ``X`` per group (groups, d)."""
        return self.sum_x / max(self.rows, 1)

    def mean_x_tilde(self) -> np.ndarray:
        """Column means of ``X̃`` per group (groups, d)."""
        return self.sum_x_tilde / max(self.rows, 1)
