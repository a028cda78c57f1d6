"""Seed 002's greedy word-length search (algorithms.md §5.2), with a user metric callback.

The callback ``accuracy(word_lengths) -> float`` quantizes the model with the given word length
per tensor (choosing fractional lengths itself) and measures a higher-is-better metric. The
search lowers word lengths one bit at a time:

- sensitivity refresh: for each tensor, one probe with its word length lowered by one gives
  ``apb_i = (acc_ref − acc_i)/N_i`` (accuracy lost per bit saved); ``apb = 1`` when the word length
  would reach the minimum (Q002-8);
- phase A (``compress_first``), while the measured loss is below ``max_loss/3``: among tensors
  whose predicted loss ``apb_i·N_i`` is under ``cap`` take the largest; none qualifies → the first
  tensor (Q002-5);
- phase B (``loss_first``), while the loss is below ``max_loss``: the smallest ``apb``;
- a phase that overshoots ``max_loss`` undoes its last decrement, unless a ``tune`` callback
  (the seed's ``tune_model``: retraining at the new word lengths) recovers the accuracy first;
- the search stops once the compression reaches ``target_compression``; with ``tune``, a final
  ``tune(word_lengths, start − max_loss/10)`` tries to recover most of the loss (seed 002's
  final step).

Compression is seed 002's Σ wl·N / (32·Σ N). Each step costs one probe per tensor plus one check.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

from qcompiler.fl_search import compression_rate

Accuracy = Callable[[Mapping[str, int]], float]
#: ``tune(word_lengths, min_accuracy) -> recovered``: retrain at these word lengths until the
#: metric reaches ``min_accuracy``; the retrained weights become the new starting point on success.
Tune = Callable[[Mapping[str, int], float], bool]


@dataclasses.dataclass(frozen=True)
class GreedyResult:
    """The final word lengths and the search log.

    Attributes:
        word_lengths: tensor -> word length.
        loss: the final measured loss against the starting accuracy.
        compression: the final compression rate.
        log: ``(phase, tensor, loss, compression)`` per committed step.
        evaluations: number of accuracy calls.
    """

    word_lengths: Mapping[str, int]
    loss: float
    compression: float
    log: tuple[tuple[str, str, float, float], ...]
    evaluations: int


def greedy_wl_search(
    elements: Mapping[str, int],
    initial: Mapping[str, int],
    accuracy: Accuracy,
    max_loss: float,
    target_compression: float = 0.1,
    cap: float = 0.005,
    min_wl: int = 1,
    phases: Sequence[str] = ("compress_first", "loss_first"),
    tune: Tune | None = None,
    max_steps: int = 1000,
) -> GreedyResult:
    """Run phases A and B of seed 002's fine search (see the module docstring)."""
    names = list(elements)
    wl = dict(initial)
    calls = 0

    def measure(config: Mapping[str, int]) -> float:
        nonlocal calls
        calls += 1
        return accuracy(config)

    def compression() -> float:
        return compression_rate([wl[n] for n in names], [elements[n] for n in names])

    start = measure(wl)
    current = start
    log: list[tuple[str, str, float, float]] = []
    for phase in phases:
        threshold = max_loss / 3 if phase == "compress_first" else max_loss
        steps = 0
        while start - current < threshold and compression() > target_compression and steps < max_steps:
            apb = {}
            for n in names:
                if wl[n] - 1 < min_wl:
                    apb[n] = 1.0
                    continue
                probe = dict(wl)
                probe[n] -= 1
                apb[n] = (current - measure(probe)) / elements[n]
            candidates = [n for n in names if wl[n] - 1 >= min_wl]
            if not candidates:
                break
            if phase == "compress_first":
                cheap = [n for n in candidates if apb[n] * elements[n] < cap]
                choice = max(cheap, key=lambda n: elements[n]) if cheap else candidates[0]
            else:
                choice = min(candidates, key=lambda n: apb[n])
            wl[choice] -= 1
            current = measure(wl)
            steps += 1
            if start - current > max_loss:
                if tune is None or not tune(wl, start - max_loss):
                    wl[choice] += 1  # undo the step that overshot and end this phase
                    current = measure(wl)
                    break
                current = measure(wl)
                log.append(("tune", choice, start - current, compression()))
            log.append((phase, choice, start - current, compression()))
    if tune is not None and start - current > max_loss / 10 and tune(wl, start - max_loss / 10):
        current = measure(wl)
        log.append(("tune", "", start - current, compression()))
    return GreedyResult(dict(wl), start - current, compression(), tuple(log), calls)
