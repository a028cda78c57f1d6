"""``--settings FILE.toml``: option defaults for every sub-command, overridden by the command line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qcompiler.cli import app
from tests.conftest import DIGITS


def _write(tmp_path, text: str):
    path = tmp_path / "qcompile.toml"
    path.write_text(text)
    return str(path)


def test_settings_supply_compile_options_and_the_command_line_wins(tmp_path):
    settings = _write(tmp_path, f"""
target = "max78000"
calib = "{DIGITS / 'calib.npz'}"
weight-bits = 4
quiet = true
""")
    out = tmp_path / "a"
    result = CliRunner().invoke(app, ["--settings", settings, str(DIGITS / "digits_cnn.onnx"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == "max78000" and {r["weight_bits"] for r in report["layers"]} == {4}
    out = tmp_path / "b"
    result = CliRunner().invoke(app, [str(DIGITS / "digits_cnn.onnx"), f"--settings={settings}", "--target", "fixed-point",
                                      "--weight-bits", "6", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == "fixed-point" and {r["weight_bits"] for r in report["layers"]} == {6}


def test_settings_tables_configure_sub_commands(tmp_path):
    settings = _write(tmp_path, f"""
[inspect]
json = "{tmp_path / 'inspect.json'}"
""")
    result = CliRunner().invoke(app, ["--settings", settings, "inspect", str(DIGITS / "digits_cnn.onnx")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "inspect.json").read_text())["parameters"] == 47_530


@pytest.mark.parametrize("text, message", [
    ("weight-bitz = 4", "top level (compile) has no option 'weight-bitz'"),
    ("[compile]\nmystery = 1", "[compile] has no option 'mystery'"),
    ("[quantise]\nbits = 4", "unknown table [quantise]"),
    ("target = ", "not valid TOML"),
])
def test_bad_settings_are_one_line_errors(tmp_path, text, message):
    settings = _write(tmp_path, text)
    result = CliRunner().invoke(app, ["--settings", settings, str(DIGITS / "digits_cnn.onnx"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_missing_settings_file(tmp_path):
    result = CliRunner().invoke(app, ["--settings", str(tmp_path / "none.toml"), "inspect", str(DIGITS / "digits_cnn.onnx")])
    assert result.exit_code == 2 and "no such settings file" in result.output
