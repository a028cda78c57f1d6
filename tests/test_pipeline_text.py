"""Textual pipelines: parsing, formatting, round trips with the passes' reprs, and --pipeline."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qcompiler.cli import app
from qcompiler.passes import AllocateBitsPass, CalibratePass, DetectLayersPass, ProfileErrorPass
from qcompiler.passes.gpfq import GPFQPass
from qcompiler.pipeline_text import PipelineTextError, format_pipeline, parse_pipeline
from tests.conftest import DIGITS


def test_parse_reads_literals_bare_words_scalars_for_tuples_and_candidate_labels():
    passes = parse_pipeline(
        "calibrate(methods=percentile, percentile=99.9), profile(mode=fast, candidates=('fixed:2', 'deadzone:3:r0.3')),"
        "allocate(avg_bits=4, scope=all), gpfq(bits=3, scalar=1.5, skip=(0, 2), regularizer=L1), detect_layers",
        data=None)
    calibrate, profile, allocate, gpfq, detect = passes
    assert calibrate.methods == ("percentile",) and calibrate.percentile == 99.9
    assert profile.mode == "fast" and [c.label for c in profile.candidates] == ["fixed:2", "deadzone:3:r0.3"]
    assert allocate == AllocateBitsPass(avg_bits=4, scope="all")
    assert gpfq == GPFQPass(bits=3, scalar=1.5, skip=(0, 2), regularizer="L1")
    assert detect == DetectLayersPass()


@pytest.mark.parametrize("passes", [
    [CalibratePass(data=None, methods=("minmax", "mse"), bits=(4, 8), reservoir=1024, seed=3)],
    [ProfileErrorPass(data=None, mode="fast", tensors="weights", only=("0.weight",))],
    [AllocateBitsPass(total_bytes=1234.5, method="hull", kinds=("fixed", "uniform"))],
    [GPFQPass(bits=2, linear_bits=4, grid="fixed", rounding="stochastic", lam=0.25, token_mask="attention_mask")],
    [DetectLayersPass(keep_float=("Softmax",)), CalibratePass(data=None), GPFQPass()],
])
def test_format_then_parse_gives_equal_passes_and_reprs(passes):
    text = format_pipeline(passes)
    again = parse_pipeline(text, data=None)
    assert again == passes
    assert [repr(p) for p in again] == [repr(p) for p in passes]
    assert format_pipeline(again) == text


@pytest.mark.parametrize("text, message", [
    ("calibrate(", "syntax error"),
    ("quantize(bits=4)", "unknown pass 'quantize'"),
    ("calibrate(foo=1)", "calibrate has no field 'foo'"),
    ("gpfq(4)", "field=value arguments only"),
    ("allocate(avg_bits=4, method=magic)", "allocate: unknown allocator 'magic'"),
    ("gpfq(bits=0)", "gpfq:"),
    ("profile(candidates=('fixed',))", "malformed quantizer candidate"),
    ("calibrate(bits=[x + 1])", "is not a literal"),
    ("profile(mode=hybrid)", "refines an allocation: follow it with allocate"),
    ("profile(mode=hybrid),calibrate,allocate(avg_bits=4)", "follow it with allocate"),
])
def test_bad_descriptions_are_one_line_errors(text, message):
    with pytest.raises(PipelineTextError, match=message.replace("(", r"\(")):
        parse_pipeline(text, data=None)


def test_hybrid_profile_is_bound_to_the_allocation_after_it_and_round_trips():
    """The allocation a hybrid profile refines is written once, as the next pass; reading the
    text back binds it, and the target's legal widths reach both copies."""
    from qcompiler.passes.pipelines import text_pipeline
    from targets import get_target
    from targets.base import TargetConfig

    text = "profile(mode=hybrid, tensors=weights),allocate(avg_bits=3)"
    profile, allocate = parse_pipeline(text, data=None)
    assert profile.mode == "hybrid" and profile.allocate is allocate == AllocateBitsPass(avg_bits=3)
    assert format_pipeline([profile, allocate]) == "profile(mode='hybrid', tensors='weights'),allocate(avg_bits=3)"
    again = parse_pipeline(format_pipeline([profile, allocate]), data=None)
    assert again == [profile, allocate] and again[0].allocate is again[1]
    passes = text_pipeline(get_target("fixed-point"), TargetConfig(), text, calib=None, show_progress=False)
    profile, allocate = (p for p in passes if type(p).__name__ in ("ProfileErrorPass", "AllocateBitsPass"))
    assert allocate.legal_bits == (1, 2, 3, 4, 5, 6, 7, 8, 16) and profile.allocate == allocate


def test_cli_pipeline_runs_and_the_report_text_round_trips(tmp_path):
    out = tmp_path / "out"
    text = "calibrate(methods=percentile),profile(mode=fast),allocate(avg_bits=4),gpfq(bits=4)"
    result = CliRunner().invoke(app, [str(DIGITS / "digits_cnn.onnx"), "--calib", str(DIGITS / "calib.npz"),
                                      "--pipeline", text, "-q", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    described = parse_pipeline(report["pipeline_text"], data=None)
    names = [type(p).__name__ for p in described]
    assert names == ["CanonicalizePass", "FoldBatchNormPass", "DetectLayersPass", "CalibratePass", "ProfileErrorPass",
                     "AllocateBitsPass", "MeasureAllocationPass", "GPFQPass"]  # the joint measurement is added
    assert report["allocation"]["measured_distortion"] > 0
    assert described[3].methods == ("percentile",) and described[4].mode == "fast"
    assert described[5].avg_bits == 4 and described[5].legal_bits == (1, 2, 3, 4, 5, 6, 7, 8, 16)  # the target's
    assert {c.kind for c in described[4].candidates} == {"fixed"}
    ran = [row["pass"] for row in report["pipeline"]]
    assert ran.index("AssignFixedPointPass") < ran.index("GPFQPass")  # rewrites after the target's passes
    assert report["allocation"]["used_bits"] <= 4 * report["allocation"]["elements"]


def test_cli_pipeline_conflicts_and_missing_training_data(tmp_path):
    base = [str(DIGITS / "digits_cnn.onnx"), "--calib", str(DIGITS / "calib.npz"), "-q", "-o", str(tmp_path / "o")]
    result = CliRunner().invoke(app, [*base, "--pipeline", "calibrate()", "--avg-bits", "4"])
    assert result.exit_code == 2 and "put --avg-bits into it" in result.output
    result = CliRunner().invoke(app, [*base, "--pipeline", "calibrate(),finetune(epochs=1)"])
    assert result.exit_code == 2 and "--finetune-data" in result.output
    result = CliRunner().invoke(app, [*base, "--pipeline", "calibrate(bins=-1"])
    assert result.exit_code == 2 and "syntax error" in result.output
    assert not (tmp_path / "o").exists()
