"""Quantization candidates for error profiling: a kind, a bit width, fitted parameters, rates.

Kinds (algorithms.md §1):

- ``uniform``: symmetric b-bit grid (signed tensors) or unsigned ``[0, 2**b - 1]`` (tensors that
  are never negative); weights per output channel, activations per tensor; 1 bit is the sign
  quantizer ``±s`` (``s`` = mean ``|x|``) for signed tensors;
- ``deadzone``: seed 000's dead-zone quantizer with ``L = 2**b - 1`` levels (or an explicit L,
  :func:`deadzone_levels`) and a zero bin holding
  ``ratio`` of the values (λ = the ratio quantile of ``|x|``, δ by a 200-point grid then a
  golden-section refinement of the squared error);
- ``log``: power-of-two levels ``{0} ∪ {±2**e}`` with ``2**(b-1) - 1`` exponents below the
  largest, rounding in the log domain;
- ``fixed``: fixed point (wl = b, the no-overflow fractional length), per output channel for
  weights (as the fixed-point target emits them) and per tensor for activations.

- ``none``: not quantized (float32; :func:`not_quantized`).

Rates: ``fixed`` = N·b bits; ``entropy`` = N·H over the histogram of codes; ``log2`` = N·log2 L
for the L codes the quantizer can produce (seed 000's rate, fractional bits).
"""

from __future__ import annotations

import dataclasses
import math

import numba
import numpy as np

from qcompiler.quantizers import channel_absmax, code_range, no_overflow_fl, refine_minimum

KINDS = ("uniform", "deadzone", "log", "fixed")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One way to quantize a tensor.

    Attributes:
        kind: ``uniform``, ``deadzone``, ``log`` or ``fixed``.
        bits: bit width (16 means "nearly float"); with ``levels``, ``ceil(log2 levels)``.
        ratio: dead-zone ratio in [0, 1) (``deadzone`` only).
        levels: ``deadzone`` only: an explicit level count L (seed 000's lists, e.g. 5, 41, 601);
            0 means ``2**bits - 1``. Build these with :func:`deadzone_levels`.
    """

    kind: str
    bits: int
    ratio: float = 0.0
    levels: int = 0

    def __post_init__(self) -> None:
        if self.levels:
            if self.kind != "deadzone":
                raise ValueError(f"a level count is a dead-zone parameter, not a {self.kind} one")
            if not MIN_LEVELS <= self.levels <= MAX_LEVELS:
                raise ValueError(f"dead-zone level counts must be in {MIN_LEVELS}..{MAX_LEVELS}, got {self.levels}")
            if self.bits != math.ceil(math.log2(self.levels)):
                raise ValueError(f"{self.levels} levels take {math.ceil(math.log2(self.levels))} bits, not {self.bits}")

    @property
    def label(self) -> str:
        """A stable name, e.g. ``uniform:4``, ``deadzone:4:r0.3``, ``deadzone:L41:r0.3`` or ``none``."""
        if self.kind == NOT_QUANTIZED:
            return NOT_QUANTIZED
        width = f"L{self.levels}" if self.levels else str(self.bits)
        return f"{self.kind}:{width}" + (f":r{self.ratio:g}" if self.kind == "deadzone" else "")

    @property
    def level_count(self) -> int:
        """The dead zone's L (explicit, or ``2**bits - 1``)."""
        return self.levels or (1 << self.bits) - 1


#: The "not quantized" candidate (algorithms.md §1.4): the tensor stays float32 (32 bits per
#: element; the seed writes it as L = 100000000, which is its level count for the log2 rate).
NOT_QUANTIZED = "none"
NOT_QUANTIZED_LEVELS = 100_000_000


def not_quantized() -> Candidate:
    """The candidate that leaves a tensor in float (label ``none``)."""
    return Candidate(NOT_QUANTIZED, 32)


#: Dead-zone level counts: L < 3 has no nonzero level (a division by zero in the seed, Q000-9);
#: 65536 is the largest in the seed's lists and the most a 16-bit code holds.
MIN_LEVELS, MAX_LEVELS = 3, 1 << 16


def deadzone_levels(levels: int, ratio: float) -> Candidate:
    """A dead-zone candidate with L levels (its fixed-length rate is ``ceil(log2 L)`` bits)."""
    if not MIN_LEVELS <= levels <= MAX_LEVELS:
        raise ValueError(f"dead-zone level counts must be in {MIN_LEVELS}..{MAX_LEVELS}, got {levels}")
    return Candidate("deadzone", math.ceil(math.log2(levels)), ratio, levels)


def parse_candidate(label: str) -> Candidate:
    """The candidate of a label (``uniform:4``, ``deadzone:4:r0.3``, ``deadzone:L41:r0.3``), the
    inverse of :attr:`Candidate.label`.

    Raises:
        ValueError: an unknown kind or a malformed label.
    """
    if label == NOT_QUANTIZED:
        return not_quantized()
    parts = label.split(":")
    width = parts[1] if len(parts) > 1 else ""
    explicit = width.startswith("L") and width[1:].isdigit() and parts[0] == "deadzone"
    if len(parts) not in (2, 3) or parts[0] not in KINDS or not (width.isdigit() or explicit):
        raise ValueError(f"malformed quantizer candidate {label!r} (expected kind:bits[:rratio] or deadzone:L<levels>:rratio)")
    ratio = float(parts[2][1:]) if len(parts) == 3 and parts[2].startswith("r") else 0.0
    if explicit:
        return deadzone_levels(int(width[1:]), ratio)
    return Candidate(parts[0], int(width), ratio)


def candidate_set(
    bits: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 16),
    kinds: tuple[str, ...] = KINDS,
    deadzone_ratios: tuple[float, ...] = (0.1, 0.3, 0.5),
    deadzone_levels_list: tuple[int, ...] = (),
) -> list[Candidate]:
    """The default candidate grid: every legal (kind, bits[, ratio]).

    Args:
        bits: bit widths of every kind.
        kinds: quantizer kinds.
        deadzone_ratios: the dead-zone ratios.
        deadzone_levels_list: explicit dead-zone level counts L (seed 000's
            ``adaptive_list_quant_levels.txt``); when given, the dead-zone candidates are these
            L times the ratios instead of ``2**bits - 1`` levels.

    The kind ``none`` in ``kinds`` adds the one "not quantized" candidate.
    """
    unknown = sorted(set(kinds) - set(KINDS) - {NOT_QUANTIZED})
    if unknown:
        raise ValueError(f"unknown quantizer kinds {unknown} (known: {', '.join(KINDS)})")
    outside = sorted(b for b in set(bits) if not 1 <= b <= 16)
    if outside:
        raise ValueError(f"bit-widths must be in 1..16, got {outside}")
    out = []
    for kind in kinds:
        if kind == NOT_QUANTIZED:
            out.append(not_quantized())
            continue
        if kind == "deadzone" and deadzone_levels_list:
            out += [deadzone_levels(n, r) for n in deadzone_levels_list for r in deadzone_ratios]
            continue
        for b in bits:
            if kind == "deadzone":
                out += [Candidate(kind, b, r) for r in deadzone_ratios if b >= 2]
            elif kind == "log" and b < 2:
                continue
            else:
                out.append(Candidate(kind, b))
    if not out:
        raise ValueError("the candidate set is empty")
    return out


# --------------------------------------------------------------------------- dead zone (seed 000)


def deadzone_quantize(x: np.ndarray, lam: float, delta: float, levels: int) -> np.ndarray:
    """Seed 000's dead-zone quantizer (algorithms.md §1.3); ``levels`` >= 3 (an even L, as in the
    seed's lists, has k = (L - 1) // 2 and leaves one code unused)."""
    k = (levels - 1) // 2
    a = np.abs(x)
    idx = np.clip(np.floor((a - lam) / delta), 0, k - 1)
    q = np.sign(x) * (lam + delta / 2 + delta * idx)
    return np.where(a < lam, 0.0, q).astype(x.dtype, copy=False)


@numba.njit(cache=True, nogil=True)
def _deadzone_sse(a: np.ndarray, lam: float, delta: float, k: int) -> float:
    """Σ (Q(x) − x)² over magnitudes ``a`` (the error of the symmetric quantizer depends on |x| only)."""
    total = 0.0
    for v in a:
        if v < lam:
            total += v * v
        else:
            i = math.floor((v - lam) / delta)
            i = 0 if i < 0 else (k - 1 if i > k - 1 else i)
            e = lam + delta / 2 + delta * i - v
            total += e * e
    return total


@numba.njit(cache=True, nogil=True)
def _search_from(a: np.ndarray, start: int, value: float) -> int:
    """``np.searchsorted(a, value)`` (side ``left``) for sorted ``a``, given that no index below
    ``start`` can be the answer: a galloping search from ``start``, O(log d) for an answer d
    places further instead of O(log N)."""
    n = a.shape[0]
    if start >= n or a[start] >= value:
        return start
    lo, step = start, 1  # a[lo] < value
    hi = lo + step
    while hi < n and a[hi] < value:
        lo = hi
        step *= 2
        hi = lo + step
    hi = min(hi, n)  # a[hi] >= value, or hi = n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[mid] < value:
            lo = mid
        else:
            hi = mid
    return hi


@numba.njit(cache=True, nogil=True)
def _deadzone_sse_sorted(a: np.ndarray, p1: np.ndarray, p2: np.ndarray, lam: float, delta: float, k: int) -> float:
    """The same sum from sorted magnitudes and prefix sums: O(k log(N/k)) instead of O(N).

    Bin i holds |x| in [λ + iδ, λ + (i + 1)δ) (the last bin is open above) and reconstructs to
    c_i = λ + δ/2 + iδ, so its error is n·c² − 2c·Σv + Σv² from the prefix sums. Each bin's
    upper edge is searched from the lower one (the edges increase): a 16-bit quantizer's 32,767
    bins on a 2.4 M-weight layer took 1 s per fit with a full binary search per edge.
    """
    j0 = np.searchsorted(a, lam)
    total = p2[j0]
    for i in range(k):
        j1 = a.shape[0] if i == k - 1 else _search_from(a, j0, lam + (i + 1) * delta)
        c = lam + delta / 2 + delta * i
        total += (j1 - j0) * c * c - 2.0 * c * (p1[j1] - p1[j0]) + (p2[j1] - p2[j0])
        j0 = j1
    return total


class FitContext:
    """What fitting needs of one tensor, computed on first use and shared by all its candidates.

    Every dead-zone candidate searches the sorted magnitudes of the tensor and their prefix
    sums. Sorting a 2.4 M-weight layer takes about 0.2 s, and the default set has 27 dead-zone
    candidates per tensor: without a shared context each of them sorted the layer again.

    Args:
        values: the tensor (weights) or a sample of it (activations); not copied, not modified.
    """

    def __init__(self, values: np.ndarray) -> None:
        self.values = values
        self._absmax: float | None = None
        self._magnitudes: np.ndarray | None = None
        self._sorted: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._channel_absmax: dict[int, np.ndarray] = {}

    def absmax(self) -> float:
        """max |x|."""
        if self._absmax is None:
            self._absmax = float(np.abs(self.values).max())
        return self._absmax

    def channel_absmax(self, axis: int) -> np.ndarray:
        """max |x| per index of ``axis`` (:func:`~qcompiler.quantizers.channel_absmax`)."""
        if axis not in self._channel_absmax:
            self._channel_absmax[axis] = channel_absmax(self.values, axis)
        return self._channel_absmax[axis]

    def magnitudes(self) -> np.ndarray:
        """|x| flattened, float64."""
        if self._magnitudes is None:
            self._magnitudes = np.abs(self.values.astype(np.float64).reshape(-1))
        return self._magnitudes

    def sorted_magnitudes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(|x| sorted, prefix sums of |x|, prefix sums of x²), each prefix starting at 0."""
        if self._sorted is None:
            a_sorted = np.sort(self.magnitudes())
            p1 = np.concatenate(([0.0], np.cumsum(a_sorted)))
            p2 = np.concatenate(([0.0], np.cumsum(a_sorted * a_sorted)))
            self._sorted = (a_sorted, p1, p2)
        return self._sorted


def _context_of(values: np.ndarray, context: FitContext | None) -> FitContext:
    """``context``, checked to be of ``values``, or a new one."""
    if context is None:
        return FitContext(values)
    if context.values is not values:
        raise ValueError("the FitContext was made for another array")
    return context


def fit_deadzone(
    values: np.ndarray, ratio: float, levels: int, refine: bool = True, context: FitContext | None = None
) -> tuple[float, float]:
    """(λ, δ): λ = the ratio quantile of |x| (inverted CDF), δ by the seed's 200-point grid
    (first minimum), then golden-section refinement unless ``refine`` is False (faithful).

    ``context``: a :class:`FitContext` of ``values`` shared with the tensor's other candidates.
    """
    if levels < 3:
        raise ValueError(f"a dead-zone quantizer needs at least 3 levels, got {levels}")
    context = _context_of(values, context)
    a = context.magnitudes()
    k = (levels - 1) // 2
    sorted_path = k * math.log2(max(a.size, 2)) < a.size  # few bins: sorted prefix sums are cheaper
    if sorted_path:
        a_sorted, p1, p2 = context.sorted_magnitudes()
        a = a_sorted  # the same values: the quantile (an order statistic) and the maximum are unchanged
    lam = float(np.quantile(a, ratio, method="inverted_cdf")) if ratio > 0 else 0.0
    bound = 1.5 * float(a[-1] if sorted_path else a.max())
    if bound <= lam:
        return lam, max(bound, 1e-12)

    if sorted_path:

        def sse(delta: float) -> float:
            return _deadzone_sse_sorted(a_sorted, p1, p2, lam, delta, k)
    else:

        def sse(delta: float) -> float:
            return _deadzone_sse(a, lam, delta, k)

    grid = (bound - lam) * np.arange(1, 201) / (200 * k)
    costs = np.array([sse(d) for d in grid])
    i = int(np.argmin(costs))
    if not refine:
        return lam, float(grid[i])
    return lam, refine_minimum(sse, float(grid[max(i - 1, 0)]), float(grid[min(i + 1, 199)]), float(grid[i]), float(costs[i]))


# --------------------------------------------------------------------------- the quantizers


@dataclasses.dataclass(frozen=True)
class Fitted:
    """A candidate with parameters fitted to one tensor; ``apply`` quantizes, ``codes`` indexes."""

    candidate: Candidate
    signed: bool
    axis: int | None
    params: tuple[float, ...] | np.ndarray

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Quantize-dequantize ``x`` (same shape and dtype)."""
        return apply(self, x)


def _scale_shape(x: np.ndarray, axis: int | None) -> tuple[int, ...]:
    if axis is None:
        return ()
    shape = [1] * x.ndim
    shape[axis] = -1
    return tuple(shape)


def fit(
    candidate: Candidate,
    values: np.ndarray,
    signed: bool,
    axis: int | None = None,
    clip: float | None = None,
    context: FitContext | None = None,
) -> Fitted:
    """Fit ``candidate`` to ``values`` (a weight, or an activation sample).

    Args:
        candidate: the candidate.
        values: the tensor (weights) or a sample of it (activations).
        signed: whether the tensor takes negative values.
        axis: per-channel axis for weights (uniform and fixed), else None.
        clip: the activation's calibrated range (defaults to max |values|).
        context: a :class:`FitContext` of ``values``, to share its maxima and sorted magnitudes
            with the tensor's other candidates (the fit is the same with or without it).
    """
    b = candidate.bits
    if candidate.kind == NOT_QUANTIZED:
        return Fitted(candidate, signed, None, ())
    context = _context_of(values, context)
    absmax = context.absmax() if clip is None else float(clip)
    if candidate.kind == "uniform":
        if b == 1 and signed:
            return Fitted(candidate, signed, None, (float(np.mean(np.abs(values))),))
        levels = (1 << (b - 1)) - 1 if signed else (1 << b) - 1
        if axis is not None:
            ranges = context.channel_absmax(axis)
            return Fitted(candidate, signed, axis, np.where(ranges > 0, ranges / levels, 1.0))
        return Fitted(candidate, signed, None, (absmax / levels if absmax > 0 else 1.0,))
    if candidate.kind == "deadzone":
        lam, delta = fit_deadzone(values, candidate.ratio, candidate.level_count, context=context)
        return Fitted(candidate, signed, None, (lam, delta))
    if candidate.kind == "log":
        e_max = round(math.log2(absmax)) if absmax > 0 else 0
        return Fitted(candidate, signed, None, (float(e_max - ((1 << (b - 1)) - 2)), float(e_max)))
    if candidate.kind == "fixed":
        if axis is not None:  # per output channel, as the fixed-point target emits weights
            fls = [float(no_overflow_fl(float(m), b, signed)) for m in context.channel_absmax(axis)]
            return Fitted(candidate, signed, axis, np.array(fls))
        return Fitted(candidate, signed, None, (float(no_overflow_fl(absmax, b, signed)),))
    raise ValueError(f"unknown quantizer kind {candidate.kind!r}")


def codes(f: Fitted, x: np.ndarray) -> np.ndarray:
    """Integer codes of ``x`` (for the entropy rate); a float tensor's codes are its float32 bit
    patterns (its rates are fixed at 32 bits, :func:`code_rates`)."""
    c, b = f.candidate, f.candidate.bits
    if c.kind == NOT_QUANTIZED:
        return np.ascontiguousarray(x, dtype=np.float32).view(np.int32).astype(np.int64)
    # x64 is a fresh copy: the steps below work in place in it, with the values of the plain
    # expressions (50 candidates' codes of a 2.4 M-weight layer: 1.36 -> 1.23-1.29 s)
    x64 = x.astype(np.float64)
    if c.kind == "uniform":
        if b == 1 and f.signed:
            return (x64 >= 0).astype(np.int64)
        step = np.asarray(f.params, dtype=np.float64).reshape(_scale_shape(x, f.axis)) if f.axis is not None else f.params[0]
        levels = (1 << (b - 1)) - 1 if f.signed else (1 << b) - 1
        lo = -levels if f.signed else 0
        np.divide(x64, step, out=x64)
        return _rint_clip(x64, lo, levels)
    if c.kind == "deadzone":
        lam, delta = f.params
        k = (c.level_count - 1) // 2
        a = np.abs(x64)
        idx = np.subtract(a, lam)  # clip(floor((|x| − λ)/δ), 0, k − 1) + 1, 0 below λ, signed
        np.divide(idx, delta, out=idx)
        np.floor(idx, out=idx)
        np.clip(idx, 0, k - 1, out=idx)
        idx += 1
        idx[a < lam] = 0
        idx *= np.sign(x64)
        return idx.astype(np.int64)
    if c.kind == "log":
        e_min, e_max = f.params
        a = np.abs(x64)
        with np.errstate(divide="ignore"):
            e = np.clip(np.rint(np.log2(np.where(a > 0, a, 1.0))), e_min, e_max)
        zero = a < 2.0 ** (e_min - 1)
        return np.where(zero, 0, np.sign(x64) * (e - e_min + 1)).astype(np.int64)
    lo, hi = code_range(b, f.signed)
    np.ldexp(x64, _fl(f, x), out=x64)
    return _rint_clip(x64, lo, hi)


def _rint_clip(y: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """``clip(rint(y), lo, hi)`` as int64 codes, computed in place in the float64 ``y``."""
    np.rint(y, out=y)
    np.clip(y, lo, hi, out=y)
    return y.astype(np.int64)


def apply(f: Fitted, x: np.ndarray) -> np.ndarray:
    """Quantize-dequantize ``x`` with fitted candidate ``f``."""
    return dequantize(f, codes(f, x), x)


def dequantize(f: Fitted, q: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The values of ``x``'s codes ``q`` (from :func:`codes`) under ``f``, in ``x``'s dtype."""
    c, b = f.candidate, f.candidate.bits
    if c.kind == NOT_QUANTIZED:
        return x.copy()
    q = q.astype(np.float64)
    if c.kind == "uniform":
        if b == 1 and f.signed:
            out = np.where(q > 0, f.params[0], -f.params[0])
        else:
            step = np.asarray(f.params, dtype=np.float64).reshape(_scale_shape(x, f.axis)) if f.axis is not None else f.params[0]
            out = np.multiply(q, step, out=q)  # q is a fresh float64 copy
    elif c.kind == "deadzone":
        # code ±(i + 1) is bin i, reconstructed at λ + δ/2 + iδ (deadzone_quantize's arithmetic,
        # from the codes instead of from x again)
        lam, delta = f.params
        out = np.sign(q) * (lam + delta / 2 + delta * np.maximum(np.abs(q) - 1, 0.0))
    elif c.kind == "log":
        e_min = f.params[0]
        out = np.where(q == 0, 0.0, np.sign(q) * np.exp2(np.abs(q) - 1 + e_min))
    else:
        out = np.ldexp(q, -_fl(f, x))
    return out.astype(x.dtype)


def _fl(f: Fitted, x: np.ndarray) -> np.ndarray | int:
    """The fixed-point fractional length(s), shaped to broadcast over ``x``."""
    if f.axis is None:
        return int(f.params[0])
    return np.asarray(f.params, dtype=np.int64).reshape(_scale_shape(x, f.axis))


def level_count(f: Fitted) -> int:
    """How many codes a fitted candidate can produce (the L of the ``log2`` rate model)."""
    c, b = f.candidate, f.candidate.bits
    if c.kind == NOT_QUANTIZED:
        return NOT_QUANTIZED_LEVELS
    if c.kind == "deadzone":
        return c.level_count
    if c.kind == "uniform":
        return 2 if b == 1 and f.signed else ((1 << b) - 1 if f.signed else 1 << b)
    if c.kind == "log":
        return (1 << b) - 1 if f.signed else 1 << (b - 1)
    lo, hi = code_range(b, f.signed)
    return hi - lo + 1


def rates(f: Fitted, x: np.ndarray, elements: int) -> tuple[float, float, float]:
    """(fixed-length rate N·b, entropy rate N·H, ``log2`` rate N·log2 L) in bits for ``elements``
    elements."""
    return code_rates(f, codes(f, x), elements)


def code_rates(f: Fitted, q: np.ndarray, elements: int) -> tuple[float, float, float]:
    """:func:`rates` from the codes ``q`` of a sample (as :func:`codes` gives them).

    A float tensor is stored raw: its entropy rate is its 32 bits (the empirical entropy of
    distinct float values would be log2 N, cheaper than any real code for a small tensor).
    """
    if f.candidate.kind == NOT_QUANTIZED:
        return 32.0 * elements, 32.0 * elements, float(elements * math.log2(NOT_QUANTIZED_LEVELS))
    q = q.reshape(-1)
    lo = int(q.min()) if q.size else 0
    if q.size and int(q.max()) - lo < 1 << 24:
        # the codes are small integers: counting them is O(n), sorting them (np.unique) is not;
        # the non-zero counts come out in the same (ascending code) order
        counts = np.bincount(q - lo)
        counts = counts[counts > 0]
    else:
        _, counts = np.unique(q, return_counts=True)
    p = counts / counts.sum()
    entropy = float(-(p * np.log2(p)).sum())
    return float(elements * f.candidate.bits), float(elements * entropy), float(elements * math.log2(level_count(f)))
