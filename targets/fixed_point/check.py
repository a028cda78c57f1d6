"""The integer simulator against the QDQ simulation ONNX, in the integer domain."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.data import ArrayDataset
from qcompiler.graph import values_by_name
from qcompiler.runtime import Runner
from qcompiler.targets.fixed_point.simulator import IntegerSimulator


@dataclasses.dataclass(frozen=True)
class SimulatorCheck:
    """How the integer simulator compares with onnxruntime on the QDQ model (optimisations off).

    Attributes:
        samples: the number of samples compared.
        quantizers: quantized activations whose codes were compared.
        codes_compared: the number of integer codes compared.
        codes_mismatched: codes that differ.
        output_max_abs_diff: the largest difference of a graph output (0 when exact).
        float32_risks: layers whose worst-case float32 accumulation reaches 2^24.
        simulator_seconds, onnxruntime_seconds: wall time of the two runs.
    """

    samples: int
    quantizers: int
    codes_compared: int
    codes_mismatched: int
    output_max_abs_diff: float
    float32_risks: tuple[str, ...]
    simulator_seconds: float
    onnxruntime_seconds: float

    @property
    def exact(self) -> bool:
        """Every code and every output equal."""
        return self.codes_mismatched == 0 and self.output_max_abs_diff == 0.0

    def as_dict(self) -> dict[str, Any]:
        """The report section."""
        out = dataclasses.asdict(self)
        out["float32_risks"] = list(self.float32_risks)
        out["exact"] = self.exact
        return out


def code_values(simulation: ir.Model, activations: list[str]) -> dict[str, str]:
    """The QDQ model's value holding each activation's codes (after the Clip when there is one)."""
    values = values_by_name(simulation.graph)
    found = {}
    for name in activations:
        for candidate in (f"{name}_clipped", f"{name}_quantized"):
            if candidate in values and not values[candidate].is_initializer():
                found[name] = candidate
                break
    return found


def check_integer_simulator(
    model: ir.Model, simulation: ir.Model, data: ArrayDataset, max_batches: int | None = None, batch_size: int = 64
) -> SimulatorCheck:
    """Run the integer simulator and the QDQ model on ``data`` and compare codes and outputs."""
    simulator = IntegerSimulator(model)
    mapping = code_values(simulation, sorted(simulator.formats))
    runner = Runner(simulation, extra_outputs=sorted(mapping.values()))
    outputs = runner.model_outputs
    compared = mismatched = samples = 0
    worst = 0.0
    t_sim = t_ort = 0.0
    for i, feed in enumerate(data.batches(batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        start = time.perf_counter()
        sim_out, sim_codes = simulator.run(feed)
        t_sim += time.perf_counter() - start
        start = time.perf_counter()
        ref = runner.run(feed, [*outputs, *mapping.values()])
        t_ort += time.perf_counter() - start
        samples += len(next(iter(feed.values())))
        for name, qdq_name in mapping.items():
            a, b = sim_codes[name], ref[qdq_name].astype(np.int64)
            compared += a.size
            mismatched += int(np.count_nonzero(a != b))
        for name in outputs:
            diff = np.abs(sim_out[name].astype(np.float64) - ref[name].astype(np.float64))
            worst = max(worst, float(diff.max()) if diff.size else 0.0)
    return SimulatorCheck(samples, len(mapping), compared, mismatched, worst, tuple(simulator.float32_risks),
                          round(t_sim, 4), round(t_ort, 4))
