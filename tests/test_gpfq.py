"""GPFQ: the layer algorithm (both forms, grids, streaming) and the ONNX rewrite pass."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompiler import annotations as ann
from qcompiler.data import ArrayDataset
from qcompiler.gpfq import (
    AlphabetGrid,
    PROJECTION_BLOCK,
    GramAccumulator,
    ReferenceGrid,
    UniformGrid,
    act_order,
    channel_scales,
    code_range,
    data_form_is_cheaper,
    gpfq_blocked,
    gpfq_columns,
    gpfq_data,
    gpfq_sweep,
    paper_alphabet,
    projection_is_cheaper,
    reference_step,
    relative_error,
    relative_error_from_projections,
    relative_error_on_rows,
    sample_slices,
)
from qcompiler.graph import const_array, values_by_name
from qcompiler.ir import load_normalized
from qcompiler.layer_matrix import from_weight_matrix, geometry, rows, rows_per_sample, weight_matrix
from qcompiler.passes.gpfq import GPFQConfigError, GPFQPass
from qcompiler.passes.pipelines import canonical_pipeline
from qcompiler.pipeline import PipelineError, run_pipeline
from qcompiler.qdq import integer_codes, lower_to_qdq
from qcompiler.runtime import Runner

from conftest import make_model


class Identity:
    """The infinite-bit quantizer."""

    def quantize(self, v: np.ndarray, t: int) -> np.ndarray:
        return v


def fixture_data(n: int, d: int, m: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """§6.7: W ~ 0.1·N(0, 1), X = relu(N(0, 1)), X̃ = X + 0.05·N(0, 1)."""
    rng = np.random.default_rng(seed)
    w = 0.1 * rng.normal(size=(n, d))
    x = np.maximum(rng.normal(size=(m, d)), 0.0)
    return w, x, x + 0.05 * rng.normal(size=(m, d))


def gram(x: np.ndarray, xt: np.ndarray, w: np.ndarray | None = None, project: bool = False) -> GramAccumulator:
    acc = GramAccumulator(x.shape[1], weights=None if w is None else w[None], project=project)
    acc.update(x[None], xt[None])
    return acc


# --------------------------------------------------------------------------- layer algorithm


def test_hand_case_matches_the_spec() -> None:
    x = np.array([[1.0, 0.0], [1.0, 1.0]])
    w = np.array([[0.4, 0.4]])
    grid = ReferenceGrid(delta=1.0, K=1)
    q, u = gpfq_columns(w, x, x, grid)
    assert q.tolist() == [[0.0, 1.0]]
    assert np.linalg.norm(u) == pytest.approx(np.sqrt(0.2))
    h = np.array([[2.0, 1.0], [1.0, 1.0]])
    assert np.array_equal(gpfq_blocked(w, h, h, grid), q)
    # round to nearest keeps (0, 0): residual sqrt(0.8)
    assert np.linalg.norm(x @ w.T - x @ grid.quantize(w, 0).T) == pytest.approx(np.sqrt(0.8))


@pytest.mark.parametrize(("n", "d", "m", "bits", "scalar"), [(48, 300, 600, 4, 1.16), (64, 577, 2000, 3, 1.0)])
def test_blocked_form_equals_the_recursion_level_for_level(n: int, d: int, m: int, bits: int, scalar: float) -> None:
    w, x, xt = fixture_data(n, d, m)
    grid = ReferenceGrid(reference_step(w, bits, scalar), 1 << (bits - 1))
    q_ref, u = gpfq_columns(w, x, xt, grid)
    acc = gram(x, xt)
    for block in (1, 7, 128):
        q = gpfq_blocked(w, acc.h[0], acc.g[0], grid, block)
        assert np.count_nonzero(q != q_ref) == 0, block
    norm, rel = relative_error(w, q_ref, acc.h[0], acc.g[0], acc.f[0])
    assert norm == pytest.approx(np.linalg.norm(u), rel=1e-8)
    _, rel_msq = relative_error(w, grid.quantize(w, 0), acc.h[0], acc.g[0], acc.f[0])
    assert rel < 0.9 * rel_msq  # about 15 % below MSQ on this data
    # G and F never formed, only projected on W while streaming: the same levels and error
    projected = GramAccumulator(d, weights=w[None], project=True)
    for part in np.array_split(np.arange(m), [100, 101, 450]):
        projected.update(x[part][None], xt[part][None])
    for block in (1, 7, 128):
        q = gpfq_sweep(projected.lower_projection(0), projected.h[0], grid, block)
        assert np.count_nonzero(q != q_ref) == 0, block
    wg, energy = projected.report_terms(0)
    assert relative_error_from_projections(q_ref, projected.h[0], wg, energy)[0] == pytest.approx(norm, rel=1e-8)
    assert energy == pytest.approx(np.linalg.norm(x @ w.T) ** 2, rel=1e-12)


def test_projected_products_equal_the_projections_of_the_whole_ones() -> None:
    """A = W·tril(G)ᵀ, W·Gᵀ and ‖XWᵀ‖² streamed per batch (two groups, rows kept then folded,
    d not a multiple of the projection block) equal those of the streamed G and F."""
    rng = np.random.default_rng(3)
    groups, n, d = 2, 9, 2 * PROJECTION_BLOCK + 5
    w = rng.normal(size=(groups, n, d))
    whole = GramAccumulator(d, groups, weights=w, keep_rows=d)
    projected = GramAccumulator(d, groups, weights=w, keep_rows=d, project=True)
    for size in (60, 1, 200, 37):
        x = np.maximum(rng.normal(size=(groups, size, d)), 0.0)
        xt = x + 0.05 * rng.normal(size=x.shape)
        whole.update(x, xt)
        projected.update(x, xt)
    for k in range(groups):
        np.testing.assert_allclose(projected.h[k], whole.h[k], rtol=1e-12)
        a = projected.lower_projection(k)
        np.testing.assert_allclose(a, w[k] @ np.tril(whole.g[k]).T, rtol=1e-10, atol=1e-10 * np.abs(a).max())
        (wg, energy), (wg_whole, energy_whole) = projected.report_terms(k), whole.report_terms(k)
        np.testing.assert_allclose(wg, wg_whole, rtol=1e-10, atol=1e-10 * np.abs(wg).max())
        assert energy == pytest.approx(energy_whole, rel=1e-12)
    with pytest.raises(AttributeError, match="projections"):
        _ = projected.g
    with pytest.raises(ValueError, match="weights"):
        GramAccumulator(d, project=True)
    with pytest.raises(ValueError, match="groups, N, d"):
        GramAccumulator(d, weights=w[0])


def test_the_projection_is_chosen_for_layers_with_few_output_rows() -> None:
    assert projection_is_cheaper(64, 576)  # ResNet-18 3×3 convs: N = d/9
    assert projection_is_cheaper(256, 2304)
    assert not projection_is_cheaper(128, 64)  # a 1×1 downsample: N = 2·d
    assert not projection_is_cheaper(1000, 512)  # fc
    assert not projection_is_cheaper(300, 576)  # measured slower above N ≈ d/3


@pytest.mark.parametrize(
    "make_grid",
    [
        lambda w: UniformGrid(channel_scales(w, 3), *code_range(3)),
        lambda w: UniformGrid(channel_scales(w, 4), *code_range(4), rounding="stochastic", seed=3),
        lambda w: UniformGrid(channel_scales(w, 4), *code_range(4), regularizer="L0", lam=0.02),
        lambda w: UniformGrid(channel_scales(w, 4), *code_range(4), regularizer="L1", lam=0.01),
        lambda w: ReferenceGrid(reference_step(w, 4, 1.16), 8, rounding="stochastic", seed=1),
        lambda w: ReferenceGrid(reference_step(w, 4, 1.16, l0_lambda=0.05), 8, regularizer="L0", lam=0.05),
        lambda w: AlphabetGrid(paper_alphabet(w, 3, 1.1)),
    ],
    ids=["int3", "int4-stochastic", "int4-L0", "int4-L1", "reference-stochastic", "reference-L0", "paper2022"],
)
def test_every_grid_gives_identical_levels_in_both_forms(make_grid) -> None:
    w, x, xt = fixture_data(32, 150, 400, seed=5)
    acc = gram(x, xt)
    q_ref, _ = gpfq_columns(w, x, xt, make_grid(w))
    q = gpfq_blocked(w, acc.h[0], acc.g[0], make_grid(w), block=32)
    assert np.array_equal(q, q_ref)


@pytest.mark.parametrize(
    "make_grid",
    [
        lambda w: ReferenceGrid(reference_step(w, 4, 1.16), 8),
        lambda w: UniformGrid(channel_scales(w, 3), *code_range(3)),
        lambda w: UniformGrid(channel_scales(w, 4), *code_range(4), rounding="stochastic", seed=3),
        lambda w: UniformGrid(channel_scales(w, 4), *code_range(4), regularizer="L0", lam=0.02),
    ],
    ids=["reference", "int3", "int4-stochastic", "int4-L0"],
)
@pytest.mark.parametrize(("n", "d", "m"), [(48, 300, 600), (200, 257, 120)])
def test_data_form_equals_the_recursion_level_for_level(make_grid, n: int, d: int, m: int) -> None:
    w, x, xt = fixture_data(n, d, m, seed=11)
    q_ref, u = gpfq_columns(w, x, xt, make_grid(w))
    for block in (1, 7, 64, 512):
        assert np.count_nonzero(gpfq_data(w, x, xt, make_grid(w), block) != q_ref) == 0, block
    norm, _ = relative_error_on_rows(w, q_ref, x, xt)
    assert norm == pytest.approx(np.linalg.norm(u), rel=1e-10)


def test_the_cost_model_picks_the_data_form_for_few_rows_or_few_outputs() -> None:
    assert data_form_is_cheaper(512, 4608, 1536)  # ResNet-18 conv 512x4608 with reference m
    assert data_form_is_cheaper(64, 576, 11_648)  # few output channels
    assert not data_form_is_cheaper(1000, 512, 100_000)  # many rows and outputs: the d×d form
    with pytest.raises(ValueError, match="block"):
        gpfq_data(np.ones((2, 3)), np.ones((4, 3)), np.ones((4, 3)), Identity(), block=0)


def test_kept_rows_give_the_same_products_and_fold_past_the_limit() -> None:
    _, x, xt = fixture_data(4, 30, 50, seed=7)
    kept = GramAccumulator(30, keep_rows=50)
    for part in np.array_split(np.arange(50), 3):
        kept.update(x[part][None], xt[part][None])
    rows_x, rows_xt = kept.kept_rows()
    np.testing.assert_array_equal(rows_x[0], x)
    np.testing.assert_array_equal(rows_xt[0], xt)
    streamed = gram(x, xt)
    np.testing.assert_allclose(kept.h, streamed.h, rtol=1e-12)
    np.testing.assert_allclose(kept.g, streamed.g, rtol=1e-12)
    assert kept.kept_rows() is None  # the products replaced the rows
    over = GramAccumulator(30, keep_rows=40)
    for part in np.array_split(np.arange(50), 3):
        over.update(x[part][None], xt[part][None])
    assert over.kept_rows() is None and over.rows == 50
    np.testing.assert_allclose(over.f, streamed.f, rtol=1e-12)


@pytest.mark.parametrize("options", [{}, {"damping": 0.1}, {"damping": 0.3, "act_order": True, "target_inputs": "quantized"},
                                     {"target_inputs": "quantized", "act_order": True}])
def test_the_pass_solves_rows_and_products_alike(options: dict) -> None:
    w, x, xt = fixture_data(40, 120, 90, seed=4)
    gpfq = GPFQPass(block_size=16, **options)
    grid = UniformGrid(channel_scales(w, 3), *code_range(3))
    acc = gram(x, xt, w)
    on_rows = gpfq._solve_on_rows(w, x, xt, grid)
    on_products = gpfq._solve_on_products(w, acc, 0, grid)
    assert np.count_nonzero(on_rows != on_products) == 0
    if not gpfq.act_order:
        projected = gram(x, xt, w, project=True)
        assert np.count_nonzero(gpfq._solve_on_products(w, projected, 0, grid) != on_rows) == 0


def test_damping_weighs_the_weight_error() -> None:
    """H + λI, G + λI: a huge λ gives round to nearest; a moderate one lowers ‖W − Q‖ on data
    whose rows do not span the columns."""
    w, x, xt = fixture_data(30, 200, 60, seed=9)
    grid = UniformGrid(channel_scales(w, 3), *code_range(3))
    acc = gram(x, xt, w)
    huge = GPFQPass(damping=1e9)._solve_on_products(w, acc, 0, grid)
    np.testing.assert_array_equal(huge, grid.quantize(w, 0))
    plain = GPFQPass()._solve_on_products(w, acc, 0, grid)
    damped = GPFQPass(damping=0.3)._solve_on_products(w, acc, 0, grid)
    assert np.linalg.norm(damped - w) < np.linalg.norm(plain - w)
    with pytest.raises(GPFQConfigError, match="damping"):
        GPFQPass(damping=-1.0)


def test_infinite_bits_return_w_and_a_huge_alphabet_is_close_to_w() -> None:
    w, x, _ = fixture_data(16, 40, 200, seed=2)
    acc = gram(x, x)
    np.testing.assert_allclose(gpfq_blocked(w, acc.h[0], acc.g[0], Identity()), w, rtol=1e-10, atol=1e-12)
    scales = channel_scales(w, 16)
    q = gpfq_blocked(w, acc.h[0], acc.g[0], UniformGrid(scales, *code_range(16)))
    assert np.abs(q - w).max() <= 2 * scales.max()


def test_one_column_is_round_to_nearest_and_a_zero_column_gives_zero() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(20, 1))
    x = rng.normal(size=(50, 1))
    grid = UniformGrid(channel_scales(w, 3), *code_range(3))
    acc = gram(x, x)
    np.testing.assert_array_equal(gpfq_blocked(w, acc.h[0], acc.g[0], grid), grid.quantize(w, 0))
    x2 = np.concatenate([x, np.zeros((50, 1))], axis=1)
    w2 = np.concatenate([w, rng.normal(size=(20, 1))], axis=1)
    acc2 = gram(x2, x2)
    q = gpfq_blocked(w2, acc2.h[0], acc2.g[0], UniformGrid(channel_scales(w2, 3), *code_range(3)))
    assert np.all(q[:, 1] == 0.0)


def test_streaming_products_do_not_depend_on_the_batch_split() -> None:
    _, x, xt = fixture_data(4, 30, 500, seed=7)
    one = gram(x, xt)
    split = GramAccumulator(30)
    for part in np.array_split(np.arange(500), [13, 200, 201]):
        split.update(x[part][None], xt[part][None])
    for a, b in ((one.h, split.h), (one.g, split.g), (one.f, split.f)):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    np.testing.assert_allclose(one.mean_x_tilde(), split.mean_x_tilde(), rtol=1e-12)
    assert split.rows == 500


def token_matmul(length: str) -> tuple[np.random.Generator, str, dict[str, np.ndarray]]:
    """A MatMul over ``length`` tokens with a token mask input: the seeded generator (after
    drawing the weight), the model text and its initializers."""
    rng = np.random.default_rng(4)
    inits = {"w": rng.normal(size=(8, 5)).astype(np.float32)}
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, {length}, 8] x, int64[N, {length}] mask) => (float[N, {length}, 5] y) <float[8,5] w> {{
        y = MatMul (x, w)
    }}
    """
    return rng, text, inits


def test_sample_slices_bound_the_rows_per_update() -> None:
    assert sample_slices(10, 3, rows=7) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8), slice(8, 10)]
    assert sample_slices(4, 100, rows=7) == [slice(i, i + 1) for i in range(4)]  # at least one sample
    assert sample_slices(5, 1, rows=100) == [slice(0, 5)]


def test_pass_streams_batches_in_slices_with_the_same_result(monkeypatch) -> None:
    """One sample per update (token masks sliced along) gives what whole batches give."""
    import qcompiler.gpfq

    data = grouped_data()
    whole = run_gpfq(grouped_model(), data=data, bits=3, batch_size=40)
    monkeypatch.setattr(qcompiler.gpfq, "ROWS_PER_UPDATE", 1)
    updates: list[int] = []
    plain_update = GramAccumulator.update

    def counted(self, x, x_tilde=None):
        updates.append(x.shape[1])
        plain_update(self, x, x_tilde)

    monkeypatch.setattr(GramAccumulator, "update", counted)
    sliced = run_gpfq(grouped_model(), data=data, bits=3, batch_size=40)
    assert max(updates) == 16 and len(updates) == 3 * 96  # one sample (16 positions, or 1 row) each
    layers = [[ann.require(n, ann.GPFQLayer) for n in m.graph if ann.get(n, ann.GPFQLayer)] for m in (whole, sliced)]
    assert [a.rows for a in layers[0]] == [b.rows for b in layers[1]] == [96 * 16, 96 * 16, 96]
    for a, b in zip(*layers):
        assert a.error == pytest.approx(b.error, rel=1e-9)
    weights = [[const_array(n.inputs[1]) for n in m.graph if ann.get(n, ann.GPFQLayer)] for m in (whole, sliced)]
    assert all(np.array_equal(a, b) for a, b in zip(*weights))

    rng, text, inits = token_matmul("6")
    mask = (np.arange(6)[None, :] < rng.integers(1, 7, size=(10, 1))).astype(np.int64)  # 1..6 tokens each
    tokens = ArrayDataset({"x": rng.normal(size=(10, 6, 8)).astype(np.float32), "mask": mask})
    masked = run_gpfq(load_normalized(make_model(text, inits)), data=tokens, bits=3, token_mask="mask")
    monkeypatch.setattr(qcompiler.gpfq, "ROWS_PER_UPDATE", 1 << 14)
    in_one = run_gpfq(load_normalized(make_model(text, inits)), data=tokens, bits=3, token_mask="mask")
    assert ann.require(list(masked.graph)[0], ann.GPFQLayer).rows == int(mask.sum())
    np.testing.assert_array_equal(const_array(list(masked.graph)[0].inputs[1]), const_array(list(in_one.graph)[0].inputs[1]))
    # feeds of different lengths: the rows per sample are taken per batch
    monkeypatch.setattr(qcompiler.gpfq, "ROWS_PER_UPDATE", 1)
    _, text_any, _ = token_matmul("T")
    feeds = [{"x": tokens.arrays["x"][:5], "mask": mask[:5]},
             {"x": tokens.arrays["x"][5:, :3].copy(), "mask": mask[5:, :3].copy()}]
    mixed = run_gpfq(load_normalized(make_model(text_any, inits)), data=feeds, bits=3, token_mask="mask")
    assert ann.require(list(mixed.graph)[0], ann.GPFQLayer).rows == int(mask[:5].sum() + mask[5:, :3].sum())
    summary = ann.require(mixed, ann.GPFQSummary)  # element-wise over both shapes; no classes, no top-1
    assert summary.samples == 10 and summary.top1_agreement is None
    float_runner, gpfq_runner = Runner(load_normalized(make_model(text_any, inits))), Runner(mixed)
    diff = np.concatenate([(gpfq_runner.run(f)["y"] - float_runner.run(f)["y"]).astype(np.float64).ravel() for f in feeds])
    assert summary.output_mse == pytest.approx(float(np.mean(diff**2)), rel=1e-6) and summary.output_mse > 0


def test_row_buffer_reuses_memory_and_the_accumulator_says_what_it_would_keep() -> None:
    from qcompiler.layer_matrix import RowBuffer

    x = np.random.default_rng(3).normal(size=(6, 4, 9, 9))
    _, w, _, node = single_node("Conv", (2, 4, 9, 9), (5, 4, 3, 3), pads=[1, 1, 1, 1])
    geo = geometry(node, w.shape)
    buffer = RowBuffer()
    first = rows(geo, x[:4], np.float64, buffer)
    np.testing.assert_array_equal(first, rows(geo, x[:4], np.float64))
    second = rows(geo, x[4:], np.float64, buffer)  # a smaller slice: a view of the same memory
    np.testing.assert_array_equal(second, rows(geo, x[4:], np.float64))
    assert np.shares_memory(first, second)
    acc = GramAccumulator(36, keep_rows=200)
    assert acc.keeps(162) and not acc.keeps(201)
    acc.update(second, second + 1.0)  # 162 rows: kept
    assert acc.keeps(38) and not acc.keeps(39)
    acc.update(second, second + 1.0)  # 324 rows: folded into the products
    assert not acc.keeps(1) and acc.kept_rows() is None


def test_pass_keeps_rows_of_the_data_form_out_of_the_reused_memory(monkeypatch) -> None:
    """A conv with fewer rows than columns takes the data form from kept rows; streamed one
    sample at a time, the kept slices must not share the reused row memory."""
    import qcompiler.gpfq

    rng = np.random.default_rng(9)
    inits = {"w": (0.2 * rng.normal(size=(6, 8, 3, 3))).astype(np.float32)}
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 8, 4, 4] x) => (float[N, 6, 4, 4] y) <float[6, 8, 3, 3] w> {
        y = Conv <pads = [1, 1, 1, 1]> (x, w)
    }
    """
    data = ArrayDataset({"x": rng.normal(size=(4, 8, 4, 4)).astype(np.float32)})  # 64 rows, 72 columns
    whole = run_gpfq(load_normalized(make_model(text, inits)), data=data, bits=3)
    monkeypatch.setattr(qcompiler.gpfq, "ROWS_PER_UPDATE", 1)
    sliced = run_gpfq(load_normalized(make_model(text, inits)), data=data, bits=3)
    layer = ann.require(list(sliced.graph)[0], ann.GPFQLayer)
    assert layer.rows == 64 and layer.columns == 72
    assert layer.error == pytest.approx(ann.require(list(whole.graph)[0], ann.GPFQLayer).error, rel=1e-9)
    np.testing.assert_array_equal(const_array(list(sliced.graph)[0].inputs[1]), const_array(list(whole.graph)[0].inputs[1]))


def test_quantizer_cases_of_the_spec() -> None:
    msq = ReferenceGrid(delta=1.0, K=8)
    assert msq.quantize(np.array([0.5, -0.5, 1.5, -1.5, 2.5, -2.5]), 0).tolist() == [1, 0, 2, -1, 3, -2]
    l0 = ReferenceGrid(delta=0.2, K=2, regularizer="L0", lam=0.1)
    np.testing.assert_allclose(l0.quantize(np.array([0.05, 0.12, 0.25, 10.0, -0.25]), 0), [0, 0.1, 0.3, 0.5, -0.3])
    with pytest.raises(ValueError, match="<= 0"):
        ReferenceGrid(delta=-0.01, K=2, regularizer="L0", lam=0.1)


def test_stochastic_rounding_is_unbiased_inside_the_range() -> None:
    grid = UniformGrid(np.array(0.5), -8, 7, rounding="stochastic", seed=11)
    v = np.full(100_000, 0.37)
    draws = grid.quantize(v, 0)
    assert set(np.unique(draws)) == {0.0, 0.5}
    sigma = 0.5 * np.sqrt(0.74 * 0.26 / v.size)
    assert abs(draws.mean() - 0.37) < 3 * sigma


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(1, 8),
    scale=st.floats(1e-3, 10.0),
    values=st.lists(st.floats(-100, 100, allow_nan=False), min_size=1, max_size=40),
)
def test_uniform_grid_levels_are_integer_codes_in_range(bits: int, scale: float, values: list[float]) -> None:
    grid = UniformGrid(np.array(scale), *code_range(bits))
    q = grid.quantize(np.array(values), 0)
    codes = q / scale
    np.testing.assert_allclose(codes, np.rint(codes), atol=1e-9)
    lo, hi = code_range(bits)
    assert codes.min() >= lo - 1e-9 and codes.max() <= hi + 1e-9
    # round to nearest inside the range: the error is at most half a step
    inside = (np.array(values) / scale >= lo) & (np.array(values) / scale <= hi)
    assert np.all(np.abs(q - np.array(values))[inside] <= scale / 2 + 1e-9)


def test_gpfq_beats_round_to_nearest_on_most_random_layers() -> None:
    wins = 0
    for seed in range(20):
        w, x, xt = fixture_data(24, 64, 256, seed=100 + seed)
        acc = gram(x, xt)
        grid = UniformGrid(channel_scales(w, 3), *code_range(3))
        q = gpfq_blocked(w, acc.h[0], acc.g[0], grid)
        gp = relative_error(w, q, acc.h[0], acc.g[0], acc.f[0])[1]
        rtn = relative_error(w, grid.quantize(w, 0), acc.h[0], acc.g[0], acc.f[0])[1]
        wins += gp <= rtn
    assert wins >= 18


def test_act_order_is_a_column_permutation_of_the_same_problem() -> None:
    w, x, xt = fixture_data(8, 50, 300, seed=9)
    x[:, 3] *= 10
    xt[:, 3] *= 10
    acc = gram(x, xt)
    perm = act_order(acc.h[0])
    assert perm[0] == 3
    grid = UniformGrid(channel_scales(w, 4), *code_range(4))
    q_perm = gpfq_blocked(w[:, perm], acc.h[0][np.ix_(perm, perm)], acc.g[0][np.ix_(perm, perm)], grid)
    q_ref, _ = gpfq_columns(w[:, perm], x[:, perm], xt[:, perm], grid)
    np.testing.assert_array_equal(q_perm, q_ref)


# --------------------------------------------------------------------------- im2col


def single_node(op: str, x_shape, w_shape, **attrs):
    rng = np.random.default_rng(1)
    x = rng.normal(size=x_shape).astype(np.float32)
    w = rng.normal(size=w_shape).astype(np.float32)
    node = oh.make_node(op, ["x", "w"], ["y"], name="n", **attrs)
    graph = oh.make_graph([node], "g", [oh.make_tensor_value_info("x", 1, None)],
                          [oh.make_tensor_value_info("y", 1, None)], [onnx.numpy_helper.from_array(w, "w")])
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    y = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return x, w, y, list(ir.from_proto(proto).graph)[0]


@pytest.mark.parametrize(
    ("op", "x_shape", "w_shape", "attrs"),
    [
        ("Conv", (2, 4, 9, 8), (6, 4, 3, 3), {"strides": [1, 1]}),
        ("Conv", (2, 4, 9, 8), (6, 4, 3, 3), {"strides": [2, 2], "pads": [1, 0, 2, 1]}),
        ("Conv", (2, 4, 9, 8), (6, 4, 3, 3), {"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
        ("Conv", (2, 4, 9, 8), (6, 2, 3, 3), {"group": 2, "strides": [2, 1]}),
        ("Conv", (2, 4, 9, 8), (4, 1, 3, 3), {"group": 4, "pads": [1, 1, 1, 1]}),
        ("Conv", (2, 4, 9, 8), (4, 1, 3, 2), {"group": 4, "auto_pad": "SAME_UPPER", "strides": [2, 2]}),
        ("Conv", (2, 4, 9, 8), (4, 4, 3, 2), {"auto_pad": "SAME_LOWER", "strides": [2, 3]}),
        ("Conv", (2, 4, 11), (5, 4, 3), {"strides": [2], "pads": [0, 1]}),
        ("Conv", (1, 2, 5, 6, 7), (3, 2, 3, 2, 2), {"pads": [1, 0, 1, 0, 1, 1]}),
        ("ConvTranspose", (2, 4, 5, 6), (4, 3, 3, 3), {"strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 0]}),
        ("ConvTranspose", (2, 4, 5, 6), (4, 3, 3, 2), {"group": 2, "dilations": [2, 1]}),
        ("Gemm", (5, 7), (3, 7), {"transB": 1, "alpha": 0.5}),
        ("MatMul", (2, 5, 7), (7, 3), {}),
    ],
)
def test_layer_rows_times_weights_match_onnxruntime(op: str, x_shape, w_shape, attrs) -> None:
    x, w, y, node = single_node(op, x_shape, w_shape, **attrs)
    geo = geometry(node, w.shape)
    matrices = weight_matrix(geo, w)
    assert np.array_equal(from_weight_matrix(geo, matrices, w.dtype), w)
    r = rows(geo, x)
    assert rows_per_sample(geo, x.shape) * x.shape[0] == r.shape[1]  # counted without unfolding
    out = np.concatenate([r[k] @ matrices[k].T for k in range(geo.groups)], axis=1)  # (m, N)
    if op in ("Gemm", "MatMul"):
        expected = y.reshape(-1, y.shape[-1])
    else:
        expected = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    np.testing.assert_allclose(out, expected, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 9), st.integers(1, 9)),
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    strides=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    dilations=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    pads=st.tuples(*[st.integers(-1, 3)] * 4),
    integer=st.booleans(),
)
def test_compiled_2d_im2col_equals_the_sliding_window_form(shape, kernel, strides, dilations, pads, integer) -> None:
    from hypothesis import assume

    from qcompiler.layer_matrix import im2col, im2col_windows

    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    assume(all(shape[2 + i] + pads[i] + pads[i + 2] >= spans[i] for i in range(2)))
    rng = np.random.default_rng(0)
    x = rng.integers(-50, 50, size=shape) if integer else rng.normal(size=shape).astype(np.float32)
    fast = im2col(x, kernel, strides, pads, dilations)
    reference = im2col_windows(x, kernel, strides, pads, dilations)
    assert fast.dtype == reference.dtype
    np.testing.assert_array_equal(fast, reference)
    half = x.astype(np.float16)  # not compiled: the numpy form
    np.testing.assert_array_equal(im2col(half, kernel, strides, pads, dilations), reference.astype(np.float16))


# --------------------------------------------------------------------------- the pass


def grouped_model() -> ir.Model:
    rng = np.random.default_rng(0)
    inits = {
        "w1": (0.4 * rng.normal(size=(8, 2, 3, 3))).astype(np.float32),
        "b1": (0.1 * rng.normal(size=8)).astype(np.float32),
        "w2": (0.4 * rng.normal(size=(8, 1, 3, 3))).astype(np.float32),
        "w3": (0.1 * rng.normal(size=(8 * 4 * 4, 10))).astype(np.float32),
    }
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4, 8, 8] x) => (float[N, 10] y) <float[8,2,3,3] w1, float[8] b1, float[8,1,3,3] w2, float[128,10] w3> {
        c1 = Conv <group = 2, pads = [1, 1, 1, 1], strides = [2, 2]> (x, w1, b1)
        r1 = Relu (c1)
        c2 = Conv <group = 8, pads = [1, 1, 1, 1]> (r1, w2)
        r2 = Relu (c2)
        f = Flatten (r2)
        y = MatMul (f, w3)
    }
    """
    return load_normalized(make_model(text, inits))


def grouped_data(n: int = 96) -> ArrayDataset:
    x = np.random.default_rng(1).normal(size=(n, 4, 8, 8)).astype(np.float32)
    return ArrayDataset({"x": x})


def run_gpfq(model: ir.Model, **options) -> ir.Model:
    return run_pipeline(model, [*canonical_pipeline(), GPFQPass(show_progress=False, **options)]).model


def test_pass_rewrites_grouped_convs_and_matmul_onto_the_integer_grid() -> None:
    data = grouped_data()
    float_model = grouped_model()
    model = run_gpfq(float_model.clone(), data=data, bits=3, batch_size=40)
    values = values_by_name(model.graph)
    rewritten = [(n, ann.get(n, ann.GPFQLayer)) for n in model.graph if ann.get(n, ann.GPFQLayer)]
    assert [n.op_type for n, _ in rewritten] == ["Conv", "Conv", "MatMul"]
    assert rewritten[0][1].groups == 2 and rewritten[1][1].groups == 8 and rewritten[1][1].columns == 9
    assert rewritten[0][1].rows == 96 * 4 * 4
    for node, layer in rewritten:
        grid = ann.require(values[node.inputs[1].name], ann.IntegerWeights)
        codes = integer_codes(values[node.inputs[1].name], grid)
        assert codes.min() >= -4 and codes.max() <= 3 and grid.bits == 3
        assert layer.error < layer.error_rtn
    summary = ann.require(model, ann.GPFQSummary)
    assert summary.output_mse < summary.output_mse_rtn
    # the QDQ export holds exactly the rewritten weights
    qdq = lower_to_qdq(model)
    feed = {"x": data.arrays["x"][:16]}
    np.testing.assert_allclose(Runner(qdq).run(feed)["y"], Runner(model).run(feed)["y"], atol=1e-5)


def test_digits_gpfq_beats_round_to_nearest_three_fold_at_two_to_four_bits(digits_model_path, digits_calib) -> None:
    model = load_normalized(digits_model_path)
    data = ArrayDataset(digits_calib)
    for bits in (2, 3, 4):
        summary = ann.require(run_gpfq(model.clone(), data=data, bits=bits), ann.GPFQSummary)
        assert summary.output_mse * 3 < summary.output_mse_rtn, bits


@pytest.mark.parametrize("options", [{}, {"damping": 0.2, "bias_correction": "all"}, {"target_inputs": "quantized"}])
def test_the_pass_gives_the_same_weights_with_g_projected_or_whole(digits_model_path, digits_calib, monkeypatch,
                                                                  options: dict) -> None:
    """Every digits layer with streamed products (m > d) once with G and F whole, once projected."""
    model = load_normalized(digits_model_path)
    data = ArrayDataset({k: v[:96] for k, v in digits_calib.items()})
    import qcompiler.passes.gpfq as gpfq_pass

    results = []
    for project in (False, True):
        monkeypatch.setattr(gpfq_pass, "projection_is_cheaper", lambda n, d, project=project: project)
        out = run_gpfq(model.clone(), data=data, bits=3, **options)
        weights = {n.name: const_array(n.inputs[1]) for n in out.graph if ann.get(n, ann.GPFQLayer)}
        layers = {n.name: ann.get(n, ann.GPFQLayer) for n in out.graph if ann.get(n, ann.GPFQLayer)}
        results.append((weights, layers))
    (w_whole, l_whole), (w_projected, l_projected) = results
    assert sum(layer.rows > layer.columns for layer in l_whole.values()) >= 3  # the products path, not kept rows
    for name in w_whole:
        np.testing.assert_array_equal(w_projected[name], w_whole[name])
        for field in ("error", "error_rtn", "residual_norm"):
            assert getattr(l_projected[name], field) == pytest.approx(getattr(l_whole[name], field), rel=1e-7, abs=1e-9)


def gpfq_weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {n.name: const_array(n.inputs[1]) for n in model.graph if ann.get(n, ann.GPFQLayer)}


def record_prefix_requests(monkeypatch) -> list[tuple[str, ...]]:
    """The frontier values (``cut``) every incremental-prefix request of GPFQ starts from."""
    import qcompiler.passes.gpfq as gpfq_pass

    cuts = []
    request = gpfq_pass.IncrementalPrefix.request

    def spy(self, model, name):
        segment = request(self, model, name)
        cuts.append(segment.cut)
        return segment

    monkeypatch.setattr(gpfq_pass.IncrementalPrefix, "request", spy)
    return cuts


@pytest.mark.parametrize("options", [{}, {"target_inputs": "quantized", "damping": 0.1}])
def test_incremental_prefixes_give_the_weights_of_whole_prefixes(digits_model_path, digits_calib, monkeypatch,
                                                                 options: dict) -> None:
    """cache_mb=0 computes every layer input from the model inputs; the default reuses the frontier."""
    requests = record_prefix_requests(monkeypatch)
    for model, data in ((load_normalized(digits_model_path), ArrayDataset({k: v[:96] for k, v in digits_calib.items()})),
                        (grouped_model(), grouped_data())):
        whole = gpfq_weights(run_gpfq(model.clone(), data=data, bits=3, batch_size=40, cache_mb=0, **options))
        assert not requests
        cached = gpfq_weights(run_gpfq(model.clone(), data=data, bits=3, batch_size=40, **options))
        assert sum(bool(cut) for cut in requests) >= 2  # later layers started from the frontier
        requests.clear()
        assert whole.keys() == cached.keys() and len(whole) >= 3
        for name in whole:
            np.testing.assert_array_equal(cached[name], whole[name], err_msg=name)



@pytest.mark.parametrize("limits", [{"samples": 50}, {"samples": 50, "linear_samples": 90}, {"linear_samples": 30}])
def test_sample_limits_give_the_same_weights_with_incremental_prefixes(monkeypatch, limits: dict) -> None:
    """The frontiers cover the batches of the largest limit; a layer with a smaller one still
    runs them (to keep its frontier) but reads only its own samples."""
    requests = record_prefix_requests(monkeypatch)
    whole = gpfq_weights(run_gpfq(grouped_model(), data=grouped_data(), bits=3, batch_size=40, cache_mb=0, **limits))
    out = run_gpfq(grouped_model(), data=grouped_data(), bits=3, batch_size=40, **limits)
    cached = gpfq_weights(out)
    assert sum(bool(cut) for cut in requests) >= 2
    # rows read: each conv output position of the samples it may read, one row per sample for the MatMul
    conv_limit = limits.get("samples", 96)
    linear_limit = limits.get("linear_samples", conv_limit)
    layers = [ann.get(n, ann.GPFQLayer) for n in out.graph if ann.get(n, ann.GPFQLayer)]
    assert [layer.rows for layer in layers] == [conv_limit * 16, conv_limit * 16, linear_limit]
    assert whole.keys() == cached.keys() and len(whole) == 3
    for name in whole:
        np.testing.assert_array_equal(cached[name], whole[name], err_msg=name)
    # the limits are honoured: fewer samples, other weights
    full = gpfq_weights(run_gpfq(grouped_model(), data=grouped_data(), bits=3, batch_size=40))
    assert any(not np.array_equal(full[name], whole[name]) for name in whole)


@pytest.mark.parametrize("cache_mb", [0, 64])
def test_the_summary_compares_whole_models_on_the_samples_the_layers_read(monkeypatch, cache_mb: int) -> None:
    """The float and the rewritten logits come from the frontiers (only the nodes past the last
    layer's input run), RTN's from the inputs; all equal whole-model runs over the 90 samples
    of the largest limit, in the pass's batches."""
    from qcompiler.passes.gpfq import round_to_nearest_model

    requests = record_prefix_requests(monkeypatch)
    float_model = run_pipeline(grouped_model(), canonical_pipeline()).model
    out = run_gpfq(grouped_model(), data=grouped_data(), bits=3, batch_size=40, samples=50, linear_samples=90,
                   cache_mb=cache_mb)
    summary = ann.require(out, ann.GPFQSummary)
    if cache_mb:
        assert requests[-2:] == [("f",), ("f",)]  # float and rewritten network: the MatMul alone
    x = grouped_data().arrays["x"]
    ref, gp, rt = (np.concatenate([Runner(m).run({"x": x[a:b]})["y"] for a, b in ((0, 40), (40, 50), (50, 80), (80, 90))])
                   .astype(np.float64) for m in (float_model, out, round_to_nearest_model(out)))
    assert summary.samples == 90
    np.testing.assert_allclose(summary.output_mse, np.mean((gp - ref) ** 2), rtol=1e-12)
    np.testing.assert_allclose(summary.output_mse_rtn, np.mean((rt - ref) ** 2), rtol=1e-12)
    assert summary.top1_agreement == np.mean(gp.argmax(1) == ref.argmax(1))
    assert summary.output_mse < summary.output_mse_rtn


def test_batches_end_at_every_sample_limit() -> None:
    from qcompiler.passes.gpfq import _cut_at

    feeds = [{"x": np.arange(start, start + 40)} for start in (0, 40, 80)] + [{"x": np.arange(120, 130)}]

    def spans(limits, everything):
        return [(int(f["x"][0]), len(f["x"])) for f in _cut_at(feeds, limits, everything)]

    assert spans([], True) == [(0, 40), (40, 40), (80, 40), (120, 10)]
    assert spans([50], False) == [(0, 40), (40, 10)]
    assert spans([50, 90], False) == [(0, 40), (40, 10), (50, 30), (80, 10)]
    assert spans([30, 50], True) == [(0, 30), (30, 10), (40, 10), (50, 30), (80, 40), (120, 10)]
    assert spans([40], False) == [(0, 40)]
    assert spans([500], False) == spans([], True)


@pytest.mark.parametrize("cache_mb", [0, 64])
def test_a_sample_limit_counts_samples_when_activations_merge_batch_and_tokens(cache_mb: int) -> None:
    """A MatMul whose input is (samples·positions, features), with a smaller limit than the conv
    before it: the limit is in samples, not rows, and ends inside a batch."""
    rng = np.random.default_rng(3)
    inits = {"w1": rng.normal(size=(3, 4, 1)).astype(np.float32), "w2": rng.normal(size=(3, 2)).astype(np.float32),
             "flat": np.array([-1, 3], dtype=np.int64)}
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4, 5] x) => (float[M, 2] y) <float[3,4,1] w1, float[3,2] w2, int64[2] flat> {
        c = Conv (x, w1)
        r = Relu (c)
        t = Transpose <perm = [0, 2, 1]> (r)
        f = Reshape (t, flat)
        y = MatMul (f, w2)
    }
    """
    model = load_normalized(make_model(text, inits))
    data = ArrayDataset({"x": rng.normal(size=(12, 4, 5)).astype(np.float32)})
    out = run_gpfq(model, data=data, bits=3, batch_size=4, linear_samples=7, cache_mb=cache_mb)
    assert [ann.get(n, ann.GPFQLayer).rows for n in out.graph if ann.get(n, ann.GPFQLayer)] == [12 * 5, 7 * 5]


@pytest.mark.parametrize(("target", "bits", "fake_quant"), [("fixed-point", 4, True), ("max78000", 2, False)])
def test_targets_give_the_same_weights_with_incremental_prefixes(digits_model_path, digits_calib, tmp_path,
                                                                 monkeypatch, target: str, bits: int,
                                                                 fake_quant: bool) -> None:
    """The fixed-point target formats activations first: X̃ comes from the QDQ view of each step.
    MAX78000's grid comes from the target; its activations stay float during GPFQ."""
    import qcompiler.passes.gpfq as gpfq_pass
    from qcompiler.api import CompileConfig, compile_model
    from qcompiler.targets import TargetConfig

    seen = []
    original = gpfq_pass._has_activation_formats
    monkeypatch.setattr(gpfq_pass, "_has_activation_formats", lambda model: seen.append(original(model)) or seen[-1])
    cuts = record_prefix_requests(monkeypatch)
    weights, summaries = [], []
    for cache_mb in (0, 64):
        config = CompileConfig(calib=digits_calib, target=TargetConfig(weight_bits=bits), show_progress=False,
                               gpfq=GPFQPass(bits=bits, cache_mb=cache_mb))
        result = compile_model(digits_model_path, target, config, tmp_path / str(cache_mb))
        weights.append(gpfq_weights(result.model))
        summaries.append(ann.require(result.model, ann.GPFQSummary))
    assert seen and all(flag == fake_quant for flag in seen)  # GPFQ ran on fake-quantized activations (or not)
    assert sum(bool(cut) for cut in cuts) >= 4  # float and QDQ views both started from their frontiers
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        np.testing.assert_array_equal(weights[1][name], weights[0][name], err_msg=name)
    assert summaries[0] == summaries[1]  # the logits from the frontier equal those of the whole model


def test_reference_grid_weights_use_the_seed_alphabet(digits_model_path, digits_calib) -> None:
    model = run_pipeline(load_normalized(digits_model_path), canonical_pipeline()).model  # BatchNorm folded
    float_weights = {n.name: const_array(n.inputs[1]) for n in model.graph if n.op_type in ("Conv", "Gemm")}
    out = run_gpfq(model, data=ArrayDataset(digits_calib), bits=2, grid="reference", scalar=1.16)
    for node in out.graph:
        if ann.get(node, ann.GPFQLayer) is None:
            continue
        assert ann.get(node.inputs[1], ann.IntegerWeights) is None  # not storable in b bits
        step = reference_step(weight_matrix(geometry(node, float_weights[node.name].shape), float_weights[node.name])[0]
                              if node.op_type != "Conv" else float_weights[node.name], 2, 1.16)
        levels = np.unique(np.round(const_array(node.inputs[1]).astype(np.float64) / step, 4))
        assert set(levels) <= {-2.0, -1.0, 0.0, 1.0, 2.0}


def test_bias_correction_removes_the_mean_output_shift() -> None:
    rng = np.random.default_rng(3)
    inits = {"w": rng.normal(size=(6, 16)).astype(np.float32), "b": np.zeros(6, np.float32)}
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 16] x) => (float[N, 6] y) <float[6,16] w, float[6] b> {
        y = Gemm <transB = 1> (x, w, b)
    }
    """
    x = (rng.normal(size=(512, 16)) + 2.0).astype(np.float32)  # a large input mean amplifies the bias shift
    data = ArrayDataset({"x": x})
    ref = Runner(load_normalized(make_model(text, inits))).run({"x": x})["y"]
    shifts = {}
    for mode in ("none", "last"):
        model = run_gpfq(load_normalized(make_model(text, inits)), data=data, bits=2, bias_correction=mode)
        out = Runner(model).run({"x": x})["y"]
        shifts[mode] = np.abs((out - ref).mean(axis=0)).max()
        assert ann.require(list(model.graph)[0], ann.GPFQLayer).bias_corrected == (mode == "last")
    assert shifts["last"] < 1e-4 < shifts["none"]


def test_skip_and_linear_options(digits_model_path, digits_calib) -> None:
    model = load_normalized(digits_model_path)
    out = run_gpfq(model, data=ArrayDataset(digits_calib), bits=4, linear_bits=8, skip=("node_conv2d", 4))
    layers = {n.name: ann.get(n, ann.GPFQLayer) for n in out.graph if n.op_type in ("Conv", "Gemm")}
    assert layers["node_conv2d"] is None and layers["node_linear_1"] is None
    assert layers["node_conv2d_1"].bits == 4 and layers["node_linear"].bits == 8
    skipped = dict(ann.require(out, ann.GPFQSummary).skipped)
    assert set(skipped) == {"node_conv2d", "node_linear_1"}


def test_stochastic_rounding_is_deterministic_for_a_seed(digits_model_path, digits_calib) -> None:
    model = load_normalized(digits_model_path)
    data = ArrayDataset(digits_calib).take(64)
    runs = [run_gpfq(model.clone(), data=data, bits=3, rounding="stochastic", seed=s) for s in (1, 1, 2)]
    weights = [[const_array(n.inputs[1]) for n in m.graph if ann.get(n, ann.GPFQLayer)] for m in runs]
    assert all(np.array_equal(a, b) for a, b in zip(weights[0], weights[1]))
    assert not all(np.array_equal(a, b) for a, b in zip(weights[0], weights[2]))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bits": 0}, "bits must be in 1..16"),
        ({"scalar": 0.0}, "alphabet scalar"),
        ({"grid": "nope"}, "grid must be one of"),
        ({"samples": 0}, "samples must be >= 1"),
        ({"cache_mb": -1}, "cache_mb must be >= 0"),
    ],
)
def test_bad_options_are_refused(options, message) -> None:
    with pytest.raises(GPFQConfigError, match=message):
        GPFQPass(**options)


def test_unknown_layer_and_empty_data_are_clear_errors(digits_model_path, digits_calib) -> None:
    model = load_normalized(digits_model_path)
    with pytest.raises(PipelineError, match="skip names no weight layer 'conv9'"):
        run_gpfq(model.clone(), data=ArrayDataset(digits_calib), skip=("conv9",))
    with pytest.raises(PipelineError, match="skip index 7 is out of range"):
        run_gpfq(model.clone(), data=ArrayDataset(digits_calib), skip=(7,))
    with pytest.raises(PipelineError, match="calibration data is empty"):
        run_gpfq(model.clone(), data=[])


def test_report_section_lists_layers_and_the_rtn_baseline(digits_model_path, digits_calib, tmp_path) -> None:
    from qcompiler.api import CompileConfig, compile_model
    from qcompiler.targets import TargetConfig

    config = CompileConfig(calib=digits_calib, target=TargetConfig(weight_bits=4), show_progress=False,
                           gpfq=GPFQPass(bits=4))
    result = compile_model(digits_model_path, "fixed-point", config, tmp_path / "out")
    section = json.loads((tmp_path / "out" / "report.json").read_text())["gpfq"]
    assert [row["name"] for row in section["layers"]] == ["node_conv2d", "node_conv2d_1", "node_conv2d_2", "node_linear", "node_linear_1"]
    assert all(row["grid"] == "fixed" and row["error"] < row["error_rtn"] for row in section["layers"])
    assert section["output_mse"] * 3 < section["output_mse_rtn"]
    assert section["config"].startswith("GPFQPass(bits=4")
    # power-of-two grid: the fixed-point formats hold the GPFQ weights exactly
    values = values_by_name(result.model.graph)
    for node in result.model.graph:
        if ann.get(node, ann.GPFQLayer) is not None:
            fmt = ann.require(values[node.inputs[1].name], ann.FixedPoint)
            w = const_array(node.inputs[1]).astype(np.float64)
            scale = np.asarray(fmt.scales()).reshape((-1,) + (1,) * (w.ndim - 1))
            assert np.array_equal(np.rint(w / scale) * scale, w)


# --------------------------------------------------------------------------- command line


def test_cli_compile_with_gpfq_is_deterministic_and_beats_rtn(digits_model_path, tmp_path) -> None:
    from typer.testing import CliRunner

    from qcompiler.cli import app

    data = digits_model_path.parent
    outputs = []
    # the second run recomputes every layer input (no incremental prefixes): the same bytes
    for name, extra in (("a", []), ("b", ["--gpfq-cache-mb", "0"])):
        out = tmp_path / name
        result = CliRunner().invoke(app, [str(digits_model_path), "--target", "fixed-point", "--bits", "4", "--gpfq",
                                          "--calib", str(data / "calib.npz"), "--eval", str(data / "eval.npz"),
                                          "-o", str(out), "-q", *extra])
        assert result.exit_code == 0, result.output
        outputs.append(out)
    for file in ("model.qdq.onnx", "model.annotated.onnx"):
        assert (outputs[0] / file).read_bytes() == (outputs[1] / file).read_bytes()
    report = json.loads((outputs[0] / "report.json").read_text())
    assert report["gpfq"]["sqnr_db"] > report["gpfq"]["sqnr_db_rtn"] + 6.0
    assert report["metrics"]["simulated"]["top1"] >= report["metrics"]["float"]["top1"] - 0.01
    assert all(row["gpfq_error"] < row["rtn_error"] for row in report["layers"])


def test_cli_summary_compares_gpfq_with_rtn_and_weights_with_the_float_ones(digits_model_path, tmp_path) -> None:
    """The terminal summary shows GPFQ against round-to-nearest per layer and at the output, and
    the weight SQNR of rewritten weights is measured against the float weights (it was against
    themselves, i.e. missing)."""
    from typer.testing import CliRunner

    from qcompiler.cli import app

    data = digits_model_path.parent
    reports = {}
    for name, extra in (("gpfq", ["--gpfq"]), ("rtn", [])):
        result = CliRunner().invoke(app, [str(digits_model_path), "--target", "fixed-point", "--bits", "4",
                                          "--calib", str(data / "calib.npz"), "-o", str(tmp_path / name), *extra],
                                    env={"COLUMNS": "120"})
        assert result.exit_code == 0, result.output
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
        if name == "gpfq":
            output = result.output
    gpfq = reports["gpfq"]["gpfq"]
    assert "GPFQ vs round-to-nearest: relative layer output error" in output
    assert f"SQNR {gpfq['sqnr_db']:.2f} vs {gpfq['sqnr_db_rtn']:.2f} dB" in output
    for layer in gpfq["layers"]:
        assert f"{layer['error']:.4f} │ {layer['error_rtn']:.4f}" in output
    rtn_rows = {row["name"]: row for row in reports["rtn"]["layers"]}
    for row in reports["gpfq"]["layers"]:
        assert row["weight_fl_min"] == rtn_rows[row["name"]]["weight_fl_min"]  # same grids
        # GPFQ moves weights away from the nearest level to lower the output error
        assert row["weight_sqnr_db"] is not None
        assert row["weight_sqnr_db"] < rtn_rows[row["name"]]["weight_sqnr_db"]
        assert row["gpfq_error"] < row["rtn_error"]


def test_cli_gpfq_sweep_writes_the_seed_log(digits_model_path, tmp_path) -> None:
    from typer.testing import CliRunner

    from qcompiler.cli import app
    from qcompiler.gpfq_sweep import SEED_COLUMNS

    data = digits_model_path.parent
    log = tmp_path / "log.csv"
    args = ["gpfq", str(digits_model_path), "--calib", str(data / "calib.npz"), "--eval", str(data / "eval.npz"),
            "-b", "2,3", "-s", "1.0,1.3", "-bs", "128", "--log", str(log), "-q"]
    for run in range(2):
        result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / f"out{run}")])
        assert result.exit_code == 0, result.output
    import csv

    rows = list(csv.DictReader(log.open()))
    assert len(rows) == 8 and list(rows[0])[: len(SEED_COLUMNS)] == list(SEED_COLUMNS)
    assert {(r["Bits"], r["CNN_Alphabet_Scalar"]) for r in rows} == {("2", "1.0"), ("2", "1.3"), ("3", "1.0"), ("3", "1.3")}
    assert all(r["Quantization Batch Size"] == "128" for r in rows)
    two_bit = [r for r in rows if r["Bits"] == "2"]
    assert all(float(r["Quantized Top1 Accuracy"]) > float(r["RTN Top1 Accuracy"]) for r in two_bit)
    assert all(float(r["GPFQ Output MSE"]) < float(r["RTN Output MSE"]) for r in rows)
    assert len(list((tmp_path / "out0").glob("digits_cnn_b*_bs128_*.onnx"))) == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpfq", "--gpfq-skip", "conv9"], "skip names no weight layer 'conv9'"),
        (["--gpfq", "--gpfq-rounding", "up"], "rounding must be one of"),
        (["--gpfq", "--bits", "0"], "--weight-bits must be >= 1"),
        (["--gpfq", "--gpfq-damping", "-1"], "damping must be >= 0"),
        (["--gpfq", "--gpfq-cache-mb", "-1"], "cache_mb must be >= 0"),
    ],
)
def test_cli_gpfq_bad_input_is_one_line(digits_model_path, tmp_path, args, message) -> None:
    from typer.testing import CliRunner

    from qcompiler.cli import app

    data = digits_model_path.parent
    result = CliRunner().invoke(app, [str(digits_model_path), "--calib", str(data / "calib.npz"), "-o",
                                      str(tmp_path / "out"), "-q", *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_cli_gpfq_sweep_needs_labels(digits_model_path, tmp_path) -> None:
    from typer.testing import CliRunner

    from qcompiler.cli import app

    data = digits_model_path.parent
    result = CliRunner().invoke(app, ["gpfq", str(digits_model_path), "--calib", str(data / "calib.npz"),
                                      "--eval", str(data / "calib.npz"), "-o", str(tmp_path / "o"), "-q"])
    assert result.exit_code == 2 and "needs 'labels'" in result.output


def test_token_mask_leaves_padding_rows_out_and_mse_scales_clip() -> None:
    rng, text, inits = token_matmul("6")
    mask = np.zeros((10, 6), np.int64)
    mask[:, :4] = 1
    data = ArrayDataset({"x": rng.normal(size=(10, 6, 8)).astype(np.float32), "mask": mask})
    plain = run_gpfq(load_normalized(make_model(text, inits)), data=data, bits=3)
    masked = run_gpfq(load_normalized(make_model(text, inits)), data=data, bits=3, token_mask="mask")
    assert ann.require(list(plain.graph)[0], ann.GPFQLayer).rows == 60
    assert ann.require(list(masked.graph)[0], ann.GPFQLayer).rows == 40
    with pytest.raises(PipelineError, match="token_mask 'ids' is not a model input"):
        run_gpfq(load_normalized(make_model(text, inits)), data=data, token_mask="ids")
    mse = run_gpfq(load_normalized(make_model(text, inits)), data=data, bits=3, scale_search="mse")
    scales = np.asarray(ann.require(values_by_name(mse.graph)["w"], ann.IntegerWeights).scales)
    assert np.all(scales <= channel_scales(inits["w"].T, 3) * (1 + 1e-6))  # never wider than the max rule


def test_cli_gpfq_sweep_refuses_a_foreign_log_before_writing(digits_model_path, tmp_path) -> None:
    from typer.testing import CliRunner

    from qcompiler.cli import app

    data = digits_model_path.parent
    log = tmp_path / "other.csv"
    log.write_text("a,b\n1,2\n")
    result = CliRunner().invoke(app, ["gpfq", str(digits_model_path), "--calib", str(data / "calib.npz"),
                                      "--eval", str(data / "eval.npz"), "-o", str(tmp_path / "o"), "--log", str(log), "-q"])
    assert result.exit_code == 2 and "not a qcompiler GPFQ log" in result.output
    assert not (tmp_path / "o").exists() and log.read_text() == "a,b\n1,2\n"


def test_the_summary_has_no_top1_for_outputs_without_one_class_axis() -> None:
    """Per-token outputs (N, T, K) have no single arg-max per sample: the summary says None
    instead of a made-up agreement; its MSEs still compare every value."""
    rng = np.random.default_rng(3)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 9, 12] x) => (float[N, 9, 4] y) <float[12, 16] w1, float[16, 4] w2> {
        h = MatMul (x, w1)
        r = Relu (h)
        y = MatMul (r, w2)
    }
    """
    inits = {"w1": (0.3 * rng.normal(size=(12, 16))).astype(np.float32),
             "w2": (0.3 * rng.normal(size=(16, 4))).astype(np.float32)}
    x = rng.normal(size=(64, 9, 12)).astype(np.float32)
    out = run_gpfq(load_normalized(make_model(text, inits)), data=ArrayDataset({"x": x}), bits=3, batch_size=32)
    summary = ann.require(out, ann.GPFQSummary)
    assert summary.top1_agreement is None and summary.top1_agreement_rtn is None
    assert 0.0 < summary.output_mse < summary.output_mse_rtn
