"""Shared fixtures: the shipped digits example, small hand-built models, golden files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
GOLDEN = Path(__file__).resolve().parent / "golden"
SHARED_MAX78000 = ROOT.parent / "shared" / "data" / "max78000"


# Property tests draw the same examples on every run, so CI results are reproducible; explore
# new examples locally with ``pytest --hypothesis-profile=explore``.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("ci")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden", action="store_true", default=False, help="rewrite golden files instead of comparing"
    )


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden"))


@pytest.fixture(scope="session")
def digits_model_path() -> Path:
    return DIGITS / "digits_cnn.onnx"


@pytest.fixture(scope="session")
def digits_calib() -> dict[str, np.ndarray]:
    with np.load(DIGITS / "calib.npz") as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="session")
def digits_eval() -> dict[str, np.ndarray]:
    with np.load(DIGITS / "eval.npz") as npz:
        return {k: npz[k] for k in npz.files}


def load_example(relative: str, name: str):
    """Import an example script by path under a unique module name (they share file names)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_model(text: str, initializers: dict[str, np.ndarray] | None = None) -> ir.Model:
    """Build a model from ONNX text plus numpy initializers (names must appear in the text)."""
    tensors = [ir.tensor(array, name=name) for name, array in (initializers or {}).items()]
    return ir.from_onnx_text(text, initializers=tensors)
