"""The built wheel installs qcompiler.passes and qcompiler.targets from the passes/ and targets/ folders."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

from tests.conftest import ROOT


def test_wheel_contains_and_imports_passes_and_targets(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)],
        check=True, cwd=tmp_path,
    )
    (wheel,) = wheels.glob("qcompiler-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "qcompiler/passes/calibrate.py" in names and "qcompiler/targets/fixed_point/simulator.py" in names
    assert "qcompiler/targets/max78000/simulator.py" in names
    assert not [n for n in names if n.startswith(("passes/", "targets/"))]
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True)
    code = (
        "import qcompiler, qcompiler.passes, qcompiler.targets, qcompiler.cli;"
        "from qcompiler.passes import CalibratePass; from qcompiler.targets import TARGETS;"
        "print(qcompiler.__file__); print(qcompiler.passes.__file__); print(sorted(TARGETS))"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env, capture_output=True, text=True)
    lines = out.stdout.splitlines()
    assert lines[0].startswith(str(site)) and lines[1].startswith(str(site / "qcompiler" / "passes"))
    assert lines[2] == "['fixed-point', 'max78000']"
