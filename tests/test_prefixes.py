"""Parts of a model run on their own: prefixes, segments and incremental prefixes (algorithms.md §6.5)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qcompiler.errors import UnsupportedModelError
from qcompiler.graph import values_by_name
from qcompiler.ir import load_normalized
from qcompiler.prefixes import IncrementalPrefix, PrefixRunner, segment_model
from qcompiler.runtime import Runner

from conftest import make_model

#: the activation input of every weight layer, in topological order
LAYER_INPUTS = ("x", "r1", "r2", "r3", "f", "cat")


def branching_model() -> ir.Model:
    """Convs with a skip connection over two layers, and the graph input read again at the end."""
    rng = np.random.default_rng(0)
    inits = {
        "w1": (0.5 * rng.normal(size=(4, 3, 3, 3))).astype(np.float32),
        "w2": (0.5 * rng.normal(size=(4, 4, 3, 3))).astype(np.float32),
        "w3": (0.5 * rng.normal(size=(4, 4, 3, 3))).astype(np.float32),
        "w4": (0.5 * rng.normal(size=(4, 4, 3, 3))).astype(np.float32),
        "w5": rng.normal(size=(4, 2)).astype(np.float32),
        "w6": rng.normal(size=(5, 3)).astype(np.float32),
    }
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3, 6, 6] x) => (float[N, 3] y)
      <float[4,3,3,3] w1, float[4,4,3,3] w2, float[4,4,3,3] w3, float[4,4,3,3] w4, float[4,2] w5, float[5,3] w6> {
        c1 = Conv <pads = [1, 1, 1, 1]> (x, w1)
        r1 = Relu (c1)
        c2 = Conv <pads = [1, 1, 1, 1]> (r1, w2)
        r2 = Relu (c2)
        c3 = Conv <pads = [1, 1, 1, 1]> (r2, w3)
        a = Add (c3, r1)
        r3 = Relu (a)
        c4 = Conv <pads = [1, 1, 1, 1]> (r3, w4)
        p = GlobalAveragePool (c4)
        f = Flatten (p)
        y0 = MatMul (f, w5)
        px = GlobalAveragePool (x)
        fx = Flatten (px)
        cat = Concat <axis = 1> (y0, fx)
        y = MatMul (cat, w6)
    }
    """
    return load_normalized(make_model(text, inits))


def batches(count: int = 3, size: int = 5) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(size=(size, 3, 6, 6)).astype(np.float32)} for _ in range(count)]


def run_through(prefix: IncrementalPrefix, model: ir.Model, feeds: list[dict[str, np.ndarray]], names) -> None:
    """Request ``names`` one after another, each for every batch."""
    for name in names:
        segment = prefix.request(model, name)
        for index, feed in enumerate(feeds):
            segment(index, feed)


def run_requests(prefix: IncrementalPrefix, model: ir.Model, feeds: list[dict[str, np.ndarray]]) -> None:
    """Every layer input through the incremental prefix, checked against the whole prefix."""
    for name in LAYER_INPUTS:
        segment = prefix.request(model, name)
        whole = PrefixRunner(model, name)
        for index, feed in enumerate(feeds):
            np.testing.assert_array_equal(segment(index, feed), whole.run(feed), err_msg=name)


def test_incremental_prefixes_equal_whole_prefixes_on_a_branching_model() -> None:
    model, feeds = branching_model(), batches()
    prefix = IncrementalPrefix(len(feeds), budget_bytes=2**30)
    run_requests(prefix, model, feeds)
    assert prefix.frontier_bytes > 0  # the frontier was kept: later requests started from it


def test_a_request_runs_only_the_nodes_past_the_frontier_and_keeps_what_later_nodes_read() -> None:
    model, feeds = branching_model(), batches()
    prefix = IncrementalPrefix(len(feeds), budget_bytes=2**30)
    run_through(prefix, model, feeds, ("x", "r1", "r2"))
    # r1 is still read by the skip Add: it stays, next to r2
    assert set(prefix.frontier_names) == {"r1", "r2"}
    segment = prefix.request(model, "r3")
    assert segment.cut == ("r1", "r2")  # c3, Add and Relu only: nothing from x again
    for index, feed in enumerate(feeds):
        segment(index, feed)
    assert set(prefix.frontier_names) == {"r3"}  # the Add ran: r1 is no longer needed


def test_weights_changed_past_the_frontier_are_seen_by_the_next_request() -> None:
    """GPFQ rewrites a layer after its input was computed: the next request must use the new weights."""
    model, feeds = branching_model(), batches()
    prefix = IncrementalPrefix(len(feeds), budget_bytes=2**30)
    run_through(prefix, model, feeds, ("x", "r1", "r2"))
    w3 = values_by_name(model.graph)["w3"]
    w3.const_value = ir.tensor(np.round(w3.const_value.numpy() * 4) / 4, name="w3")
    segment = prefix.request(model, "r3")
    whole = PrefixRunner(model, "r3")
    for index, feed in enumerate(feeds):
        np.testing.assert_array_equal(segment(index, feed), whole.run(feed))


def test_frontiers_past_the_budget_are_recomputed_from_the_inputs() -> None:
    model, feeds = branching_model(), batches()
    prefix = IncrementalPrefix(len(feeds), budget_bytes=1)
    run_requests(prefix, model, feeds)
    assert prefix.frontier_bytes == 0
    # 5 samples · 4·6·6 float32 = 2880 bytes a batch: two feature maps of three batches fit 17280
    prefix = IncrementalPrefix(len(feeds), budget_bytes=3 * 2880)
    for name in ("x", "r1", "r2"):
        run_through(prefix, model, feeds, (name,))
        # r1 alone fits; r1 and r2 (the skip keeps r1) do not, so r2's request keeps nothing
        assert prefix.frontier_bytes == (3 * 2880 if name == "r1" else 0), name
    run_requests(prefix, model, feeds)


def test_an_unfinished_request_restarts_the_next_from_the_inputs() -> None:
    model, feeds = branching_model(), batches()
    prefix = IncrementalPrefix(len(feeds), budget_bytes=2**30)
    prefix.request(model, "r1")(0, feeds[0])  # only the first batch
    segment = prefix.request(model, "r3")
    assert segment.cut == ()
    whole = PrefixRunner(model, "r3")
    for index, feed in enumerate(feeds):
        np.testing.assert_array_equal(segment(index, feed), whole.run(feed))


def test_batches_must_come_in_order_and_names_must_exist() -> None:
    model, feeds = branching_model(), batches()
    prefix = IncrementalPrefix(len(feeds), budget_bytes=2**30)
    segment = prefix.request(model, "r1")
    with pytest.raises(ValueError, match="batch 1 asked for, expected 0"):
        segment(1, feeds[1])
    with pytest.raises(UnsupportedModelError, match="no value named 'nope'"):
        prefix.request(model, "nope")


def test_segment_model_cuts_an_intermediate_value_into_an_input() -> None:
    model, feeds = branching_model(), batches()
    r1 = PrefixRunner(model, "r1").run(feeds[0])
    segment = segment_model(model, ["r1", "x"], ["y"])
    assert sorted(v.name for v in segment.graph.inputs) == ["r1", "x"]
    assert "c1" not in values_by_name(segment.graph)  # the first conv is gone
    np.testing.assert_array_equal(Runner(segment).run({"x": feeds[0]["x"], "r1": r1})["y"], Runner(model).run(feeds[0])["y"])
    with pytest.raises(UnsupportedModelError, match="no value named 'nope'"):
        segment_model(model, ["nope"], ["y"])


def test_returned_values_cannot_be_written_into_the_frontier() -> None:
    model, feeds = branching_model(), batches(count=1)
    prefix = IncrementalPrefix(1, budget_bytes=2**30)
    r1 = prefix.request(model, "r1")(0, feeds[0])
    with pytest.raises(ValueError, match="read-only"):
        r1 += 1.0
    assert prefix.frontier_names == ["r1"]


def test_values_read_inside_if_branches_are_computed_from_the_inputs() -> None:
    """An If branch reads outer values that are no node's inputs: no frontier is trusted then."""
    rng = np.random.default_rng(2)
    inits = {"w1": rng.normal(size=(4, 4)).astype(np.float32), "w2": rng.normal(size=(4, 3)).astype(np.float32),
             "w3": rng.normal(size=(4, 4)).astype(np.float32)}
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x, bool c) => (float[N, 3] y) <float[4,4] w1, float[4,3] w2, float[4,4] w3> {
        h = MatMul (x, w1)
        r = Relu (h)
        h3 = MatMul (r, w3)
        b = If (c) <then_branch = g1 () => (float[N, 4] o) { o = Add (h, h3) },
                    else_branch = g2 () => (float[N, 4] o2) { o2 = Sub (h, h3) }>
        y = MatMul (b, w2)
    }
    """
    model = load_normalized(make_model(text, inits))
    feeds = [{"x": rng.normal(size=(3, 4)).astype(np.float32), "c": np.array(flag)} for flag in (True, False)]
    prefix = IncrementalPrefix(len(feeds), budget_bytes=2**30)
    for name in ("x", "r", "b"):
        segment = prefix.request(model, name)
        whole = PrefixRunner(model, name)
        for index, feed in enumerate(feeds):
            np.testing.assert_array_equal(segment(index, feed), whole.run(feed), err_msg=name)
