"""Output-quality metrics: which outputs have a top-1, and what it is."""

from __future__ import annotations

import numpy as np
import pytest

from qcompiler.metrics import class_scores, top1, top1_agreement, topk


def test_class_scores_take_one_class_axis_after_dropping_unit_axes() -> None:
    logits = np.arange(24, dtype=np.float32).reshape(4, 6)
    np.testing.assert_array_equal(class_scores(logits), logits)
    np.testing.assert_array_equal(class_scores(logits.reshape(4, 6, 1, 1)), logits)  # conv head
    np.testing.assert_array_equal(class_scores(logits.reshape(4, 1, 6)), logits)


@pytest.mark.parametrize("shape", [(4,), (4, 1), (4, 1, 1), (4, 3, 2), (4, 9, 4), (4, 2, 3, 3)])
def test_outputs_without_one_class_axis_have_no_class_scores(shape: tuple[int, ...]) -> None:
    assert class_scores(np.zeros(shape, np.float32)) is None


def test_top1_and_topk_count_labels_among_the_largest_logits() -> None:
    logits = np.array([[0.1, 0.7, 0.2], [0.5, 0.1, 0.4], [0.2, 0.3, 0.5], [0.3, 0.4, 0.35]])
    labels = np.array([1, 2, 2, 0])
    assert top1(logits, labels) == 0.5
    assert topk(logits, labels, 2) == 0.75
    assert topk(logits, labels, 9) == 1.0  # k is capped at the class count
    assert top1(logits.reshape(4, 3, 1, 1), labels) == 0.5


def test_top1_refuses_logits_that_are_not_a_classifiers() -> None:
    with pytest.raises(ValueError, match=r"\(samples, classes\) logits, got shape \(4, 9, 4\)"):
        top1(np.zeros((4, 9, 4)), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match=r"got shape \(4, 9, 4\)"):
        topk(np.zeros((4, 9, 4)), np.zeros(4, np.int64), 5)


def test_top1_agreement_is_per_sample_and_none_without_classes() -> None:
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.2, 0.1]])
    b = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.1, 0.2]])
    assert top1_agreement(a, b) == 0.5
    # Per-token outputs: flattening them would compare one arg-max over 36 values per sample.
    rng = np.random.default_rng(0)
    assert top1_agreement(rng.normal(size=(5, 9, 4)), rng.normal(size=(5, 9, 4))) is None
    assert top1_agreement(np.zeros((5, 1)), np.ones((5, 1))) is None
