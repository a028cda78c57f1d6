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


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose arg-max over the last axis equals the label."""
    return float(np.mean(logits.reshape(len(labels), -1).argmax(axis=1) == labels))


def topk(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of samples whose label is among the ``k`` largest logits."""
    k = min(k, logits.shape[1])
    best = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(best == labels[:, None], axis=1)))


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of samples on which two models' arg-max predictions agree."""
    n = a.shape[0]
    return float(np.mean(a.reshape(n, -1).argmax(axis=1) == b.reshape(n, -1).argmax(axis=1)))


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
