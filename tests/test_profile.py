"""ProfileErrorPass: exact equals brute force, batching equals looping, fast tracks exact."""

from __future__ import annotations

import numpy as np
import pytest

from qcompiler import annotations as ann
from qcompiler.candidates import candidate_set
from qcompiler.data import ArrayDataset
from qcompiler.graph import values_by_name
from qcompiler.ir import normalize
from qcompiler.passes import CalibratePass, DetectLayersPass
from qcompiler.passes.profile_errors import ProfileErrorPass, agreement, fit_gain
from qcompiler.pipeline import PipelineError, run_pipeline
from tests.conftest import make_model

# A small CNN with a residual branch: the skip input of the Add must come from the cache.
TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 2, 6, 6] x) => (float[N, 5] y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    r1 = Relu (c1)
    c2 = Conv <pads = [1, 1, 1, 1]> (r1, w2)
    s = Add (c2, r1)
    r2 = Relu (s)
    f = Flatten (r2)
    h = Gemm <transB = 1> (f, w3, b3)
    y = Softmax (h)
}
"""
RNG = np.random.default_rng(2)
INITS = {
    "w1": RNG.normal(0, 0.4, (4, 2, 3, 3)).astype(np.float32), "b1": RNG.normal(0, 0.1, 4).astype(np.float32),
    "w2": RNG.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32),
    "w3": RNG.normal(0, 0.1, (5, 144)).astype(np.float32), "b3": np.zeros(5, np.float32),
}
DATA = ArrayDataset({"x": RNG.normal(size=(40, 2, 6, 6)).astype(np.float32)})
CANDIDATES = tuple(candidate_set(bits=(2, 3, 4, 6, 8), kinds=("uniform", "deadzone", "fixed"), deadzone_ratios=(0.3,)))


def _model():
    model = normalize(make_model(TEXT, INITS))
    run_pipeline(model, [DetectLayersPass(), CalibratePass(data=DATA, show_progress=False)])
    return model


def _profiles(mode, **kwargs):
    model = _model()
    ProfileErrorPass(data=DATA, candidates=CANDIDATES, mode=mode, batch_size=16, show_progress=False, **kwargs)(model)
    return {n: p for n, v in values_by_name(model.graph).items() if (p := ann.get(v, ann.ErrorProfile))}


@pytest.fixture(scope="module")
def exact():
    return _profiles("exact")


def test_profiles_cover_weights_and_activations(exact):
    assert set(exact) == {"x", "w1", "r1", "w2", "f", "w3"}
    assert exact["w1"].tensor_kind == "weight" and exact["w1"].elements == 72
    assert exact["r1"].tensor_kind == "activation" and exact["r1"].elements == 144
    p = exact["w2"]
    assert p.candidates[0] == "uniform:2" and len(p.distortion) == len(CANDIDATES) and all(p.measured)
    assert p.rate_fixed[p.candidates.index("uniform:4")] == 4 * 144
    d = dict(zip(p.candidates, p.distortion))
    assert d["uniform:8"] < d["uniform:4"] < d["uniform:2"]
    assert 0 < min(p.distortion)


def test_exact_equals_full_forward_brute_force(exact):
    full = _profiles("full")
    for name in exact:
        assert np.allclose(exact[name].distortion, full[name].distortion, rtol=1e-5, atol=1e-12), name


def test_batched_candidates_equal_looped(exact):
    looped = _profiles("exact", max_candidates_per_run=1, workers=1)
    for name in exact:
        assert np.allclose(exact[name].distortion, looped[name].distortion, rtol=1e-6, atol=1e-14), name


def test_large_weights_keep_integer_codes_and_measure_the_same(exact, monkeypatch):
    """Above KEEP_DEQUANTIZED_BYTES a weight's candidates are kept as codes in the narrowest
    integer type (ResNet-18: 0.6 GB instead of 2.3 GB of float32) and dequantized when measured:
    the same distortions to the last bit, in exact and in full mode."""
    import qcompiler.passes.profile_errors as pe

    monkeypatch.setattr(pe, "KEEP_DEQUANTIZED_BYTES", 0)
    kept = _profiles("exact")
    for name in exact:
        assert exact[name].distortion == kept[name].distortion, name
    full = _profiles("full")
    for name in exact:
        assert np.allclose(exact[name].distortion, full[name].distortion, rtol=1e-5, atol=1e-12), name
    q = pe.narrowest_int(np.array([-128, 127]))
    assert q.dtype == np.int8 and pe.narrowest_int(np.array([-129, 5])).dtype == np.int16
    assert pe.narrowest_int(np.array([0, 1 << 40])).dtype == np.int64 and pe.narrowest_int(np.array([], np.int64)).dtype == np.int8


def test_distortion_is_logit_mse_before_softmax(exact):
    # the last Gemm's weight: D is the mean squared change of h (the Softmax input)
    from qcompiler.candidates import apply, fit

    f = fit(CANDIDATES[2], INITS["w3"], True, axis=0)
    from qcompiler.runtime import Runner

    model = _model()
    feats = Runner(model, ["f"]).collect(DATA.batches(16), ["f"])["f"].astype(np.float64)
    want = np.mean((feats @ (apply(f, INITS["w3"]).astype(np.float64) - INITS["w3"]).T) ** 2)
    assert exact["w3"].distortion[2] == pytest.approx(want, rel=1e-4)


def test_fast_mode_tracks_exact(exact):
    fast = _profiles("fast")
    for name in exact:
        stats = agreement(exact[name], fast[name])
        assert stats["predicted"] == len(CANDIDATES) - 2  # probes: uniform 4 and 6 bits
        assert [c for c, m in zip(fast[name].candidates, fast[name].measured) if m] == ["uniform:4", "uniform:6"]
        assert stats["spearman"] > 0.8, (name, stats)
    # No nonlinearity after the last layer's weight: within the probes' quantizer family (per-
    # channel uniform) at >= 4 bits the linear model matches up to sampling error. Across
    # families (per-tensor fixed point, dead zones) one gain per tensor is coarser; that is what
    # the fast-vs-exact report in bench/RESULTS.md measures.
    e, f = exact["w3"], fast["w3"]
    picks = [i for i, c in enumerate(e.candidates) if c.startswith("uniform") and e.bits[i] >= 4]
    rel = [abs(f.distortion[i] - e.distortion[i]) / e.distortion[i] for i in picks]
    assert max(rel) < 0.35, rel


def test_fit_gain_is_least_squares_through_origin():
    assert fit_gain(np.array([2.0, 4.0]), np.array([1.0, 2.0])) == pytest.approx(2.0)
    assert fit_gain(np.array([1.0]), np.array([0.0])) == 0.0


def test_bad_input():
    with pytest.raises(PipelineError, match="profiling data is empty"):
        run_pipeline(_model(), [ProfileErrorPass(data=[], show_progress=False)])
    with pytest.raises(PipelineError, match=r"cannot profile \['nope'\]"):
        run_pipeline(_model(), [ProfileErrorPass(data=DATA, only=("nope",), show_progress=False)])
    with pytest.raises(ValueError, match="mode must be one of"):
        ProfileErrorPass(data=DATA, mode="guess")
    only = _profiles("exact", only=("w2",))
    assert set(only) == {"w2"}


def test_suffix_inputs_without_batch_axis_are_not_tiled():
    # the weight's suffix (Add) also consumes a shape-derived [1] tensor from outside it
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 3] y) {
        h = MatMul (x, w)
        s = Shape (x)
        last = Slice (s, one, two)
        f = Cast <to = 1> (last)
        y = Add (h, f)
    }
    """
    inits = {"w": RNG.normal(size=(4, 3)).astype(np.float32), "one": np.array([1], np.int64), "two": np.array([2], np.int64)}
    data = ArrayDataset({"x": RNG.normal(size=(12, 4)).astype(np.float32)})
    results = {}
    for mode in ("exact", "full"):
        model = normalize(make_model(text, inits))
        run_pipeline(model, [DetectLayersPass(), ProfileErrorPass(data=data, candidates=CANDIDATES[:5], mode=mode,
                                                                   tensors="weights", batch_size=4, show_progress=False)])
        results[mode] = ann.require(model.graph.initializers["w"], ann.ErrorProfile).distortion
    assert np.allclose(results["exact"], results["full"], rtol=1e-6)


def test_plots_draw_fast_predictions_dashed_over_the_measured_curves() -> None:
    from qcompiler.profiling import headless_pyplot, rate_distortion_figure

    labels = ("uniform:2", "uniform:4", "deadzone:2:r0.3", "deadzone:4:r0.3", "log:3")
    common = dict(tensor_kind="weight", elements=100, candidates=labels, bits=(2, 4, 2, 4, 3),
                  rate_fixed=(200.0, 400.0, 200.0, 400.0, 300.0), rate_entropy=(150.0, 350.0, 120.0, 300.0, 200.0))
    exact = ann.ErrorProfile(**common, distortion=(1.0, 0.1, 2.0, 0.3, 0.5), measured=(True,) * 5)
    fast = ann.ErrorProfile(**common, distortion=(0.8, 0.1, 1.5, 0.4, 0.7), measured=(False, True, False, False, False),
                            mode="fast")
    fig = rate_distortion_figure("w", exact, fast)
    lines = fig.axes[0].get_lines()
    solid = {ln.get_label(): ln for ln in lines if ln.get_linestyle() == "-"}
    dashed = [ln for ln in lines if ln.get_linestyle() == "--"]
    assert sorted(solid) == ["deadzone:r0.3", "log", "uniform"]
    assert len(dashed) == 3 and fig.axes[0].get_title() == "w (weight, exact; dashed: fast)"
    uniform = next(ln for ln in dashed if ln.get_color() == solid["uniform"].get_color())
    np.testing.assert_allclose(uniform.get_xdata(), [1.5, 3.5])  # entropy bits per element, rising
    np.testing.assert_allclose(uniform.get_ydata(), [0.8, 0.1])
    np.testing.assert_allclose(solid["deadzone:r0.3"].get_ydata(), [2.0, 0.3])
    headless_pyplot().close(fig)
    alone = rate_distortion_figure("w", exact)
    assert all(ln.get_linestyle() == "-" for ln in alone.axes[0].get_lines()) and len(alone.axes[0].get_lines()) == 3
    headless_pyplot().close(alone)


# --------------------------------------------------------------------------- hybrid
DIGITS_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


@pytest.fixture(scope="module")
def digits_calibrated():
    from qcompiler.ir import load_normalized
    from qcompiler.passes.pipelines import canonical_pipeline
    from tests.conftest import DIGITS

    with np.load(DIGITS / "calib.npz") as npz:
        data = ArrayDataset({"x": npz["x"][:128]})
    model = run_pipeline(load_normalized(DIGITS / "digits_cnn.onnx"), canonical_pipeline()).model
    CalibratePass(data=data, show_progress=False)(model)
    return model, data


def _allocated(model, data, mode, allocate):
    from qcompiler.passes.profile_errors import ProfileErrorPass

    model = model.clone()
    candidates = tuple(candidate_set(bits=DIGITS_BITS, kinds=("fixed",)))
    ProfileErrorPass(data=data, candidates=candidates, mode=mode, tensors="weights", show_progress=False,
                     allocate=allocate if mode == "hybrid" else None)(model)
    if mode != "hybrid":
        allocate(model)
    values = values_by_name(model.graph)
    chosen = {n: ann.get(v, ann.BitWidth).candidate for n, v in values.items() if ann.get(v, ann.BitWidth)}
    profiles = {n: p for n, v in values.items() if (p := ann.get(v, ann.ErrorProfile))}
    return chosen, profiles


@pytest.mark.parametrize("avg_bits", [3.0, 4.0])
def test_hybrid_ends_on_the_exact_allocation_where_fast_misjudges_it(digits_calibrated, avg_bits: float) -> None:
    """On the digits CNN, fast's linear model calls 2-bit weights of the 512x64 Gemm cheap and
    picks them at 3 and 4 bits on average; hybrid measures its choices and their neighbours,
    re-solves, and ends on the allocation the exact profile gives, with the exact numbers around
    it and fewer measurements."""
    from qcompiler.passes.allocate_bits import AllocateBitsPass

    model, data = digits_calibrated
    allocate = AllocateBitsPass(avg_bits=avg_bits, legal_bits=DIGITS_BITS, kinds=("fixed",))
    exact, exact_profiles = _allocated(model, data, "exact", allocate)
    fast, _ = _allocated(model, data, "fast", allocate)
    hybrid, profiles = _allocated(model, data, "hybrid", allocate)
    assert fast != exact
    assert hybrid == exact
    measured = sum(sum(p.measured) for p in profiles.values())
    assert measured < sum(len(p.measured) for p in profiles.values())
    for name, label in hybrid.items():
        profile = profiles[name]
        order = sorted(range(len(profile.candidates)), key=lambda i: (profile.rate_fixed[i], i))
        at = order.index(profile.candidates.index(label))
        for i in order[max(0, at - 1) : at + 2]:  # the choice and its two neighbours: measured, exact
            assert profile.measured[i] and profile.mode == "hybrid"
            np.testing.assert_allclose(profile.distortion[i], exact_profiles[name].distortion[i], rtol=1e-12)


def test_hybrid_needs_its_allocation_and_only_hybrid_takes_one() -> None:
    from qcompiler.passes.allocate_bits import AllocateBitsPass

    with pytest.raises(ValueError, match="needs the allocation it refines"):
        ProfileErrorPass(data=DATA, mode="hybrid")
    with pytest.raises(ValueError, match="only 'hybrid' uses one"):
        ProfileErrorPass(data=DATA, mode="exact", allocate=AllocateBitsPass(avg_bits=4))


def test_the_not_quantized_candidate_costs_32_bits_and_nothing_in_distortion() -> None:
    """algorithms.md §1.4: an explicit "none" candidate; its distortion is measured (float
    rounding of a separate run at most) and its rates are the raw float's."""
    from qcompiler.candidates import not_quantized

    candidates = (*tuple(candidate_set(bits=(2, 4), kinds=("uniform",))), not_quantized())
    for mode in ("exact", "fast"):
        model = _model()
        ProfileErrorPass(data=DATA, candidates=candidates, mode=mode, batch_size=16, show_progress=False)(model)
        for name, value in values_by_name(model.graph).items():
            p = ann.get(value, ann.ErrorProfile)
            if p is None:
                continue
            i = p.candidates.index("none")
            assert p.rate_fixed[i] == p.rate_entropy[i] == 32 * p.elements
            assert p.rate_log2[i] == pytest.approx(p.elements * np.log2(1e8))
            assert p.distortion[i] < 1e-9 * p.distortion[p.candidates.index("uniform:2")], (mode, name)


def test_an_allocation_may_keep_tensors_float() -> None:
    from qcompiler.candidates import not_quantized
    from qcompiler.passes.allocate_bits import AllocateBitsPass

    model = _model()
    candidates = (*tuple(candidate_set(bits=(2, 4, 8), kinds=("fixed",))), not_quantized())
    ProfileErrorPass(data=DATA, candidates=candidates, tensors="weights", batch_size=16, show_progress=False)(model)
    AllocateBitsPass(avg_bits=32, kinds=("fixed", "none"))(model)
    chosen = {n: ann.get(v, ann.BitWidth) for n, v in values_by_name(model.graph).items() if ann.get(v, ann.BitWidth)}
    assert {c.candidate for c in chosen.values()} == {"none"} and {c.bits for c in chosen.values()} == {32}
    AllocateBitsPass(avg_bits=12, kinds=("fixed", "none"))(model)  # room to keep only the small tensors float
    labels = {n: ann.get(v, ann.BitWidth).candidate for n, v in values_by_name(model.graph).items() if ann.get(v, ann.BitWidth)}
    assert labels["w3"] != "none" and "none" in labels.values()
    from qcompiler.passes.measure_allocation import joint_distortion

    assert joint_distortion(model, DATA, 16) > 0


def test_the_naive_loop_costs_one_forward_per_candidate_and_batch(monkeypatch):
    """The benchmark's baseline is "a full forward pass per candidate": the float logits once
    per batch, one prefix model per activation (graph inputs need none), one session per weight
    candidate, and per (candidate, batch) one run of the quantized model or of the prefix."""
    import qcompiler.passes.profile_errors as pe

    counts = {"sessions": 0, "runs": 0}

    class Counting(pe.Runner):
        def __init__(self, *args, **kwargs):
            counts["sessions"] += 1
            super().__init__(*args, **kwargs)

        def run(self, feed, names=None):
            counts["runs"] += 1
            return super().run(feed, names)

    model = _model()
    monkeypatch.setattr(pe, "Runner", Counting)
    ProfileErrorPass(data=DATA, candidates=CANDIDATES, mode="full", batch_size=16, show_progress=False)(model)
    c, batches = len(CANDIDATES), 3  # 40 samples in batches of 16
    # sessions: the first batch's activation samples, the float reference, the prefixes of r1
    # and f (x is a graph input), one per candidate of w1, w2 and w3
    assert counts["sessions"] == 1 + 1 + 2 + 3 * c
    # runs: the first batch, the reference per batch, per (candidate, batch) the prefix of r1
    # and f and the quantized model of each weight
    assert counts["runs"] == 1 + batches + (2 + 3) * c * batches


def test_candidates_stack_while_a_run_stays_within_stack_bytes():
    """Candidates share a suffix run while the stacked batch's largest activation fits
    STACK_BYTES (a core's L2), at least one and at most max_candidates_per_run; never past the
    memory budget."""
    import qcompiler.passes.profile_errors as pe
    from qcompiler.suffix import Suffix

    def k(per_sample, batch=64, count=50, **options):
        suffix = Suffix("s", ["s"], ["y"], None, True, per_sample)
        return ProfileErrorPass(data=DATA, **options)._chunk_size(suffix, batch, count)

    assert k(8192) == pe.STACK_BYTES // (64 * 8192) == 2  # digits' largest activation, batches of 64
    assert k(64 * 112 * 112 * 4) == 1  # a ResNet-18 stem: one candidate per run
    assert k(512) == 8 and k(512, count=3) == 3  # a last Gemm: up to the cap
    assert k(512, max_candidates_per_run=50) == pe.STACK_BYTES // (64 * 512)
    assert k(512, memory_budget_mb=0) == 1
    assert ProfileErrorPass(data=DATA)._chunk_size(Suffix("s", ["s"], ["y"], None, False, 512), 64, 50) == 1


def test_suffixes_share_the_weights_and_measure_the_same(exact, monkeypatch):
    """Suffix sessions are fed the weights from one shared copy instead of holding their own
    (ResNet-18's profile: 4.9 -> 2.4 GB). The distortions are identical."""
    import onnx_ir as ir

    import qcompiler.suffix as sx

    monkeypatch.setattr(sx, "SHARED_BYTES", 0)  # the test model's weights are small
    model = _model()
    constants = sx.shared_constants(ir.to_proto(model))
    assert set(constants) == {"w1", "b1", "w2", "w3", "b3"}
    assert all(not a.flags.writeable for a in constants.values())
    suffix = sx.build_suffix(model, ir.to_proto(model), "r1", constants=constants)
    assert set(suffix.constants) == {"w2", "w3", "b3"}
    shared = _profiles("exact")
    for name in exact:
        assert shared[name].distortion == exact[name].distortion, name


def test_a_fed_gemm_weight_measures_what_the_whole_model_measures():
    """onnxruntime prepacks a constant GEMM operand, and the prepacked product differs in the
    last bits from the product with the operand fed as an input (here by up to ~1e-5 of an
    8-bit candidate's distortion). Every profiling session runs without prepacking, so the
    exact mode (weights fed) equals the naive loop (weights inside each model)."""
    rng = np.random.default_rng(5)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 512] x) => (float[N, 1000] y) {
        y = Gemm <transB = 1> (x, w)
    }
    """
    model = normalize(make_model(text, {"w": rng.normal(0, 0.05, (1000, 512)).astype(np.float32)}))
    data = ArrayDataset({"x": rng.normal(size=(64, 512)).astype(np.float32)})
    candidates = tuple(candidate_set(bits=(6, 8), kinds=("uniform",)))
    profiles = {}
    for mode in ("exact", "full"):
        m = model.clone()
        run_pipeline(m, [DetectLayersPass(), CalibratePass(data=data, show_progress=False)])
        ProfileErrorPass(data=data, candidates=candidates, mode=mode, batch_size=64, show_progress=False)(m)
        profiles[mode] = {n: p.distortion for n, v in values_by_name(m.graph).items() if (p := ann.get(v, ann.ErrorProfile))}
    assert set(profiles["exact"]) == {"x", "w"}
    for name, d in profiles["exact"].items():
        assert np.allclose(d, profiles["full"][name], rtol=1e-12, atol=0), name


def test_shared_constants_are_the_large_float_initializers():
    """Not an initializer that is also a graph input (a default the caller may override), not
    an integer or a small tensor."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from qcompiler.suffix import shared_constants

    w = np.ones((8, 4, 3, 3), np.float32)
    inits = [nh.from_array(w, "conv_w"), nh.from_array(w, "default_w"), nh.from_array(np.ones((288, 8), np.float32), "gemm_b"),
             nh.from_array(np.ones(300, np.int64), "ints"), nh.from_array(np.ones(4, np.float32), "small")]
    nodes = [h.make_node("Conv", ["x", "conv_w"], ["c1"]), h.make_node("Conv", ["x", "default_w"], ["c2"]),
             h.make_node("Flatten", ["c1"], ["f"]), h.make_node("MatMul", ["f", "gemm_b"], ["m"]),
             h.make_node("Add", ["ints", "ints"], ["i2"]), h.make_node("Mul", ["small", "small"], ["s2"])]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 4, 5, 5]),
                                      h.make_tensor_value_info("default_w", T.FLOAT, [8, 4, 3, 3])],
                         [h.make_tensor_value_info(n, T.FLOAT, None) for n in ("c2", "m", "s2")], inits)
    shared = shared_constants(h.make_model(graph))
    assert sorted(shared) == ["conv_w", "gemm_b"]
    assert np.array_equal(shared["conv_w"], w) and not shared["conv_w"].flags.writeable


def test_duplicates_are_confirmed_bit_for_bit_not_by_fingerprint(monkeypatch):
    """Candidates whose fingerprints collide are the same only if every bit is: with every
    fingerprint made equal, the duplicates found are those of the real fingerprints."""
    import qcompiler.passes.profile_errors as pe

    assert pe.fingerprint(np.zeros(10_000, np.float32)) != pe.fingerprint(np.zeros(10_000, np.float64))
    a = np.arange(10_000, dtype=np.float32)
    b = a.copy()
    b[1] = -1.0  # between two sampled values: same fingerprint, other bits
    assert pe.fingerprint(a) == pe.fingerprint(b) and not pe.same_bits(a, b)
    assert not pe.same_bits(np.zeros(3), -np.zeros(3)) and pe.same_bits(a, a.copy())

    candidates = tuple(candidate_set(bits=(3, 5, 6, 8, 16), kinds=("log", "uniform")))
    found = {}
    for label, fingerprint in (("real", pe.fingerprint), ("colliding", lambda x: b"every candidate")):
        monkeypatch.setattr(pe, "fingerprint", fingerprint)
        tensor = pe._Tensor("w", "weight", INITS["w3"].size, [pe.fit_weight(c, INITS["w3"], 0) for c in candidates],
                            INITS["w3"], suffix=None)
        tensor.quantize_sample(keep=True)
        found[label] = tensor.same_as
    assert found["colliding"] == found["real"] != list(range(len(candidates)))


def test_a_weight_candidate_equal_to_an_earlier_one_is_measured_once(monkeypatch):
    """Log candidates past the weights' dynamic range give the same weights bit for bit (here
    log at 5-16 bits); only the first is run, the others get its distortion, which equals what
    the naive loop measures for each of them."""
    import qcompiler.passes.profile_errors as pe

    candidates = tuple(candidate_set(bits=(3, 5, 6, 8, 16), kinds=("log", "uniform")))
    runs: dict[str, list[int]] = {}
    original = pe.ProfileErrorPass._measure_batch

    def recording(self, t, out, indices, sq):
        runs.setdefault(t.name, []).extend(indices)
        return original(self, t, out, indices, sq)

    monkeypatch.setattr(pe.ProfileErrorPass, "_measure_batch", recording)
    profiles = {}
    for mode in ("exact", "full"):
        model = _model()
        ProfileErrorPass(data=DATA, candidates=candidates, mode=mode, batch_size=16, tensors="weights", show_progress=False)(model)
        profiles[mode] = {n: p for n, v in values_by_name(model.graph).items() if (p := ann.get(v, ann.ErrorProfile))}
    labels = [str(c) for c in profiles["exact"]["w1"].candidates]
    skipped = 0
    for name, p in profiles["exact"].items():
        measured = set(runs[name])
        d = dict(zip(p.candidates, p.distortion))
        for i, label in enumerate(p.candidates):
            if i not in measured:  # a duplicate: the same number as an earlier, measured candidate
                skipped += 1
                assert any(d[label] == d[p.candidates[j]] for j in measured if j < i), (name, label)
        assert np.allclose(p.distortion, profiles["full"][name].distortion, rtol=1e-12, atol=0), name
    assert skipped >= 3 and "log:16" in labels
