"""Parts of a model run on their own: prefixes up to a value, segments cut at intermediate
values, and incremental prefixes that continue from where the previous request stopped
(GPFQ's layer inputs, algorithms.md §6.5)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from qcompiler.errors import UnsupportedModelError
from qcompiler.graph import is_constant, values_by_name
from qcompiler.runtime import Runner


def prefix_model(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A copy of ``model`` that computes only ``names`` (and what they need) as its outputs."""
    return segment_model(model, [v.name for v in model.graph.inputs], names)


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
        values = values_by_name(graph)
        if name not in values:
            raise UnsupportedModelError(f"model has no value named {name!r}")
        inputs = {v.name for v in graph.inputs}
        if name in inputs or name in self._frontiers[0]:
            return PrefixSegment(self, name, None, (), (), ())
        if _has_subgraphs(graph):
            # If/Loop bodies read outer values that are no node's inputs: no frontier is tracked
            self._reset()
            return PrefixSegment(self, name, Runner(prefix_model(model, [name]), threads=self.threads), (), (), ())
        available = set(self._frontiers[0])
        nodes, cut, fed = _segment_nodes(values[name], available, inputs)
        # constants (Constant nodes) are recomputed by every segment rather than cached
        produced = {v.name for node in nodes for v in node.outputs if not is_constant(v)}
        computed = self._computed | produced
        # values a node not run yet still needs: they stay (or become) the frontier
        needed = {v.name for node in graph if not _has_run(node, computed)
                  for v in node.inputs if v is not None and v.name in computed}
        keep = [n for n in sorted(produced) if n in needed and n != name]
        drop = tuple(sorted(n for n in available if n not in needed))
        outputs = [name, *keep]
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

    def _advance(self, segment: PrefixSegment, index: int, feed: Mapping[str, np.ndarray]) -> np.ndarray:
        """Run ``segment`` on batch ``index`` and move that batch's frontier past it; the last
        batch completes the request."""
        frontier = self._frontiers[index]
        if segment.runner is None:
            return frontier[segment.name] if segment.name in frontier else np.asarray(feed[segment.name])
        runner = segment.runner
        out = runner.run({**feed, **{n: frontier[n] for n in segment.cut}}, runner.model_outputs)
        for name in segment.drop:
            del frontier[name]
        frontier.update((name, out[name]) for name in segment.keep)
        if index == 0:
            segment.keeping = self._fits(frontier)
        if not segment.keeping:
            frontier.clear()
        if segment.next_batch == self.batches:
            self._complete = True
            if not segment.keeping:
                self._computed = set()
        return out[segment.name]

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
        self.next_batch = 0
        self.keeping = True  # the frontiers fit the budget (decided on the first batch)

    def __call__(self, index: int, feed: Mapping[str, np.ndarray]) -> np.ndarray:
        """The requested value for batch ``index``."""
        if index != self.next_batch:
            raise ValueError(f"prefix segment {self.name!r}: batch {index} asked for, expected {self.next_batch}")
        self.next_batch += 1
        return _read_only(self.owner._advance(self, index, feed))


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
