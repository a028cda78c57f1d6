"""Seed 000's allocation files: pareto_condition_inputs.txt and bit_allocation_{10·b̄}.txt."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from qcompiler.candidates import candidate_set
from qcompiler.cli import app
from qcompiler.errors import DataError
from qcompiler.pareto_files import (
    SeedPoint,
    SeedTensor,
    allocate_seed,
    format_bit_allocation,
    format_pareto_inputs,
    parse_budgets,
    profiles_to_seed,
    read_pareto_inputs,
)
from qcompiler.passes import ProfileErrorPass
from tests.conftest import DIGITS
from tests.test_profile import DATA, _model

# two weights (N = 100, 50) and one activation (N = 20): rate = N·log2 L
TEXT = """3
0 30 3 158.4962500721156 2
0 30 7 280.7354922057604 0.5
0 50 15 390.6890595608519 0.1
2
1 10 3 79.2481250360578 1.5
1 10 31 247.70981551934375 0.05
2
0 -1 5 46.43856189774724 0.8
0 -1 255 159.88706873717715 0.01
"""


def _write(tmp_path, text=TEXT, name="pareto_condition_inputs.txt"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_the_file_reads_into_curves_with_their_element_counts(tmp_path):
    tensors = read_pareto_inputs(_write(tmp_path))
    assert [(t.layer, t.activation, len(t.points)) for t in tensors] == [(0, False, 3), (1, False, 2), (0, True, 2)]
    assert [t.elements for t in tensors] == pytest.approx([100, 50, 20])
    assert tensors[0].points[1] == SeedPoint(30.0, 7, 280.7354922057604, 0.5)
    assert format_pareto_inputs(tensors) == TEXT  # written back to the byte


def test_allocation_is_the_brute_force_optimum_and_writes_dz_l_lines(tmp_path):
    tensors = read_pareto_inputs(_write(tmp_path))
    total = sum(t.elements for t in tensors)
    for avg in (2.0, 3.0, 4.0, 6.0):
        choice, result = allocate_seed(tensors, avg, "knapsack")
        feasible = [c for c in itertools.product(*(t.points for t in tensors)) if sum(p.rate for p in c) <= avg * total]
        best = min(sum(p.distortion for p in c) for c in feasible)
        assert result.distortion == pytest.approx(best) and sum(p.rate for p in choice) <= avg * total
    choice, _ = allocate_seed(tensors, 3.0, "knapsack")
    assert format_bit_allocation(choice) == "30 7\n10 3\n-1 5\n"  # D 2.8: 7 + 31 levels would be 575 > 510 bits
    choice, _ = allocate_seed(tensors, 4.0, "knapsack", max_point_error=1.0)  # the seed drops D > 1
    assert all(p.distortion <= 1.0 for p in choice)
    with pytest.raises(DataError, match="weight 0: every point has D > 0.01"):
        allocate_seed(tensors, 3.0, max_point_error=0.01)


@pytest.mark.parametrize("text, message", [
    ("", ": no tensor in the file"),
    ("two\n", ":1: expected a point count, got 'two'"),
    ("2\n0 30 3 1.0 0.5\n", ":3: expected 'layer dz L rate D', got ''"),
    ("1\n0 30 three 1.0 0.5\n", ":2: expected 'layer dz L rate D' numbers"),
    ("1\n0 30 3 -1 0.5\n", ":2: L must be >= 2 and rate, D finite and >= 0"),
    ("2\n0 30 3 158.5 1\n0 30 7 100 0.5\n", ":1: the rates disagree on N"),
    ("1\n0 -1 3 10 1\n1\n0 30 3 10 1\n", ":3: a weight after the activations"),
    ("2\n0 -1 3 10 1\n0 30 3 10 1\n", ":1: a tensor mixes weight and activation points"),
    (b"\xff\xfe", ": not a text file"),
])
def test_bad_files_name_the_file_and_line(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(DataError, match=str(path) + message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        read_pareto_inputs(path)


def test_budget_lists():
    assert parse_budgets("1.5:2:0.1") == [1.5, 1.6, 1.7, 1.8, 1.9, 2.0]
    assert parse_budgets("2,3.5") == [2.0, 3.5] and len(parse_budgets("1.5:16:0.1")) == 146
    for bad in ("1:2:0", "a,b", "0,1", "1:2"):
        with pytest.raises(DataError, match="--avg-bits"):
            parse_budgets(bad)


def test_profiles_export_their_dead_zone_points_weights_first():
    """Explicit level counts and ratios, weights and activations: the exported rates are N·log2 L
    and the distortions the profile's."""
    candidates = tuple(candidate_set(kinds=("deadzone", "uniform"), bits=(4,), deadzone_ratios=(0.0, 0.3),
                                     deadzone_levels_list=(3, 41, 2048)))
    model = _model()
    ProfileErrorPass(data=DATA, candidates=candidates, batch_size=16, show_progress=False)(model)
    tensors = profiles_to_seed(model)
    assert [(t.name, t.activation, t.layer) for t in tensors] == [
        ("w1", False, 0), ("w2", False, 1), ("w3", False, 2), ("x", True, 0), ("r1", True, 1), ("f", True, 2)]
    w2 = tensors[1]
    assert [(p.dz, p.levels) for p in w2.points] == [(0, 3), (30, 3), (0, 41), (30, 41), (0, 2048), (30, 2048)]
    assert [p.rate for p in w2.points] == pytest.approx([144 * math.log2(L) for L in (3, 3, 41, 41, 2048, 2048)])
    assert [(p.dz, p.levels) for p in tensors[4].points] == [(-1, 3), (-1, 41), (-1, 2048)]  # ratio 0 only
    assert [t.elements for t in tensors] == pytest.approx([72, 144, 720, 72, 144, 144])
    again = read_pareto_inputs_text(format_pareto_inputs(tensors))
    assert [t.points for t in again] == [t.points for t in tensors]
    model = _model()  # the "not quantized" candidate is the seed's L = 100000000
    ProfileErrorPass(data=DATA, candidates=tuple(candidate_set(kinds=("deadzone", "none"), deadzone_ratios=(0.0,),
                                                               deadzone_levels_list=(3,))),
                     batch_size=16, show_progress=False)(model)
    tensors = profiles_to_seed(model)
    assert [(p.dz, p.levels) for p in tensors[0].points] == [(0, 3), (0, 100_000_000)]
    assert [(p.dz, p.levels) for p in tensors[3].points] == [(-1, 3), (-1, 100_000_000)]
    assert [p.points for p in read_pareto_inputs_text(format_pareto_inputs(tensors))] == [t.points for t in tensors]
    model = _model()
    ProfileErrorPass(data=DATA, candidates=tuple(candidate_set(kinds=("deadzone",), deadzone_ratios=(0.3,),
                                                               deadzone_levels_list=(3,))),
                     batch_size=16, show_progress=False)(model)
    with pytest.raises(DataError, match="x: no ratio-0 dead zone"):
        profiles_to_seed(model)


def read_pareto_inputs_text(text):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "p.txt"
        path.write_text(text)
        return read_pareto_inputs(path)


def test_cli_profile_exports_and_allocate_writes_one_file_per_budget(tmp_path):
    runner = CliRunner()
    (tmp_path / "levels.txt").write_text("3\n5\n9\n17\n")
    prof = tmp_path / "prof"
    result = runner.invoke(app, ["profile", str(DIGITS / "digits_cnn.onnx"), "--calib", str(DIGITS / "calib.npz"),
                                 "--kinds", "deadzone", "--deadzone-ratios", "0.3", "--deadzone-levels",
                                 f"@{tmp_path / 'levels.txt'}", "--tensors", "weights", "--export-pareto-inputs",
                                 "--no-plots", "-q", "-o", str(prof)])
    assert result.exit_code == 0, result.output
    report = json.loads((prof / "profiles.json").read_text())
    assert report["pareto_inputs"]["tensors"] == ["0.weight", "3.weight", "7.weight", "12.weight", "14.weight"]
    tensors = read_pareto_inputs(prof / "pareto_condition_inputs.txt")
    assert [p.levels for p in tensors[0].points] == [3, 5, 9, 17]
    out = tmp_path / "alloc"
    result = runner.invoke(app, ["allocate", str(prof / "pareto_condition_inputs.txt"), "--avg-bits", "2:3:0.5", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["allocations.json", "bit_allocation_20.txt", "bit_allocation_25.txt",
                                                     "bit_allocation_30.txt"]
    rows = json.loads((out / "allocations.json").read_text())["allocations"]
    assert [r["avg_bits"] for r in rows] == [2.0, 2.5, 3.0]
    result = runner.invoke(app, ["allocate", str(prof / "pareto_condition_inputs.txt"), "--avg-bits", "1,2", "-o", str(tmp_path / "a2")])
    assert result.exit_code == 0 and result.output.startswith("1 bits: skipped, impossible budget"), result.output
    assert sorted(p.name for p in (tmp_path / "a2").iterdir() if not p.name.startswith(".")) == ["allocations.json", "bit_allocation_20.txt"]
    assert all(r["rate_per_element"] <= r["avg_bits"] + 1e-9 for r in rows)
    assert rows[0]["distortion"] > rows[1]["distortion"] > rows[2]["distortion"]
    lines = (out / "bit_allocation_30.txt").read_text().splitlines()
    assert len(lines) == 5 and all(line.split()[0] == "30" and line.split()[1] in {"3", "5", "9", "17"} for line in lines)
    ev = tmp_path / "evaluated"
    result = runner.invoke(app, ["allocate", str(prof / "pareto_condition_inputs.txt"), "--avg-bits", "2,3",
                                 "--model", str(DIGITS / "digits_cnn.onnx"), "--calib", str(DIGITS / "calib.npz"),
                                 "--eval", str(DIGITS / "eval.npz"), "-o", str(ev)])
    assert result.exit_code == 0, result.output
    summary = json.loads((ev / "allocations.json").read_text())
    assert summary["tensors"] == ["0.weight", "3.weight", "7.weight", "12.weight", "14.weight"]
    assert summary["float_top1"] == pytest.approx(0.9944, abs=1e-4)
    low, high = summary["allocations"]
    assert low["measured_distortion"] > high["measured_distortion"] > 0 and 0.5 < high["top1"] <= 1.0
    assert 0.2 < high["measured_distortion"] / high["distortion"] < 5  # eval split against the calib curves
    codebooks = (ev / "codebooks_30.txt").read_text().splitlines()
    chosen = (ev / "bit_allocation_30.txt").read_text().splitlines()
    assert [line.split()[0] for line in codebooks] == summary["tensors"]
    assert [" ".join(line.split()[1:3]) for line in codebooks] == chosen
    assert all(len(line.split()[3].split(".")[1]) == 12 and float(line.split()[4]) > 0 for line in codebooks)
    for args, message in [
        (["allocate", str(tmp_path / "none.txt"), "--avg-bits", "2"], "none.txt: cannot read it"),
        (["allocate", str(prof / "pareto_condition_inputs.txt"), "--avg-bits", "1,1.2"], "no budget of 1, 1.2 bits per element is feasible: impossible budget"),
        (["allocate", str(prof / "pareto_condition_inputs.txt"), "--avg-bits", "2", "--allocator", "magic"], "--allocator 'magic'"),
        (["allocate", str(prof / "pareto_condition_inputs.txt"), "--avg-bits", "2", "--model", str(DIGITS / "digits_cnn.onnx")],
         "--model and --calib go together"),
        (["allocate", str(_write(tmp_path)), "--avg-bits", "3", "--model", str(DIGITS / "digits_cnn.onnx"), "--calib",
          str(DIGITS / "calib.npz")], "pareto_condition_inputs.txt: 2 weights and 1 activations, the model has 5 weights and 5 activations"),
        (["profile", str(DIGITS / "digits_cnn.onnx"), "--calib", str(DIGITS / "calib.npz"), "--deadzone-levels", "3,x"], "expected integers separated by commas or white space"),
        (["profile", str(DIGITS / "digits_cnn.onnx"), "--calib", str(DIGITS / "calib.npz"), "--deadzone-levels", "2"], "level counts must be in 3..65536"),
        (["profile", str(DIGITS / "digits_cnn.onnx"), "--calib", str(DIGITS / "calib.npz"), "--kinds", "uniform", "--export-pareto-inputs"], "no dead-zone candidate was profiled"),
    ]:
        bad = tmp_path / "bad"
        result = runner.invoke(app, [*args, "-o", str(bad)])
        lines = [line for line in result.output.strip().splitlines() if line]
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
        assert not bad.exists()


def test_numbers_are_written_so_they_read_back_exactly():
    tensor = SeedTensor(0, False, (SeedPoint(33.3, 3, 0.1 + 0.2, 1 / 3), SeedPoint(10.0, 5, math.log2(5) / math.log2(3) * (0.1 + 0.2), 1e-300)))
    text = format_pareto_inputs([tensor])
    assert text.splitlines()[1] == "0 33.3 3 0.30000000000000004 0.3333333333333333"
    again = read_pareto_inputs_text(text)[0]
    assert again.points == tensor.points and np.isclose(again.elements, tensor.elements)


def test_a_curve_file_must_fit_the_models_element_counts(tmp_path):
    from qcompiler.ir import load_normalized
    from qcompiler.pareto_files import match_tensors
    from qcompiler.passes.pipelines import canonical_pipeline
    from qcompiler.pipeline import run_pipeline

    model = run_pipeline(load_normalized(DIGITS / "digits_cnn.onnx"), canonical_pipeline()).model
    sizes = [144, 4608, 9216, 32768, 640]  # the digits CNN's weights, in layer order
    text = "".join(f"1\n{i} 30 3 {n * math.log2(3)!r} 1\n" for i, n in enumerate(sizes))
    names = match_tensors(model, read_pareto_inputs(_write(tmp_path, text)), "f")
    assert names == ["0.weight", "3.weight", "7.weight", "12.weight", "14.weight"]
    sizes[2] = 9000
    text = "".join(f"1\n{i} 30 3 {n * math.log2(3)!r} 1\n" for i, n in enumerate(sizes))
    with pytest.raises(DataError, match="f: weight 2 has N = 9000 .rate / log2 L., the model's '7.weight' has 9216 elements"):
        match_tensors(model, read_pareto_inputs(_write(tmp_path, text)), "f")


def test_the_seeds_not_quantized_level_count_leaves_a_tensor_float(tmp_path):
    """The seed writes L = ∞ as 100000000: applied, that tensor keeps its float values."""
    from qcompiler.pareto_files import SeedEvaluation, run_seed_allocation

    sizes = [144, 4608, 9216, 32768, 640]
    text = "".join(f"2\n{i} 30 3 {n * math.log2(3)!r} 1\n{i} 0 100000000 {n * math.log2(1e8)!r} 0\n"
                   for i, n in enumerate(sizes))
    path = _write(tmp_path, text)
    rows = run_seed_allocation(path, [1.6, 27.0], tmp_path / "o", evaluation=SeedEvaluation(
        DIGITS / "digits_cnn.onnx", DIGITS / "calib.npz"))
    assert rows[0]["measured_distortion"] > 0 and rows[1]["measured_distortion"] == 0.0  # all float at 27 bits
    assert (tmp_path / "o" / "bit_allocation_270.txt").read_text() == "0 100000000\n" * 5
    assert (tmp_path / "o" / "codebooks_270.txt").read_text().splitlines()[0] == "0.weight 0 100000000 - -"
