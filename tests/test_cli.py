"""End-to-end CLI tests with typer's runner: the digits example, bad inputs, determinism."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from qcompiler.cli import app
from tests.conftest import DIGITS

RUNNER = CliRunner()
MODEL = str(DIGITS / "digits_cnn.onnx")
CALIB = str(DIGITS / "calib.npz")
EVAL = str(DIGITS / "eval.npz")


def _compile(out: Path, *extra: str):
    return RUNNER.invoke(app, [MODEL, "--target", "fixed-point", "--calib", CALIB, "--eval", EVAL, "-o", str(out), *extra])


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "out"
    result = _compile(out)
    assert result.exit_code == 0, result.output
    return out, result


def test_digits_end_to_end(compiled):
    out, result = compiled
    assert sorted(p.name for p in out.iterdir()) == [
        ".qcompiler-output", "digits_cnn_int.h", "model.annotated.onnx", "model.int.json", "model.int.npz",
        "model.qdq.onnx", "report.html", "report.json"
    ]
    report = json.loads((out / "report.json").read_text())
    # what "wrote ..." lists: the artifacts, not the marker that lets the next run replace the folder
    assert report["artifacts"] == sorted(p.name for p in out.iterdir() if p.name != ".qcompiler-output")
    m = report["metrics"]
    assert m["float"]["top1"] >= 0.97
    assert abs(m["simulated"]["top1"] - m["float"]["top1"]) <= 0.005
    assert m["simulated"]["sqnr_db"] > 30
    assert m["simulated"]["top1_agreement"] >= 0.99
    assert "ort_kernel" in m and m["ort_kernel"]["sqnr_db"] > 15
    assert [l["op"] for l in report["layers"]] == ["Conv", "Conv", "Conv", "Gemm", "Gemm"]
    assert all(l["weight_bits"] == 8 and l["activation_bits"] == 8 for l in report["layers"])
    assert report["summary"]["params"] == sum(l["params"] for l in report["layers"])
    assert [p["pass"] for p in report["pipeline"]] == [
        "CanonicalizePass", "FoldBatchNormPass", "DetectLayersPass", "CalibratePass", "AssignFixedPointPass"]
    assert "logit SQNR" in result.output and "top-1" in result.output


def test_qdq_model_reproduces_report_numbers(compiled):
    import onnxruntime as ort

    from qcompiler.metrics import sqnr_db, top1

    out, _ = compiled
    with np.load(EVAL) as npz:
        x, labels = npz["x"], npz["labels"]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    q = ort.InferenceSession(str(out / "model.qdq.onnx"), options).run(None, {"x": x})[0]
    f = ort.InferenceSession(MODEL).run(None, {"x": x})[0]
    report = json.loads((out / "report.json").read_text())
    assert top1(q, labels) == pytest.approx(report["metrics"]["simulated"]["top1"])
    assert sqnr_db(f, q) == pytest.approx(report["metrics"]["simulated"]["sqnr_db"], rel=1e-6)


def test_artifacts_are_byte_identical_across_runs(compiled, tmp_path):
    out, _ = compiled
    again = tmp_path / "again"
    assert _compile(again, "--quiet").exit_code == 0
    for name in ("model.qdq.onnx", "model.annotated.onnx", "model.int.npz", "model.int.json", "digits_cnn_int.h"):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
    a = json.loads((out / "report.json").read_text())
    b = json.loads((again / "report.json").read_text())
    for report in (a, b):  # wall times are the only run-dependent entries
        for entry in report["pipeline"]:
            entry.pop("seconds")
        for key in ("simulator_seconds", "onnxruntime_seconds"):
            report["target_details"]["integer_simulator"].pop(key)
    assert a == b


def test_dump_ir_and_quiet(tmp_path):
    result = _compile(tmp_path / "out", "--quiet", "--dump-ir", str(tmp_path / "ir"))
    assert result.exit_code == 0 and result.output == ""
    assert len(list((tmp_path / "ir").glob("*.onnx"))) == 5


def _bad(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "out"
    result = RUNNER.invoke(app, [*args, "-o", str(out)])
    assert result.exit_code == 2, result.output
    lines = [l for l in result.output.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_missing_model(tmp_path):
    _bad(tmp_path, [str(tmp_path / "nope.onnx"), "--calib", CALIB], "nope.onnx: no such file")


def test_not_onnx(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07garbage" * 10)
    _bad(tmp_path, [str(junk), "--calib", CALIB], "not an ONNX model")


def test_no_quantizable_layer(tmp_path):
    import onnx

    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 1, 16, 16])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 1, 16, 16])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(path))
    _bad(tmp_path, [str(path), "--calib", CALIB], "model has no quantizable layer")


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"image": np.zeros((4, 1, 16, 16), np.float32)}, "array names do not match the model inputs ['x']"),
        ({"x": np.zeros((4, 1, 8, 8), np.float32)}, "array 'x' has shape (4, 1, 8, 8), the model expects [batch, 1, 16, 16]"),
        ({"x": np.zeros((4, 1, 16, 16), np.float64)}, "array 'x' has dtype float64, the model expects float32"),
        ({"x": np.full((4, 1, 16, 16), np.nan, np.float32)}, "contains 1024 NaN or Inf values"),
    ],
)
def test_bad_calibration_data(tmp_path, arrays, message):
    np.savez(tmp_path / "calib.npz", **arrays)
    _bad(tmp_path, [MODEL, "--calib", str(tmp_path / "calib.npz")], message)


def test_nan_in_weights(tmp_path):
    import onnx

    proto = onnx.load(MODEL)
    weight = next(t for t in proto.graph.initializer if t.name == "0.weight")
    arr = onnx.numpy_helper.to_array(weight).copy()
    arr[0, 0, 0, 0] = np.inf
    weight.CopyFrom(onnx.numpy_helper.from_array(arr, "0.weight"))
    path = tmp_path / "inf.onnx"
    onnx.save(proto, str(path))
    _bad(tmp_path, [str(path), "--calib", CALIB], "weight '0.weight'")


def test_options_of_the_other_input_kind_are_refused(tmp_path):
    # quantize.py options with an ONNX model, ONNX calibration data with a checkpoint: never silently ignored
    _bad(tmp_path, [MODEL, "--target", "max78000", "--calib", CALIB, "--config-file", "net.yaml"],
         "--config-file belongs to quantize.py mode")
    _bad(tmp_path, [MODEL, "--target", "max78000", "--calib", CALIB, "--clip-method", "MAX"], "--clip-method belongs")
    _bad(tmp_path, [str(tmp_path / "net.pth.tar"), "--target", "max78000", "--calib", CALIB],
         "--calib is not used with a checkpoint")


def test_missing_calib_and_unknown_target(tmp_path):
    _bad(tmp_path, [MODEL], "--calib DATA is required")
    _bad(tmp_path, [MODEL, "--calib", CALIB, "--target", "tpu"], "unknown target 'tpu'")


def test_output_path_that_is_a_file_or_a_foreign_folder_is_refused_before_any_work(tmp_path):
    # Outputs replace their folder as a whole; a file or a folder qcompiler did not write would be lost.
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    foreign = tmp_path / "project"
    foreign.mkdir()
    (foreign / "train.py").write_text("mine too")
    # a folder that cannot be created is found before the work too (not as an OSError at the end)
    for out, message in ((a_file, "exists and is not a folder"), (foreign, "was not written by qcompiler"),
                         (a_file / "out", "cannot write there")):
        result = RUNNER.invoke(app, [MODEL, "--calib", CALIB, "--quiet", "-o", str(out)])
        assert result.exit_code == 2 and result.output.startswith(f"error: {out}: ") and message in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert a_file.read_text() == "mine" and [p.name for p in foreign.iterdir()] == ["train.py"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "project"]  # no probe or temp left
    for command in (["profile", MODEL, "--calib", CALIB], ["channels", MODEL, "--tensor", "relu", "--calib", CALIB],
                    ["gpfq", MODEL, "--calib", CALIB, "--eval", EVAL]):
        result = RUNNER.invoke(app, [*command, "-o", str(foreign)])
        assert result.exit_code == 2 and "was not written by qcompiler" in result.output, result.output
    assert [p.name for p in foreign.iterdir()] == ["train.py"]


def test_an_empty_folder_or_a_previous_output_is_replaced(tmp_path, compiled):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _compile(empty, "--quiet").exit_code == 0 and (empty / "report.json").exists()
    previous = tmp_path / "previous"
    shutil.copytree(compiled[0], previous)
    (previous / "stale.bin").write_bytes(b"from an older run")
    assert _compile(previous, "--quiet").exit_code == 0
    assert not (previous / "stale.bin").exists() and (previous / "report.json").exists()


def test_existing_output_survives_a_failed_run(tmp_path, compiled):
    out = tmp_path / "out"
    shutil.copytree(compiled[0], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = RUNNER.invoke(app, [str(tmp_path / "missing.onnx"), "--calib", CALIB, "-o", str(out)])
    assert result.exit_code == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_help_and_version():
    result = RUNNER.invoke(app, ["--help"])
    assert result.exit_code == 0 and "compile" in result.output
    assert RUNNER.invoke(app, ["--version"]).output.startswith("qcompile ")


def test_kernel_gap_is_explained():
    from qcompiler.api import runtime_notes

    metrics = {"simulated": {"sqnr_db": 40.0}, "ort_kernel": {"sqnr_db": 20.0}}
    (note,) = runtime_notes(metrics, {"vnni": False})
    assert "20.0 dB below" in note and "without VNNI" in note
    assert runtime_notes({"simulated": {"sqnr_db": 40.0}, "ort_kernel": {"sqnr_db": 39.5}}, {"vnni": False}) == []


def test_profile_command_exports_json_plots_and_annotations(tmp_path):
    out = tmp_path / "prof"
    result = RUNNER.invoke(app, ["profile", MODEL, "--calib", CALIB, "-o", str(out), "--mode", "both",
                                 "--bits", "3,4,6", "--kinds", "uniform,fixed", "--tensors", "weights"])
    assert result.exit_code == 0, result.output
    assert "profiled 5 tensors x 6 candidates" in result.output  # 3 widths x 2 kinds
    report = json.loads((out / "profiles.json").read_text())
    assert sorted(report["tensors"]) == ["0.weight", "12.weight", "14.weight", "3.weight", "7.weight"]
    entry = report["tensors"]["3.weight"]
    rows = entry["exact"]["rows"]
    assert [r["candidate"] for r in rows] == ["uniform:3", "uniform:4", "uniform:6", "fixed:3", "fixed:4", "fixed:6"]
    assert rows[0]["distortion"] > rows[1]["distortion"] > rows[2]["distortion"] > 0
    assert rows[1]["rate_fixed"] == 4 * 4608 and all(r["measured"] for r in rows)
    assert rows[1]["rate_log2"] == pytest.approx(4608 * np.log2(15)) and rows[4]["rate_log2"] == 4 * 4608  # uniform:4, fixed:4
    assert not all(r["measured"] for r in entry["fast"]["rows"])
    assert -1 <= entry["fast_vs_exact"]["spearman"] <= 1
    assert report["fast_vs_exact"]["mean_spearman"] > 0.5
    pngs = sorted(p.name for p in (out / "plots").iterdir())
    assert pngs == ["0.weight.png", "12.weight.png", "14.weight.png", "3.weight.png", "7.weight.png"]
    assert (out / "plots" / "3.weight.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from qcompiler import annotations as ann
    from qcompiler.ir import load

    model = load(out / "model.profiled.onnx")
    profile = ann.get(model.graph.initializers["3.weight"], ann.ErrorProfile)
    assert profile.candidates[0] == "uniform:3" and profile.mode == "fast"


def test_profile_bad_options(tmp_path):
    _bad(tmp_path, ["profile", MODEL, "--calib", CALIB, "--kinds", "kmeans"], "unknown quantizer kinds")
    _bad(tmp_path, ["profile", MODEL, "--calib", CALIB, "--mode", "guess"], "profile mode must be")
    _bad(tmp_path, ["profile", MODEL, "--calib", str(tmp_path / "none.npz")], "none.npz: no such file")
    _bad(tmp_path, ["profile", MODEL, "--calib", CALIB, "--bits", "0"], "bit-widths must be in 1..16, got [0]")


def test_channels_command(tmp_path):
    out = tmp_path / "ch"
    result = RUNNER.invoke(app, ["channels", MODEL, "--tensor", "relu", "--calib", CALIB, "--eval", EVAL, "-o", str(out),
                                 "--table-samples", "4", "--eval-samples", "16", "--reserve-interval", "4"])
    assert result.exit_code == 0, result.output
    lines = (out / "mse.csv").read_text().splitlines()
    assert lines[0] == "bits,uniform,allocated,closed_form,dorefa" and len(lines) == 7
    rows = [list(map(float, l.split(","))) for l in lines[1:]]
    assert [r[0] for r in rows] == [2, 3, 4, 5, 6, 7]
    assert all(rows[i][1] > rows[i + 1][1] for i in range(5))  # uniform MSE falls with bits
    assert sum(r[2] < r[1] for r in rows) >= 4  # the allocation beats per-tensor uniform at most widths
    doc = json.loads((out / "channels.json").read_text())["pkg.qcompiler.channel_allocation"]
    curves = np.array(doc["curves"])
    assert curves.shape == (16, 6) and np.all(np.diff(curves, axis=1) <= 0)  # more intervals, less error
    assert len(doc["gains"]) == 16 and all(sum(n) == 16 * (2**b - 1) for n, b in zip(doc["closed_form"], doc["bits"]))


def test_channels_bad_tensor(tmp_path):
    _bad(tmp_path, ["channels", MODEL, "--tensor", "nope", "--calib", CALIB], "the model has no value named 'nope'")
    _bad(tmp_path, ["channels", MODEL, "--tensor", "relu", "--calib", CALIB, "--quantizer", "dorefa"], "quantizer must be one of")
    _bad(tmp_path, ["channels", MODEL, "--tensor", "relu", "--calib", CALIB, "--alpha", "-1"], "priority weights, >= 0")


def test_missing_finetune_data_fails_before_the_pipeline_runs(tmp_path, monkeypatch):
    from qcompiler.passes.calibrate import CalibratePass

    def never(*args, **kwargs):
        raise AssertionError("calibration ran before the fine-tuning data was checked")

    monkeypatch.setattr(CalibratePass, "call", never)
    _bad(tmp_path, [MODEL, "--calib", CALIB, "--finetune-data", str(tmp_path / "train.npz")], "train.npz: no such file")


def test_avg_bits_knapsack_cli(tmp_path):
    out = tmp_path / "mixed"
    result = RUNNER.invoke(app, [MODEL, "--target", "fixed-point", "--avg-bits", "4", "--allocator", "knapsack",
                                 "--calib", CALIB, "--eval", EVAL, "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["allocation"]["method"] == "knapsack"
    assert report["allocation"]["used_bits"] <= report["allocation"]["budget_bits"] == 4 * report["allocation"]["elements"]
    assert "W bits" in result.output  # the summary lists the bits of each layer
    _bad(tmp_path, [MODEL, "--calib", CALIB, "--avg-bits", "4", "--allocator", "magic"], "--allocator 'magic' is not one of")
    _bad(tmp_path, [MODEL, "--calib", CALIB, "--avg-bits", "0.5"], "impossible budget")


def test_profile_mode_hybrid_cli(tmp_path):
    """At 3 bits on average the fast curves put the 512x64 Gemm at 2 bits (its real logit MSE
    is 7-17); hybrid measures that choice, re-solves and lands on uniform 3 bits, the exact
    profile's answer."""
    out = tmp_path / "hybrid"
    result = RUNNER.invoke(app, [MODEL, "--avg-bits", "3", "--profile-mode", "hybrid", "--calib", CALIB, "-q",
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["allocation"]["bits"].values()) == {3}
    assert "profile(candidates=" in report["pipeline_text"] and "mode='hybrid'" in report["pipeline_text"]
    points = report["allocation"]["profile_points"]
    assert points["modes"] == ["hybrid"] and points["total"] == 5 * 9 and 10 <= points["measured"] < 45
    _bad(tmp_path, [MODEL, "--calib", CALIB, "--avg-bits", "3", "--profile-mode", "guess"],
         "--profile-mode 'guess' is not one of exact, fast, hybrid")
    _bad(tmp_path, [MODEL, "--calib", CALIB, "--eval", EVAL, "--max-loss", "0.01", "--profile-mode", "hybrid"],
         "--profile-mode hybrid refines the solution of one budget")


def test_greedy_allocator_cli(tmp_path):
    out = tmp_path / "greedy"
    result = RUNNER.invoke(app, [MODEL, "--calib", CALIB, "--eval", EVAL, "--max-loss", "0.02", "--allocator", "greedy",
                                 "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["allocation"]["method"] == "greedy"
    assert report["metrics"]["float"]["top1"] - report["metrics"]["simulated"]["top1"] <= 0.02 + 1e-9
    assert report["summary"]["compression"] < 0.25  # below uniform 8-bit
    _bad(tmp_path, [MODEL, "--calib", CALIB, "--eval", EVAL, "--allocator", "greedy"], "--allocator greedy needs --max-loss")


def test_labels_for_an_output_without_one_class_axis_are_refused(tmp_path):
    """Labels are one class per sample; a per-token output (N, 9, 4) has no top-1 to compare
    them with, and flattening it would score an arg-max over 36 values."""
    import onnx
    from onnx import helper as oh

    rng = np.random.default_rng(0)
    weight = oh.make_tensor("w", onnx.TensorProto.FLOAT, [12, 4], rng.normal(size=48).astype(np.float32))
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 9, 12])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 9, 4])], [weight],
    )
    path = tmp_path / "tokens.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), str(path))
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(20, 9, 12)).astype(np.float32), labels=np.zeros(20, np.int64))
    _bad(tmp_path, [str(path), "--calib", str(tmp_path / "calib.npz")],
         "calib.npz: has 'labels', but top-1 needs (samples, classes) logits, got shape (20, 9, 4)")
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(20, 9, 12)).astype(np.float32))
    result = RUNNER.invoke(app, [str(path), "--calib", str(tmp_path / "calib.npz"), "-o", str(tmp_path / "ok")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "ok" / "report.json").read_text())["metrics"]
    assert metrics["simulated"]["top1_agreement"] is None and metrics["simulated"]["sqnr_db"] > 20


def test_profile_from_reuses_curves_measured_earlier(tmp_path):
    """One profile serves any number of budgets: a compile at 4 bits from the curves of a
    compile at 3 bits allocates and quantizes exactly as a compile that profiles again."""
    import onnx

    first, again, fresh = tmp_path / "b3", tmp_path / "b4", tmp_path / "fresh"
    assert RUNNER.invoke(app, [MODEL, "--calib", CALIB, "--avg-bits", "3", "-q", "-o", str(first)]).exit_code == 0
    result = RUNNER.invoke(app, [MODEL, "--calib", CALIB, "--avg-bits", "4", "--profile-from",
                                 str(first / "model.annotated.onnx"), "-q", "-o", str(again)])
    assert result.exit_code == 0, result.output
    assert RUNNER.invoke(app, [MODEL, "--calib", CALIB, "--avg-bits", "4", "-q", "-o", str(fresh)]).exit_code == 0
    a, b = (json.loads((d / "report.json").read_text()) for d in (again, fresh))
    assert a["allocation"] == b["allocation"] and a["metrics"] == b["metrics"]
    assert "ImportProfilesPass" in [p["pass"] for p in a["pipeline"]] and "ProfileErrorPass" not in [p["pass"] for p in a["pipeline"]]
    assert onnx.load(str(again / "model.qdq.onnx")).graph == onnx.load(str(fresh / "model.qdq.onnx")).graph
    prof = tmp_path / "prof"
    assert RUNNER.invoke(app, ["profile", MODEL, "--calib", CALIB, "--kinds", "fixed", "--bits", "2,4", "--tensors",
                               "weights", "--no-plots", "-q", "-o", str(prof)]).exit_code == 0
    _bad(tmp_path, [MODEL, "--calib", CALIB, "--avg-bits", "4", "--profile-from", str(prof / "model.profiled.onnx")],
         "model.profiled.onnx: the profile of '0.weight' lacks the candidates ['fixed:1', 'fixed:3'")
    _bad(tmp_path, [MODEL, "--calib", CALIB, "--avg-bits", "4", "--allocate", "all", "--profile-from",
                    str(first / "model.annotated.onnx")], "no profile of the activation 'x' (profile the same model, with --tensors all)")
    _bad(tmp_path, [MODEL, "--calib", CALIB, "--avg-bits", "4", "--profile-mode", "fast", "--profile-from",
                    str(first / "model.annotated.onnx")], "--profile-from reads curves measured earlier")
    _bad(tmp_path, [MODEL, "--calib", CALIB, "--avg-bits", "4", "--profile-from", CALIB], "calib.npz")


def test_layer_names_are_never_cut_on_a_narrow_terminal():
    """Exported names often differ only at the end (node_conv2d_1 ... node_conv2d_19): the name
    column keeps them whole at 80 columns; the other columns fold, nothing is cut."""
    from rich.console import Console

    from qcompiler.cli import gpfq_table, layer_summary_table

    names = [f"node_conv2d_{i}" for i in range(8, 20)]
    rows = [{"name": n, "op": "Conv", "params": 2359808, "weight_bits": 16, "weight_fl_min": 13, "weight_fl_max": 15,
             "activation_bits": 16, "activation_fl": 11, "weight_sqnr_db": 45.31, "output_sqnr_db": 41.07} for n in names]
    gpfq = {"layers": [{"name": n, "bits": 4, "rows": 12544, "error": 0.0773, "error_rtn": 0.1302} for n in names]}
    for table in (layer_summary_table(rows), gpfq_table(gpfq)):
        console = Console(width=80, record=True)
        console.print(table)
        lines = console.export_text().splitlines()
        assert all(any(f"│ {n} " in line for line in lines) for n in names)
        assert "…" not in "".join(lines)
