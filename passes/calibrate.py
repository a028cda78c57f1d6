"""Calibration: stream data through onnxruntime once and record activation statistics.

For every activation that enters or leaves a quantizable layer the pass keeps running
per-tensor min/max/sum/sum of squares (float64) and per-channel (axis 1) min/max. Only one batch
of intermediate values exists at a time, so memory does not grow with the number of samples.
Results are stored as :class:`~qcompiler.annotations.TensorStats` on the values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from qcompiler import annotations as ann
from qcompiler.data import ArrayDataset, iter_feeds
from qcompiler.errors import DataError
from qcompiler.graph import values_by_name
from qcompiler.passes.detect_layers import quantizable_nodes
from qcompiler.progress import progress_bar
from qcompiler.runtime import Runner


class RunningStats:
    """Streaming statistics of one tensor (float64 accumulators)."""

    def __init__(self) -> None:
        self.count = 0
        self.samples = 0
        self.min = np.inf
        self.max = -np.inf
        self.total = 0.0
        self.total_sq = 0.0
        self.channel_min: np.ndarray | None = None
        self.channel_max: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        """Fold one batch (samples on axis 0) into the statistics."""
        if x.size == 0:
            return
        if not np.isfinite(x).all():
            raise DataError("activation contains NaN or Inf during calibration")
        x64 = x.astype(np.float64, copy=False)
        self.count += x.size
        self.samples += x.shape[0] if x.ndim else 1
        self.min = min(self.min, float(x64.min()))
        self.max = max(self.max, float(x64.max()))
        self.total += float(x64.sum())
        self.total_sq += float(np.square(x64).sum())
        if x.ndim >= 2:
            axes = tuple(a for a in range(x.ndim) if a != 1)
            cmin, cmax = x64.min(axis=axes), x64.max(axis=axes)
            if self.channel_min is None:
                self.channel_min, self.channel_max = cmin, cmax
            else:
                self.channel_min = np.minimum(self.channel_min, cmin)
                self.channel_max = np.maximum(self.channel_max, cmax)

    def annotation(self) -> ann.TensorStats:
        """The statistics as a :class:`TensorStats` annotation."""
        mean = self.total / self.count
        var = max(self.total_sq / self.count - mean * mean, 0.0)
        per_channel = self.channel_min is not None
        return ann.TensorStats(
            count=self.count,
            samples=self.samples,
            min=self.min,
            max=self.max,
            absmax=max(abs(self.min), abs(self.max)),
            mean=mean,
            std=float(np.sqrt(var)),
            channel_axis=1 if per_channel else None,
            channel_min=tuple(float(v) for v in self.channel_min) if per_channel else (),
            channel_max=tuple(float(v) for v in self.channel_max) if per_channel else (),
        )


def activation_names(model: ir.Model) -> list[str]:
    """Activations entering or leaving quantizable layers, in first-use order, without repeats."""
    names: list[str] = []
    for _, layer in quantizable_nodes(model):
        for name in (layer.activation_input, layer.output):
            if name not in names:
                names.append(name)
    return names


@dataclasses.dataclass(frozen=True)
class CalibratePass(ir.passes.InPlacePass):
    """Record :class:`TensorStats` for every activation of a quantizable layer.

    Attributes:
        data: calibration data (an :class:`ArrayDataset` or an iterable of feed dicts).
        batch_size: batch size used with an :class:`ArrayDataset`.
        show_progress: show a progress bar (only on a terminal).
    """

    data: ArrayDataset | Iterable[Mapping[str, np.ndarray]] = dataclasses.field(repr=False, compare=False)
    batch_size: int = 64
    # A display choice, not configuration: kept out of the repr so provenance (and therefore
    # the artifacts' bytes) do not depend on whether a terminal was attached.
    show_progress: bool = dataclasses.field(default=True, repr=False, compare=False)

    def requires(self, model: ir.Model) -> None:
        if not quantizable_nodes(model):
            raise ir.passes.PreconditionError("no QuantizableLayer annotations: run DetectLayersPass first")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        names = activation_names(model)
        graph_inputs = {v.name for v in model.graph.inputs}
        runner = Runner(model, [n for n in names if n not in graph_inputs])
        stats = {name: RunningStats() for name in names}
        total = self.data.num_samples if isinstance(self.data, ArrayDataset) else None
        batches = 0
        with progress_bar("calibrate", total, enabled=self.show_progress) as advance:
            for feed in iter_feeds(self.data, self.batch_size):
                outputs = runner.run(feed, [n for n in names if n not in graph_inputs])
                for name in names:
                    try:
                        stats[name].update(feed[name] if name in graph_inputs else outputs[name])
                    except DataError as exc:
                        raise DataError(f"calibration: value {name!r}: {exc}") from None
                batches += 1
                advance(len(next(iter(feed.values()))))
        if batches == 0:
            raise DataError("calibration data is empty")
        values = values_by_name(model.graph)
        for name, running in stats.items():
            ann.set(values[name], running.annotation())
        return ir.passes.PassResult(model, True)

    def ensures(self, model: ir.Model) -> None:
        values = values_by_name(model.graph)
        for name in activation_names(model):
            ann.require(values[name], ann.TensorStats, where="CalibratePass.ensures")
