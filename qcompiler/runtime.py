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
from qcompiler.graph import is_constant, values_by_name
from qcompiler.ir import to_bytes


def session_options(optimize: bool, threads: int = 0) -> ort.SessionOptions:
    """Session options: ``optimize`` False disables every graph optimisation."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # onnxruntime's workers spin after each run; qcompiler runs numpy/numba work between runs
    # (statistics, quantizers), which would compete with spinning threads for the same cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


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
    """

    def __init__(
        self,
        model: ir.Model,
        extra_outputs: Sequence[str] = (),
        optimize: bool = False,
        threads: int = 0,
    ) -> None:
        exposed = with_outputs(model, extra_outputs) if extra_outputs else model
        try:
            self.session = ort.InferenceSession(
                to_bytes(exposed), session_options(optimize, threads), providers=["CPUExecutionProvider"]
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


def prefix_model(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A copy of ``model`` that computes only ``names`` (and what they need) as its outputs."""
    import onnx_ir.passes.common as common_passes

    clone = model.clone()
    values = values_by_name(clone.graph)
    missing = [n for n in names if n not in values]
    if missing:
        raise UnsupportedModelError(f"model has no value named {missing[0]!r}")
    clone.graph.outputs.clear()
    for name in names:
        clone.graph.outputs.append(values[name])
    common_passes.RemoveUnusedNodesPass()(clone)
    return clone


class PrefixRunner:
    """Computes one value of a model per batch, running only the nodes it depends on.

    A graph input is answered from the feed without a session.
    """

    def __init__(self, model: ir.Model, name: str, threads: int = 0) -> None:
        self.name = name
        inputs = {v.name for v in model.graph.inputs}
        self.runner = None if name in inputs else Runner(prefix_model(model, [name]), threads=threads)

    def run(self, feed: Mapping[str, np.ndarray]) -> np.ndarray:
        """The value for one batch."""
        if self.runner is None:
            return np.asarray(feed[self.name])
        return self.runner.run(feed, [self.name])[self.name]


def segment_model(model: ir.Model, inputs: Sequence[str], outputs: Sequence[str]) -> ir.Model:
    """A copy of ``model`` cut to the nodes between ``inputs`` and ``outputs``.

    Each name in ``inputs`` becomes a graph input (an intermediate value is detached from its
    producer); ``outputs`` become the graph outputs, and the nodes they do not need are removed.
    """
    import onnx_ir.passes.common as common_passes

    clone = model.clone()
    graph = clone.graph
    values = values_by_name(graph)
    missing = [n for n in (*inputs, *outputs) if n not in values]
    if missing:
        raise UnsupportedModelError(f"model has no value named {missing[0]!r}")
    results = [values[name] for name in outputs]
    graph.outputs.clear()
    cut = []
    for name in inputs:
        old = values[name]
        if old.is_graph_input():
            cut.append(old)
            continue
        new = ir.Value(name=name, shape=old.shape, type=old.type)
        old.name = f"{name}__before_cut"  # the producer's copy goes away with the unused nodes
        ir.convenience.replace_all_uses_with(old, new)
        cut.append(new)
    graph.inputs.clear()
    graph.inputs.extend(cut)
    graph.outputs.extend(results)
    common_passes.RemoveUnusedNodesPass()(clone)
    return clone


class IncrementalPrefix:
    """Values of a model requested one after another in topological order, each computed for
    every batch from the values the previous request left behind (the *frontier*) instead of
    from the graph inputs (algorithms.md §6.5, incremental prefixes).

    A layer-by-layer pass that asks for each layer's input with :class:`PrefixRunner` runs the
    network's first nodes once per layer; here every node runs about once per batch in all.
    The frontier of a batch is every computed value that a node not yet run still consumes.

    The model may change between requests (GPFQ rewrites a layer after its input was asked for)
    but only in nodes that have not run: a layer consumes its requested input, so it lies past
    the frontier. Frontiers are kept for every batch while they fit in ``budget_bytes``; when
    they would not, the request is answered and the next one starts again from the graph
    inputs, so memory stays bounded whatever the number of batches. A model with If/Loop bodies
    (which read outer values without naming them as node inputs) is run from the graph inputs
    on every request.

    Use: ``segment = prefix.request(model, name)``, then ``segment(i, feed)`` for every batch
    ``i`` in ``range(batches)``, in order. A request made before the previous one ran every
    batch starts from the graph inputs.

    Args:
        batches: the number of batches every request runs.
        budget_bytes: the most the kept frontiers of all batches may take.
        threads: intra-op threads of the segment sessions (0 = onnxruntime's default).
    """

    def __init__(self, batches: int, budget_bytes: int, threads: int = 0) -> None:
        self.batches = batches
        self.budget_bytes = budget_bytes
        self.threads = threads
        self._frontiers: list[dict[str, np.ndarray]] = [{} for _ in range(batches)]
        self._computed: set[str] = set()
        self._complete = True  # the last request ran every batch

    def request(self, model: ir.Model, name: str) -> PrefixSegment:
        """The segment that computes ``name`` (one call per batch, see the class docstring)."""
        if not self._complete:
            self._reset()
        graph = model.graph
        inputs = {v.name for v in graph.inputs}
        if name in inputs or name in self._frontiers[0]:
            return PrefixSegment(self, name, None, (), (), ())
        if _has_subgraphs(graph):
            # If/Loop bodies read outer values that are no node's inputs: no frontier is tracked
            self._reset()
            return PrefixSegment(self, name, Runner(prefix_model(model, [name]), threads=self.threads), (), (), ())
        available = set(self._frontiers[0])
        nodes, cut, fed = _segment_nodes(values_by_name(graph)[name], available, inputs)
        # constants (Constant nodes) are recomputed by every segment rather than cached
        produced = {v.name for node in nodes for v in node.outputs if not is_constant(v)}
        computed = self._computed | produced
        # values a node not run yet still needs: they stay (or become) the frontier
        needed = {v.name for node in graph if not _has_run(node, computed)
                  for v in node.inputs if v is not None and v.name in computed}
        keep = [n for n in sorted(produced) if n in needed and n != name]
        drop = tuple(n for n in available if n not in needed)
        outputs = [name, *(n for n in keep if n != name)]
        if name in needed:
            keep.append(name)
        runner = Runner(segment_model(model, [*cut, *fed], outputs), threads=self.threads)
        self._computed = computed
        self._complete = False
        return PrefixSegment(self, name, runner, tuple(cut), tuple(keep), drop)

    @property
    def frontier_names(self) -> list[str]:
        """The values kept at the frontier (the same for every batch)."""
        return sorted(self._frontiers[0]) if self._frontiers else []

    @property
    def frontier_bytes(self) -> int:
        """The memory the kept frontiers of all batches take."""
        return sum(a.nbytes for frontier in self._frontiers for a in frontier.values())

    def _reset(self) -> None:
        self._frontiers = [{} for _ in range(self.batches)]
        self._computed = set()

    def _fits(self, frontier: Mapping[str, np.ndarray]) -> bool:
        return sum(a.nbytes for a in frontier.values()) * self.batches <= self.budget_bytes


class PrefixSegment:
    """One request of :class:`IncrementalPrefix`: call it with each batch index and feed in order."""

    def __init__(
        self, owner: IncrementalPrefix, name: str, runner: Runner | None,
        cut: tuple[str, ...], keep: tuple[str, ...], drop: tuple[str, ...],
    ) -> None:
        self.owner, self.name, self.runner = owner, name, runner
        self.cut, self.keep, self.drop = cut, keep, drop
        self._next = 0
        self._keeping = True

    def __call__(self, index: int, feed: Mapping[str, np.ndarray]) -> np.ndarray:
        """The requested value for batch ``index``."""
        owner = self.owner
        if index != self._next:
            raise ValueError(f"prefix segment {self.name!r}: batch {index} asked for, expected {self._next}")
        self._next += 1
        frontier = owner._frontiers[index]
        if self.runner is None:
            return _read_only(frontier[self.name] if self.name in frontier else np.asarray(feed[self.name]))
        out = self.runner.run({**feed, **{n: frontier[n] for n in self.cut}}, self.runner.model_outputs)
        for name in self.drop:
            del frontier[name]
        frontier.update((name, out[name]) for name in self.keep)
        if index == 0:
            self._keeping = owner._fits(frontier)
        if not self._keeping:
            frontier.clear()
        if self._next == owner.batches:
            owner._complete = True
            if not self._keeping:
                owner._computed = set()
        return _read_only(out[self.name])


def _read_only(array: np.ndarray) -> np.ndarray:
    """A view that cannot be written: the array may also be a kept frontier value."""
    view = array.view()
    view.flags.writeable = False
    return view


def _segment_nodes(
    target: ir.Value, available: set[str], inputs: set[str]
) -> tuple[list[ir.Node], list[str], list[str]]:
    """The nodes that compute ``target`` from the ``available`` values and the graph ``inputs``
    (graph order), the available values they read and the graph inputs they read."""
    seen: set[int] = set()
    nodes: dict[int, ir.Node] = {}
    cut: list[str] = []
    fed: list[str] = []
    stack = [target]
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if value.name in available:
            cut.append(value.name)
            continue
        if value.name in inputs:
            fed.append(value.name)
            continue
        producer = value.producer()
        if producer is None or id(producer) in nodes:
            continue  # an initializer, or a node already taken
        nodes[id(producer)] = producer
        stack.extend(v for v in producer.inputs if v is not None)
    return list(nodes.values()), sorted(cut), sorted(fed)


def _has_subgraphs(graph: ir.Graph) -> bool:
    return any(attr.type == ir.AttributeType.GRAPH or attr.type == ir.AttributeType.GRAPHS
               for node in graph for attr in node.attributes.values())


def _has_run(node: ir.Node, computed: set[str]) -> bool:
    return bool(node.outputs) and all(v.name in computed for v in node.outputs)
