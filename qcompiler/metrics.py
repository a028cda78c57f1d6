"""Output-quality metrics: accuracy, top-1 agreement and signal-to-quantization-noise ratio."""

from __future__ import annotations

import math

import numpy as np


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """``10*log10(sum ref**2 / sum (test - ref)**2)`` in dB (inf when identical)."""
    ref = reference.astype(np.float64)
    noise = float(np.square(test.astype(np.float64) - ref).sum())
    signal = float(np.square(ref).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def class_scores(logits: np.ndarray) -> np.ndarray | None:
    """Classifier logits as (samples, classes), or None when the output is not a classifier's.

    Axes of length 1 after the sample axis are dropped ((N, K, 1, 1) from a convolutional head
    is a classifier); what is left must be one axis of at least two classes. Any other shape
    (embeddings per token, a single logit, feature maps) has no single arg-max per sample.
    """
    if logits.ndim < 2:
        return None
    inner = [size for size in logits.shape[1:] if size != 1]
    if len(inner) != 1 or inner[0] < 2:
        return None
    return logits.reshape(logits.shape[0], inner[0])


def _scores(logits: np.ndarray) -> np.ndarray:
    scores = class_scores(logits)
    if scores is None:
        raise ValueError(f"top-1 needs (samples, classes) logits, got shape {tuple(logits.shape)}")
    return scores


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose arg-max class equals the label.

    Raises:
        ValueError: the logits are not a classifier's (see :func:`class_scores`).
    """
    return float(np.mean(_scores(logits).argmax(axis=1) == labels))


def topk(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of samples whose label is among the ``k`` largest logits.

    Raises:
        ValueError: the logits are not a classifier's (see :func:`class_scores`).
    """
    scores = _scores(logits)
    k = min(k, scores.shape[1])
    best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(best == labels[:, None], axis=1)))


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float | None:
    """Fraction of samples on which two models' arg-max classes agree; None when the outputs
    are not a classifier's (see :func:`class_scores`)."""
    sa, sb = class_scores(a), class_scores(b)
    if sa is None or sb is None:
        return None
    return float(np.mean(sa.argmax(axis=1) == sb.argmax(axis=1)))


def mean_cosine(reference: np.ndarray, test: np.ndarray) -> float:
    """Mean over samples of the cosine similarity of the flattened outputs (for embeddings)."""
    a = reference.reshape(reference.shape[0], -1).astype(np.float64)
    b = test.reshape(test.shape[0], -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.sum(a * b, axis=1) / np.maximum(norms, 1e-30)))


def output_mse(reference: np.ndarray, test: np.ndarray) -> float:
    """Mean squared difference."""
    return float(np.mean(np.square(test.astype(np.float64) - reference.astype(np.float64))))


def finite_or_none(x: float) -> float | None:
    """JSON has no inf/NaN: map them to None."""
    return x if math.isfinite(x) else None
