"""Calibration: stream data through onnxruntime once and record activation statistics.

For every activation that enters or leaves a quantizable layer the pass keeps
:class:`~qcompiler.streaming.StreamingStats` (per-tensor and per-channel min/max, mean/std,
``|x|`` histograms and quantiles, a seeded reservoir sample). Only one batch of intermediate
values exists at a time, so memory does not grow with the number of samples. The range
choosers (MinMax, Percentile, Entropy/KL, MSE-optimal per bit width) run on the histograms at
the end. Results are stored as :class:`~qcompiler.annotations.TensorStats` on the values;
histograms and reservoirs stay in ``value.meta`` for later passes in the same process and go
to a sidecar folder when one is given. Named tensors can be dumped batch by batch.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qcompiler import annotations as ann
from qcompiler.data import ArrayDataset, iter_feeds
from qcompiler.errors import DataError
from qcompiler.fsutil import write_npy, write_npz
from qcompiler.graph import values_by_name
from qcompiler.passes.detect_layers import quantizable_nodes
from qcompiler.progress import progress_bar
from qcompiler.ranges import entropy_range, mse_range, percentile_range
from qcompiler.runtime import float_runner
from qcompiler.streaming import StreamingStats, check_sizes

#: ``value.meta`` key of the in-memory :class:`StreamingStats` (a cache, never serialised).
META_KEY = "qcompiler.streaming_stats"
QUANTILES = (0.5, 0.9, 0.99, 0.999, 0.9999, 0.99999)
METHODS = ("minmax", "percentile", "entropy", "mse")


#: Element-wise activations whose output is "what leaves the layer" on accelerators that fuse them.
FUSED_ACTIVATIONS = ("Relu", "Abs", "Clip")


def activation_names(model: ir.Model, post_activation: bool = False) -> list[str]:
    """Activations entering or leaving quantizable layers, in first-use order, without repeats.

    Args:
        model: the annotated model.
        post_activation: also the output of a Relu/Abs/Clip that is the only consumer of a
            layer's output (the tensor a fused accelerator layer writes, e.g. MAX78000).
    """
    names: list[str] = []
    by_name = values_by_name(model.graph) if post_activation else {}
    for _, layer in quantizable_nodes(model):
        extra = []
        if post_activation:
            users = list(by_name[layer.output].uses())
            if len(users) == 1 and users[0].node.op_type in FUSED_ACTIVATIONS:
                extra.append(users[0].node.outputs[0].name)
        for name in (layer.activation_input, layer.output, *extra):
            if name not in names:
                names.append(name)
    return names


def safe_filename(name: str) -> str:
    """A value name made safe for a file name (stable, so sidecar paths are deterministic)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


def range_key(method: str, bits: int, percentile: float) -> str:
    """The ``TensorStats.ranges`` key of a chooser."""
    if method == "minmax":
        return "minmax"
    if method == "percentile":
        return f"percentile:{percentile:g}"
    return f"{method}:{bits}"


@dataclasses.dataclass(frozen=True)
class CalibratePass(ir.passes.InPlacePass):
    """Record :class:`TensorStats` for every activation of a quantizable layer.

    Attributes:
        data: calibration data (an :class:`ArrayDataset` or an iterable of feed dicts).
        batch_size: batch size used with an :class:`ArrayDataset`.
        methods: range choosers to run (``minmax``, ``percentile``, ``entropy``, ``mse``).
        bits: bit widths for the ``entropy`` and ``mse`` choosers.
        percentile: the percentile (0-100) of ``|x|`` for ``percentile``.
        bins: per-tensor histogram bins (power of two).
        channel_bins: per-channel histogram bins (power of two).
        reservoir: reservoir sample size per tensor (seeded).
        seed: reservoir seed.
        sidecar_dir: folder for histograms and reservoirs (``<value>.stats.npz``), or None.
        dump: names of tensors whose values are dumped batch by batch into ``dump_dir``.
        dump_dir: folder of the dumps (``<value>/<batch>.npy``).
        post_activation: also collect the outputs of the Relu/Abs/Clip fused after each layer.
        show_progress: show a progress bar (only on a terminal).
    """

    data: ArrayDataset | Iterable[Mapping[str, np.ndarray]] = dataclasses.field(repr=False, compare=False)
    batch_size: int = 64
    methods: tuple[str, ...] = METHODS
    bits: tuple[int, ...] = (8,)
    percentile: float = 99.99
    bins: int = 1 << 16
    channel_bins: int = 256
    reservoir: int = 16_384
    seed: int = 0
    sidecar_dir: Path | None = dataclasses.field(default=None, repr=False)
    dump: tuple[str, ...] = ()
    dump_dir: Path | None = dataclasses.field(default=None, repr=False)
    post_activation: bool = False
    # A display choice, not configuration: kept out of the repr so provenance (and therefore
    # the artifacts' bytes) do not depend on whether a terminal was attached.
    show_progress: bool = dataclasses.field(default=True, repr=False, compare=False)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown range methods {unknown} (known: {', '.join(METHODS)})")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.dump and self.dump_dir is None:
            raise ValueError("dump needs dump_dir")
        check_sizes(self.bins, self.channel_bins, self.reservoir)

    def requires(self, model: ir.Model) -> None:
        if not quantizable_nodes(model):
            raise ir.passes.PreconditionError("no QuantizableLayer annotations: run DetectLayersPass first")
        values = values_by_name(model.graph)
        missing = [name for name in self.dump if name not in values]
        if missing:
            raise ir.passes.PreconditionError(f"cannot dump {missing}: the model has no such values")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        names = activation_names(model, self.post_activation)
        names += [n for n in self.dump if n not in names]
        graph_inputs = {v.name for v in model.graph.inputs}
        fetched = [n for n in names if n not in graph_inputs]
        runner = float_runner(model, fetched)
        stats = {
            name: StreamingStats(self.bins, self.channel_bins, self.reservoir, self.seed + i)
            for i, name in enumerate(names)
        }
        total = self.data.num_samples if isinstance(self.data, ArrayDataset) else None
        batches = 0

        def fold(index: int, feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
            for name in names:
                tensor = feed[name] if name in graph_inputs else outputs[name]
                try:
                    stats[name].update(tensor)
                except ValueError as exc:
                    raise DataError(f"calibration: value {name!r} {exc}") from None
                if name in self.dump:
                    self._dump(name, index, tensor)

        # Statistics are folded right after each run, not on a thread overlapped with the next
        # run: on few cores the statistics thread preempts one of onnxruntime's intra-op threads
        # and every operator then waits for the straggler (measured: 1.76x -> 1.49x of plain
        # inference on the ResNet-18-shaped model; bench/RESULTS.md, issue 3).
        with progress_bar("calibrate", total, enabled=self.show_progress) as advance:
            for feed in iter_feeds(self.data, self.batch_size, model):
                fold(batches, feed, runner.run_into(feed, fetched))
                batches += 1
                advance(len(next(iter(feed.values()))))
        if batches == 0:
            raise DataError("calibration data is empty")
        values = values_by_name(model.graph)
        for name, running in stats.items():
            values[name].meta[META_KEY] = running
            ann.set(values[name], self._annotation(name, running))
        return ir.passes.PassResult(model, True)

    def _dump(self, name: str, index: int, tensor: np.ndarray) -> None:
        write_npy(Path(self.dump_dir) / safe_filename(name) / f"{index:05d}.npy", tensor)

    def _ranges(self, s: StreamingStats) -> list[tuple[str, float]]:
        signed = s.min < 0.0
        out: list[tuple[str, float]] = []
        for method in self.methods:
            if method == "minmax":
                continue  # always available as TensorStats.absmax
            if method == "percentile":
                out.append((range_key(method, 0, self.percentile), percentile_range(s.abs_quantile, self.percentile)))
                continue
            chooser = entropy_range if method == "entropy" else mse_range
            for bits in self.bits:
                if signed and bits < 2:
                    continue
                out.append((range_key(method, bits, self.percentile), chooser(s.hist, s.range, bits, signed, s.absmax)))
        return out

    def _annotation(self, name: str, s: StreamingStats) -> ann.TensorStats:
        sidecar = None
        if self.sidecar_dir is not None:
            sidecar = f"{safe_filename(name)}.stats.npz"
            write_npz(Path(self.sidecar_dir) / sidecar, hist=s.hist, channel_hist=s.chist,
                      range=np.float64(s.range), reservoir=s.reservoir_sample())
        quantiles = s.abs_quantile(np.array(QUANTILES))
        per_channel = s.channels > 0 and s.count != s.samples
        return ann.TensorStats(
            count=s.count,
            samples=s.samples,
            min=s.min,
            max=s.max,
            absmax=s.absmax,
            mean=s.mean,
            std=s.std,
            abs_quantiles=tuple((q, float(v)) for q, v in zip(QUANTILES, quantiles)),
            ranges=tuple(self._ranges(s)),
            channel_axis=1 if per_channel else None,
            channel_min=tuple(float(v) for v in s.cmin) if per_channel else (),
            channel_max=tuple(float(v) for v in s.cmax) if per_channel else (),
            channel_mean=tuple(float(v) for v in s.channel_mean()) if per_channel else (),
            channel_std=tuple(float(v) for v in s.channel_std()) if per_channel else (),
            sidecar=sidecar,
        )

    def ensures(self, model: ir.Model) -> None:
        values = values_by_name(model.graph)
        for name in activation_names(model, self.post_activation):
            ann.require(values[name], ann.TensorStats, where="CalibratePass.ensures")
