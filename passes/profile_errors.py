"""Error profiling: the output distortion of every candidate quantizer of every tensor, alone.

For each quantizable weight and each activation entering a quantizable layer, and for each
candidate (kind × bit width [× dead-zone ratio]), the distortion is the MSE of the model's
logits (before a final Softmax) against float over the calibration set, with **only that
tensor** quantized (seed 000's error curves). Rates are given fixed-length (N·b) and as
entropy (N·H). Modes (algorithms.md §2.3-2.4):

- ``exact`` (suffix-cached): the float model runs once per batch and exposes every suffix's
  external inputs; per tensor only the downstream subgraph runs, with up to ``K`` candidates
  stacked on the batch axis (``K`` from the memory budget; 1 when a suffix mixes samples).
  Weight candidates run the layer alone, then the shared suffix.
- ``fast``: the additive-noise linear model ``D(c) ≈ g·σ²(c)``; ``σ²`` is exact and needs no
  forward pass, ``g`` is fitted by least squares through the origin to 1-3 exact probes.
- ``hybrid``: ``fast``, then the allocation it serves is solved, the chosen candidate of every
  allocated tensor and its two neighbours on the allocator's curve are measured exactly, and the
  allocation is solved again, until every chosen candidate and its neighbours are measured
  (§2.4: the linear model fails below ~3 bits and with large dead zones, exactly where an
  allocator under a tight budget looks). It ends with the ``exact`` numbers wherever the
  solution is decided, at a fraction of the ``exact`` cost on large candidate sets.
- ``full``: the naive reference, a full forward pass per candidate (for tests and benchmarks).

Results are :class:`~qcompiler.annotations.ErrorProfile` annotations on the tensors' values.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from qcompiler import annotations as ann
from qcompiler.candidates import Candidate, FitContext, Fitted, apply, candidate_set, code_rates, codes, dequantize, fit
from qcompiler.data import ArrayDataset, iter_feeds, load_dataset
from qcompiler.errors import DataError, UnsupportedModelError
from qcompiler.graph import const_array, set_initializer, values_by_name
from qcompiler.passes.allocate_bits import AllocateBitsPass
from qcompiler.passes.calibrate import META_KEY
from qcompiler.passes.detect_layers import quantizable_nodes
from qcompiler.prefixes import prefix_model
from qcompiler.progress import progress_bar
from qcompiler.runtime import Runner
from qcompiler.suffix import Suffix, build_suffix, logits_names, node_model, shared_constants

MODES = ("exact", "fast", "hybrid", "full")
#: Candidate kinds fitted per output channel for weights (the others are per tensor).
PER_CHANNEL_KINDS = ("uniform", "fixed")
PROBE_BITS = (4, 5, 6)


@dataclasses.dataclass
class _Tensor:
    """One profiled tensor and everything needed to measure it."""

    name: str
    kind: str  # weight | activation
    elements: int
    fitted: list[Fitted]
    sample: np.ndarray  # the weight, or an activation sample, for sigma^2 and entropy rates
    suffix: Suffix
    node: ir.Node | None = None
    layer_input: str | None = None
    node_runner: Runner | None = None
    rates: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # (N·b, N·H) per candidate
    noise: np.ndarray | None = None  # σ² of every candidate on ``sample``
    # A weight's candidates, kept for the measurement: dequantized when they are small, else
    # as codes in the narrowest integer type, dequantized when used.
    _kept: list[np.ndarray] = dataclasses.field(default_factory=list)
    _kept_codes: bool = False
    # same_as[i]: the first candidate whose kept weight equals candidate i's bit for bit (i when
    # none does); only that one is measured (e.g. log at 5-16 bits on most layers' weights).
    same_as: list[int] = dataclasses.field(default_factory=list)

    def quantize_sample(self, keep: bool = False) -> None:
        """Apply every candidate to the sample and record its rates and σ² (the codes are
        computed once per candidate: they dominate on large weights). With ``keep``, keep the
        candidates for :meth:`quantized_weight` and find the ones equal to an earlier one
        (``same_as``)."""
        rates, noise = [], []
        by_fingerprint: dict[bytes, list[int]] = {}
        self._kept_codes = keep and self.sample.size * 4 * len(self.fitted) > KEEP_DEQUANTIZED_BYTES
        self.same_as = list(range(len(self.fitted)))
        for i, f in enumerate(self.fitted):
            q = codes(f, self.sample)
            x = dequantize(f, q, self.sample)
            rates.append(code_rates(f, q, self.elements))
            noise.append(float(np.mean((x.astype(np.float64) - self.sample) ** 2)))
            if keep:
                self._kept.append(narrowest_int(q) if self._kept_codes else x)
                # a cheap fingerprint finds the likely duplicates, a full comparison confirms them
                # (hashing every candidate whole took 0.57 s per 2.4 M-weight layer)
                earlier = by_fingerprint.setdefault(fingerprint(x), [])
                self.same_as[i] = next((j for j in earlier if same_bits(x, self.quantized_weight(j))), i)
                if self.same_as[i] == i:
                    earlier.append(i)
        self.rates = rates
        self.noise = np.array(noise)

    def quantized_weight(self, index: int) -> np.ndarray:
        """The weight under candidate ``index`` (after ``quantize_sample(keep=True)``)."""
        kept = self._kept[index]
        return dequantize(self.fitted[index], kept, self.sample) if self._kept_codes else kept


#: Values a :func:`fingerprint` hashes (evenly spaced through the array).
FINGERPRINT_VALUES = 4096


def fingerprint(x: np.ndarray) -> bytes:
    """A digest of ``FINGERPRINT_VALUES`` evenly spaced values of ``x``, with its dtype and shape:
    arrays with different fingerprints differ; equal fingerprints need :func:`same_bits`."""
    flat = x.reshape(-1)
    sample = np.ascontiguousarray(flat[:: max(1, flat.size // FINGERPRINT_VALUES)])
    return hashlib.blake2b(sample.data, digest_size=16).digest() + f"{x.dtype}{x.shape}".encode()


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two arrays are equal bit for bit (dtype, shape and every byte: -0.0 is not 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8)))


#: A weight's candidates are kept dequantized (float32) up to this many bytes in all, else as
#: integer codes: ResNet-18's 50 candidates of 11.7 M weights would take 2.3 GB as float32.
KEEP_DEQUANTIZED_BYTES = 64 << 20


def narrowest_int(q: np.ndarray) -> np.ndarray:
    """``q`` in the narrowest signed integer type that holds its values."""
    lo, hi = (int(q.min()), int(q.max())) if q.size else (0, 0)
    for dtype in (np.int8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return q.astype(dtype)
    return q


def activation_sample(value: ir.Value, fallback: np.ndarray | None) -> np.ndarray | None:
    """The values an activation's candidates are fitted on: calibration's reservoir when it is in
    memory, else ``fallback`` (e.g. the activation on the first batch)."""
    stats = value.meta.get(META_KEY)
    if stats is not None and stats.reservoir_size and stats.count:
        return stats.reservoir_sample()
    return fallback


def fit_weight(candidate: Candidate, weight: np.ndarray, channel_axis: int, context: FitContext | None = None) -> Fitted:
    """A candidate fitted to a layer's weight (per output channel, on ``channel_axis``, for the
    per-channel kinds); ``context``: a :class:`FitContext` of ``weight`` shared by its candidates."""
    axis = channel_axis if candidate.kind in PER_CHANNEL_KINDS else None
    return fit(candidate, weight, True, axis=axis, context=context)


def fit_activation(candidate: Candidate, value: ir.Value, sample: np.ndarray, context: FitContext | None = None) -> Fitted:
    """A candidate fitted to an activation's sample; sign and clip from its calibration
    statistics when they exist; ``context``: a :class:`FitContext` of ``sample``."""
    stats = ann.get(value, ann.TensorStats)
    signed = (stats.min < 0) if stats is not None else bool((sample < 0).any())
    clip = stats.absmax if stats is not None else None
    return fit(candidate, sample, signed, None, clip, context)


def fit_candidates(
    candidates: Sequence[Candidate], values: np.ndarray, fit_one: Callable[[Candidate, FitContext], Fitted]
) -> list[Fitted]:
    """Every candidate fitted to one tensor by ``fit_one``, sharing one :class:`FitContext` of
    ``values`` (one sort for all the dead-zone candidates). The context (four float64 copies of
    the tensor) is freed on return, before the candidates quantize the tensor."""
    context = FitContext(values)
    return [fit_one(c, context) for c in candidates]


def _session(model: ir.Model, extra_outputs: Sequence[str] = ()) -> Runner:
    """A session of this pass whose values are compared with the suffix sessions' (the float
    references, the naive loop's models): without prepacking, like them, so a GEMM gives the
    same bits with its weight constant here and fed there (see :mod:`qcompiler.suffix`)."""
    return Runner(model, extra_outputs, prepack=False)


#: Largest activation of a stacked suffix run, in bytes, beyond which stacking more candidates
#: on the batch axis stops paying: each worker's run should stay within about one core's L2
#: cache. Measured: the digits CNN (8 KB per sample, batches of 64) profiles 1.2-1.3x faster
#: with 2 candidates per run than with 8, and ResNet-18's suffixes (up to 3.2 MB per sample)
#: run as fast or faster one candidate at a time (bench/RESULTS.md, issue 3). Tiny suffixes
#: (a last Gemm) still stack up to ``max_candidates_per_run``.
STACK_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class ProfileErrorPass(ir.passes.InPlacePass):
    """Measure rate-distortion curves for weights and activations (see module docstring).

    Attributes:
        data: calibration data (an :class:`ArrayDataset` or an iterable of feed dicts).
        candidates: the candidate set (default: :func:`~qcompiler.candidates.candidate_set`).
        mode: ``exact``, ``fast``, ``hybrid`` or ``full``.
        allocate: the allocation ``hybrid`` refines (its solution decides what is re-measured);
            the pass leaves that allocation's annotations on the model.
        tensors: ``all``, ``weights`` or ``activations``.
        only: profile only these value names (empty: all of the selected kind).
        batch_size: batch size used with an :class:`ArrayDataset`.
        memory_budget_mb: bound on a stacked suffix batch, which sets ``K`` (with
            :data:`STACK_BYTES`, the smaller of the two).
        max_candidates_per_run: upper bound on ``K``.
        split: name of the calibration split, recorded in the annotation.
        workers: threads measuring tensors in parallel (each onnxruntime session uses one).
        show_progress: show a progress bar (only on a terminal).
    """

    data: ArrayDataset | Iterable[Mapping[str, np.ndarray]] = dataclasses.field(repr=False, compare=False)
    candidates: tuple[Candidate, ...] = tuple(candidate_set())
    mode: str = "exact"
    # Not in the repr: a pipeline description names the allocation once, as the pass after this
    # one, and binds it here when read back (qcompiler.pipeline_text).
    allocate: AllocateBitsPass | None = dataclasses.field(default=None, repr=False, compare=False)
    tensors: str = "all"
    only: tuple[str, ...] = ()
    batch_size: int = 64
    memory_budget_mb: int = 256
    max_candidates_per_run: int = 8
    split: str = "calib"
    workers: int = dataclasses.field(default_factory=lambda: max(1, os.cpu_count() or 1), repr=False, compare=False)
    show_progress: bool = dataclasses.field(default=True, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.tensors not in ("all", "weights", "activations"):
            raise ValueError(f"tensors must be all, weights or activations, got {self.tensors!r}")
        if not self.candidates:
            raise ValueError("the candidate set is empty")
        if (self.mode == "hybrid") != (self.allocate is not None):
            raise ValueError("mode 'hybrid' needs the allocation it refines (allocate=AllocateBitsPass(...)), "
                             "and only 'hybrid' uses one")

    def requires(self, model: ir.Model) -> None:
        if not quantizable_nodes(model):
            raise ir.passes.PreconditionError("no QuantizableLayer annotations: run DetectLayersPass first")
        values = values_by_name(model.graph)
        missing = [name for name in self.only if name not in values]
        if missing:
            raise ir.passes.PreconditionError(f"cannot profile {missing}: the model has no such values")

    # ------------------------------------------------------------------ set-up
    def _targets(self, model: ir.Model) -> list[tuple[str, str, ir.Node | None]]:
        out: list[tuple[str, str, ir.Node | None]] = []
        seen: set[str] = set()
        for node, layer in quantizable_nodes(model):
            if self.tensors in ("all", "weights") and layer.weight not in seen:
                out.append(("weight", layer.weight, node))
                seen.add(layer.weight)
            if self.tensors in ("all", "activations") and layer.activation_input not in seen:
                out.append(("activation", layer.activation_input, None))
                seen.add(layer.activation_input)
        if self.only:
            out = [t for t in out if t[1] in self.only]
            missing = sorted(set(self.only) - {t[1] for t in out})
            if missing:
                raise UnsupportedModelError(f"{missing} are not weights or activation inputs of quantizable layers")
        return out

    def _prepare(self, model: ir.Model, first_batch: Mapping[str, np.ndarray]) -> list[_Tensor]:
        proto = ir.to_proto(model)
        constants = shared_constants(proto)  # one copy of the weights for every suffix session
        values = values_by_name(model.graph)
        targets = self._targets(model)
        # One float run on the first batch gives activation samples when calibration's
        # reservoir is not in memory (e.g. the model was loaded from a file).
        act_names = [n for k, n, _ in targets if k == "activation" and n not in first_batch]
        first = Runner(model, act_names).run(first_batch, act_names) if act_names else {}
        first.update(first_batch)
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.workers) as pool:
            jobs = [pool.submit(self._prepare_one, model, proto, constants, values, first, kind, name, node)
                    for kind, name, node in targets]
            return [job.result() for job in jobs]

    def _prepare_one(
        self,
        model: ir.Model,
        proto: object,
        constants: Mapping[str, np.ndarray],
        values: Mapping[str, ir.Value],
        first: Mapping[str, np.ndarray],
        kind: str,
        name: str,
        node: ir.Node | None,
    ) -> _Tensor:
        """Fit every candidate to one tensor and build its suffix (runs on a worker thread)."""
        value = values[name]
        if kind == "weight":
            w = const_array(value)
            layer = ann.require(node, ann.QuantizableLayer)
            fitted = fit_candidates(self.candidates, w, lambda c, context: fit_weight(c, w, layer.channel_axis, context))
            tensor = _Tensor(name, kind, int(w.size), fitted, w, build_suffix(model, proto, node.outputs[0].name, 1, constants),
                             node=node, layer_input=layer.activation_input)
            tensor.node_runner = node_model(model, proto, node)
            tensor.quantize_sample(keep=True)
            return tensor
        sample = activation_sample(value, first[name])
        fitted = fit_candidates(self.candidates, sample, lambda c, context: fit_activation(c, value, sample, context))
        per_sample = int(np.prod(first[name].shape[1:])) if first[name].ndim > 1 else 1
        tensor = _Tensor(name, kind, per_sample, fitted, sample, build_suffix(model, proto, name, 1, constants))
        tensor.quantize_sample()
        return tensor

    # ------------------------------------------------------------------ measurement
    def _chunk_size(self, suffix: Suffix, batch: int, count: int) -> int:
        if not suffix.batch_safe:
            return 1
        if suffix.per_sample_bytes == 0:
            return min(count, self.max_candidates_per_run)
        k = min(self.memory_budget_mb << 20, STACK_BYTES) // max(1, batch * suffix.per_sample_bytes)
        return int(max(1, min(count, k, self.max_candidates_per_run)))

    def _start_values(self, t: _Tensor, out: Mapping[str, np.ndarray], indices: Sequence[int]) -> list[np.ndarray]:
        if t.kind == "activation":
            return [apply(t.fitted[i], out[t.name]) for i in indices]
        x = out[t.layer_input]
        return [t.node_runner.run({t.layer_input: x, t.name: t.quantized_weight(i)})[t.node.outputs[0].name] for i in indices]

    def _measure_batch(self, t: _Tensor, out: Mapping[str, np.ndarray], indices: Sequence[int], sq: np.ndarray) -> None:
        batch = next(iter(out.values())).shape[0]
        k = self._chunk_size(t.suffix, batch, len(indices))
        refs = {name: out[name].astype(np.float64) for name in t.suffix.outputs}
        for lo in range(0, len(indices), k):
            chunk = list(indices[lo : lo + k])
            starts = self._start_values(t, out, chunk)
            feeds = {t.suffix.start: np.concatenate(starts, axis=0)}
            for name in t.suffix.inputs[1:]:
                tile = name not in t.suffix.unbatched
                feeds[name] = np.concatenate([out[name]] * len(chunk), axis=0) if tile else out[name]
            result = t.suffix.run(feeds)
            for name, ref in refs.items():
                blocks = result[name].reshape(len(chunk), *ref.shape).astype(np.float64)
                sq[chunk] += ((blocks - ref) ** 2).reshape(len(chunk), -1).sum(axis=1) / ref[0].size

    def _measure(self, model: ir.Model, tensors: list[_Tensor], which: Mapping[str, list[int]]) -> dict[str, np.ndarray]:
        """Suffix-cached measurement of the candidates ``which[name]`` of each tensor."""
        needed: list[str] = []
        graph_inputs = {v.name for v in model.graph.inputs}
        for t in tensors:
            for name in [*t.suffix.inputs, *t.suffix.outputs, *([t.layer_input] if t.layer_input else [])]:
                if name not in needed and name not in graph_inputs:
                    needed.append(name)
        runner = _session(model, needed)
        sums = {t.name: np.zeros(len(self.candidates)) for t in tensors}
        # a candidate equal to an earlier one is not run again: it gets that one's distortion
        by_name = {t.name: t for t in tensors}
        runs = {name: sorted({by_name[name].same_as[i] for i in indices}) for name, indices in which.items()}
        samples = 0
        total = self.data.num_samples if isinstance(self.data, ArrayDataset) else None
        active = [t for t in tensors if which.get(t.name)]
        # Tensors are independent (own sessions, own accumulators) and onnxruntime releases the
        # GIL: measuring them on parallel threads, each session single-threaded, keeps every core
        # busy even when one small suffix cannot.
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.workers) as pool, progress_bar(
            f"profile ({self.mode})", total, enabled=self.show_progress
        ) as advance:
            for feed in iter_feeds(self.data, self.batch_size, model):
                out = dict(feed)
                out.update(runner.run(feed, needed))
                batch = next(iter(feed.values())).shape[0]
                jobs = [pool.submit(self._measure_batch, t, out, runs[t.name], sums[t.name]) for t in active]
                for job in jobs:
                    job.result()
                samples += batch
                advance(batch)
        if samples == 0:
            raise DataError("profiling data is empty")
        for t in active:
            sums[t.name][which[t.name]] = sums[t.name][[t.same_as[i] for i in which[t.name]]]
        return {name: s / samples for name, s in sums.items()}

    def _measure_full(self, model: ir.Model, tensors: list[_Tensor]) -> dict[str, np.ndarray]:
        """The naive reference: one full forward pass per (tensor, candidate, batch).

        The float logits are computed once per batch and the sessions once per weight candidate
        (or once per activation), so each measurement costs exactly one forward pass: for a
        weight, the model with that candidate's weights; for an activation, the nodes up to it
        (a prefix model: onnxruntime runs every node of a session whatever is fetched), the
        quantizer, and the rest of the graph.
        """
        logits = logits_names(model)
        graph_inputs = {v.name for v in model.graph.inputs}
        reference = _session(model, [n for n in logits if n not in {v.name for v in model.graph.outputs}])
        references = [{n: r.astype(np.float64) for n, r in reference.run(feed, logits).items()}
                      for feed in iter_feeds(self.data, self.batch_size, model)]
        result: dict[str, np.ndarray] = {}
        for t in tensors:
            sums = np.zeros(len(self.candidates))
            exposed = [t.name, *t.suffix.inputs[1:]]
            computed = [n for n in exposed if n not in graph_inputs]
            prefix = _session(prefix_model(model, computed)) if t.kind != "weight" and computed else None
            for i in range(len(self.candidates)):
                if t.kind == "weight":
                    clone = model.clone()
                    set_initializer(clone.graph, values_by_name(clone.graph)[t.name], t.quantized_weight(i))
                    quantized = _session(clone, logits)
                samples = 0
                for feed, ref in zip(iter_feeds(self.data, self.batch_size, model), references):
                    if t.kind == "weight":
                        got = quantized.run(feed, logits)
                    else:  # the graph up to t, quantize t, the rest of the graph
                        out = dict(feed)
                        if prefix is not None:
                            out.update(prefix.run(feed, computed))
                        feeds = {t.name: apply(t.fitted[i], out[t.name]), **{n: out[n] for n in exposed[1:]}}
                        got = t.suffix.run(feeds)
                    for name in t.suffix.outputs:
                        r = ref[name]
                        sums[i] += ((got[name].astype(np.float64) - r) ** 2).reshape(r.shape[0], -1).mean(axis=1).sum()
                    samples += next(iter(feed.values())).shape[0]
                sums[i] /= samples
            result[t.name] = sums
        return result

    # ------------------------------------------------------------------ the pass
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if isinstance(self.data, (str, os.PathLike, Mapping)):  # read and validate once, not on every pass over it
            return dataclasses.replace(self, data=load_dataset(self.data, model)).call(model)
        first = next(iter(iter_feeds(self.data, self.batch_size, model)), None)
        if first is None:
            raise DataError("profiling data is empty")
        tensors = self._prepare(model, first)
        measured = {t.name: np.ones(len(self.candidates), bool) for t in tensors}
        if self.mode == "full":
            distortion = self._measure_full(model, tensors)
        elif self.mode == "exact":
            distortion = self._measure(model, tensors, {t.name: list(range(len(self.candidates))) for t in tensors})
        else:
            distortion, measured = self._predict(model, tensors)
        self._annotate(model, tensors, distortion, measured)
        if self.mode == "hybrid":
            self._refine(model, tensors, distortion, measured)
        return ir.passes.PassResult(model, True)

    def _predict(self, model: ir.Model, tensors: list[_Tensor]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The linear model: exact probes, a gain per tensor, predictions for the rest."""
        probes = probe_indices(self.candidates)
        exact = self._measure(model, tensors, {t.name: probes for t in tensors})
        distortion, measured = {}, {}
        for t in tensors:
            gain = fit_gain(exact[t.name][probes], t.noise[probes])
            distortion[t.name] = gain * t.noise
            distortion[t.name][probes] = exact[t.name][probes]
            measured[t.name] = np.zeros(len(self.candidates), bool)
            measured[t.name][probes] = True
        return distortion, measured

    def _refine(self, model: ir.Model, tensors: list[_Tensor], distortion: dict[str, np.ndarray],
                measured: dict[str, np.ndarray]) -> None:
        """Hybrid: solve, measure the unmeasured chosen candidates and neighbours, solve again.

        Every round measures at least one new candidate, so this ends; at worst every legal
        candidate is measured, which is the ``exact`` profile of the legal set.
        """
        while True:
            self.allocate(model)
            values = values_by_name(model.graph)
            which = {}
            for t in tensors:
                near = self._near_solution(values[t.name])
                missing = [i for i in near if not measured[t.name][i]]
                if missing:
                    which[t.name] = missing
            if not which:
                return
            exact = self._measure(model, [t for t in tensors if t.name in which], which)
            for name, indices in which.items():
                distortion[name][indices] = exact[name][indices]
                measured[name][indices] = True
            self._annotate(model, [t for t in tensors if t.name in which], distortion, measured)

    def _near_solution(self, value: ir.Value) -> list[int]:
        """The chosen candidate of an allocated value and its neighbours on the allocator's curve
        (the legal candidates in rate order); empty for a value the allocation does not cover."""
        choice = ann.get(value, ann.BitWidth)
        profile = ann.get(value, ann.ErrorProfile)
        covered = profile is not None and (profile.tensor_kind == "weight" or self.allocate.scope == "all")
        if choice is None or not covered:
            return []
        rates = self.allocate.rates_of(profile)
        curve = sorted(self.allocate.legal_indices(profile), key=lambda i: (rates[i], i))
        at = curve.index(profile.candidates.index(choice.candidate))
        return curve[max(0, at - 1) : at + 2]

    def _annotate(self, model: ir.Model, tensors: list[_Tensor], distortion: Mapping[str, np.ndarray],
                  measured: Mapping[str, np.ndarray]) -> None:
        values = values_by_name(model.graph)
        for t in tensors:
            ann.set(
                values[t.name],
                ann.ErrorProfile(
                    tensor_kind=t.kind,
                    elements=t.elements,
                    candidates=tuple(c.label for c in self.candidates),
                    bits=tuple(c.bits for c in self.candidates),
                    rate_fixed=tuple(r[0] for r in t.rates),
                    rate_entropy=tuple(r[1] for r in t.rates),
                    distortion=tuple(float(d) for d in distortion[t.name]),
                    measured=tuple(bool(m) for m in measured[t.name]),
                    mode=self.mode,
                    split=self.split,
                    rate_log2=tuple(r[2] for r in t.rates),
                ),
            )


def probe_indices(candidates: Sequence[Candidate]) -> list[int]:
    """1-3 mid-rate probes for the linear model: uniform 4/5/6-bit candidates (else mid bits)."""
    probes = [i for i, c in enumerate(candidates) if c.kind == "uniform" and c.bits in PROBE_BITS]
    if not probes:
        order = sorted(range(len(candidates)), key=lambda i: abs(candidates[i].bits - 5))
        probes = order[:2]
    return probes[:3]


def fit_gain(distortion: np.ndarray, sigma2: np.ndarray) -> float:
    """Least squares through the origin: g = Σ D·σ² / Σ σ⁴."""
    denominator = float(np.sum(sigma2**2))
    return float(np.sum(distortion * sigma2) / denominator) if denominator > 0 else 0.0


def agreement(exact: ann.ErrorProfile, fast: ann.ErrorProfile) -> dict[str, float]:
    """How well ``fast`` predicts ``exact``: Spearman rank correlation and relative errors."""
    from scipy.stats import spearmanr

    e, f = np.asarray(exact.distortion), np.asarray(fast.distortion)
    predicted = ~np.asarray(fast.measured)
    rel = np.abs(f - e)[predicted] / np.maximum(e[predicted], 1e-30)
    rho = spearmanr(e, f).statistic if len(e) > 2 and np.ptp(e) > 0 and np.ptp(f) > 0 else float("nan")
    return {
        "spearman": float(rho),
        "median_relative_error": float(np.median(rel)) if rel.size else 0.0,
        "predicted": int(predicted.sum()),
    }
