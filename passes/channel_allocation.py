"""Channel-wise bit allocation for one named feature tensor (seed 001).

Builds the suffix from the feature to the logits, the offline interval table on calibration
samples, and evaluates per bit width the per-tensor uniform baseline, the seed's online
allocation (α, β, reserve), the closed-form allocation and the DoReFa baseline on evaluation
samples. The result is a :class:`~qcompiler.annotations.ChannelAllocation` annotation on the
feature. See :mod:`qcompiler.channelwise` for the math.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from qcompiler import annotations as ann
from qcompiler import channelwise as cw
from qcompiler.data import ArrayDataset, iter_feeds
from qcompiler.errors import DataError, UnsupportedModelError
from qcompiler.graph import values_by_name
from qcompiler.runtime import Runner
from qcompiler.suffix import build_suffix

Data = ArrayDataset | Iterable[Mapping[str, np.ndarray]]


def _features(model: ir.Model, name: str, data: Data, limit: int, batch_size: int) -> np.ndarray:
    runner = Runner(model, [name])
    parts, seen = [], 0
    for feed in iter_feeds(data, batch_size):
        parts.append(runner.run(feed, [name])[name])
        seen += parts[-1].shape[0]
        if seen >= limit:
            break
    if not parts:
        raise DataError("channel allocation data is empty")
    return np.concatenate(parts)[:limit]


@dataclasses.dataclass(frozen=True)
class ChannelAllocationPass(ir.passes.InPlacePass):
    """Seed 001's channel-wise interval allocation for ``tensor``.

    Attributes:
        data: calibration data for the offline table (first ``table_samples`` samples).
        tensor: the feature's value name (samples on axis 0, channels on axis 1).
        eval_data: evaluation data (defaults to ``data``).
        quantizer: ``uniform``, ``log`` (consistent) or ``log_faithful`` (Q001-1).
        bits: bit widths to allocate and report.
        alpha, beta: mean and spread priorities of the online score.
        reserve: intervals kept for the online iterative refinement (R).
        table_samples, eval_samples: how many samples each stage uses.
        batch_size: batch size for feature extraction.
    """

    data: Data = dataclasses.field(repr=False, compare=False)
    tensor: str = ""
    eval_data: Data | None = dataclasses.field(default=None, repr=False, compare=False)
    quantizer: str = "uniform"
    bits: tuple[int, ...] = cw.BITS
    alpha: float = 0.9
    beta: float = 0.1
    reserve: int = 10
    table_samples: int = 32
    eval_samples: int = 128
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.quantizer not in cw.QUANTIZERS:
            raise ValueError(f"quantizer must be one of {sorted(cw.QUANTIZERS)}, got {self.quantizer!r}")
        if not self.bits or min(self.bits) < 1 or max(self.bits) > 12:
            raise ValueError(f"bits must be in 1..12, got {self.bits}")
        if self.reserve < 0:
            raise ValueError("reserve must be >= 0")
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"alpha and beta are priority weights, >= 0 (got {self.alpha}, {self.beta})")

    def requires(self, model: ir.Model) -> None:
        value = values_by_name(model.graph).get(self.tensor)
        if value is None:
            raise ir.passes.PreconditionError(f"the model has no value named {self.tensor!r}")
        if value.shape is None or len(value.shape) < 2:
            raise ir.passes.PreconditionError(f"{self.tensor!r} has no channel axis (shape {value.shape})")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        suffix = build_suffix(model, ir.to_proto(model), self.tensor)
        if suffix.runner is None or not suffix.outputs:
            raise UnsupportedModelError(f"{self.tensor!r} does not reach the model's logits through other nodes")
        if len(suffix.inputs) > 1:
            raise UnsupportedModelError(
                f"the suffix after {self.tensor!r} also needs {suffix.inputs[1:]}: a split point must cut the graph"
            )
        logits = suffix.outputs[0]

        def backend(x: np.ndarray) -> np.ndarray:
            return suffix.run({self.tensor: x})[logits]

        x_table = _features(model, self.tensor, self.data, self.table_samples, self.batch_size)
        x_eval = _features(model, self.tensor, self.eval_data if self.eval_data is not None else self.data,
                           self.eval_samples, self.batch_size)
        report, tables, gains = cw.evaluate(backend, self.quantizer, x_table, x_eval, tuple(self.bits),
                                            self.alpha, self.beta, self.reserve)
        channels = x_eval.shape[1]
        closed = tuple(tuple(int(v) for v in cw.closed_form_allocation(gains, channels * ((1 << b) - 1)))
                       for b in self.bits)
        ann.set(
            values_by_name(model.graph)[self.tensor],
            ann.ChannelAllocation(
                quantizer=self.quantizer,
                bits=tuple(self.bits),
                table=tuple(tuple(float(v) for v in tables[b].sum(axis=0)) for b in self.bits),
                gains=tuple(float(g) for g in gains),
                curves=tuple(tuple(float(v) for v in row)
                             for row in cw.channel_curves(backend, self.quantizer, x_table, tuple(self.bits))),
                closed_form=closed,
                mse_uniform=report.uniform,
                mse_allocated=report.allocated,
                mse_closed_form=report.closed_form,
                mse_dorefa=report.dorefa,
                alpha=self.alpha,
                beta=self.beta,
                reserve=self.reserve,
            ),
        )
        return ir.passes.PassResult(model, True)
