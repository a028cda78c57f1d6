"""onnxruntime wrapper: sessions that expose intermediate values, with optimisation on or off.

"Simulated" numbers come from sessions with graph optimisations disabled (Q/DQ execute
literally as fake-quant, the reference semantics of the file); "ORT kernel" numbers come from
default sessions, where onnxruntime may fuse Q/DQ into integer kernels.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from qcompiler.errors import UnsupportedModelError
from qcompiler.graph import values_by_name
from qcompiler.ir import to_bytes


def session_options(optimize: bool, threads: int = 0, arena: bool = True, prepack: bool = True) -> ort.SessionOptions:
    """Session options: ``optimize`` False disables every graph optimisation; ``arena`` False
    returns each run's memory instead of keeping it for the next run; ``prepack`` False keeps
    constant GEMM operands unpacked, so a product gives the same bits whether its weight is an
    initializer or fed as an input (see :mod:`qcompiler.suffix`)."""
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = arena
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # onnxruntime's workers spin after each run; qcompiler runs numpy/numba work between runs
    # (statistics, quantizers), which would compete with spinning threads for the same cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


#: Operators whose literal execution defines qcompiler's "simulated" numbers; onnxruntime's graph
#: optimisations would fuse them into integer kernels.
QUANTIZATION_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "QLinearAdd", "QLinearMul", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearLeakyRelu",
    "QLinearSigmoid", "QLinearConcat", "QLinearSoftmax", "QGemm", "ConvInteger", "MatMulInteger",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits",
})


def is_float_graph(model: ir.Model) -> bool:
    """Whether no node of ``model`` (subgraphs and local functions included) is a quantization
    operator."""
    graphs = [model.graph, *(function.graph for function in model.functions.values())]
    return not any(node.op_type in QUANTIZATION_OPS for graph in graphs for node in ir.traversal.RecursiveGraphIterator(graph))


def with_outputs(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A copy of ``model`` whose graph outputs are its own outputs plus ``names``."""
    clone = model.clone()
    values = values_by_name(clone.graph)
    present = {v.name for v in clone.graph.outputs}
    for name in names:
        if name in present:
            continue
        value = values.get(name)
        if value is None:
            raise UnsupportedModelError(f"model has no value named {name!r}")
        if value.is_graph_input():
            continue  # Runner.run returns graph inputs from the feed
        if value.is_initializer():
            raise UnsupportedModelError(f"value {name!r} is an initializer, not an intermediate")
        if value.type is None:
            raise UnsupportedModelError(f"value {name!r} has no inferred type; run shape inference")
        clone.graph.outputs.append(value)
        present.add(name)
    return clone


class Runner:
    """An onnxruntime session over a model, optionally exposing intermediate values.

    Args:
        model: the model (not modified).
        extra_outputs: intermediate values to return besides the graph outputs.
        optimize: enable onnxruntime graph optimisations ("ORT kernel" mode).
        threads: intra-op threads (0 = onnxruntime's default).
        arena: keep onnxruntime's memory arena between runs (the default). Without it each run
            returns its memory: for the many sessions that stay open side by side (one per
            profiled tensor), whose arenas would each keep their largest run.
        prepack: let onnxruntime prepack constant GEMM operands (the default). Profiling turns
            it off in all its sessions, whose suffix models are fed their weights as inputs.
    """

    def __init__(
        self,
        model: ir.Model,
        extra_outputs: Sequence[str] = (),
        optimize: bool = False,
        threads: int = 0,
        arena: bool = True,
        prepack: bool = True,
    ) -> None:
        exposed = with_outputs(model, extra_outputs) if extra_outputs else model
        try:
            self.session = ort.InferenceSession(
                to_bytes(exposed), session_options(optimize, threads, arena, prepack), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            detail = " ".join(str(exc).split())[:400]
            raise UnsupportedModelError(f"onnxruntime cannot load the model: {detail}") from exc
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.model_outputs = [v.name for v in model.graph.outputs]
        self.input_names = [i.name for i in self.session.get_inputs()]
        # run_into's output buffers, for one (names, input shapes) key at a time
        self._bound_key: tuple | None = None
        self._bound: dict[str, np.ndarray] = {}

    def run(self, feed: Mapping[str, np.ndarray], names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run one batch; return the requested outputs (default: all) by name.

        Names of graph inputs are answered from ``feed``; extra feed entries are ignored.
        """
        wanted = list(names) if names is not None else self.output_names
        fetched = [n for n in wanted if n not in self.input_names]
        inputs = {n: feed[n] for n in self.input_names}
        results = dict(zip(fetched, self.session.run(fetched, inputs))) if fetched else {}
        return self._answer(feed, results, wanted)

    def run_into(self, feed: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
        """Like :meth:`run`, but onnxruntime writes the outputs into buffers reused across calls.

        Saves an allocation and a copy of every output per batch (5-10 % of the run when dozens
        of intermediate values are fetched). The returned arrays are overwritten by the next
        call with the same names and input shapes: consume them before running again.
        """
        wanted = list(names)
        fetched = [n for n in wanted if n not in self.input_names]
        inputs = {n: np.ascontiguousarray(feed[n]) for n in self.input_names}
        key = (tuple(fetched), tuple((n, a.shape, a.dtype.str) for n, a in inputs.items()))
        if key != self._bound_key:
            # First batch of this shape: a plain run finds the output shapes; its fresh
            # arrays become the buffers of the next calls.
            self._bound = self.run(feed, fetched)
            self._bound_key = key
        else:
            binding = self.session.io_binding()
            for n, a in inputs.items():
                binding.bind_cpu_input(n, a)
            for n in fetched:
                out = self._bound[n]
                binding.bind_output(n, "cpu", 0, out.dtype, list(out.shape), out.ctypes.data)
            try:
                self.session.run_with_iobinding(binding)
            except Exception:  # an output whose shape depends on the data: allocate afresh
                self._bound = self.run(feed, fetched)
        return self._answer(feed, self._bound, wanted)

    def _answer(self, feed: Mapping[str, np.ndarray], results: Mapping[str, np.ndarray], wanted: list[str]) -> dict[str, np.ndarray]:
        """The wanted values by name: graph inputs from the feed, the rest from the results."""
        return {n: (feed[n] if n in self.input_names and n not in results else results[n]) for n in wanted}

    def stream(
        self, feeds: Iterable[Mapping[str, np.ndarray]], names: Sequence[str] | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Run batch after batch, yielding each batch's outputs (nothing is accumulated)."""
        for feed in feeds:
            yield self.run(feed, names)

    def collect(self, feeds: Iterable[Mapping[str, np.ndarray]], names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run all batches and concatenate the outputs along axis 0 (for small outputs only)."""
        parts: dict[str, list[np.ndarray]] = {}
        for out in self.stream(feeds, names):
            for k, v in out.items():
                parts.setdefault(k, []).append(v)
        return {k: np.concatenate(v, axis=0) for k, v in parts.items()}


def float_runner(model: ir.Model, extra_outputs: Sequence[str] = (), threads: int = 0) -> Runner:
    """A :class:`Runner` for a float model, with onnxruntime's graph optimisations when the
    graph has no quantization operator (graphs with Q/DQ stay unoptimised: there the literal
    execution is the simulation).

    Calibration uses it. The optimised session runs the example models 1.5-2.2x faster than the
    unoptimised one; with calibration's intermediate values fetched, 1.2-1.6x (bench/RESULTS.md,
    issue 3). Its fusions (Conv with its activation or a following Add, the blocked NCHWc
    layout) change values at float rounding level only, but which fusions apply depends on the
    values fetched: compare such runs with a session that fetches the same values. GPFQ's layer
    inputs stay unoptimised, so that incremental prefixes equal whole prefixes exactly.
    """
    return Runner(model, extra_outputs, optimize=is_float_graph(model), threads=threads)
