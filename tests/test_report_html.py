"""report.html: parsed (structure, numbers, embedded plots) and rendered in headless Chromium."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from typer.testing import CliRunner

from qcompiler.cli import app
from tests.conftest import DIGITS

PNG = b"\x89PNG\r\n\x1a\n"


class _Page(HTMLParser):
    """Tables by id (rows of cell texts), images and every external reference."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: dict[str, str] = {}
        self.external: list[str] = []
        self.headings: list[str] = []
        self._table = self._row = self._cell = None
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("src", "href"):
            if key in attrs and not attrs[key].startswith("data:"):
                self.external.append(attrs[key])
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id", f"t{len(self.tables)}"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""
        elif tag == "img":
            self.images[attrs.get("id", "")] = attrs["src"]
        elif tag == "h2":
            self._in_h2 = True
            self.headings.append("")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "h2":
            self._in_h2 = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._in_h2:
            self.headings[-1] += data


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "out"
    result = CliRunner().invoke(app, [str(DIGITS / "digits_cnn.onnx"), "--calib", str(DIGITS / "calib.npz"), "--eval",
                                      str(DIGITS / "eval.npz"), "--avg-bits", "4", "-q", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_report_html_parses_with_the_report_numbers_and_embedded_plots(compiled):
    report = json.loads((compiled / "report.json").read_text())
    page = _Page()
    page.feed((compiled / "report.html").read_text())
    assert page.external == []  # self-contained
    assert page.headings[:4] == ["Accuracy: float vs simulated vs ORT kernel", "Layers", "Rate–distortion curves",
                                 "Allocation: Pareto front"]
    metrics = {row[0]: row[1:] for row in page.tables["metrics"][1:]}
    assert float(metrics["top1"][1]) == pytest.approx(report["metrics"]["simulated"]["top1"], abs=5e-4)
    assert float(metrics["sqnr_db"][2]) == pytest.approx(report["metrics"]["ort_kernel"]["sqnr_db"], rel=1e-3)
    layers = page.tables["layers"][1:]
    assert [row[0] for row in layers] == [r["name"] for r in report["layers"]]
    assert [int(row[4]) for row in layers] == [r["weight_bits"] for r in report["layers"]]
    contributions = [float(row[8]) for row in layers]  # the profiled output MSE of each chosen width
    assert sum(contributions) == pytest.approx(report["allocation"]["predicted_distortion"], rel=1e-3)
    assert [row[0] for row in page.tables["pipeline"][1:]] == [s["pass"] for s in report["pipeline"]]
    for key in ("rd", "pareto"):
        data = base64.b64decode(page.images[key].split(",", 1)[1])
        assert data.startswith(PNG) and len(data) > 5000


def test_report_html_compares_gpfq_with_round_to_nearest(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [str(DIGITS / "digits_cnn.onnx"), "--target", "fixed-point", "--bits", "4",
                                      "--gpfq", "--calib", str(DIGITS / "calib.npz"), "-q", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    page = _Page()
    page.feed((out / "report.html").read_text())
    assert "GPFQ vs round-to-nearest" in page.headings
    rows = page.tables["gpfq-layers"][1:]
    assert [row[0] for row in rows] == [r["name"] for r in report["gpfq"]["layers"]]
    for row, layer in zip(rows, report["gpfq"]["layers"]):
        assert float(row[4]) == pytest.approx(layer["error"], rel=1e-3)
        assert float(row[5]) == pytest.approx(layer["error_rtn"], rel=1e-3)
    output = {row[0]: row[1:] for row in page.tables["gpfq-output"][1:]}
    assert float(output["sqnr_db"][0]) == pytest.approx(report["gpfq"]["sqnr_db"], rel=1e-3)
    assert float(output["sqnr_db"][1]) == pytest.approx(report["gpfq"]["sqnr_db_rtn"], rel=1e-3)
    layers = page.tables["layers"][1:]  # weight SQNR of the rewritten weights against the float ones
    assert [float(row[9]) for row in layers] == pytest.approx([r["weight_sqnr_db"] for r in report["layers"]], rel=1e-3)


def test_pareto_points_front_baselines_and_choice(compiled):
    from qcompiler import annotations as ann
    from qcompiler.ir import load
    from qcompiler.report_html import _weight_profiles, pareto_points

    model = load(compiled / "model.annotated.onnx")
    profiles = _weight_profiles(model)
    chosen = {v.name: ann.get(v, ann.BitWidth) for v in model.graph.initializers.values() if v.name in profiles}
    points = pareto_points(profiles, chosen)
    report = json.loads((compiled / "report.json").read_text())
    (size, distortion), = points["chosen"]
    assert size == pytest.approx(report["allocation"]["used_bits"] / 8)
    front = np.array(points["front"])
    # the lower convex hull, interpolated, lies on or below every achievable point: each uniform
    # baseline and the chosen allocation
    for s, d in [*points["uniform"], (size, distortion)]:
        assert np.interp(s, front[:, 0], front[:, 1]) <= d * (1 + 1e-9)
    assert len(points["uniform"]) == 9  # fixed point 1-8 and 16 bits


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="headless Chromium is not installed (Debian package chromium)")
def test_report_html_renders_in_headless_chromium(compiled, tmp_path):
    import matplotlib.image as mpimg

    shot = tmp_path / "report.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'u'}",
                    "--window-size=1200,2400", f"--screenshot={shot}", (compiled / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    image = mpimg.imread(shot)
    assert image.shape[0] >= 2000 and image.shape[1] >= 1100
    gray = image[..., :3].mean(axis=2)
    assert gray.std() > 0.05  # text, tables and plots, not a blank page
    assert (gray < 0.3).mean() > 0.005  # dark pixels: rendered text and plot lines
